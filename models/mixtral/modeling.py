"""Mixtral causal LM: the shared trunk (models/common) configured by MixtralConfig."""

from ..common.decoder import MoEForCausalLM
from .configuration import MixtralConfig


class MixtralForCausalLM(MoEForCausalLM):
    config_class = MixtralConfig
