"""`from models.mixtral.modeling_mixtral import MixtralForCausalLM`: the module name transformers uses (models/mixtral/modeling.py)."""
from .modeling import *  # noqa: F401,F403
from .modeling import MixtralForCausalLM

__all__ = ["MixtralForCausalLM"]
