#!/usr/bin/env python
"""OneS for language models: a Mixtral-style MoE LM trained here from scratch, gathered into a stock Mistral with every
strategy, then distilled with the MoE as teacher (token-level forward KL, `DistillationTrainer`, `--task clm` path).

Data: the 109,333-sentence corpus (`hf_moekd.data.text.load_text_corpus`: GLUE + CoNLL-2003 training sentences), split
into held-out sentences (`--heldout`, fixed shuffle) and training sentences; a byte-level BPE tokenizer (`--vocab`)
trained on the training sentences; texts joined with </s> and cut into blocks of `--block_size` tokens (run_clm.py).

Rows (held-out next-token loss, lower is better; perplexity = exp(loss)), per seed:
  moe                the Mixtral teacher, `--steps` steps (router aux loss 0.01 as Mixtral)
  dense              Mistral of the gathered student's size (one expert's FFN width), `--steps` steps: the baseline
                     OneS improves on (the same model, trained directly)
  dense, +D steps    the same trained `--steps + --kd_steps` steps (the "trained as long" control)
  dense (MoE's active params)  Mistral with the MoE's active FFN width (top-2 x expert width), `--steps` steps
  <g> gathered       the MoE gathered with strategy <g>, before any training
  <g> + CE           gathered, fine-tuned `--kd_steps` steps on the labels only (no KD control)
  <g> + KD (OneS)    gathered, distilled `--kd_steps` steps from the MoE (alpha 0.5, T 1, forward KL)
% of the MoE's benefit preserved = (L_dense - L_x) / (L_dense - L_moe), on the seed means, where the MoE's margin is
larger than its paired spread. Tokens/s: forward passes over `--block_size`-token blocks at batch 1 and 32,
interleaved. `--qwen` adds one Qwen2-MoE (shared expert) -> Qwen2 run on the first seed.

    python benchmarks/ones_lm.py --data_dir ../shared/data
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
from pathlib import Path

import torch
from common import DEFAULT_DATA, REPO, interleaved_medians, mean_std, write_json, write_result
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    MistralConfig,
    MistralForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    Trainer,
    TrainingArguments,
    set_seed,
)
from transformers.trainer_callback import PrinterCallback

from hf_moekd import DistillationArguments, DistillationTrainer, gather_experts
from hf_moekd.data.text import load_text_corpus


class Blocks(torch.utils.data.Dataset):
    """Rows of a `[N, block]` token tensor as causal-LM examples (labels = inputs; the model shifts them)."""

    def __init__(self, ids: torch.Tensor) -> None:
        self.ids = ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def corpus_blocks(data_dir: str, heldout: int, vocab: int, block: int) -> tuple[PreTrainedTokenizerFast, torch.Tensor, torch.Tensor, dict]:
    """Tokenizer, training blocks, held-out blocks and corpus facts."""
    texts = load_text_corpus(data_dir)["text"]
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(0)).tolist()
    held, train = [texts[i] for i in order[:heldout]], [texts[i] for i in order[heldout:]]
    raw = Tokenizer(models.BPE(unk_token=None))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator(train, trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<pad>", "</s>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>", eos_token="</s>")

    def blocks(sentences: list[str]) -> torch.Tensor:
        ids = [t for row in tok(sentences)["input_ids"] for t in (*row, tok.eos_token_id)]
        n = len(ids) // block
        return torch.tensor(ids[: n * block]).view(n, block)

    train_ids, held_ids = blocks(train), blocks(held)
    facts = {"sentences": len(texts), "train_sentences": len(train), "heldout_sentences": len(held),
             "vocab_size": len(tok), "train_tokens": train_ids.numel(), "heldout_tokens": held_ids.numel()}
    return tok, train_ids, held_ids, facts


@torch.no_grad()
def heldout_loss(model, ids: torch.Tensor, batch: int = 64) -> float:
    """Mean next-token cross-entropy over every held-out block (all blocks predict block - 1 tokens)."""
    model.eval()
    moe = {"output_router_logits": False} if hasattr(model.config, "output_router_logits") else {}
    total = sum(float(model(input_ids=ids[s:s + batch], labels=ids[s:s + batch], **moe).loss) * len(ids[s:s + batch])
                for s in range(0, len(ids), batch))
    return total / len(ids)


def fit(model, train: Blocks, a: argparse.Namespace, seed: int, steps: int, lr: float, teacher=None):
    """Train `model` in place for `steps` steps (AdamW, warm-up then cosine); with `teacher`, distil (alpha 0.5)."""
    common = dict(max_steps=steps, per_device_train_batch_size=a.batch_size, learning_rate=lr, weight_decay=0.01,
                  warmup_steps=max(1, steps // 20), lr_scheduler_type="cosine", save_strategy="no", report_to=[],
                  disable_tqdm=True, logging_strategy="no", seed=seed, data_seed=seed, use_cpu=True)
    with tempfile.TemporaryDirectory() as tmp:
        if teacher is None:
            trainer = Trainer(model=model, args=TrainingArguments(output_dir=tmp, **common), train_dataset=train)
        else:
            targs = DistillationArguments(output_dir=tmp, alpha=a.alpha, temperature=a.temperature,
                                          kd_divergence="forward_kl", **common)
            trainer = DistillationTrainer(model=model, teacher_model=teacher, args=targs, train_dataset=train)
        trainer.remove_callback(PrinterCallback)
        trainer.train()
    return model.eval()


def configs(tok, a: argparse.Namespace) -> tuple[MixtralConfig, MistralConfig, MistralConfig]:
    shared = dict(vocab_size=len(tok), hidden_size=a.hidden_size, num_hidden_layers=a.layers, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=a.block_size, pad_token_id=tok.pad_token_id,
                  eos_token_id=tok.eos_token_id, bos_token_id=None, tie_word_embeddings=True, sliding_window=None)
    moe = MixtralConfig(**shared, intermediate_size=a.expert_size, num_local_experts=a.experts, num_experts_per_tok=2,
                        router_aux_loss_coef=0.01, output_router_logits=True)
    active = MistralConfig(**shared, intermediate_size=2 * a.expert_size)
    student = MistralConfig(**shared, intermediate_size=a.expert_size)
    return moe, active, student


def tokens_per_second(models_: dict[str, torch.nn.Module], block: int, vocab: int, repeats: int) -> dict[str, float]:
    """Forward tokens/s of each model at batch 1 and 32 (`block` tokens per row), timed interleaved."""
    out = {}
    for batch in (1, 32):
        ids = torch.randint(2, vocab, (batch, block), generator=torch.Generator().manual_seed(batch))
        with torch.inference_mode():
            t = interleaved_medians({n: (lambda m=m: m(input_ids=ids)) for n, m in models_.items()}, repeats)
        out.update({f"{n}_batch{batch}": batch * block / s for n, s in t.items()})
    return out


def run_seed(seed: int, tok, train: Blocks, held: torch.Tensor, a: argparse.Namespace) -> dict:
    moe_cfg, active_cfg, student_cfg = configs(tok, a)
    loss: dict[str, float] = {}
    start = time.time()
    log = lambda name: print(f"[seed {seed}] {name}: {loss[name]:.4f} ({time.time() - start:.0f} s)", flush=True)  # noqa: E731
    set_seed(seed)
    moe = fit(MixtralForCausalLM(moe_cfg), train, a, seed, a.steps, a.lr)
    moe.config.output_router_logits = False
    loss["moe"] = heldout_loss(moe, held)
    log("moe")
    set_seed(seed)
    dense = fit(MistralForCausalLM(student_cfg), train, a, seed, a.steps, a.lr)
    loss["dense"] = heldout_loss(dense, held)
    log("dense")
    set_seed(seed)
    longer = fit(MistralForCausalLM(student_cfg), train, a, seed, a.steps + a.kd_steps, a.lr)
    loss[f"dense, +{a.kd_steps} steps"] = heldout_loss(longer, held)
    log(f"dense, +{a.kd_steps} steps")
    set_seed(seed)
    active = fit(MistralForCausalLM(active_cfg), train, a, seed, a.steps, a.lr)
    loss["dense (MoE's active params)"] = heldout_loss(active, held)
    log("dense (MoE's active params)")
    calibration = [train.ids[i:i + 32] for i in range(0, 512, 32)]
    for spec in a.gatherings:
        make = lambda: gather_experts(moe, spec, calibration_dataset=calibration, progress=False)  # noqa: E731
        loss[f"{spec} gathered"] = heldout_loss(make(), held)
        log(f"{spec} gathered")
        set_seed(seed)
        loss[f"{spec} + CE"] = heldout_loss(fit(make(), train, a, seed, a.kd_steps, a.kd_lr), held)
        log(f"{spec} + CE")
        set_seed(seed)
        student = fit(make(), train, a, seed, a.kd_steps, a.kd_lr, teacher=moe)
        loss[f"{spec} + KD (OneS)"] = heldout_loss(student, held)
        log(f"{spec} + KD (OneS)")
    speed = tokens_per_second({"moe": moe, "dense_active": active, "student": student}, a.block_size, len(tok),
                              a.speed_repeats)
    params = {"moe": moe.num_parameters(), "dense_active": active.num_parameters(), "student": student.num_parameters()}
    return {"loss": loss, "tokens_per_s": speed, "params": params, "seconds": time.time() - start}


def qwen_run(seed: int, tok, train: Blocks, held: torch.Tensor, a: argparse.Namespace) -> dict:
    """Qwen2-MoE (shared expert) -> gathered Qwen2 -> KD, once: held-out losses of teacher, gathered, +CE, +KD."""
    cfg = Qwen2MoeConfig(vocab_size=len(tok), hidden_size=a.hidden_size, num_hidden_layers=a.layers, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=a.block_size, intermediate_size=2 * a.expert_size,
                         moe_intermediate_size=a.expert_size // 2, shared_expert_intermediate_size=a.expert_size,
                         num_experts=a.experts, num_experts_per_tok=2, router_aux_loss_coef=0.01,
                         output_router_logits=True, tie_word_embeddings=True, pad_token_id=tok.pad_token_id,
                         eos_token_id=tok.eos_token_id, bos_token_id=None)
    loss: dict[str, float] = {}
    set_seed(seed)
    moe = fit(Qwen2MoeForCausalLM(cfg), train, a, seed, a.steps, a.lr)
    moe.config.output_router_logits = False
    loss["qwen2-moe"] = heldout_loss(moe, held)
    calibration = [train.ids[i:i + 32] for i in range(0, 512, 32)]
    make = lambda: gather_experts(moe, "average", calibration_dataset=calibration, progress=False)  # noqa: E731
    loss["average gathered"] = heldout_loss(make(), held)
    set_seed(seed)
    loss["average + CE"] = heldout_loss(fit(make(), train, a, seed, a.kd_steps, a.kd_lr), held)
    set_seed(seed)
    student = fit(make(), train, a, seed, a.kd_steps, a.kd_lr, teacher=moe)
    loss["average + KD (OneS)"] = heldout_loss(student, held)
    print(f"[qwen2] {loss}", flush=True)
    return {"loss": loss, "student_class": type(student).__name__, "params": {"moe": moe.num_parameters(),
                                                                             "student": student.num_parameters()}}


def _pm(stats: dict, signed: bool = True) -> str:
    return f"{stats['mean']:{'+' if signed else ''}.4f} ± {stats['std']:.4f}"


def summarise(per_seed: list[dict]) -> tuple[dict, str]:
    """Mean ± std of each row's loss, paired deltas vs dense and vs `<g> + CE`, % of MoE benefit preserved."""
    names = list(per_seed[0]["loss"])
    col = {n: [s["loss"][n] for s in per_seed] for n in names}
    margin = [d - m for d, m in zip(col["dense"], col["moe"])]
    m_mean = statistics.fmean(margin)
    m_std = statistics.stdev(margin) if len(margin) > 1 else 0.0
    clear = m_mean > 0 and m_mean > m_std
    rows, lines = {}, ["| model | held-out loss | perplexity | Δ loss vs dense (paired) | Δ vs same gathering + CE "
                       "(paired) | % of MoE benefit preserved |", "|---|---:|---:|---:|---:|---:|"]
    dense_mean = statistics.fmean(col["dense"])
    for n in names:
        vals = col[n]
        delta = mean_std([v - d for v, d in zip(vals, col["dense"])])
        ce = n.replace("+ KD (OneS)", "+ CE")
        vs_ce = mean_std([v - c for v, c in zip(vals, col[ce])]) if n.endswith("(OneS)") else None
        kept = None if n in ("dense", "moe") or not clear else 100 * (dense_mean - statistics.fmean(vals)) / m_mean
        rows[n] = {"loss": mean_std(vals), "perplexity_mean": math.exp(statistics.fmean(vals)), "delta_vs_dense": delta,
                   "delta_vs_ce": vs_ce, "benefit_preserved_pct": kept}
        kept_text = "-" if n in ("dense", "moe") else f"{kept:.1f}" if kept is not None else "n/a (MoE margin within spread)"
        delta_text = "-" if n == "dense" else _pm(delta)
        lines.append(f"| {n} | {_pm(rows[n]['loss'], signed=False)} | {rows[n]['perplexity_mean']:.1f} | {delta_text} | "
                     f"{_pm(vs_ce) if vs_ce else '-'} | {kept_text} |")
    return {"rows": rows, "moe_margin": {"mean": m_mean, "std": m_std}}, "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", default=str(DEFAULT_DATA))
    p.add_argument("--work_dir", default=str(REPO / "runs" / "ones_lm"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--heldout", type=int, default=2000, help="held-out sentences")
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--block_size", type=int, default=64)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--hidden_size", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--expert_size", type=int, default=256, help="each expert's intermediate size")
    p.add_argument("--steps", type=int, default=600, help="pre-training steps of the MoE and the dense baseline")
    p.add_argument("--kd_steps", type=int, default=200, help="distillation / fine-tuning steps after gathering")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--kd_lr", type=float, default=5e-4)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--gatherings", nargs="+", default=["average", "sum", "top_experts", "weighted_average", "svd", "svd-r32", "average+align"])
    p.add_argument("--speed_repeats", type=int, default=10)
    p.add_argument("--qwen", action="store_true", help="also one Qwen2-MoE -> Qwen2 run (first seed)")
    a = p.parse_args()
    torch.set_num_threads(2)
    tok, train_ids, held, facts = corpus_blocks(a.data_dir, a.heldout, a.vocab, a.block_size)
    print(f"[ones_lm] {facts}", flush=True)
    train = Blocks(train_ids)
    work = Path(a.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    key = {k: v for k, v in vars(a).items() if k not in ("seeds", "work_dir", "qwen", "speed_repeats")}
    per_seed = []
    for seed in a.seeds:
        path = work / f"seed{seed}.json"
        saved = json.loads(path.read_text()) if path.exists() else None
        if saved is None or saved["args"] != key:
            saved = {**run_seed(seed, tok, train, held, a), "args": key}
            write_json(path, saved)
        per_seed.append(saved)
    summary, table = summarise(per_seed)
    print(table)
    speed = {k: statistics.median(s["tokens_per_s"][k] for s in per_seed) for k in per_seed[0]["tokens_per_s"]}
    qwen = qwen_run(a.seeds[0], tok, train, held, a) if a.qwen else None
    ones_rows = {n: r for n, r in summary["rows"].items() if n.endswith("(OneS)")}
    best = min(ones_rows, key=lambda n: ones_rows[n]["loss"]["mean"])
    headline = {"dense_loss": summary["rows"]["dense"]["loss"]["mean"], "moe_loss": summary["rows"]["moe"]["loss"]["mean"],
                "moe_margin": summary["moe_margin"]["mean"],
                "active_params_dense_loss": summary["rows"]["dense (MoE's active params)"]["loss"]["mean"],
                "best_ones": best,
                "best_ones_loss": ones_rows[best]["loss"]["mean"],
                "best_benefit_preserved_pct": ones_rows[best]["benefit_preserved_pct"],
                "best_kd_vs_ce": ones_rows[best]["delta_vs_ce"]["mean"],
                "dense_over_moe_tokens_per_s_b1": speed["student_batch1"] / speed["moe_batch1"],
                "dense_over_moe_tokens_per_s_b32": speed["student_batch32"] / speed["moe_batch32"]}
    write_result("ones_lm", {"headline": headline, "corpus": facts, "seeds": a.seeds, "args": key, "summary": summary,
                             "table": table, "tokens_per_s": speed, "params": per_seed[0]["params"],
                             "seconds_per_seed": [s["seconds"] for s in per_seed], "qwen2": qwen})


if __name__ == "__main__":
    main()
