"""OLMoE: 'mlp' MoE block, experts gate_proj/up_proj/down_proj, no shared expert."""

from .base import ArchAdapter


class OlmoeAdapter(ArchAdapter):
    family = "olmoe"
    model_types = ("olmoe",)
