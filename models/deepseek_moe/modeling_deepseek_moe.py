"""`from models.deepseek_moe.modeling_deepseek_moe import DeepseekForCausalLM`: the module and class names of
DeepSeek-MoE's own hub code (modeling_deepseek.py, DeepseekForCausalLM) over models/deepseek_moe/modeling.py."""
from .modeling import *  # noqa: F401,F403
from .modeling import DeepseekMoeForCausalLM

DeepseekForCausalLM = DeepseekMoeForCausalLM     # the hub's name for the same class

__all__ = ["DeepseekForCausalLM", "DeepseekMoeForCausalLM"]
