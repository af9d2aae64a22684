"""`from models.olmoe.configuration_olmoe import OlmoeConfig`: the module name transformers uses (models/olmoe/configuration.py)."""
from .configuration import *  # noqa: F401,F403
from .configuration import OlmoeConfig

__all__ = ["OlmoeConfig"]
