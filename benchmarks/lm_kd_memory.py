#!/usr/bin/env python
"""Peak memory and time of token-level KD on LM logits: hf_moekd's chunked divergence vs a naive one.

One forward + backward of the KD loss (forward KL, T 2) on random student and teacher logits of
[batch, seq, vocab] (default 4 x 512 x 32,000, float32: 262 MB each), every position labelled. Each measurement
runs in a fresh process (peak RSS above the process's RSS after the logits were made, from getrusage) and the
variants alternate over the repetitions, so machine load affects both alike. The naive variant is
`soft_divergence` on the whole tensor (several float32 [batch, seq, vocab] intermediates kept for backward); the
chunked one is `chunked_divergence_sum` (`kd_chunk_size` positions at a time, recomputed in backward).

    python benchmarks/lm_kd_memory.py
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

from common import mean_std, write_result

CHILD = r"""
import json, resource, sys, time, torch
from hf_moekd.distillation.losses import chunked_divergence_sum, soft_divergence
variant, batch, seq, vocab, chunk = sys.argv[1], *map(int, sys.argv[2:6])
torch.manual_seed(0)
student = torch.randn(batch, seq, vocab, requires_grad=True)
teacher = torch.randn(batch, seq, vocab)
weights = torch.ones(batch, seq)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
if variant == "naive":
    loss = (soft_divergence(student, teacher, 2.0) * weights).sum()
else:
    loss = chunked_divergence_sum(student, teacher, weights, 2.0, chunk_size=chunk)
loss.backward()
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"peak_mib_above_inputs": (peak - base) / 1024, "seconds": seconds, "loss": loss.item()}))
"""


def measure(variant: str, a: argparse.Namespace) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, variant, str(a.batch), str(a.seq), str(a.vocab), str(a.chunk)],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--chunk", type=int, default=128, help="kd_chunk_size of the chunked variant")
    parser.add_argument("--repeats", type=int, default=3)
    a = parser.parse_args()
    runs = {"naive": [], "chunked": []}
    for _ in range(a.repeats):  # interleaved
        for variant in runs:
            runs[variant].append(measure(variant, a))
    loss_gap = abs(runs["naive"][0]["loss"] - runs["chunked"][0]["loss"]) / abs(runs["naive"][0]["loss"])
    summary = {v: {"peak_mib_above_inputs": mean_std([r["peak_mib_above_inputs"] for r in rs]),
                   "seconds": mean_std([r["seconds"] for r in rs])} for v, rs in runs.items()}
    logits_mib = a.batch * a.seq * a.vocab * 4 / 2**20
    headline = {
        "logits_mib": round(logits_mib, 1),
        "naive_peak_mib": round(summary["naive"]["peak_mib_above_inputs"]["mean"], 1),
        "chunked_peak_mib": round(summary["chunked"]["peak_mib_above_inputs"]["mean"], 1),
        "memory_ratio_chunked_over_naive": round(summary["chunked"]["peak_mib_above_inputs"]["mean"]
                                                 / summary["naive"]["peak_mib_above_inputs"]["mean"], 3),
        "time_ratio_chunked_over_naive": round(statistics.median(r["seconds"] for r in runs["chunked"])
                                               / statistics.median(r["seconds"] for r in runs["naive"]), 3),
        "relative_loss_difference": loss_gap,
    }
    write_result("lm_kd_memory", {"headline": headline, "summary": summary, "runs": runs, "settings": vars(a)})


if __name__ == "__main__":
    main()
