"""Write a model folder's card (README.md) from the `model_cards/` templates, its config.json and all_results.json."""
from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import Any

import jinja2
from huggingface_hub import ModelCard, ModelCardData

from ..utils.outputs import NOT_METRIC_SUFFIXES
from .facts import RunFacts, describe_data, hub_id, is_moe
from .registry import card_method, card_methods, check_methods

CARD_KEY = "model_card"  # where all_results.json keeps the RunFacts
# Auto class -> (transformers' model_type -> class names table, Hub pipeline tag); checked in this order
AUTO_CLASSES = {
    "AutoModelForSequenceClassification": ("MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES", "text-classification"),
    "AutoModelForTokenClassification": ("MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES", "token-classification"),
    "AutoModelForImageClassification": ("MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES", "image-classification"),
    "AutoModelForCausalLM": ("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "text-generation"),
    "AutoModelForMaskedLM": ("MODEL_FOR_MASKED_LM_MAPPING_NAMES", "fill-mask"),
    "AutoModelForSeq2SeqLM": ("MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES", "text2text-generation"),
    "AutoModelForQuestionAnswering": ("MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES", "question-answering"),
    "AutoModel": ("MODEL_MAPPING_NAMES", "feature-extraction"),
}
HUB_METRICS = {"accuracy": "accuracy", "f1": "f1", "precision": "precision", "recall": "recall",
               "matthews_correlation": "matthews_correlation", "pearson": "pearsonr", "spearmanr": "spearmanr"}
_TRAINING = {"train_loss": "training loss", "train_runtime": "training time (s)", "epoch": "epochs",
             "corpus_sentences": "corpus sentences"}
_ADAPTER_NOTE = " in the adapter (a peft adapter folder: the base model's weights are not here)"
_ONES_ACCURACIES = {"ones_accuracy": "accuracy", "gathered_accuracy": "accuracy after gathering, before KD",
                    "teacher_accuracy": "accuracy of the MoE teacher"}  # OneS from a saved teacher


def templates_dir() -> Path:
    """`model_cards/` inside the installed package, else at the top of the source checkout."""
    package = Path(__file__).resolve().parents[1]
    for folder in (package / "model_cards", package.parent / "model_cards"):
        if (folder / "base.md").is_file():
            return folder
    raise FileNotFoundError(f"model card templates not found in {package / 'model_cards'} or "
                            f"{package.parent / 'model_cards'}: reinstall hf_moekd")


def write_model_card(output_dir: str | os.PathLike, facts: RunFacts | None = None, method: str | None = None,
                     model_id: str | None = None, config: dict | None = None) -> Path:
    """Write `output_dir/README.md` and return its path.

    Args:
        output_dir: a saved model folder (config.json, weights; all_results.json when the run wrote one).
        facts: how the model was made; default: `recorded_facts` of the folder.
        method: put this method first (or name it when nothing is recorded), e.g. "kd", "ones".
        model_id: the Hub repo id for the loading snippet; default: the folder's name.
        config: the model's config when the folder has no config.json (a peft adapter folder).
    """
    folder = Path(output_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} does not exist or is not a folder: point at a saved model folder")
    config = config or _read_json(folder / "config.json", f"{folder} has no config.json: point at a saved model "
                                  "folder (the output_dir of a run, with config.json and the weights)")
    results = _read_json(folder / "all_results.json") if (folder / "all_results.json").is_file() else {}
    facts = facts or recorded_facts(config, results, method, folder)
    if method:
        check_methods([method])
        facts = RunFacts.from_dict({**facts.to_dict(), "methods": [method, *(m for m in facts.methods if m != method)]})
    card = ModelCard(render(folder, config, results, facts, model_id or folder.name))  # a bad front matter fails here
    card.save(folder / "README.md")
    return folder / "README.md"


def recorded_facts(config: dict, results: dict, method: str | None, folder: Path) -> RunFacts:
    """all_results.json's "model_card" entry; for a folder without one (e.g. from before model cards), what its
    `run_kind` ("mode" in older folders), `task` and config tell, plus `method`."""
    if CARD_KEY in results:
        return RunFacts.from_dict(results[CARD_KEY])
    run_kind = str(results.get("run_kind", results.get("mode", "")))
    methods = [m.name for m in card_methods().values() if m.recognises and m.recognises(config, results)]
    if run_kind:
        methods.append("task-agnostic" if run_kind.startswith("task-agnostic") else "kd" if run_kind == "distil"
                       else "fine-tune")
    methods += [method] if method and method not in methods else []
    if not methods:
        raise ValueError(f"cannot tell which method made {folder}: pass --method ({', '.join(card_methods())})")
    words, datasets = describe_data([results["task"]] if isinstance(results.get("task"), str) else [])
    return RunFacts(methods=methods, data=words, datasets=datasets)


def render(folder: Path, config: dict, results: dict, facts: RunFacts, model_id: str) -> str:
    """The card's Markdown: YAML front matter (Hub metadata), then the body from the templates."""
    auto_class, remote_code = load_class(config)
    metrics = metric_rows(results)
    params = saved_parameter_count(folder)
    architecture = (config.get("architectures") or [config.get("model_type", "?")])[0]
    hp = facts.hyperparameters
    sections = [card_method(m) for m in facts.methods]
    folders = [templates_dir(), *dict.fromkeys(m.template_dir for m in sections if m.template_dir)]
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(folders), undefined=jinja2.StrictUndefined,
                             trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
    return env.get_template("base.md").render(
        card_data=_card_data(config, facts, auto_class, metrics), model_name=model_id.rsplit("/", 1)[-1],
        model_id=model_id, summary=_summary(architecture, params, facts), methods=facts.methods,
        titles={m.name: m.title for m in sections}, auto_class=auto_class, trust_remote_code=remote_code,
        has_tokenizer=any((folder / f).is_file() for f in ("tokenizer_config.json", "tokenizer.json")),
        model_type=config.get("model_type", "?"), architecture=architecture, config=config, hp=hp,
        parameters=_parameters(params, config) + (_ADAPTER_NOTE if (folder / "adapter_config.json").is_file() else ""),
        trainable=_count(results.get("trainable_params")),
        teacher=_name(facts.teacher), student_init=_name(facts.student_init),
        data=facts.data or "Not recorded.", metrics=[(s, n, _fmt(v)) for s, n, v in metrics],
        loss_terms=[f"`{n}` × {_fmt(w)}" for n, w in sorted((hp.get("loss_weights") or {}).items())],
        speed=speed_lines(results, facts.device), tables={m.name: m.results_table(results) for m in sections if m.results_table},
        hyperparameters=[(k, _fmt(v)) for k, v in sorted(hp.items()) if v is not None and v != {}],
        training=[(label, _fmt(results[k])) for k, label in _TRAINING.items() if k in results],
        versions=sorted(facts.versions.items()),
    )


def _card_data(config: dict, facts: RunFacts, auto_class: str, metrics: list[tuple[str, str, float]]) -> str:
    """The YAML front matter: library_name, pipeline_tag, tags, datasets, metrics, base_model, license, language."""
    tags = ["hf_moekd", *(t for m in facts.methods for t in card_method(m).tags), *facts.tags]
    tags += ["mixture-of-experts"] if is_moe(config) else []
    base_model = facts.base_model[0] if len(facts.base_model) == 1 else facts.base_model or None
    hub_metrics = sorted({HUB_METRICS[n] for _, n, _ in metrics if n in HUB_METRICS})
    return ModelCardData(
        library_name="transformers", pipeline_tag=AUTO_CLASSES[auto_class][1], tags=list(dict.fromkeys(tags)),
        datasets=facts.datasets or None, metrics=hub_metrics or None, base_model=base_model, license=facts.license,
        language=facts.language,
    ).to_yaml()


def load_class(config: dict) -> tuple[str, bool]:
    """(Auto class for the saved architecture, whether it needs trust_remote_code: its code ships in the folder)."""
    arch = (config.get("architectures") or [""])[0]
    for auto, ref in (config.get("auto_map") or {}).items():
        if auto in AUTO_CLASSES and ref.rsplit(".", 1)[-1] == arch:
            return auto, True
    from transformers.models.auto import modeling_auto

    for auto, (table, _) in AUTO_CLASSES.items():
        for names in getattr(modeling_auto, table).values():
            if arch in ((names,) if isinstance(names, str) else names):
                return auto, False
    return "AutoModel", bool(config.get("auto_map"))


def metric_rows(results: dict) -> list[tuple[str, str, float]]:
    """(split, metric, value) of the measured metrics in all_results.json: `eval_*`, `test_*` and OneS's accuracies."""
    rows = []
    for key, value in sorted(results.items()):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or key.endswith(NOT_METRIC_SUFFIXES):
            continue
        if key.startswith(("eval_", "test_")):
            split, name = key.split("_", 1)
            rows.append(("validation" if split == "eval" else "test", name, value))
        elif key in _ONES_ACCURACIES:
            rows.append(("test", _ONES_ACCURACIES[key], value))
    return rows


def speed_lines(results: dict, device: str | None) -> list[str]:
    """Measured inference speed: OneS dense-vs-MoE latencies, or the Trainer's evaluation throughput."""
    lines = []
    latency = (results.get("summary") or {}).get("latency_ms") or {}
    for batch in (1, 64):
        dense, moe = latency.get(f"dense_batch{batch}"), latency.get(f"moe_batch{batch}")
        if dense and moe:
            lines.append(f"batch {batch}: {dense:.2f} ms per forward pass, vs {moe:.2f} ms for the MoE teacher "
                         f"({moe / dense:.2f}x faster)")
    if "eval_samples_per_second" in results:
        lines.append(f"evaluation throughput: {results['eval_samples_per_second']:.1f} samples/s "
                     "(Trainer.evaluate, including batching and metric computation)")
    return lines + ([f"measured on {device}"] if lines and device else [])


def saved_parameter_count(folder: Path) -> int | None:
    """Parameters in the folder's safetensors files, read from their headers (no weights are loaded)."""
    shapes = []
    for file in folder.glob("*.safetensors"):
        try:
            with open(file, "rb") as f:
                header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
        except (OSError, ValueError, struct.error) as err:
            raise ValueError(f"cannot read the safetensors header of {file} ({err}); the file is truncated or corrupt, "
                             "save the model again") from err
        shapes += [info["shape"] for name, info in header.items() if name != "__metadata__"]
    return sum(math.prod(shape) for shape in shapes) if shapes else None


def _read_json(path: Path, missing: str | None = None) -> dict:
    if not path.is_file():
        raise FileNotFoundError(missing or f"{path} does not exist")
    try:
        data = json.loads(path.read_text())
    except ValueError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); rewrite it or run the training again") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds a {type(data).__name__}, not a JSON object")
    return data


def _summary(architecture: str, params: int | None, facts: RunFacts) -> str:
    size = f" with {_count(params)} parameters" if params else ""
    titles = " + ".join(card_method(m).title.split(":")[0] for m in facts.methods)
    on = f", trained on {facts.data}" if facts.data and facts.methods[0] != "gathering" else ""
    return f"A `{architecture}`{size} made with hf_moekd: {titles}{on}."


def _name(name_or_path: str | None) -> str | None:
    """A teacher / initial checkpoint for the card: Hub ids linked, local folders by name only."""
    if not name_or_path:
        return None
    if repo := hub_id(name_or_path):
        return f"[{repo}](https://huggingface.co/{repo})"
    if Path(name_or_path).is_absolute():
        return f"local checkpoint `{Path(name_or_path).name}`"
    return name_or_path


def _parameters(params: int | None, config: dict) -> str:
    if params is None:
        return "not counted (no safetensors weights in the folder)"
    return f"{params:,} ({_count(params)})" + (", all experts counted" if is_moe(config) else "")


def _count(n: Any) -> str | None:
    if not isinstance(n, int):
        return None
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= scale:
            return f"{n / scale:.1f}{suffix}"
    return str(n)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e-3 or abs(value) >= 1e5 else f"{value:.4f}".rstrip("0").rstrip(".")
    if isinstance(value, dict):
        return ", ".join(f"{k}={_fmt(v)}" for k, v in sorted(value.items()))
    if isinstance(value, (list, tuple)):
        return ", ".join(_fmt(v) for v in value)
    return str(value)
