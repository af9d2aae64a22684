"""`detect_moe_architecture(model)`: the specification's six labels over `alphaquant.arch.detect`.

    >>> detect_moe_architecture({"model_type": "qwen2_moe"})
    'qwen'
    >>> detect_moe_architecture({"model_type": "deepseek"})
    'deepseek'

Labels: 'olmoe' | 'qwen' | 'mixtral' | 'deepseek' (the four families AlphaQuant has its own model code
for: OLMoE, Qwen2-MoE, Mixtral, DeepSeek-MoE v1), 'generic_moe' (any other MoE transformers builds,
e.g. Qwen3-MoE, DeepSeek-V3) and 'standard' (a dense decoder-only LM). Takes our models, transformers
models and configs, config.json dicts and model directories; what cannot be quantized at all (an
encoder-decoder, no causal-LM head) is a models.UnsupportedModelError in one sentence.
"""
from __future__ import annotations

from typing import Any

LABELS = {"olmoe": "olmoe", "qwen2_moe": "qwen", "mixtral": "mixtral", "deepseek_moe": "deepseek",
          "generic_moe": "generic_moe", "standard": "standard"}


def detect_moe_architecture(model: Any) -> str:
    """'olmoe' | 'qwen' | 'mixtral' | 'deepseek' | 'generic_moe' | 'standard' (see the module doc)."""
    from alphaquant.arch import detect

    return LABELS[detect(model)]
