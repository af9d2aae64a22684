"""`from models.olmoe.modeling_olmoe import OlmoeForCausalLM`: the module name transformers uses (models/olmoe/modeling.py)."""
from .modeling import *  # noqa: F401,F403
from .modeling import OlmoeForCausalLM

__all__ = ["OlmoeForCausalLM"]
