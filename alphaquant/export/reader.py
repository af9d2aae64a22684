"""Reading a quantized checkpoint back into our model code, weights dequantized, for evaluation.

    model = load_quantized("out/olmoe-w4")           # models.* model, eval mode
    logits = model(input_ids)

Independent of compressed-tensors: every module's format comes from the "alphaquant" block
of `quantization_config` (written by writer.py) and is decoded with alphaquant.formats, so
AlphaQuant-only layouts (alphaquant-packed) load too. Parameters are read one at a time
(CheckpointReader), the model is built on the meta device: one model in memory, never two.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from alphaquant.models import CheckpointReader
from alphaquant.models.loading import resolve_dtype
from alphaquant.models.registry import MODEL_CLASSES, config_from_dict, model_class_for

from alphaquant.config.recipe import QuantSpec, build_format

from .compressed import decompress, layout_of
from .qconfig import module_groups

# Tensor names a quantized linear may store besides "bias" (compressed.py writes them).
STORED = ("weight", "weight_packed", "weight_scale", "weight_zero_point", "weight_global_scale",
          "weight_shape", "weight_g_idx")


def _spec_of(group: dict) -> QuantSpec:
    return QuantSpec(wq=group["wq"], group_size=group["group_size"], sym=group["sym"], aq=group["aq"], skip=False,
                     scale_dtype=group.get("scale_dtype", "float16"))


def _set(model: nn.Module, key: str, t: torch.Tensor) -> None:
    owner, _, leaf = key.rpartition(".")
    model.get_submodule(owner)._parameters[leaf] = nn.Parameter(t, requires_grad=False)


@torch.no_grad()
def decompress_modules(tensors: dict[str, torch.Tensor], specs: dict, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """{module name: dequantized weight} for every module of `specs` whose tensors (as
    LayerCompressor stores them: `<module>.weight_packed`, ...) are in `tensors`."""
    out = {}
    for name, spec in specs.items():
        stored = {n: tensors[f"{name}.{n}"] for n in STORED if f"{name}.{n}" in tensors}
        if stored:
            layout = layout_of(spec, act_order="weight_g_idx" in stored)
            out[name] = decompress(stored, build_format(spec), layout, dtype)
    return out


@torch.no_grad()
def decoded_tensors(model: nn.Module, qcfg: dict, reader, dtype, directory, skip_lm_head: bool = False):
    """(parameter name, tensor in dtype) for every parameter of `model` (built on meta from the checkpoint's
    config.json): quantized linears decoded from their stored codes and scales, the rest read as stored.
    Shared by the local families' reader and the generic path's."""
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    groups = module_groups(qcfg, linears)
    formats = {}
    for gname, g in qcfg["alphaquant"]["groups"].items():
        spec = _spec_of(g)
        formats[gname] = (build_format(spec), layout_of(spec, act_order=g.get("act_order", False)))
    for key, _ in list(model.named_parameters(remove_duplicate=False)):
        if skip_lm_head and key == "lm_head.weight":
            continue
        owner, _, leaf = key.rpartition(".")
        if leaf == "weight" and owner in groups:
            fmt, layout = formats[groups[owner]]
            stored = {n: reader.read(f"{owner}.{n}") for n in STORED if f"{owner}.{n}" in reader.key_to_file}
            if not stored:
                raise KeyError(f"{owner}: no quantized tensors in {directory} although config group "
                               f"{groups[owner]} targets it")
            yield key, decompress(stored, fmt, layout, dtype)
        else:
            yield key, reader.read(key).to(dtype)


def load_quantized(directory, dtype=None, device=None) -> nn.Module:
    """Our model with dequantized weights from a checkpoint written by QuantizedCheckpointWriter.

    dtype: None = config.json's dtype. device: default CPU.
    """
    directory = Path(directory)
    cfg_path = directory / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path} not found: not a checkpoint directory")
    config = json.loads(cfg_path.read_text())
    qcfg = config.get("quantization_config")
    if qcfg is None or "alphaquant" not in qcfg:
        raise ValueError(f"{cfg_path} has no AlphaQuant quantization_config; load unquantized checkpoints "
                         f"with models.from_pretrained")
    if config.get("model_type") not in MODEL_CLASSES:      # written by the generic path: transformers' classes
        from alphaquant.arch.generic_checkpoint import load_quantized_generic
        return load_quantized_generic(directory, dtype=dtype, device=device)
    dtype = resolve_dtype(dtype, config)
    device = torch.device(device or "cpu")
    with torch.device("meta"):
        model = model_class_for(config.get("model_type"))(config_from_dict(config))
    model = model.to(dtype)

    tied = model.config.tie_word_embeddings
    reader = CheckpointReader(directory)
    for key, t in decoded_tensors(model, qcfg, reader, dtype, directory, skip_lm_head=tied):
        _set(model, key, t.to(device))
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    reader.close()
    model.checkpoint, model.lazy = None, False
    return model.eval()
