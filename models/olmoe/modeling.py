"""OLMoE causal LM: the shared trunk (models/common) configured by OlmoeConfig."""

from ..common.decoder import MoEForCausalLM
from .configuration import OlmoeConfig


class OlmoeForCausalLM(MoEForCausalLM):
    config_class = OlmoeConfig
