"""DeepSeek-MoE v1 causal LM: the shared trunk (models/common) configured by DeepseekMoeConfig."""

from ..common.decoder import MoEForCausalLM
from .configuration import DeepseekMoeConfig


class DeepseekMoeForCausalLM(MoEForCausalLM):
    config_class = DeepseekMoeConfig
