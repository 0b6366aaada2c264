#!/usr/bin/env python
"""Streamed gathering of one Mixtral-8x7B-shaped layer: time and peak memory.

Writes a 1-layer Mixtral checkpoint with 8 experts (hidden 4096, intermediate 14336, bf16, random weights, legacy
per-expert keys, one shard per expert as `save_pretrained` would shard it) to --work_dir, then runs
`gather_experts(path, variant, output_dir=...)` in a fresh process per gathering variant (a GatheringConfig string,
e.g. `svd-r256`) and records its wall time and peak resident memory (`ru_maxrss`). Targets: peak RSS under 3x the
layer's expert weights (8 x 3 x 4096 x 14336 x 2 bytes = 2.63 GiB) at full rank and under 2x at rank 256; rank 256
within 1.5x of its floor, the bare `torch.svd_lowrank(W, q=256, niter=2)` of the same 24 matrices measured in the
same run (FLOOR below).

    python benchmarks/gather_memory.py               # ~5 GB of disk in --work_dir, a few minutes
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from common import REPO, write_result

HIDDEN, INTERMEDIATE, EXPERTS = 4096, 14336, 8

CHILD = r"""
import json, resource, sys, time
import torch
from hf_moekd.ones import gather_experts
torch.set_num_threads(int(sys.argv[4]))
start = time.perf_counter()
gather_experts(sys.argv[1], sys.argv[2], output_dir=sys.argv[3], overwrite=True, progress=False, return_model=False)
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))
"""

# The floor of svd-r256: bare `torch.svd_lowrank(W, q=256, niter=2)` on the same 24 fp32 expert matrices, timed in the
# same run; plus the rank-256 reconstruction error ||W - U S V^T|| / ||W|| of expert 0's matrices under the floor's
# settings, gathering's default (q = r + 16, niter 2) and the earlier default (q = 2r, niter 4).
FLOOR = r"""
import json, sys, time
import torch
from safetensors import safe_open
torch.set_num_threads(int(sys.argv[2]))
index = json.load(open(sys.argv[1] + "/model.safetensors.index.json"))["weight_map"]
names = sorted(k for k in index if ".experts." in k)
seconds, errors, r = 0.0, {}, 256
for name in names:
    with safe_open(sys.argv[1] + "/" + index[name], "pt") as f:
        w = f.get_tensor(name).to(torch.float32)
    start = time.perf_counter()
    torch.svd_lowrank(w, q=r, niter=2)
    seconds += time.perf_counter() - start
    if ".experts.0." in name:
        for label, q, niter in (("floor q=256 niter=2", r, 2), ("default q=272 niter=2", r + 16, 2),
                                ("before q=512 niter=4", 2 * r, 4)):
            torch.manual_seed(0)
            u, s, v = torch.svd_lowrank(w, q=q, niter=niter)
            err = float((w - (u[:, :r] * s[:r]) @ v[:, :r].T).norm() / w.norm())
            errors.setdefault(label, []).append(err)
print(json.dumps({"svd_floor_seconds_r256": seconds, "matrices": len(names),
                  "reconstruction_error_expert0": {k: sum(v) / len(v) for k, v in errors.items()}}))
"""


def write_checkpoint(path: Path, seed: int = 0) -> int:
    """The 1-layer Mixtral checkpoint; returns the bytes of its expert weights."""
    from safetensors.torch import save_file
    from transformers import MixtralConfig

    path.mkdir(parents=True, exist_ok=True)
    config = MixtralConfig(
        vocab_size=1024, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=1,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, num_local_experts=EXPERTS, num_experts_per_tok=2,
        dtype="bfloat16", architectures=["MixtralForCausalLM"],
    )
    config.save_pretrained(path)
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *shape: (torch.randn(*shape, generator=gen) * 0.02).to(torch.bfloat16)  # noqa: E731
    prefix = "model.layers.0"
    weight_map, total, expert_bytes = {}, 0, 0
    shards = [{
        "model.embed_tokens.weight": rand(1024, HIDDEN), "lm_head.weight": rand(1024, HIDDEN),
        "model.norm.weight": torch.ones(HIDDEN, dtype=torch.bfloat16),
        f"{prefix}.input_layernorm.weight": torch.ones(HIDDEN, dtype=torch.bfloat16),
        f"{prefix}.post_attention_layernorm.weight": torch.ones(HIDDEN, dtype=torch.bfloat16),
        f"{prefix}.self_attn.q_proj.weight": rand(HIDDEN, HIDDEN), f"{prefix}.self_attn.o_proj.weight": rand(HIDDEN, HIDDEN),
        f"{prefix}.self_attn.k_proj.weight": rand(1024, HIDDEN), f"{prefix}.self_attn.v_proj.weight": rand(1024, HIDDEN),
        f"{prefix}.block_sparse_moe.gate.weight": rand(EXPERTS, HIDDEN),
    }]
    for e in range(EXPERTS):
        base = f"{prefix}.block_sparse_moe.experts.{e}"
        shards.append({f"{base}.w1.weight": rand(INTERMEDIATE, HIDDEN), f"{base}.w3.weight": rand(INTERMEDIATE, HIDDEN),
                       f"{base}.w2.weight": rand(HIDDEN, INTERMEDIATE)})
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(path / name), metadata={"format": "pt"})
        size = sum(t.numel() * t.element_size() for t in shard.values())
        total += size
        expert_bytes += size if i else 0
        weight_map.update(dict.fromkeys(shard, name))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return expert_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work_dir", default=str(REPO / "runs" / "gather_memory"))
    parser.add_argument("--strategies", nargs="+", default=["weighted_average", "svd-r256", "average"],
                        help="`weighted_average` (the default, = svd at full rank, no decomposition); `svd-r256` runs "
                             "torch.svd_lowrank on every expert matrix")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint and outputs")
    a = parser.parse_args()
    work = Path(a.work_dir)
    ckpt = work / "mixtral-1layer"
    expert_bytes = write_checkpoint(ckpt)
    runs = {}
    out = subprocess.run([sys.executable, "-c", FLOOR, str(ckpt), str(a.threads)], check=True, capture_output=True,
                         text=True)
    floor = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"[gather_memory] floor: {floor}", flush=True)
    for strategy in a.strategies:
        out = subprocess.run([sys.executable, "-c", CHILD, str(ckpt), strategy, str(work / f"dense-{strategy}"),
                              str(a.threads)], check=True, capture_output=True, text=True)
        runs[strategy] = json.loads(out.stdout.strip().splitlines()[-1])
        runs[strategy]["peak_over_layer"] = runs[strategy]["peak_rss_gib"] * 2**30 / expert_bytes
        print(f"[gather_memory] {strategy}: {runs[strategy]}", flush=True)
    if not a.keep:
        shutil.rmtree(work, ignore_errors=True)
    layer_gib = expert_bytes / 2**30
    headline = {"layer_expert_weights_gib": layer_gib, **{f"{s}_seconds": r["seconds"] for s, r in runs.items()},
                **{f"{s}_peak_rss_gib": r["peak_rss_gib"] for s, r in runs.items()},
                "weighted_average_peak_under_3x_layer": runs.get("weighted_average", {}).get("peak_over_layer", 99) < 3}
    if "svd-r256" in runs:
        per_layer = runs["svd-r256"]["seconds"]
        headline.update({
            "seconds_per_layer_r256": per_layer, "svd_floor_seconds_r256": floor["svd_floor_seconds_r256"],
            "r256_over_floor": per_layer / floor["svd_floor_seconds_r256"],
            "r256_peak_over_layer": runs["svd-r256"]["peak_over_layer"],
            "mixtral_8x7b_32_layers_r256_minutes": 32 * per_layer / 60,
            "reconstruction_error_r256": floor["reconstruction_error_expert0"],
        })
    write_result("gather_memory", {"headline": headline, "runs": runs, "floor": floor, "threads": a.threads,
                                   "shape": {"hidden": HIDDEN, "intermediate": INTERMEDIATE, "experts": EXPERTS,
                                             "dtype": "bfloat16"}})


if __name__ == "__main__":
    main()
