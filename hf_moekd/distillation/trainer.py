"""`DistillationTrainer`: a `transformers.Trainer` that distils a frozen teacher into the student."""
from __future__ import annotations

from collections import defaultdict
from contextlib import ExitStack
from typing import Any

import os

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import Trainer
from transformers.integrations import is_deepspeed_zero3_enabled

from ..cards import RunFacts, write_model_card
from ..model_utils.auto import label_alignment, shift_labels
from ..integrations.peft import is_peft_model, merge_peft, remove_stale_files, warn_if_baseless, wrap_student
from .arguments import DistillationArguments
from .card import training_facts
from .engines import SideOptimizer, place_teacher
from .fused import FusedLM
from .losses import FUSED_LM, TEACHER_TOPK, DistillationBatch, LossTerm, batch_size, get_loss_class
from .teacher import check_compatible, load_teacher, prepare_teacher
from .teacher_outputs import (
    CACHED_COLUMNS,
    TEACHER_LOGITS,
    TEACHER_TOPK_INDICES,
    TEACHER_TOPK_LOGPROBS,
    TeacherLogitsCollator,
    precompute_teacher_logits,
)


LOSS_TERMS_FILE = "loss_terms.safetensors"
LOSS_TERMS_OPTIMIZER_FILE = "loss_terms_optimizer.safetensors"  # DeepSpeed runs: the loss terms' own optimizer
Counts = torch.Tensor  # [labelled items, examples] of one optimizer step, summed over all processes


def _top_k_settings(args: DistillationArguments, model: nn.Module | None) -> dict[str, Any]:
    """Language models cache the teacher's top-k log-probs (`teacher_logits_top_k`) instead of full logits."""
    lm = model is not None and label_alignment(model) in ("shift", "decoder")
    return {"top_k": args.teacher_logits_top_k, "temperature": args.temperature} if lm else {}


def _as_list(value: str | list[str] | None) -> list[str]:
    return [value] if isinstance(value, str) else list(value or [])


class DistillationTrainer(Trainer):
    """Trainer whose training loss is a weighted sum of registered distillation terms.

    Args:
        model: the student.
        args: `DistillationArguments`.
        teacher_model: the teacher; loaded from `args.teacher_model_name_or_path` when None. May stay None when
            the training set carries precomputed `teacher_logits` (see `precompute_teacher_logits`).
        loss_terms: extra term instances ``{name: (weight, term)}``, for terms that need constructor arguments.
        **kwargs: the usual `Trainer` arguments (train_dataset, processing_class, data_collator, ...).

    The loss of a micro-batch is normalised by the number of labelled items (or examples) of the whole
    optimizer step across all processes, so gradient accumulation and multi-process training give the
    gradients of one large batch. Evaluation reports the student's own loss and never runs the teacher.
    """

    loss_is_scaled_for_ga = True

    def __init__(
        self,
        model: nn.Module | None = None,
        args: DistillationArguments | None = None,
        teacher_model: nn.Module | None = None,
        loss_terms: dict[str, tuple[float, LossTerm]] | None = None,
        **kwargs: Any,
    ) -> None:
        if not isinstance(args, DistillationArguments):
            raise TypeError("DistillationTrainer needs `args=DistillationArguments(...)`.")
        zero3 = is_deepspeed_zero3_enabled()  # from_pretrained then loads the teacher partitioned (zero.Init)
        if teacher_model is None and args.teacher_model_name_or_path:
            teacher_model = load_teacher(args.teacher_model_name_or_path, like=model,
                                         allow_pickle=args.allow_pickle_checkpoints, **args.teacher_load_kwargs())
        elif teacher_model is not None and args.teacher_device_map:
            raise ValueError("teacher_device_map applies to a teacher loaded from teacher_model_name_or_path; load the "
                             "teacher object with from_pretrained(..., device_map=...) yourself instead.")
        if teacher_model is not None:
            check_compatible(model, teacher_model)
            train = kwargs.get("train_dataset")
            if args.teacher_logits_cache and train is not None and not self._has_cached_logits(train) and not zero3:
                with args.main_process_first(desc="teacher logits"):
                    kwargs["train_dataset"] = precompute_teacher_logits(
                        prepare_teacher(teacher_model, args.device), train, kwargs.get("data_collator"),
                        batch_size=args.per_device_eval_batch_size, cache_dir=args.teacher_logits_cache,
                        device=args.device, **_top_k_settings(args, model),
                    )
        if model is not None:
            model = wrap_student(model, args.peft_config)  # after the teacher: it is loaded like the bare student
        super().__init__(model=model, args=args, **kwargs)
        warn_if_baseless(self.model, args.merge_adapters)
        if args.merge_adapters and is_peft_model(self.model) and (self.is_deepspeed_enabled or self.is_fsdp_enabled):
            raise ValueError("merge_adapters does not work with DeepSpeed/FSDP (sharded weights): save the adapter, "
                             "then merge it with hf_moekd.integrations.peft.merge_peft after loading.")
        # We count items ourselves (see get_batch_samples); evaluation then gets local means.
        self.model_accepts_loss_kwargs = False
        # DDP / ZeRO-1/2: a replica per process; ZeRO-3: a partitioned DeepSpeed inference engine (engines.py)
        self.teacher, self.teacher_engine = (place_teacher(teacher_model, self.accelerator, self.args.device)
                                             if teacher_model is not None else (None, None))
        if self.teacher_engine is not None and args.teacher_logits_cache and self.train_dataset is not None \
                and not self._has_cached_logits(self.train_dataset):  # all processes run the partitioned teacher
            with torch.random.fork_rng(devices=[]):  # its DataLoader draws a seed: keep the seeded stream intact
                self.train_dataset = precompute_teacher_logits(
                    self.teacher, self.train_dataset, kwargs.get("data_collator"),
                    batch_size=args.per_device_eval_batch_size, cache_dir=args.teacher_logits_cache,
                    device=self.args.device, write_cache=self.is_world_process_zero(),
                    **_top_k_settings(args, self.model),
                )
        self.label_alignment = label_alignment(self.model)  # causal LMs: labels shifted as ForCausalLMLoss
        self.loss_terms = self._build_terms(loss_terms or {}).to(self.args.device)
        extra = [p for p in self.loss_terms.parameters() if p.requires_grad]
        # DeepSpeed optimises only its engine's module: the loss terms' parameters get an optimizer of their own
        self.side_optimizer = (SideOptimizer(extra, self.args, self.accelerator.mixed_precision)
                               if extra and self.is_deepspeed_enabled else None)
        self._check_teacher_source()
        self.fused_lm = FusedLM.build(self)  # LMs: KD and CE from hidden states and the head, no full logits
        if self._has_cached_logits(self.train_dataset) and not isinstance(self.data_collator, TeacherLogitsCollator):
            self.data_collator = TeacherLogitsCollator(self.data_collator)
        self._term_sums: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros((), device=self.args.device))
        self._term_steps = 0
        self.model_card_facts: RunFacts | None = None  # what the model card says; None: worked out from this trainer

    # ---- set-up ---------------------------------------------------------------------------------
    def _build_terms(self, given: dict[str, tuple[float, LossTerm]]) -> nn.ModuleDict:
        terms, self.loss_weights = nn.ModuleDict(), {}
        for name, (weight, options) in self.args.loss_term_specs().items():
            terms[name] = get_loss_class(name).from_args(self.args, self.model, self.teacher, **options)
            self.loss_weights[name] = weight
        aux_coef = getattr(getattr(self.model, "config", None), "router_aux_loss_coef", 0.0) or 0.0
        if aux_coef and "router_aux" not in terms:  # MoE students keep their load-balancing loss
            terms["router_aux"] = get_loss_class("router_aux").from_args(self.args, self.model, self.teacher)
            self.loss_weights["router_aux"] = aux_coef
        for name, (weight, term) in given.items():
            terms[name], self.loss_weights[name] = term, weight
        return terms

    @staticmethod
    def _has_cached_logits(dataset: Any) -> bool:
        return any(c in (getattr(dataset, "column_names", None) or []) for c in CACHED_COLUMNS)

    def _check_teacher_source(self) -> None:
        if self.teacher is not None:
            return
        for name, term in self.loss_terms.items():
            if term.needs_teacher_forward or (term.needs_teacher and not self._has_cached_logits(self.train_dataset)):
                raise ValueError(
                    f"Loss term {name!r} needs a teacher: pass teacher_model=..., set --teacher_model_name_or_path, "
                    f"or add a '{TEACHER_LOGITS}' column with hf_moekd.distillation.precompute_teacher_logits."
                )

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        self._signature_columns += [c for c in CACHED_COLUMNS if c not in self._signature_columns]

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        optimizer = super().create_optimizer(model)
        extra = [p for p in self.loss_terms.parameters() if p.requires_grad]
        if extra and self.side_optimizer is None:  # e.g. hidden-state projections: trained with the student, not saved
            self.optimizer.add_param_group({"params": extra, "weight_decay": 0.0})
        return optimizer

    # ---- counting -------------------------------------------------------------------------------
    def get_batch_samples(self, epoch_iterator: Any, num_batches: int, device: torch.device) -> tuple[list, Counts | None]:
        batch_samples, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
        if not batch_samples:
            return batch_samples, None
        # A new optimizer step begins: the Trainer zeroes only the model's gradients, so clear the loss terms' too.
        for param in self.loss_terms.parameters():
            param.grad = None
        self._term_steps += 1
        counts = torch.zeros(2, dtype=torch.float64, device=device)
        for batch in batch_samples:
            labels = batch.get("labels")
            if labels is not None:
                counts[0] += self._aligned_labels(labels).ne(-100).sum().item()
            counts[1] += batch_size(batch)
        if self.accelerator.num_processes > 1:
            counts = self.accelerator.gather(counts).view(-1, 2).sum(0)
        return batch_samples, counts

    # ---- the loss -------------------------------------------------------------------------------
    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Counts | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        given, inputs = inputs, dict(inputs)
        cached_logits = inputs.pop(TEACHER_LOGITS, None)
        topk = (inputs.pop(TEACHER_TOPK_LOGPROBS), inputs.pop(TEACHER_TOPK_INDICES)) \
            if TEACHER_TOPK_LOGPROBS in inputs else None
        cached = cached_logits is not None or topk is not None
        if not model.training:  # evaluation: the student's own loss; the teacher is not run
            outputs = model(**inputs)
            return (outputs.loss, outputs) if return_outputs else outputs.loss

        labels = inputs.pop("labels", None)
        if labels is not None and self.label_alignment == "decoder" and "decoder_input_ids" not in inputs:
            inputs["decoder_input_ids"] = self._unwrapped_student().prepare_decoder_input_ids_from_labels(labels=labels)
        labels = None if labels is None else self._aligned_labels(labels)
        terms = self.loss_terms
        hidden = {"output_hidden_states": True} if any(t.needs_hidden_states for t in terms.values()) else {}
        fused = self.fused_lm.start() if self.fused_lm is not None else None
        with ExitStack() as stack:
            for term in terms.values():
                stack.enter_context(term.capture("student", model))
            if fused is not None:
                stack.enter_context(fused.capture("student"))
            student_out = model(**inputs, **hidden)

        teacher_out = None
        if any(t.needs_teacher_forward or (t.needs_teacher and not cached) for t in terms.values()):
            if self.teacher is None:
                raise ValueError(f"This batch has no '{TEACHER_LOGITS}' and the trainer has no teacher.")
            with torch.no_grad(), ExitStack() as stack:
                for term in terms.values():
                    stack.enter_context(term.capture("teacher", self.teacher))
                if fused is not None:
                    stack.enter_context(fused.capture("teacher"))
                teacher_out = self.teacher(**inputs, **hidden)
        if fused is not None and not fused.verified(student_out, teacher_out):  # a head we cannot fuse: again, unfused
            return self.compute_loss(model, given, return_outputs, num_items_in_batch)

        is_global = isinstance(num_items_in_batch, torch.Tensor) and num_items_in_batch.shape == (2,)
        if is_global:
            n_items, n_examples = num_items_in_batch.float()
        else:  # called outside the training loop: this micro-batch alone
            n_items = labels.ne(-100).sum().float() if labels is not None else torch.zeros(())
            n_examples = torch.tensor(float(batch_size(inputs)))
        batch = DistillationBatch(
            inputs=inputs,
            labels=labels,
            student=student_out,
            teacher=teacher_out,
            teacher_logits=cached_logits if cached_logits is not None else getattr(teacher_out, "logits", None),
            n_items=n_items,
            n_examples=n_examples,
            scale=float(self.accelerator.num_processes) if is_global else 1.0,
            extras={**({TEACHER_TOPK: topk} if topk is not None else {}), **({FUSED_LM: fused} if fused is not None else {})},
        )
        loss = torch.zeros((), device=self.args.device)
        values = {}
        for name, term in terms.items():
            if term.needs_labels and labels is None:
                raise ValueError(f"Loss term {name!r} needs labels; for label-free distillation set alpha=1.0.")
            values[name] = value = term(batch)
            loss = loss + self.loss_weights[name] * value
        if self.args.stop_on_nonfinite_loss and self._any_nonfinite(loss):
            self._raise_nonfinite(values)
        for name, value in values.items():
            self._term_sums[name] += value.detach()
        return (loss, student_out) if return_outputs else loss

    def _aligned_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """The labels each logit position is scored against: shifted for causal LMs."""
        return shift_labels(labels) if self.label_alignment == "shift" else labels

    def _unwrapped_student(self) -> nn.Module:
        model = self.accelerator.unwrap_model(self.model)
        return model.get_base_model() if is_peft_model(model) else model

    def _any_nonfinite(self, loss: torch.Tensor) -> bool:
        """True on every process when the loss is NaN/inf on any process (so that all of them stop together)."""
        bad = (~torch.isfinite(loss.detach())).float()
        if self.accelerator.num_processes > 1:
            torch.distributed.all_reduce(bad)
        return bool(bad.item())

    def _raise_nonfinite(self, values: dict[str, torch.Tensor]) -> None:
        bad = {name: v.item() for name, v in values.items() if not torch.isfinite(v.detach())}
        names = ", ".join(f"{name}={value}" for name, value in bad.items()) or "a term on another process"
        raise FloatingPointError(
            f"non-finite loss at step {self.state.global_step + 1} (epoch {self.state.epoch or 0:.2f}): {names}. Training "
            "stopped before this step's optimizer update, so no NaN weights were written; the last checkpoint is intact. "
            "Lower the learning rate or the term's weight, use fp32 instead of fp16, or check the inputs of this batch "
            "(set stop_on_nonfinite_loss=False to skip this check)."
        )

    def training_step(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None) -> torch.Tensor:
        # DeepSpeed steps (and schedules) inside backward: read the learning rate of this step before it
        side_step = self.side_optimizer is not None and self.accelerator.sync_gradients
        lr = self._get_learning_rate() if side_step else 0.0
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.accelerator.num_processes > 1:  # loss-term parameters live outside DDP/DeepSpeed: average their gradients
            for param in self.loss_terms.parameters():
                if param.grad is not None:
                    torch.distributed.all_reduce(param.grad)
                    param.grad /= self.accelerator.num_processes
        if side_step:
            self.side_optimizer.step(lr, skip=self.accelerator.optimizer_step_was_skipped)
        return loss

    # ---- checkpoints: the loss terms' own parameters (e.g. hidden-state projections) --------------
    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        state = {k: v.detach().contiguous().cpu() for k, v in self.loss_terms.state_dict().items()}
        if state and self.args.should_save:
            save_file(state, os.path.join(output_dir, LOSS_TERMS_FILE), metadata={"format": "pt"})
        if self.side_optimizer is not None and self.args.should_save:
            save_file(self.side_optimizer.state_tensors(), os.path.join(output_dir, LOSS_TERMS_OPTIMIZER_FILE))

    def _check_loss_term_state(self, checkpoint: str) -> str | None:
        """The loss-term state file of `checkpoint` (None when the terms have no parameters); refuse if it, or under
        DeepSpeed the terms' optimizer state, is missing."""
        if not self.loss_terms.state_dict():
            return None
        terms = ", ".join(sorted({k.split(".")[0] for k in self.loss_terms.state_dict()}))
        path = os.path.join(checkpoint, LOSS_TERMS_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{checkpoint} has no {LOSS_TERMS_FILE}: the loss terms' parameters ({terms}) would restart from "
                "scratch. Resume from a checkpoint written by DistillationTrainer, or start a new run."
            )
        if self.side_optimizer is not None and not os.path.isfile(os.path.join(checkpoint, LOSS_TERMS_OPTIMIZER_FILE)):
            raise FileNotFoundError(
                f"{checkpoint} has no {LOSS_TERMS_OPTIMIZER_FILE}, the optimizer state of the loss terms' parameters "
                f"({terms}) under DeepSpeed: it was not written by a DeepSpeed run. Resume it without DeepSpeed (as it "
                "was trained), or start a new run."
            )
        return path

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        self._check_loss_term_state(resume_from_checkpoint)  # fail before any weights are loaded
        super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        # Runs on every resume path (DeepSpeed included, which skips `_load_from_checkpoint`).
        path = self._check_loss_term_state(checkpoint) if checkpoint is not None else None
        super()._load_optimizer_and_scheduler(checkpoint)
        if path is not None:
            self.loss_terms.load_state_dict(load_file(path))  # copied onto the terms' device
        if path is not None and self.side_optimizer is not None:
            self.side_optimizer.load_state_tensors(load_file(os.path.join(checkpoint, LOSS_TERMS_OPTIMIZER_FILE)))

    # ---- saving: peft students save their adapter, or the merged model with merge_adapters ----------
    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Save the student. A peft student saves its adapter (adapter_config.json + adapter_model.safetensors); with
        `merge_adapters`, the final model (not training checkpoints) is saved as a stock checkpoint with the adapters
        merged into the weights (merged on a copy: the trainer keeps its adapters)."""
        output_dir = output_dir or self.args.output_dir
        if not is_peft_model(self.model):
            return super().save_model(output_dir, _internal_call)
        final = not _internal_call or os.path.abspath(output_dir) == os.path.abspath(self.args.output_dir)
        merge = self.args.merge_adapters and final
        if self.args.should_save:
            remove_stale_files(output_dir, self.model, merged=merge)
        if not (merge and self.args.should_save):
            return super().save_model(output_dir, _internal_call)
        peft_model, self.model = self.model, merge_peft(self.model)
        try:
            super().save_model(output_dir, _internal_call)
        finally:
            self.model = peft_model

    # ---- model card (also what push_to_hub uploads) ---------------------------------------------
    def create_model_card(self, language: str | None = None, license: str | None = None,
                          tags: str | list[str] | None = None, model_name: str | None = None,
                          finetuned_from: str | None = None, dataset_tags: str | list[str] | None = None,
                          **_: Any) -> None:
        """Write hf_moekd's model card to output_dir/README.md in place of transformers' generic one.

        The facts are `self.model_card_facts` (set by the recipe, e.g. `hf_moekd.recipes.common.save_run`) or worked out from this trainer;
        the arguments add Hub metadata (`finetuned_from` -> base_model, `dataset_tags` -> datasets); the
        Trainer's other arguments (tasks, dataset, dataset_args) are not used.
        """
        if not self.is_world_process_zero():
            return
        facts = (self.model_card_facts or training_facts(self)).to_dict()
        facts["tags"] = list(dict.fromkeys([*facts["tags"], *_as_list(tags)]))
        for key, value in {"language": language, "license": license, "base_model": _as_list(finetuned_from),
                           "datasets": _as_list(dataset_tags)}.items():
            facts[key] = value or facts[key]
        config = None  # an adapter folder has no config.json: the card describes the base model's
        if is_peft_model(self.model) and not os.path.isfile(os.path.join(self.args.output_dir, "config.json")):
            base = self.model.get_base_model()
            config = {**base.config.to_dict(), "architectures": [type(base).__name__]}
        write_model_card(self.args.output_dir, RunFacts.from_dict(facts), model_id=self.hub_model_id or model_name,
                         config=config)

    # ---- logging --------------------------------------------------------------------------------
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._term_steps:
            for name, total in sorted(self._term_sums.items()):
                value = self.accelerator.gather(total.reshape(1)).mean().item() if self.accelerator.num_processes > 1 else total.item()
                logs[f"loss_{name}"] = round(value / self._term_steps, 6)
            self._term_sums.clear()
            self._term_steps = 0
        super().log(logs, start_time)
