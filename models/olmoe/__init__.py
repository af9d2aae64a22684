from .configuration import OlmoeConfig
from .modeling import OlmoeForCausalLM

__all__ = ["OlmoeConfig", "OlmoeForCausalLM"]
