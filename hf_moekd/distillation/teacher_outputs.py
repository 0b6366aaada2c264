"""Offline KD: compute teacher logits once, store them as a dataset column, train without the teacher.

Full logits do not fit for language models (vocab x tokens floats per example): with `top_k` the cache keeps, per
real token, the teacher's k largest log-probs at the run's temperature (float16) and their token ids (int32): 6 k bytes
per token plus 8 bytes of Arrow list offsets, 392 bytes at k = 64 (full float32 logits: 4 x vocab, 607,744 bytes at
151,936). In training, the fused path (`fused.topk_chunk`) builds the student's gradient from this sparse support,
chunk by chunk, without a full-vocabulary buffer."""
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
TEACHER_TOPK_LOGPROBS = "teacher_topk_logprobs"
TEACHER_TOPK_INDICES = "teacher_topk_indices"
CACHED_COLUMNS = (TEACHER_LOGITS, TEACHER_TOPK_LOGPROBS, TEACHER_TOPK_INDICES)


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
    return [c for c in dataset.column_names if c in accepted and c not in {"labels", "label", *CACHED_COLUMNS}]


@torch.no_grad()
def precompute_teacher_logits(
    teacher: nn.Module,
    dataset: datasets.Dataset,
    data_collator: Callable[[list[dict]], dict] | None = None,
    batch_size: int = 64,
    cache_dir: str | Path | None = None,
    device: torch.device | str | None = None,
    write_cache: bool = True,
    top_k: int = 0,
    temperature: float = 1.0,
) -> datasets.Dataset:
    """Return `dataset` with a `teacher_logits` column (one list per example; real tokens only for token heads), or,
    with `top_k` > 0 and token-level logits (LMs), `teacher_topk_logprobs` (float16, log-softmax at `temperature`)
    and `teacher_topk_indices` (int32) of the k most likely tokens per real token.

    With `cache_dir`, the result is stored under a key of the dataset's fingerprint, the teacher's weights and the
    top-k settings, and reused on the next call. The cache is written atomically (temporary folder, then rename);
    `write_cache=False` only reads it (the other processes of a ZeRO-3 run, which compute in lockstep).
    """
    settings = f"-top{top_k}-T{temperature:g}" if top_k else ""
    key = hashlib.sha256(f"{dataset._fingerprint}-{teacher_fingerprint(teacher)}{settings}".encode()).hexdigest()[:20]
    target = Path(cache_dir, f"teacher-logits-{key}") if cache_dir is not None else None
    if target is not None and (target / "dataset_info.json").exists():
        return datasets.load_from_disk(str(target))

    device = device or next(teacher.parameters()).device
    was_training = teacher.training
    teacher.eval()
    columns = _model_columns(teacher, dataset)
    loader = DataLoader(dataset.select_columns(columns), batch_size=batch_size, collate_fn=data_collator or default_data_collator)
    rows: list[Any] = []
    top_rows: list[Any] = []
    for batch in tqdm(loader, desc="teacher logits", unit="batch"):
        batch = {k: v.to(device) for k, v in batch.items() if k in columns}
        logits = teacher(**batch).logits.float()
        if logits.dim() == 3:  # token heads: keep the real tokens only (either padding side)
            mask = batch.get("attention_mask", torch.ones(logits.shape[:2], device=logits.device)).bool()
            if top_k:
                values, indices = torch.log_softmax(logits / temperature, -1).topk(min(top_k, logits.shape[-1]), -1)
                top_rows.extend((v[m].half().cpu().numpy(), i[m].int().cpu().numpy())
                                for v, i, m in zip(values, indices, mask))
            else:
                rows.extend(row[m].cpu().tolist() for row, m in zip(logits, mask))
        else:
            rows.extend(logits.cpu().tolist())
    teacher.train(was_training)
    fingerprint = f"{dataset._fingerprint}-{key}"
    if top_rows:
        features = dataset.features.copy()
        features[TEACHER_TOPK_LOGPROBS] = datasets.Sequence(datasets.Sequence(datasets.Value("float16")))
        features[TEACHER_TOPK_INDICES] = datasets.Sequence(datasets.Sequence(datasets.Value("int32")))
        extra = datasets.Dataset.from_dict({TEACHER_TOPK_LOGPROBS: [v for v, _ in top_rows],
                                            TEACHER_TOPK_INDICES: [i for _, i in top_rows]},
                                           features=datasets.Features({k: features[k] for k in (
                                               TEACHER_TOPK_LOGPROBS, TEACHER_TOPK_INDICES)}))
        result = datasets.concatenate_datasets([dataset, extra], axis=1)
        result._fingerprint = fingerprint
    else:
        result = dataset.add_column(TEACHER_LOGITS, rows, new_fingerprint=fingerprint)
    if target is not None and write_cache:
        _save_atomically(result, target, {"teacher": getattr(getattr(teacher, "config", None), "_name_or_path", "")})
    return result


def _save_atomically(dataset: datasets.Dataset, target: Path, meta: dict[str, str]) -> None:
    """Write to a temporary folder, then rename; when a concurrent run (same key: same content) renamed its copy
    first, ours is dropped."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        dataset.save_to_disk(str(tmp))
        (tmp / "hf_moekd_teacher.json").write_text(json.dumps(meta))
        tmp.rename(target)
    except BaseException as error:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (isinstance(error, OSError) and (target / "dataset_info.json").exists()):
            raise


class TeacherLogitsCollator:
    """Wraps a collator: collates the other features with it and pads/stacks the cached teacher outputs
    (`teacher_logits`, or `teacher_topk_logprobs` / `teacher_topk_indices`) alongside. Batches without them
    (evaluation sets) pass straight to the wrapped collator."""

    def __init__(self, base: Callable[[list[dict]], dict] | None = None) -> None:
        self.base = base or default_data_collator

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        present = [c for c in CACHED_COLUMNS if any(c in f for f in features)]
        if not present:
            return self.base(features)
        cached = {c: [torch.as_tensor(f.pop(c)) for f in features] for c in present}
        batch = self.base(features)
        for column, rows in cached.items():
            dtype = torch.long if column == TEACHER_TOPK_INDICES else torch.float32
            rows = [row.to(dtype) for row in rows]
            if rows[0].dim() == 1:
                batch[column] = torch.stack(rows)
                continue
            length = batch["input_ids"].shape[1] if "input_ids" in batch else max(len(x) for x in rows)
            mask = batch.get("attention_mask")
            padded = torch.zeros(len(rows), length, rows[0].shape[-1], dtype=dtype)
            for i, row in enumerate(rows):
                positions = mask[i].bool() if mask is not None else torch.arange(length) < len(row)
                padded[i, positions] = row
            batch[column] = padded
        return batch
