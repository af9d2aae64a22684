from .configuration import Qwen2MoeConfig
from .modeling import Qwen2MoeForCausalLM

__all__ = ["Qwen2MoeConfig", "Qwen2MoeForCausalLM"]
