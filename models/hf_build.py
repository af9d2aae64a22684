"""Building a transformers causal LM on the meta device for the generic path, and the checks before it.

    config = hf_config(directory)          # UnsupportedModelError when transformers cannot build it offline
    hf = build_meta(config, torch.bfloat16)  # transformers' own class, parameters on meta

Refused, each with one sentence: encoder-decoder models, models without a causal-LM head, already-quantized
checkpoints, models that scale embeddings or logits in their own forward, layouts other than
model.layers / model.embed_tokens / lm_head.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .common.config import UnsupportedModelError


def hf_config(source: str | os.PathLike | dict):
    """A transformers config from a directory or a config.json dict; UnsupportedModelError when
    transformers cannot build it offline (unknown model_type, custom code)."""
    from transformers import AutoConfig

    try:
        if isinstance(source, dict):
            d = dict(source)
            mt = d.pop("model_type", None)
            return AutoConfig.for_model(mt, **d)
        return AutoConfig.from_pretrained(str(source), trust_remote_code=False)
    except (ValueError, KeyError, OSError) as e:
        mt = source.get("model_type") if isinstance(source, dict) else _model_type_of(source)
        raise UnsupportedModelError(
            f"model_type {mt!r} is not supported: transformers cannot build it offline "
            f"({str(e).splitlines()[0][:160]}) and it is not one of AlphaQuant's local families "
            f"(olmoe, qwen2_moe, mixtral, deepseek_moe / deepseek).") from None


def _model_type_of(directory) -> Any:
    import json
    try:
        return json.loads((Path(directory) / "config.json").read_text()).get("model_type")
    except (OSError, ValueError):
        return None


def check_causal_lm(config) -> None:
    """UnsupportedModelError unless `config` is a decoder-only causal LM that transformers can build."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    mt = config.model_type
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedModelError(f"model_type {mt!r} is an encoder-decoder model; AlphaQuant quantizes "
                                    f"decoder-only causal LMs.")
    if mt not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise UnsupportedModelError(f"model_type {mt!r} is not a causal language model in transformers "
                                    f"(no AutoModelForCausalLM class); AlphaQuant quantizes decoder-only causal LMs.")


def build_meta(config, dtype: torch.dtype) -> nn.Module:
    """transformers' own model class for `config`, parameters on the meta device (no storage)."""
    from transformers import AutoModelForCausalLM

    check_causal_lm(config)
    check_head(config)
    qc = getattr(config, "quantization_config", None)
    if qc:
        method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", qc)
        raise UnsupportedModelError(f"model_type {config.model_type!r}: this checkpoint is already quantized "
                                    f"({method}); AlphaQuant quantizes full-precision (bf16/fp16/fp32) weights, "
                                    f"so point model.path at a full-precision copy.")
    try:
        with torch.device("meta"):
            hf = AutoModelForCausalLM.from_config(config, dtype=dtype)
    except Exception as e:             # noqa: BLE001 - any construction failure is "cannot build"
        raise UnsupportedModelError(f"transformers cannot build model_type {config.model_type!r} from its "
                                    f"config ({type(e).__name__}: {str(e).splitlines()[0][:160]}).") from None
    base = getattr(hf, "model", None)
    if base is None or not isinstance(getattr(base, "layers", None), nn.ModuleList) or \
            not isinstance(getattr(hf, "lm_head", None), nn.Linear) or not hasattr(base, "embed_tokens"):
        raise UnsupportedModelError(f"model_type {config.model_type!r}: AlphaQuant's generic path needs the "
                                    f"'model.layers' / 'model.embed_tokens' / 'lm_head' layout most causal LMs "
                                    f"in transformers use; this one has another (AlphaQuant's local families: "
                                    f"olmoe, qwen2_moe, mixtral, deepseek_moe).")
    return hf.eval()


def buffers_to_params(module: nn.Module, skip: tuple[str, ...] = ()) -> None:
    """Persistent buffers as frozen parameters (read and written with the parameters)."""
    for name, mod in module.named_modules():
        if any(name == s or name.startswith(s + ".") for s in skip):
            continue
        for leaf in list(mod._buffers):
            if leaf in mod._non_persistent_buffers_set or mod._buffers[leaf] is None:
                continue
            b = mod._buffers.pop(leaf)
            mod._parameters[leaf] = nn.Parameter(b, requires_grad=False)


def rebuild_meta_buffers(hf: nn.Module) -> None:
    """Non-persistent buffers (rotary inv_freq, Gemma's embedding scale) are computed at construction, which
    happened on meta. Modules that take the config are constructed again on the host; the others outside the
    decoder layers are taken from the trunk built again on the host with no decoder layers (weights left
    uninitialised: only the buffers are used). A computed buffer inside a decoder layer is refused."""
    left = []
    for name, mod in list(hf.named_modules()):
        if not any(b is not None and b.is_meta for b in mod._buffers.values()):
            continue
        cfg = getattr(mod, "config", None)
        if cfg is not None:
            owner, _, leaf = name.rpartition(".")
            (hf.get_submodule(owner) if owner else hf)._modules[leaf] = type(mod)(config=cfg)
        else:
            left.append(name)
    if not left:
        return
    inside = [n for n in left if n.startswith("model.layers.")]
    if inside:
        raise UnsupportedModelError(f"{inside[0]} has computed buffers AlphaQuant cannot rebuild off the meta "
                                    f"device ({type(hf.get_submodule(inside[0])).__name__}).")
    from transformers.initialization import no_init_weights

    cfg0 = copy.deepcopy(hf.model.config)
    cfg0.num_hidden_layers = 0
    with no_init_weights(), torch.device("cpu"):
        host = type(hf.model)(cfg0)
    for name in left:
        mod = hf.get_submodule(name)
        fresh = host.get_submodule(name.removeprefix("model."))
        for leaf, buf in mod._buffers.items():
            if buf is not None and buf.is_meta:
                mod._buffers[leaf] = fresh._buffers[leaf].to(buf.dtype)


def check_head(config) -> None:
    """UnsupportedModelError for causal LMs whose forward scales the embeddings before the first layer or the
    logits after lm_head in code of its own (the generic path runs embed_tokens, the layers, norm + lm_head)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for key, neutral in (("final_logit_softcapping", None), ("logits_scaling", 1.0), ("logit_scale", 1.0),
                         ("output_multiplier_scale", 1.0), ("embedding_multiplier", 1.0)):
        v = getattr(text, key, neutral)
        if v is not None and v != neutral:
            raise UnsupportedModelError(f"model_type {config.model_type!r} scales its embeddings or logits outside "
                                        f"its modules ({key}={v}), which AlphaQuant's generic path does not do yet.")
