"""Qwen2-MoE causal LM: the shared trunk (models/common) configured by Qwen2MoeConfig."""

from ..common.decoder import MoEForCausalLM
from .configuration import Qwen2MoeConfig


class Qwen2MoeForCausalLM(MoEForCausalLM):
    config_class = Qwen2MoeConfig
