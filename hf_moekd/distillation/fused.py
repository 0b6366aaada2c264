"""Fused linear distillation for language models: the KD divergence (and the student's cross-entropy) computed from
the final hidden states and the `lm_head` weight, a chunk of token positions at a time, so that neither model's
`[batch, seq, vocab]` logits exist in training.

The models run as usual, except that their output head's `forward` is swapped, during the forward pass, for one that
records its input (the hidden states the head would multiply, after any scaling the model applies, e.g. T5's
`d_model ** -0.5`) and returns zero-width logits. The loss then builds `chunk x vocab` logits per chunk
(`hidden @ weight.T + bias`, soft-capped when the config has `final_logit_softcapping`), and the gradients with respect
to the student's hidden states, head weight and bias are accumulated chunk by chunk in the forward pass
(`_FusedHeadLoss`); backward only scales them. Peak memory beyond the models is a few `chunk x vocab` float32 buffers
and one float32 `[vocab, hidden]` weight-gradient buffer per active term: it grows with the hidden size and the number
of tokens, not with tokens x vocabulary.

On its first batch each model is checked once: its head then returns the real logits of the last position, which
must equal ours (catches heads with post-processing we do not know, e.g. a logit scale). Heads that are not a dense
`nn.Linear` (quantised, LoRA-wrapped, ZeRO-3 partitioned) or fail the check fall back, with one log line, to the
unfused path (the model's own full logits).
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .losses import FUSED_LM, TEACHER_TOPK, DistillationBatch, soft_divergence, topk_forward_kl

logger = logging.getLogger(__name__)

FUSED_TERMS = frozenset({"ce", "logits_kd", "router_aux", "hidden_mse", "attention_relation"})
"""Terms that work without the student's full logits (the others need them: the fused path is then off)."""
MAX_CHUNK_ELEMENTS = 1 << 24  # chunk x vocab float32 elements per buffer (64 MiB): fewer rows at large vocabularies


@dataclass
class Head:
    """An output head read as ``logits = softcap(hidden @ weight.T + bias)``; weight and bias are read live from the
    module (and the model's `final_logits_bias`, BART-style), so they follow training and device moves."""

    module: nn.Linear
    model: nn.Module
    softcap: float | None

    @property
    def weight(self) -> torch.Tensor:
        return self.module.weight

    @property
    def bias(self) -> torch.Tensor | None:
        bias, extra = self.module.bias, getattr(self.model, "final_logits_bias", None)
        if isinstance(extra, torch.Tensor) and extra.numel() == self.vocab:
            return extra.view(-1) if bias is None else bias + extra.view(-1)
        return bias

    @property
    def vocab(self) -> int:
        return self.module.weight.shape[0]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits of `hidden` (computed in the weight's dtype, as the model does)."""
        z = F.linear(hidden.to(self.weight.device, self.weight.dtype), self.weight, self.bias).float()
        return self.softcap * torch.tanh(z / self.softcap) if self.softcap else z


def dense_head(model: nn.Module) -> tuple[Head | None, str]:
    """`model`'s output head as a dense `[vocab, hidden]` weight, or None and the reason it cannot be read as one."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if head is None:
        return None, f"{type(base).__name__} has no output embeddings"
    if type(head) is not nn.Linear:
        return None, f"its output head is a {type(head).__name__}, not a plain torch.nn.Linear"
    weight = head.weight
    if not weight.is_floating_point() or weight.dim() != 2 or weight.numel() == 0 or hasattr(weight, "ds_id") \
            or weight.device.type == "meta":  # quantised, ZeRO-3 partitioned or offloaded
        return None, "its output head weight is not a dense floating-point [vocab, hidden] tensor"
    softcap = getattr(getattr(base, "config", None), "final_logit_softcapping", None)
    return Head(head, base, float(softcap) if softcap else None), ""


@contextmanager
def capture_head_input(head: nn.Module, store: dict[str, Any], check: bool) -> Iterator[None]:
    """Within the block, `head(x)` records x in `store["hidden"]` and returns zero-width logits (with `check`, the
    real logits of the last position and the dtype they were computed in, e.g. under autocast, for
    `FusedLM.verified`)."""
    def forward(x: torch.Tensor) -> torch.Tensor:
        store["hidden"] = x
        if check:
            logits = F.linear(x[..., -1:, :].to(head.weight.device), head.weight, head.bias)
            store["head_dtype"] = logits.dtype
            return logits
        return x.new_zeros(*x.shape[:-1], 0)

    previous = head.__dict__.get("forward")  # e.g. accelerate's device-map hook
    head.forward = forward
    try:
        yield
    finally:
        if previous is None:
            del head.forward
        else:
            head.forward = previous


# ---- the per-chunk divergences: (sum of weighted values, gradient wrt the student logits) -----------------------
def _forward_kl(z: torch.Tensor, zt: torch.Tensor, w: torch.Tensor, t: float) -> tuple[torch.Tensor, torch.Tensor]:
    log_q, log_p = F.log_softmax(z / t, -1), F.log_softmax(zt / t, -1)
    p = log_p.exp()
    value = ((p * (log_p - log_q)).sum(-1) * w).sum() * t**2
    return value, log_q.exp_().sub_(p).mul_(w[:, None] * t)  # T (q - p)


def _reverse_kl(z: torch.Tensor, zt: torch.Tensor, w: torch.Tensor, t: float) -> tuple[torch.Tensor, torch.Tensor]:
    log_q, log_p = F.log_softmax(z / t, -1), F.log_softmax(zt / t, -1)
    q = log_q.exp()
    d = log_q.sub_(log_p)
    kl = (q * d).sum(-1, keepdim=True)
    return (kl.squeeze(-1) * w).sum() * t**2, d.sub_(kl).mul_(q).mul_(w[:, None] * t)  # T q (log q/p - KL)


def _autograd(fn: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor, w: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.enable_grad():
        s = z.detach().requires_grad_(True)
        value = (fn(s) * w).sum()
        return value.detach(), torch.autograd.grad(value, s)[0]


def divergence_chunk(z: torch.Tensor, zt: torch.Tensor, w: torch.Tensor, t: float, divergence: str, beta: float
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """`soft_divergence` of a chunk of float32 logits, weighted and summed, and its gradient wrt `z`."""
    if divergence == "forward_kl" or (divergence == "jsd" and beta == 0):
        return _forward_kl(z, zt, w, t)
    if divergence == "reverse_kl" or (divergence == "jsd" and beta == 1):
        return _reverse_kl(z, zt, w, t)
    return _autograd(lambda s: soft_divergence(s, zt, t, divergence, beta), z, w)


def topk_chunk(z: torch.Tensor, logp: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, t: float
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """`topk_forward_kl` of a chunk, weighted and summed, with its gradient built from the teacher's sparse support:
    T * q * (P - r S) everywhere plus T * (r q - p) on the k cached tokens (q: the student's probabilities at T, p the
    teacher's cached ones, P = sum p, S = sum of q over the k tokens, r = p_rest / q_rest of the rest bucket)."""
    value = (topk_forward_kl(z, logp, idx, t) * w).sum()
    idx = idx.long()
    q = F.log_softmax(z / t, -1).exp_()
    q_k, p = q.gather(-1, idx), logp.float().exp()
    total_p, s = p.sum(-1, keepdim=True), q_k.sum(-1, keepdim=True)
    p_rest, q_rest = (1 - total_p).clamp_min(0), 1 - s
    r = torch.where((p_rest > 0) & (q_rest >= 1e-12), p_rest / q_rest.clamp_min(1e-12), torch.zeros_like(p_rest))
    scale = w[:, None] * t
    grad = q.mul_((total_p - r * s) * scale)
    return value, grad.scatter_add_(-1, idx, (r * q_k - p) * scale)


def ce_chunk(z: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy of a chunk (labels -100 ignored) and its gradient wrt `z`: softmax - one-hot."""
    valid = labels.ne(-100)
    target = labels.clamp_min(0).long()[:, None]
    log_q = F.log_softmax(z, -1)
    value = -(log_q.gather(-1, target).squeeze(-1) * valid).sum()
    grad = log_q.exp_().scatter_add_(-1, target, -torch.ones_like(target, dtype=log_q.dtype))
    return value, grad.mul_(valid[:, None])


# ---- the fused function -----------------------------------------------------------------------------------------
@dataclass
class FusedSpec:
    """What `_FusedHeadLoss` computes over the selected rows (flattened positions) of one micro-batch."""

    head: Head
    rows: torch.Tensor
    kd: Callable[[torch.Tensor, slice], tuple[torch.Tensor, torch.Tensor]] | None
    """(chunk logits, chunk slice of `rows`) -> (weighted KD sum, gradient); None: no KD term."""
    ce_labels: torch.Tensor | None
    """Labels of the rows for the student's CE; None: no CE term."""
    chunk_size: int


class _FusedHeadLoss(torch.autograd.Function):
    """[KD sum, CE sum] from hidden states and the head, chunk by chunk; the gradients wrt hidden, weight and bias of
    each active term are accumulated in the forward pass and combined with the incoming gradients in backward."""

    @staticmethod
    def forward(ctx: Any, spec: FusedSpec, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
                ) -> torch.Tensor:
        head, rows = spec.head, spec.rows
        flat = hidden.reshape(-1, hidden.shape[-1])
        h = flat.index_select(0, rows)
        active = [spec.kd is not None, spec.ce_labels is not None]
        needs = ctx.needs_input_grad[1:4]
        grads = [[torch.zeros_like(h, dtype=torch.float32) if needs[0] else None,
                  torch.zeros_like(weight, dtype=torch.float32) if needs[1] else None,
                  torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if needs[2] else None]
                 if on else None for on in active]
        totals = torch.zeros(2, dtype=torch.float32, device=hidden.device)
        rows_per_chunk = max(1, min(spec.chunk_size, MAX_CHUNK_ELEMENTS // head.vocab))
        for start in range(0, len(rows), rows_per_chunk):
            part = slice(start, start + rows_per_chunk)
            h_c = h[part]
            z = F.linear(h_c.to(weight.dtype), weight, bias).float()
            if head.softcap:
                z = head.softcap * torch.tanh(z / head.softcap)
            for k, on in enumerate(active):
                if not on:
                    continue
                value, g = spec.kd(z, part) if k == 0 else ce_chunk(z, spec.ce_labels[part])
                totals[k] += value
                if not any(needs):
                    continue
                if head.softcap:
                    g = g.mul_(1 - (z / head.softcap) ** 2)
                g_h, g_w, g_b = grads[k]
                if g_h is not None:
                    g_h[part] = g @ weight.float()
                if g_w is not None:
                    g_w.addmm_(g.t(), h_c.float())
                if g_b is not None:
                    g_b += g.sum(0)
        ctx.rows, ctx.shape, ctx.dtypes = rows, hidden.shape, (hidden.dtype, weight.dtype)
        ctx.grads = grads
        return totals

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple:
        out: list[torch.Tensor | None] = [None, None, None]
        for k, parts in enumerate(ctx.grads):
            if parts is None:
                continue
            for i, g in enumerate(parts):
                if g is not None:
                    out[i] = g * grad_output[k] if out[i] is None else out[i].add_(g * grad_output[k])
        ctx.grads = None
        if out[0] is not None:
            full = out[0].new_zeros(ctx.shape.numel() // ctx.shape[-1], ctx.shape[-1])
            full.index_copy_(0, ctx.rows, out[0])
            out[0] = full.to(ctx.dtypes[0]).view(ctx.shape)
        if out[1] is not None:
            out[1] = out[1].to(ctx.dtypes[1])
        if out[2] is not None:
            out[2] = out[2].to(ctx.dtypes[1])
        return (None, out[0], out[1], out[2])


def fused_head_sums(spec: FusedSpec, hidden: torch.Tensor) -> torch.Tensor:
    """[weighted KD sum, CE sum] over `spec.rows` of `hidden` (`[..., hidden]`) through `spec.head`, differentiable
    wrt `hidden` and the head's weight and bias, without the full logits."""
    return _FusedHeadLoss.apply(spec, hidden, spec.head.weight, spec.head.bias)


# ---- trainer integration ----------------------------------------------------------------------------------------
class FusedLM:
    """A trainer's fused LM distillation: the student's (and, when it can be read, the teacher's) dense head.

    `FusedLM.build(trainer)` returns None, with one log line saying why, where the fused path does not apply."""

    def __init__(self, student: Head, teacher: Head | None, kd_term: Any | None, ce: bool, chunk_size: int) -> None:
        self.heads: dict[str, Head | None] = {"student": student, "teacher": teacher}
        self.checked: set[str] = set()
        self.kd_term, self.kd, self.ce, self.chunk_size, self.enabled = kd_term, kd_term is not None, ce, chunk_size, True
        """`kd_term`: the run's `logits_kd` term, whose settings (temperature, divergence, beta) the fused KD uses."""

    @classmethod
    def build(cls, trainer: Any) -> "FusedLM | None":
        args, terms = trainer.args, trainer.loss_terms
        if not getattr(args, "fused_lm_kd", True) or trainer.label_alignment not in ("shift", "decoder"):
            return None
        kd, ce = ("logits_kd" in terms, "ce" in terms)
        if not (kd or ce):
            return None
        other = sorted(name for name, term in terms.items() if type(term).name not in FUSED_TERMS or name != type(term).name)
        head, reason = dense_head(trainer._unwrapped_student())
        if other:
            reason = f"loss terms {', '.join(other)} may read the student's full logits"
        elif trainer.is_fsdp_enabled:
            reason = "FSDP shards the output head"
        if head is None or reason:
            logger.warning(f"Fused LM distillation is off ({reason}): the full [batch, seq, vocab] logits are computed.")
            return None
        teacher = None
        if trainer.teacher is not None and trainer.teacher_engine is None and kd:
            teacher, why = dense_head(trainer.teacher)
            if teacher is None:
                logger.warning(f"Fused LM distillation: the teacher's full logits are computed ({why}); the student's "
                               "head is fused.")
        kd_term = terms["logits_kd"] if kd else None
        return cls(head, teacher, kd_term, ce, kd_term.chunk_size if kd_term is not None else args.kd_chunk_size)

    def start(self) -> "FusedBatch | None":
        """The state of one training micro-batch, or None once the fused path was turned off."""
        return FusedBatch(self) if self.enabled else None


def _tolerance(*dtypes: torch.dtype | None) -> float:
    """Relative tolerance of the head check: a few units in the last place of the lowest precision the model's head
    ran in (bf16 autocast rounds each logit to 8 significant bits; the fused loss itself runs in float32)."""
    return 4 * max(torch.finfo(d).eps for d in dtypes if d is not None and d.is_floating_point)


class FusedBatch:
    """One micro-batch: captures the heads' inputs during the forward passes, then serves the `ce` and `logits_kd`
    terms from one fused pass (`DistillationBatch.extras[FUSED_LM]`)."""

    def __init__(self, owner: FusedLM) -> None:
        self.owner = owner
        self.stores: dict[str, dict[str, Any]] = {"student": {}, "teacher": {}}
        self.sums: torch.Tensor | None = None
        self.counts: tuple[str, str] = ("item", "item")

    @property
    def vocab(self) -> int:
        return self.owner.heads["student"].vocab

    def capture(self, role: str) -> Any:
        """Context around the `role` model's forward pass (a no-op for a teacher whose head is not fused)."""
        head = self.owner.heads[role]
        if head is None:
            from contextlib import nullcontext

            return nullcontext()
        return capture_head_input(head.module, self.stores[role], check=role not in self.owner.checked)

    def verified(self, student_out: Any, teacher_out: Any) -> bool:
        """On a model's first batch: its head's last-position logits equal ours. False (after one log line and
        turning the failing part off) means: compute this batch again."""
        for role, out in (("student", student_out), ("teacher", teacher_out)):
            head = self.owner.heads[role]
            if head is None or role in self.owner.checked or out is None:
                continue
            hidden, theirs = self.stores[role].get("hidden"), getattr(out, "logits", None)
            ok = hidden is not None and theirs is not None and theirs.shape[-1] == head.vocab
            if ok:
                with torch.no_grad():
                    tol = _tolerance(theirs.dtype, head.weight.dtype, self.stores[role].get("head_dtype"))
                    ours = head.logits(hidden[..., -1:, :]).to(theirs.device)
                    theirs = theirs.float()
                    ok = ours.shape == theirs.shape and torch.allclose(ours, theirs, rtol=max(1e-3, tol),
                                                                       atol=max(1e-4, tol) * (1 + theirs.abs().max().item()))
            self.owner.checked.add(role)
            if not ok:
                why = "its logits are not softcap(hidden @ lm_head.weight.T + bias)"
                if role == "student":
                    self.owner.enabled = False
                    logger.warning(f"Fused LM distillation is off ({why}): the full [batch, seq, vocab] logits are "
                                   "computed.")
                else:
                    self.owner.heads["teacher"] = None
                    logger.warning(f"Fused LM distillation: the teacher's full logits are computed ({why}).")
                return False
        return True

    # ---- the terms -------------------------------------------------------------------------------------------
    def kd(self, batch: DistillationBatch) -> torch.Tensor:
        sums = self._sums(batch)
        return batch.per_item(sums[0]) if self.counts[0] == "item" else batch.per_example(sums[0])

    def ce(self, batch: DistillationBatch) -> torch.Tensor:
        return batch.per_item(self._sums(batch)[1])

    def _sums(self, batch: DistillationBatch) -> torch.Tensor:
        if self.sums is None:
            self.sums = fused_head_sums(self._spec(batch), self.stores["student"]["hidden"])
        return self.sums

    def _spec(self, batch: DistillationBatch) -> FusedSpec:
        owner = self.owner
        hidden, labels = self.stores["student"]["hidden"], batch.labels
        positions = hidden.shape[:-1]
        shape = (*positions, self.vocab)
        if labels is not None and labels.shape != positions:
            raise ValueError(f"labels of shape {tuple(labels.shape)} do not match logits of shape {shape}.")
        if owner.ce and labels is None:
            raise ValueError("Loss term 'ce' needs labels; for label-free distillation set alpha=1.0.")
        if labels is not None:
            weights = labels.ne(-100).float()
        else:  # no labels: KD averaged over each example's real tokens
            mask = batch.token_mask(hidden).float()
            weights = mask / mask.sum(1, keepdim=True).clamp_min(1)
            self.counts = ("example", "item")
        rows = weights.reshape(-1).nonzero().squeeze(-1)
        kd = self._kd_of_rows(batch, rows, weights.reshape(-1), shape) if owner.kd else None
        ce_labels = labels.reshape(-1)[rows] if owner.ce else None
        return FusedSpec(owner.heads["student"], rows, kd, ce_labels, owner.chunk_size)

    def _kd_of_rows(self, batch: DistillationBatch, rows: torch.Tensor, weights: torch.Tensor, shape: tuple
                    ) -> Callable[[torch.Tensor, slice], tuple[torch.Tensor, torch.Tensor]]:
        term = self.owner.kd_term
        t, divergence, beta = term.temperature, term.divergence, term.beta
        w = weights[rows]
        if TEACHER_TOPK in batch.extras:
            if divergence != "forward_kl":
                raise ValueError("cached top-k teacher log-probs support kd_divergence='forward_kl' only: set "
                                 "teacher_logits_top_k=0 to cache full logits for reverse_kl / jsd")
            logprobs, indices = batch.extras[TEACHER_TOPK]
            if logprobs.shape[:-1] != shape[:-1]:
                raise ValueError(f"cached top-k teacher log-probs {tuple(logprobs.shape)} do not fit the student "
                                 f"logits {shape}")
            logp = logprobs.reshape(-1, logprobs.shape[-1])[rows]
            idx = indices.reshape(-1, indices.shape[-1])[rows]
            return lambda z, part: topk_chunk(z, logp[part], idx[part], w[part], t)
        teacher_logits, teacher_hidden = batch.teacher_logits, self.stores["teacher"].get("hidden")
        if teacher_logits is not None and tuple(teacher_logits.shape) == shape:  # cached or unfused teacher logits
            flat = teacher_logits.reshape(-1, shape[-1])
            teacher = lambda part: flat[rows[part]].to(flat.device).float()  # noqa: E731
        elif teacher_hidden is not None:
            head = self.owner.heads["teacher"]
            if tuple(teacher_hidden.shape[:-1]) != shape[:-1] or head.vocab != shape[-1]:
                raise ValueError(f"Student logits {shape} and teacher logits {(*teacher_hidden.shape[:-1], head.vocab)}"
                                 " differ in shape.")
            flat = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])
            teacher_rows = rows.to(flat.device)
            teacher = lambda part: head.logits(flat[teacher_rows[part]])  # noqa: E731
        elif teacher_logits is None:
            raise ValueError("logits_kd: the teacher returned no logits; load it with the task head of the student "
                             "(e.g. AutoModelForCausalLM / AutoModelForSeq2SeqLM), not a bare AutoModel.")
        else:
            raise ValueError(f"Student logits {shape} and teacher logits {tuple(teacher_logits.shape)} differ in shape.")
        return lambda z, part: divergence_chunk(z, teacher(part).to(z.device), w[part], t, divergence, beta)
