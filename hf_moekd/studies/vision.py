"""The image recipe shared by the OneS and m2mKD pipelines: arguments, data, training with `DistillationTrainer`,
accuracy, latency, and saving a model with its card."""
from __future__ import annotations

import copy
import inspect
import json
import statistics
import tempfile
import time
from dataclasses import MISSING, Field, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForImageClassification, PreTrainedModel, PrinterCallback

from ..cards import CARD_KEY, RunFacts, write_model_card
from ..distillation import DistillationArguments, DistillationTrainer, get_loss_class
from ..data.images import InMemoryDataset, load_image_dataset, load_image_folders
from ..models.dense_vit import DenseViTConfig
from ..models.vmoe import VMoEConfig
from ..utils.callbacks import EpochProgressCallback
from ..utils.outputs import atomic_output_dir


@dataclass
class ImageArguments(DistillationArguments):
    """Data, backbone and optimisation settings every image pipeline shares (OneS and m2mKD extend it), and the loss
    of their KD runs: the `DistillationArguments` loss fields (alpha, temperature, hidden_loss_weight, ...).

    Defaults that differ from `DistillationArguments`': learning_rate 2e-3 and alpha 0.9 (declared again below).
    Each run's schedule comes from the study's own fields (epochs, batch_size, seeds) and learning_rate; the other
    `TrainingArguments` fields are not read: every run trains on the CPU, weight decay 0.01, without checkpoints.
    """

    dataset: str = field(default="digits", metadata={"help": "`digits` (scikit-learn), `fashion_mnist` (Debian IDX files) or `imagefolder` (your images: --train_dir, --validation_dir)."})
    train_dir: str | None = field(default=None, metadata={"help": "dataset `imagefolder`: training images, one subfolder per class (or a saved datasets folder with image and label columns)."})
    validation_dir: str | None = field(default=None, metadata={"help": "dataset `imagefolder`: the evaluation images, same layout."})
    image_size: int = field(default=28, metadata={"help": "dataset `imagefolder`: images are converted to grayscale and resized to this size."})
    data_dir: str | None = field(default=None, metadata={"help": "Folder of the Fashion-MNIST IDX files (default: Debian's)."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Random subset of the training images."})
    max_test_samples: int | None = field(default=None, metadata={"help": "Random subset of the test images."})
    patch_size: int = field(default=2, metadata={"help": "ViT patch size (must divide the image size)."})
    hidden_size: int = field(default=32, metadata={"help": "Width of the student."})
    num_hidden_layers: int = field(default=4, metadata={"help": "Blocks of the student."})
    num_attention_heads: int = field(default=2, metadata={"help": "Attention heads."})
    intermediate_size: int = field(default=32, metadata={"help": "FFN width of the dense MLPs and of each expert."})
    num_experts: int = field(default=8, metadata={"help": "Experts per V-MoE block."})
    num_experts_per_tok: int = field(default=2, metadata={"help": "Top-k experts per token."})
    learning_rate: float = field(default=2e-3, metadata={"help": "AdamW learning rate of every run."})
    batch_size: int = field(default=32, metadata={"help": "Training batch size."})
    alpha: float = field(default=0.9, metadata={"help": "Weight of the logits KD term (1 - alpha on the labels); 0.9 in the image studies."})
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2], metadata={"help": "Seeds (each trains every model)."})


def load_data(args: ImageArguments):
    if args.dataset == "imagefolder":
        if not (args.train_dir and args.validation_dir):
            raise ValueError("dataset imagefolder needs --train_dir and --validation_dir (one subfolder per class)")
        return load_image_folders(args.train_dir, args.validation_dir, args.image_size,
                                  max_train_samples=args.max_train_samples, max_test_samples=args.max_test_samples)
    return load_image_dataset(args.dataset, data_dir=args.data_dir, max_train_samples=args.max_train_samples,
                              max_test_samples=args.max_test_samples)


def model_configs(args: ImageArguments, image_size: int, labels: tuple[str, ...]) -> tuple[DenseViTConfig, VMoEConfig]:
    """The dense ViT (DenseViT) config and the V-MoE config of the same backbone."""
    backbone = dict(
        image_size=image_size, patch_size=args.patch_size, num_channels=1, hidden_size=args.hidden_size,
        num_hidden_layers=args.num_hidden_layers, num_attention_heads=args.num_attention_heads,
        intermediate_size=args.intermediate_size, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        id2label=dict(enumerate(labels)), label2id={name: i for i, name in enumerate(labels)},
    )
    moe = VMoEConfig(**backbone, num_experts=args.num_experts, num_experts_per_tok=args.num_experts_per_tok)
    return DenseViTConfig(**backbone), moe


def train(model: PreTrainedModel, data, args: ImageArguments, seed: int, epochs: float, teacher=None,
          data_collator=None, extra_loss_terms: list[str] | None = None,
          term_options: dict[str, dict[str, Any]] | None = None, progress: str | None = None) -> PreTrainedModel:
    """Train `model` in place: with KD from `teacher` when given (the loss fields of `args`: logits KD, hidden
    states, ...), else on the labels alone.

    `data` is a `datasets.Dataset` of images (read into memory) or, with `data_collator`, any dataset it batches.
    `extra_loss_terms` are registered loss terms as 'name=weight' (e.g. MoDE's 'mode=0.1'); `term_options` are options
    of the run's terms by name, e.g. ``{"logits_kd": {"per": "logit"}}``; `progress` names a bar of epochs.
    Trains on a CUDA GPU when one is visible (as `Trainer` does); model and teacher are back on the CPU afterwards,
    where the studies evaluate and save.
    """
    if teacher is None:
        loss = {"alpha": 0.0, "extra_loss_terms": list(extra_loss_terms or [])}
    else:
        loss = args.loss_settings()
        loss["extra_loss_terms"] = [*loss["extra_loss_terms"], *(extra_loss_terms or [])]
    with tempfile.TemporaryDirectory() as tmp:
        targs = DistillationArguments(
            output_dir=tmp, num_train_epochs=epochs, per_device_train_batch_size=args.batch_size,
            learning_rate=args.learning_rate, weight_decay=0.01, save_strategy="no", report_to=[], disable_tqdm=True,
            seed=seed, use_cpu=not torch.cuda.is_available(), logging_strategy="no", **loss,
        )
        weights = targs.loss_weights()
        terms = {name: (weights[name], get_loss_class(name).from_args(targs, model, teacher, **options))
                 for name, options in (term_options or {}).items() if name in weights}
        trainer = DistillationTrainer(model=model, args=targs, teacher_model=teacher, data_collator=data_collator,
                                      train_dataset=data if data_collator else InMemoryDataset(data), loss_terms=terms)
        trainer.remove_callback(PrinterCallback)  # keep the output to the pipeline's own lines
        if progress:
            trainer.add_callback(EpochProgressCallback(progress))
        trainer.train()
    if teacher is not None:
        teacher.cpu()
    return model.cpu().eval()


def study_settings(args: ImageArguments) -> dict[str, Any]:
    """A study's settings for its report and model card: the fields the study's classes declare, alpha, temperature,
    hidden_loss_weight and the other loss fields set away from their defaults (not the `TrainingArguments` the
    study does not read)."""
    names = [name for klass in reversed(type(args).__mro__) if klass not in DistillationArguments.__mro__
             for name in inspect.get_annotations(klass)]
    base = {f.name: f for f in fields(DistillationArguments)}
    names += [name for name in args.loss_settings() if name in ("alpha", "temperature", "hidden_loss_weight")
              or getattr(args, name) != _default(base[name])]
    return {name: copy.deepcopy(getattr(args, name)) for name in dict.fromkeys(names)}


def _default(spec: Field) -> Any:
    return spec.default_factory() if spec.default is MISSING else spec.default


@torch.no_grad()
def accuracy(model: PreTrainedModel, data, batch_size: int = 256) -> float:
    model.eval()
    correct = 0
    for start in range(0, len(data), batch_size):
        batch = data[start : start + batch_size]
        correct += int((model(pixel_values=batch["pixel_values"]).logits.argmax(-1) == batch["labels"]).sum())
    return correct / len(data)


@torch.inference_mode()
def latency_ms(model: PreTrainedModel, pixel_values: torch.Tensor, repeats: int = 20) -> float:
    """Median wall time of one forward pass (after 3 warm-up passes)."""
    model.eval()
    for _ in range(3):
        model(pixel_values=pixel_values)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(pixel_values=pixel_values)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def save_and_check(model: PreTrainedModel, output_dir: str, pixel_values: torch.Tensor, overwrite: bool = False,
                   results: dict[str, Any] | None = None, *, facts: RunFacts) -> None:
    """Save `model` (atomically) with `all_results.json` and its model card (README.md), and check that
    `AutoModelForImageClassification` reloads it to the same logits."""
    with atomic_output_dir(output_dir, overwrite) as tmp:
        model.save_pretrained(tmp)
        (tmp / "all_results.json").write_text(json.dumps({**(results or {}), CARD_KEY: facts.to_dict()}, indent=2))
        write_model_card(tmp, facts, model_id=Path(output_dir).name)
        reloaded = AutoModelForImageClassification.from_pretrained(tmp)
        with torch.no_grad():
            same = torch.allclose(reloaded(pixel_values=pixel_values).logits, model(pixel_values=pixel_values).logits,
                                  atol=1e-5)
        if not same:
            raise RuntimeError(f"the model written to {output_dir} does not reload to the same logits")
