#!/usr/bin/env python
"""OneS on text: a small Mixtral-style MoE classifier (8 experts, top-2) vs the dense Mistral of the same width on
SST-2; the MoE gathered into a stock `MistralForSequenceClassification` and distilled (logits + hidden states).

Same rows as benchmarks/ones.py: dense baseline, MoE teacher, the dense baseline trained `--kd_epochs` longer,
each gathering variant gathered-only / fine-tuned without KD (first variant) / distilled (OneS); % of the MoE's
benefit preserved. Models are trained from scratch (no pretrained MoE exists offline) with MiniLM-L6's tokenizer.
No load-balancing loss: transformers' Mixtral classification head returns no router logits. One seed per file in
--work_dir, so an interrupted run resumes.

    python benchmarks/ones_text.py --data_dir ../shared/data
"""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

import torch
from common import DEFAULT_DATA, REPO, mean_std, same_experiment, write_json, write_result
from transformers import (
    AutoTokenizer,
    DataCollatorWithPadding,
    MistralForSequenceClassification,
    MixtralConfig,
    MixtralForSequenceClassification,
    set_seed,
)

from hf_moekd.data.text import load_glue
from hf_moekd.ones import gather_experts, get_family
from hf_moekd.ones import OneSReport
from hf_moekd.studies.ones import OneSArguments, print_report
from hf_moekd.studies.vision import study_settings, train
from hf_moekd.utils.teachers import minilm_path


def moe_config(tokenizer, a: argparse.Namespace) -> MixtralConfig:
    return MixtralConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=a.hidden_size, intermediate_size=a.hidden_size,
        num_hidden_layers=a.layers, num_attention_heads=4, num_key_value_heads=4, head_dim=a.hidden_size // 4,
        num_local_experts=8, num_experts_per_tok=2, router_aux_loss_coef=0.0, max_position_embeddings=a.max_length,
        sliding_window=None, pad_token_id=tokenizer.pad_token_id, num_labels=2, id2label={0: "negative", 1: "positive"},
        label2id={"negative": 0, "positive": 1},
    )


def sst2_data(data_dir: str, train_samples: int, max_length: int):
    """`(tokenizer, data, collator)`: SST-2 tokenized with MiniLM-L6's tokenizer, `train_samples` random training
    sentences (fixed shuffle), the whole validation split."""
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    raw = load_glue("sst2", data_dir)
    raw["train"] = raw["train"].shuffle(seed=0).select(range(min(train_samples, len(raw["train"]))))
    data = raw.map(lambda b: tokenizer(b["sentence1"], truncation=True, max_length=max_length), batched=True,
                   remove_columns=["sentence1"]).rename_column("label", "labels")
    return tokenizer, data, DataCollatorWithPadding(tokenizer)


@torch.no_grad()
def accuracy(model, data, collator, batch_size: int = 128) -> float:
    model.eval()
    correct = 0
    for start in range(0, len(data), batch_size):
        batch = collator([data[i] for i in range(start, min(start + batch_size, len(data)))])
        labels = batch.pop("labels")
        correct += int((model(**batch).logits.argmax(-1) == labels).sum())
    return correct / len(data)


def run_seed(seed: int, data, collator, config: MixtralConfig, args: OneSArguments) -> OneSReport:
    report = OneSReport(args=study_settings(args))
    dense_config = get_family("mixtral").dense_config(config)
    evaluate = lambda m: accuracy(m, data["validation"], collator)  # noqa: E731
    fit = lambda m, epochs, teacher=None: train(m, data["train"], args, seed, epochs, teacher, collator)  # noqa: E731
    set_seed(seed)
    dense = fit(MistralForSequenceClassification(dense_config), args.epochs)
    set_seed(seed)
    moe = fit(MixtralForSequenceClassification(config), args.epochs)
    report.add("dense", evaluate(dense))
    report.add("moe", evaluate(moe))
    report.params.update(dense=dense.num_parameters(), moe=moe.num_parameters())
    set_seed(seed)
    report.add(f"dense, +{args.kd_epochs:g} epochs", evaluate(fit(dense, args.kd_epochs)))
    print(f"[seed {seed}] dense {report.accuracy['dense'][-1]:.4f}  MoE {report.accuracy['moe'][-1]:.4f}", flush=True)
    n = min(1024, len(data["train"]))
    calibration = [collator([data["train"][i] for i in range(s, min(s + 64, n))]) for s in range(0, n, 64)]
    for i, spec in enumerate(args.gatherings):
        make = lambda: gather_experts(moe, spec, calibration_dataset=calibration, progress=False)  # noqa: E731
        student = make()
        report.add(f"{spec} gathered only", evaluate(student))
        if i == 0:
            set_seed(seed)
            report.add(f"{spec} + fine-tune, no KD", evaluate(fit(make(), args.kd_epochs)))
        set_seed(seed)
        report.add(f"{spec} + KD (OneS)", evaluate(fit(student, args.kd_epochs, teacher=moe)))
        print(f"[seed {seed}] {spec}: gathered {report.accuracy[f'{spec} gathered only'][-1]:.4f}  "
              f"OneS {report.accuracy[f'{spec} + KD (OneS)'][-1]:.4f}", flush=True)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", default=str(DEFAULT_DATA / "glue"), help="folder holding SST-2/")
    parser.add_argument("--work_dir", default=str(REPO / "runs" / "ones_text"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--train_samples", type=int, default=20000)
    parser.add_argument("--epochs", type=float, default=2)
    parser.add_argument("--kd_epochs", type=float, default=1)
    parser.add_argument("--hidden_size", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--max_length", type=int, default=64)
    parser.add_argument("--gatherings", nargs="+", default=["weighted_average", "weighted_average+align", "svd", "top_experts"])
    parser.add_argument("--result_name", default="ones_text", help="benchmarks/results/<name>.json (e.g. ones_text_top_kg "
                        "for a run of other gatherings, keeping ones_text.json)")
    a = parser.parse_args()
    tokenizer, data, collator = sst2_data(a.data_dir, a.train_samples, a.max_length)
    config = moe_config(tokenizer, a)
    args = OneSArguments(dataset="sst2", epochs=a.epochs, kd_epochs=a.kd_epochs, batch_size=32, learning_rate=1e-3,
                         gatherings=a.gatherings, output_dir=None, measure_speed=False, hidden_size=a.hidden_size,
                         num_hidden_layers=a.layers, num_experts=8, num_experts_per_tok=2)
    work = Path(a.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    merged = OneSReport(args={**study_settings(args), "seeds": a.seeds, "train_samples": a.train_samples})
    for seed in a.seeds:
        path = work / f"seed{seed}.json"
        key = {**study_settings(args), "seeds": [seed], "train_samples": a.train_samples}
        if path.exists() and same_experiment(json.loads(path.read_text())["args"], key):
            saved = json.loads(path.read_text())
            print(f"[ones_text] seed {seed}: reusing {path}", flush=True)
        else:
            report = run_seed(seed, data, collator, config, args)
            saved = {**asdict(report), "args": key}
            write_json(path, saved)
        merged.params = saved["params"]
        for name, values in saved["accuracy"].items():
            merged.accuracy.setdefault(name, []).extend(values)
    print_report(merged)
    summary = merged.summary()
    models = summary["models"]
    ones_rows = {k: v for k, v in models.items() if k.endswith("(OneS)")}
    best = max(ones_rows, key=lambda k: ones_rows[k]["accuracy_mean"])
    headline = {"dense_acc": models["dense"]["accuracy_mean"], "moe_acc": models["moe"]["accuracy_mean"],
                "best_ones": best, "best_ones_acc": ones_rows[best]["accuracy_mean"],
                "best_benefit_preserved_pct": ones_rows[best]["benefit_preserved_pct"],
                "best_ones_delta_vs_dense": ones_rows[best]["delta_vs_dense_mean"],
                "controls_acc": {k: v["accuracy_mean"] for k, v in models.items() if k.startswith("dense,") or "no KD" in k}}
    write_result(a.result_name, {"headline": headline, "summary": summary,
                               "per_seed": {k: mean_std(v) for k, v in merged.accuracy.items()},
                               "seeds": a.seeds, "args": merged.args, "table": merged.table()})


if __name__ == "__main__":
    main()
