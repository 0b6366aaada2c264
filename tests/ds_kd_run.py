"""One KD run for test_deepspeed.py: plain, or with a DeepSpeed config; 1 process or 2 (torchrun).

    python ds_kd_run.py OUT PER_DEVICE_BATCH TEACHER_DIR [DS_CONFIG.json | none] [--device-map JSON] [--cache DIR]
        [--accumulate STEPS]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch.distributed as dist
from transformers import BertForTokenClassification

sys.path.insert(0, str(Path(__file__).parent))
from testing_utils import tiny_bert, tiny_dataset  # noqa: E402

from hf_moekd.distillation import DistillationArguments, DistillationTrainer, load_teacher  # noqa: E402
from hf_moekd.distillation.engines import gathered, is_partitioned  # noqa: E402


def optimizer_param_ids(trainer: DistillationTrainer) -> set[int]:
    """Ids of every parameter the student's optimizer (DeepSpeed's, under it) holds."""
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate's wrapper
    ids = {id(p) for group in optimizer.param_groups for p in group["params"]}
    for name in ("fp16_groups", "bit16_groups"):  # ZeRO-3 / ZeRO-1,2 keep the module's own parameters here
        ids |= {id(p) for group in getattr(optimizer, name, []) for p in group}
    return ids


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("per_device", type=int)
    parser.add_argument("teacher")
    parser.add_argument("deepspeed", nargs="?", default="none")
    parser.add_argument("--device-map")
    parser.add_argument("--cache")
    parser.add_argument("--accumulate", type=int, default=1, help="gradient_accumulation_steps")
    opts = parser.parse_args()
    args = DistillationArguments(
        output_dir=opts.out, per_device_train_batch_size=opts.per_device, max_steps=3, logging_steps=1, report_to=[],
        use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0, learning_rate=1e-3, max_grad_norm=0.0,
        hidden_loss_weight=1.0, attention_relation_weight=0.5, relation_heads=4, teacher_model_name_or_path=opts.teacher,
        deepspeed=None if opts.deepspeed == "none" else opts.deepspeed, teacher_device_map=opts.device_map,
        teacher_logits_cache=opts.cache, gradient_accumulation_steps=opts.accumulate,
    )
    # loaded after the ZeRO-3 config exists (DistillationArguments above): from_pretrained partitions it (zero.Init)
    probe = load_teacher(opts.teacher, like=BertForTokenClassification)
    loaded_partitioned = all(is_partitioned(p) for p in probe.parameters())
    del probe
    trainer = DistillationTrainer(model=tiny_bert(0, token=True), args=args,
                                  train_dataset=tiny_dataset(n=48, token=True, ragged=True))
    teacher_params = list(trainer.teacher.parameters())
    # ZeRO-3 keeps parameters below stage3_param_persistence_threshold gathered after their first use (ds_persist)
    large = [p for p in teacher_params if not getattr(p, "ds_persist", False)]
    info = {
        "teacher_engine": type(trainer.teacher_engine).__name__ if trainer.teacher_engine is not None else None,
        "teacher_engine_optimizer": type(getattr(trainer.teacher_engine, "optimizer", None)).__name__,
        "teacher_partitioned": all(is_partitioned(p) for p in large),
        "teacher_local_numel": sum(p.numel() for p in large),
        "teacher_shard_numel": sum(p.ds_tensor.numel() for p in teacher_params if hasattr(p, "ds_tensor")),
        "teacher_full_numel": sum(getattr(p, "ds_numel", p.numel()) for p in teacher_params),
        "teacher_device_map": getattr(trainer.teacher, "hf_device_map", None),
        "teacher_meta_numel": sum(p.numel() for p in teacher_params if p.device.type == "meta"),  # disk-offloaded
        "teacher_training": trainer.teacher.training,
        "teacher_requires_grad": any(p.requires_grad for p in teacher_params),
        "side_optimizer": trainer.side_optimizer is not None,
        "loaded_partitioned": loaded_partitioned,
    }
    trainer.train()
    info["teacher_in_optimizer"] = bool({id(p) for p in teacher_params} & optimizer_param_ids(trainer))
    info["teacher_partitioned_after"] = all(is_partitioned(p) for p in large)
    info["teacher_persistent_numel"] = sum(p.numel() for p in teacher_params if getattr(p, "ds_persist", False))
    model = trainer.model_wrapped.module if trainer.is_deepspeed_enabled else trainer.model
    with gathered(list(model.parameters())):  # ZeRO-3: the student's full weights (collective: every process)
        params = {n: p.detach().flatten()[:50].tolist() for n, p in model.named_parameters()}
    if trainer.is_world_process_zero():
        logs = [h for h in trainer.state.log_history if "loss" in h]
        params["projection"] = trainer.loss_terms["hidden_mse"].projections["1"].weight.detach().flatten()[:50].tolist()
        info |= {"losses": [h["loss"] for h in logs], "terms": [{k: v for k, v in h.items() if k.startswith("loss_")}
                                                                for h in logs],
                 "params": params, "world_size": trainer.args.world_size}
        Path(opts.out, "result.json").write_text(json.dumps(info))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
