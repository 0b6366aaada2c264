#!/usr/bin/env python
"""MiniMoE / dense CPU latency at batch 1, 8 and 32 for each way of running the experts, and the floor.

Models: the 3-layer dense student of benchmarks/minimoe.py (all-MiniLM-L6-v2's config, 3 blocks, hidden 384, FFN
1536) and its MiniMoE twin (`minimoe_from_dense`, 4 top-1 experts of the dense FFN's size: equal FLOPs per token);
random weights (latency does not depend on them; the fresh router spreads tokens over the experts about evenly).
Sequences of 64 tokens. Variants of the MiniMoE expert block (`experts_implementation`): eager (one matmul pair per
expert), batched_mm (one padded batched matmul), grouped_mm (torch grouped_mm), and eager with every sparse FFN
wrapped in `torch.compile`. Each variant's forward time and the dense model's are medians of interleaved rounds.

Floor: the four experts' weights must all be read when all four are used, whatever the kernel; the floor of the
expert block is one batched matmul pair on exactly balanced groups (no routing, no gather/scatter), measured in the
same rounds; floor ratio = (dense - dense FFN + that block) / dense.

Updates benchmarks/results/minimoe.json (latency section and headline `latency_ratio_b1`: the default
implementation at batch 1), keeping the study's results.

    python benchmarks/minimoe_latency.py
"""
from __future__ import annotations

import argparse
import json
import sys

import torch
from common import RESULTS, environment, interleaved_medians, write_json
from transformers import AutoConfig, BertForSequenceClassification

from hf_moekd.models.minimoe import minimoe_from_dense
from hf_moekd.utils.teachers import minilm_path

VARIANTS = ("eager", "batched_mm", "grouped_mm", "compiled")


def models(layers: int) -> tuple[torch.nn.Module, dict[str, torch.nn.Module]]:
    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(minilm_path(), num_hidden_layers=layers, num_labels=2)
    dense = BertForSequenceClassification(config).eval()
    moes = {}
    for variant in VARIANTS:
        torch.manual_seed(0)
        moe = minimoe_from_dense(dense, num_ffn_experts=4).eval()
        moe.config._experts_implementation = "eager" if variant == "compiled" else variant
        if variant == "compiled":
            for layer in moe.minimoe.encoder.layer:
                layer.ffn = torch.compile(layer.ffn, dynamic=True)
        moes[variant] = moe
    return dense, moes


def floor_block(dense: torch.nn.Module, moe: torch.nn.Module, tokens: int):
    """Callables: block 0's dense FFN on `tokens` rows and the 4 experts as one batched matmul pair on balanced rows."""
    layer, experts = dense.bert.encoder.layer[0], moe.minimoe.encoder.layer[0].ffn.experts
    x = torch.randn(1, tokens, dense.config.hidden_size)
    per = torch.randn(experts.num_experts, -(-tokens // experts.num_experts), dense.config.hidden_size)
    dense_ffn = lambda: layer.output.dense(layer.intermediate(x))  # noqa: E731
    block = lambda: torch.baddbmm(experts.b_out.unsqueeze(1), experts.act(  # noqa: E731
        torch.baddbmm(experts.b_in.unsqueeze(1), per, experts.w_in.mT)), experts.w_out.mT)
    return dense_ffn, block


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--seq_len", type=int, default=64)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--default", default="eager", help="the implementation MiniMoE uses by default (headline)")
    a = p.parse_args()
    torch.set_num_threads(2)
    dense, moes = models(a.layers)
    ratios, times, floors = {}, {}, {}
    for batch in a.batches:
        ids = torch.randint(1000, 2000, (batch, a.seq_len), generator=torch.Generator().manual_seed(batch))
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        dense_ffn, block = floor_block(dense, moes["eager"], batch * a.seq_len)
        fns = {"dense": lambda: dense(**inputs), **{v: (lambda m=m: m(**inputs)) for v, m in moes.items()},
               "dense_ffn": dense_ffn, "balanced_expert_block": block}
        with torch.inference_mode():
            for fn in fns.values():  # compile (and warm) outside the timed rounds
                fn()
            t = interleaved_medians(fns, a.repeats, warmup=3)
        times[f"batch{batch}"] = {k: round(1e3 * v, 3) for k, v in t.items()}
        ratios[f"batch{batch}"] = {v: round(t[v] / t["dense"], 3) for v in VARIANTS}
        floor = (t["dense"] - a.layers * t["dense_ffn"] + a.layers * t["balanced_expert_block"]) / t["dense"]
        floors[f"batch{batch}"] = round(floor, 3)
        print(f"[minimoe_latency] batch {batch}: {ratios[f'batch{batch}']} floor {floor:.3f}", file=sys.stderr, flush=True)
    path = RESULTS / "minimoe.json"
    payload = json.loads(path.read_text())
    payload["latency"] = {
        "command": " ".join(["python", *sys.argv]), "ratio_minimoe_over_dense": ratios, "milliseconds": times,
        "floor_ratio": floors, "default_implementation": a.default, "environment": environment(),
        "settings": {"layers": a.layers, "hidden": 384, "ffn": 1536, "experts": 4, "seq_len": a.seq_len,
                     "repeats": a.repeats, "torch_threads": torch.get_num_threads()},
    }
    payload["headline"]["latency_ratio_b1"] = ratios["batch1"][a.default]
    payload["headline"].update({f"latency_ratio_b{b}/{v}": r for k, row in ratios.items() for v, r in row.items()
                                for b in [k.removeprefix("batch")]})
    payload["headline"]["latency_floor_b1"] = floors["batch1"]
    write_json(path, payload)
    print(json.dumps({"latency_ratio_b1": ratios["batch1"][a.default], "floor_b1": floors["batch1"],
                      "by_implementation_b1": ratios["batch1"]}))


if __name__ == "__main__":
    main()
