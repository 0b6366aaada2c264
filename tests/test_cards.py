"""Model cards: Hub metadata, content, the load snippet, `hf-moekd card`, push_to_hub (offline) and every saving path."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub.utils import validate_repo_id
from safetensors import safe_open
from testing_utils import SCRIPT_FAST, run_script, tiny_bert, tiny_dataset

from hf_moekd.cards import CARD_KEY, card_methods, run_facts, templates_dir, write_model_card
from hf_moekd.cli import main
from hf_moekd.utils.teachers import MINILM_HUB_ID


def front_matter(folder: Path) -> dict:
    text = (folder / "README.md").read_text()
    match = re.match(r"---\n(.*?)\n---\n", text, re.S)
    assert match, "README.md does not open with a YAML front matter block"
    meta = yaml.safe_load(match[1])
    assert meta["library_name"] == "transformers" and "hf_moekd" in meta["tags"]
    for key in ("datasets", "metrics", "tags"):
        assert all(isinstance(v, str) and v for v in meta.get(key, [])), key
    bases = meta.get("base_model", [])
    for base in [bases] if isinstance(bases, str) else bases:  # Hub ids only, never a local path
        validate_repo_id(base)
        assert not Path(base).exists() and not base.startswith(("/", ".", "~")), base
    return meta


def snippet(folder: Path) -> str:
    return re.search(r"```python\n(.*?)```", (folder / "README.md").read_text(), re.S)[1]


def saved_student(folder: Path, results: dict | None = None, **facts) -> Path:
    tiny_bert(num_labels=2).save_pretrained(folder)
    if results is not None:
        (folder / "all_results.json").write_text(json.dumps({**results, CARD_KEY: run_facts(**facts).to_dict()}))
    return folder


def test_front_matter_metrics_and_body(tmp_path):
    teacher = saved_student(tmp_path / "teacher")
    out = saved_student(tmp_path / "student", {"eval_accuracy": 0.8125, "eval_loss": 0.43, "test_f1": 0.5,
                                               "eval_samples_per_second": 321.0, "train_loss": 0.7},
                        methods=["kd"], teacher=str(teacher), student_init="minilm-l6", data=["sst2"],
                        hyperparameters={"learning_rate": 5e-5, "loss_weights": {"ce": 0.5, "logits_kd": 0.5}})
    write_model_card(out)
    meta = front_matter(out)
    assert meta["base_model"] == MINILM_HUB_ID and meta["license"] == "apache-2.0"  # from the initial weights
    assert meta["datasets"] == ["nyu-mll/glue"] and meta["metrics"] == ["accuracy", "f1"]
    assert meta["pipeline_tag"] == "text-classification" and "knowledge-distillation" in meta["tags"]
    text = (out / "README.md").read_text()
    assert "| validation | accuracy | 0.8125 |" in text and "| test | f1 | 0.5 |" in text
    assert "321.0 samples/s" in text and "`ce` × 0.5, `logits_kd` × 0.5" in text and "GLUE SST-2" in text
    params = tiny_bert(num_labels=2).num_parameters()
    assert f"Parameters: {params:,}" in text
    assert "local checkpoint `teacher`" in text and str(tmp_path) not in text  # no local paths in a public card


def test_local_teacher_and_random_student_give_no_base_model(tmp_path):
    out = saved_student(tmp_path / "out", {"eval_accuracy": 0.5}, methods=["kd"], teacher=str(tmp_path / "out"))
    write_model_card(out)
    meta = front_matter(out)
    assert "base_model" not in meta and "license" not in meta


@pytest.mark.parametrize("kind, auto_class, remote", [
    ("bert", "AutoModelForSequenceClassification", False),
    ("minimoe", "AutoModelForSequenceClassification", True),
    ("dense_vit", "AutoModelForImageClassification", True),
])
def test_load_snippet_loads_and_asks_for_remote_code_only_for_custom_models(kind, auto_class, remote, tmp_path):
    out = tmp_path / kind
    if kind == "dense_vit":
        from hf_moekd.models.dense_vit import DenseViTConfig, DenseViTForImageClassification

        DenseViTForImageClassification(DenseViTConfig(image_size=8, patch_size=4, num_channels=1, hidden_size=16,
                                                      num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
                                                      num_labels=3)).save_pretrained(out)
    else:
        from hf_moekd.models.minimoe import minimoe_from_dense

        model = tiny_bert(num_labels=2)
        (minimoe_from_dense(model, num_ffn_experts=2) if kind == "minimoe" else model).save_pretrained(out)
    write_model_card(out, method="kd")
    code = snippet(out)
    assert f"model = {auto_class}.from_pretrained" in code and ("trust_remote_code=True" in code) == remote
    assert front_matter(out)["pipeline_tag"] in {"text-classification", "image-classification"}
    namespace: dict = {}
    exec(code.replace(f'"{kind}"', repr(str(out))), namespace)  # the snippet as printed, on the local folder
    assert namespace["model"].config.model_type == kind


def test_every_method_template_renders(tmp_path):
    out = saved_student(tmp_path / "plain")
    methods = card_methods()
    assert {p.stem for p in (templates_dir() / "methods").glob("*.md")} == set(methods)
    assert {"kd", "ones", "opdf", "minimoe", "mode", "m2mkd", "gathering"} <= set(methods)
    for name, method in methods.items():
        write_model_card(out, method=name)
        assert f"### {method.title}" in (out / "README.md").read_text()
        assert set(method.tags) <= set(front_matter(out)["tags"])


def test_card_cli_regenerates_and_refuses_bad_folders(tmp_path, capsys):
    out = saved_student(tmp_path / "run", {"eval_accuracy": 0.75}, methods=["fine-tune"], data=["cola"])
    main(["card", str(out)])
    assert capsys.readouterr().out.strip() == f"model card written to {out / 'README.md'}"
    assert front_matter(out)["datasets"] == ["nyu-mll/glue"] and "GLUE CoLA" in (out / "README.md").read_text()
    main(["card", str(out), "--method", "opdf", "--model_id", "me/run"])
    assert "### OPDF" in (out / "README.md").read_text() and '"me/run"' in snippet(out)
    for key in ("run_kind", "mode"):  # all_results.json without card facts: they come from run_kind ("mode" before)
        legacy = saved_student(tmp_path / f"legacy_{key}")
        (legacy / "all_results.json").write_text(json.dumps({key: "distil", "task": "rte", "eval_accuracy": 0.6}))
        main(["card", str(legacy)])
        assert "knowledge-distillation" in front_matter(legacy)["tags"]
    (tmp_path / "empty").mkdir()
    bare = saved_student(tmp_path / "bare")
    capsys.readouterr()
    for folder, expected in [(tmp_path / "empty", "has no config.json"), (tmp_path / "missing", "does not exist"),
                             (bare, "pass --method")]:
        with pytest.raises(SystemExit) as exit_:
            main(["card", str(folder)])
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and expected in err[0], err
    assert not (tmp_path / "empty" / "README.md").exists()
    with pytest.raises(SystemExit):
        main(["card", str(out), "--method", "nope"])
    assert "card" in main_help(capsys)


def main_help(capsys) -> str:
    with pytest.raises(SystemExit):
        main(["--help"])
    return capsys.readouterr().out


class FakeHub:
    """Stands in for transformers' HfApi: records what push_to_hub would upload."""

    def __init__(self) -> None:
        self.uploads: list[dict] = []

    def create_repo(self, repo_id, **_):
        return type("RepoUrl", (), {"repo_id": repo_id})()

    def upload_folder(self, repo_id, folder_path, ignore_patterns=(), **_):
        from fnmatch import fnmatch

        root = Path(folder_path)
        files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()
                       and not any(fnmatch(part, pat) for part in p.relative_to(root).parts for pat in ignore_patterns))
        self.uploads.append({"repo_id": repo_id, "files": files, "readme": (root / "README.md").read_text(),
                             "weights": {f: _shapes(root / f) for f in files if f.endswith(".safetensors")}})


def _shapes(path: Path) -> dict:
    with safe_open(str(path), "pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def test_push_to_hub_uploads_our_card_and_the_student_only(tmp_path, monkeypatch):
    import transformers.trainer

    from hf_moekd.distillation import DistillationArguments, DistillationTrainer
    from hf_moekd.recipes import save_run

    hub = FakeHub()
    monkeypatch.setattr(transformers.trainer, "hf_api", lambda: hub)
    student, teacher = tiny_bert(seed=0, hidden=32), tiny_bert(seed=1, hidden=48)
    args = DistillationArguments(output_dir=str(tmp_path / "out"), max_steps=1, per_device_train_batch_size=8,
                                 report_to=[], use_cpu=True, push_to_hub=True, hub_model_id="me/tiny-student",
                                 save_strategy="no", hidden_loss_weight=1.0)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=tiny_dataset(16))
    trainer.train()
    save_run(trainer, {"eval_accuracy": 0.4}, None, ["sst2"])
    assert len(hub.uploads) == 1
    upload = hub.uploads[0]
    repo_id = "me/tiny-student"  # never downloaded: the upload is captured by a fake Hub client
    assert upload["repo_id"] == repo_id
    assert {"README.md", "config.json", "model.safetensors", "all_results.json"} <= set(upload["files"])
    assert upload["readme"] == (tmp_path / "out" / "README.md").read_text()
    assert "hf_moekd" in upload["readme"] and f'.from_pretrained("{repo_id}")' in upload["readme"]
    assert "| validation | accuracy | 0.4 |" in upload["readme"] and "This model is a fine-tuned version" not in upload["readme"]
    expected = {k: tuple(v.shape) for k, v in student.state_dict().items()}
    assert list(upload["weights"]) == ["model.safetensors"] and upload["weights"]["model.safetensors"].items() <= expected.items()
    assert front_matter(tmp_path / "out")["datasets"] == ["nyu-mll/glue"]


@pytest.mark.slow
def test_example_script_writes_card_that_the_cli_reproduces(data_dir, tmp_path, monkeypatch, capsys):
    from transformers import AutoModelForSequenceClassification

    from hf_moekd.utils.teachers import minilm_path

    out, teacher = tmp_path / "student", tmp_path / "teacher"
    AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2).save_pretrained(teacher)
    code = run_script("run_glue.py", "--task_name", "sst2", "--data_dir", str(data_dir / "glue"), "--output_dir", str(out),
                      "--teacher_model_name_or_path", str(teacher), "--model_name_or_path", "minilm-l6",
                      "--student_layers", "0,1", *SCRIPT_FAST, monkeypatch=monkeypatch)
    assert code == 0
    meta = front_matter(out)
    assert meta["base_model"] == MINILM_HUB_ID and meta["datasets"] == ["nyu-mll/glue"]  # the initial weights, via the alias
    results = json.loads((out / "all_results.json").read_text())
    card = (out / "README.md").read_text()
    assert results[CARD_KEY]["methods"] == ["kd"] and f"| validation | accuracy | {results['eval_accuracy']:.4g}" in card
    main(["card", str(out)])
    assert (out / "README.md").read_text() == card


def test_gathered_model_has_a_card(tmp_path):
    import transformers as tf

    snapshot = tmp_path / "hub" / "models--acme--tiny-mixtral" / "snapshots" / "0123abc"
    torch.manual_seed(0)
    tf.MixtralForCausalLM(tf.MixtralConfig(vocab_size=99, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                           num_key_value_heads=2, intermediate_size=16, num_local_experts=4,
                                           max_position_embeddings=64)).save_pretrained(snapshot)
    from hf_moekd.ones import gather_experts

    out = gather_experts(snapshot, "svd", rank=4, output_dir=tmp_path / "dense", return_model=False, progress=False)
    meta = front_matter(out)
    assert meta["base_model"] == "acme/tiny-mixtral" and meta["pipeline_tag"] == "text-generation"
    assert {"knowledge-gathering", "mixture-of-experts"} <= set(meta["tags"])
    assert "AutoModelForCausalLM.from_pretrained(\"dense\")" in snippet(out) and "strategy `svd`, rank 4" in (out / "README.md").read_text()
    assert json.loads((out / "all_results.json").read_text())[CARD_KEY]["methods"] == ["gathering"]


@pytest.mark.parametrize("model_type", ["dense_vit", "ones"])  # "ones": checkpoints saved before the rename
def test_ones_card_recognises_the_dense_image_model(model_type):
    recognises = card_methods()["ones"].recognises
    assert recognises({"model_type": model_type}, {"per_seed": {}})
    assert not recognises({"model_type": "vmoe"}, {"per_seed": {}})
    assert not recognises({"model_type": model_type}, {"eval_accuracy": 0.9})


def test_ones_save_writes_card_with_the_comparison(tmp_path):
    from hf_moekd.models.dense_vit import DenseViTConfig, DenseViTForImageClassification
    from hf_moekd.studies.ones import OneSArguments, card_facts
    from hf_moekd.studies.vision import save_and_check

    args = OneSArguments(hidden_size=16, intermediate_size=16, num_attention_heads=2, seeds=[0])
    model = DenseViTForImageClassification(DenseViTConfig(image_size=8, patch_size=2, num_channels=1, hidden_size=16,
                                                          num_hidden_layers=1, num_attention_heads=2,
                                                          intermediate_size=16, num_labels=10)).eval()
    per_seed = {"dense": [0.9], "moe": [0.95], "svd gathered only": [0.5], "svd + KD (OneS)": [0.93]}
    summary = {"latency_ms": {"dense_batch1": 1.0, "moe_batch1": 3.0}, "params": {"dense": 10, "moe": 20}}
    save_and_check(model, str(tmp_path / "ones"), torch.rand(2, 1, 8, 8), facts=card_facts(args, "the run's V-MoE"),
                   results={"summary": summary, "per_seed": per_seed, "test_accuracy": 0.93})
    text = (tmp_path / "ones" / "README.md").read_text()
    assert "| svd + KD (OneS) |" in text and "| test | accuracy | 0.93 |" in text and "(3.00x faster)" in text
    assert "trust_remote_code=True" in snippet(tmp_path / "ones") and "ones" in front_matter(tmp_path / "ones")["tags"]
    assert not list(tmp_path.glob(".ones.tmp-*"))  # written inside the atomic temporary folder
