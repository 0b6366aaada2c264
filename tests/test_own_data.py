"""Your own data: `--task text-classification` and `--task ner` on files the tests write (each format, string labels,
a regression set, a non-CoNLL tag set): teacher fine-tune, student distil, evaluate, reload with the Auto class;
bad input is one line naming the file and the fix."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from transformers import AutoModelForImageClassification, AutoModelForSequenceClassification, AutoModelForTokenClassification

from testing_utils import TINY_BERT, cli

WORDS = {"joy": "a happy bright sunny day", "anger": "a furious loud angry shout", "calm": "a quiet slow still lake"}


def sentiment_rows(n: int = 24) -> list[dict]:
    labels = list(WORDS)
    return [{"text": f"{WORDS[labels[i % 3]]} number {i}", "label": labels[i % 3]} for i in range(n)]


def write(rows: list[dict], path: Path) -> Path:
    frame = pd.DataFrame(rows)
    if path.suffix == ".csv":
        frame.to_csv(path, index=False)
    elif path.suffix == ".tsv":
        frame.to_csv(path, index=False, sep="\t")
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows))
    else:
        frame.to_parquet(path)
    return path


COMMON = ["--save_strategy", "no", "--max_steps", "2", "--per_device_train_batch_size", "8", "--max_seq_length", "32",
          "--report_to", "none", "--disable_tqdm", "true", "--use_cpu", "true"]


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".json", ".jsonl", ".parquet"])
def test_three_string_labels_teacher_student_evaluate(tmp_path, suffix, capsys):
    train, valid = write(sentiment_rows(), tmp_path / f"train{suffix}"), write(sentiment_rows(9), tmp_path / f"valid{suffix}")
    teacher, student = tmp_path / "teacher", tmp_path / "student"
    files = ["--task", "text-classification", "--train_file", train, "--validation_file", valid]
    assert cli("distill", *files, "--output_dir", teacher, "--student_config_overrides", TINY_BERT, *COMMON) == 0
    config = AutoModelForSequenceClassification.from_pretrained(teacher).config
    assert config.id2label == {0: "anger", 1: "calm", 2: "joy"}
    assert cli("distill", *files, "--output_dir", student, "--model_name_or_path", teacher,
               "--teacher_model_name_or_path", teacher, *COMMON) == 0
    results = json.loads((student / "all_results.json").read_text())
    assert results["run_kind"] == "distil" and {"eval_accuracy", "eval_f1_macro"} <= set(results)
    capsys.readouterr()
    assert cli("evaluate", student, "--task", "text-classification", "--validation_file", valid,
               "--max_seq_length", "32", "--output_file", tmp_path / "eval.json") == 0
    metrics = json.loads((tmp_path / "eval.json").read_text())["metrics"]
    assert metrics["eval_accuracy"] == pytest.approx(results["eval_accuracy"])


def test_regression_and_pairs_from_csv(tmp_path):
    rows = [{"sentence1": f"a {w} thing", "sentence2": f"another {w} thing", "score": i / 5 + 0.3}
            for i, w in enumerate(["red", "blue", "green", "small", "big", "odd"] * 3)]
    train, valid = write(rows, tmp_path / "train.csv"), write(rows[:6], tmp_path / "valid.csv")
    out = tmp_path / "model"
    assert cli("distill", "--task", "text-classification", "--train_file", train, "--validation_file", valid,
               "--label_column_name", "score", "--output_dir", out, "--student_config_overrides", TINY_BERT,
               *COMMON) == 0
    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert model.config.num_labels == 1 and model.config.problem_type == "regression"
    results = json.loads((out / "all_results.json").read_text())
    assert {"eval_pearson", "eval_spearmanr", "eval_mse"} <= set(results)


TWEETS = [("Paris", "B-geo-loc"), ("is", "O"), ("home", "O"), ("of", "O"), ("the", "O"), ("Louvre", "B-facility"),
          ("Museum", "I-facility"), ("says", "O"), ("@bob", "B-person")]


def test_ner_with_its_own_tag_set(tmp_path):
    column = tmp_path / "train.conll"
    column.write_text("-DOCSTART- O\n\n" + "\n\n".join("\n".join(f"{w}\t{t}" for w, t in TWEETS) for _ in range(8)) + "\n")
    valid = tmp_path / "valid.jsonl"
    valid.write_text("".join(json.dumps({"tokens": [w for w, _ in TWEETS], "tags": [t for _, t in TWEETS]}) + "\n"
                             for _ in range(3)))
    out = tmp_path / "ner"
    assert cli("distill", "--task", "ner", "--train_file", column, "--validation_file", valid, "--output_dir", out,
               "--student_config_overrides", TINY_BERT, *COMMON) == 0
    model = AutoModelForTokenClassification.from_pretrained(out)
    assert list(model.config.id2label.values()) == ["O", "B-facility", "I-facility", "B-geo-loc", "B-person"]
    assert "eval_f1" in json.loads((out / "all_results.json").read_text())



def test_ner_evaluate_loss_is_a_token_mean_whatever_the_batch_size(tmp_path):
    """Issue 31.5: `hf-moekd evaluate` averaged the NER loss over batches (0.3706 at 32, 0.3694 at 64)."""
    import torch

    column = tmp_path / "train.conll"
    column.write_text("\n\n".join("\n".join(f"{w}\t{t}" for w, t in TWEETS) for _ in range(8)) + "\n")
    valid = tmp_path / "valid.jsonl"  # sentences of different lengths: a per-batch mean depends on the batching
    valid.write_text("".join(json.dumps({"tokens": [w for w, _ in TWEETS[:n]], "tags": [t for _, t in TWEETS[:n]]})
                             + "\n" for n in (2, 9, 4, 7, 3)))
    out = tmp_path / "ner"
    assert cli("distill", "--task", "ner", "--train_file", column, "--validation_file", valid, "--output_dir", out,
               "--student_config_overrides", TINY_BERT, *COMMON) == 0
    losses = []
    for batch in ("1", "5"):
        report = tmp_path / f"eval{batch}.json"
        assert cli("evaluate", out, "--task", "ner", "--validation_file", valid, "--batch_size", batch,
                   "--max_seq_length", "32", "--output_file", report) == 0
        losses.append(json.loads(report.read_text())["metrics"]["eval_loss"])
    assert losses[1] == pytest.approx(losses[0], rel=1e-6)
    from transformers import AutoTokenizer

    from hf_moekd.recipes.tasks import align_labels

    model, tokenizer = AutoModelForTokenClassification.from_pretrained(out).eval(), AutoTokenizer.from_pretrained(out)
    label2id, total, count = model.config.label2id, 0.0, 0
    for line in valid.read_text().splitlines():
        row = json.loads(line)
        enc = tokenizer(row["tokens"], is_split_into_words=True, truncation=True, max_length=32, return_tensors="pt")
        labels = torch.tensor(align_labels(enc.word_ids(0), [label2id[t] for t in row["tags"]]))
        with torch.no_grad():
            logits = model(**enc).logits[0]
        keep = labels != -100
        total += torch.nn.functional.cross_entropy(logits[keep], labels[keep], reduction="sum").item()
        count += int(keep.sum())
    assert losses[0] == pytest.approx(total / count, rel=1e-5)

def test_bad_input_is_one_line(tmp_path, capsys):
    train = write(sentiment_rows(), tmp_path / "train.csv")
    unseen = write([{"text": "x y", "label": "fear"}], tmp_path / "unseen.csv")
    nolabel = write([{"text": "x y", "target": "joy"}], tmp_path / "nolabel.csv")
    nolabel_jsonl = tmp_path / "nolabel.jsonl"
    nolabel_jsonl.write_text("".join(json.dumps({"text": f"x y {i}"}) + "\n" for i in range(4)))
    (tmp_path / "empty.csv").write_text("")
    (tmp_path / "data.xlsx").write_text("x")
    mixed = tmp_path / "mixed.conll"
    mixed.write_text("a\tB-PER\nb\tE-PER\n")
    afile = tmp_path / "afile"
    afile.write_text("x")
    cases = [
        (["--validation_file", unseen], "unseen.csv (validation) has labels ['fear']"),
        (["--validation_file", nolabel], "has no column 'label' (columns: text, target); pass --label_column_name"),
        # issue 31.2: a training file without labels, a wrong --label_column_name, JSON lines without `label`
        (["--validation_file", train, "--train_file", nolabel], "nolabel.csv has no column 'label' (columns: text, "
         "target); pass --label_column_name"),
        (["--validation_file", train, "--label_column_name", "mood"], "has no column 'mood' (columns: text, label)"),
        (["--validation_file", train, "--train_file", nolabel_jsonl], "nolabel.jsonl has no column 'label' (columns: "
         "text)"),
        (["--validation_file", tmp_path / "empty.csv"], "empty.csv is empty"),
        (["--validation_file", tmp_path / "data.xlsx"], "unknown file type '.xlsx'"),
        (["--validation_file", train, "--max_seq_length", "0"], "--max_seq_length must be >= 1"),
    ]
    for extra, message in cases:
        args = ["distill", "--task", "text-classification", "--train_file", train, "--output_dir", tmp_path / "out",
                *COMMON, "--student_config_overrides", TINY_BERT, *extra]
        assert cli(*args) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert len(err) == 1 and message in err[0], err
        assert not (tmp_path / "out").exists()
    assert cli("distill", "--task", "ner", "--train_file", mixed, "--validation_file", mixed, "--output_dir",
               tmp_path / "out", *COMMON, "--student_config_overrides", TINY_BERT) == 2
    assert "not BIO / IOB1" in capsys.readouterr().err
    assert cli("distill", "--task", "text-classification", "--train_file", train, "--validation_file", train,
               "--output_dir", afile, *COMMON, "--student_config_overrides", TINY_BERT) == 2
    assert "is a file" in capsys.readouterr().err


def test_teacher_without_its_task_head_is_refused(tmp_path, capsys):
    """A base checkpoint (no classifier) as teacher: its head would be random; refused before training."""
    from hf_moekd.utils.teachers import MINILM

    train = write(sentiment_rows(), tmp_path / "train.csv")
    assert cli("distill", "--task", "text-classification", "--train_file", train, "--validation_file", train,
               "--teacher_model_name_or_path", MINILM, "--output_dir", tmp_path / "out", *COMMON,
               "--student_config_overrides", TINY_BERT) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "has no trained weights for classifier" in err[0] and "fine-tune it" in err[0], err


def test_dataset_name_local_folder_of_split_files(tmp_path, capsys):
    """`--dataset_name FOLDER` (how `datasets.load_dataset` reads a Hub repo's split files, offline)."""
    folder = tmp_path / "my_dataset"
    folder.mkdir()
    write(sentiment_rows(), folder / "train.jsonl")
    write(sentiment_rows(9), folder / "validation.jsonl")
    out = tmp_path / "model"
    assert cli("distill", "--task", "text-classification", "--dataset_name", folder, "--output_dir", out,
               "--student_config_overrides", TINY_BERT, *COMMON) == 0
    assert AutoModelForSequenceClassification.from_pretrained(out).config.id2label == {0: "anger", 1: "calm", 2: "joy"}
    results = json.loads((out / "all_results.json").read_text())
    capsys.readouterr()
    assert cli("evaluate", out, "--task", "text-classification", "--dataset_name", folder, "--max_seq_length", "32",
               "--output_file", tmp_path / "eval.json") == 0
    assert json.loads((tmp_path / "eval.json").read_text())["metrics"]["eval_accuracy"] == pytest.approx(
        results["eval_accuracy"])


def test_dataset_name_hub_style_class_labels(tmp_path):
    """A DatasetDict as the Hub serves GLUE / CoNLL-2003: ClassLabel ids become the model's id2label in the dataset's
    order; an unlabelled (-1) test split is not scored; NER tags from a `ner_tags` sequence of ClassLabel."""
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Sequence, Value

    features = Features({"sentence": Value("string"), "label": ClassLabel(names=["positive", "negative"])})
    rows = [{"sentence": f"{'good fine great' if i % 2 == 0 else 'bad awful poor'} film {i}", "label": i % 2}
            for i in range(24)]
    test = [{**r, "label": -1} for r in rows[:4]]
    glue = tmp_path / "glue_like"
    DatasetDict({"train": Dataset.from_list(rows, features=features), "validation": Dataset.from_list(rows[:8], features=features),
                 "test": Dataset.from_list(test, features=features)}).save_to_disk(str(glue))
    out = tmp_path / "sst"
    assert cli("distill", "--task", "text-classification", "--dataset_name", glue, "--output_dir", out,
               "--student_config_overrides", TINY_BERT, *COMMON) == 0
    assert AutoModelForSequenceClassification.from_pretrained(out).config.id2label == {0: "positive", 1: "negative"}
    results = json.loads((out / "all_results.json").read_text())
    assert "eval_accuracy" in results and not any(k.startswith("test_") for k in results)

    names = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
    ner_features = Features({"tokens": Sequence(Value("string")), "ner_tags": Sequence(ClassLabel(names=names))})
    sentence = {"tokens": ["Ada", "Lovelace", "visits", "Paris"], "ner_tags": [1, 2, 0, 3]}
    conll = tmp_path / "conll_like"
    DatasetDict({split: Dataset.from_list([sentence] * n, features=ner_features)
                 for split, n in (("train", 16), ("validation", 4))}).save_to_disk(str(conll))
    ner = tmp_path / "ner"
    assert cli("distill", "--task", "ner", "--dataset_name", conll, "--output_dir", ner,
               "--student_config_overrides", TINY_BERT, *COMMON) == 0
    assert list(AutoModelForTokenClassification.from_pretrained(ner).config.id2label.values()) == names


def test_dataset_name_errors_are_one_line(tmp_path, capsys):
    train = write(sentiment_rows(), tmp_path / "train.csv")
    only_train = tmp_path / "only_train"
    only_train.mkdir()
    write(sentiment_rows(), only_train / "train.csv")
    cases = [
        (["--dataset_name", tmp_path / "nowhere"], "cannot be loaded"),
        (["--dataset_name", only_train], "has no 'validation' split (splits: train)"),
        (["--dataset_name", only_train, "--train_file", train], "either --dataset_name or --train_file"),
    ]
    for extra, message in cases:
        assert cli("distill", "--task", "text-classification", "--output_dir", tmp_path / "out", *COMMON,
                   "--student_config_overrides", TINY_BERT, *extra) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert len(err) == 1 and message in err[0], err
        assert not (tmp_path / "out").exists()


def image_folder(root: Path, classes: dict[str, int], per_class: int) -> Path:
    """One subfolder per class of small RGB PNGs: a bright square at a class-specific place, plus noise."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(len(str(root)))
    for name, offset in classes.items():
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 60, (12, 12, 3)).astype(np.uint8)
            pixels[offset:offset + 5, offset:offset + 5] = 250
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


@pytest.mark.slow
def test_image_folders_for_ones_and_m2mkd(tmp_path):
    from hf_moekd.studies.m2mkd import M2MArguments, run_m2mkd
    from hf_moekd.studies.ones import OneSArguments, run_ones

    classes = {"cat": 0, "dog": 3, "owl": 6}
    train, valid = image_folder(tmp_path / "train", classes, 8), image_folder(tmp_path / "valid", classes, 3)
    data = dict(dataset="imagefolder", train_dir=str(train), validation_dir=str(valid), image_size=8)
    report = run_ones(OneSArguments(**data, hidden_size=16, intermediate_size=16, num_hidden_layers=2, num_experts=4,
                                    epochs=1, kd_epochs=1, batch_size=8, seeds=[0], measure_speed=False,
                                    controls=False, output_dir=str(tmp_path / "ones")), progress=False)
    model = AutoModelForImageClassification.from_pretrained(tmp_path / "ones")
    assert model.config.id2label == {0: "cat", 1: "dog", 2: "owl"} and model.config.image_size == 8
    assert len(report.accuracy["moe"]) == 1
    m2m = run_m2mkd(M2MArguments(**data, patch_size=2, teacher_hidden_size=16, teacher_layers=2, teacher_heads=2,
                                 teacher_intermediate_size=16, hidden_size=16, num_hidden_layers=2, num_modules=2,
                                 intermediate_size=16, num_experts=2, teacher_epochs=1, meta_epochs=0, module_epochs=1,
                                 finetune_epochs=1, batch_size=8, seeds=[0], output_dir=str(tmp_path / "m2m")),
                    progress=False)
    assert m2m.summary()["models"]
    with pytest.raises(ValueError, match="needs --train_dir and --validation_dir"):
        run_ones(OneSArguments(dataset="imagefolder", output_dir=None), progress=False)
    (tmp_path / "valid" / "eel").mkdir()
    (tmp_path / "valid" / "cat" / "0.png").rename(tmp_path / "valid" / "eel" / "0.png")
    with pytest.raises(ValueError, match=r"classes \['eel'\] that the training images do not have"):
        run_ones(OneSArguments(**data, output_dir=None), progress=False)
