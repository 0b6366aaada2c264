"""The OneS pipeline on images: train a dense ViT baseline and a V-MoE teacher, gather the teacher's experts
into a dense OneS model, distil (logits + hidden states), and compare.

>>> from hf_moekd.studies.ones import OneSArguments, run_ones
>>> report = run_ones(OneSArguments())          # scikit-learn digits, 3 seeds, a few minutes on 2 CPU cores

Gathering variants are `GatheringConfig`s written as strings (`GatheringConfig.from_string`), e.g. `svd` (the default:
SVD-KG, the paper's method), `weighted_average`, `svd-r16+align`, `top_kg`, `top_kg-weight`, `top_experts-k1`.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, set_seed

from ..cards import RunFacts, run_facts
from ..distillation import load_teacher
from ..ones import GatheringConfig, gather_experts
from ..ones.config import GRAMMAR as GATHERING_GRAMMAR
from ..data.images import image_labels
from ..models.dense_vit import DenseViTForImageClassification
from ..models.vmoe import VMoEForImageClassification
from ..ones import OneSReport
from ..utils.outputs import check_output_free
from .vision import (ImageArguments, accuracy, latency_ms, load_data, model_configs, save_and_check, study_settings,
                     train)


ONES_GATHERING = "svd"  # the study's default: SVD-KG, which the paper proposes (`hf-moekd gather` keeps weighted_average)


@dataclass
class OneSArguments(ImageArguments):
    """What `run_ones` trains and compares; the defaults are the README's main job (digits, < 10 min).

    KD runs use the loss fields of `DistillationArguments` with the image defaults (alpha 0.9, temperature 2) and
    hidden_loss_weight 0.5 (declared again below). `teacher_model_name_or_path`: a trained V-MoE for
    `run_ones_from_teacher`.
    """

    hidden_size: int = field(default=32, metadata={"help": "Width of the dense ViT, the V-MoE and the OneS student."})
    num_hidden_layers: int = field(default=4, metadata={"help": "Blocks; the V-MoE has experts in every other one."})
    epochs: float = field(default=20, metadata={"help": "Training epochs of the dense baseline and of the V-MoE teacher."})
    kd_epochs: float = field(default=10, metadata={"help": "Distillation epochs of each gathered student."})
    hidden_loss_weight: float = field(default=0.5, metadata={"help": "Weight of the hidden-state MSE term (every block)."})
    gatherings: list[str] = field(default_factory=lambda: [ONES_GATHERING], metadata={"help": f"Gathering variants to compare, each a GatheringConfig written `{GATHERING_GRAMMAR}` (default: {ONES_GATHERING}, SVD-KG, the paper's method)."})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Replace a non-empty output_dir."})
    output_dir: str | None = field(default="outputs/ones", metadata={"help": "Where the OneS model of the first variant (last seed) is saved; None: nowhere."})
    controls: bool = field(default=True, metadata={"help": "Also train the controls: the dense baseline for kd_epochs more, and the first gathered model fine-tuned kd_epochs without KD."})
    measure_speed: bool = field(default=True, metadata={"help": "Time dense vs V-MoE inference at batch 1 and 64."})

    def __post_init__(self) -> None:
        save = self.output_dir is not None
        super().__post_init__()
        if not save:  # None: save nothing (TrainingArguments' own None means 'trainer_output')
            self.output_dir = None
        for spec in self.gatherings:
            rank = GatheringConfig.from_string(spec).rank
            if rank is not None and rank > min(self.hidden_size, self.intermediate_size):
                raise ValueError(f"gathering {spec!r}: rank {rank} exceeds min(hidden_size, intermediate_size) = "
                                 f"{min(self.hidden_size, self.intermediate_size)}.")
        if len(set(self.gatherings)) != len(self.gatherings):
            raise ValueError(f"gatherings {self.gatherings} repeat a variant; give each once.")
        if not self.seeds:
            raise ValueError("seeds is empty: give at least one seed.")


def run_ones(args: OneSArguments, progress: bool = True) -> OneSReport:
    """Train, gather, distil and evaluate over `args.seeds`; save the first variant's OneS model (last seed)."""
    if args.output_dir:
        check_output_free(args.output_dir, args.overwrite_output_dir)  # before minutes of training, not after
    data = load_data(args)
    image_size = data["train"][0]["pixel_values"].shape[-1]
    dense_config, moe_config = model_configs(args, image_size, image_labels(args.dataset, data))
    calibration = calibration_batches(data["train"])
    report = OneSReport(args=study_settings(args))
    log = tqdm.write if progress else (lambda *a, **k: None)
    saved: PreTrainedModel | None = None
    for seed in tqdm(args.seeds, desc="OneS seeds", unit="seed", disable=not progress):
        bar = (lambda what, seed=seed: f"seed {seed}: {what}") if progress else (lambda what: None)
        set_seed(seed)
        dense = train(DenseViTForImageClassification(dense_config), data["train"], args, seed, args.epochs,
                      progress=bar("dense"))
        set_seed(seed)
        moe = train(VMoEForImageClassification(moe_config), data["train"], args, seed, args.epochs,
                    progress=bar("V-MoE"))
        report.add("dense", accuracy(dense, data["test"]))
        report.add("moe", accuracy(moe, data["test"]))
        if args.controls:  # the dense baseline trained for the students' extra epochs too (compute-matched)
            set_seed(seed)
            longer = train(copy.deepcopy(dense).train(), data["train"], args, seed, args.kd_epochs,
                           progress=bar("dense, more epochs"))
            report.add(f"dense, +{args.kd_epochs:g} epochs", accuracy(longer, data["test"]))
        report.params.update(dense=dense.num_parameters(), moe=moe.num_parameters())
        log(f"[seed {seed}] dense {report.accuracy['dense'][-1]:.4f}  V-MoE {report.accuracy['moe'][-1]:.4f}")
        for i, spec in enumerate(args.gatherings):
            student = gather(moe, spec, calibration)
            report.add(f"{spec} gathered only", accuracy(student, data["test"]))
            if i == 0 and args.controls:  # same schedule as the OneS student, without KD
                set_seed(seed)
                tuned = train(gather(moe, spec, calibration), data["train"], args, seed, args.kd_epochs,
                              progress=bar(f"{spec} + fine-tune"))
                report.add(f"{spec} + fine-tune, no KD", accuracy(tuned, data["test"]))
            set_seed(seed)
            train(student, data["train"], args, seed, args.kd_epochs, teacher=moe, progress=bar(f"{spec} + KD"))
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


def run_ones_from_teacher(args: OneSArguments, teacher_path: str | None = None,
                          allow_pickle: bool | None = None) -> dict[str, float]:
    """OneS for an already trained V-MoE: gather by `args.gatherings[0]`, distil, save to `args.output_dir`.

    `teacher_path` and `allow_pickle` default to `args.teacher_model_name_or_path` and `args.allow_pickle_checkpoints`.
    """
    teacher_path = teacher_path or args.teacher_model_name_or_path
    allow_pickle = args.allow_pickle_checkpoints if allow_pickle is None else allow_pickle
    if not teacher_path:
        raise ValueError("run_ones_from_teacher needs a trained V-MoE: set teacher_model_name_or_path.")
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


def calibration_batches(train_data, n: int = 2048, batch_size: int = 256) -> list[torch.Tensor]:
    """The first `n` training images in batches: router usage for `weighted_average`/`top_experts`/`svd` weights."""
    return [train_data[i : i + batch_size]["pixel_values"] for i in range(0, min(len(train_data), n), batch_size)]


def gather(moe: PreTrainedModel, spec: str, calibration: list[torch.Tensor] | None) -> PreTrainedModel:
    """The dense OneS twin of a V-MoE by the gathering variant `spec` (e.g. `svd`, `top_experts+align`)."""
    return gather_experts(moe, GatheringConfig.from_string(spec), calibration_dataset=calibration, progress=False)


_NOT_HYPERPARAMETERS = {"data_dir", "output_dir", "overwrite_output_dir", "controls", "measure_speed"}


def card_facts(args: OneSArguments, teacher: str) -> RunFacts:
    """What the saved OneS model's card says; `teacher`: a saved V-MoE's folder, or words for the run's own."""
    settings = {k: v for k, v in study_settings(args).items() if k not in _NOT_HYPERPARAMETERS and v is not None}
    return run_facts(["ones"], teacher=teacher, data=[args.dataset], hyperparameters=settings, device="cpu")


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



