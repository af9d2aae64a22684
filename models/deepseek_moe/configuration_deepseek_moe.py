"""`from models.deepseek_moe.configuration_deepseek_moe import DeepseekConfig`: the hub code's class name
(configuration_deepseek.py, DeepseekConfig) over models/deepseek_moe/configuration.py."""
from .configuration import *  # noqa: F401,F403
from .configuration import DeepseekMoeConfig

DeepseekConfig = DeepseekMoeConfig               # the hub's name for the same class

__all__ = ["DeepseekConfig", "DeepseekMoeConfig"]
