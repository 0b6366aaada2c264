"""Offline KD: compute teacher logits once, store them as a dataset column, train without the teacher."""
from __future__ import annotations

import hashlib
import inspect
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import datasets
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import default_data_collator

from .engines import gathered

TEACHER_LOGITS = "teacher_logits"


def teacher_fingerprint(teacher: nn.Module) -> str:
    """Hash of the teacher's config and weights (changes when either changes).

    ZeRO-3 partitioned weights are gathered one at a time (collective: all processes must call this together).
    """
    digest = hashlib.sha256()
    config = getattr(teacher, "config", None)
    digest.update((config.to_json_string() if config is not None else type(teacher).__name__).encode())
    params = dict(teacher.named_parameters(remove_duplicate=False))
    for name, tensor in sorted(teacher.state_dict().items()):
        param = params.get(name)
        with gathered([param] if param is not None else []):
            full = param.data if param is not None and hasattr(param, "ds_id") else tensor
            digest.update(name.encode())
            digest.update(full.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def _model_columns(teacher: nn.Module, dataset: datasets.Dataset) -> list[str]:
    accepted = set(inspect.signature(teacher.forward).parameters)
    return [c for c in dataset.column_names if c in accepted and c not in {"labels", "label"}]


@torch.no_grad()
def precompute_teacher_logits(
    teacher: nn.Module,
    dataset: datasets.Dataset,
    data_collator: Callable[[list[dict]], dict] | None = None,
    batch_size: int = 64,
    cache_dir: str | Path | None = None,
    device: torch.device | str | None = None,
    write_cache: bool = True,
) -> datasets.Dataset:
    """Return `dataset` with a `teacher_logits` column (one list per example; real tokens only for token heads).

    With `cache_dir`, the result is stored under a key of the dataset's fingerprint and the teacher's
    weights, and reused on the next call. The cache is written atomically (temporary folder, then rename);
    `write_cache=False` only reads it (the other processes of a ZeRO-3 run, which compute in lockstep).
    """
    key = hashlib.sha256(f"{dataset._fingerprint}-{teacher_fingerprint(teacher)}".encode()).hexdigest()[:20]
    target = Path(cache_dir, f"teacher-logits-{key}") if cache_dir is not None else None
    if target is not None and (target / "dataset_info.json").exists():
        return datasets.load_from_disk(str(target))

    device = device or next(teacher.parameters()).device
    was_training = teacher.training
    teacher.eval()
    columns = _model_columns(teacher, dataset)
    loader = DataLoader(dataset.select_columns(columns), batch_size=batch_size, collate_fn=data_collator or default_data_collator)
    rows: list[Any] = []
    for batch in tqdm(loader, desc="teacher logits", unit="batch"):
        batch = {k: v.to(device) for k, v in batch.items() if k in columns}
        logits = teacher(**batch).logits.float().cpu()
        if logits.dim() == 3:  # token heads: keep the real tokens only (either padding side)
            mask = batch.get("attention_mask", torch.ones(logits.shape[:2])).bool().cpu()
            rows.extend(row[m].tolist() for row, m in zip(logits, mask))
        else:
            rows.extend(logits.tolist())
    teacher.train(was_training)
    result = dataset.add_column(TEACHER_LOGITS, rows, new_fingerprint=f"{dataset._fingerprint}-{key}")
    if target is not None and write_cache:
        _save_atomically(result, target, {"teacher": getattr(getattr(teacher, "config", None), "_name_or_path", "")})
    return result


def _save_atomically(dataset: datasets.Dataset, target: Path, meta: dict[str, str]) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        dataset.save_to_disk(str(tmp))
        (tmp / "hf_moekd_teacher.json").write_text(json.dumps(meta))
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class TeacherLogitsCollator:
    """Wraps a collator: collates the other features with it and pads/stacks `teacher_logits` alongside.
    Batches without `teacher_logits` (evaluation sets) pass straight to the wrapped collator."""

    def __init__(self, base: Callable[[list[dict]], dict] | None = None) -> None:
        self.base = base or default_data_collator

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        if not any(TEACHER_LOGITS in f for f in features):
            return self.base(features)
        logits = [torch.as_tensor(f.pop(TEACHER_LOGITS), dtype=torch.float32) for f in features]
        batch = self.base(features)
        if logits[0].dim() == 1:
            batch[TEACHER_LOGITS] = torch.stack(logits)
            return batch
        length = batch["input_ids"].shape[1] if "input_ids" in batch else max(len(x) for x in logits)
        mask = batch.get("attention_mask")
        padded = torch.zeros(len(logits), length, logits[0].shape[-1])
        for i, row in enumerate(logits):
            positions = mask[i].bool() if mask is not None else torch.arange(length) < len(row)
            padded[i, positions] = row
        batch[TEACHER_LOGITS] = padded
        return batch
