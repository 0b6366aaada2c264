"""V-MoE configuration: a pre-LayerNorm ViT with top-k Mixture-of-Experts MLPs in every other block.

Reference: "Scaling Vision with Sparse Mixture of Experts" (Riquelme et al., NeurIPS 2021).
This file is copied next to saved checkpoints (trust_remote_code loading): it imports only transformers.
"""

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig

# Fields of VMoEConfig that the dense twin's config (DenseViTConfig) does not have.
MOE_FIELDS = (
    "num_experts", "num_experts_per_tok", "moe_layer_frequency", "router_aux_loss_coef", "router_jitter",
    "normalize_topk_weights",
)


# Copied from hf_moekd.models.dense_vit.configuration_dense_vit.ViTBackboneConfig
@strict
class ViTBackboneConfig(PreTrainedConfig):
    r"""The fields and checks of a pre-LayerNorm ViT backbone, shared by DenseViT and V-MoE (each keeps a copy).

    image_size (`int`, defaults to 224): side of the square input images (pixels).
    patch_size (`int`, defaults to 16): side of the square patches; must divide `image_size`.
    num_channels (`int`, defaults to 3): input image channels.
    hidden_size, num_hidden_layers, num_attention_heads, intermediate_size, hidden_act, hidden_dropout_prob,
    attention_probs_dropout_prob, layer_norm_eps, initializer_range, qkv_bias: as in `ViTConfig`.
    The number of classes comes from `num_labels` / `id2label` (1 label = regression head, MSE loss).
    """

    image_size: int = 224
    patch_size: int = 16
    num_channels: int = 3
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float | int = 0.0
    attention_probs_dropout_prob: float | int = 0.0
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02
    qkv_bias: bool = True

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.check_backbone_fields()

    def check_backbone_fields(self) -> None:
        """Raise a one-line `ValueError` naming the bad field and the fix."""
        for name in ("image_size", "patch_size", "num_channels", "hidden_size", "num_hidden_layers",
                     "num_attention_heads", "intermediate_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size ({self.image_size}) must be divisible by patch_size ({self.patch_size}); "
                "change one of them."
            )
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads}); change one of them."
            )
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}.")

    @property
    def num_patches(self) -> int:
        """Patches per image (the sequence length is `num_patches + 1` with the CLS token)."""
        return (self.image_size // self.patch_size) ** 2


@strict
class VMoEConfig(ViTBackboneConfig):
    r"""Configuration of a V-MoE model. Backbone fields keep their `ViTBackboneConfig` meaning; the MoE fields are:

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


__all__ = ["MOE_FIELDS", "VMoEConfig", "ViTBackboneConfig"]
