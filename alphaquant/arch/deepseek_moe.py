"""DeepSeek-MoE v1: 'mlp' block with unweighted 'shared_experts'; first_k_dense_replace / moe_layer_freq
layers dense. config.json model_type is 'deepseek'."""

from .base import ArchAdapter


class DeepseekMoeAdapter(ArchAdapter):
    family = "deepseek_moe"
    model_types = ("deepseek", "deepseek_moe")
    shared_attr = "shared_experts"
