"""Causal-LM and seq2seq students: the trainer's label terms follow the models' own losses (labels shifted as
transformers' ForCausalLMLoss for causal LMs; decoder labels for encoder-decoders)."""
from __future__ import annotations

import pytest
import torch
from transformers import MistralConfig, MistralForCausalLM, T5Config, T5ForConditionalGeneration

from hf_moekd.distillation import DistillationArguments, DistillationTrainer


def tiny_mistral(seed: int = 0) -> MistralForCausalLM:
    torch.manual_seed(seed)
    return MistralForCausalLM(MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))


def tiny_t5(seed: int = 0) -> T5ForConditionalGeneration:
    torch.manual_seed(seed)
    return T5ForConditionalGeneration(T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                               num_decoder_layers=2, num_heads=4, decoder_start_token_id=0,
                                               dropout_rate=0.0))


def args(tmp_path, **kw) -> DistillationArguments:
    return DistillationArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, **kw)


def causal_batch() -> dict[str, torch.Tensor]:
    ids = torch.randint(1, 64, (3, 10), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def test_causal_lm_ce_equals_the_models_own_loss(tmp_path):
    """Issue 17's bug: without the shift, `ce` compared position t with label t and rewarded copying the input."""
    model = tiny_mistral().train()
    trainer = DistillationTrainer(model=model, args=args(tmp_path, alpha=0.0))
    assert trainer.label_alignment == "shift"
    batch = causal_batch()
    loss = trainer.compute_loss(model, dict(batch))
    torch.testing.assert_close(loss, model(**batch).loss, rtol=1e-5, atol=1e-5)


def test_causal_lm_kd_is_per_predicted_token(tmp_path):
    student, teacher = tiny_mistral(0).train(), tiny_mistral(1).eval()
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args(tmp_path, alpha=1.0, temperature=1.0))
    batch = causal_batch()
    loss = trainer.compute_loss(student, dict(batch))
    with torch.no_grad():
        s = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    keep = batch["labels"][:, 1:].ne(-100)  # the positions whose next token is a label
    kl = torch.nn.functional.kl_div(s[keep].log_softmax(-1), t[keep].log_softmax(-1), log_target=True,
                                    reduction="batchmean")
    torch.testing.assert_close(loss, kl, rtol=1e-5, atol=1e-6)


def test_seq2seq_ce_equals_the_models_own_loss(tmp_path):
    model = tiny_t5().train()
    trainer = DistillationTrainer(model=model, args=args(tmp_path, alpha=0.0))
    assert trainer.label_alignment == "decoder"
    g = torch.Generator().manual_seed(1)
    labels = torch.randint(1, 64, (3, 6), generator=g)
    labels[2, 4:] = -100
    batch = {"input_ids": torch.randint(1, 64, (3, 9), generator=g), "attention_mask": torch.ones(3, 9, dtype=torch.long),
             "labels": labels}
    loss = trainer.compute_loss(model, dict(batch))
    torch.testing.assert_close(loss, model(**batch).loss, rtol=1e-5, atol=1e-5)


def test_labels_that_do_not_fit_the_head_are_refused(tmp_path):
    model = tiny_mistral().train()
    trainer = DistillationTrainer(model=model, args=args(tmp_path, alpha=0.0))
    batch = causal_batch()
    batch["labels"] = batch["labels"][:, 0]  # one label per sequence on a causal LM
    with pytest.raises(ValueError, match="do not match logits"):
        trainer.compute_loss(model, batch)


def trl_generalized_jsd(student_logits, teacher_logits, beta, temperature):
    """trl GKDTrainer.generalized_jsd_loss's per-token value (written out here as the reference formula)."""
    import torch.nn.functional as F

    s = F.log_softmax(student_logits / temperature, -1)
    t = F.log_softmax(teacher_logits / temperature, -1)
    if beta == 0:
        return F.kl_div(s, t, reduction="none", log_target=True).sum(-1)
    if beta == 1:
        return F.kl_div(t, s, reduction="none", log_target=True).sum(-1)
    b = torch.tensor(beta)
    m = torch.logsumexp(torch.stack([s + torch.log(1 - b), t + torch.log(b)]), dim=0)
    return (b * F.kl_div(m, t, reduction="none", log_target=True) + (1 - b) * F.kl_div(m, s, reduction="none",
                                                                                        log_target=True)).sum(-1)


@pytest.mark.parametrize("divergence,beta", [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.0), ("jsd", 0.3),
                                             ("jsd", 0.5), ("jsd", 1.0)])
def test_divergences_match_trl_gkd_times_t_squared(divergence, beta):
    from hf_moekd.distillation.losses import soft_divergence

    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(3, 5, 40, generator=g) * 3, torch.randn(3, 5, 40, generator=g) * 3
    trl_beta = {"forward_kl": 0.0, "reverse_kl": 1.0}.get(divergence, beta)
    for temperature in (1.0, 2.0):
        ours = soft_divergence(s, t, temperature, divergence, beta)
        torch.testing.assert_close(ours, temperature**2 * trl_generalized_jsd(s, t, trl_beta, temperature),
                                   rtol=1e-5, atol=1e-6)


def test_chunked_divergence_equals_unchunked_with_gradients():
    from hf_moekd.distillation.losses import chunked_divergence_sum, soft_divergence

    g = torch.Generator().manual_seed(1)
    s0, t = torch.randn(2, 7, 50, generator=g), torch.randn(2, 7, 50, generator=g)
    w = (torch.rand(2, 7, generator=g) > 0.3).float()
    results = []
    for chunk in (1, 3, 1024):
        s = s0.clone().requires_grad_(True)
        total = chunked_divergence_sum(s, t, w, 2.0, "jsd", 0.4, chunk_size=chunk)
        total.backward()
        results.append((total.detach(), s.grad))
    s = s0.clone().requires_grad_(True)
    direct = (soft_divergence(s, t, 2.0, "jsd", 0.4) * w).sum()
    direct.backward()
    for total, grad in results:
        torch.testing.assert_close(total, direct.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad, s.grad, rtol=1e-5, atol=1e-7)


def test_reverse_kl_and_jsd_train_a_causal_lm(tmp_path):
    for divergence in ("reverse_kl", "jsd"):
        student, teacher = tiny_mistral(0).train(), tiny_mistral(1).eval()
        trainer = DistillationTrainer(model=student, teacher_model=teacher,
                                      args=args(tmp_path, alpha=1.0, kd_divergence=divergence, kd_chunk_size=4))
        loss = trainer.compute_loss(student, dict(causal_batch()))
        loss.backward()
        assert loss.item() > 0 and student.lm_head.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="kd_divergence"):
        args(tmp_path, kd_divergence="kl")


def test_topk_kl_with_all_tokens_is_the_full_kl_and_close_with_few():
    from hf_moekd.distillation.losses import soft_divergence, topk_forward_kl

    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(4, 6, 200, generator=g), torch.randn(4, 6, 200, generator=g) * 4  # a peaked teacher
    full = soft_divergence(s, t, 2.0)
    for k, tolerance in ((200, 1e-5), (64, 0.05)):
        logp, idx = torch.log_softmax(t / 2.0, -1).topk(k, -1)
        approx = topk_forward_kl(s, logp, idx, 2.0)
        assert (approx - full).abs().max() / full.abs().max() < tolerance, k


def lm_dataset(n: int = 6):
    from datasets import Dataset

    ids = torch.randint(1, 64, (n, 10), generator=torch.Generator().manual_seed(3))
    return Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist(),
                              "labels": ids.tolist()})


@pytest.mark.parametrize("top_k", [64, 8])
def test_cached_topk_teacher_matches_the_online_teacher(tmp_path, top_k):
    """The cache keeps fp16 top-k log-probs + int32 ids; with k = vocab the loss is the online one up to fp16."""
    from hf_moekd.distillation import TEACHER_TOPK_INDICES, TEACHER_TOPK_LOGPROBS

    student, teacher = tiny_mistral(0).train(), tiny_mistral(1).eval()
    with torch.no_grad():  # a confident teacher, as a trained LM is (a random one is near uniform)
        teacher.lm_head.weight.mul_(30)
    common = dict(alpha=1.0, temperature=2.0, per_device_train_batch_size=6, teacher_logits_top_k=top_k)
    online = DistillationTrainer(model=student, teacher_model=teacher, args=args(tmp_path / "a", **common),
                                 train_dataset=lm_dataset())
    cached = DistillationTrainer(model=student, teacher_model=teacher, train_dataset=lm_dataset(),
                                 args=args(tmp_path / "b", teacher_logits_cache=str(tmp_path / "cache"), **common))
    data = cached.train_dataset
    assert {TEACHER_TOPK_LOGPROBS, TEACHER_TOPK_INDICES} <= set(data.column_names)
    assert data.features[TEACHER_TOPK_LOGPROBS].feature.feature.dtype == "float16"
    assert len(data[0][TEACHER_TOPK_INDICES][0]) == top_k
    batch_online = online.data_collator([lm_dataset()[i] for i in range(6)])
    batch_cached = cached.data_collator([data[i] for i in range(6)])
    loss_online = online.compute_loss(student, batch_online)
    loss_cached = cached.compute_loss(student, batch_cached)
    tolerance = 5e-3 if top_k == 64 else 0.2  # fp16 log-probs; k = 8 of 64 tokens: the rest bucket approximates
    assert abs(loss_cached.item() - loss_online.item()) / loss_online.item() < tolerance


def ragged_lm_dataset(n: int = 8):
    """Causal-LM rows of different real lengths (right-padded, labels -100 on padding)."""
    from datasets import Dataset

    g = torch.Generator().manual_seed(5)
    ids = torch.randint(1, 64, (n, 12), generator=g)
    lengths = torch.randint(4, 13, (n,), generator=g)
    mask = (torch.arange(12) < lengths[:, None]).long()
    return Dataset.from_dict({"input_ids": (ids * mask).tolist(), "attention_mask": mask.tolist(),
                              "labels": ids.masked_fill(mask == 0, -100).tolist()})


@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
def test_lm_gradient_accumulation_matches_one_big_batch(tmp_path, divergence):
    """Per-token normalisation over the whole optimizer step (shifted labels counted): 1 x 8 == 4 x 2."""
    from testing_utils import GradRecorder, assert_same_grads

    grads = []
    for batch, steps in ((8, 1), (2, 4)):
        recorder = GradRecorder()
        trainer = DistillationTrainer(
            model=tiny_mistral(0), teacher_model=tiny_mistral(1),
            args=args(tmp_path / f"{batch}", alpha=0.5, temperature=2.0, kd_divergence=divergence, kd_chunk_size=5,
                      max_steps=1, per_device_train_batch_size=batch, gradient_accumulation_steps=steps,
                      learning_rate=1e-3, save_strategy="no", disable_tqdm=True),
            train_dataset=ragged_lm_dataset(), callbacks=[recorder])
        trainer.train()
        grads.append(recorder.grads[0])
    assert_same_grads(*grads)
