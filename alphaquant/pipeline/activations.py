"""Activation quantization (`aq`): fake-quantize the inputs of linears, per token.

Installed on a layer before calibration so GPTQ's Hessians see the quantized inputs the
deployed model will see, and kept through the propagation and evaluation passes of the
quantized model. Never installed for the original-model evaluation stream.
"""
from __future__ import annotations

from torch import nn

UNQUANTIZED = ("bf16", "fp16", "none")

# Group along the hidden dimension: per-token scales for int8/fp8, 32-element blocks for MX.
_AQ_FORMATS = {"int8": ("int8", -1), "fp8_e4m3": ("fp8_e4m3", -1), "mxfp8": ("mxfp8_e4m3", 32),
               "mxfp6": ("mxfp6_e2m3", 32), "mxfp4": ("mxfp4", 32)}


def activation_format(aq: str):
    """The Format that fake-quantizes activations for an `aq` name (None: unquantized)."""
    if aq in UNQUANTIZED:
        return None
    from alphaquant.formats import get_format

    name, group = _AQ_FORMATS[aq]
    return get_format(name, group_size=group, check_finite=False)


def activation_hooks(layer: nn.Module, prefix: str, specs: dict) -> list:
    """Install input fake-quantization on every linear of `layer` whose spec asks for it."""
    handles = []
    for name, mod in layer.named_modules():
        spec = specs.get(prefix + name)
        if not isinstance(mod, nn.Linear) or spec is None or spec.skip:
            continue
        fmt = activation_format(spec.aq)
        if fmt is not None:
            handles.append(mod.register_forward_pre_hook(
                lambda _m, args, fmt=fmt: (fmt.fake_quantize(args[0].float()).to(args[0].dtype), *args[1:])))
    return handles
