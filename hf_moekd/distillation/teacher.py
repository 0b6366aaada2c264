"""Loading, freezing and checking the teacher."""
from __future__ import annotations

import torch
from torch import nn

from ..model_utils.auto import auto_class_like
from ..utils.outputs import check_weights
from ..utils.teachers import check_local_folder

def load_teacher(name_or_path: str, like: nn.Module | type | None = None, allow_pickle: bool = False,
                 **kwargs) -> nn.Module:
    """Load a teacher checkpoint with the head kind of the student `like`: safetensors only unless `allow_pickle`."""
    check_local_folder(name_or_path, "Teacher")
    check_weights(name_or_path, allow_pickle, "--allow_pickle_checkpoints true")
    kwargs.setdefault("use_safetensors", None if allow_pickle else True)
    try:
        teacher, info = auto_class_like(like).from_pretrained(name_or_path, output_loading_info=True, **kwargs)
    except OSError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise FileNotFoundError(
            f"Could not load teacher {name_or_path!r} ({first}); pass a local folder with config.json and "
            "model.safetensors, or a Hub id while online."
        ) from err
    if missing := [k for k in info.get("missing_keys", []) if not k.endswith(_NOT_LEARNED)]:
        raise ValueError(f"Teacher {name_or_path!r} has no trained weights for {', '.join(sorted(missing)[:4])}"
                         f"{' ...' if len(missing) > 4 else ''} (its task head is not in the checkpoint, so it would "
                         "be initialised at random): fine-tune it on the task first (hf-moekd distill --task ... "
                         "without a teacher) and distil from that folder.")
    return teacher


# Buffers some architectures recreate at load (not learned): never a reason to refuse a teacher.
_NOT_LEARNED = ("position_ids", "inv_freq", "num_batches_tracked")


def prepare_teacher(teacher: nn.Module, device: torch.device | str) -> nn.Module:
    """Freeze the teacher and put it in eval mode on the student's device.

    A teacher dispatched over several devices by a `device_map` (`hf_device_map`: GPUs, CPU and disk offload)
    stays where it is: accelerate's hooks move its inputs and outputs.
    """
    teacher.eval()
    teacher.requires_grad_(False)
    if len(set((getattr(teacher, "hf_device_map", None) or {}).values())) > 1:
        return teacher
    return teacher.to(device)


def _is_default_labels(id2label: dict | None) -> bool:
    return not id2label or all(str(v) == f"LABEL_{k}" for k, v in id2label.items())


def check_compatible(student: nn.Module, teacher: nn.Module) -> None:
    """Raise a clear error when teacher and student disagree on labels or vocabulary."""
    s_cfg, t_cfg = getattr(student, "config", None), getattr(teacher, "config", None)
    if s_cfg is None or t_cfg is None:
        return
    if "Classification" in type(student).__name__ and s_cfg.num_labels != t_cfg.num_labels:
        raise ValueError(
            f"The teacher has {t_cfg.num_labels} labels but the student has {s_cfg.num_labels}: distil from a teacher "
            "fine-tuned on the same task (same label set)."
        )
    s_labels, t_labels = getattr(s_cfg, "id2label", None), getattr(t_cfg, "id2label", None)
    if not (_is_default_labels(s_labels) or _is_default_labels(t_labels)) and dict(s_labels) != dict(t_labels):
        raise ValueError(
            f"Teacher labels {dict(t_labels)} differ from student labels {dict(s_labels)}: give the student the "
            "teacher's id2label/label2id."
        )
    s_vocab, t_vocab = getattr(s_cfg, "vocab_size", None), getattr(t_cfg, "vocab_size", None)
    if s_vocab is not None and t_vocab is not None and s_vocab != t_vocab:
        raise ValueError(
            f"The teacher's vocabulary has {t_vocab} tokens but the student's has {s_vocab}: student and teacher must "
            "share the tokenizer."
        )
