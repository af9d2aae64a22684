"""Adapters: which kind of model, which decoder layers, which linears in which order, which are experts.

Kinds: the four local families (olmoe, qwen2_moe, mixtral, deepseek_moe: our own model code in models/),
`generic_moe` (any other MoE transformers builds, its experts through transformers' experts interface) and
`standard` (a dense decoder-only causal LM), both through `generic.GenericAdapter` over transformers' classes.
`model.implementation: transformers` sends the four families the generic way too.

>>> from alphaquant.arch import detect, get_adapter
>>> detect({"model_type": "mixtral"})
'mixtral'
>>> detect({"model_type": "mixtral"}, implementation="transformers")   # doctest: +SKIP
'generic_moe'
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from alphaquant.models import UnsupportedModelError

from .base import ArchAdapter, MoEBlockInfo
from .deepseek_moe import DeepseekMoeAdapter
from .generic import GenericAdapter
from .mixtral import MixtralAdapter
from .olmoe import OlmoeAdapter
from .qwen2_moe import Qwen2MoeAdapter

ADAPTERS: tuple[type[ArchAdapter], ...] = (OlmoeAdapter, Qwen2MoeAdapter, MixtralAdapter, DeepseekMoeAdapter)
FAMILIES = tuple(a.family for a in ADAPTERS)
KINDS = (*FAMILIES, "generic_moe", "standard")


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


def _local_adapter(model_type: Any) -> type[ArchAdapter] | None:
    return next((a for a in ADAPTERS if a.matches(model_type)), None)


def _is_generic_model(obj: Any) -> bool:
    from alphaquant.models.hf_backend import HFCausalLM
    return isinstance(obj, HFCausalLM)


def get_adapter(model_or_config: Any) -> ArchAdapter:
    """The adapter of a loaded model: GenericAdapter for a transformers-backed model (models.hf_backend),
    else the local family's adapter by model_type."""
    if _is_generic_model(model_or_config):
        return GenericAdapter(model_or_config)
    model_type = _model_type(model_or_config)
    adapter = _local_adapter(model_type)
    if adapter is not None:
        return adapter()
    types = sorted({t for a in ADAPTERS for t in a.model_types})
    raise UnsupportedModelError(
        f"model_type {model_type!r} is not one of the local families ({', '.join(types)}); load it with "
        f"alphaquant.arch.load_model (the generic transformers path) instead.")


def uses_local_code(model_type: Any, implementation: str = "local") -> bool:
    """True when the model takes AlphaQuant's own model code (a local family and implementation 'local')."""
    if implementation not in ("local", "transformers"):
        raise ValueError(f"implementation must be 'local' or 'transformers', got {implementation!r}")
    return implementation == "local" and _local_adapter(model_type) is not None


def detect(model_or_config: Any, implementation: str = "local") -> str:
    """'olmoe' | 'qwen2_moe' | 'mixtral' | 'deepseek_moe' | 'generic_moe' | 'standard'.

    model_or_config: a loaded model, a transformers or local config, a config.json dict or a model
    directory. UnsupportedModelError (one sentence) for encoder-decoder models, models without a causal-LM
    head, and architectures transformers cannot build offline."""
    if _is_generic_model(model_or_config):
        return model_or_config.family
    model_type = _model_type(model_or_config)
    if uses_local_code(model_type, implementation):
        return _local_adapter(model_type).family
    return _generic_skeleton(model_or_config).family


def _is_hf_object(obj: Any) -> bool:
    try:
        from transformers import PretrainedConfig, PreTrainedModel
    except ImportError:       # pragma: no cover
        return False
    return isinstance(obj, (PretrainedConfig, PreTrainedModel))


def _generic_skeleton(obj: Any, dtype=None):
    """The generic model built on meta (no weights) from any config form."""
    import torch
    from alphaquant.models.hf_backend import HFCausalLM, build_meta, hf_config, skeleton
    if isinstance(obj, (str, os.PathLike)):
        return skeleton(obj, dtype)
    config = getattr(obj, "config", obj) if not isinstance(obj, dict) else obj
    if isinstance(config, dict):
        config = hf_config(config)
    if not _is_hf_object(config):
        raise UnsupportedModelError(f"model_type {_model_type(obj)!r} has no transformers config to build from.")
    return HFCausalLM(build_meta(config, dtype or torch.float32))


def load_model(model_cfg, skeleton_only: bool = False, headers: bool = False):
    """(model, adapter) for the `model:` config section: the local family's code or the generic path.

    skeleton_only: the model on the meta device from config.json alone (recipe checks, no weight read; a hub
    id fetches its json files only). headers: also check the skeleton against the safetensors headers
    (`models.loading.check_against_headers`: a dry run; a hub id's headers are read without a download)."""
    from alphaquant import models
    from alphaquant.models.loading import read_config_dict, resolve_checkpoint_dir

    directory = (model_cfg.local_dir or resolve_checkpoint_dir(model_cfg.path, weights=False)) if skeleton_only \
        else resolve_checkpoint_dir(model_cfg.path)
    model_type = read_config_dict(directory).get("model_type")
    if uses_local_code(model_type, model_cfg.implementation):
        if skeleton_only:
            from alphaquant.models.loading import skeleton
            model = skeleton(directory, model_cfg.dtype)
            if headers:
                from alphaquant.models.loading import check_against_headers
                check_against_headers(model, model_cfg.path, directory)
        else:
            model = models.from_pretrained(directory, dtype=model_cfg.dtype, lazy=model_cfg.lazy)
        return model, get_adapter(model)
    from alphaquant.models import hf_backend
    if skeleton_only:
        model = hf_backend.skeleton(directory, model_cfg.dtype)
        if headers:
            from alphaquant.models.loading import check_against_headers
            check_against_headers(model, model_cfg.path, directory)
    else:
        model = hf_backend.from_pretrained(directory, dtype=model_cfg.dtype, lazy=model_cfg.lazy)
    return model, GenericAdapter(model)


def model_limits(model_cfg) -> tuple[int | None, int | None]:
    """(vocab_size, max_position_embeddings) from a local model directory's config.json (no weights)."""
    from alphaquant.models.loading import read_config_dict

    d = read_config_dict(model_cfg.local_dir)
    if uses_local_code(d.get("model_type"), model_cfg.implementation):
        from alphaquant import models
        mc = models.config_from_dict(d)
        return mc.vocab_size, getattr(mc, "max_position_embeddings", None)
    from alphaquant.models.hf_backend import hf_config
    cfg = hf_config(model_cfg.local_dir)
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    return getattr(text, "vocab_size", None), getattr(text, "max_position_embeddings", None)


__all__ = ["ADAPTERS", "FAMILIES", "KINDS", "ArchAdapter", "GenericAdapter", "MoEBlockInfo", "detect", "get_adapter",
           "load_model", "model_limits", "uses_local_code"]
