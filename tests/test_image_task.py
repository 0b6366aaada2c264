"""`hf-moekd distill / evaluate --task image-classification` on image folders and datasets folders the tests write:
a transformers ViT student distilled from a V-MoE teacher, a student from a config alone, a checkpoint's own image
processor; bad input is one line, exit code 2 and no output folder; no "Downloading data" bar offline."""
from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import datasets
import pytest
import torch
from transformers import AutoModelForImageClassification, ViTConfig, ViTForImageClassification, ViTImageProcessor

from hf_moekd.models.vmoe import VMoEConfig, VMoEForImageClassification
from test_cli import cli, error_line
from test_own_data import COMMON, image_folder

CLASSES = {"cat": 0, "dog": 3, "owl": 6}
LABELS = {"id2label": dict(enumerate(CLASSES)), "label2id": {name: i for i, name in enumerate(CLASSES)}}
BACKBONE = {"image_size": 16, "patch_size": 4, "num_channels": 3, "hidden_size": 32, "num_hidden_layers": 1,
            "num_attention_heads": 2, "intermediate_size": 32}
TASK = ["--task", "image-classification"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> tuple[Path, Path]:
    """Training and validation image folders: 3 classes, one subfolder each."""
    root = tmp_path_factory.mktemp("images")
    return image_folder(root / "train", CLASSES, 8), image_folder(root / "valid", CLASSES, 3)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny transformers ViT (the student) and a tiny V-MoE (the teacher), saved with the classes' id2label."""
    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    ViTForImageClassification(ViTConfig(**BACKBONE, **LABELS)).save_pretrained(root / "vit")
    VMoEForImageClassification(VMoEConfig(**{**BACKBONE, "num_hidden_layers": 2}, num_experts=2, num_experts_per_tok=1,
                                          **LABELS)).save_pretrained(root / "vmoe")
    return root / "vit", root / "vmoe"


def run_cli(*argv) -> tuple[int, str]:
    """Exit code and everything printed (stdout and stderr, progress bars included)."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
        code = cli(*argv)
    return code, printed.getvalue()


def test_vit_student_from_vmoe_teacher_then_evaluate(folders, models, tmp_path):
    train, valid = folders
    vit, vmoe = models
    out = tmp_path / "student"
    code, printed = run_cli("distill", *TASK, "--train_file", train, "--validation_file", valid, "--output_dir", out,
                            "--model_name_or_path", vit, "--teacher_model_name_or_path", vmoe, *COMMON)
    assert code == 0, printed
    assert "Downloading data" not in printed and "Generating train split" not in printed
    assert "image-classification (distil), saved to" in printed and "| eval_accuracy" in printed
    model = AutoModelForImageClassification.from_pretrained(out)
    assert type(model).__name__ == "ViTForImageClassification" and model.config.id2label == LABELS["id2label"]
    results = json.loads((out / "all_results.json").read_text())
    assert results["run_kind"] == "distil" and {"eval_accuracy", "eval_f1_macro"} <= set(results)

    report = tmp_path / "eval.json"
    code, printed = run_cli("evaluate", out, *TASK, "--validation_file", valid, "--output_file", report)
    assert code == 0, printed
    written = json.loads(report.read_text())
    assert written["examples"] == 3 * len(CLASSES)
    assert written["metrics"]["eval_accuracy"] == results["eval_accuracy"]
    assert written["metrics"]["eval_loss"] == pytest.approx(results["eval_loss"], rel=1e-4)


def test_dataset_folder_with_an_image_processor_and_a_test_split(folders, models, tmp_path):
    """--dataset_name: a saved DatasetDict with other column names; the checkpoint's image processor is used and
    saved with the model, and evaluate scores the test split as the run did."""
    from hf_moekd.data.images import read_image_folder

    train, valid = folders
    splits = {"train": train, "validation": valid, "test": valid}
    data = datasets.DatasetDict({s: read_image_folder(p, s).rename_columns({"image": "img", "label": "kind"})
                                 for s, p in splits.items()})
    data.save_to_disk(tmp_path / "data")
    student = tmp_path / "vit"
    ViTForImageClassification.from_pretrained(models[0]).save_pretrained(student)
    ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(student)
    columns = ["--image_column_name", "img", "--label_column_name", "kind"]
    out = tmp_path / "out"
    code, printed = run_cli("distill", *TASK, "--dataset_name", tmp_path / "data", *columns, "--output_dir", out,
                            "--model_name_or_path", student, *COMMON)
    assert code == 0, printed
    assert (out / "preprocessor_config.json").is_file()
    results = json.loads((out / "all_results.json").read_text())
    assert {"eval_accuracy", "test_accuracy", "test_f1_macro"} <= set(results)
    report = tmp_path / "eval.json"
    code, printed = run_cli("evaluate", out, *TASK, "--dataset_name", tmp_path / "data", *columns, "--split", "test",
                            "--output_file", report)
    assert code == 0, printed
    assert json.loads(report.read_text())["metrics"]["test_accuracy"] == results["test_accuracy"]


def test_vmoe_student_from_a_config_alone(folders, models, tmp_path):
    """A folder with only a config.json: a randomly initialised student of that config (here a V-MoE, with routing
    plots), changed by --student_config_overrides."""
    train, valid = folders
    config = VMoEConfig(**{**BACKBONE, "num_hidden_layers": 4}, num_experts=2, num_experts_per_tok=1)
    config.save_pretrained(tmp_path / "config")
    out = tmp_path / "out"
    code, printed = run_cli("distill", *TASK, "--train_file", train, "--validation_file", valid, "--output_dir", out,
                            "--model_name_or_path", tmp_path / "config", "--student_config_overrides",
                            "num_hidden_layers=2", "--teacher_model_name_or_path", models[1], "--plot", "true", *COMMON)
    assert code == 0, printed
    assert "no weights: the student starts from random weights" in printed
    model = AutoModelForImageClassification.from_pretrained(out)
    assert type(model).__name__ == "VMoEForImageClassification" and model.config.num_hidden_layers == 2
    assert model.config.id2label == LABELS["id2label"] and (out / "routing_student.png").is_file()


def test_reading_an_image_folder_shows_no_progress_bar(tmp_path):
    """datasets' imagefolder lists local files under a "Downloading data" bar (and "Generating train split"): noise
    that looks like a failure offline. Silenced while reading, restored after."""
    from hf_moekd.data.images import read_image_folder

    folder = image_folder(tmp_path / "pictures", CLASSES, 2)
    printed = io.StringIO()
    with contextlib.redirect_stderr(printed):
        data = read_image_folder(folder, "--train_file pictures")
    assert len(data) == 6 and data.features["label"].names == list(CLASSES)
    assert "Downloading data" not in printed.getvalue() and "Generating" not in printed.getvalue()
    assert not datasets.are_progress_bars_disabled()


def test_plain_resize_to_the_config():
    """Without an image processor: grayscale or RGB as num_channels says, resized to image_size, in [0, 1]."""
    from PIL import Image

    from hf_moekd.recipes.tasks.images import ImagePixels

    image = Image.new("RGB", (12, 7), (255, 0, 0))
    gray = ImagePixels.for_model("no-such-folder-xyz", ViTConfig(image_size=8, num_channels=1))
    assert gray([image, image]).shape == (2, 1, 8, 8)
    rgb = ImagePixels(channels=3, size=4)([image])
    assert rgb.shape == (1, 3, 4, 4) and rgb[0, 0].min() == 1.0 and rgb[0, 1:].max() == 0.0


def _bad_input(case: str, root: Path, folders: tuple[Path, Path], models: tuple[Path, Path]) -> list:
    train, valid = folders
    if case == "missing_folder":
        data = ["--train_file", root / "nothing", "--validation_file", valid]
    elif case == "one_class":
        data = ["--train_file", image_folder(root / "one", {"cat": 0}, 2), "--validation_file", valid]
    elif case == "no_validation":
        data = ["--train_file", train]
    elif case == "no_image_column":
        datasets.DatasetDict({"train": _renamed(train), "validation": _renamed(valid)}).save_to_disk(root / "data")
        data = ["--dataset_name", root / "data"]
    elif case == "teacher_size":
        config = VMoEConfig(**{**BACKBONE, "image_size": 8, "num_channels": 1, "num_hidden_layers": 2}, num_experts=2,
                            num_experts_per_tok=1, **LABELS)
        VMoEForImageClassification(config).save_pretrained(root / "teacher")
        data = ["--train_file", train, "--validation_file", valid, "--teacher_model_name_or_path", root / "teacher"]
    elif case == "unknown_class":
        data = ["--train_file", train, "--validation_file", image_folder(root / "eel", {"cat": 0, "eel": 3}, 2)]
    else:
        data = ["--train_file", train, "--validation_file", valid]
    student = [] if case == "text_student" else ["--model_name_or_path", models[0]]  # default: MiniLM, a text model
    return ["distill", *TASK, *data, *student, "--output_dir", root / "out", *COMMON]


def _renamed(folder: Path) -> datasets.Dataset:
    """The images of `folder` with their image column called 'picture'."""
    from hf_moekd.data.images import read_image_folder

    return read_image_folder(folder, folder.name).rename_column("image", "picture")


@pytest.mark.parametrize("case, expected", [
    ("missing_folder", "nothing does not exist: pass a folder with one subfolder per class"),
    ("one_class", "has a single class folder 'cat': classification needs one subfolder per class, at least two"),
    ("no_validation", "--task image-classification needs --validation_file or --dataset_name"),
    ("no_image_column", "has no column 'image' (columns: picture, label)"),
    ("unknown_class", "has labels ['eel'] that the training data"),
    ("teacher_size", "the teacher takes 8x8 images with 1 channel(s), the student 16x16 with 3"),
    ("text_student", "is a bert model, which AutoModelForImageClassification cannot load"),
])
def test_bad_input_gives_one_line(case, expected, folders, models, tmp_path, capsys):
    assert cli(*_bad_input(case, tmp_path, folders, models)) == 2
    line = error_line(capsys)
    assert line.startswith("error: ") and expected in line, line
    assert not (tmp_path / "out").exists()


def test_evaluate_refuses_a_text_model(folders, tmp_path, capsys):
    from transformers import BertConfig, BertForSequenceClassification

    BertForSequenceClassification(BertConfig(vocab_size=32, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                             intermediate_size=8)).save_pretrained(tmp_path / "bert")
    assert cli("evaluate", tmp_path / "bert", *TASK, "--validation_file", folders[1]) == 2
    assert "needs a *ForImageClassification model" in error_line(capsys)


def test_class_names_of_plain_labels():
    """Labels that are no ClassLabel (ints, strings): sorted, numbers by value; a single class is refused."""
    from hf_moekd.recipes.tasks.images import _class_names

    assert _class_names(datasets.Dataset.from_dict({"y": [10, 2, 2, None]}), "y", "x") == ("2", "10")
    assert _class_names(datasets.Dataset.from_dict({"y": ["owl", "cat", "7"]}), "y", "x") == ("7", "cat", "owl")
    with pytest.raises(ValueError, match=r"x has a single class \['cat'\]"):
        _class_names(datasets.Dataset.from_dict({"y": ["cat", "cat"]}), "y", "x")
