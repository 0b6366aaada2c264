"""Pluggable distillation loss terms and their registry.

A term is an `nn.Module` (so it may own parameters, e.g. a projection) that turns a `DistillationBatch`
into a scalar. Terms return *sums* normalised by the batch's global counts (`per_item` / `per_example`),
which makes the loss exact under gradient accumulation and data parallelism: the gradient of a
global batch does not depend on how it is split into micro-batches or processes.

Add a term from any module::

    @register_loss("my_term")
    class MyTerm(LossTerm):
        def __init__(self, student=None, teacher=None, scale: float = 1.0): ...
        def forward(self, batch): return batch.per_example(...)

and enable it with ``DistillationArguments(extra_loss_terms=["my_term=0.1,scale=2"])``. A term takes its settings as
explicit constructor parameters; `LossTerm.from_args` reads those listed in `arguments` (parameter ->
`DistillationArguments` field) from the run's arguments, which is how `DistillationTrainer` builds its terms. A package makes its terms
known without being imported first through the ``hf_moekd.loss_terms`` entry-point group::

    [project.entry-points."hf_moekd.loss_terms"]
    my_term = "my_package.losses:MyTerm"
"""
from __future__ import annotations

import inspect
import math
from contextlib import nullcontext
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, Callable, ClassVar, ContextManager

import torch
import torch.nn.functional as F
from torch import nn

from ..model_utils.capture import capture_block_output, capture_qkv, find_blocks

LOSS_REGISTRY: dict[str, type["LossTerm"]] = {}
LOSS_TERMS_GROUP = "hf_moekd.loss_terms"  # entry points: name -> "module:LossTermClass"
TEACHER_TOPK = "teacher_topk"  # DistillationBatch.extras: (log-probs [B, L, k], indices [B, L, k]) from a cache
FUSED_LM = "fused_lm"  # DistillationBatch.extras: fused.FusedBatch, the LM terms from hidden states and the head


def register_loss(name: str) -> Callable[[type["LossTerm"]], type["LossTerm"]]:
    """Class decorator: make a `LossTerm` available under `name`."""
    def decorator(cls: type[LossTerm]) -> type[LossTerm]:
        if name in LOSS_REGISTRY and LOSS_REGISTRY[name] is not cls:
            raise ValueError(f"A loss term named {name!r} is already registered ({LOSS_REGISTRY[name].__name__}).")
        cls.name = name
        LOSS_REGISTRY[name] = cls
        return cls
    return decorator


def get_loss_class(name: str) -> type["LossTerm"]:
    """The registered term class called `name`."""
    if name not in LOSS_REGISTRY:
        points = {point.name: point for point in entry_points(group=LOSS_TERMS_GROUP)}
        if name not in points:
            raise ValueError(f"Unknown loss term {name!r}; known terms: {sorted({*LOSS_REGISTRY, *points})}.")
        cls = points[name].load()
        if LOSS_REGISTRY.get(name) is not cls:
            register_loss(name)(cls)
    return LOSS_REGISTRY[name]


@dataclass
class DistillationBatch:
    """Everything a loss term may read for one micro-batch."""

    inputs: dict[str, Any]
    labels: torch.Tensor | None
    student: Any
    teacher: Any | None
    teacher_logits: torch.Tensor | None
    n_items: torch.Tensor
    """Labelled items (examples, or tokens whose label is not -100) in the whole optimizer step, all processes."""
    n_examples: torch.Tensor
    """Examples in the whole optimizer step, all processes."""
    scale: float = 1.0
    """Number of data-parallel processes (their gradients are averaged, so sums are scaled back up)."""
    extras: dict[str, Any] = field(default_factory=dict)

    def per_item(self, total: torch.Tensor) -> torch.Tensor:
        return total * self.scale / self.n_items.clamp_min(1)

    def per_example(self, total: torch.Tensor) -> torch.Tensor:
        return total * self.scale / self.n_examples.clamp_min(1)

    def token_mask(self, hidden: torch.Tensor) -> torch.Tensor:
        """Boolean [batch, seq] mask of real tokens for a [batch, seq, dim] tensor."""
        mask = self.inputs.get("attention_mask")
        if mask is None or mask.shape != hidden.shape[:2]:
            return torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
        return mask.bool()


def batch_size(batch: dict[str, Any]) -> int:
    """Number of examples in a batch dict: the first dimension of its first non-scalar tensor."""
    for value in batch.values():
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return value.shape[0]
    raise ValueError("Cannot tell the batch size: the batch holds no tensor.")


class LossTerm(nn.Module):
    """Base class of loss terms. Subclasses set the class flags and implement `forward`."""

    name: ClassVar[str] = ""
    needs_teacher: ClassVar[bool] = True
    """Needs teacher logits (from a teacher forward or a precomputed cache)."""
    needs_teacher_forward: ClassVar[bool] = False
    """Needs teacher internals, so a teacher forward even when logits are cached."""
    needs_hidden_states: ClassVar[bool] = False
    needs_labels: ClassVar[bool] = False
    arguments: ClassVar[dict[str, str]] = {}
    """Constructor parameter -> the `DistillationArguments` field `from_args` reads it from."""
    card_settings: ClassVar[tuple[str, ...]] = ()
    """`DistillationArguments` fields recorded in the model card when the term is used."""
    card_method: ClassVar[str | None] = None
    """The registered card method (section) a model trained with this term gets, e.g. "mode"."""

    def __init__(self, student: nn.Module | None = None, teacher: nn.Module | None = None) -> None:
        super().__init__()

    @classmethod
    def from_args(cls, args: Any, student: nn.Module | None, teacher: nn.Module | None, **options: Any) -> LossTerm:
        """The term of a `DistillationTrainer` run: the parameters in `arguments` read from `args`, `options` (from
        'name=weight,option=value' entries) as given; one clear line for an option the term does not take."""
        accepted = [k for k in inspect.signature(cls.__init__).parameters if k not in ("self", "student", "teacher")]
        if accepted[:1] == ["args"]:
            raise TypeError(f"loss term {cls.name!r} takes the arguments object; a LossTerm's __init__ takes (student, "
                            "teacher, *, its settings), and `arguments` names the DistillationArguments fields to pass.")
        if unknown := [k for k in options if k not in accepted]:
            raise ValueError(f"loss term {cls.name!r} takes no option {', '.join(map(repr, unknown))}; its options: "
                             f"{', '.join(accepted) or 'none'}.")
        settings = {param: getattr(args, field) for param, field in cls.arguments.items()}
        return cls(student, teacher, **{**settings, **options})

    def capture(self, role: str, model: nn.Module) -> ContextManager:
        """Context entered around the `role` ('student' or 'teacher') forward pass; hooks go here."""
        return nullcontext()

    def forward(self, batch: DistillationBatch) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


def is_regression(logits: torch.Tensor) -> bool:
    """Transformers' heads with a single output are regression heads."""
    return logits.shape[-1] == 1


def _label_mask(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    if labels.shape != logits.shape[:-1]:
        raise ValueError(f"labels of shape {tuple(labels.shape)} do not match logits of shape {tuple(logits.shape)}.")
    return labels.ne(-100)


DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")


def soft_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
                    divergence: str = "forward_kl", beta: float = 0.5) -> torch.Tensor:
    """Divergence between the temperature-softened distributions over the last axis, times T^2, unreduced.

    "forward_kl": KL(teacher || student); "reverse_kl": KL(student || teacher); "jsd": the generalised
    Jensen-Shannon divergence of trl's GKD, beta * KL(teacher || M) + (1 - beta) * KL(student || M) with
    M = beta * teacher + (1 - beta) * student (beta 0 and 1 give the two KLs). trl's GKD loss omits the T^2 factor.
    """
    log_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    if divergence == "forward_kl" or (divergence == "jsd" and beta == 0):
        value = (log_t.exp() * (log_t - log_s)).sum(-1)
    elif divergence == "reverse_kl" or (divergence == "jsd" and beta == 1):
        value = (log_s.exp() * (log_s - log_t)).sum(-1)
    elif divergence == "jsd":
        log_m = torch.logsumexp(torch.stack([log_s + math.log(1 - beta), log_t + math.log(beta)]), dim=0)
        value = beta * (log_t.exp() * (log_t - log_m)).sum(-1) + (1 - beta) * (log_s.exp() * (log_s - log_m)).sum(-1)
    else:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}.")
    return value * temperature**2


def chunked_divergence_sum(student_logits: torch.Tensor, teacher_logits: torch.Tensor, weights: torch.Tensor,
                           temperature: float, divergence: str = "forward_kl", beta: float = 0.5,
                           chunk_size: int = 128) -> torch.Tensor:
    """sum_p weights[p] * soft_divergence at every position p of [..., vocab] logits, `chunk_size` positions at a
    time. The gradient with respect to the student logits is computed chunk by chunk in the forward pass into one
    buffer of the logits' size and dtype (the gradient the logits get anyway), so float32 softmax copies exist for
    one chunk at a time, never for the whole [batch, seq, vocab]."""
    def divergence_of(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return soft_divergence(s, t, temperature, divergence, beta)

    return _ChunkedSum.apply(divergence_of, student_logits, weights.detach(), chunk_size, teacher_logits.detach())


def topk_forward_kl(student_logits: torch.Tensor, teacher_logprobs: torch.Tensor, teacher_indices: torch.Tensor,
                    temperature: float) -> torch.Tensor:
    """KL(teacher || student) * T^2 from the teacher's top-k log-probs (at temperature T) plus one "rest" bucket
    holding the teacher's and the student's remaining probability mass; exact when k is the vocabulary size."""
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    q_k = log_q.gather(-1, teacher_indices.long())
    log_p = teacher_logprobs.float()
    p_rest = (1 - log_p.exp().sum(-1)).clamp_min(0)
    q_rest = (1 - q_k.exp().sum(-1)).clamp_min(1e-12)
    rest = torch.where(p_rest > 0, p_rest * (p_rest.clamp_min(1e-12).log() - q_rest.log()), torch.zeros_like(p_rest))
    return ((log_p.exp() * (log_p - q_k)).sum(-1) + rest) * temperature**2


def chunked_topk_kl_sum(student_logits: torch.Tensor, teacher_logprobs: torch.Tensor, teacher_indices: torch.Tensor,
                        weights: torch.Tensor, temperature: float, chunk_size: int = 128) -> torch.Tensor:
    """`topk_forward_kl` summed with `weights`, chunked over positions as `chunked_divergence_sum`."""
    def divergence_of(s: torch.Tensor, logp: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return topk_forward_kl(s, logp, idx, temperature)

    return _ChunkedSum.apply(divergence_of, student_logits, weights.detach(), chunk_size, teacher_logprobs.detach(),
                             teacher_indices)


class _ChunkedSum(torch.autograd.Function):
    """sum_p weights[p] * fn(student[p], *teacher[p]) over flattened positions, chunk by chunk, with the gradient
    with respect to `student` built in the forward pass (no graph over the whole logits is kept)."""

    @staticmethod
    def forward(ctx: Any, fn: Callable, student: torch.Tensor, weights: torch.Tensor, chunk_size: int,
                *teacher: torch.Tensor) -> torch.Tensor:
        vocab = student.shape[-1]
        flat_s, flat_w = student.reshape(-1, vocab), weights.reshape(-1)
        flat_t = [t.reshape(flat_s.shape[0], -1) for t in teacher]
        needs_grad = ctx.needs_input_grad[1]
        grad = torch.zeros_like(flat_s) if needs_grad else None
        total = torch.zeros((), dtype=torch.float32, device=student.device)
        for start in range(0, flat_s.shape[0], chunk_size):
            part = slice(start, start + chunk_size)
            if not bool(flat_w[part].any()):
                continue
            with torch.enable_grad():
                s = flat_s[part].detach().requires_grad_(needs_grad)
                value = (fn(s, *(t[part] for t in flat_t)) * flat_w[part]).sum()
                if needs_grad:
                    grad[part] = torch.autograd.grad(value, s)[0]
            total += value.detach()
        ctx.save_for_backward(grad.view_as(student) if needs_grad else None)
        return total

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple:
        (grad,) = ctx.saved_tensors
        if grad is not None and not bool(grad_output == 1):
            grad = grad * grad_output
        return (None, grad, None, None, *([None] * (len(ctx.needs_input_grad) - 4)))


@register_loss("ce")
class HardLabelLoss(LossTerm):
    """Cross-entropy with the labels (MSE for regression heads), -100 positions ignored."""

    needs_teacher = False
    needs_labels = True

    def forward(self, batch: DistillationBatch) -> torch.Tensor:
        if FUSED_LM in batch.extras:  # language models: from the hidden states and the head, chunk by chunk
            return batch.extras[FUSED_LM].ce(batch)
        logits, labels = batch.student.logits, batch.labels
        mask = _label_mask(logits, labels)
        if is_regression(logits):
            total = ((logits.squeeze(-1).float() - labels.float()) ** 2 * mask).sum()
        else:
            total = F.cross_entropy(logits.flatten(0, -2).float(), labels.flatten().long(), ignore_index=-100, reduction="sum")
        return batch.per_item(total)


@register_loss("router_aux")
class RouterAuxLoss(LossTerm):
    """The student's own MoE load-balancing loss (`outputs.aux_loss`, a per-batch mean), 0 for dense students.

    Enabled automatically with weight `config.router_aux_loss_coef` when the student's config has one.
    """

    needs_teacher = False

    def forward(self, batch: DistillationBatch) -> torch.Tensor:
        aux = getattr(batch.student, "aux_loss", None)
        if aux is None:
            return batch.student.logits.new_zeros(())
        return batch.per_example(aux * batch_size(batch.inputs))


@register_loss("logits_kd")
class LogitsKD(LossTerm):
    """KL(teacher/T || student/T) * T^2 per labelled item (MSE to the teacher's prediction for regression); with
    `kd_divergence` reverse KL or trl's generalised JSD (`jsd_beta`) instead. Token-level logits (LMs, NER) are
    processed `kd_chunk_size` positions at a time.

    Without labels it is averaged over each example's real tokens (token heads) and summed per example.

    Args:
        temperature, divergence, beta, chunk_size: `DistillationArguments`' temperature, kd_divergence, jsd_beta and
            kd_chunk_size (read by `from_args`).
        per: "item" (default) as above; "logit" also divides by the number of classes, the DeiT / official m2mKD
            scale (`KL summed / outputs.numel()`), e.g. ``extra_loss_terms=["logits_kd=0.5,per=logit"]``.
    """

    arguments = {"temperature": "temperature", "divergence": "kd_divergence", "beta": "jsd_beta",
                 "chunk_size": "kd_chunk_size"}
    card_settings = ("temperature", "kd_divergence", "jsd_beta")

    def __init__(self, student: nn.Module | None = None, teacher: nn.Module | None = None, *, temperature: float = 2.0,
                 divergence: str = "forward_kl", beta: float = 0.5, chunk_size: int = 128, per: str = "item") -> None:
        super().__init__()
        if per not in ("item", "logit"):
            raise ValueError(f"logits_kd option per must be 'item' or 'logit', got {per!r}.")
        if divergence not in DIVERGENCES:
            raise ValueError(f"logits_kd divergence must be one of {DIVERGENCES}, got {divergence!r}.")
        self.temperature, self.divergence, self.beta, self.chunk_size, self.per = (temperature, divergence, beta,
                                                                                   chunk_size, per)

    def forward(self, batch: DistillationBatch) -> torch.Tensor:
        fused = batch.extras.get(FUSED_LM)
        vocab = fused.vocab if fused is not None else batch.student.logits.shape[-1]
        return self._per_item(batch) / (vocab if self.per == "logit" else 1)

    def _per_item(self, batch: DistillationBatch) -> torch.Tensor:
        if FUSED_LM in batch.extras:  # language models: from the hidden states and the heads, chunk by chunk
            return batch.extras[FUSED_LM].kd(batch)
        if TEACHER_TOPK in batch.extras:
            return self._per_item_topk(batch)
        student, teacher = batch.student.logits, batch.teacher_logits
        if teacher is None:
            raise ValueError("logits_kd: the teacher returned no logits; load it with the task head of the student "
                             "(e.g. AutoModelForCausalLM / AutoModelForSeq2SeqLM), not a bare AutoModel.")
        if student.shape != teacher.shape:
            raise ValueError(f"Student logits {tuple(student.shape)} and teacher logits {tuple(teacher.shape)} differ in shape.")
        options = dict(temperature=self.temperature, divergence=self.divergence, beta=self.beta)
        if student.dim() == 3 and not is_regression(student):  # token-level heads, LMs: chunked over positions
            chunk = self.chunk_size
            if batch.labels is not None:
                weights = _label_mask(student, batch.labels).float()
                return batch.per_item(chunked_divergence_sum(student, teacher, weights, **options, chunk_size=chunk))
            mask = batch.token_mask(student).float()  # no labels: mean over each example's real tokens
            weights = mask / mask.sum(1, keepdim=True).clamp_min(1)
            return batch.per_example(chunked_divergence_sum(student, teacher, weights, **options, chunk_size=chunk))
        if is_regression(student):
            per_position = (student.float() - teacher.float()).squeeze(-1) ** 2
        else:
            per_position = soft_divergence(student, teacher, **options)
        if batch.labels is not None:
            return batch.per_item((per_position * _label_mask(student, batch.labels)).sum())
        if per_position.dim() == 2:  # token-level regression heads: mean over real tokens
            mask = batch.token_mask(student).float()
            per_position = (per_position * mask).sum(1) / mask.sum(1).clamp_min(1)
        return batch.per_example(per_position.sum())


    def _per_item_topk(self, batch: DistillationBatch) -> torch.Tensor:
        """KD from cached top-k teacher log-probs (`teacher_logits_top_k`): forward KL on the k tokens plus a rest
        bucket, per labelled position (or per real token, averaged per example, without labels)."""
        if self.divergence != "forward_kl":
            raise ValueError("cached top-k teacher log-probs support kd_divergence='forward_kl' only: set "
                             "teacher_logits_top_k=0 to cache full logits for reverse_kl / jsd")
        logprobs, indices = batch.extras[TEACHER_TOPK]
        student = batch.student.logits
        if logprobs.shape[:-1] != student.shape[:-1]:
            raise ValueError(f"cached top-k teacher log-probs {tuple(logprobs.shape)} do not fit the student logits "
                             f"{tuple(student.shape)}")
        if batch.labels is not None:
            weights = _label_mask(student, batch.labels).float()
            return batch.per_item(chunked_topk_kl_sum(student, logprobs, indices, weights, self.temperature,
                                                      self.chunk_size))
        mask = batch.token_mask(student).float()
        weights = mask / mask.sum(1, keepdim=True).clamp_min(1)
        return batch.per_example(chunked_topk_kl_sum(student, logprobs, indices, weights, self.temperature,
                                                     self.chunk_size))


def uniform_layer_map(student_layers: int, teacher_layers: int) -> dict[int, int]:
    """Student block i -> teacher block round(i * L_t / L_s), for i in 1..L_s (0 is the embedding output)."""
    return {i: round(i * teacher_layers / student_layers) for i in range(1, student_layers + 1)}


@register_loss("hidden_mse")
class HiddenStateMSE(LossTerm):
    """MSE between mapped hidden states, through a learned linear projection when widths differ.

    Per example: mean over real tokens and features, averaged over the mapped layer pairs.
    """

    needs_teacher_forward = True
    needs_hidden_states = True
    card_settings = ("hidden_layer_map",)

    def __init__(self, student: nn.Module | None = None, teacher: nn.Module | None = None, *,
                 layer_map: dict[int, int] | None = None) -> None:
        """`layer_map`: student -> teacher hidden-state index (`DistillationArguments.hidden_layer_map`); None:
        `uniform_layer_map`."""
        super().__init__()
        if student is None or teacher is None:
            raise ValueError("hidden_mse needs a teacher model (teacher hidden states cannot come from a logits cache).")
        n_student, n_teacher = len(find_blocks(student)), len(find_blocks(teacher))
        self.layer_map = ({int(s): int(t) for s, t in layer_map.items()} if layer_map
                          else uniform_layer_map(n_student, n_teacher))
        for s, t in self.layer_map.items():
            if not (0 <= s <= n_student and 0 <= t <= n_teacher):
                raise ValueError(
                    f"hidden_layer_map entry {s}->{t} is out of range: the student has hidden states 0..{n_student}, "
                    f"the teacher 0..{n_teacher}."
                )
        d_student, d_teacher = student.config.hidden_size, teacher.config.hidden_size
        self.projections = nn.ModuleDict(
            {str(s): nn.Linear(d_student, d_teacher) for s in self.layer_map} if d_student != d_teacher else {}
        )

    @classmethod
    def from_args(cls, args: Any, student: nn.Module | None, teacher: nn.Module | None, **options: Any) -> LossTerm:
        return super().from_args(args, student, teacher, **{"layer_map": args.parsed_layer_map(), **options})

    def forward(self, batch: DistillationBatch) -> torch.Tensor:
        total = 0.0
        for s, t in self.layer_map.items():
            hs = batch.student.hidden_states[s]
            ht = batch.teacher.hidden_states[t].to(hs.device)  # a device-mapped teacher may end elsewhere
            if str(s) in self.projections:  # fp32 projection; DeepSpeed bf16/fp16 students give half-precision states
                projection = self.projections[str(s)]
                hs = projection(hs.to(projection.weight.dtype))
            if hs.shape != ht.shape:
                raise ValueError(f"Hidden states {s}->{t} differ in shape: {tuple(hs.shape)} vs {tuple(ht.shape)}.")
            mask = batch.token_mask(hs).float()
            per_token = ((hs.float() - ht.float()) ** 2).mean(-1)
            total = total + ((per_token * mask).sum(1) / mask.sum(1).clamp_min(1)).sum()
        return batch.per_example(total / len(self.layer_map))


def relation_log_probs(x: torch.Tensor, heads: int, key_mask: torch.Tensor) -> torch.Tensor:
    """MiniLMv2 relation: log softmax(x_h x_h^T / sqrt(d_h)) over keys, per relation head -> [B, heads, L, L]."""
    batch, length, width = x.shape
    if width % heads:
        raise ValueError(f"relation_heads={heads} does not divide the projection width {width}; pick a divisor.")
    xh = x.float().view(batch, length, heads, width // heads).transpose(1, 2)
    scores = xh @ xh.transpose(-1, -2) / math.sqrt(width // heads)
    scores = scores.masked_fill(~key_mask[:, None, None, :], torch.finfo(scores.dtype).min)
    return F.log_softmax(scores, dim=-1)


@register_loss("attention_relation")
class AttentionRelationKD(LossTerm):
    """MiniLMv2 self-attention relation distillation: KL of Q-Q, K-K, V-V relations, averaged over the three.

    The teacher's relations come from the Q/K/V projections of block `relation_teacher_layer`. The student's come
    from `relation_student_source`: "final_hidden" (default, the official MiniMoE student, models/moebert_minilm.py)
    applies Q/K/V linears of this term (hidden -> hidden, trained with the student, not saved in it) to the hidden
    states block `relation_student_layer` returns, so every block of the student, its last FFN included, gets a
    gradient; "block" reads the Q/K/V projections of that student block itself (MiniLMv2's form; the block's own
    FFN then gets none). Per example: mean over relation heads and real query tokens.

    `dropout` (`relation_dropout`; None = the student config's `attention_probs_dropout_prob`): while the student
    trains, the student's relation probabilities go through dropout and the KL reads `log(p + 1e-7)`, as the
    official student (GeneZC/MiniMoE models/moebert_minilm.py: `nn.Dropout(attention_probs_dropout_prob)` line 40,
    applied to the Q-Q/K-K/V-V probabilities lines 72-76, `torch.log(s + 1e-7)` in `loss_fn` lines 150-152).
    0 keeps the exact log-softmax without dropout (hf_moekd before issue 29). The teacher's relations never drop.
    """

    needs_teacher_forward = True
    arguments = {"heads": "relation_heads", "teacher_layer": "relation_teacher_layer",
                 "student_layer": "relation_student_layer", "student_source": "relation_student_source",
                 "dropout": "relation_dropout"}
    card_settings = ("relation_heads", "relation_teacher_layer", "relation_student_layer", "relation_student_source",
                     "relation_dropout")

    def __init__(self, student: nn.Module | None = None, teacher: nn.Module | None = None, *, heads: int = 32,
                 teacher_layer: int = -1, student_layer: int = -1, student_source: str = "final_hidden",
                 dropout: float | None = None) -> None:
        super().__init__()
        if student is None or teacher is None:
            raise ValueError("attention_relation needs a teacher model, not only precomputed logits.")
        if student_source not in ("final_hidden", "block"):
            raise ValueError(f"attention_relation student_source must be 'final_hidden' or 'block', got "
                             f"{student_source!r}.")
        self.heads = heads
        self.layers = {"student": student_layer, "teacher": teacher_layer}
        self.source = student_source
        if dropout is None:
            dropout = getattr(student.config, "attention_probs_dropout_prob", 0.0) or 0.0
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"attention_relation dropout must be in [0, 1), got {dropout}.")
        self.dropout = float(dropout)
        self.student_training = False
        self.stores: dict[str, dict[str, torch.Tensor]] = {}
        if self.source == "final_hidden":
            hidden = student.config.hidden_size
            self.qkv = nn.ModuleDict({kind: nn.Linear(hidden, hidden) for kind in ("q", "k", "v")})

    def capture(self, role: str, model: nn.Module) -> ContextManager:
        self.stores[role] = {}
        if role == "student":
            self.student_training = model.training
        if role == "student" and self.source == "final_hidden":
            return capture_block_output(model, self.layers[role], self.stores[role])
        return capture_qkv(model, self.layers[role], self.stores[role])

    def forward(self, batch: DistillationBatch) -> torch.Tensor:
        student, teacher = self.stores.pop("student"), self.stores.pop("teacher")
        if self.source == "final_hidden":
            hidden = student["hidden"]
            student = {kind: linear(hidden.to(linear.weight.dtype)) for kind, linear in self.qkv.items()}
        heads = self.heads
        mask = batch.token_mask(student["q"])
        teacher = {kind: x.to(mask.device) for kind, x in teacher.items()}  # a device-mapped teacher's layer device
        total = 0.0
        for kind in ("q", "k", "v"):
            log_s = relation_log_probs(student[kind], heads, mask)
            if self.dropout and self.student_training:  # official: dropout on the probabilities, then log(p + 1e-7)
                log_s = torch.log(F.dropout(log_s.exp(), self.dropout, training=True) + 1e-7)
            log_t = relation_log_probs(teacher[kind], heads, mask)
            kl = (log_t.exp() * (log_t - log_s)).sum(-1).mean(1)  # [B, L]
            total = total + ((kl * mask).sum(1) / mask.sum(1).clamp_min(1)).sum()
        return batch.per_example(total / 3)
