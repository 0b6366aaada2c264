"""Local evaluate metrics (GLUE, seqeval) and the Trainer compute_metrics factories, offline."""

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import matthews_corrcoef
from transformers import EvalPrediction

from hf_moekd.data.text import CONLL_LABELS
from hf_moekd.metrics import METRIC_DIR, conll_compute_metrics, glue_compute_metrics, load_metric

REFS = [1, 1, 1, 0, 0, 1, 0, 1]
PREDS = [1, 0, 1, 0, 1, 1, 0, 1]  # TP 4, FN 1, TN 2, FP 1


def test_metric_scripts_are_named_after_their_folders():
    for folder in ("glue_local", "seqeval_local"):
        assert (METRIC_DIR / folder / f"{folder}.py").is_file()


def test_glue_classification_values():
    assert load_metric("glue", "sst2").compute(predictions=PREDS, references=REFS) == {"accuracy": 0.75}
    assert load_metric("glue", "rte").compute(predictions=PREDS, references=REFS) == {"accuracy": 0.75}
    assert load_metric("glue", "mrpc").compute(predictions=PREDS, references=REFS) == pytest.approx(
        {"accuracy": 0.75, "f1": 0.8}  # f1 = 2*4 / (2*4 + 1 + 1)
    )
    cola = load_metric("glue", "cola").compute(predictions=PREDS, references=REFS)
    assert cola == pytest.approx({"matthews_correlation": 7 / 15})  # (4*2 - 1*1) / sqrt(5*5*3*3)
    assert cola["matthews_correlation"] == pytest.approx(matthews_corrcoef(REFS, PREDS))


def test_glue_stsb_values():
    refs = [0.0, 2.5, 3.0, 5.0, 1.5]
    preds = [0.1, 2.0, 3.5, 4.0, 1.0]  # same ranking as refs
    scores = load_metric("glue", "stsb").compute(predictions=preds, references=refs)
    assert scores["spearmanr"] == pytest.approx(1.0) == pytest.approx(spearmanr(refs, preds)[0])
    assert scores["pearson"] == pytest.approx(pearsonr(refs, preds)[0], rel=1e-6)


def test_metric_name_errors():
    with pytest.raises(ValueError, match="pass config_name as one of: sst2, cola, mrpc, rte, stsb"):
        load_metric("glue")
    with pytest.raises(ValueError, match="Unknown metric 'bleu'; choose one of: glue, seqeval"):
        load_metric("bleu")


def test_seqeval_two_of_three_entities():
    refs = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "I-ORG", "O"]]
    preds = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O", "O"]]  # ORG span cut short
    scores = load_metric("seqeval").compute(predictions=preds, references=refs)
    assert scores["overall_precision"] == scores["overall_recall"] == scores["overall_f1"] == pytest.approx(2 / 3)
    assert scores["overall_accuracy"] == pytest.approx(6 / 7)
    assert scores["PER"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "number": 1}
    assert scores["ORG"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "number": 1}


def test_seqeval_default_and_strict_scheme():
    seqeval = load_metric("seqeval")
    refs, preds = [["B-PER", "I-PER", "O"]], [["I-PER", "I-PER", "O"]]
    assert seqeval.compute(predictions=preds, references=refs)["overall_f1"] == 1.0  # lenient default chunking
    strict = seqeval.compute(predictions=preds, references=refs, scheme="IOB2", mode="strict", zero_division=0)
    assert strict["overall_f1"] == 0.0


def test_glue_compute_metrics_argmax_and_tuple():
    logits = np.array([[2.0, -1.0], [0.1, 0.3], [0.5, 0.4], [-1.0, 1.0]])  # argmax 0, 1, 0, 1
    hidden = np.zeros((4, 3, 5))
    compute = glue_compute_metrics("MRPC")
    scores = compute(EvalPrediction(predictions=(logits, hidden), label_ids=np.array([0, 1, 1, 1])))
    assert scores == pytest.approx({"accuracy": 0.75, "f1": 0.8})


def test_glue_compute_metrics_regression_squeezes():
    refs = np.array([0.0, 2.5, 3.0, 5.0, 1.5], dtype=np.float32)
    preds = np.array([[0.1], [2.0], [3.5], [4.0], [1.0]], dtype=np.float32)
    scores = glue_compute_metrics("sts-b")(EvalPrediction(predictions=preds, label_ids=refs))
    assert scores["pearson"] == pytest.approx(pearsonr(refs, preds[:, 0])[0], rel=1e-5)


def test_conll_compute_metrics_drops_ignored_positions():
    ids = {tag: i for i, tag in enumerate(CONLL_LABELS)}
    pad = -100
    labels = np.array(
        [
            [pad, ids["B-PER"], ids["I-PER"], ids["O"], pad, pad],
            [pad, ids["B-LOC"], pad, ids["O"], ids["B-ORG"], pad],
        ]
    )
    # Predictions at ignored positions are entities that would count as false positives if kept.
    pred_ids = np.array(
        [
            [ids["B-MISC"], ids["B-PER"], ids["I-PER"], ids["O"], ids["B-LOC"], ids["B-LOC"]],
            [ids["B-ORG"], ids["B-LOC"], ids["B-PER"], ids["O"], ids["O"], ids["B-MISC"]],
        ]
    )
    logits = np.eye(len(CONLL_LABELS))[pred_ids]
    expected = {"precision": 1.0, "recall": 2 / 3, "f1": 0.8, "accuracy": 5 / 6}  # ORG missed
    compute = conll_compute_metrics(CONLL_LABELS)
    # from logits also the cross-entropy over the 6 labelled tokens: one-hot logits give log(e + C - 1) - 1 on the
    # 5 right ones and log(e + C - 1) on the wrong one (a token mean, whatever the batching: issue 31.5)
    token_loss = math.log(math.e + len(CONLL_LABELS) - 1) - 5 / 6
    assert compute(EvalPrediction(predictions=(logits,), label_ids=labels)) == pytest.approx({**expected, "loss": token_loss})
    assert compute(EvalPrediction(predictions=pred_ids, label_ids=labels)) == pytest.approx(expected)


def test_metrics_load_in_fresh_offline_process_without_network(tmp_path):
    repo = Path(__file__).resolve().parents[1]
    code = textwrap.dedent(
        """
        import json, socket

        def no_network(*args, **kwargs):
            raise OSError("network access attempted")

        socket.socket.connect = socket.create_connection = no_network
        from hf_moekd.metrics import load_metric

        glue = load_metric("glue", "mrpc").compute(predictions=[1, 0, 1, 1], references=[1, 1, 1, 0])
        ner = load_metric("seqeval").compute(predictions=[["B-PER", "O"]], references=[["B-PER", "O"]])
        print(json.dumps({"glue": glue, "f1": ner["overall_f1"]}))
        """
    )
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf_home"),  # empty caches: nothing pre-downloaded to fall back on
        "PYTHONPATH": os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")])),
    }
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=repo, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    scores = json.loads(result.stdout.strip().splitlines()[-1])
    assert scores == {"glue": {"accuracy": 0.5, "f1": pytest.approx(2 / 3)}, "f1": 1.0}
