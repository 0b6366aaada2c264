"""Small helpers shared across the package."""
from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

# Trainer metric keys that are speed / timing figures, not scores (eval_runtime, train_samples_per_second, ...).
NOT_METRIC_SUFFIXES = ("_runtime", "_samples_per_second", "_steps_per_second", "_model_preparation_time")


def check_output_free(output_dir: str | os.PathLike, overwrite: bool) -> None:
    """Refuse a non-empty `output_dir` (or a file there) unless `overwrite`; call it before any long work."""
    out = Path(output_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise FileExistsError(f"output directory {out} exists and is not empty; pass overwrite=True "
                              "(--overwrite_output_dir) or choose another path")


@contextmanager
def atomic_output_dir(output_dir: str | os.PathLike, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces `output_dir`, on failure it is deleted."""
    out = Path(output_dir)
    check_output_free(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        for f in (tmp, *tmp.iterdir()):  # mkdtemp creates 0700: give the usual permissions
            f.chmod(0o755 if f.is_dir() else 0o644)
        old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
        if out.exists():
            out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def checkpoint_format(path: str | os.PathLike) -> str | None:
    """`safetensors` or `pickle` for a local checkpoint folder (by its weight files), None otherwise (e.g. a Hub id)."""
    folder = Path(os.path.expanduser(str(path)))
    if not folder.is_dir():
        return None
    if any(folder.glob("*.safetensors")) or (folder / "model.safetensors.index.json").is_file():
        return "safetensors"
    if any(folder.glob("*.bin")) or any(folder.glob("*.pt")) or any(folder.glob("*.pth")):
        return "pickle"
    return None


def refuse_pickle(path: str | os.PathLike, flag: str) -> None:
    """Raise a one-line error when `path` holds only pickle weights (unpickling can run arbitrary code)."""
    if checkpoint_format(path) == "pickle":
        raise ValueError(
            f"{path} holds only pickle weights (pytorch_model.bin / .pt), which are not loaded because unpickling can "
            f"run arbitrary code. Re-save it as safetensors (from_pretrained(path).save_pretrained(new_dir)) or, if "
            f"you trust the file, pass {flag}."
        )


def check_safetensors(path: str | os.PathLike) -> None:
    """Raise one line naming the file when a local folder holds a truncated or damaged `.safetensors` file (only the
    headers are read: `safe_open` checks that the header parses and that the data it declares is all there)."""
    folder = Path(os.path.expanduser(str(path)))
    if not folder.is_dir():
        return
    from safetensors import safe_open

    for file in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt"):
                pass
        except Exception as err:  # noqa: BLE001  (safetensors raises its own SafetensorError)
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise OSError(f"{file} is truncated or corrupt ({reason}); re-download the checkpoint or save it "
                          "again") from None


def check_weights(path: str | os.PathLike, allow_pickle: bool, flag: str) -> None:
    """The guard every command runs before loading weights from `path`: pickle-only folders are refused unless
    `allow_pickle` (`flag` names the option that allows them), damaged safetensors files give one line."""
    if not allow_pickle:
        refuse_pickle(path, flag)
    check_safetensors(path)


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table, columns padded to line up in a terminal; every column after the first right-aligned."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda cells: "| " + " | ".join(  # noqa: E731
        str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths))) + " |"
    rule = "|" + "|".join("-" * (w + 1) + ":" if i else "-" * (w + 2) for i, w in enumerate(widths)) + "|"
    return "\n".join([line(header), rule, *map(line, rows)])
