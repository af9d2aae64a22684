from .configuration import MixtralConfig
from .modeling import MixtralForCausalLM

__all__ = ["MixtralConfig", "MixtralForCausalLM"]
