"""Analyses of trained MoE models: expert probing (MoDE's analysis), expert diversity, routing, and their plots."""
from .diversity import expert_output_similarity, expert_weight_similarity, mean_pairwise_cosine, mode_loss_on_data
from ..utils.plots import plot_loss_terms, plot_probe, plot_routing, plot_spectra
from .probing import ProbeResult, ProbeRow, probe_experts
from .routing import has_experts, routing_counts

__all__ = [
    "ProbeResult",
    "ProbeRow",
    "expert_output_similarity",
    "expert_weight_similarity",
    "has_experts",
    "mean_pairwise_cosine",
    "mode_loss_on_data",
    "plot_loss_terms",
    "plot_probe",
    "plot_routing",
    "plot_spectra",
    "probe_experts",
    "routing_counts",
]
