"""`from models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeForCausalLM`: the module name transformers uses (models/qwen2_moe/modeling.py)."""
from .modeling import *  # noqa: F401,F403
from .modeling import Qwen2MoeForCausalLM

__all__ = ["Qwen2MoeForCausalLM"]
