"""One grammar for gathering settings (issue 27 item 3): `GatheringConfig` is gather_experts' keywords, `hf-moekd
gather`'s flags and the OneS study's variant strings; `hf-moekd evaluate` parses distill's `DataArguments`."""
from __future__ import annotations

import argparse
import re
from dataclasses import fields

import pytest
import torch
import transformers as tf

from hf_moekd.cli import build_parser
from hf_moekd.ones import DEFAULT_STRATEGY, GatheringConfig, gather_experts
from hf_moekd.ones.cli import parse_gather_arguments
from hf_moekd.recipes.arguments import DataArguments
from hf_moekd.studies.ones import OneSArguments
from test_cli import cli
from test_gathering import IDS, logits, make_identical, mixtral


def subcommand(name: str) -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


def flags(name: str) -> set[str]:
    return {s for a in subcommand(name)._actions if a.help != argparse.SUPPRESS for s in a.option_strings}


@pytest.mark.parametrize("settings, message", [
    ({"strategy": "median"}, "unknown gathering strategy 'median'; choose one of"),
    ({"strategy": "svd", "rank": 0}, "gathering rank must be an integer >= 1, got 0"),
    ({"rank": "8"}, "gathering rank must be an integer >= 1, got '8'"),
    ({"strategy": "top_experts", "top_k": 0}, "gathering top_k must be an integer >= 1, got 0"),
    ({"strategy": "svd", "svd_method": "qr"}, "unknown svd_method 'qr'; choose one of"),
    ({"strategy": "average", "rank": 4}, "strategy 'average' does not take option(s) ['rank']; it takes none"),
    ({"strategy": "svd", "top_k": 2}, "strategy 'svd' does not take option(s) ['top_k']; it takes ['rank', 'svd_method']"),
    ({"strategy": "top_experts", "svd_method": "joint"}, "does not take option(s) ['svd_method']; it takes ['top_k']"),
    ({"strategy": "top_kg", "granularity": "neuron"}, "unknown granularity 'neuron'; choose one of ['unit', 'weight']"),
    ({"strategy": "top_kg", "units": 0}, "gathering units must be an integer >= 1, got 0"),
    ({"strategy": "top_kg", "granularity": "weight", "keep_fraction": 0.0},
     "gathering keep_fraction must be a number in (0, 1], got 0.0"),
    ({"strategy": "top_kg", "keep_fraction": 0.5}, "top_kg keep_fraction is for granularity 'weight'"),
    ({"strategy": "top_kg", "granularity": "weight", "units": 2}, "top_kg units is for granularity 'unit'"),
    ({"strategy": "svd", "granularity": "unit"}, "does not take option(s) ['granularity']; it takes ['rank', 'svd_method']"),
    ({"strategy": "top_kg", "rank": 4}, "it takes ['granularity', 'units', 'keep_fraction']"),
])
def test_bad_settings_give_one_line(settings, message):
    with pytest.raises(ValueError) as err:
        GatheringConfig(**settings)
    assert message in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ValueError) as api:
        gather_experts("no/such/checkpoint", **settings)  # validated before anything is read
    assert str(api.value) == str(err.value)


def test_default_strategy_and_one_name_per_setting():
    assert GatheringConfig().strategy == DEFAULT_STRATEGY == "weighted_average"
    assert GatheringConfig(rank=4).strategy == "svd"  # a rank alone means SVD-KG, in the API as on the command line
    assert OneSArguments().gatherings == ["svd"]  # the OneS study's default is SVD-KG, the paper's method
    assert GatheringConfig(strategy="top_experts", top_k=1).strategy_options() == {"k": 1}
    with pytest.raises(TypeError, match=r"unknown gathering setting\(s\) \['k'\]"):
        gather_experts(mixtral(), "top_experts", k=1, progress=False)
    with pytest.raises(ValueError, match=r"strategy_kwargs \['k'\]: pass \['top_k'\]"):
        gather_experts(mixtral(), "top_experts", strategy_kwargs={"k": 1}, progress=False)


@pytest.mark.parametrize("spec, config", [
    ("weighted_average", GatheringConfig()),
    ("svd-r16+align", GatheringConfig("svd", rank=16, align=True)),
    ("top_experts-k1", GatheringConfig("top_experts", top_k=1)),
    ("svd-r8-joint", GatheringConfig("svd", rank=8, svd_method="joint")),
    ("average+align", GatheringConfig("average", align=True)),
    ("top_kg", GatheringConfig("top_kg")),
    ("top_kg-u4-unit", GatheringConfig("top_kg", granularity="unit", units=4)),
    ("top_kg-f0.25-weight+align", GatheringConfig("top_kg", granularity="weight", keep_fraction=0.25, align=True)),
    ("top_kg-f0.00001-weight", GatheringConfig("top_kg", granularity="weight", keep_fraction=1e-5)),
])
def test_variant_strings_are_gathering_configs(spec, config):
    assert GatheringConfig.from_string(spec) == config and config.to_string() == spec


@pytest.mark.parametrize("spec, message", [
    ("svd+nope", r"only suffix is '\+align'"), ("median", "unknown gathering strategy"),
    ("average-r4", r"does not take option\(s\) \['rank'\]"), ("svd-rx", "cannot read 'rx'"), ("svd-r", "cannot read 'r'"),
    ("svd-r0", "rank must be an integer >= 1"), ("svd-r4-r8", "cannot read 'r8'"),
    ("top_kg-fx-weight", "cannot read 'fx'"), ("top_kg-u2.5", "cannot read 'u2.5'"), ("top_kg-weight-unit", "cannot read 'unit'"),
    ("top_kg-f0.5", "keep_fraction is for granularity 'weight'"), ("svd-weight", r"does not take option\(s\) \['granularity'\]"),
])
def test_bad_variant_strings(spec, message):
    with pytest.raises(ValueError, match=f"^gathering {re.escape(repr(spec))}: .*{message}"):
        GatheringConfig.from_string(spec)


def test_gather_flags_are_the_api_names():
    options = flags("gather")
    assert {f"--{f.name}" for f in fields(GatheringConfig)} <= options
    assert {"--overwrite_output_dir", "--allow_pickle_checkpoints", "--calibration_dataset", "--output_dir",
            "--model_name_or_path"} <= options
    assert not {"--overwrite", "--allow_pickle", "--calibration_data", "--max_length"} & options
    ns = build_parser().parse_args(["gather", "moe", "out", "--strategy", "top_experts", "--top_k", "1", "--align"])
    args, gathering = parse_gather_arguments(ns)
    assert gathering == GatheringConfig(strategy="top_experts", top_k=1, align=True)
    assert (args.model_name_or_path, args.output_dir) == ("moe", "out")
    ns = build_parser().parse_args(["gather", "moe", "out", "--strategy", "top_kg", "--granularity", "weight",
                                    "--keep_fraction", "0.5"])
    assert parse_gather_arguments(ns)[1] == GatheringConfig("top_kg", granularity="weight", keep_fraction=0.5)
    ns = build_parser().parse_args(["gather", "moe", "out", "--strategy", "top_kg", "--units", "3"])
    assert parse_gather_arguments(ns)[1].strategy_options() == {"units": 3}
    ns = build_parser().parse_args(["gather", "--model_name_or_path", "moe", "--output_dir", "out", "--rank", "4"])
    args, gathering = parse_gather_arguments(ns)
    assert (args.model_name_or_path, args.output_dir, gathering.strategy) == ("moe", "out", "svd")
    with pytest.raises(ValueError, match="gather got TEACHER 'a' and --model_name_or_path 'b'"):
        parse_gather_arguments(build_parser().parse_args(["gather", "a", "out", "--model_name_or_path", "b"]))
    with pytest.raises(ValueError, match=r"gather needs OUTPUT \(or --output_dir\)"):
        parse_gather_arguments(build_parser().parse_args(["gather", "a"]))


def test_topk_is_not_a_command_line_choice(capsys):
    assert cli("gather", "moe", "out", "--strategy", "topk") == 2
    assert "invalid choice: 'topk'" in capsys.readouterr().err
    assert "topk" not in subcommand("gather").format_help()


def test_gather_overwrite_output_dir_allow_pickle_checkpoints_and_old_spellings(tmp_path, capsys):
    model = make_identical(mixtral())
    model.config.save_pretrained(tmp_path / "moe")
    torch.save(model.state_dict(), tmp_path / "moe" / "pytorch_model.bin")  # pickle weights only
    torch.save([IDS], tmp_path / "calib.pt")
    out = tmp_path / "dense"
    out.mkdir()
    (out / "old.txt").write_text("x")
    assert cli("gather", tmp_path / "moe", out) == 2
    assert "allow_pickle_checkpoints" in capsys.readouterr().err
    assert cli("gather", tmp_path / "moe", out, "--allow_pickle_checkpoints") == 2
    assert "--overwrite_output_dir" in capsys.readouterr().err
    assert cli("gather", tmp_path / "moe", out, "--allow_pickle_checkpoints", "--overwrite_output_dir",
               "--strategy", "top_experts", "--top_k", "1", "--calibration_dataset", tmp_path / "calib.pt") == 0
    assert not (out / "old.txt").exists()
    torch.testing.assert_close(logits(tf.AutoModelForCausalLM.from_pretrained(out)), logits(model), atol=1e-5, rtol=0)
    with pytest.warns(FutureWarning) as record:  # the former spellings, for one release
        assert cli("gather", tmp_path / "moe", out, "--allow_pickle", "--overwrite", "--calibration_data",
                   tmp_path / "calib.pt", "--max_length", "8") == 0
    renamed = sorted(str(w.message).split(" is renamed ")[1].split(";")[0] for w in record if " is renamed " in str(w.message))
    assert renamed == ["--allow_pickle_checkpoints", "--calibration_dataset", "--max_seq_length", "--overwrite_output_dir"]


def test_evaluate_parses_distills_data_arguments(tmp_path, capsys):
    evaluate, distill = flags("evaluate"), flags("distill")
    data = {f"--{f.name}" for f in fields(DataArguments)}
    assert data <= evaluate and data <= distill
    assert {"--task", "--allow_pickle_checkpoints"} <= evaluate & distill
    ns = build_parser().parse_args(["evaluate", "model", "--task", "sst2", "--max_seq_length", "64", "--block_size", "16"])
    task, data_args, args = ns.parser.parse_dict({k: v for k, v in vars(ns).items()
                                                  if k not in ("command", "func", "parser", "model_dir")})
    assert data_args == DataArguments(max_seq_length=64, block_size=16) and task.task == "sst2"
    assert not args.allow_pickle_checkpoints and args.batch_size == 32

    tf.BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8).save_pretrained(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"\0" * 16)
    assert cli("evaluate", tmp_path, "--task", "sst2") == 2
    assert "--allow_pickle_checkpoints" in capsys.readouterr().err
