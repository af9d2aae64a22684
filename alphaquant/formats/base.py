"""The contract every number format fulfils.

A format quantizes a tensor along its LAST dimension in groups of `group_size`
consecutive elements that share one scale (and, for asymmetric integers, one zero
point). Everything before the last dimension is batch: a weight [R, C], a stack of
expert weights [E, R, C] and a column slice [E, R, 1] are all handled alike.

The split into `params` (scales/zeros chosen from data) and `round_with` (rounding to
the grid given fixed params) is what GPTQ needs: with static groups the solver asks for
the params of every group once, from the original weight, then rounds one column at a
time against them.

    fmt = get_format("int4", group_size=128)
    p = fmt.params(w)                      # p.scale: [..., C // 128]
    w_hat = fmt.round_with(w, p)           # same as fmt.fake_quantize(w)
    q = fmt.quantize(w)                    # codes + params, for export
    assert torch.equal(fmt.dequantize(q), w_hat)
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


class FormatError(ValueError):
    """A format name, option or tensor shape that a format cannot take."""


@dataclass
class QParams:
    """Per-group quantization parameters, broadcastable against a grouped tensor.

    scale: [..., G] float32, the effective multiplier of a group (for NVFP4 the product
        of the fp8 block scale and the fp32 tensor scale; for MX the power of two 2^e).
    zero:  [..., G] float32 integer-valued zero points (asymmetric ints), else None.
    extra: format-specific stored forms needed for export, e.g. {"scale_e8m0": uint8
        [..., G]} for MX, {"block_scale_fp8": float8_e4m3fn [..., G], "weight_global_scale":
        float32 [...] (compressed-tensors' divisor), "global_scale": float32 [...]} for NVFP4.
        Entries shaped like `scale` follow select(); others (per-matrix) are kept whole.
    """

    scale: torch.Tensor
    zero: torch.Tensor | None = None
    extra: dict = field(default_factory=dict)

    def select(self, group_idx: torch.Tensor | int) -> "QParams":
        """Params of the given group(s) along the last dim, keeping dims ([..., k])."""
        idx = torch.as_tensor(group_idx, device=self.scale.device).reshape(-1)
        pick = lambda t: t.index_select(-1, idx) if t is not None and t.dim() > 0 else t  # noqa: E731
        extra = {k: (pick(v) if v.dim() == self.scale.dim() and v.shape[-1] == self.scale.shape[-1] else v)
                 for k, v in self.extra.items()}
        return QParams(pick(self.scale), pick(self.zero), extra)


def groups_like(w: torch.Tensor, scale: torch.Tensor, name: str) -> torch.Tensor:
    """View w [..., C] as float32 [..., G, C // G] where G = scale.shape[-1].

    G comes from the params, not the format's group_size, so a column slice [E, R, 1]
    rounded against params holding one group per row works without special cases.
    """
    G = scale.shape[-1] if scale.dim() > 0 else 1
    if w.shape[-1] % G != 0:
        raise FormatError(f"{name}: the last dimension {w.shape[-1]} does not split into the "
                          f"{G} groups that the params hold")
    return w.float().unflatten(-1, (G, w.shape[-1] // G))


def exact_div(a: torch.Tensor, c: float) -> torch.Tensor:
    """a / c, correctly rounded on every device.

    PyTorch's CUDA kernel turns `tensor / python_scalar` into `tensor * (1 / scalar)`,
    which is off by an ulp for constants like 448 or 7.5 and made GPU scales differ
    from CPU ones; a 0-d device tensor as divisor keeps the true division.
    """
    return a / torch.full((), c, dtype=a.dtype, device=a.device)


def exact_rdiv(c: float, a: torch.Tensor) -> torch.Tensor:
    """c / a with the same guarantee as exact_div."""
    return torch.full((), c, dtype=a.dtype, device=a.device) / a


@dataclass(frozen=True)
class RoundingSpec:
    """How `round_with` rounds one element given its group's scale (and zero), as plain numbers,
    so that a fused GPU kernel (gptq/fused_sweep.py) can do the same operations in the same order.

    kind "int":      c = clamp(round(w / s [+ z]), qmin, qmax) [- z];  q = c * s   (z before rounding)
    kind "grid":     q = s * (w / s rounded to the element grid with `mbits` mantissa bits, smallest
                     binade exponent `emin`, saturating at ±max; floatgrid.round_to_elem)
    kind "int64ths": q = s * clamp(round(64 w / s), -127, 127) / 64   (MXINT8)
    Rounding is half to even everywhere; w / s is a true float32 division.
    """

    kind: str
    qmin: int = 0
    qmax: int = 0
    mbits: int = 0
    emin: int = 0
    max: float = 0.0


@dataclass
class QTensor:
    """A quantized tensor: codes (one per element, same shape as the weight) + params.

    Code dtypes: int8 signed codes for int2..int8 and mxint8; uint8 raw bit patterns for
    the FP elements (mxfp*, nvfp4, fp8_e4m3); int16 bit patterns for bf16/fp16.
    """

    codes: torch.Tensor
    params: QParams
    shape: tuple
    format_name: str


class Format:
    """Base class; concrete formats live beside this file.

    Attributes every format sets:
      name: canonical name ("int4", "mxfp4", "nvfp4", "fp8_e4m3", "bf16", ...)
      bits: bits per element code
      group_size: elements per scale along the last dim; -1 = one scale per row
      is_identity: True for bf16/fp16 (no quantization: GPTQ leaves the weight alone)
      check_finite: params() raises FormatError on NaN/Inf (one host sync; turn off for
        per-token activation quantization). round_with never syncs.
    """

    name: str = "base"
    bits: int = 16
    group_size: int = -1
    is_identity: bool = False
    check_finite: bool = True

    # --- value semantics -------------------------------------------------------------
    # Two formats built from the same options are the same format: the solver's CUDA-graph cache
    # is keyed by format, and the pipeline builds a fresh Format per solve (with identity hashing
    # every decoder layer captured its graphs again: ~0.1 s per capture, and each capture empties
    # the CUDA and pinned-memory caches).
    def _options(self) -> tuple:
        return (type(self),) + tuple(sorted((k, v) for k, v in vars(self).items()
                                            if not k.startswith("_") and not torch.is_tensor(v)))

    def __eq__(self, other) -> bool:
        return isinstance(other, Format) and self._options() == other._options()

    def __hash__(self) -> int:
        return hash(self._options())

    # --- shape helpers -------------------------------------------------------------
    def group_len(self, cols: int) -> int:
        """Elements per group for a last dimension of `cols` (checks divisibility)."""
        g = cols if self.group_size in (-1, 0, None) else self.group_size
        if cols % g != 0:
            raise FormatError(
                f"{self.name}: the last dimension {cols} is not divisible by group_size {g}; "
                f"use a group_size that divides {cols} or -1 (one scale per row)")
        return g

    def num_groups(self, cols: int) -> int:
        return cols // self.group_len(cols)

    def split_groups(self, w: torch.Tensor) -> torch.Tensor:
        """[..., C] -> float32 [..., G, g] with this format's group length (for params)."""
        if w.dim() == 0:
            raise FormatError(f"{self.name}: cannot quantize a 0-d tensor; give it a last dimension")
        g = self.group_len(w.shape[-1])
        return w.float().unflatten(-1, (w.shape[-1] // g, g))

    def ensure_finite(self, w: torch.Tensor) -> None:
        """Refuse NaN/Inf weights: a NaN amax would silently poison a whole group's scale.

        This costs one host sync, so params() only checks when `check_finite` is set
        (the default); activation paths build formats with check_finite=False.
        """
        if self.check_finite and not bool(torch.isfinite(w).all()):
            raise FormatError(f"{self.name}: the tensor contains NaN/Inf; fix or mask it before quantizing")

    # --- the interface ---------------------------------------------------------------
    def params(self, w: torch.Tensor) -> QParams:
        """Choose scales (and zeros) for each group of w's last dimension."""
        raise NotImplementedError

    def round_with(self, w: torch.Tensor, p: QParams) -> torch.Tensor:
        """Round w to the grid given params; returns dequantized values in w.dtype.

        w's last dim must be a whole number of groups matching p, OR p must hold exactly
        one group per row (p.scale.shape[-1] == 1), which is how GPTQ rounds one column.
        """
        return self.dequantize(QTensor(self.encode(w, p), p, tuple(w.shape), self.name)).to(w.dtype)

    def elementwise_rounding(self) -> RoundingSpec | None:
        """round_with as a RoundingSpec (one element from its own scale/zero), or None when
        it cannot be described that way (the solver then keeps its torch sweep)."""
        return None

    def encode(self, w: torch.Tensor, p: QParams) -> torch.Tensor:
        """Integer codes of w given params (same shape as w)."""
        raise NotImplementedError

    def dequantize(self, q: QTensor) -> torch.Tensor:
        """float32 values of a QTensor."""
        raise NotImplementedError

    def quantize(self, w: torch.Tensor) -> QTensor:
        p = self.params(w)
        return QTensor(self.encode(w, p), p, tuple(w.shape), self.name)

    def fake_quantize(self, w: torch.Tensor) -> torch.Tensor:
        return self.round_with(w, self.params(w))

    def pack(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes -> uint8 bytes (see each format for the bit layout)."""
        raise NotImplementedError

    def unpack(self, data: torch.Tensor, shape: tuple) -> torch.Tensor:
        """uint8 bytes -> codes of the given shape (inverse of pack)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name}, group_size={self.group_size})"
