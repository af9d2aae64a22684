"""`from models.qwen2_moe.configuration_qwen2_moe import Qwen2MoeConfig`: the module name transformers uses (models/qwen2_moe/configuration.py)."""
from .configuration import *  # noqa: F401,F403
from .configuration import Qwen2MoeConfig

__all__ = ["Qwen2MoeConfig"]
