"""Small floating-point element grids (E2M1, E2M3, E3M2, E4M3, E5M2): rounding and bit codes.

An element format with E exponent bits, M mantissa bits and bias B holds
  normal:    (1 + m / 2^M) * 2^(e - B),  e = 1 .. (top exponent)
  subnormal: (m / 2^M) * 2^(1 - B),      e = 0
so inside the binade [2^k, 2^(k+1)) the spacing is 2^(k - M), and below 2^emin
(emin = 1 - B) the spacing stays 2^(emin - M). Rounding is therefore
    q = round(|x| / 2^(k - M)) * 2^(k - M),  k = max(floor(log2|x|), emin)
with torch.round (half to even) after saturating |x| at the format max: no tables,
no searches, exact (every step is a multiply by a power of two), and cheap on a GPU.

Saturation: values beyond +-max become +-max (OCP MX behaviour), also for E4M3/E5M2,
whose torch casts would give NaN/Inf instead. NaN inputs stay NaN.

Codes are raw bit patterns sign|exponent|mantissa in the low 1+E+M bits of a uint8.
Decoding honours the specials of the 8-bit formats (E4M3: S.1111.111 = NaN; E5M2:
exponent 31 = Inf/NaN); the 4/6-bit OCP formats have none.

    q = round_to_elem(x, E2M1)         # values on the grid, float32
    c = elem_to_bits(q, E2M1)          # uint8 codes
    assert torch.equal(bits_to_elem(c, E2M1), q)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ElemFormat:
    name: str
    ebits: int
    mbits: int
    bias: int
    max: float          # largest finite magnitude
    emax: int           # exponent of the largest binade, floor(log2(max)) (OCP's emax_elem)
    specials: str = ""  # "" (none), "fn" (E4M3: only NaN), "ieee" (E5M2: Inf and NaN)

    @property
    def bits(self) -> int:
        return 1 + self.ebits + self.mbits

    @property
    def emin(self) -> int:
        return 1 - self.bias


E2M1 = ElemFormat("e2m1", 2, 1, 1, 6.0, 2)
E2M3 = ElemFormat("e2m3", 2, 3, 1, 7.5, 2)
E3M2 = ElemFormat("e3m2", 3, 2, 3, 28.0, 4)
E4M3 = ElemFormat("e4m3", 4, 3, 7, 448.0, 8, "fn")
E5M2 = ElemFormat("e5m2", 5, 2, 15, 57344.0, 15, "ieee")
ELEM_FORMATS = {f.name: f for f in (E2M1, E2M3, E3M2, E4M3, E5M2)}


def pow2(e: torch.Tensor) -> torch.Tensor:
    """2^e for int32 e in [-149, 127] as exact float32, built from the bit pattern.

    Avoids exp2/ldexp, whose GPU versions are not guaranteed exact, and handles the
    float32 subnormals that E8M0's 2^-127 needs.
    """
    e = e.to(torch.int32)
    normal = ((e + 127).clamp(min=1) << 23)                          # biased exponent field
    sub = torch.ones_like(e) << (e + 149).clamp(0, 22)              # subnormal mantissa bit
    return torch.where(e >= -126, normal, sub).view(torch.float32)


def floor_log2(a: torch.Tensor) -> torch.Tensor:
    """floor(log2(a)) as int32 for float32 a > 0 read from the exponent bits (exact).

    Returns -127 for 0 and float32 subnormals (callers clamp to their own minimum).
    """
    return ((a.float().view(torch.int32) >> 23) & 0xFF) - 127


def round_to_elem(x: torch.Tensor, f: ElemFormat) -> torch.Tensor:
    """float32 x (already divided by its scale) -> nearest grid value, ties to even, saturating.

    The powers of two are built straight from exponent bits (about a dozen elementwise
    ops, no exp2/log2): kb is the biased float32 exponent of |x|, raised to the format's
    smallest binade so element subnormals share its spacing.
    """
    a = x.float().abs().clamp(max=f.max)                             # NaN passes through clamp
    kb = (a.view(torch.int32) >> 23).clamp(min=f.emin + 127)          # [...] biased binade exponent
    inv_quantum = ((254 + f.mbits - kb) << 23).view(torch.float32)    # 2^(M - k)
    quantum = ((kb - f.mbits) << 23).view(torch.float32)              # 2^(k - M)
    return torch.copysign(torch.round(a * inv_quantum) * quantum, x)


def elem_to_bits(q: torch.Tensor, f: ElemFormat) -> torch.Tensor:
    """Grid values (from round_to_elem) -> uint8 codes sign|exp|mantissa."""
    sign = torch.signbit(q).to(torch.int32) << (f.ebits + f.mbits)
    a = q.abs()
    k = floor_log2(a).clamp(min=f.emin)
    normal = a >= 2.0 ** f.emin
    exp_field = torch.where(normal, k + f.bias, torch.zeros_like(k))
    m = (a * pow2(f.mbits - k)).to(torch.int32)                      # 2^M + mant (normal) or mant
    mant = torch.where(normal, m - (1 << f.mbits), m)
    return (sign | (exp_field << f.mbits) | mant).to(torch.uint8)


def bits_to_elem(c: torch.Tensor, f: ElemFormat) -> torch.Tensor:
    """uint8 codes -> float32 values (exact)."""
    c = c.to(torch.int32)
    neg = ((c >> (f.ebits + f.mbits)) & 1).bool()
    e = (c >> f.mbits) & ((1 << f.ebits) - 1)
    m = c & ((1 << f.mbits) - 1)
    sub = e == 0
    sig = torch.where(sub, m, m + (1 << f.mbits)).float()
    val = sig * pow2(torch.where(sub, torch.full_like(e, f.emin), e - f.bias) - f.mbits)
    top = e == (1 << f.ebits) - 1
    if f.specials == "fn":
        val = torch.where(top & (m == (1 << f.mbits) - 1), float("nan"), val)
    elif f.specials == "ieee":
        val = torch.where(top, torch.where(m == 0, float("inf"), float("nan")), val)
    return torch.where(neg, -val, val)


def all_values(f: ElemFormat) -> torch.Tensor:
    """Every finite value of the format, sorted (for tests and docs)."""
    v = bits_to_elem(torch.arange(1 << f.bits), f)
    return torch.unique(v[torch.isfinite(v)])
