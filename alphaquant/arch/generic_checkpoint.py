"""Reading back a quantized checkpoint of a model on the generic path (transformers' classes).

    model = load_quantized_generic("out/qwen3-w4")      # models.hf_backend.HFCausalLM, dequantized, eval mode

The writer names tensors after our modules (`model.layers.N.mlp.experts.E.gate_proj.weight_packed`, ...), so
they are read by those names; the model is transformers' own class built from the checkpoint's config.json
(its `quantization_config` is ours, not a format transformers should apply). Counterpart of
`alphaquant.export.load_quantized` for the four local families; that function should dispatch here for any
other model type (it lives in export/, which this module only calls into).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn


@torch.no_grad()
def load_quantized_generic(directory, dtype=None, device=None):
    from alphaquant.export.compressed import decompress, layout_of
    from alphaquant.export.qconfig import module_groups
    from alphaquant.export.reader import STORED, _spec_of
    from alphaquant.recipe import build_format
    from models.common.checkpoint import CheckpointReader
    from models.hf_backend import HFCausalLM, build_meta
    from models.loading import resolve_dtype
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
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    groups = module_groups(qcfg, linears)
    formats = {}
    for gname, g in qcfg["alphaquant"]["groups"].items():
        spec = _spec_of(g)
        formats[gname] = (build_format(spec), layout_of(spec, act_order=g.get("act_order", False)))
    reader = CheckpointReader(directory)
    device = torch.device(device or "cpu")
    tensors = {}
    try:
        for key, _ in model.named_parameters(remove_duplicate=False):
            if model.tied and key == "lm_head.weight":
                continue
            owner, _, leaf = key.rpartition(".")
            if leaf == "weight" and owner in groups:
                fmt, layout = formats[groups[owner]]
                stored = {n: reader.read(f"{owner}.{n}") for n in STORED if f"{owner}.{n}" in reader.key_to_file}
                if not stored:
                    raise KeyError(f"{owner}: no quantized tensors in {directory} although config group "
                                   f"{groups[owner]} targets it")
                tensors[key] = decompress(stored, fmt, layout, dtype)
            else:
                tensors[key] = reader.read(key).to(dtype)
    finally:
        reader.close()
    model.install(tensors, device)
    model.lazy = False
    return model.eval()
