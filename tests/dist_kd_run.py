"""One KD run used by test_distributed.py; launched with 1 process or with torchrun/accelerate (2 processes)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
from testing_utils import tiny_bert, tiny_dataset  # noqa: E402

from hf_moekd.distillation import DistillationArguments, DistillationTrainer  # noqa: E402


def main(out: str, per_device: int) -> None:
    args = DistillationArguments(
        output_dir=out, per_device_train_batch_size=per_device, max_steps=3, logging_steps=1, report_to=[],
        use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0, learning_rate=1e-3, max_grad_norm=0.0,
        hidden_loss_weight=1.0, attention_relation_weight=0.5, relation_heads=4,
    )
    trainer = DistillationTrainer(
        model=tiny_bert(0, token=True), teacher_model=tiny_bert(1, token=True, hidden=48, layers=4),
        args=args, train_dataset=tiny_dataset(n=48, token=True, ragged=True),
    )
    trainer.train()
    if trainer.is_world_process_zero():
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        terms = [{k: v for k, v in h.items() if k.startswith("loss_")} for h in trainer.state.log_history if "loss" in h]
        projection = trainer.loss_terms["hidden_mse"].projections["1"].weight
        params = {n: p.detach().flatten()[:50].tolist() for n, p in trainer.model.named_parameters()}
        params["projection"] = projection.detach().flatten()[:50].tolist()
        Path(out, "result.json").write_text(json.dumps({"losses": losses, "terms": terms, "params": params,
                                                         "world_size": trainer.args.world_size}))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
