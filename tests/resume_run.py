"""A KD run for the resume test (test_faults.py): optionally SIGKILLs itself right after a checkpoint is written.

    python resume_run.py OUT [--kill_after STEP] [--resume CHECKPOINT] [--moe_cached]

`--moe_cached`: a MiniMoE student (noisy router, load-balancing loss) distilled from teacher logits cached on disk
(OUT/cache), with the hidden-state term still using the live teacher.

Writes OUT/final/model.safetensors and OUT/final/loss_terms.safetensors at the end.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

from safetensors.torch import save_file
from transformers import TrainerCallback

sys.path.insert(0, str(Path(__file__).parent))
from testing_utils import tiny_bert, tiny_dataset  # noqa: E402

from hf_moekd.distillation import DistillationArguments, DistillationTrainer, precompute_teacher_logits  # noqa: E402
from hf_moekd.models.minimoe import minimoe_from_dense  # noqa: E402


class KillAfterSave(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--kill_after", type=int, default=None)
    parser.add_argument("--resume", default=None)
    parser.add_argument("--moe_cached", action="store_true")
    a = parser.parse_args()
    args = DistillationArguments(
        output_dir=a.out, per_device_train_batch_size=4, max_steps=6, save_steps=3, logging_steps=1, report_to=[],
        use_cpu=True, disable_tqdm=True, seed=0, learning_rate=1e-3, alpha=0.5, hidden_loss_weight=1.0,
        attention_relation_weight=0.5, relation_heads=4, overwrite_output_dir=True,
    )
    student, teacher, data = tiny_bert(0), tiny_bert(1, hidden=48, layers=4), tiny_dataset(n=40)
    if a.moe_cached:
        student = minimoe_from_dense(student, num_ffn_experts=2, router_noise=0.2)
        data = precompute_teacher_logits(teacher, data, cache_dir=Path(a.out) / "cache")
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, args=args, train_dataset=data,
        callbacks=[KillAfterSave(a.kill_after)] if a.kill_after else None,
    )
    trainer.train(resume_from_checkpoint=a.resume)
    final = Path(a.out) / "final"
    trainer.save_model(str(final))
    save_file({k: v.contiguous() for k, v in trainer.loss_terms.state_dict().items()}, str(final / "loss_terms.safetensors"))


if __name__ == "__main__":
    main()
