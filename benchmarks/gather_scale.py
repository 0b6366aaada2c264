#!/usr/bin/env python
"""Streamed gathering at DeepSeek-V3 expert size: peak memory and time per expert for E = 8, 64, 256 experts.

For each E, writes a one-layer DeepSeek-V3-shaped checkpoint (hidden 7168, fine-grained experts of 2048 units, one
shared expert, bf16, published per-expert naming ``mlp.experts.{e}.gate_proj.weight``, 4 GB shards; 16 attention
heads and a 1024-token vocabulary keep the rest small) to --work_dir, then runs
``gather_experts(path, "weighted_average", output_dir=...)`` in a fresh process and records its peak resident memory
(``VmHWM``) and the time spent merging the sparse block; time per expert is the marginal one between
consecutive E (the block's fixed work, its shared expert and the written FFN, cancels out). The page cache is dropped before each gather where
the benchmark may (root), so every E reads from disk (``read_from_disk`` per run). The tensors hold a constant pattern, not
random numbers (the weighted average reads and adds every value either way; writing 22 GB of random numbers would
take longer than the measurement). The layer's experts are 0.66 GiB at E = 8 and 21 GiB at E = 256, so memory that
does not depend on E is what the streaming reader (one expert at a time) must show.

Targets (headline): peak RSS grows by less than 10% from E = 8 to E = 256; time per expert within 20% across E.

    python benchmarks/gather_scale.py --work_dir /tmp/gather_scale   # ~28 GB of disk, about 10 minutes

Each E is gathered ``--repeats`` times (3), interleaved across E; times are medians, memory the maximum.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import torch
from common import REPO, write_result

HIDDEN, EXPERT_WIDTH, SHARD_BYTES = 7168, 2048, 4 * 2**30

CHILD = r"""
import json, sys, time
import torch
from hf_moekd.ones import gather as g
torch.set_num_threads(int(sys.argv[3]))
block_seconds, real = [], g._gather_block
def timed(*a, **k):
    start = time.perf_counter()
    out = real(*a, **k)
    block_seconds.append(time.perf_counter() - start)
    return out
g._gather_block = timed
start = time.perf_counter()
g.gather_experts(sys.argv[1], "weighted_average", output_dir=sys.argv[2], overwrite=True, progress=False,
                 return_model=False)
# VmHWM, not ru_maxrss: ru_maxrss survives fork + exec and would report the parent's (checkpoint writer's) peak
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"seconds": time.perf_counter() - start, "block_seconds": sum(block_seconds),
                  "peak_rss_gib": hwm / 2**20}))
"""


def config(num_experts: int):
    from transformers import DeepseekV3Config

    return DeepseekV3Config(
        vocab_size=1024, hidden_size=HIDDEN, intermediate_size=2 * EXPERT_WIDTH, moe_intermediate_size=EXPERT_WIDTH,
        num_hidden_layers=1, first_k_dense_replace=0, n_routed_experts=num_experts, num_experts_per_tok=8,
        n_group=1, topk_group=1, n_shared_experts=1, num_attention_heads=16, num_key_value_heads=16,
        q_lora_rank=1536, kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128,
        norm_topk_prob=True, dtype="bfloat16")


def published_shapes(num_experts: int) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of the checkpoint as DeepSeek publishes it (per-expert expert tensors)."""
    from transformers import DeepseekV3ForCausalLM

    with torch.device("meta"):
        model = DeepseekV3ForCausalLM(config(num_experts))
    shapes = {}
    for name, t in model.state_dict().items():
        if name.endswith("experts.gate_up_proj"):
            base = name[: -len("gate_up_proj")]
            for e in range(num_experts):
                shapes[f"{base}{e}.gate_proj.weight"] = shapes[f"{base}{e}.up_proj.weight"] = (EXPERT_WIDTH, HIDDEN)
        elif name.endswith("experts.down_proj"):
            base = name[: -len("down_proj")]
            for e in range(num_experts):
                shapes[f"{base}{e}.down_proj.weight"] = (HIDDEN, EXPERT_WIDTH)
        else:
            shapes[name] = tuple(t.shape)
    return shapes


def write_checkpoint(folder: Path, num_experts: int) -> float:
    """The checkpoint in 4 GB shards; returns the GiB of expert weights."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    config(num_experts).save_pretrained(folder)
    names, current, size, expert_bytes, parts = sorted(published_shapes(num_experts).items()), {}, 0, 0, []

    def flush() -> None:  # one shard on disk at a time: the writer never holds more than 4 GB
        file = f"part-{len(parts):05d}.safetensors"
        save_file(current, str(folder / file), metadata={"format": "pt"})
        parts.append((file, list(current)))
        current.clear()

    for i, (name, shape) in enumerate(names):
        t = torch.full(shape, 0.01 + (i % 97) * 1e-4, dtype=torch.bfloat16)
        if current and size + t.numel() * 2 > SHARD_BYTES:
            flush()
            size = 0
        current[name], size = t, size + t.numel() * 2
        expert_bytes += t.numel() * 2 if ".experts." in name else 0
    flush()
    weight_map = {}
    for i, (file, keys) in enumerate(parts, 1):
        final = f"model-{i:05d}-of-{len(parts):05d}.safetensors"
        (folder / file).rename(folder / final)
        weight_map.update(dict.fromkeys(keys, final))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return expert_bytes / 2**30


def drop_page_cache() -> bool:
    """Drop the OS page cache (root only), so that every E reads its checkpoint from disk: a just-written 5 GB
    checkpoint is still cached, a 21 GB one is not, and the time per expert would compare memory with disk."""
    subprocess.run(["sync"], check=False)
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work_dir", default="/tmp/gather_scale")
    parser.add_argument("--experts", type=int, nargs="+", default=[8, 64, 256])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="gathers per E, interleaved; medians are reported")
    args = parser.parse_args()
    work, runs, expert_gib = Path(args.work_dir), {}, {}
    for num_experts in args.experts:  # every checkpoint first, then the gathers interleaved (disk speed drifts)
        expert_gib[num_experts] = write_checkpoint(work / f"E{num_experts}", num_experts)
    reps: dict[int, list[dict]] = {e: [] for e in args.experts}
    for rep in range(args.repeats):
        for num_experts in args.experts:
            ckpt, out = work / f"E{num_experts}", work / f"E{num_experts}-dense"
            cold = drop_page_cache()
            res = subprocess.run([sys.executable, "-c", CHILD, str(ckpt), str(out), str(args.threads)],
                                 capture_output=True, text=True, cwd=REPO,
                                 env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)})
            if res.returncode:
                raise SystemExit(res.stderr[-3000:])
            run = {**json.loads(res.stdout.strip().splitlines()[-1]), "read_from_disk": cold}
            reps[num_experts].append(run)
            print(num_experts, rep, json.dumps(run), flush=True)
            shutil.rmtree(out)
    for num_experts, rs in reps.items():
        shutil.rmtree(work / f"E{num_experts}")
        median = lambda key: statistics.median(r[key] for r in rs)  # noqa: E731
        runs[str(num_experts)] = {"seconds": median("seconds"), "block_seconds": median("block_seconds"),
                                  "peak_rss_gib": max(r["peak_rss_gib"] for r in rs), "repeats": rs,
                                  "expert_gib": round(expert_gib[num_experts], 3),
                                  "seconds_per_expert": median("block_seconds") / num_experts}
    lo, hi = str(min(args.experts)), str(max(args.experts))
    # marginal time per expert between consecutive E (the block's fixed work, e.g. its shared expert, cancels out)
    sizes = sorted(int(e) for e in runs)
    marginal = {f"E{a}->E{b}": (runs[str(b)]["block_seconds"] - runs[str(a)]["block_seconds"]) / (b - a)
                for a, b in zip(sizes, sizes[1:])}
    headline = {
        "peak_rss_gib": {e: round(r["peak_rss_gib"], 3) for e, r in runs.items()},
        "expert_gib": {e: r["expert_gib"] for e, r in runs.items()},
        f"rss_growth_E{lo}_to_E{hi}": round(runs[hi]["peak_rss_gib"] / runs[lo]["peak_rss_gib"] - 1, 4),
        "rss_growth_goal": "< 0.10",
        "block_seconds_per_expert": {e: round(r["seconds_per_expert"], 4) for e, r in runs.items()},
        "marginal_seconds_per_expert": {k: round(v, 4) for k, v in marginal.items()},
        "time_per_expert_max_over_min": round(max(marginal.values()) / min(marginal.values()), 3) if marginal else None,
        "time_per_expert_goal": "<= 1.20",
    }
    write_result("gather_scale", {
        "benchmark": "gather_scale", "command": "python " + " ".join(["benchmarks/gather_scale.py", *sys.argv[1:]]),
        "headline": headline, "runs": runs, "seeds": [], "settings": {
            "hidden": HIDDEN, "expert_width": EXPERT_WIDTH, "layers": 1, "dtype": "bfloat16", "strategy":
            "weighted_average", "threads": args.threads, "shard_bytes": SHARD_BYTES, "repeats": args.repeats}})



if __name__ == "__main__":
    main()
