"""model_type -> (config class, model class) for the four supported families."""

from __future__ import annotations

from typing import Any

from .common.config import MoEModelConfig, UnsupportedModelError
from .common.decoder import MoEForCausalLM
from .deepseek_moe import DeepseekMoeForCausalLM
from .mixtral import MixtralForCausalLM
from .olmoe import OlmoeForCausalLM
from .qwen2_moe import Qwen2MoeForCausalLM

# config.json model_type -> model class; DeepSeek-MoE v1's hub config says "deepseek".
MODEL_CLASSES: dict[str, type[MoEForCausalLM]] = {
    "olmoe": OlmoeForCausalLM,
    "mixtral": MixtralForCausalLM,
    "qwen2_moe": Qwen2MoeForCausalLM,
    "deepseek": DeepseekMoeForCausalLM,
    "deepseek_moe": DeepseekMoeForCausalLM,  # accepted alias: our own family name
}
FAMILIES = ("olmoe", "qwen2_moe", "mixtral", "deepseek_moe")
SUPPORTED_MODEL_TYPES = tuple(MODEL_CLASSES)


def model_class_for(model_type: Any) -> type[MoEForCausalLM]:
    cls = MODEL_CLASSES.get(model_type)
    if cls is None:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported; supported model types: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}.")
    return cls


def config_from_dict(config_dict: dict[str, Any]) -> MoEModelConfig:
    """Parse a config.json dict into the family's config (raises UnsupportedModelError)."""
    return model_class_for(config_dict.get("model_type")).config_class.from_hf(config_dict)


def family_of(model_type: Any) -> str:
    return model_class_for(model_type).config_class.family
