"""Quantised weights of published MoE checkpoints, dequantised as they are read (gathering writes plain weights).

* FP8 with block scales (DeepSeek-V3/R1, GLM, Qwen3 FP8 releases): ``X.weight`` in ``float8_e4m3fn`` and
  ``X.weight_scale_inv`` of shape ``[ceil(out / b0), ceil(in / b1)]``; the weight is
  ``float(W) * scale_inv`` broadcast over ``b0 x b1`` blocks (``quantization_config.weight_block_size``, 128 x 128).
* MXFP4 (GPT-OSS): ``X_blocks`` (uint8, two FP4 values a byte) and ``X_scales`` (uint8 exponents, bias 127) per 32
  values; dequantised by transformers' own ``convert_moe_packed_tensors`` into ``X``.

Any other quantisation method named in the config is refused with one line before anything is read.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import Tensor

__all__ = ["QuantizedNames", "check_quantization"]

SUPPORTED = ("fp8", "mxfp4")
DTYPE = torch.bfloat16


def check_quantization(config) -> tuple[int, int]:
    """The FP8 block size; a clear error for quantisation methods gathering cannot read."""
    q = getattr(config, "quantization_config", None) or {}
    q = q if isinstance(q, dict) else q.to_dict()
    method = q.get("quant_method")
    if method and method not in SUPPORTED:
        raise ValueError(f"the checkpoint is quantised with {method!r}, which gathering cannot dequantise (supported: "
                         f"{', '.join(SUPPORTED)}); gather from the unquantised checkpoint instead")
    block = q.get("weight_block_size") or (128, 128)
    return int(block[0]), int(block[1])


class QuantizedNames:
    """The tensor names a quantised checkpoint stands for, and how to read each one dequantised."""

    def __init__(self, names: Iterable[str], block: tuple[int, int] = (128, 128)) -> None:
        names = set(names)
        self.block = block
        self.fp8 = {n for n in names if n.endswith(".weight") and f"{n}_scale_inv" in names}
        self.mxfp4 = {n[: -len("_blocks")] for n in names if n.endswith("_blocks") and f"{n[:-7]}_scales" in names}
        hidden = {f"{n}_scale_inv" for n in self.fp8} | {f"{n}_{s}" for n in self.mxfp4 for s in ("blocks", "scales")}
        self.visible = sorted((names - hidden) | self.mxfp4)

    def read(self, name: str, raw: Callable[[str], Tensor]) -> Tensor:
        """``name`` dequantised (or as stored when it is not quantised)."""
        if name in self.mxfp4:
            from transformers.integrations.mxfp4 import convert_moe_packed_tensors

            return convert_moe_packed_tensors(raw(f"{name}_blocks"), raw(f"{name}_scales"), dtype=DTYPE)
        if name in self.fp8:
            return dequantize_fp8(raw(name), raw(f"{name}_scale_inv"), self.block)
        return raw(name)


def dequantize_fp8(weight: Tensor, scale_inv: Tensor, block: tuple[int, int] = (128, 128)) -> Tensor:
    """``float(W) * scale_inv`` with one scale per ``block`` of W (edge blocks may be partial)."""
    rows, cols = weight.shape[-2:]
    scale = scale_inv.float().repeat_interleave(block[0], -2)[..., :rows, :].repeat_interleave(block[1], -1)[..., :cols]
    return (weight.float() * scale).to(DTYPE)
