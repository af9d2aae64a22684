"""`from models.mixtral.configuration_mixtral import MixtralConfig`: the module name transformers uses (models/mixtral/configuration.py)."""
from .configuration import *  # noqa: F401,F403
from .configuration import MixtralConfig

__all__ = ["MixtralConfig"]
