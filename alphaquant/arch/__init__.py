"""Per-family adapters: which family, which decoder layers, which linears in which order, which are experts.

>>> from alphaquant.arch import detect, get_adapter
>>> detect({"model_type": "mixtral"})
'mixtral'
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from models import UnsupportedModelError

from .base import ArchAdapter, MoEBlockInfo
from .deepseek_moe import DeepseekMoeAdapter
from .mixtral import MixtralAdapter
from .olmoe import OlmoeAdapter
from .qwen2_moe import Qwen2MoeAdapter

ADAPTERS: tuple[type[ArchAdapter], ...] = (OlmoeAdapter, Qwen2MoeAdapter, MixtralAdapter, DeepseekMoeAdapter)
FAMILIES = tuple(a.family for a in ADAPTERS)


def _model_type(model_or_config: Any) -> Any:
    """model_type from: our model, our config, a transformers model/config, a config.json dict or a directory."""
    obj = model_or_config
    if isinstance(obj, (str, os.PathLike)) and Path(obj).is_dir():
        cfg = Path(obj) / "config.json"
        if not cfg.is_file():
            raise FileNotFoundError(f"{cfg} not found: a model directory needs a config.json.")
        obj = json.loads(cfg.read_text())
    if isinstance(obj, dict):
        return obj.get("model_type")
    obj = getattr(obj, "config", obj)  # a model -> its config
    return getattr(obj, "model_type", None)


def get_adapter(model_or_config: Any) -> ArchAdapter:
    model_type = _model_type(model_or_config)
    for adapter in ADAPTERS:
        if adapter.matches(model_type):
            return adapter()
    types = sorted({t for a in ADAPTERS for t in a.model_types})
    raise UnsupportedModelError(
        f"model_type {model_type!r} is not supported; supported model types: {', '.join(types)}.")


def detect(model_or_config: Any) -> str:
    """'olmoe' | 'qwen2_moe' | 'mixtral' | 'deepseek_moe' (UnsupportedModelError otherwise)."""
    return get_adapter(model_or_config).family


__all__ = ["ADAPTERS", "FAMILIES", "ArchAdapter", "MoEBlockInfo", "detect", "get_adapter"]
