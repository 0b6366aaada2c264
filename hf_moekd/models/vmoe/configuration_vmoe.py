"""V-MoE configuration: the OneS (ViT) backbone with top-k Mixture-of-Experts MLPs in every other block.

Reference: "Scaling Vision with Sparse Mixture of Experts" (Riquelme et al., NeurIPS 2021).
"""

from copy import deepcopy
from dataclasses import fields

from huggingface_hub.dataclasses import strict

from ..ones.configuration_ones import OneSConfig

# Fields of VMoEConfig that OneSConfig does not have (dropped by `dense_config`).
MOE_FIELDS = (
    "num_experts", "num_experts_per_tok", "moe_layer_frequency", "router_aux_loss_coef", "router_jitter",
    "normalize_topk_weights",
)


@strict
class VMoEConfig(OneSConfig):
    r"""Configuration of a V-MoE model. Backbone fields keep their `OneSConfig` meaning; the MoE fields are:

    num_experts (`int`, defaults to 8): experts per MoE block, each an FFN of size `intermediate_size`.
    num_experts_per_tok (`int`, defaults to 2): top-k experts every token is sent to (no capacity limit, no drops).
    moe_layer_frequency (`int`, defaults to 2): block `i` is an MoE block iff `i % freq == freq - 1` (0-based), i.e.
        blocks 1, 3, 5, ... for 2 ("every other block", as V-MoE); 1 makes every block MoE. The other blocks keep the
        dense `mlp.{fc1, fc2}`. See `moe_layers`.
    router_aux_loss_coef (`float`, defaults to 0.01): weight of the load-balancing loss added to the task loss.
    router_jitter (`float`, defaults to 0.0): in training only, the router input is multiplied by uniform noise in
        `[1 - jitter, 1 + jitter]` (Switch Transformer jitter; the experts see the clean input).
    normalize_topk_weights (`bool`, defaults to True): renormalise the top-k softmax probabilities to sum to 1 (as
        Mixtral). Then a V-MoE whose experts are all equal to one FFN computes exactly that dense FFN.
    """

    model_type = "vmoe"
    _auto_class = None  # OneSConfig is marked for auto_map; V-MoE is not (it needs hf_moekd to load).

    num_experts: int = 8
    num_experts_per_tok: int = 2
    moe_layer_frequency: int = 2
    router_aux_loss_coef: float | int = 0.01
    router_jitter: float | int = 0.0
    normalize_topk_weights: bool = True

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.check_moe_fields()

    def check_moe_fields(self) -> None:
        """Raise a one-line `ValueError` naming the bad field and the fix."""
        if self.num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {self.num_experts}.")
        if not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise ValueError(
                f"num_experts_per_tok must be in [1, num_experts={self.num_experts}], got {self.num_experts_per_tok}."
            )
        if not 1 <= self.moe_layer_frequency <= self.num_hidden_layers:
            raise ValueError(
                f"moe_layer_frequency must be in [1, num_hidden_layers={self.num_hidden_layers}] (block i is MoE iff "
                f"i % freq == freq - 1), got {self.moe_layer_frequency}."
            )
        if self.router_aux_loss_coef < 0:
            raise ValueError(f"router_aux_loss_coef must be >= 0, got {self.router_aux_loss_coef}.")
        if not 0.0 <= self.router_jitter < 1.0:
            raise ValueError(f"router_jitter must be in [0, 1), got {self.router_jitter}.")

    @property
    def moe_layers(self) -> list[int]:
        """0-based indices of the MoE blocks: `i % moe_layer_frequency == moe_layer_frequency - 1`."""
        freq = self.moe_layer_frequency
        return [i for i in range(self.num_hidden_layers) if i % freq == freq - 1]

    def dense_config(self) -> OneSConfig:
        """The `OneSConfig` of the same backbone (every non-expert field, labels included), no MoE fields."""
        skip = {"transformers_version", "architectures", *MOE_FIELDS}
        values = {f.name: deepcopy(getattr(self, f.name)) for f in fields(OneSConfig) if f.init and f.name not in skip}
        config = OneSConfig(**values)
        config._attn_implementation = self._attn_implementation
        return config


__all__ = ["MOE_FIELDS", "VMoEConfig"]
