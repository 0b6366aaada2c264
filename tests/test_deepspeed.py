"""DeepSpeed ZeRO-2/3 (+ offload) and device-mapped teachers, run for real on CPU (gloo, DeepSpeed's CPU accelerator).

Each run is a fresh process (tests/ds_kd_run.py): 3 KD steps of a tiny BERT token classifier from a wider, deeper
teacher with logits KD, hidden-state MSE through a learned projection and attention relations, compared with the
same run without DeepSpeed. The first run on a machine compiles DeepSpeed's CPU ops (shm comm ~2 min, CPU Adam
~3 min; cached in ~/.cache/torch_extensions); tests skip with the compiler's message when that fails.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))
from testing_utils import tiny_bert, tiny_dataset  # noqa: E402

from hf_moekd.distillation import DistillationArguments, DistillationTrainer  # noqa: E402
from hf_moekd.distillation.engines import SideOptimizer, teacher_zero3_config  # noqa: E402
from hf_moekd.distillation.trainer import LOSS_TERMS_FILE  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "examples" / "configs"
SCRIPT = Path(__file__).with_name("ds_kd_run.py")
BIN = Path(sys.executable).parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
# DeepSpeed vs plain: same math, other reduction order (flat fp32 buffers, reduce-scatter): measured <= 2e-7.
LOSS_RTOL, PARAM_ATOL = 1e-5, 1e-5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def single_process_env() -> dict[str, str]:
    """DeepSpeed initialises torch.distributed even for one process: it needs the launcher's variables."""
    return {**ENV, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}


def build_op(name: str) -> None:
    """Skip unless DeepSpeed's CPU accelerator can build (or has cached) op `name`."""
    code = ("from deepspeed.accelerator import get_accelerator; "
            f"b = get_accelerator().create_op_builder({name!r}); b is None or b.load()")
    try:
        proc = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        pytest.skip(f"DeepSpeed could not build its CPU op {name} within 10 minutes")
    if proc.returncode != 0:
        pytest.skip(f"DeepSpeed cannot build its CPU op {name} here: {(proc.stderr or proc.stdout)[-600:]}")


@pytest.fixture(scope="module")
def ds_ops() -> None:
    pytest.importorskip("deepspeed")
    build_op("ShareMemCommBuilder")  # deepspeed.comm on CPU


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("teacher")
    tiny_bert(1, token=True, hidden=48, layers=4).save_pretrained(path)
    return path


def kd_run(out: Path, teacher: Path, *extra: str, launcher: list[str] | None = None, per_device: int = 8) -> dict:
    cmd = [*(launcher or [sys.executable]), str(SCRIPT), str(out), str(per_device), str(teacher), *extra]
    proc = subprocess.run(cmd, env=ENV if launcher else single_process_env(), capture_output=True, text=True,
                          timeout=420, cwd=ROOT)  # accelerate configs name their DeepSpeed file from the repo root
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "result.json").read_text())


@pytest.fixture(scope="module")
def plain(tmp_path_factory, teacher_dir) -> dict:
    """The reference: the same KD run without DeepSpeed, one process."""
    return kd_run(tmp_path_factory.mktemp("plain"), teacher_dir)


def assert_same_training(run: dict, reference: dict) -> None:
    assert run["losses"] == pytest.approx(reference["losses"], rel=LOSS_RTOL)
    for a, b in zip(run["terms"], reference["terms"]):
        assert a == pytest.approx(b, rel=1e-4)
    assert run["params"].keys() == reference["params"].keys()
    for name, values in reference["params"].items():  # includes the hidden-state projection (side optimizer)
        assert run["params"][name] == pytest.approx(values, abs=PARAM_ATOL), name


def assert_partitioned_teacher(run: dict, world_size: int) -> None:
    assert run["teacher_engine"] == "DeepSpeedEngine"
    assert run["teacher_engine_optimizer"] == "DeepSpeedZeRoOffload"  # ZeRO-3 parameter partitioning, no optimizer
    assert run["loaded_partitioned"]  # from_pretrained under the ZeRO-3 config: built with zero.Init
    assert run["teacher_partitioned"] and run["teacher_local_numel"] == 0  # no full replica on any process
    assert run["teacher_partitioned_after"]  # all but the small ds_persist parameters are released again
    assert run["teacher_persistent_numel"] < 0.05 * run["teacher_full_numel"]
    # each process holds 1/world_size of the teacher (+ alignment padding)
    assert run["teacher_full_numel"] / world_size <= run["teacher_shard_numel"] < run["teacher_full_numel"] / world_size + 64
    assert not run["teacher_in_optimizer"] and not run["teacher_requires_grad"] and not run["teacher_training"]
    assert run["side_optimizer"]


# ---- configs ------------------------------------------------------------------------------------
def fake_training_args(**kw) -> SimpleNamespace:
    values = dict(world_size=1, per_device_train_batch_size=4, gradient_accumulation_steps=2, max_grad_norm=1.0,
                  learning_rate=1e-4, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, weight_decay=0.0,
                  save_on_each_node=False, fp16=False, fp16_full_eval=False, bf16=True, bf16_full_eval=False)
    return SimpleNamespace(**(values | kw), get_warmup_steps=lambda steps: 0)


@pytest.mark.parametrize("name", ["zero2", "zero3", "zero3_offload"])
def test_deepspeed_configs_fill_and_parse(name):
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.config import DeepSpeedConfig
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig, unset_hf_deepspeed_config

    from hf_moekd.distillation.engines import _auto_keys

    raw = json.loads((CONFIGS / f"{name}.json").read_text())
    assert raw["zero_optimization"]["stage"] == (2 if name == "zero2" else 3)
    try:
        hf_config = HfTrainerDeepSpeedConfig(str(CONFIGS / f"{name}.json"))
        hf_config.trainer_config_process(fake_training_args())
        teacher = teacher_zero3_config(hf_config.config, 48) if hf_config.is_zero3() else None
        hf_config.trainer_config_finalize(fake_training_args(), tiny_bert(0), num_training_steps=10)
        assert not list(_auto_keys(hf_config.config)) and not hf_config.mismatches
        parsed = DeepSpeedConfig(hf_config.config)
        assert parsed.train_batch_size == 4 * 2 and parsed.bfloat16_config.enabled
        if teacher is not None:
            assert "optimizer" not in teacher and "offload_optimizer" not in teacher["zero_optimization"]
            assert teacher["zero_optimization"]["stage3_param_persistence_threshold"] == 480
            assert DeepSpeedConfig(teacher).zero_optimization_stage == 3
    finally:
        unset_hf_deepspeed_config()


def test_accelerate_configs_are_valid():
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    expected = {"cpu_2proc": DistributedType.MULTI_GPU, "single_gpu": DistributedType.NO,
                "multi_gpu": DistributedType.MULTI_GPU, "deepspeed_zero2": DistributedType.DEEPSPEED,
                "deepspeed_zero3": DistributedType.DEEPSPEED, "deepspeed_zero3_offload": DistributedType.DEEPSPEED}
    assert {p.stem for p in CONFIGS.glob("*.yaml")} == set(expected)
    for name, kind in expected.items():
        config = load_config_from_file(str(CONFIGS / f"{name}.yaml"))  # unknown keys / bad enum values raise
        assert config.distributed_type == kind, name
        assert not config.use_cpu, name  # use_cpu makes accelerate launch start a single process
        if kind == DistributedType.DEEPSPEED:
            ds_file = ROOT / config.deepspeed_config["deepspeed_config_file"]
            assert ds_file.is_file() and json.loads(ds_file.read_text())["zero_optimization"]["stage"] in (2, 3)
    assert yaml.safe_load((CONFIGS / "cpu_2proc.yaml").read_text())["num_processes"] == 2


def test_teacher_zero3_config_rejects_unfilled_values():
    config = {"train_batch_size": "auto", "zero_optimization": {"stage": 3, "reduce_bucket_size": "auto"}}
    with pytest.raises(ValueError, match="train_batch_size"):
        teacher_zero3_config(config, 32)
    filled = teacher_zero3_config({"zero_optimization": {"stage": 3, "reduce_bucket_size": "auto"}}, None)
    assert "reduce_bucket_size" not in filled["zero_optimization"]  # DeepSpeed's default


def test_side_optimizer_state_round_trip():
    torch.manual_seed(0)
    args = SimpleNamespace(learning_rate=1e-2, adam_beta1=0.9, adam_beta2=0.99, adam_epsilon=1e-8)
    params = [torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(2))]
    first = SideOptimizer(params, args)
    for _ in range(2):
        sum((p ** 2).sum() for p in params).backward()
        first.step(lr=1e-2)
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    second = SideOptimizer(copies, args)
    second.load_state_tensors(first.state_tensors())
    for optimizer, group in ((first, params), (second, copies)):
        sum((p ** 2).sum() for p in group).backward()
        optimizer.step(lr=5e-3)
    for a, b in zip(params, copies):
        assert torch.equal(a, b)
    assert all(p.grad is None for p in params)


def test_side_optimizer_refuses_fp16():
    """DeepSpeed fp16 would hand the loss terms' own parameters loss-scaled gradients (the trainer passes its
    accelerator's mixed_precision)."""
    args = SimpleNamespace(learning_rate=1e-2, adam_beta1=0.9, adam_beta2=0.99, adam_epsilon=1e-8)
    with pytest.raises(ValueError, match="fp16 scales the loss.*use bf16"):
        SideOptimizer([torch.nn.Parameter(torch.zeros(2))], args, mixed_precision="fp16")
    SideOptimizer([torch.nn.Parameter(torch.zeros(2))], args, mixed_precision="bf16")


def test_resume_under_deepspeed_needs_the_side_optimizer_state(tmp_path):
    args = DistillationArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], hidden_loss_weight=1.0)
    trainer = DistillationTrainer(model=tiny_bert(0), teacher_model=tiny_bert(1, hidden=48), args=args,
                                  train_dataset=tiny_dataset(n=8))
    checkpoint = tmp_path / "checkpoint-1"  # as a run without DeepSpeed writes it
    checkpoint.mkdir()
    save_file(trainer.loss_terms.state_dict(), str(checkpoint / LOSS_TERMS_FILE))
    trainer._check_loss_term_state(str(checkpoint))
    trainer.side_optimizer = SideOptimizer(list(trainer.loss_terms.parameters()), args)  # as under DeepSpeed
    with pytest.raises(FileNotFoundError, match="has no loss_terms_optimizer.safetensors.*without DeepSpeed"):
        trainer._check_loss_term_state(str(checkpoint))


@pytest.mark.parametrize("value, expected", [
    ("auto", "auto"), ("balanced_low_0", "balanced_low_0"), ("sequential", "sequential"), ("cpu", "cpu"),
    ("cuda:1", "cuda:1"), (' {"bert": "cpu", "classifier": 0}', {"bert": "cpu", "classifier": 0}),
    ("{bad", None), ("disk", None), ("meta", None), ("gpu", None), ("Auto", None),
])
def test_teacher_device_map_values(tmp_path, value, expected):
    kwargs = dict(output_dir=str(tmp_path), use_cpu=True, report_to=[], teacher_device_map=value)
    if expected is None:
        with pytest.raises(ValueError, match="teacher_device_map must be 'auto', 'balanced', 'balanced_low_0'"):
            DistillationArguments(**kwargs)
    else:
        assert DistillationArguments(**kwargs).teacher_load_kwargs() == {"device_map": expected}


def test_teacher_device_map_needs_a_loaded_teacher(tmp_path):
    with pytest.raises(ValueError, match="teacher_device_map must be"):
        DistillationArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], teacher_device_map="{bad")
    args = DistillationArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], teacher_device_map="auto")
    assert args.teacher_load_kwargs() == {"device_map": "auto"}
    with pytest.raises(ValueError, match="teacher_model_name_or_path"):
        DistillationTrainer(model=tiny_bert(0), teacher_model=tiny_bert(1), args=args, train_dataset=tiny_dataset())


# ---- real runs ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_teacher_device_map_with_disk_offload(tmp_path, teacher_dir, plain):
    """A teacher spread over CPU and disk (accelerate hooks, meta weights) is used in place, not moved."""
    device_map = {"bert.embeddings": "cpu", "bert.encoder.layer.0": "cpu", "bert.encoder.layer.1": "disk",
                  "bert.encoder.layer.2": "cpu", "bert.encoder.layer.3": "disk", "classifier": "cpu"}
    run = kd_run(tmp_path, teacher_dir, "none", "--device-map", json.dumps(device_map))
    assert run["teacher_device_map"] == device_map and run["teacher_meta_numel"] > 0
    assert_same_training(run, plain)


@pytest.mark.slow
def test_zero2_one_process(tmp_path, ds_ops, teacher_dir, plain):
    run = kd_run(tmp_path, teacher_dir, str(CONFIGS / "zero2.json"))
    assert run["teacher_engine"] is None and not run["teacher_partitioned"]  # a frozen replica, as under DDP
    assert run["side_optimizer"] and not run["teacher_in_optimizer"]
    assert_same_training(run, plain)


@pytest.mark.slow
def test_zero2_gradient_accumulation(tmp_path, ds_ops, teacher_dir, plain):
    """Half the per-device batch, 2 accumulation steps: the plain run's training, the hidden-state projection
    included (its side optimizer steps once per optimizer step, on the accumulated gradient)."""
    run = kd_run(tmp_path, teacher_dir, str(CONFIGS / "zero2.json"), "--accumulate", "2", per_device=4)
    assert run["side_optimizer"]
    assert_same_training(run, plain)


@pytest.mark.slow
def test_zero3_offload_one_process(tmp_path, ds_ops, teacher_dir, plain):
    build_op("CPUAdamBuilder")  # the offloaded optimizer is DeepSpeed's CPU Adam
    run = kd_run(tmp_path, teacher_dir, str(CONFIGS / "zero3_offload.json"))
    assert_partitioned_teacher(run, world_size=1)
    assert_same_training(run, plain)


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_zero3_two_processes(tmp_path, ds_ops, teacher_dir, plain, launcher):
    """Teacher partitioned over 2 processes; with torchrun also the teacher-logits cache (computed in lockstep)."""
    port = str(free_port())
    if launcher == "torchrun":
        cmd = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", port]
        extra = [str(CONFIGS / "zero3.json"), "--cache", str(tmp_path / "cache")]
    else:  # the accelerate config of the examples, as a user launches it (its DeepSpeed plugin, no --deepspeed)
        cmd = [str(BIN / "accelerate"), "launch", "--config_file", str(CONFIGS / "deepspeed_zero3.yaml"),
               "--num_processes", "2", "--main_process_port", port]
        extra = ["none"]
    run = kd_run(tmp_path / "run", teacher_dir, *extra, launcher=cmd, per_device=4)
    assert run["world_size"] == 2
    assert_partitioned_teacher(run, world_size=2)
    assert_same_training(run, plain)
    if launcher == "torchrun":  # written once (process 0), keyed on the gathered teacher weights
        assert len(list((tmp_path / "cache").glob("teacher-logits-*"))) == 1
