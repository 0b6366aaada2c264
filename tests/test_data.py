"""hf_moekd.data.text on the real GLUE / CoNLL-2003 files and on small malformed ones."""

import re
from collections import Counter
from pathlib import Path

import pytest
from datasets import ClassLabel, Dataset, DatasetDict, Value

from hf_moekd.data import text as data
from hf_moekd.data.text import CONLL_LABELS, get_glue_task, glue_label_names, load_conll, load_glue

# Label counts (by class name) per split, from the data README.
GLUE_COUNTS = {
    "sst2": ({"negative": 29780, "positive": 37569}, {"negative": 428, "positive": 444}),
    "cola": ({"unacceptable": 2528, "acceptable": 6023}, {"unacceptable": 322, "acceptable": 721}),
    "mrpc": ({"not_equivalent": 1194, "equivalent": 2474}, {"not_equivalent": 129, "equivalent": 279}),
    "rte": ({"entailment": 1249, "not_entailment": 1241}, {"entailment": 146, "not_entailment": 131}),
}


def write_tsv(root: Path, folder: str, text: str) -> Path:
    """Write `text` as both train.tsv and dev.tsv of root/folder and return root."""
    (root / folder).mkdir()
    for name in ("train.tsv", "dev.tsv"):
        (root / folder / name).write_text(text, encoding="utf-8")
    return root


def write_conll(root: Path, text: str) -> Path:
    for name in ("train.txt", "valid.txt", "test.txt"):
        (root / name).write_text(text, encoding="utf-8")
    return root


@pytest.mark.parametrize("task", GLUE_COUNTS)
def test_glue_classification_counts(data_dir, task):
    ds = load_glue(task, data_dir / "glue")
    label = ds["train"].features["label"]
    assert isinstance(label, ClassLabel) and label.names == glue_label_names(task)
    for split, expected in zip(("train", "validation"), GLUE_COUNTS[task]):
        assert Counter(label.int2str(ds[split]["label"])) == expected
    pair = len(get_glue_task(task).text_columns) == 2
    assert ds["train"].column_names == (["sentence1", "sentence2", "label"] if pair else ["sentence1", "label"])


def test_stsb_is_regression(data_dir):
    ds = load_glue("STS-B", data_dir / "glue")
    assert {split: len(d) for split, d in ds.items()} == {"train": 5749, "validation": 1500}
    assert ds["train"].features["label"] == Value("float32")
    for split, mean in (("train", 2.701), ("validation", 2.364)):
        scores = ds[split]["label"]
        assert 0.0 <= min(scores) and max(scores) <= 5.0
        assert sum(scores) / len(scores) == pytest.approx(mean, abs=1e-3)
    first = {"sentence1": "A plane is taking off.", "sentence2": "An air plane is taking off.", "label": 5.0}
    assert ds["train"][0] == first


def test_mrpc_bom_and_quotes(data_dir):
    first = load_glue("mrpc", data_dir / "glue")["train"][0]
    assert first["label"] == 1
    assert first["sentence1"].startswith('Amrozi accused his brother, whom he called "the witness", of')
    assert not any("\ufeff" in value for value in (first["sentence1"], first["sentence2"]))


def test_sst2_keeps_text_verbatim(data_dir):
    first = load_glue("sst2", data_dir / "glue")["train"][0]
    assert first == {"sentence1": "hide new secretions from the parental units ", "label": 0}


def test_conll_counts(data_dir):
    ds = load_conll(data_dir / "conll2003")
    assert {split: len(d) for split, d in ds.items()} == {"train": 14041, "validation": 3250, "test": 3453}
    train = ds["train"]
    tags = train.features["ner_tags"].feature
    assert tags.names == list(CONLL_LABELS)
    assert sum(map(len, train["tokens"])) == 203621
    assert train[0]["tokens"][:3] == ["EU", "rejects", "German"]
    assert tags.int2str(train[0]["ner_tags"][:3]) == ["B-ORG", "O", "B-MISC"]
    entities = Counter(tag[2:] for row in train["ner_tags"] for tag in tags.int2str(row) if tag.startswith("B-"))
    assert entities == {"PER": 6600, "LOC": 7140, "ORG": 6321, "MISC": 3438}


def test_conll_tolerates_docstart_and_space_columns(tmp_path):
    text = "-DOCSTART- -X- -X- O\n\nEU NNP B-NP B-ORG\nrejects VBZ B-VP O\n\nPeter\tB-PER\nBlackburn\tI-PER\n"
    ds = load_conll(write_conll(tmp_path, text))["train"]
    assert ds["tokens"] == [["EU", "rejects"], ["Peter", "Blackburn"]]
    assert ds["ner_tags"] == [[3, 0], [1, 2]]


def test_task_lookup():
    assert get_glue_task("SST-2") is get_glue_task("sst2")
    assert get_glue_task("STS-B").is_regression and glue_label_names("stsb") is None
    assert get_glue_task("CoLA").metrics == ("matthews_correlation",)
    with pytest.raises(ValueError, match="Unknown GLUE task 'qnli'; choose one of: sst2, cola, mrpc, rte, stsb"):
        load_glue("qnli", "unused")


def test_missing_glue_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"SST-2/train\.tsv; pass --data_dir .*SST-2/, CoLA/"):
        load_glue("sst2", tmp_path)


def test_missing_conll_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"train\.txt; pass --data_dir"):
        load_conll(tmp_path)


def test_glue_missing_label_column(tmp_path):
    root = write_tsv(tmp_path, "SST-2", "sentence\tscore\ngood \t1\n")
    expected = "train.tsv: expected columns ['sentence', 'label'], found ['sentence', 'score']"
    with pytest.raises(ValueError, match=re.escape(expected)):
        load_glue("sst2", root)


def test_glue_wrong_field_count(tmp_path):
    root = write_tsv(tmp_path, "SST-2", "sentence\tlabel\ngood \t1\nbad \t0\textra\n")
    with pytest.raises(ValueError, match=r"train\.tsv:3: expected 2 tab-separated fields .*, found 3"):
        load_glue("sst2", root)
    root = write_tsv(tmp_path, "CoLA", "gj04\t1\tA sentence.\n")  # header-less, author_mark missing
    with pytest.raises(ValueError, match=r"train\.tsv:1: expected 4 tab-separated fields"):
        load_glue("cola", root)


@pytest.mark.parametrize(
    ("task", "folder", "text", "message"),
    [
        (
            "rte",
            "RTE",
            "index\tsentence1\tsentence2\tlabel\n0\tA.\tB.\tmaybe\n",
            "'maybe' in column 'label' (allowed: entailment, not_entailment)",
        ),
        ("sst2", "SST-2", "sentence\tlabel\ngood \t1\nodd \t2\n", "'2' in column 'label' (allowed: 0, 1)"),
        ("stsb", "STS-B", "sentence1\tsentence2\tscore\nA.\tB.\thigh\n", "'high' in column 'score' (allowed: numbers)"),
    ],
)
def test_glue_unknown_label(tmp_path, task, folder, text, message):
    with pytest.raises(ValueError, match=re.escape(f"train.tsv: unknown label {message}")):
        load_glue(task, write_tsv(tmp_path, folder, text))


def test_conll_unknown_tag(tmp_path):
    with pytest.raises(ValueError, match=r"train\.txt:2: unknown NER tag 'B-FOO' \(allowed: O, B-PER"):
        load_conll(write_conll(tmp_path, "EU\tB-ORG\nrejects\tB-FOO\n"))


def test_hub_paths_map_columns(monkeypatch):
    calls = []

    def fake_load_dataset(*args, **kwargs):
        calls.append((args, kwargs))
        if args[0] == "nyu-mll/glue":
            split = Dataset.from_dict({"sentence": ["a"], "label": [1], "idx": [0]})
            return DatasetDict(train=split, validation=split, test=split)
        split = Dataset.from_dict({"id": ["0"], "tokens": [["EU"]], "pos_tags": [[1]], "ner_tags": [[3]]})
        return DatasetDict(train=split, validation=split, test=split)

    monkeypatch.setattr(data.datasets, "load_dataset", fake_load_dataset)
    glue = load_glue("sst2")
    assert list(glue) == ["train", "validation"] and glue["train"].column_names == ["sentence1", "label"]
    assert load_conll()["test"].column_names == ["tokens", "ner_tags"]
    assert [call[0][0] for call in calls] == ["nyu-mll/glue", "eriktks/conll2003"]
