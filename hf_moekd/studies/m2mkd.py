"""The m2mKD pipeline on images: ViT teacher -> meta model -> per-module KD -> assembled V-MoE -> fine-tune.

>>> from hf_moekd.studies.m2mkd import M2MArguments, run_m2mkd
>>> from hf_moekd.m2mkd.report import print_report
>>> print_report(run_m2mkd(M2MArguments()))     # scikit-learn digits, about 2 minutes on 2 CPU cores

Every stage writes its own folder under `output_dir` atomically, with a record (settings, run id, results) in
`all_results.json` under "m2m"; a rerun skips the finished stages whose settings are unchanged:

    teacher/ meta/ seed<S>/module_<i>/ seed<S>/student/ seed<S>/baseline/

The student budget is counted in student forward passes (training examples through the student or through one of
its modules). With `budget="forwards"` a module pass counts as a full one (conservative: it favours the baseline) and
the end-to-end baseline trains `num_modules * module_epochs + finetune_epochs` epochs; with `budget="blocks"` it
counts as the module's share of the student's blocks and the baseline trains `module_epochs + finetune_epochs`.
Both counts are reported. The teacher and meta model forward passes of m2mKD are not part of the student budget.

The defaults follow the official recipe (kamanphoebe/m2mKD, commit 067fa1f): the meta model is trained from scratch
(`meta_init="scratch"`, its PT phase: 300 epochs, 3x a module's 100, hence `meta_epochs` = 3 x `module_epochs`
here), the V-MoE student has experts in every block (`moe_layer_frequency=1`; TRAIN-MOE.md line 53 `--moe_pos 0 1
2` in each 3-block module and line 70 `--moe_pos 0 1 ... 11`, vmoe.py lines 158-166: a block is a `MoeBlock` iff its
index is in `moe_pos`), and a module's m2mKD loss has no gate loss (`module_gate_loss=False`; see `M2MConfig`).
This project's settings before issue 29 remain options: `meta_init="teacher"`, `moe_layer_frequency=2`,
`module_gate_loss=True`.
"""
from __future__ import annotations

import json
import logging
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoModelForImageClassification, PreTrainedModel, set_seed

from ..cards import run_facts
from ..distillation import load_teacher
from ..distillation.losses import batch_size
from ..data.images import IMAGE_LABELS, image_labels, shifted_test_sets
from ..models.dense_vit import DenseViTConfig, DenseViTForImageClassification
from ..models.vmoe import VMoEConfig, VMoEForImageClassification
from .vision import ImageArguments, accuracy, load_data, model_configs, save_and_check, study_settings, train
from ..utils.outputs import atomic_output_dir
from ..m2mkd.config import M2MConfig
from ..m2mkd.modules import assemble, build_meta, check_num_modules, module_state, split_model
from ..m2mkd.path import student_path, teacher_path
from ..m2mkd.report import M2MReport, poor_teacher_paths

logger = logging.getLogger(__name__)

PHASES = ("all", "prepare", "module", "assemble")
MODULE_FILE = "module.safetensors"
STITCH_PREFIX = "stitch."  # stitch weights in MODULE_FILE: kept for inspection, dropped at assembly


@dataclass
class M2MArguments(ImageArguments, M2MConfig):
    """What `run_m2mkd` trains; the defaults are a fast digits run (ViT teacher, 4 modules, V-MoE student).

    The m2mKD settings come from `M2MConfig`, the loss from `DistillationArguments` with the official m2mKD values
    alpha 0.5 and temperature 1 (declared again below; hidden_loss_weight stays 0: m2mKD distils logits only).
    """

    patch_size: int = field(default=2, metadata={"help": "ViT patch size of teacher and student (must divide the image size)."})
    teacher_model_name_or_path: str | None = field(default=None, metadata={"help": "A trained dense image classifier (DenseViT) to split; omit to train one (teacher_* fields)."})
    teacher_hidden_size: int = field(default=64, metadata={"help": "Width of the ViT teacher (and of the meta model)."})
    teacher_layers: int = field(default=8, metadata={"help": "Blocks of the ViT teacher (a multiple of num_modules)."})
    teacher_heads: int = field(default=4, metadata={"help": "Attention heads of the ViT teacher."})
    teacher_intermediate_size: int = field(default=128, metadata={"help": "FFN width of the ViT teacher."})
    hidden_size: int = field(default=32, metadata={"help": "Width of the V-MoE student."})
    num_hidden_layers: int = field(default=8, metadata={"help": "Blocks of the V-MoE student (a multiple of num_modules)."})
    num_attention_heads: int = field(default=2, metadata={"help": "Attention heads of the student."})
    intermediate_size: int = field(default=32, metadata={"help": "FFN width of the student's dense MLPs and of each expert."})
    moe_layer_frequency: int = field(default=1, metadata={"help": "Student block i is MoE iff i + 1 is a multiple of it (1: every block, the official m2mKD V-MoE; 2: every other block, the V-MoE paper's and this project's former setting)."})
    teacher_epochs: float = field(default=20, metadata={"help": "Training epochs of the teacher."})
    meta_epochs: float = field(default=6, metadata={"help": "Training epochs of the meta model (0: use it as initialised); official: 3x module_epochs (PT 300, m2mKD 100 epochs)."})
    module_epochs: float = field(default=2, metadata={"help": "m2mKD epochs of each student module."})
    finetune_epochs: float = field(default=12, metadata={"help": "End-to-end epochs of the assembled student."})
    baseline: bool = field(default=True, metadata={"help": "Also train the student end to end only, on the same budget of student forward passes."})
    alpha: float = field(default=0.5, metadata={"help": "Weight of the KL term of m2mKD (1 - alpha on the labels); 0.5 in m2mKD."})
    temperature: float = field(default=1.0, metadata={"help": "KD temperature T (the KL term is scaled by T^2); 1 in m2mKD."})
    seeds: list[int] = field(default_factory=lambda: [0], metadata={"help": "Student seeds (teacher and meta model use the first)."})
    ood_rotation: float = field(default=30.0, metadata={"help": "Degrees of the rotated (out-of-distribution) test set."})
    ood_noise_std: float = field(default=0.3, metadata={"help": "Gaussian noise std of the noised (out-of-distribution) test set."})
    output_dir: str = field(default="outputs/m2mkd", metadata={"help": "Folder of every stage (see the module docstring)."})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Retrain stages whose saved settings differ from these (an error otherwise)."})
    phase: str = field(default="all", metadata={"help": "`all`; `prepare` (teacher, meta model); `module` (one module, see module_index); `assemble` (assembly, fine-tune, baseline, report)."})
    module_index: int | None = field(default=None, metadata={"help": "With phase `module`: the module to train (one process per module)."})

    def __post_init__(self) -> None:
        super().__post_init__()
        M2MConfig.__post_init__(self)
        if self.phase not in PHASES:
            raise ValueError(f"phase {self.phase!r} is unknown; choose one of {PHASES}.")
        if (self.phase == "module") != (self.module_index is not None):
            raise ValueError("phase `module` needs --module_index (and --module_index needs --phase module).")
        if self.module_index is not None and not 0 <= self.module_index < self.num_modules:
            raise ValueError(f"module_index {self.module_index} is out of range 0..{self.num_modules - 1}.")
        check_num_modules(self.num_hidden_layers, self.num_modules, "student (num_hidden_layers)")
        if not self.teacher_model_name_or_path:
            check_num_modules(self.teacher_layers, self.num_modules, "teacher (teacher_layers)")
        if not self.seeds:
            raise ValueError("seeds is empty: give at least one seed.")

    @property
    def baseline_epochs(self) -> float:
        """Epochs of the end-to-end baseline: the budget of the modules (see `budget`) plus the fine-tune."""
        modules = self.num_modules if self.budget == "forwards" else 1  # `blocks`: N modules of 1/N of the blocks
        return modules * self.module_epochs + self.finetune_epochs

    def settings(self, *names: str, **extra: Any) -> dict[str, Any]:
        """The named fields plus `extra`: what a stage's saved record must match to be reused."""
        return json.loads(json.dumps({**{n: getattr(self, n) for n in names}, **extra}))


DATA = ("dataset", "max_train_samples", "max_test_samples", "learning_rate", "batch_size")
STUDENT = ("patch_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "num_experts",
           "num_experts_per_tok", "moe_layer_frequency", "num_modules")
OOD = ("ood_rotation", "ood_noise_std")


class ForwardCount:
    """Examples seen by a model in training-mode forward passes."""

    def __init__(self) -> None:
        self.examples = 0


@contextmanager
def counting_forwards(model: nn.Module) -> Iterator[ForwardCount]:
    """Count the examples `model` sees in forward passes while it is in training mode (its training budget)."""
    count = ForwardCount()

    def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if module.training:
            count.examples += batch_size({**{str(i): a for i, a in enumerate(args)}, **kwargs})

    handle = model.register_forward_hook(hook, with_kwargs=True)
    try:
        yield count
    finally:
        handle.remove()


def load_stage(folder: Path, settings: dict[str, Any], overwrite: bool) -> dict[str, Any] | None:
    """The record of the finished stage in `folder` if it was made with `settings`; None if it must (re)run."""
    results = folder / "all_results.json"
    if not results.is_file():
        if folder.exists() and any(folder.iterdir()) and not overwrite:
            raise FileExistsError(f"{folder} exists but holds no finished m2mKD stage: pass --overwrite_output_dir "
                                  "to replace it, or choose another --output_dir.")
        return None
    record = json.loads(results.read_text()).get("m2m")
    if record is not None and record["settings"] == settings:
        return record
    if overwrite:
        return None
    changed = sorted(k for k in settings if record is None or record["settings"].get(k) != settings[k])
    raise ValueError(f"{folder} was made with other settings ({', '.join(changed) or 'unknown'} differ): pass "
                     "--overwrite_output_dir to retrain it, or choose another --output_dir.")


def image_configs(args: M2MArguments, image_size: int,
                  labels: tuple[str, ...] | None = None) -> tuple[DenseViTConfig, VMoEConfig]:
    """The ViT teacher config (teacher_* fields) and the V-MoE student config (`labels`: the data's class names)."""
    dense, student = model_configs(args, image_size, labels or IMAGE_LABELS[args.dataset])
    teacher = DenseViTConfig.from_dict({**dense.to_dict(), "hidden_size": args.teacher_hidden_size,
                                    "num_hidden_layers": args.teacher_layers, "num_attention_heads": args.teacher_heads,
                                    "intermediate_size": args.teacher_intermediate_size})
    return teacher, VMoEConfig.from_dict({**student.to_dict(), "moe_layer_frequency": args.moe_layer_frequency})


class M2MRun:
    """The stages of one `run_m2mkd` call; each returns its record (settings, run_id, results)."""

    def __init__(self, args: M2MArguments, progress: bool = True):
        self.args, self.out = args, Path(args.output_dir)
        self.log = tqdm.write if progress else (lambda *a, **k: None)
        self.data = load_data(args)
        self.ood = shifted_test_sets(self.data["test"], args.ood_rotation, args.ood_noise_std)
        self.teacher_config, self.student_config = image_configs(args, self.data["train"][0]["pixel_values"].shape[-1],
                                                                 image_labels(args.dataset, self.data))
        self.models: dict[str, PreTrainedModel] = {}

    # ---- helpers ---------------------------------------------------------------------------------------
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Test accuracy, in distribution (`iid`) and on the shifted test sets."""
        return {"iid": accuracy(model, self.data["test"]), **{k: accuracy(model, d) for k, d in self.ood.items()}}

    def stage(self, folder: Path, settings: dict[str, Any], make: Callable[[dict], None], build: bool) -> dict:
        """Reuse the finished stage in `folder`, else run `make(record)` (which fills the results and saves)."""
        record = load_stage(folder, settings, self.args.overwrite_output_dir)
        if record is not None:
            self.log(f"[m2mkd] {folder}: finished earlier, reused")
            return record
        if not build:
            raise FileNotFoundError(f"{folder} is missing or stale: run the earlier phases first (--phase prepare, "
                                    "then --phase module --module_index i for every module).")
        record = {"settings": settings, "run_id": uuid.uuid4().hex, "results": {}}
        make(record)
        self.log(f"[m2mkd] {folder}: {json.dumps(record['results'])}")
        return record

    def fit(self, model: nn.Module, epochs: float, seed: int, teacher: nn.Module | None = None) -> dict[str, float]:
        """Train `model` (KD from `teacher` when given): its forward passes (examples) and the wall time."""
        start = time.perf_counter()
        with counting_forwards(model) as count:
            if epochs > 0:
                train(model, self.data["train"], self.args, seed, epochs, teacher=teacher,
                      term_options={"logits_kd": self.args.logits_kd_options})
        return {"train_forwards": count.examples, "train_seconds": round(time.perf_counter() - start, 1)}

    def save_model(self, model: PreTrainedModel, folder: Path, record: dict, methods: list[str],
                   teacher: str | None = None) -> None:
        facts = run_facts(methods, teacher=teacher, data=[self.args.dataset], hyperparameters=record["settings"],
                          device="cpu")
        save_and_check(model, str(folder), self.data["test"][:8]["pixel_values"], overwrite=True,
                       results={**record["results"], "m2m": record}, facts=facts)

    def module_dir(self, seed: int, index: int) -> Path:
        return self.out / f"seed{seed}" / f"module_{index}"

    def load(self, name: str, folder: Path | str) -> PreTrainedModel:
        if name not in self.models:
            self.models[name] = AutoModelForImageClassification.from_pretrained(folder).eval()
        return self.models[name]

    # ---- stages ----------------------------------------------------------------------------------------
    def teacher(self, build: bool) -> dict:
        args = self.args
        if args.teacher_model_name_or_path:
            path = str(Path(args.teacher_model_name_or_path).resolve())
            self.models["teacher"] = load_teacher(path, DenseViTForImageClassification,
                                                  allow_pickle=args.allow_pickle_checkpoints).eval()
            check_num_modules(self.models["teacher"].config.num_hidden_layers, args.num_modules, "teacher")
            return {"run_id": f"given:{path}", "results": self.evaluate(self.models["teacher"])}
        folder = self.out / "teacher"

        def make(record: dict) -> None:
            set_seed(args.seeds[0])
            model = self.models["teacher"] = DenseViTForImageClassification(self.teacher_config)
            record["results"] = {**self.fit(model, args.teacher_epochs, args.seeds[0]), **self.evaluate(model)}
            self.save_model(model, folder, record, ["fine-tune"])

        settings = args.settings(*DATA, *OOD, "patch_size", "teacher_hidden_size", "teacher_layers", "teacher_heads",
                                 "teacher_intermediate_size", "teacher_epochs", seed=args.seeds[0])
        record = self.stage(folder, settings, make, build)
        self.load("teacher", folder)
        return record

    def meta(self, teacher_record: dict, build: bool) -> dict:
        args, folder = self.args, self.out / "meta"

        def make(record: dict) -> None:
            set_seed(args.seeds[0])
            teacher = self.models["teacher"]
            model = self.models["meta"] = build_meta(teacher, args.num_modules, args.meta_init)
            fitted = self.fit(model, args.meta_epochs, args.seeds[0])
            meta = split_model(model.eval(), args.num_modules)
            hybrid = [accuracy(teacher_path(meta, teacher, i), self.data["test"]) for i in range(args.num_modules)]
            record["results"] = {**fitted, "iid": accuracy(model, self.data["test"]), "teacher_path_iid": hybrid}
            self.save_model(model, folder, record, ["fine-tune"])

        settings = args.settings(*DATA, "num_modules", "meta_init", "meta_epochs", seed=args.seeds[0],
                                 teacher=teacher_record["run_id"])
        record = self.stage(folder, settings, make, build)
        self.load("meta", folder).requires_grad_(False)
        if poor := poor_teacher_paths(record["results"]["iid"], record["results"]["teacher_path_iid"]):
            logger.warning("m2mKD: the teacher's modules %s do not fit the meta model (meta model %.1f%%, teacher paths "
                           "%s%%): their KD targets are poor. A teacher trained outside a meta model from scratch "
                           "gives this; meta_init='teacher' shares the teacher's stem and head.", poor,
                           100 * record["results"]["iid"],
                           [round(100 * a, 1) for a in record["results"]["teacher_path_iid"]])
        return record

    def module(self, index: int, seed: int, deps: dict[str, str], build: bool) -> dict:
        """m2mKD of student module `index`: trained in the meta model against the teacher's module `index`."""
        args, folder = self.args, self.module_dir(seed, index)

        def make(record: dict) -> None:
            set_seed(seed)
            student = VMoEForImageClassification(self.student_config)
            meta = split_model(self.models["meta"], args.num_modules)
            path = student_path(meta, student, index, gate_loss=args.module_gate_loss)
            fitted = self.fit(path, args.module_epochs, seed, teacher=teacher_path(meta, self.models["teacher"], index))
            record["results"] = {**fitted, "module_blocks": len(path.module.blocks),
                                 "student_path_iid": accuracy(path, self.data["test"])}
            state = module_state(student, path.module)
            state |= {f"{STITCH_PREFIX}{k}": v for k, v in {**_prefixed(path.pre, "pre."),
                                                             **_prefixed(path.post, "post.")}.items()}
            with atomic_output_dir(folder, overwrite=True) as tmp:
                save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / MODULE_FILE),
                          metadata={"format": "pt"})
                (tmp / "all_results.json").write_text(json.dumps({**record["results"], "m2m": record}, indent=2))

        settings = args.settings(*DATA, *STUDENT, "module_epochs", "alpha", "temperature", "kd_scale",
                                 "module_gate_loss", index=index, seed=seed, **deps)
        return self.stage(folder, settings, make, build)

    def student(self, seed: int, modules: list[dict], build: bool = True) -> dict:
        """Assemble the trained modules into the V-MoE student (stitches dropped), fine-tune it end to end."""
        args, folder = self.args, self.out / f"seed{seed}" / "student"

        def make(record: dict) -> None:
            set_seed(seed)
            model = VMoEForImageClassification(self.student_config)
            states = {i: {k: v for k, v in load_file(self.module_dir(seed, i) / MODULE_FILE).items()
                          if not k.startswith(STITCH_PREFIX)} for i in range(args.num_modules)}
            assembled = accuracy(assemble(model, states), self.data["test"])
            fitted = self.fit(model, args.finetune_epochs, seed)
            forwards = fitted["train_forwards"]
            module_forwards = [m["results"]["train_forwards"] for m in modules]
            blocks = [m["results"]["module_blocks"] / args.num_hidden_layers for m in modules]
            record["results"] = {
                "assembled_iid": assembled, **self.evaluate(model), "finetune_forwards": forwards,
                "student_forwards": sum(module_forwards) + forwards,
                "student_block_forwards": sum(n * b for n, b in zip(module_forwards, blocks)) + forwards,
                "train_seconds": fitted["train_seconds"] + sum(m["results"]["train_seconds"] for m in modules),
            }
            self.save_model(model, folder, record, ["m2mkd"], teacher=self.teacher_name())

        settings = args.settings(*DATA, *OOD, "finetune_epochs", seed=seed, modules=[m["run_id"] for m in modules])
        return self.stage(folder, settings, make, build)

    def baseline(self, seed: int) -> dict:
        """The same V-MoE (same initialisation) trained end to end only, on the same forward-pass budget."""
        args, folder = self.args, self.out / f"seed{seed}" / "baseline"

        def make(record: dict) -> None:
            set_seed(seed)
            model = VMoEForImageClassification(self.student_config)
            fitted = self.fit(model, args.baseline_epochs, seed)
            forwards = fitted["train_forwards"]
            record["results"] = {**fitted, "student_forwards": forwards, "student_block_forwards": forwards,
                                 **self.evaluate(model)}
            self.save_model(model, folder, record, ["fine-tune"])

        return self.stage(folder, args.settings(*DATA, *STUDENT, *OOD, epochs=args.baseline_epochs, seed=seed),
                          make, build=True)

    def teacher_name(self) -> str:
        return self.args.teacher_model_name_or_path or f"the dense ViT teacher in {self.out / 'teacher'}"


def _prefixed(module: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    return {prefix + k: v.detach() for k, v in module.state_dict().items()}


def run_m2mkd(args: M2MArguments, progress: bool = True) -> M2MReport:
    """Run `args.phase` of the pipeline (see the module docstring); finished stages are reused."""
    run = M2MRun(args, progress)
    report = M2MReport(args=study_settings(args))
    prepare = args.phase in ("all", "prepare")
    report.teacher = run.teacher(build=prepare)
    report.meta = run.meta(report.teacher, build=prepare)
    if args.phase == "prepare":
        return report
    deps = {"teacher": report.teacher["run_id"], "meta": report.meta["run_id"]}
    indices = [args.module_index] if args.phase == "module" else range(args.num_modules)
    for seed in args.seeds:
        report.modules[seed] = [run.module(i, seed, deps, build=args.phase in ("all", "module")) for i in indices]
        if args.phase == "module":
            continue
        report.student[seed] = run.student(seed, report.modules[seed])
        if args.baseline:
            report.baseline[seed] = run.baseline(seed)
    return report


__all__ = ["M2MArguments", "PHASES", "counting_forwards", "load_stage", "run_m2mkd"]
