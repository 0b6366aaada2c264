"""V-MoE -> OneS knowledge gathering: exact for identical experts, and the output loads without hf_moekd."""
from __future__ import annotations

import pytest
import torch
from testing_utils import fresh_process_logits, pixels, tiny_model

from hf_moekd.ones import gather_experts


def identical_expert_vmoe():
    vmoe = tiny_model(True, perturb=True)
    with torch.no_grad():
        for block in vmoe.config.moe_layers:
            experts = vmoe.vmoe.encoder.layer[block].mlp.experts
            for name in ("w_in", "b_in", "w_out", "b_out"):
                param = getattr(experts, name)
                param.copy_(param[:1].expand_as(param))
    return vmoe


@pytest.mark.parametrize("strategy", ["average", "top_experts", "weighted_average"])
def test_identical_experts_gather_to_the_same_logits(strategy):
    vmoe = identical_expert_vmoe()
    ones = gather_experts(vmoe, strategy=strategy, calibration_dataset=[pixels(4, seed=1)], progress=False)
    assert type(ones).__name__ == "DenseViTForImageClassification"
    with torch.no_grad():
        torch.testing.assert_close(ones(pixels()).logits, vmoe(pixels()).logits, rtol=1e-5, atol=1e-5)


def test_streamed_output_loads_with_stock_auto_class(tmp_path):
    vmoe = identical_expert_vmoe()
    vmoe.save_pretrained(tmp_path / "vmoe", max_shard_size="20KB")
    gather_experts(str(tmp_path / "vmoe"), strategy="weighted_average", output_dir=tmp_path / "ones", progress=False, return_model=False)
    result = fresh_process_logits(tmp_path / "ones", "AutoModelForImageClassification", {"pixel_values": pixels()}, tmp_path)
    assert result["class"] == "DenseViTForImageClassification"
    with torch.no_grad():
        torch.testing.assert_close(result["logits"], vmoe(pixels()).logits, rtol=1e-5, atol=1e-5)
