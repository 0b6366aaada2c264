"""DenseViT configuration: a plain (dense) ViT image classifier, the dense twin that V-MoE teachers are gathered into.

This file is copied next to saved checkpoints (trust_remote_code loading): it imports only transformers.
"""

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig


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
class DenseViTConfig(ViTBackboneConfig):
    r"""Configuration of a DenseViT model: pre-LayerNorm ViT blocks, CLS token, learned position embeddings, linear
    head. The fields are those of `ViTBackboneConfig`."""

    model_type = "dense_vit"


__all__ = ["DenseViTConfig", "ViTBackboneConfig"]
