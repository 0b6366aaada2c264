"""How a model was made: `RunFacts`, recorded in the run's all_results.json under "model_card"."""
from __future__ import annotations

import re
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from ..utils.teachers import MINILM, MINILM_HUB_ID, minilm_path
from .registry import check_methods

KNOWN_LICENSES = {MINILM_HUB_ID: "apache-2.0"}
FASHION_MNIST_HUB_ID = "zalando-datasets/fashion_mnist"  # metadata only: the pipeline reads Debian's IDX files
MOE_KEYS = ("num_experts", "num_local_experts", "num_ffn_experts", "n_routed_experts")
_HUB_CACHE = re.compile(r"/models--([\w.-]+)/snapshots/")


@dataclass
class RunFacts:
    """What a model card says about the run behind a model (JSON-serialisable)."""

    methods: list[str]
    teacher: str | None = None  # Hub id, absolute local path, or a description
    student_init: str | None = None  # checkpoint the weights started from; None: random initialisation
    data: str | None = None  # the training data, in words
    datasets: list[str] = field(default_factory=list)  # Hub dataset ids
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    base_model: list[str] = field(default_factory=list)  # Hub model ids the weights derive from
    license: str | None = None
    language: str | None = None
    tags: list[str] = field(default_factory=list)  # Hub tags besides the methods' own
    device: str | None = None
    versions: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_methods(self.methods)
        if bad := [b for b in self.base_model if not is_repo_id(b)]:
            raise ValueError(f"base_model must list Hub model ids, got {bad}; leave local paths out")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunFacts:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def is_repo_id(name: str) -> bool:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def hub_id(name_or_path: str) -> str | None:
    """The Hub model id behind a model name or folder; None for a local folder that is not a Hub cache snapshot."""
    if name_or_path == MINILM:
        return MINILM_HUB_ID
    path = Path(name_or_path).expanduser()
    if not path.exists():
        return name_or_path if is_repo_id(name_or_path) else None
    path = path.resolve()
    if match := _HUB_CACHE.search(f"{path.as_posix()}/"):
        return match[1].replace("--", "/")
    try:
        return MINILM_HUB_ID if path == minilm_path().resolve() else None
    except FileNotFoundError:
        return None


def license_of(name_or_path: str) -> str | None:
    """A known Hub model's license, or the one in a local model folder's README.md front matter."""
    if (repo := hub_id(name_or_path)) in KNOWN_LICENSES:
        return KNOWN_LICENSES[repo]
    readme = Path(name_or_path).expanduser() / "README.md"
    if not readme.is_file():
        return None
    from huggingface_hub import ModelCard

    try:
        return ModelCard.load(readme, ignore_metadata_errors=True).data.license
    except Exception:  # noqa: BLE001  (someone else's README: no license then)
        return None


def describe_data(names: Sequence[str]) -> tuple[str | None, list[str]]:
    """Words and Hub dataset ids for data names: GLUE tasks, `conll2003`/`conll`, `digits`, `fashion_mnist`."""
    from ..data.text import CONLL_HUB_ID, GLUE_HUB_ID, GLUE_TASKS

    words, ids = [], []
    for name in names:
        if name in GLUE_TASKS:
            words.append(f"GLUE {GLUE_TASKS[name].folder}")
            ids.append(GLUE_HUB_ID)
        elif name in ("conll", "conll2003"):
            words.append("CoNLL-2003 (English NER)")
            ids.append(CONLL_HUB_ID)
        elif name == "fashion_mnist":
            words.append("Fashion-MNIST")
            ids.append(FASHION_MNIST_HUB_ID)
        elif name == "digits":
            words.append("scikit-learn digits (8x8 images of the digits 0-9)")
        else:
            words.append(name)
    return (", ".join(words) or None), list(dict.fromkeys(ids))


def is_moe(config: dict[str, Any]) -> bool:
    return any(isinstance(config.get(k), int) and config[k] > 1 for k in MOE_KEYS)


def versions() -> dict[str, str]:
    import torch
    import transformers

    # the root package is loaded before any of its modules; importing it here would import every layer above cards
    package = sys.modules[__name__.partition(".")[0]]
    return {"hf_moekd": package.__version__, "transformers": transformers.__version__, "torch": torch.__version__}


def _absolute(name_or_path: str | None) -> str | None:
    """Local paths made absolute (they stay meaningful from another working directory); other names as given."""
    if not name_or_path or not Path(name_or_path).expanduser().exists():
        return name_or_path or None
    return str(Path(name_or_path).expanduser().resolve())


def run_facts(methods: Sequence[str], *, teacher: str | None = None, student_init: str | None = None,
              data: Sequence[str] = (), data_text: str | None = None, hyperparameters: dict[str, Any] | None = None,
              tags: Sequence[str] = (), device: str | None = None) -> RunFacts:
    """RunFacts with base_model and license worked out from the teacher and the initial weights.

    `data` are names for `describe_data`; `data_text` replaces their description."""
    sources = [s for s in (teacher, student_init) if s]
    licenses = {lic for s in sources if (lic := license_of(s))}
    words, dataset_ids = describe_data(data)
    return RunFacts(
        methods=list(methods), teacher=_absolute(teacher), student_init=_absolute(student_init),
        data=data_text or words, datasets=dataset_ids, hyperparameters=dict(hyperparameters or {}),
        base_model=list(dict.fromkeys(i for s in sources if (i := hub_id(s)))),
        license=licenses.pop() if len(licenses) == 1 else None, tags=list(tags), device=device, versions=versions(),
    )
