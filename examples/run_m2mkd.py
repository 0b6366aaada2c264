#!/usr/bin/env python
"""m2mKD on images: cut a ViT teacher into modules, distil each into the matching module of a V-MoE student inside
a shallow meta model, assemble the student, fine-tune it end to end, and compare with end-to-end training.

All stages in one process (digits, a few minutes on 2 CPU cores; rerunning skips the finished stages):

    python examples/run_m2mkd.py --output_dir out/m2mkd

One process per module (in parallel, or on machines that share the output folder; each is a plain single process):

    python examples/run_m2mkd.py --output_dir out/m2mkd --phase prepare          # teacher + meta model
    for i in 0 1 2 3; do python examples/run_m2mkd.py --output_dir out/m2mkd --phase module --module_index $i & done; wait
    python examples/run_m2mkd.py --output_dir out/m2mkd --phase assemble         # assembly, fine-tune, baseline, table

The defaults follow the official m2mKD recipe: the meta model trained from scratch, experts in every student block,
no gate loss in the module phase; this project's former setting is `--meta_init teacher --moe_layer_frequency 2
--module_gate_loss`. The student is saved to <output_dir>/seed<S>/student and loads with
AutoModelForImageClassification (hf_moekd imported). Fashion-MNIST: --dataset fashion_mnist --patch_size 7 (see
benchmarks/m2mkd.py for larger settings).
"""
from __future__ import annotations

from transformers import HfArgumentParser

from hf_moekd.studies.m2mkd import M2MArguments, run_m2mkd
from hf_moekd.m2mkd.report import print_report
from hf_moekd.recipes import run


def main() -> None:
    (args,) = HfArgumentParser(M2MArguments).parse_args_into_dataclasses()
    print_report(run_m2mkd(args))


if __name__ == "__main__":
    run(main)
