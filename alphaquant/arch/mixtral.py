"""Mixtral: 'block_sparse_moe' block, experts w1 (gate) / w3 (up) / w2 (down)."""

from .base import ArchAdapter


class MixtralAdapter(ArchAdapter):
    family = "mixtral"
    model_types = ("mixtral",)
    moe_attr = "block_sparse_moe"
    proj_names = ("w1", "w3", "w2")
