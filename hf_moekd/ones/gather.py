"""`gather_experts`: turn a sparse MoE (live model or safetensors checkpoint) into its dense twin.

Non-expert tensors are copied exactly; each sparse block's experts are merged by a strategy
(:mod:`.strategies`) into the dense FFN. From a checkpoint directory the work streams layer by
layer: only the current layer's tensors are read (``safetensors.safe_open``) and output shards are
written as they fill, so peak memory is about one layer's experts plus one output shard. Output
directories appear atomically (temporary sibling directory, then rename).

Measured on one Mixtral-8x7B-shaped layer (8 experts, hidden 4096, intermediate 14336, bf16, random
weights, 2 CPU threads; ``benchmarks/gather_memory.py``): ``weighted_average`` (the default) streamed in 6.5 s
with 4.08 GiB peak RSS, 1.56x the layer's 2.625 GiB of expert weights; rank 256 (``svd_lowrank`` on each
of the 24 expert matrices) took 28.7 s and 4.76 GiB, 1.49x the bare ``svd_lowrank`` calls (19.3 s).
"""
from __future__ import annotations

import inspect
import json
import logging
import os
import re
import shutil
import warnings
from collections import defaultdict
from contextlib import ExitStack, contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..cards import CARD_KEY, run_facts, write_model_card
from ..integrations.peft import is_adapter_folder, is_peft_model, load_adapter, merge_peft
from ..model_utils.moe_layout import MoEBlock
from ..utils.outputs import atomic_output_dir, checkpoint_format, refuse_pickle
from .config import STRATEGY_ARGUMENTS, GatheringConfig, as_gathering_config
from .families import BlockReader, MoEFamily, RoutingStats, get_family
from .families.readers import materialize
from .families.stats import experts_call_stats, shared_gate_stats
from .families.targets import DenseTemplate, dense_template, model_class, moe_structure, place_block, shared_ffns
from .quantized import QuantizedNames, check_quantization
from .strategies import STREAMING, expert_spectra, get_strategy, merge_experts, validate_options

logger = logging.getLogger(__name__)
__all__ = ["gather_experts", "collect_routing_stats"]

_MODEL_INPUTS = ("input_ids", "attention_mask", "decoder_input_ids", "decoder_attention_mask", "pixel_values")
_AUX_FILES = ("generation_config.json", "tokenizer*", "special_tokens_map.json", "vocab*", "merges.txt", "*.model",
              "added_tokens.json", "chat_template*", "preprocessor_config.json")


# --------------------------------------------------------------------------- tensor sources
class _LiveSource:
    """Tensors of an in-memory model (in-memory names)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model, self.config = model, model.config
        self._sd = model.state_dict()

    def keys(self, family: MoEFamily) -> list[str]:
        return list(self._sd)

    @contextmanager
    def reader(self) -> Iterator:
        yield lambda name: self._sd[name]

    def where(self, name: str | None = None) -> str:
        return f"the live {type(self.model).__name__}"

    def arch(self) -> str:
        return type(self.model).__name__

    def live_model(self, family: MoEFamily) -> torch.nn.Module:
        return self.model


class _CheckpointSource:
    """Tensors of a safetensors checkpoint directory, read lazily one name at a time."""

    def __init__(self, path: str | os.PathLike) -> None:
        from transformers import AutoConfig

        self.path = Path(path)
        if not self.path.is_dir():
            raise FileNotFoundError(f"checkpoint directory {self.path} does not exist")
        self.config = AutoConfig.from_pretrained(self.path)
        get_family(self.config.model_type)  # an unsupported architecture fails before any shard is opened
        index, single = self.path / "model.safetensors.index.json", self.path / "model.safetensors"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as err:
                raise ValueError(f"{index} is not a valid safetensors index ({type(err).__name__}: {err}); the "
                                 "checkpoint is incomplete or corrupt, re-download it") from err
            self.files = {k: self.path / v for k, v in weight_map.items()}
        elif single.is_file():
            self.files = {k: single for k in _open(single).keys()}
        elif any(self.path.glob("pytorch_model*.bin*")):
            refuse_pickle(self.path, "allow_pickle=True (CLI: --allow_pickle_checkpoints)")
        else:
            raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {self.path}")
        self.quantized = QuantizedNames(self.files, check_quantization(self.config))
        self._raw: dict[str, str] = {}

    def keys(self, family: MoEFamily) -> list[str]:
        self._raw = {family.normalize(k): k for k in self.quantized.visible}
        return list(self._raw)

    @contextmanager
    def reader(self) -> Iterator:
        """Accessor reading one tensor at a time; each shard is mapped only while a tensor is copied out."""

        def stored(raw: str) -> Tensor:
            file = self.files[raw]
            with _open(file) as handle:
                try:
                    return handle.get_tensor(raw)
                except Exception as err:  # noqa: BLE001
                    raise OSError(f"cannot read {raw!r} from {file}: {err}; the shard is truncated or corrupt, re-download it") from err

        yield lambda name: self.quantized.read(self._raw[name], stored)

    def where(self, name: str | None = None) -> str:
        """The shard holding ``name`` (the checkpoint directory when unknown)."""
        raw = self._raw.get(name, name) if name else None
        raw = f"{raw}_blocks" if raw in self.quantized.mxfp4 else raw
        return str(self.files.get(raw, self.path)) if raw else str(self.path)

    def arch(self) -> str | None:
        return (self.config.architectures or [None])[0]

    def live_model(self, family: MoEFamily) -> torch.nn.Module:
        logger.info("loading %s whole (routing statistics, or naming that needs transformers' conversions)", self.path)
        return model_class(self.config, self.arch(), family.auto_class).from_pretrained(self.path)


def _open(file: Path):
    from safetensors import safe_open

    if not file.is_file():
        raise FileNotFoundError(f"shard {file} listed in the checkpoint index is missing")
    try:
        return safe_open(str(file), framework="pt")
    except Exception as err:  # noqa: BLE001
        raise OSError(f"cannot open shard {file}: {err}; the file is truncated or corrupt, re-download it") from err


# --------------------------------------------------------------------------- sinks
class _ShardWriter:
    """Writes tensors into numbered safetensors shards of at most ``max_bytes`` (a tensor is never split)."""

    def __init__(self, directory: Path, max_bytes: int) -> None:
        self.dir, self.max_bytes = directory, max_bytes
        self.buf: dict[str, Tensor] = {}
        self.size, self.parts, self.total = 0, [], 0

    def __setitem__(self, name: str, t: Tensor) -> None:
        nbytes = t.numel() * t.element_size()
        if self.buf and self.size + nbytes > self.max_bytes:
            self.flush()
        self.buf[name] = t.detach().to("cpu").contiguous().clone()
        self.size += nbytes
        self.total += nbytes

    def flush(self) -> None:
        from safetensors.torch import save_file

        if self.buf:
            part = self.dir / f"part-{len(self.parts):05d}.safetensors"
            save_file(self.buf, str(part), metadata={"format": "pt"})
            self.parts.append((part, list(self.buf)))
            self.buf, self.size = {}, 0

    def finish(self) -> None:
        self.flush()
        if len(self.parts) == 1:
            self.parts[0][0].rename(self.dir / "model.safetensors")
            return
        weight_map = {}
        for i, (part, names) in enumerate(self.parts, 1):
            final = f"model-{i:05d}-of-{len(self.parts):05d}.safetensors"
            part.rename(self.dir / final)
            weight_map.update(dict.fromkeys(names, final))
        index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))}
        (self.dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


# --------------------------------------------------------------------------- calibration
def _batches(data: Any, input_name: str) -> Iterator[dict[str, Tensor]]:
    """Model kwargs from a tensor, a dict, or an iterable of tensors/dicts (e.g. a Dataset); 1-D rows get a batch axis."""
    if isinstance(data, (Tensor, Mapping)):
        data = [data]
    for item in data:
        batch = dict(item) if isinstance(item, Mapping) else {input_name: item}
        batch = {k: torch.as_tensor(v) for k, v in batch.items() if k in {input_name, *_MODEL_INPUTS}}
        if batch[input_name].dim() == (1 if input_name == "input_ids" else 3):
            batch = {k: v[None] for k, v in batch.items()}
        yield batch


def collect_routing_stats(model: torch.nn.Module, family: MoEFamily, blocks: Iterable[str], data: Any) -> dict[str, RoutingStats]:
    """Run ``model`` on calibration batches with hooks on each block's experts (or router); per-block statistics.

    The routing is read where the experts receive it (``experts(hidden, top_k_index, top_k_weights)``), so every
    family's own router counts as it routes. A sigmoid shared-expert gate (``shared_expert_gate``) is hooked too.
    Tokens where a batch's ``attention_mask`` is 0 are left out. Encoder-decoders get
    ``decoder_input_ids = input_ids`` unless the batch has its own.
    """
    config, stats, handles, state = model.config, {}, [], {"mask": None}
    for block in blocks:
        module = model.get_submodule(block)
        st = stats[block] = RoutingStats(_num_experts(module, config))
        if family.router_stats is not None:
            sub, fn = family.router_stats
            handles.append(module.get_submodule(sub).register_forward_hook(
                lambda m, a, o, fn=fn, st=st: fn(a, {}, o, state["mask"], st)))
        else:
            handles.append(module.experts.register_forward_pre_hook(
                lambda m, a, k, st=st: experts_call_stats(a, k, None, state["mask"], st), with_kwargs=True))
        if isinstance(gate := getattr(module, "shared_expert_gate", None), torch.nn.Module):
            handles.append(gate.register_forward_hook(lambda m, a, o, st=st: shared_gate_stats(a, {}, o, state["mask"], st)))
    was_training, device = model.training, next(model.parameters()).device
    model.eval()
    try:
        with torch.no_grad():
            for batch in _batches(data, family.input_name):
                batch = {k: v.to(device) for k, v in batch.items()}
                mask = batch.get("attention_mask")
                state["mask"] = None if mask is None else mask.reshape(-1).bool()
                if config.is_encoder_decoder and "decoder_input_ids" not in batch:
                    batch["decoder_input_ids"] = batch["input_ids"]
                model(**batch)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return stats


def _num_experts(block: torch.nn.Module, config) -> int:
    experts = block.experts
    return int(getattr(experts, "num_experts", None) or len(list(experts.children())) or config.num_experts)


# --------------------------------------------------------------------------- main entry point
def _block_finder(prefixes: Iterable[str], names: Iterable[str]) -> dict[str, str | None]:
    """name -> the sparse block holding it (None for non-block tensors), for every name."""
    known = set(prefixes)

    def block_of(name: str) -> str | None:
        parts = name.split(".")
        return next((h for i in range(len(parts) - 1, 0, -1) if (h := ".".join(parts[:i])) in known), None)

    return {n: block_of(n) for n in names}


def _unit_of(name: str) -> tuple[str, int]:
    """Group tensors by layer: ('encoder.block', 3) for 'encoder.block.3....'; ('', -1) for everything else."""
    m = re.match(r"^(.*?(?:layers|block|blocks|layer|h))\.(\d+)\.", name)
    return (m.group(1), int(m.group(2))) if m else ("", -1)


_FFN_LEAF = re.compile(r"\.(gate_proj|up_proj|down_proj|gate_up_proj|fc1|fc2|wi|wo)\.(weight|bias)$")


def _fit(name: str, t: Tensor, shape: torch.Size) -> Tensor:
    """Zero-pad an FFN tensor to the dense width (exact: padded units have zero weights)."""
    if t.shape == shape:
        return t
    if t.dim() != len(shape) or any(a > b for a, b in zip(t.shape, shape)) or not _FFN_LEAF.search(name):
        raise ValueError(f"shape mismatch for {name}: gathered {tuple(t.shape)}, dense model expects {tuple(shape)}")
    out = t.new_zeros(shape)
    out[tuple(slice(0, n) for n in t.shape)] = t
    return out


def gather_experts(
    model_or_path: Any,
    config: GatheringConfig | str | None = None,
    *,
    calibration_dataset: Any = None,
    output_dir: str | os.PathLike | None = None,
    strategy_kwargs: dict[str, Any] | None = None,
    max_shard_size: int | str = "2GB",
    overwrite: bool = False,
    progress: bool = True,
    return_model: bool = True,
    allow_pickle: bool = False,
    spectra: dict[str, dict[str, Tensor]] | None = None,
    **settings: Any,
):
    """Build the dense twin of a sparse MoE by merging each layer's experts (OneS knowledge gathering).

    >>> gather_experts(moe, "svd-r16+align")                  # a variant string (GatheringConfig.from_string)
    >>> gather_experts(moe, strategy="svd", rank=16, align=True)  # the same, as GatheringConfig's fields
    >>> gather_experts(moe, GatheringConfig(strategy="top_experts", top_k=1))

    Args:
        model_or_path: a live MoE ``PreTrainedModel`` or a safetensors checkpoint directory (streamed). A peft
            ``PeftModel`` or a saved adapter folder (adapter_config.json naming its base model) is gathered with
            its adapters merged into the weights first (the given model keeps its adapters).
        config: a :class:`GatheringConfig`, a variant string (``svd-r16+align``, a bare strategy name) or None
            (the defaults: ``weighted_average``, or ``svd`` when ``rank`` is given).
        **settings: :class:`GatheringConfig` fields replacing the config's: ``strategy`` (a name in
            :data:`MERGE_STRATEGIES`), ``rank`` (SVD-KG rank per expert), ``top_k`` (experts kept by
            ``top_experts``), ``svd_method``, ``granularity``/``units``/``keep_fraction`` (``top_kg``), ``align``
            (match hidden units across experts before merging).
        calibration_dataset: token batches (a tensor, a list of tensors or of dicts with ``input_ids`` and
            optional ``attention_mask``/``decoder_input_ids``, or a Dataset of such rows). When given, the
            MoE runs once on it to measure router usage (for ``weighted_average``/``top_experts``/``svd``
            weights), the routed probability mass (rescales families whose routing weights do not sum to 1)
            and Qwen2-MoE's mean shared-expert gate. From a directory this loads the full model once.
        output_dir: write the dense model here (atomically, sharded by ``max_shard_size``).
        strategy_kwargs: further options of the strategy function that GatheringConfig does not hold (e.g.
            ``{"lowrank": False}`` for svd, or a registered strategy's own options).
        return_model: with ``output_dir``, load and return the written model (else return the path).
        allow_pickle: accept a folder that holds only pickle weights (``pytorch_model.bin``): the whole model is
            loaded with transformers (not streamed). Off by default: unpickling can run arbitrary code.
        spectra: a dict to fill with each sparse block's singular values (block -> projection -> ``[E, r]``,
            :func:`.strategies.expert_spectra`), computed from the experts read for merging (for
            ``hf_moekd.analysis.plot_spectra``).
    """
    from transformers.utils.hub import convert_file_size_to_int

    gathering = as_gathering_config(config, **settings)  # every setting checked before anything is read
    strategy, align, extra = gathering.strategy, gathering.align, _extra_options(strategy_kwargs)

    model_or_path, aux_dir = _merged_adapters(model_or_path, allow_pickle)  # aux_dir: tokenizer files come from it
    if allow_pickle and not isinstance(model_or_path, torch.nn.Module) and checkpoint_format(model_or_path) == "pickle":
        aux_dir, model_or_path = Path(model_or_path), _load_pickled(model_or_path)
    is_live = isinstance(model_or_path, torch.nn.Module)
    source = _LiveSource(model_or_path) if is_live else _CheckpointSource(model_or_path)
    family = get_family(source.config.model_type)
    if not is_live and not family.streamed:  # naming that needs transformers' conversions: loaded whole
        aux_dir, model_or_path, is_live = source.path, source.live_model(family), True
        source = _LiveSource(model_or_path)
    moe_config = source.config
    options = {**gathering.strategy_options(), **extra}
    if "k" in inspect.signature(get_strategy(strategy)).parameters:
        options.setdefault("k", family.top_k(moe_config))
    validate_options(strategy, options)

    moe, moe_blocks = moe_structure(moe_config, source.arch(), family, model_or_path if is_live else None)
    template = dense_template(family, moe_config, source.arch(), moe, moe_blocks)
    dense_config, make_dense, expected, tied = template.config, template.cls, template.expected, template.tied
    names = source.keys(family)
    name_set = set(names)
    block_of = _block_finder(moe_blocks, names)
    blocks = sorted({b for b in block_of.values() if b})
    stats: dict[str, RoutingStats] = {}
    if calibration_dataset is not None:
        model = source.live_model(family)
        stats = collect_routing_stats(model, family, blocks, calibration_dataset)
        if not is_live:
            del model
    _warn_unscaled(family, moe_config, bool(stats))

    units: dict[tuple[str, int], list[str]] = defaultdict(list)
    for n in names:
        units[_unit_of(n)].append(n)
    max_bytes = convert_file_size_to_int(max_shard_size) if isinstance(max_shard_size, str) else int(max_shard_size)

    with ExitStack() as stack:
        tmp = stack.enter_context(atomic_output_dir(output_dir, overwrite)) if output_dir is not None else None
        sink: Any = _ShardWriter(tmp, max_bytes) if tmp is not None else {}
        produced: set[str] = set()
        dtypes: list[torch.dtype] = []

        def emit(name: str, t: Tensor) -> None:
            if name in tied and tied[name] in name_set:
                return  # tied to a tensor that is copied anyway
            if name not in expected:
                raise ValueError(f"tensor {name!r} from {source.where(name)} has no place in {dense_config.model_type}; "
                                 "the checkpoint does not match its config")
            sink[name] = _fit(name, t, expected[name])
            produced.add(name)
            dtypes[:] = [t.dtype]

        for unit in tqdm(sorted(units), desc=f"gathering ({strategy})", unit="layer", disable=not progress):
            with source.reader() as get:
                by_block: dict[str, list[str]] = defaultdict(list)
                for n in units[unit]:
                    if (b := block_of[n]) is not None:
                        by_block[b].append(n[len(b) + 1:])
                    else:
                        emit(family.dense_name(n), get(n))
                for block, rel in by_block.items():
                    reader = BlockReader(block, rel, lambda r, b=block: get(f"{b}.{r}"), source.where())
                    for n, t in _gather_block(family, moe_config, moe_blocks[block], reader, stats.get(block), moe,
                                              template, strategy, align, options, spectra).items():
                        emit(family.dense_name(n), t)

        _fill_missing(expected, produced, tied, sink, source, dtype=(dtypes or [torch.float32])[0])
        if tmp is None:
            return _build(make_dense, dense_config, sink)
        _write_aux(tmp, dense_config, source, make_dense, aux_dir)
        sink.finish()
        origin = getattr(model_or_path, "name_or_path", None) if is_live else source.path
        _write_card(tmp, Path(output_dir).name, origin, {
            **asdict(gathering), "top_k": options.get("k"), **extra,
            "calibration_tokens": max((st.tokens for st in stats.values()), default=None)})
    if not return_model:
        return Path(output_dir)
    return make_dense.from_pretrained(output_dir)


def _extra_options(strategy_kwargs: dict[str, Any] | None) -> dict[str, Any]:
    """``strategy_kwargs``, refusing the options that GatheringConfig holds (one name for each setting)."""
    own = {arg: name for name, arg in STRATEGY_ARGUMENTS.items()}
    if clash := sorted(set(strategy_kwargs or {}) & (set(own) | set(STRATEGY_ARGUMENTS))):
        raise ValueError(f"strategy_kwargs {clash}: pass {sorted({own.get(c, c) for c in clash})} to gather_experts "
                         "(GatheringConfig fields) instead")
    return dict(strategy_kwargs or {})


def _merged_adapters(model_or_path: Any, allow_pickle: bool) -> tuple[Any, Path | None]:
    """(the MoE with peft adapters merged, the folder of its tokenizer files) for a PeftModel or adapter folder;
    anything else as given."""
    if is_peft_model(model_or_path):
        return merge_peft(model_or_path), None
    if is_adapter_folder(model_or_path):
        return merge_peft(load_adapter(model_or_path, allow_pickle), copy_model=False), _aux_folder(Path(model_or_path))
    return model_or_path, None


def _aux_folder(adapter: Path) -> Path:
    """The adapter folder when it holds tokenizer (or other auxiliary) files, else its base model's local folder."""
    from peft import PeftConfig

    if any(f.is_file() for pattern in _AUX_FILES for f in adapter.glob(pattern)):
        return adapter
    base = PeftConfig.from_pretrained(str(adapter)).base_model_name_or_path
    return Path(base).expanduser() if base and Path(base).expanduser().is_dir() else adapter


def _write_card(tmp: Path, name: str, source: str | os.PathLike | None, hyperparameters: dict[str, Any]) -> None:
    """all_results.json (what the card says, under "model_card") and the model card README.md of a gathered model."""
    facts = run_facts(["gathering"], teacher=str(source) if source else None, hyperparameters=hyperparameters,
                      data_text="none: the weights were merged from the MoE's, without training")
    (tmp / "all_results.json").write_text(json.dumps({CARD_KEY: facts.to_dict()}, indent=2) + "\n")
    write_model_card(tmp, facts, model_id=name)


def _load_pickled(path: str | os.PathLike) -> torch.nn.Module:
    """A whole MoE from pickle weights, with the class its config names (else the family's Auto class)."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(path)
    arch = (config.architectures or [None])[0]
    cls = model_class(config, arch, get_family(config.model_type).auto_class)
    return cls.from_pretrained(path, use_safetensors=False)


def _gather_block(family: MoEFamily, config, block: MoEBlock, reader: BlockReader, st: RoutingStats | None,
                  moe: torch.nn.Module, template: DenseTemplate, strategy: str, align: bool, options: dict,
                  spectra: dict | None = None) -> dict[str, Tensor]:
    experts = family.reader()(reader, config, block.layout)
    if align or strategy not in STREAMING or spectra is not None:
        experts = experts.map(materialize)
    if spectra is not None:
        spectra[reader.prefix] = expert_spectra(experts)
    dtype = experts.out_proj.dtype
    ffn = merge_experts(experts, strategy, usage=None if st is None else st.usage, align=align, **options)
    routed = family.routed_sum(config)
    if routed is None and st is not None and st.tokens:
        routed = st.routed_mass / st.tokens
    one_expert = family.target == "one_expert"
    # the dense model's own weight on the gathered FFN: 1, or (one expert) the router's renormalised 1 x its scale
    own = family.own_weight(config) if one_expert else 1.0
    if routed is not None and routed != own:
        ffn = ffn.scale_input(routed / own) if family.input_scaled else ffn.scale_output(routed / own)
    if not one_expert and block.layout is not None:
        for shared in shared_ffns(block, reader, st, moe):
            ffn = ffn.concat(shared)
    return place_block(family, block, ffn.to(dtype), reader, template)


def _warn_unscaled(family: MoEFamily, config, have_stats: bool) -> None:
    if family.routed_sum(config) is None and not have_stats:
        warnings.warn(f"{config.model_type}: a token's routing weights do not sum to a constant (top-k probabilities "
                      "are not renormalised), so the MoE output is scaled by the routed probability mass; without "
                      "calibration_dataset the dense FFN is not rescaled for it", stacklevel=3)


def _fill_missing(expected: dict, produced: set, tied: dict, sink: Any, source: Any, dtype: Any = None) -> None:
    missing = [k for k in expected if k not in produced and k not in tied]
    biases = [k for k in missing if k.endswith(".bias")]
    for k in biases:  # e.g. Qwen2's q/k/v biases when the MoE has qkv_bias=False
        sink[k] = torch.zeros(expected[k], dtype=dtype)
    if biases:
        logger.info("zero-filled %d dense bias tensor(s) the MoE does not have, e.g. %s", len(biases), biases[0])
    if rest := [k for k in missing if k not in biases]:
        raise ValueError(f"dense tensor(s) {rest[:4]} have no source in {source.where()}: the MoE checkpoint is incomplete")


def _build(cls, dense_config, state: dict[str, Tensor]):
    """Instantiate the dense model in memory and load the gathered tensors."""
    model = cls(dense_config).to(next(iter(state.values())).dtype)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) - set(getattr(model, "all_tied_weights_keys", {}) or {}):
        raise RuntimeError(f"gathered state does not fit {cls.__name__}: missing {missing[:4]}, unexpected {unexpected[:4]}")
    model.tie_weights()
    return model.eval()


def _write_aux(tmp: Path, dense_config, source: Any, make_dense: type, aux_dir: Path | None = None) -> None:
    if getattr(make_dense, "_auto_class", None) is not None:  # the project's own dense classes: ship their code
        from transformers.dynamic_module_utils import custom_object_save

        with torch.device("meta"):
            custom_object_save(make_dense(dense_config), tmp, config=dense_config)
    dense_config.save_pretrained(tmp)
    aux_dir = source.path if isinstance(source, _CheckpointSource) else aux_dir
    if aux_dir is not None:
        for pattern in _AUX_FILES:
            for f in aux_dir.glob(pattern):
                if f.is_file():
                    shutil.copy2(f, tmp / f.name)
    elif getattr(source.model, "generation_config", None) is not None and source.model.can_generate():
        source.model.generation_config.save_pretrained(tmp)
