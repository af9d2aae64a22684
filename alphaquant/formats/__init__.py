"""Exact number formats for weights (and activations), looked up by name.

    from alphaquant.formats import get_format
    fmt = get_format("int4", group_size=128, sym=False)
    fmt = get_format("mxfp6", group_size=64)           # = mxfp6_e2m3
    fmt = get_format("nvfp4")                           # E2M1 + fp8 block scale per 16 + fp32 global

Names and options (defaults first):
  int2 .. int8      group_size=128 (-1 = one scale per row), sym=True,
                    scale_dtype=torch.float16 (also "bfloat16"/"float32" or the dtype)
  mxfp4             E2M1 elements, E8M0 scale per block; group_size=32, scale_mode="floor"|"ceil"
  mxfp6_e2m3        E2M3 (max 7.5); plain "mxfp6" means this one: for weights the extra
                    mantissa bit beats E3M2's extra range (the E8M0 scale supplies range)
  mxfp6_e3m2        E3M2 (max 28)
  mxfp8_e4m3        E4M3 (max 448); plain "mxfp8" means this one, for the same reason
  mxfp8_e5m2        E5M2 (max 57344)
  mxint8            k/64, |k| <= 127
  nvfp4             group_size=16
  fp8_e4m3          group_size=-1 (per-row scale amax/448), scale_dtype=torch.float32
  bf16, fp16        identity: no quantization, fake_quantize casts to the dtype and back
Every quantizing format also takes check_finite=True (params() raises FormatError on
NaN/Inf; pass False on hot activation paths to avoid the host sync).
"""
from __future__ import annotations

import torch

from .base import Format, FormatError, QParams, QTensor

_INT_NAMES = tuple(f"int{b}" for b in range(2, 9))
_MX_ELEMS = {"mxfp4": "e2m1", "mxfp6_e2m3": "e2m3", "mxfp6_e3m2": "e3m2",
             "mxfp8_e4m3": "e4m3", "mxfp8_e5m2": "e5m2", "mxint8": "int8"}
ALIASES = {"mxfp6": "mxfp6_e2m3", "mxfp8": "mxfp8_e4m3"}
FORMAT_NAMES: tuple[str, ...] = (_INT_NAMES + tuple(_MX_ELEMS) + tuple(ALIASES)
                                 + ("nvfp4", "fp8_e4m3", "bf16", "fp16"))

_SCALE_DTYPES = {"float16": torch.float16, "fp16": torch.float16, "bfloat16": torch.bfloat16,
                 "bf16": torch.bfloat16, "float32": torch.float32, "fp32": torch.float32}


def _allowed_options(name: str) -> dict:
    """Option name -> default, per format family."""
    if name in _INT_NAMES:
        return {"group_size": 128, "sym": True, "scale_dtype": torch.float16, "check_finite": True}
    if name in _MX_ELEMS:
        return {"group_size": 32, "scale_mode": "floor", "check_finite": True}
    if name == "nvfp4":
        return {"group_size": 16, "check_finite": True}
    if name == "fp8_e4m3":
        return {"group_size": -1, "scale_dtype": torch.float32, "check_finite": True}
    return {}


def _check_group_size(name: str, g) -> None:
    if not isinstance(g, int) or isinstance(g, bool) or not (g == -1 or g > 0):
        raise FormatError(f"{name}: group_size must be a positive int or -1 (one scale per row), got {g!r}")


def _scale_dtype(name: str, d) -> torch.dtype:
    d = _SCALE_DTYPES.get(d, d) if isinstance(d, str) else d
    if d not in (torch.float16, torch.bfloat16, torch.float32):
        raise FormatError(f"{name}: scale_dtype must be one of float16, bfloat16, float32; got {d!r}")
    return d


def get_format(name: str, **opts) -> Format:
    """Build a format by name; unknown names or options raise FormatError listing what is allowed."""
    key = ALIASES.get(name, name)
    if key not in FORMAT_NAMES:
        raise FormatError(f"unknown format {name!r}; allowed: {', '.join(FORMAT_NAMES)}")
    allowed = _allowed_options(key)
    unknown = sorted(set(opts) - set(allowed))
    if unknown:
        raise FormatError(f"{name}: unknown option(s) {', '.join(unknown)}; allowed: "
                          f"{', '.join(allowed) if allowed else 'none'}")
    o = {**allowed, **opts}
    if "group_size" in o:
        _check_group_size(key, o["group_size"])
    if "check_finite" in o and not isinstance(o["check_finite"], bool):
        raise FormatError(f"{key}: check_finite must be True or False, got {o['check_finite']!r}")
    if key in _INT_NAMES:
        from .integer import IntFormat
        if not isinstance(o["sym"], bool):
            raise FormatError(f"{key}: sym must be True or False, got {o['sym']!r}")
        return IntFormat(int(key[3:]), o["group_size"], o["sym"], _scale_dtype(key, o["scale_dtype"]),
                         o["check_finite"])
    if key in _MX_ELEMS:
        from .mx import MXFormat
        if o["scale_mode"] not in ("floor", "ceil"):
            raise FormatError(f"{key}: scale_mode must be 'floor' (OCP spec) or 'ceil', got {o['scale_mode']!r}")
        return MXFormat(key, _MX_ELEMS[key], o["group_size"], o["scale_mode"], o["check_finite"])
    if key == "nvfp4":
        from .nvfp4 import NVFP4Format
        return NVFP4Format(o["group_size"], o["check_finite"])
    if key == "fp8_e4m3":
        from .fp8 import FP8Format
        return FP8Format(o["group_size"], _scale_dtype(key, o["scale_dtype"]), o["check_finite"])
    from .identity import IdentityFormat
    return IdentityFormat(key)


__all__ = ["ALIASES", "FORMAT_NAMES", "Format", "FormatError", "QParams", "QTensor", "get_format"]
