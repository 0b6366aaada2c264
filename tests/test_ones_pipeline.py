"""The OneS image pipeline (train dense + V-MoE, gather, distil, compare), its data loaders and examples/run_ones.py."""
from __future__ import annotations

import gzip
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForImageClassification

from hf_moekd.data.images import InMemoryDataset, load_fashion_mnist, load_image_dataset
from hf_moekd.models.vmoe import VMoEForImageClassification
from hf_moekd.ones import GatheringConfig
from hf_moekd.ones import OneSReport, benefit_preserved
from hf_moekd.studies.ones import OneSArguments, run_ones, run_ones_from_teacher
from hf_moekd.studies.vision import model_configs
from testing_utils import run_script

TINY = dict(hidden_size=16, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2, num_experts=4,
            epochs=1, kd_epochs=1, batch_size=64, seeds=[0], measure_speed=False)


def write_idx(path: Path, array: np.ndarray, magic: int, compress: bool = True) -> None:
    header = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    (gzip.open if compress else open)(path, "wb").write(payload)


@pytest.fixture
def fake_fashion(tmp_path):
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 40), ("t10k", 20)):
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)), 2051)
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10, 2049, compress=False)
    return tmp_path


def test_parse_gathering():
    assert GatheringConfig.from_string("svd") == GatheringConfig("svd")
    assert GatheringConfig.from_string("svd-r16+align") == GatheringConfig("svd", 16, align=True)
    assert GatheringConfig.from_string("top_experts+align") == GatheringConfig("top_experts", align=True)
    assert GatheringConfig.from_string("weighted_average") == GatheringConfig("weighted_average")
    for bad, message in (("svd+nope", "only suffix"), ("median", "unknown gathering strategy"),
                         ("average-r4", "does not take option"), ("svd-rx", "cannot read 'rx'"),
                         ("svd-r0", "rank must be an integer >= 1"), ("svd-r", "cannot read 'r'")):
        with pytest.raises(ValueError, match=message):
            GatheringConfig.from_string(bad)
    with pytest.raises(ValueError, match="unknown gathering strategy"):
        OneSArguments(gatherings=["svd", "bogus"])
    with pytest.raises(ValueError, match="repeat a variant"):
        OneSArguments(gatherings=["svd", "svd"])
    with pytest.raises(ValueError, match="rank 64 exceeds min"):
        OneSArguments(gatherings=["svd-r64"], hidden_size=32, intermediate_size=32)


def test_benefit_preserved():
    assert benefit_preserved(0.85, 0.80, 0.90) == pytest.approx(50.0)
    assert benefit_preserved(0.95, 0.80, 0.90) == pytest.approx(150.0)
    assert benefit_preserved(0.85, 0.90, 0.90) is None  # the MoE did not beat the dense baseline


def test_fashion_mnist_reader(fake_fashion):
    data = load_fashion_mnist(fake_fashion, max_train_samples=25)
    assert len(data["train"]) == 25 and len(data["test"]) == 20
    row = data["train"][0]
    assert row["pixel_values"].shape == (1, 28, 28) and row["pixel_values"].dtype == torch.float32
    test = data["test"][:]
    assert 0.0 <= float(test["pixel_values"].min()) and float(test["pixel_values"].max()) <= 1.0
    labels = np.fromfile(fake_fashion / "t10k-labels-idx1-ubyte", dtype=np.uint8)[8:]
    assert test["labels"].tolist() == labels.tolist()  # no subsampling: file order kept


def test_fashion_mnist_errors(fake_fashion, tmp_path):
    (fake_fashion / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist(fake_fashion)
    write_idx(fake_fashion / "t10k-labels-idx1-ubyte", np.zeros((20, 2)), 2051, compress=False)  # images, not labels
    with pytest.raises(ValueError, match="not an IDX file of the expected kind"):
        load_fashion_mnist(fake_fashion)
    with pytest.raises(ValueError, match="unknown image dataset"):
        load_image_dataset("cifar")
    gz = fake_fashion / "train-images-idx3-ubyte.gz"
    gz.write_bytes(gz.read_bytes()[:100])  # truncated download
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_fashion_mnist(fake_fashion)


def test_digits_subsample():
    data = load_image_dataset("digits", max_train_samples=100, max_test_samples=50)
    assert (len(data["train"]), len(data["test"])) == (100, 50)


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").is_dir(), reason="Debian dataset-fashion-mnist not installed")
def test_real_fashion_mnist():
    data = load_fashion_mnist(max_train_samples=100, max_test_samples=100)
    assert len(data["train"]) == 100 and data["train"][0]["pixel_values"].shape == (1, 28, 28)
    assert set(data["test"][:]["labels"].tolist()) <= set(range(10))


def test_in_memory_dataset_matches_rows():
    data = load_image_dataset("digits")["test"]
    fast = InMemoryDataset(data)
    assert len(fast) == len(data)
    for i in (0, 7, len(data) - 1):
        assert torch.equal(fast[i]["pixel_values"], data[i]["pixel_values"]) and fast[i]["labels"] == data[i]["labels"]


@pytest.mark.slow
def test_run_ones_tiny_on_digits(tmp_path):
    out = tmp_path / "ones"
    report = run_ones(OneSArguments(**TINY, gatherings=["svd", "top_experts+align"], output_dir=str(out)), progress=False)
    expected = {"dense", "moe", "dense, +1 epochs", "svd gathered only", "svd + fine-tune, no KD", "svd + KD (OneS)",
                "top_experts+align gathered only", "top_experts+align + KD (OneS)"}
    assert set(report.accuracy) == expected and all(len(v) == 1 for v in report.accuracy.values())
    assert report.params["moe"] > report.params["dense"]
    table = report.table()
    assert "| svd + KD (OneS) |" in table and table.count("\n") == len(expected) + 1
    model = AutoModelForImageClassification.from_pretrained(out)
    assert type(model).__name__ == "DenseViTForImageClassification" and model.config.hidden_size == 16
    test = load_image_dataset("digits")["test"]
    with torch.no_grad():  # the saved model is the first gathering's OneS student: the report holds its accuracy
        correct = sum(int((model(pixel_values=test[s:s + 256]["pixel_values"]).logits.argmax(-1)
                           == test[s:s + 256]["labels"]).sum()) for s in range(0, len(test), 256))
    assert report.accuracy["svd + KD (OneS)"] == [correct / len(test)]
    saved = json.loads((out / "all_results.json").read_text())
    assert saved["per_seed"]["svd + KD (OneS)"] == report.accuracy["svd + KD (OneS)"]


def test_report_summary_speedup_and_benefit():
    report = OneSReport(args={}, accuracy={"dense": [0.8, 0.8], "moe": [0.9, 0.9], "svd + KD (OneS)": [0.85, 0.87]},
                        latency_ms={"dense_batch1": 1.0, "moe_batch1": 2.5, "dense_batch64": 4.0, "moe_batch64": 6.0},
                        params={"dense": 10, "moe": 20})
    summary = report.summary()
    assert summary["speedup_batch1"] == pytest.approx(2.5) and summary["speedup_batch64"] == pytest.approx(1.5)
    assert summary["models"]["svd + KD (OneS)"]["benefit_preserved_pct"] == pytest.approx(60.0)
    assert summary["models"]["svd + KD (OneS)"]["accuracy_std"] == pytest.approx(100 * np.std([0.85, 0.87], ddof=1))


def test_refuses_non_empty_output_before_training(tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="overwrite"):
        run_ones(OneSArguments(**TINY, output_dir=str(out)), progress=False)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


@pytest.mark.slow
def test_run_ones_from_a_saved_teacher(tmp_path, monkeypatch):
    args = OneSArguments(**TINY, output_dir=None)
    _, moe_config = model_configs(args, 8, tuple(str(i) for i in range(10)))
    torch.manual_seed(0)
    VMoEForImageClassification(moe_config).save_pretrained(tmp_path / "vmoe")
    results = run_ones_from_teacher(OneSArguments(**TINY, output_dir=str(tmp_path / "out")), str(tmp_path / "vmoe"))
    assert set(results) == {"teacher_accuracy", "gathered_accuracy", "ones_accuracy"}
    assert AutoModelForImageClassification.from_pretrained(tmp_path / "out").config.model_type == "dense_vit"
    code = run_script("run_ones.py", "--teacher_model_name_or_path", str(tmp_path / "missing"), "--output_dir",
                      str(tmp_path / "never"), monkeypatch=monkeypatch)
    assert code == 2 and not (tmp_path / "never").exists()


@pytest.mark.slow
def test_example_script_runs_the_comparison(tmp_path, monkeypatch, capsys):
    code = run_script("run_ones.py", "--hidden_size", "16", "--intermediate_size", "16", "--num_hidden_layers", "2",
                      "--num_experts", "4", "--epochs", "0.5", "--kd_epochs", "0.5", "--seeds", "1",
                      "--measure_speed", "false", "--controls", "false", "--output_dir", str(tmp_path / "o"),
                      monkeypatch=monkeypatch)
    captured = capsys.readouterr()
    out = captured.out
    assert code == 0 and "| svd + KD (OneS) |" in out and "fine-tune, no KD" not in out
    # issue 31.8: inside a seed, each model's epochs show as they pass
    assert all(f"seed 1: {what}" in captured.err for what in ("dense", "V-MoE", "svd + KD")), captured.err
    assert (tmp_path / "o" / "model.safetensors").is_file()


def test_benefit_is_na_when_the_moe_margin_is_within_its_paired_spread():
    """Issue 16.8: "% preserved" of a margin inside the noise is not a number to print."""
    noisy = OneSReport(args={}, accuracy={"dense": [0.80, 0.85, 0.79], "moe": [0.83, 0.80, 0.82],
                                          "svd + KD (OneS)": [0.82, 0.84, 0.80]}, params={"dense": 10, "moe": 20})
    mean, std = noisy.moe_margin()
    assert 0 < mean < std
    assert noisy.summary()["models"]["svd + KD (OneS)"]["benefit_preserved_pct"] is None
    assert "n/a (MoE margin +0.33 ± 4.62 is within the paired spread)" in noisy.table()
    clear = OneSReport(args={}, accuracy={"dense": [0.80, 0.81, 0.79], "moe": [0.90, 0.90, 0.90],
                                          "svd + KD (OneS)": [0.85, 0.86, 0.84]}, params={"dense": 10, "moe": 20})
    assert clear.summary()["models"]["svd + KD (OneS)"]["benefit_preserved_pct"] == pytest.approx(50.0)


def test_benefit_is_na_with_one_seed():
    """Issue 31.4: one seed has no paired spread, so the "% of MoE benefit" rule cannot be applied."""
    one = OneSReport(args={}, accuracy={"dense": [0.80], "moe": [0.90], "svd + KD (OneS)": [0.86]},
                     params={"dense": 10, "moe": 20})
    assert one.moe_margin() == pytest.approx((10.0, 0.0)) and not one.margin_is_clear()
    assert one.summary()["models"]["svd + KD (OneS)"]["benefit_preserved_pct"] is None
    assert "n/a (1 seed: the % needs the paired spread of >= 2 seeds)" in one.table()


def test_image_study_arguments_extend_distillation_arguments(monkeypatch):
    """Issue 27.2: one definition of the KD settings (DistillationArguments'); the studies only override defaults,
    and a KD run reads every loss field of the study's arguments."""
    from hf_moekd.distillation import DistillationArguments
    from hf_moekd.m2mkd.config import M2MConfig
    from hf_moekd.studies import vision
    from hf_moekd.studies.m2mkd import M2MArguments

    assert issubclass(OneSArguments, vision.ImageArguments) and issubclass(vision.ImageArguments, DistillationArguments)
    assert issubclass(M2MArguments, vision.ImageArguments) and issubclass(M2MArguments, M2MConfig)
    ones, m2m = OneSArguments(output_dir=None), M2MArguments()
    assert (ones.alpha, ones.temperature, ones.hidden_loss_weight, ones.learning_rate) == (0.9, 2.0, 0.5, 2e-3)
    assert (m2m.alpha, m2m.temperature, m2m.hidden_loss_weight, m2m.learning_rate) == (0.5, 1.0, 0.0, 2e-3)
    assert ones.output_dir is None  # still "save nothing", not TrainingArguments' 'trainer_output'
    for bad in (dict(alpha=1.5), dict(temperature=0.0)):  # validated once, by DistillationArguments
        with pytest.raises(ValueError, match="alpha must be in|temperature must be > 0"):
            M2MArguments(**bad)
    assert set(vision.study_settings(ones)) == {  # what reports and model cards record, as before
        "dataset", "train_dir", "validation_dir", "image_size", "data_dir", "max_train_samples", "max_test_samples",
        "patch_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "num_experts",
        "num_experts_per_tok", "learning_rate", "batch_size", "alpha", "temperature", "seeds", "epochs", "kd_epochs",
        "hidden_loss_weight", "gatherings", "overwrite_output_dir", "output_dir", "controls", "measure_speed"}

    built = []

    class Recording(vision.DistillationTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            built.append(self)

    monkeypatch.setattr(vision, "DistillationTrainer", Recording)
    args = OneSArguments(**{**TINY, "batch_size": 8}, output_dir=None, kd_divergence="reverse_kl", max_train_samples=8)
    data = vision.load_data(args)
    config, _ = model_configs(args, data["train"][0]["pixel_values"].shape[-1], tuple(str(i) for i in range(10)))
    from hf_moekd.models.dense_vit import DenseViTForImageClassification

    teacher = DenseViTForImageClassification(config)
    vision.train(DenseViTForImageClassification(config), data["train"], args, 0, 1, teacher=teacher)
    vision.train(DenseViTForImageClassification(config), data["train"], args, 0, 1)
    vision.train(DenseViTForImageClassification(config), data["train"], m2m, 0, 1, teacher=teacher,
                 term_options={"logits_kd": m2m.logits_kd_options})
    kd, fine_tune, module = built
    assert kd.loss_weights == {"ce": pytest.approx(0.1), "logits_kd": 0.9, "hidden_mse": 0.5}
    assert (kd.loss_terms["logits_kd"].divergence, kd.loss_terms["logits_kd"].temperature) == ("reverse_kl", 2.0)
    assert fine_tune.loss_weights == {"ce": 1.0}
    assert module.loss_weights == {"ce": 0.5, "logits_kd": 0.5}
    assert (module.loss_terms["logits_kd"].per, module.loss_terms["logits_kd"].temperature) == ("logit", 1.0)
