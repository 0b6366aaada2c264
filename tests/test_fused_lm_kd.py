"""Fused linear LM distillation (issue 30): KD and CE from the final hidden states and the head weight, chunk by chunk,
equal the unfused computation on the full logits (loss and gradients within 1e-5 relative), and no
[batch, seq, vocab] tensor is kept."""
from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from transformers import (
    CohereConfig,
    CohereForCausalLM,
    Gemma2Config,
    Gemma2ForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)

from hf_moekd.distillation import DistillationArguments, DistillationTrainer
from hf_moekd.distillation.fused import (
    FusedSpec,
    Head,
    capture_head_input,
    divergence_chunk,
    fused_head_sums,
    topk_chunk,
)
from hf_moekd.distillation.losses import soft_divergence, topk_forward_kl

VOCAB = 1000


def mistral(seed: int, vocab: int = VOCAB, tied: bool = False, bias: bool = False) -> MistralForCausalLM:
    torch.manual_seed(seed)
    model = MistralForCausalLM(MistralConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                             tie_word_embeddings=tied))
    if bias:  # a head with a bias (as some checkpoints have)
        model.lm_head = torch.nn.Linear(32, vocab, bias=True)
    with torch.no_grad():  # peaked distributions, as a trained LM has
        model.lm_head.weight.mul_(8)
    return model


def args(tmp_path, **kw) -> DistillationArguments:
    return DistillationArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, **kw)


def causal_batch(vocab: int = VOCAB, length: int = 12) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, vocab, (3, length), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[2, :4] = -100  # a prompt that is not scored
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def loss_and_grads(make_student, make_teacher, tmp_path, batch, fused: bool, **kw):
    student = make_student().train()
    trainer = DistillationTrainer(model=student, teacher_model=make_teacher().eval(),
                                  args=args(tmp_path / str(fused), fused_lm_kd=fused, **kw))
    assert (trainer.fused_lm is not None) == fused
    loss, out = trainer.compute_loss(student, dict(batch), return_outputs=True)
    full = out.logits.shape[1] > 1 and out.logits.shape[-1] > 0  # fused, first batch: the last position's, checked
    assert full != fused
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}


def assert_equal(a, b, rtol: float = 1e-5) -> None:
    (loss_a, grads_a), (loss_b, grads_b) = a, b
    assert abs(loss_a - loss_b) <= rtol * abs(loss_b), (loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        assert (grads_a[name] - grads_b[name]).norm() <= rtol * grads_b[name].norm().clamp_min(1e-12), name


@pytest.mark.parametrize("divergence,beta,temperature,alpha", [
    ("forward_kl", 0.5, 2.0, 0.5), ("reverse_kl", 0.5, 1.0, 0.7), ("jsd", 0.3, 2.0, 1.0), ("jsd", 0.0, 1.5, 0.5)])
def test_fused_trainer_loss_equals_unfused(tmp_path, divergence, beta, temperature, alpha):
    """Loss and every student gradient, with -100 labels, CE mixed in (alpha < 1) and several chunks per batch."""
    common = dict(alpha=alpha, temperature=temperature, kd_divergence=divergence, jsd_beta=beta, kd_chunk_size=5)
    runs = [loss_and_grads(lambda: mistral(0), lambda: mistral(1), tmp_path, causal_batch(), fused, **common)
            for fused in (True, False)]
    assert_equal(*runs)


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("softcap", [None, 3.0])
def test_fused_function_gradients_wrt_hidden_weight_and_bias(divergence, softcap):
    """`fused_head_sums` against soft_divergence / cross-entropy on the full (soft-capped) logits, by autograd."""
    g = torch.Generator().manual_seed(0)
    n, hidden_size, vocab, t = 11, 16, 300, 2.0
    student = torch.nn.Linear(hidden_size, vocab)
    teacher_logits = torch.randn(n, vocab, generator=g) * 4
    h0 = torch.randn(n, hidden_size, generator=g)
    w = torch.tensor([1.0, 0, 1, 1, 0, 1, 1, 1, 1, 0, 1])
    labels = torch.randint(0, vocab, (n,), generator=g).masked_fill(w == 0, -100)
    rows = w.nonzero().squeeze(-1)
    head = Head(student, student, softcap)

    h = h0.clone().requires_grad_(True)
    spec = FusedSpec(head, rows, lambda z, part: divergence_chunk(z, teacher_logits[rows[part]], w[rows[part]], t,
                                                                  divergence, 0.3), labels[rows], chunk_size=3)
    sums = fused_head_sums(spec, h)
    (sums[0] + 0.4 * sums[1]).backward()
    fused = [sums.detach(), h.grad, student.weight.grad.clone(), student.bias.grad.clone()]

    student.zero_grad()
    h = h0.clone().requires_grad_(True)
    z = student(h)
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    ref = torch.stack([(soft_divergence(z, teacher_logits, t, divergence, 0.3) * w).sum(),
                       F.cross_entropy(z, labels, ignore_index=-100, reduction="sum")])
    (ref[0] + 0.4 * ref[1]).backward()
    for a, b in zip(fused, [ref.detach(), h.grad, student.weight.grad, student.bias.grad]):
        assert (a - b).norm() <= 1e-5 * b.norm(), (a, b)


def test_topk_sparse_gradient_equals_autograd():
    """The analytic top-k gradient (support + rest bucket) is the autograd one of `topk_forward_kl`, also with k = V
    (no rest mass) and with a rest bucket."""
    g = torch.Generator().manual_seed(3)
    z = torch.randn(6, 50, generator=g) * 3
    teacher = torch.randn(6, 50, generator=g) * 5
    w = torch.tensor([1.0, 0.5, 0, 1, 2, 1])
    for k in (50, 7, 1):
        logp, idx = F.log_softmax(teacher / 2.0, -1).topk(k, -1)
        value, grad = topk_chunk(z.clone(), logp, idx, w, 2.0)
        s = z.clone().requires_grad_(True)
        ref = (topk_forward_kl(s, logp, idx, 2.0) * w).sum()
        ref.backward()
        torch.testing.assert_close(value, ref.detach(), rtol=1e-5, atol=0)
        assert (grad - s.grad).norm() <= 1e-5 * s.grad.norm(), k


def test_cached_topk_fused_equals_unfused(tmp_path):
    from datasets import Dataset

    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, VOCAB, (4, 10), generator=g)
    data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist(),
                              "labels": ids.tolist()})
    runs = []
    teacher = mistral(1).eval()
    for fused in (True, False):
        student = mistral(0).train()
        trainer = DistillationTrainer(model=student, teacher_model=teacher, train_dataset=data, args=args(
            tmp_path / str(fused), alpha=0.6, temperature=2.0, teacher_logits_top_k=16, kd_chunk_size=4,
            teacher_logits_cache=str(tmp_path / "cache"), fused_lm_kd=fused, per_device_train_batch_size=4))
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
        loss = trainer.compute_loss(student, batch)
        loss.backward()
        runs.append((loss.detach(), {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}))
    assert_equal(*runs)


@pytest.mark.parametrize("kind", ["tied", "bias", "softcap", "t5"])
def test_fused_heads_tied_biased_softcapped_and_seq2seq(tmp_path, kind):
    if kind == "softcap":  # Gemma2: tied embeddings and final_logit_softcapping, applied per chunk
        def make(seed):
            torch.manual_seed(seed)
            return Gemma2ForCausalLM(Gemma2Config(
                vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                num_key_value_heads=2, head_dim=8, max_position_embeddings=64, final_logit_softcapping=2.0))
        batch = causal_batch()
    elif kind == "t5":  # seq2seq: tied embeddings, the decoder output scaled by d_model ** -0.5 before the head
        def make(seed):
            torch.manual_seed(seed)
            return T5ForConditionalGeneration(T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=1,
                                                       num_decoder_layers=1, num_heads=4, decoder_start_token_id=0,
                                                       dropout_rate=0.0))
        g = torch.Generator().manual_seed(1)
        labels = torch.randint(1, VOCAB, (3, 6), generator=g)
        labels[2, 4:] = -100
        batch = {"input_ids": torch.randint(1, VOCAB, (3, 9), generator=g),
                 "attention_mask": torch.ones(3, 9, dtype=torch.long), "labels": labels}
    else:
        def make(seed):
            return mistral(seed, tied=kind == "tied", bias=kind == "bias")
        batch = causal_batch()
    runs = [loss_and_grads(lambda: make(0), lambda: make(1), tmp_path, batch, fused, alpha=0.5, temperature=2.0,
                           kd_chunk_size=4) for fused in (True, False)]
    assert_equal(*runs)
    if kind == "tied":
        assert "model.embed_tokens.weight" in runs[0][1]


def test_gradient_accumulation_fused_equals_one_unfused_batch(tmp_path):
    """1 x 8 unfused == 4 x 2 fused (ragged rows, per-token normalisation over the whole optimizer step)."""
    from test_distillation import GradRecorder, assert_same_grads
    from test_lm_distillation import ragged_lm_dataset

    grads = []
    for batch, steps, fused in ((8, 1, False), (2, 4, True)):
        recorder = GradRecorder()
        DistillationTrainer(
            model=mistral(0, vocab=64), teacher_model=mistral(1, vocab=64),
            args=args(tmp_path / f"{batch}", alpha=0.5, temperature=2.0, kd_chunk_size=5, max_steps=1,
                      per_device_train_batch_size=batch, gradient_accumulation_steps=steps, fused_lm_kd=fused,
                      learning_rate=1e-3, save_strategy="no", disable_tqdm=True),
            train_dataset=ragged_lm_dataset(), callbacks=[recorder]).train()
        grads.append(recorder.grads[0])
    assert_same_grads(*grads)


def test_no_full_vocabulary_tensor_is_kept_for_backward(tmp_path):
    """Every activation saved for backward during the fused loss is far smaller than [batch, seq, vocab]."""
    batch = causal_batch(vocab=4000)
    full = batch["input_ids"].numel() * 4000
    largest = {}
    for fused in (True, False):
        student = mistral(0, vocab=4000).train()
        trainer = DistillationTrainer(model=student, teacher_model=mistral(1, vocab=4000).eval(),
                                      args=args(tmp_path / str(fused), alpha=0.5, fused_lm_kd=fused))
        sizes, weights = [0], {p.data_ptr() for m in (student, trainer.teacher) for p in m.parameters()}

        def pack(t):
            if t.data_ptr() not in weights:
                sizes.append(t.numel())
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            trainer.compute_loss(student, dict(batch))
        largest[fused] = max(sizes)
    assert largest[False] >= full and largest[True] <= full // 8, largest


def test_heads_that_cannot_be_fused_fall_back_with_one_log_line(tmp_path, caplog):
    """A quantised-style head (not a plain nn.Linear) is refused when the trainer is built; a head whose logits are
    post-processed (Cohere's logit_scale) fails the first-batch check; both give the unfused result."""
    class QuantLinear(torch.nn.Linear):
        pass

    def odd_head(seed):
        model = mistral(seed)
        head = QuantLinear(32, VOCAB, bias=False)
        head.weight = model.lm_head.weight
        model.lm_head = head
        return model

    def cohere(seed):
        torch.manual_seed(seed)
        return CohereForCausalLM(CohereConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                              num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                              max_position_embeddings=64, logit_scale=0.25))

    logger = logging.getLogger("hf_moekd.distillation.fused")
    logger.propagate = True
    batch = causal_batch()
    with caplog.at_level(logging.WARNING, logger="hf_moekd.distillation.fused"):
        student = odd_head(0).train()
        trainer = DistillationTrainer(model=student, teacher_model=odd_head(1), args=args(tmp_path / "q", alpha=0.5))
        assert trainer.fused_lm is None
        assert sum("Fused LM distillation is off (its output head is a QuantLinear" in r.message
                   for r in caplog.records) == 1
        caplog.clear()
        student = cohere(0).train()
        trainer = DistillationTrainer(model=student, teacher_model=cohere(1), args=args(tmp_path / "c", alpha=0.5))
        assert trainer.fused_lm is not None
        loss = trainer.compute_loss(student, dict(batch))
        trainer.compute_loss(student, dict(batch))
        assert not trainer.fused_lm.enabled
        assert sum("Fused LM distillation is off" in r.message for r in caplog.records) == 1
    with torch.no_grad():
        s, t = (m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
                for m in (student, cohere(1)))
    keep = batch["labels"][:, 1:].ne(-100)
    kd = (soft_divergence(s[keep], t[keep], 2.0)).mean()
    ce = F.cross_entropy(s[keep], batch["labels"][:, 1:][keep])
    torch.testing.assert_close(loss, 0.5 * kd + 0.5 * ce, rtol=1e-5, atol=1e-6)


def test_bf16_autocast_keeps_the_fused_path(tmp_path, caplog):
    """Under bf16 autocast the head's logits are rounded to 8 significant bits: the first-batch check allows for it
    (it turned the fused path off before), and training runs fused."""
    from datasets import Dataset

    batch = causal_batch()
    data = Dataset.from_dict({k: v.tolist() for k, v in batch.items()}).with_format("torch")
    logging.getLogger("hf_moekd.distillation.fused").propagate = True
    with caplog.at_level(logging.WARNING, logger="hf_moekd.distillation.fused"):
        trainer = DistillationTrainer(model=mistral(0).train(), teacher_model=mistral(1),
                                      args=args(tmp_path, alpha=0.5, bf16=True, max_steps=2, per_device_train_batch_size=3,
                                                save_strategy="no"),
                                      train_dataset=data)
        trainer.train()
    assert trainer.fused_lm.enabled and trainer.fused_lm.heads["teacher"] is not None
    assert not [r for r in caplog.records if "Fused LM distillation" in r.message]
    assert torch.isfinite(torch.tensor(trainer.state.log_history[-1]["train_loss"]))


def test_capture_records_the_head_input_and_restores_an_instance_forward():
    """The swapped head returns zero-width logits and puts back a forward set on the instance (accelerate's hooks)."""
    head = torch.nn.Linear(4, 10)
    hooked = head.forward
    head.forward = hooked
    store = {}
    x = torch.randn(2, 3, 4)
    with capture_head_input(head, store, check=False):
        out = head(x)
    assert out.shape == (2, 3, 0) and store["hidden"] is x
    with capture_head_input(head, store, check=True):
        out = head(x)
    torch.testing.assert_close(out, torch.nn.functional.linear(x[:, -1:], head.weight, head.bias))
    assert head.__dict__["forward"] is hooked
