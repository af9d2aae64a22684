from .configuration import DeepseekMoeConfig
from .modeling import DeepseekMoeForCausalLM

__all__ = ["DeepseekMoeConfig", "DeepseekMoeForCausalLM"]
