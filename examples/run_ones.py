#!/usr/bin/env python
"""OneS on images: gather a V-MoE's experts into a dense ViT (DenseViT) and distil it from the V-MoE.

Without a teacher, trains the whole comparison (dense baseline, V-MoE teacher, each gathering variant before and
after KD, controls) over several seeds and prints the table:

    python examples/run_ones.py --dataset fashion_mnist --max_train_samples 20000 --patch_size 7 \\
        --hidden_size 64 --num_attention_heads 4 --epochs 5 --kd_epochs 2 --gatherings weighted_average svd top_experts+align

With a trained V-MoE (a folder with config.json + model.safetensors), gathers it by the first `--gatherings`
variant, distils for `--kd_epochs` and saves the dense model to `--output_dir`:

    python examples/run_ones.py --teacher_model_name_or_path runs/vmoe --dataset fashion_mnist --output_dir ones
"""
from __future__ import annotations

import json

from transformers import HfArgumentParser

from hf_moekd.studies.ones import OneSArguments, print_report, run_ones, run_ones_from_teacher
from hf_moekd.recipes import run


def main() -> None:
    (args,) = HfArgumentParser(OneSArguments).parse_args_into_dataclasses()
    if args.teacher_model_name_or_path:
        print(json.dumps(run_ones_from_teacher(args)))
    else:
        print_report(run_ones(args))


if __name__ == "__main__":
    run(main)
