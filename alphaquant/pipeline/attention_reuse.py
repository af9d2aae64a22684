"""Attention reuse: later passes of a layer start from the attention half's cached output.

A true-sequential layer walk runs the same layer over the calibration samples once per group of linears and once
more to propagate. Once a group's linears are solved, its part of the forward never changes again, so a later pass
can start from what an earlier one computed there instead of recomputing it:

    groups:        q,k,v        o_proj                   experts gate/up          experts down        propagate
    runs:          norm         attention                o_proj + MoE block       MoE block           MoE block
    starts from:   input        input                    cached o_proj input      cached h            cached h
    caches:                     o_proj input ("core")    h = x + attn(norm(x))

(`plan`) -- the same kernels on the same values as the full forward from that point on, so the same bits out.
It costs one calibration cache more (num_samples x seq_len x hidden on the device, or in pinned host memory
with calibration.cache_device cpu); `calibration.reuse_attention: false` turns it off. Only for layers whose
forward can resume part-way (`ArchAdapter.attention_reuse`: the local families), with true-sequential groups,
not with gptq.asymmetric (its fp copy of the layer runs whole) nor on layers replayed from a resume state.
Each pass must hand every calibration sample to the capture (checked: an incomplete cache is not used).
"""
from __future__ import annotations

from dataclasses import dataclass

CORE, H = "calib_core", "calib_h"            # the two caches' stream names (SampleStores on the runner)
RESUME = {H: "mlp", CORE: "o_proj"}           # cache -> DecoderLayer.forward(resume=...)


@dataclass(frozen=True)
class ReusePoints:
    """Names (relative to the layer) of a layer's attention half: its q/k/v-side linears, o_proj (whose input is
    the "core" cache) and the module whose input is h (the "h" cache)."""

    qkv: frozenset[str]
    o: str
    h: str


@dataclass(frozen=True)
class PassReuse:
    """What one pass of a layer does with the caches: start from one (resume_from, a cache name or None) and
    fill others (capture: cache -> the module whose forward input it is)."""

    resume_from: str | None = None
    capture: tuple[tuple[str, str], ...] = ()

    @property
    def resume(self) -> str | None:
        return RESUME.get(self.resume_from) if self.resume_from else None

    @property
    def supersedes(self) -> str | None:
        """The cache this pass reads and replaces by one it captures (its samples are dropped batch by batch)."""
        return self.resume_from if any(c != self.resume_from for c, _ in self.capture) else None


def start_from(held: set[str]) -> str | None:
    """The furthest complete cache a pass can start from."""
    return H if H in held else CORE if CORE in held else None


def plan(points: ReusePoints, later: set[str], held: set[str]) -> PassReuse:
    """The pass of a group given the linears still to be solved from this group on (`later`, this group's
    included) and the caches already complete (`held`): start from the furthest cache, and capture each cache
    whose inputs are all final (no linear before its point is still to be solved) and that is not held yet."""
    resume_from = start_from(held)
    capture = []
    if resume_from is None and not later & points.qkv:
        capture.append((CORE, points.o))
    if H not in held and not later & (points.qkv | {points.o}):
        capture.append((H, points.h))
    return PassReuse(resume_from, tuple(capture))
