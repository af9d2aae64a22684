"""bf16 / fp16: no quantization. GPTQ skips them (is_identity); fake_quantize casts to
the dtype and back, so a float32 weight picks up exactly the storage rounding.

Codes are the raw 16-bit patterns (int16, via .view); pack writes them as 2 little-endian
bytes each (the machine's byte order, little-endian on every platform torch supports).
Params carry a dummy unit scale [..., 1] so generic code can still call p.select(0).
"""
from __future__ import annotations

import torch

from .base import Format, QParams, QTensor

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class IdentityFormat(Format):
    is_identity = True

    def __init__(self, name: str):
        self.name = name
        self.dtype = _DTYPES[name]
        self.bits = 16
        self.group_size = -1
        self.check_finite = False        # NaN/Inf are representable: nothing to refuse

    def params(self, w: torch.Tensor) -> QParams:
        return QParams(torch.ones(w.shape[:-1] + (1,), device=w.device))

    def round_with(self, w: torch.Tensor, p: QParams) -> torch.Tensor:
        return w.to(self.dtype).to(w.dtype)

    def encode(self, w: torch.Tensor, p: QParams) -> torch.Tensor:
        return w.to(self.dtype).view(torch.int16)

    def dequantize(self, q: QTensor) -> torch.Tensor:
        return q.codes.view(self.dtype).float()

    def pack(self, codes: torch.Tensor) -> torch.Tensor:
        return codes.reshape(-1).view(torch.uint8)

    def unpack(self, data: torch.Tensor, shape: tuple) -> torch.Tensor:
        return data.reshape(-1).to(torch.uint8).view(torch.int16).reshape(shape)
