"""The OneS pipeline on images: train a dense ViT baseline and a V-MoE teacher, gather the teacher's experts
into a dense OneS model, distil (logits + hidden states), and compare.

>>> from hf_moekd.ones_pipeline import OneSArguments, run_ones
>>> report = run_ones(OneSArguments())          # scikit-learn digits, 3 seeds, a few minutes on 2 CPU cores

Gathering variants are written `<strategy>[-r<rank>][+align]`, e.g. `svd`, `svd-r16+align`, `topk`, `average+align`.
"""
from __future__ import annotations

import copy
import json
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm
from transformers import (
    AutoModelForImageClassification,
    PreTrainedModel,
    PrinterCallback,
    set_seed,
)

from .distillation import DistillationArguments, DistillationTrainer
from .gathering import MERGE_STRATEGIES, gather_experts
from .images import IMAGE_LABELS, InMemoryDataset, load_image_dataset
from .models.ones import OneSConfig, OneSForImageClassification
from .models.vmoe import VMoEConfig, VMoEForImageClassification
from .utils import atomic_output_dir, check_output_free

if TYPE_CHECKING:
    from .cards import RunFacts


@dataclass
class OneSArguments:
    """What `run_ones` trains and compares; the defaults are the README's main job (digits, < 10 min)."""

    dataset: str = field(default="digits", metadata={"help": "`digits` (scikit-learn) or `fashion_mnist` (Debian IDX files)."})
    data_dir: str | None = field(default=None, metadata={"help": "Folder of the Fashion-MNIST IDX files (default: Debian's)."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Random subset of the training images."})
    max_test_samples: int | None = field(default=None, metadata={"help": "Random subset of the test images."})
    patch_size: int = field(default=2, metadata={"help": "ViT patch size (must divide the image size)."})
    hidden_size: int = field(default=32, metadata={"help": "Width of the dense ViT, the V-MoE and the OneS student."})
    num_hidden_layers: int = field(default=4, metadata={"help": "Blocks; the V-MoE has experts in every other one."})
    num_attention_heads: int = field(default=2, metadata={"help": "Attention heads."})
    intermediate_size: int = field(default=32, metadata={"help": "FFN width of the dense MLPs and of each expert."})
    num_experts: int = field(default=8, metadata={"help": "Experts per V-MoE block."})
    num_experts_per_tok: int = field(default=2, metadata={"help": "Top-k experts per token."})
    epochs: float = field(default=20, metadata={"help": "Training epochs of the dense baseline and of the V-MoE teacher."})
    kd_epochs: float = field(default=10, metadata={"help": "Distillation epochs of each gathered student."})
    learning_rate: float = field(default=2e-3, metadata={"help": "AdamW learning rate of every run."})
    batch_size: int = field(default=32, metadata={"help": "Training batch size."})
    alpha: float = field(default=0.9, metadata={"help": "Weight of the logits KD term (1 - alpha on the labels)."})
    temperature: float = field(default=2.0, metadata={"help": "KD temperature."})
    hidden_loss_weight: float = field(default=0.5, metadata={"help": "Weight of the hidden-state MSE term (every block)."})
    gatherings: list[str] = field(default_factory=lambda: ["svd"], metadata={"help": "Variants `<strategy>[-r<rank>][+align]`."})
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2], metadata={"help": "Seeds (each trains every model)."})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Replace a non-empty output_dir."})
    output_dir: str | None = field(default="outputs/ones", metadata={"help": "Where the OneS model of the first variant (last seed) is saved; None: nowhere."})
    controls: bool = field(default=True, metadata={"help": "Also train the controls: the dense baseline for kd_epochs more, and the first gathered model fine-tuned kd_epochs without KD."})
    measure_speed: bool = field(default=True, metadata={"help": "Time dense vs V-MoE inference at batch 1 and 64."})

    def __post_init__(self) -> None:
        for spec in self.gatherings:
            rank = parse_gathering(spec).rank
            if rank is not None and rank > min(self.hidden_size, self.intermediate_size):
                raise ValueError(f"gathering {spec!r}: rank {rank} exceeds min(hidden_size, intermediate_size) = "
                                 f"{min(self.hidden_size, self.intermediate_size)}.")
        if len(set(self.gatherings)) != len(self.gatherings):
            raise ValueError(f"gatherings {self.gatherings} repeat a variant; give each once.")
        if not self.seeds:
            raise ValueError("seeds is empty: give at least one seed.")


@dataclass(frozen=True)
class Gathering:
    strategy: str
    rank: int | None = None
    align: bool = False


def parse_gathering(spec: str) -> Gathering:
    """`svd-r16+align` -> Gathering('svd', 16, True); a clear error for unknown strategies or bad ranks."""
    body, _, suffix = spec.partition("+")
    if suffix not in {"", "align"}:
        raise ValueError(f"gathering {spec!r}: the only suffix is '+align'.")
    strategy, has_rank, rank = body.partition("-r")
    if strategy not in MERGE_STRATEGIES:
        raise ValueError(f"gathering {spec!r}: unknown strategy {strategy!r}; choose one of {sorted(MERGE_STRATEGIES)}.")
    if has_rank and (strategy != "svd" or not rank.isdigit() or int(rank) < 1):
        raise ValueError(f"gathering {spec!r}: a rank is written `svd-r<int>` with an int >= 1 (svd only).")
    return Gathering(strategy, int(rank) if rank else None, bool(suffix))


def model_configs(args: OneSArguments, image_size: int, labels: tuple[str, ...]) -> tuple[OneSConfig, VMoEConfig]:
    """The dense ViT (OneS) config and the V-MoE config of the same backbone."""
    backbone = dict(
        image_size=image_size, patch_size=args.patch_size, num_channels=1, hidden_size=args.hidden_size,
        num_hidden_layers=args.num_hidden_layers, num_attention_heads=args.num_attention_heads,
        intermediate_size=args.intermediate_size, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        id2label=dict(enumerate(labels)), label2id={name: i for i, name in enumerate(labels)},
    )
    moe = VMoEConfig(**backbone, num_experts=args.num_experts, num_experts_per_tok=args.num_experts_per_tok)
    return OneSConfig(**backbone), moe


def train(model: PreTrainedModel, data, args: OneSArguments, seed: int, epochs: float, teacher=None,
          data_collator=None, extra_loss_terms: list[str] | None = None) -> PreTrainedModel:
    """Train `model` in place (with KD from `teacher` when given: logits + every block's hidden states).

    `data` is a `datasets.Dataset` of images (read into memory) or, with `data_collator`, any dataset it batches.
    `extra_loss_terms` are registered loss terms as 'name=weight' (e.g. MoDE's 'mode=0.1').
    """
    loss = {"alpha": 0.0}
    if teacher is not None:
        loss = {"alpha": args.alpha, "temperature": args.temperature, "hidden_loss_weight": args.hidden_loss_weight}
    with tempfile.TemporaryDirectory() as tmp:
        targs = DistillationArguments(
            output_dir=tmp, num_train_epochs=epochs, per_device_train_batch_size=args.batch_size,
            learning_rate=args.learning_rate, weight_decay=0.01, save_strategy="no", report_to=[], disable_tqdm=True,
            seed=seed, use_cpu=True, logging_strategy="no", extra_loss_terms=list(extra_loss_terms or []), **loss,
        )
        trainer = DistillationTrainer(model=model, args=targs, teacher_model=teacher, data_collator=data_collator,
                                      train_dataset=data if data_collator else InMemoryDataset(data))
        trainer.remove_callback(PrinterCallback)  # keep the output to the pipeline's own lines
        trainer.train()
    return model.eval()


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


def benefit_preserved(student: float, dense: float, moe: float) -> float | None:
    """(student - dense) / (MoE - dense) in %, None when the MoE does not beat the dense baseline."""
    return None if moe <= dense else 100.0 * (student - dense) / (moe - dense)


def _is_baseline(name: str) -> bool:
    """The dense baseline, the MoE teacher and the dense controls: rows without a "% preserved"."""
    return name in {"dense", "moe"} or name.startswith("dense,")


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


@dataclass
class OneSReport:
    """Per-seed accuracies of every model, inference latencies, and where the saved model is."""

    args: dict[str, Any]
    accuracy: dict[str, list[float]] = field(default_factory=dict)
    latency_ms: dict[str, float] = field(default_factory=dict)
    params: dict[str, int] = field(default_factory=dict)
    saved_model: str | None = None

    def add(self, name: str, value: float) -> None:
        self.accuracy.setdefault(name, []).append(value)

    def summary(self) -> dict[str, Any]:
        """Mean/std accuracy (%) per model and % of MoE benefit preserved (on the means) per student."""
        dense, moe = (statistics.fmean(self.accuracy[k]) for k in ("dense", "moe"))
        rows = {}
        for name, values in self.accuracy.items():
            mean, std = _mean_std(values)
            delta_mean, delta_std = _mean_std([100 * (v - d) for v, d in zip(values, self.accuracy["dense"])])
            rows[name] = {"accuracy_mean": 100 * mean, "accuracy_std": 100 * std, "seeds": len(values),
                          "delta_vs_dense_mean": delta_mean, "delta_vs_dense_std": delta_std,
                          "benefit_preserved_pct": None if _is_baseline(name) else benefit_preserved(mean, dense, moe)}
        speedup = {f"speedup_batch{b}": self.latency_ms[f"moe_batch{b}"] / self.latency_ms[f"dense_batch{b}"]
                   for b in (1, 64) if f"dense_batch{b}" in self.latency_ms}
        return {"models": rows, "latency_ms": self.latency_ms, "params": self.params, **speedup}

    def table(self) -> str:
        names = {"dense": "dense baseline", "moe": "MoE teacher"}
        lines = ["| model | params | accuracy % (mean ± std) | Δ vs dense, paired by seed | % of MoE benefit preserved |",
                 "|---|---:|---:|---:|---:|"]
        for name, row in self.summary()["models"].items():
            kept = row["benefit_preserved_pct"]
            kept_text = "-" if _is_baseline(name) else ("n/a (MoE <= dense)" if kept is None else f"{kept:.1f}")
            params = self.params["moe" if name == "moe" else "dense"]
            delta = "-" if name == "dense" else f"{row['delta_vs_dense_mean']:+.2f} ± {row['delta_vs_dense_std']:.2f}"
            lines.append(f"| {names.get(name, name)} | {params / 1e3:.1f}k | {row['accuracy_mean']:.2f} ± "
                         f"{row['accuracy_std']:.2f} | {delta} | {kept_text} |")
        return "\n".join(lines)


def run_ones(args: OneSArguments, progress: bool = True) -> OneSReport:
    """Train, gather, distil and evaluate over `args.seeds`; save the first variant's OneS model (last seed)."""
    if args.output_dir:
        check_output_free(args.output_dir, args.overwrite_output_dir)  # before minutes of training, not after
    data = load_data(args)
    image_size = data["train"][0]["pixel_values"].shape[-1]
    dense_config, moe_config = model_configs(args, image_size, IMAGE_LABELS[args.dataset])
    calibration = calibration_batches(data["train"])
    report = OneSReport(args=asdict(args))
    log = tqdm.write if progress else (lambda *a, **k: None)
    saved: PreTrainedModel | None = None
    for seed in tqdm(args.seeds, desc="OneS seeds", unit="seed", disable=not progress):
        set_seed(seed)
        dense = train(OneSForImageClassification(dense_config), data["train"], args, seed, args.epochs)
        set_seed(seed)
        moe = train(VMoEForImageClassification(moe_config), data["train"], args, seed, args.epochs)
        report.add("dense", accuracy(dense, data["test"]))
        report.add("moe", accuracy(moe, data["test"]))
        if args.controls:  # the dense baseline trained for the students' extra epochs too (compute-matched)
            set_seed(seed)
            longer = train(copy.deepcopy(dense).train(), data["train"], args, seed, args.kd_epochs)
            report.add(f"dense, +{args.kd_epochs:g} epochs", accuracy(longer, data["test"]))
        report.params.update(dense=dense.num_parameters(), moe=moe.num_parameters())
        log(f"[seed {seed}] dense {report.accuracy['dense'][-1]:.4f}  V-MoE {report.accuracy['moe'][-1]:.4f}")
        for i, spec in enumerate(args.gatherings):
            student = gather(moe, spec, calibration)
            report.add(f"{spec} gathered only", accuracy(student, data["test"]))
            if i == 0 and args.controls:  # same schedule as the OneS student, without KD
                set_seed(seed)
                tuned = train(gather(moe, spec, calibration), data["train"], args, seed, args.kd_epochs)
                report.add(f"{spec} + fine-tune, no KD", accuracy(tuned, data["test"]))
            set_seed(seed)
            train(student, data["train"], args, seed, args.kd_epochs, teacher=moe)
            report.add(f"{spec} + KD (OneS)", accuracy(student, data["test"]))
            log(f"[seed {seed}] {spec}: gathered {report.accuracy[f'{spec} gathered only'][-1]:.4f}  "
                f"OneS {report.accuracy[f'{spec} + KD (OneS)'][-1]:.4f}")
            saved = saved if spec != args.gatherings[0] else student
    if args.measure_speed:
        for batch in (1, 64):
            pixels = data["test"][:batch]["pixel_values"]
            pixels = pixels.repeat(-(-batch // len(pixels)), 1, 1, 1)[:batch]  # exactly `batch` images
            report.latency_ms[f"dense_batch{batch}"] = latency_ms(dense, pixels)
            report.latency_ms[f"moe_batch{batch}"] = latency_ms(moe, pixels)
    if args.output_dir and saved is not None:
        results = {"summary": report.summary(), "per_seed": report.accuracy,
                   "test_accuracy": report.accuracy[f"{args.gatherings[0]} + KD (OneS)"][-1]}  # the saved model's
        teacher = f"the V-MoE trained in the same run, {args.num_experts} experts, top-{args.num_experts_per_tok}"
        save_and_check(saved, args.output_dir, data["test"][:8]["pixel_values"], args.overwrite_output_dir,
                       results=results, facts=card_facts(args, teacher))
        report.saved_model = str(args.output_dir)
    return report


def run_ones_from_teacher(args: OneSArguments, teacher_path: str, allow_pickle: bool = False) -> dict[str, float]:
    """OneS for an already trained V-MoE: gather by `args.gatherings[0]`, distil, save to `args.output_dir`."""
    from .distillation.teacher import load_teacher

    if args.output_dir:
        check_output_free(args.output_dir, args.overwrite_output_dir)
    data = load_data(args)
    teacher = load_teacher(teacher_path, VMoEForImageClassification, allow_pickle=allow_pickle)
    if getattr(teacher.config, "model_type", None) != "vmoe":
        raise ValueError(f"{teacher_path} holds a {teacher.config.model_type!r} model; OneS here needs a V-MoE "
                         "('vmoe') image classifier. For LLM checkpoints use `hf-moekd gather`.")
    seed = args.seeds[0]
    spec = args.gatherings[0]
    student = gather(teacher, spec, calibration_batches(data["train"]))
    results = {"teacher_accuracy": accuracy(teacher, data["test"]), "gathered_accuracy": accuracy(student, data["test"])}
    set_seed(seed)
    train(student, data["train"], args, seed, args.kd_epochs, teacher=teacher)
    results["ones_accuracy"] = accuracy(student, data["test"])
    if args.output_dir:
        save_and_check(student, args.output_dir, data["test"][:8]["pixel_values"], args.overwrite_output_dir,
                       results={**results, "gathering": spec, "teacher": str(teacher_path)},
                       facts=card_facts(args, str(teacher_path)))
    return results


def load_data(args: OneSArguments):
    return load_image_dataset(args.dataset, data_dir=args.data_dir, max_train_samples=args.max_train_samples,
                              max_test_samples=args.max_test_samples)


def calibration_batches(train_data, n: int = 2048, batch_size: int = 256) -> list[torch.Tensor]:
    """The first `n` training images in batches: router usage for `topk`/`svd` weights."""
    return [train_data[i : i + batch_size]["pixel_values"] for i in range(0, min(len(train_data), n), batch_size)]


def gather(moe: PreTrainedModel, spec: str, calibration: list[torch.Tensor] | None) -> PreTrainedModel:
    """The dense OneS twin of a V-MoE by the gathering variant `spec` (e.g. `svd`, `topk+align`)."""
    g = parse_gathering(spec)
    return gather_experts(moe, g.strategy, rank=g.rank, calibration_dataset=calibration, align=g.align, progress=False)


_NOT_HYPERPARAMETERS = {"data_dir", "output_dir", "overwrite_output_dir", "controls", "measure_speed"}


def card_facts(args: OneSArguments, teacher: str) -> RunFacts:
    """What the saved OneS model's card says; `teacher`: a saved V-MoE's folder, or words for the run's own."""
    from .cards import run_facts

    settings = {k: v for k, v in asdict(args).items() if k not in _NOT_HYPERPARAMETERS and v is not None}
    return run_facts(["ones"], teacher=teacher, data=[args.dataset], hyperparameters=settings, device="cpu")


def save_and_check(model: PreTrainedModel, output_dir: str, pixel_values: torch.Tensor, overwrite: bool = False,
                   results: dict[str, Any] | None = None, facts: RunFacts | None = None) -> None:
    """Save `model` (atomically) with `all_results.json` and its model card (README.md), and check that
    `AutoModelForImageClassification` reloads it to the same logits."""
    from .cards import CARD_KEY, run_facts, write_model_card

    facts = facts or run_facts(["ones"])
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


def print_report(report: OneSReport) -> None:
    args = report.args
    summary = report.summary()
    print(f"\nOneS on {args['dataset']}: MoE teacher ({args['num_experts']} experts, top-{args['num_experts_per_tok']}, "
          f"{args['num_hidden_layers']} blocks, width {args['hidden_size']}) gathered into a dense model of the same "
          f"width, then distilled; test accuracy over seeds {args['seeds']}")
    print(report.table())
    if "speedup_batch1" in summary:
        lat = summary["latency_ms"]
        print(f"\nInference on CPU, dense vs MoE: batch 1 {lat['dense_batch1']:.2f} vs {lat['moe_batch1']:.2f} ms "
              f"({summary['speedup_batch1']:.2f}x), batch 64 {lat['dense_batch64']:.2f} vs {lat['moe_batch64']:.2f} ms "
              f"({summary['speedup_batch64']:.2f}x)")
    if report.saved_model:
        print(f"\nSaved the OneS model to {report.saved_model}; it reloads with "
              f"AutoModelForImageClassification.from_pretrained({report.saved_model!r}, trust_remote_code=True) "
              "or, with hf_moekd imported, without trust_remote_code.")



