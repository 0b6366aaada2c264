"""The main job's embedded default: distil a ViT teacher into a smaller ViT on scikit-learn's digits.

Trains a 4-block ViT teacher, then a 1-block student without KD, with logits KD and with logits +
hidden-state KD (several seeds each), prints a results table and saves the distilled student, which reloads with
`AutoModelForImageClassification.from_pretrained`.
"""
from __future__ import annotations

import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import torch
from transformers import AutoModelForImageClassification, ViTConfig, ViTForImageClassification, set_seed

from .distillation import DistillationArguments, DistillationTrainer


def load_digits_splits(test_fraction: float = 0.2, seed: int = 0) -> datasets.DatasetDict:
    """scikit-learn's 1,797 8x8 digits as `pixel_values` [1, 8, 8] in [0, 1] and `labels`, stratified split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None]
    x_train, x_test, y_train, y_test = train_test_split(
        images, digits.target, test_size=test_fraction, random_state=seed, stratify=digits.target
    )
    make = lambda x, y: datasets.Dataset.from_dict({"pixel_values": x, "labels": y}).with_format("torch")  # noqa: E731
    return datasets.DatasetDict(train=make(x_train, y_train), test=make(x_test, y_test))


def vit_config(hidden: int, layers: int, heads: int) -> ViTConfig:
    return ViTConfig(
        image_size=8, patch_size=2, num_channels=1, hidden_size=hidden, num_hidden_layers=layers,
        num_attention_heads=heads, intermediate_size=2 * hidden, num_labels=10,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        id2label={i: str(i) for i in range(10)}, label2id={str(i): i for i in range(10)},
    )


@dataclass
class DemoResult:
    name: str
    params: int
    accuracies: list[float]

    def row(self) -> str:
        mean = 100 * statistics.fmean(self.accuracies)
        spread = 100 * statistics.stdev(self.accuracies) if len(self.accuracies) > 1 else 0.0
        return f"| {self.name:<34} | {self.params / 1e3:>8.1f}k | {mean:6.2f} ± {spread:4.2f} | {len(self.accuracies)} |"


def _train(model, data, seed: int, epochs: float, teacher=None, **loss) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        args = DistillationArguments(
            output_dir=tmp, num_train_epochs=epochs, per_device_train_batch_size=32, learning_rate=2e-3,
            weight_decay=0.01, save_strategy="no", report_to=[], disable_tqdm=True, seed=seed, use_cpu=True,
            logging_strategy="no", **({"alpha": 0.0} | loss),
        )
        trainer = DistillationTrainer(model=model, args=args, teacher_model=teacher, train_dataset=data["train"])
        trainer.train()
        logits = trainer.predict(data["test"]).predictions
    return float((logits.argmax(-1) == np.asarray(data["test"]["labels"])).mean())


def run_demo(output_dir: str = "outputs/demo", seeds: tuple[int, ...] = (0, 1, 2), epochs: float = 15) -> list[DemoResult]:
    """Train teacher and students, print the table, save the distilled student to `output_dir`."""
    data = load_digits_splits()
    set_seed(0)
    teacher = ViTForImageClassification(vit_config(64, 4, 4))
    results = [DemoResult("teacher ViT (4 blocks, width 64)", teacher.num_parameters(), [_train(teacher, data, 0, epochs)])]
    student_config = vit_config(32, 1, 2)
    logits_kd = {"alpha": 0.9, "temperature": 4.0}
    hidden_kd = {**logits_kd, "hidden_loss_weight": 0.5, "hidden_layer_map": '{"1": 4}'}
    variants = {"student (1 block, width 32), no KD": {}, "student, logits KD": logits_kd, "student, logits + hidden KD": hidden_kd}
    for name, loss in variants.items():
        accuracies = []
        for seed in seeds:
            set_seed(seed)
            student = ViTForImageClassification(student_config)
            accuracies.append(_train(student, data, seed, epochs, teacher=teacher if loss else None, **loss))
        results.append(DemoResult(name, student.num_parameters(), accuracies))

    print("\nDistillation on scikit-learn digits (1,437 train / 360 test images), test accuracy %")
    print(f"| {'model':<34} | {'params':>9} | {'accuracy':^13} | seeds |")
    print(f"|{'-' * 36}|{'-' * 11}|{'-' * 15}|-------|")
    for result in results:
        print(result.row())
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    student.save_pretrained(output_dir)
    reloaded = AutoModelForImageClassification.from_pretrained(output_dir)
    with torch.no_grad():
        same = torch.allclose(reloaded(data["test"][:4]["pixel_values"]).logits, student(data["test"][:4]["pixel_values"]).logits, atol=1e-5)
    print(f"\nSaved the last distilled student to {output_dir} (reloads with AutoModelForImageClassification: {same}).")
    return results
