"""Qwen2-MoE: 'mlp' block with 'shared_expert' scaled by sigmoid('shared_expert_gate'); some layers dense."""

from .base import ArchAdapter


class Qwen2MoeAdapter(ArchAdapter):
    family = "qwen2_moe"
    model_types = ("qwen2_moe",)
    shared_attr = "shared_expert"
    has_shared_gate = True
