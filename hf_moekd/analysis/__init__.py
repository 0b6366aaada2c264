"""Analyses of trained MoE models: expert probing (MoDE's analysis) and expert diversity."""
from .diversity import expert_output_similarity, expert_weight_similarity, mean_pairwise_cosine, mode_loss_on_data
from .probing import ProbeResult, ProbeRow, plot_probe, probe_experts

__all__ = [
    "ProbeResult",
    "ProbeRow",
    "expert_output_similarity",
    "expert_weight_similarity",
    "mean_pairwise_cosine",
    "mode_loss_on_data",
    "plot_probe",
    "probe_experts",
]
