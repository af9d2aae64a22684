"""Local model code for four MoE families (OLMoE, Qwen2-MoE, Mixtral, DeepSeek-MoE v1), checkpoint compatible
with the hub layout: every expert is its own nn.Linear and every MoE block exposes its routing. See README.md.

>>> from alphaquant import models
>>> model = models.from_pretrained("allenai/OLMoE-1B-7B-0924", dtype="bf16", lazy=True)   # doctest: +SKIP
>>> layer = models.load_layer(model, 0)                                                   # doctest: +SKIP
"""
if __name__ == "models":   # a checkout imported by its top-level name, as the specification writes it
    from alphaquant._layout import alias_top_level   # (`from models.olmoe.modeling_olmoe import ...`): the same
    alias_top_level(__name__)                        # module objects as alphaquant.models.* (see _layout.py)


from .common.checkpoint import CheckpointError, CheckpointReader, ShardWriter
from .common.config import ModelConfigError, MoEModelConfig, UnsupportedModelError
from .common.decoder import DecoderLayer, MoEForCausalLM
from .common.moe import SharedGateAct, SparseMoeBlock, TopKRouter, expert_token_weights
from .loading import (from_config, from_pretrained, install_layer, iter_checkpoint_tensors, load_layer, read_layer,
                      save_pretrained,
                      unload_layer)
from .registry import FAMILIES, SUPPORTED_MODEL_TYPES, config_from_dict, family_of

__all__ = [
    "CheckpointError", "CheckpointReader", "ShardWriter", "ModelConfigError", "MoEModelConfig", "UnsupportedModelError", "DecoderLayer",
    "MoEForCausalLM", "SharedGateAct", "SparseMoeBlock", "TopKRouter", "expert_token_weights", "from_config",
    "from_pretrained", "install_layer", "iter_checkpoint_tensors", "load_layer", "read_layer", "save_pretrained", "unload_layer", "FAMILIES",
    "SUPPORTED_MODEL_TYPES", "config_from_dict", "family_of",
]
