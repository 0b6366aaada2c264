"""MiniMoE configuration: a BERT-like student whose FFN (and optionally attention) layers are top-1 experts.

Reference: "Lifting the Curse of Capacity Gap in Distilling Language Models" (Zhang et al., ACL 2023).
This file is copied next to saved checkpoints (trust_remote_code loading): it imports only transformers.
"""

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig

# Fields copied from a dense BERT config by `MiniMoEConfig.from_dense`.
DENSE_FIELDS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "hidden_act",
    "hidden_dropout_prob", "attention_probs_dropout_prob", "max_position_embeddings", "type_vocab_size",
    "initializer_range", "layer_norm_eps", "pad_token_id", "classifier_dropout",
    "id2label", "label2id", "problem_type",
)


@strict
class MiniMoEConfig(PreTrainedConfig):
    r"""Configuration of a MiniMoE model. BERT fields keep their BERT meaning; the MoE fields are:

    num_ffn_experts (`int`, defaults to 4): FFN experts per layer, each the size of the dense FFN (`intermediate_size`).
    num_attention_experts (`int`, defaults to 1): attention experts per layer; each is a group of
        `num_attention_heads // num_attention_experts` heads (1 = plain multi-head attention, no router).
    router_noise (`float`, *optional*): eps of the uniform router noise in training; `None` uses `hidden_dropout_prob`.
    router_noise_type (`str`, defaults to "additive"): "additive" adds `U(-eps, eps)` to every gate logit, as the
        official code (`gates += noises`, noises in `[1 - eps, 1 + eps]`: the constant 1 does not change the
        softmax); "multiplicative" multiplies the logits by `U(1 - eps, 1 + eps)` (hf_moekd before 0.2).
    router_aux_loss_coef (`float`, defaults to 0.01): weight of the load-balancing loss added to the task loss.
    router_aux_loss_tokens (`str`, defaults to "all"): the tokens the load-balancing loss averages over. "all" (the
        official code: `feed_forward` reshapes the whole `[batch, seq]` block, padding included, before `me` / `ce`,
        GeneZC/MiniMoE modules/modeling_moebert_gate.py lines 455-476); "real" only the tokens with attention_mask 1
        (hf_moekd before issue 29).
    router_bias (`bool`, defaults to True): the router gate is `Linear(hidden, E)` with a bias, as the official
        `GateLinear(nn.Linear)` (bias=True; modules/modeling_moebert_gate.py lines 325-343). False: no bias (hf_moekd
        before issue 29). A checkpoint saved without a router bias loads with a zero bias (the same function).
    router_init (`str`, defaults to "uniform"): initialisation of a fresh router. "uniform" is the official one:
        `GateLinear.moefy` ends with `nn.Linear.reset_parameters()` (modules/modeling_moebert_gate.py line 343, called
        after the student is built, run_distillation_bert.py lines 266-271), i.e. weight and bias
        `U(-1/sqrt(hidden), 1/sqrt(hidden))` (kaiming_uniform with a=sqrt(5)); "normal": weight `N(0,
        initializer_range)`, zero bias (the BERT init; hf_moekd before issue 29).
    expert_shared_fraction (`float`, defaults to 2/3): fraction of each expert's neurons identical across experts at
        initialisation (the rest are independent).
    scale_expert_output_by_gate (`bool`, defaults to True): multiply an expert's output by its gate probability (as in
        the paper; this is what trains the router through the task loss). `False` makes a converted model with
        identical experts reproduce the dense model exactly; the router then learns only from the balancing loss.
    """

    model_type = "minimoe"

    vocab_size: int = 30522
    hidden_size: int = 384
    num_hidden_layers: int = 3
    num_attention_heads: int = 12
    intermediate_size: int = 1536
    hidden_act: str = "gelu"
    hidden_dropout_prob: float | int = 0.1
    attention_probs_dropout_prob: float | int = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    pad_token_id: int | None = 0
    classifier_dropout: float | int | None = None
    num_ffn_experts: int = 4
    num_attention_experts: int = 1
    router_noise: float | int | None = None
    router_noise_type: str = "additive"
    router_aux_loss_coef: float | int = 0.01
    router_aux_loss_tokens: str = "all"
    router_bias: bool = True
    router_init: str = "uniform"
    expert_shared_fraction: float | int = 2 / 3
    scale_expert_output_by_gate: bool = True

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.check_moe_fields()

    def check_moe_fields(self) -> None:
        """Raise a one-line `ValueError` naming the bad field and the fix."""
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
        if self.num_ffn_experts < 1:
            raise ValueError(f"num_ffn_experts must be >= 1 (1 = a dense FFN), got {self.num_ffn_experts}.")
        if self.num_attention_experts < 1:
            raise ValueError(
                f"num_attention_experts must be >= 1 (1 = plain attention), got {self.num_attention_experts}."
            )
        if self.num_attention_heads < 1 or self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads}); change one of them."
            )
        if self.num_attention_heads % self.num_attention_experts:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be divisible by num_attention_experts "
                f"({self.num_attention_experts}): each attention expert is an equal group of heads."
            )
        if not 0.0 <= self.expert_shared_fraction <= 1.0:
            raise ValueError(f"expert_shared_fraction must be in [0, 1], got {self.expert_shared_fraction}.")
        if self.router_noise is not None and not 0.0 <= self.router_noise < 1.0:
            raise ValueError(
                f"router_noise must be in [0, 1) or None (= hidden_dropout_prob), got {self.router_noise}."
            )

        if self.router_noise_type not in ("additive", "multiplicative"):
            raise ValueError(f"router_noise_type must be 'additive' or 'multiplicative', got {self.router_noise_type!r}.")
        if self.router_aux_loss_tokens not in ("all", "real"):
            raise ValueError(f"router_aux_loss_tokens must be 'all' (official: padding included) or 'real', got "
                             f"{self.router_aux_loss_tokens!r}.")
        if self.router_init not in ("uniform", "normal"):
            raise ValueError(f"router_init must be 'uniform' (official) or 'normal', got {self.router_init!r}.")

    @property
    def router_noise_eps(self) -> float:
        """The noise eps actually used: `router_noise`, else `hidden_dropout_prob`."""
        return float(self.hidden_dropout_prob if self.router_noise is None else self.router_noise)

    @classmethod
    def from_dense(cls, config: PreTrainedConfig, **overrides) -> "MiniMoEConfig":
        """A MiniMoE config with the architecture and label fields of a dense BERT config, plus `overrides`."""
        fields = {name: getattr(config, name) for name in DENSE_FIELDS if getattr(config, name, None) is not None}
        if "id2label" not in fields and getattr(config, "num_labels", None) is not None:
            fields["num_labels"] = config.num_labels
        fields.update(overrides)
        return cls(**fields)


__all__ = ["MiniMoEConfig"]
