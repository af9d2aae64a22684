"""Reading back a quantized checkpoint of a model on the generic path (transformers' classes).

    model = load_quantized_generic("out/qwen3-w4")      # models.hf_backend.HFCausalLM, dequantized, eval mode

The writer names tensors after our modules (`model.layers.N.mlp.experts.E.gate_proj.weight_packed`, ...), so
they are read by those names; the model is transformers' own class built from the checkpoint's config.json
(its `quantization_config` is ours, not a format transformers should apply). GPT-OSS checkpoints of its own
recipe (experts mxfp4/32, the rest kept) are in GPT-OSS's native MXFP4 layout instead (fused
`mlp.experts.gate_up_proj_blocks` / `_scales`, export/gpt_oss_mxfp4.py), read with that module. Counterpart of
`alphaquant.export.load_quantized` for the four local families; that function should dispatch here for any
other model type (it lives in export/, which this module only calls into).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch


@torch.no_grad()
def load_quantized_generic(directory, dtype=None, device=None):
    from alphaquant.export.gpt_oss_mxfp4 import decoded_tensors as native_tensors, is_native
    from alphaquant.export.reader import decoded_tensors
    from alphaquant.models.common.checkpoint import CheckpointReader
    from alphaquant.models.hf_backend import HFCausalLM, build_meta
    from alphaquant.models.loading import resolve_dtype
    from transformers import AutoConfig

    directory = Path(directory)
    config_dict = json.loads((directory / "config.json").read_text())
    qcfg = config_dict.get("quantization_config")
    if qcfg is None or "alphaquant" not in qcfg:
        raise ValueError(f"{directory / 'config.json'} has no AlphaQuant quantization_config")
    config = AutoConfig.from_pretrained(str(directory))
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    dtype = resolve_dtype(dtype, config_dict)
    model = HFCausalLM(build_meta(config, dtype))
    reader = CheckpointReader(directory)
    device = torch.device(device or "cpu")
    try:
        if is_native(qcfg):              # GPT-OSS's own MXFP4 layout (export/gpt_oss_mxfp4.py)
            tensors = dict(native_tensors(model, reader, dtype, skip_lm_head=model.tied))
        else:
            tensors = dict(decoded_tensors(model, qcfg, reader, dtype, directory, skip_lm_head=model.tied))
    finally:
        reader.close()
    model.install(tensors, device)
    model.lazy = False
    return model.eval()
