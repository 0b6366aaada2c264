"""Where the teacher lives under each distributed engine.

- DDP, DeepSpeed ZeRO-1/2: a frozen replica on every process's device (`prepare_teacher`).
- DeepSpeed ZeRO-3: a DeepSpeed inference engine whose parameters are partitioned across the processes
  (gathered layer by layer during its forward); it has no optimizer.
- A teacher loaded with a `device_map` (accelerate big-model dispatch / offload) stays where it was placed.

Also: `SideOptimizer` (the loss terms' own parameters under DeepSpeed), `gathered` (read ZeRO-3 weights),
`full_weights_load` (model surgery under ZeRO-3) and `ensure_deepspeed_comm` (zero.Init on CPU).
"""
from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import Any, Iterable, Iterator

import torch
from torch import nn

from .teacher import prepare_teacher

# ZeRO-3 sizes that DeepSpeed configs leave as "auto" and the Trainer fills from the *student's* hidden size.
_HIDDEN_SIZE_KEYS = {
    "reduce_bucket_size": lambda h: h * h,
    "stage3_prefetch_bucket_size": lambda h: int(0.9 * h * h),
    "stage3_param_persistence_threshold": lambda h: 10 * h,
}


def is_zero3(accelerator: Any) -> bool:
    """True when `accelerator` (a Trainer's) runs DeepSpeed ZeRO stage 3."""
    plugin = getattr(getattr(accelerator, "state", None), "deepspeed_plugin", None)
    return plugin is not None and int(deepspeed_config(plugin).get("zero_optimization", {}).get("stage", 0)) == 3


def ensure_deepspeed_comm() -> None:
    """Let `deepspeed.zero.Init` (transformers' from_pretrained under ZeRO-3) see all processes.

    On GPUs accelerate starts `deepspeed.comm`; on CPU it starts only torch.distributed (gloo), and zero.Init
    would then take the run for one process. DeepSpeed reuses the existing process group.
    """
    if not torch.distributed.is_initialized():
        return
    import deepspeed
    from deepspeed import comm

    if not comm.is_initialized():
        deepspeed.init_distributed(dist_backend=torch.distributed.get_backend(), auto_mpi_discovery=False)


def deepspeed_config(plugin: Any) -> dict:
    """The DeepSpeed config dict of an accelerate `DeepSpeedPlugin` (already filled by the Trainer)."""
    hf_config = getattr(plugin, "hf_ds_config", None)
    return hf_config.config if hf_config is not None else plugin.deepspeed_config


def hidden_size(model: nn.Module) -> int | None:
    """The widest hidden size named in `model.config` (None when it names none)."""
    config = getattr(model, "config", None)
    config = getattr(config, "text_config", None) or config
    sizes = getattr(config, "hidden_sizes", None) or [getattr(config, "hidden_size", None)]
    sizes = [s for s in sizes if isinstance(s, int)]
    return max(sizes) if sizes else None


def teacher_zero3_config(train_config: dict, teacher_hidden: int | None) -> dict:
    """The ZeRO-3 inference config of the teacher: the training config without optimizer and scheduler.

    The hidden-size based "auto" sizes are filled from the teacher's own hidden size (as the Trainer fills the
    student's); parameter offload (`offload_param`) is kept, optimizer offload is dropped (no optimizer).
    """
    config = copy.deepcopy(train_config)
    for key in ("optimizer", "scheduler", "zero_allow_untested_optimizer"):
        config.pop(key, None)
    zero = config.setdefault("zero_optimization", {})
    zero.pop("offload_optimizer", None)
    for key, size in _HIDDEN_SIZE_KEYS.items():
        if zero.get(key) == "auto":
            if teacher_hidden is None:  # DeepSpeed's own default
                del zero[key]
            else:
                zero[key] = size(teacher_hidden)
    left = sorted(_auto_keys(config))
    if left:
        raise ValueError(
            f"The DeepSpeed config still has 'auto' values for the teacher engine: {', '.join(left)}. Create the "
            "DistillationTrainer with the same DistillationArguments(deepspeed=...) (the Trainer fills them), or "
            "replace them with numbers."
        )
    return config


def _auto_keys(config: dict, prefix: str = "") -> Iterator[str]:
    for key, value in config.items():
        if isinstance(value, dict):
            yield from _auto_keys(value, f"{prefix}{key}.")
        elif value == "auto":
            yield f"{prefix}{key}"


def place_teacher(teacher: nn.Module, accelerator: Any, device: torch.device | str) -> tuple[nn.Module, Any | None]:
    """Freeze `teacher` and place it for the trainer's engine: ``(module to call, DeepSpeed engine or None)``.

    Under ZeRO-3 the returned module is `engine.module`: call it as usual inside `torch.no_grad()` (its
    parameters are gathered per layer by the engine's hooks, on every process at the same time).
    """
    if not is_zero3(accelerator):
        return prepare_teacher(teacher, device), None
    if getattr(teacher, "hf_device_map", None):
        raise ValueError("A teacher loaded with a device_map cannot be partitioned by ZeRO-3: load it without "
                         "teacher_device_map (ZeRO-3 already spreads it over the processes).")
    import deepspeed

    teacher.eval()
    teacher.requires_grad_(False)
    config = teacher_zero3_config(deepspeed_config(accelerator.state.deepspeed_plugin), hidden_size(teacher))
    engine, *_ = deepspeed.initialize(model=teacher, config=config)
    engine.module.eval()
    return engine.module, engine


def is_partitioned(param: torch.Tensor) -> bool:
    """True for a ZeRO-3 parameter whose full value is not held by this process right now."""
    status = getattr(param, "ds_status", None)
    return status is not None and status.name == "NOT_AVAILABLE"


@contextmanager
def gathered(params: Iterable[torch.Tensor], modifier_rank: int | None = None) -> Iterator[None]:
    """Make the full values of ZeRO-3 `params` available inside the block (a no-op for ordinary tensors).

    Collective under ZeRO-3: every process must enter it with the same parameters.
    """
    zero_params = [p for p in params if hasattr(p, "ds_id")]
    if not zero_params:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(zero_params, modifier_rank=modifier_rank):
        yield


class SideOptimizer:
    """AdamW for the loss terms' own parameters (e.g. hidden-state projections) under DeepSpeed.

    DeepSpeed's optimizer only holds the parameters of the module its engine wraps (under ZeRO-3 it cannot hold
    any other), so these get their own: same betas/eps, no weight decay, the Trainer's learning rate of each step.
    Refuses DeepSpeed fp16 (`mixed_precision="fp16"`): only DeepSpeed's own optimizer unscales its loss scaling.
    """

    def __init__(self, params: list[nn.Parameter], args: Any, mixed_precision: str = "no") -> None:
        if mixed_precision == "fp16":
            raise ValueError("DeepSpeed fp16 scales the loss (loss scaling) and only unscales the gradients of its "
                             "own optimizer, so the loss terms' own parameters (e.g. hidden-state projections) would "
                             "train on scaled gradients: use bf16 (--bf16 true, or \"bf16\" in the DeepSpeed config) "
                             "or fp32, or drop the loss terms with parameters.")
        self.optimizer = torch.optim.AdamW(params, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                           eps=args.adam_epsilon, weight_decay=0.0)

    def step(self, lr: float, skip: bool = False) -> None:
        """One update with learning rate `lr` (none when the model's step was `skip`ped), then clear the gradients."""
        if not skip:
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The optimizer state as flat tensors ``{"<param index>.<name>": tensor}`` (safetensors can store it)."""
        return {f"{index}.{name}": torch.as_tensor(value).detach().to("cpu", copy=True).contiguous()
                for index, state in self.optimizer.state_dict()["state"].items() for name, value in state.items()}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        state: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            index, _, name = key.partition(".")
            state.setdefault(int(index), {})[name] = value
        self.optimizer.load_state_dict({"state": state, "param_groups": self.optimizer.state_dict()["param_groups"]})


@contextmanager
def full_weights_load() -> Iterator[None]:
    """Inside, `from_pretrained` / `from_config` build full models even under ZeRO-3 (no zero.Init).

    For model surgery (student layers copied from a teacher, MoE or MPO conversion), which needs real weights;
    DeepSpeed partitions the result when its engine starts. Outside ZeRO-3 a no-op.
    """
    from transformers.integrations import deepspeed as hf_deepspeed

    ref = hf_deepspeed._hf_deepspeed_config_weak_ref
    config = ref() if ref is not None else None
    if config is None:
        yield
        return
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed.set_hf_deepspeed_config(config)
