"""Attention reuse: later passes of a layer start from the attention half's cached output.

A true-sequential layer walk runs the same layer over the calibration samples once per group of linears and once
more to propagate. Once a group's linears are solved, its part of the forward never changes again, so a later pass
can start from what an earlier one computed there instead of recomputing it:

    groups:        q,k,v        o_proj                   experts gate/up          experts down        propagate
    runs:          norm         attention                o_proj + MoE block       MoE block           down matmul
    starts from:   input        input                    cached o_proj input      cached h            cached down
                                                                                                      inputs + h
    caches:                     o_proj input ("core")    h = x + attn(norm(x))    experts' down inputs ("act")

(`plan`) -- the same kernels on the same values as the full forward from that point on, so the same bits out.
"core" and "h" cost one calibration cache more (num_samples x seq_len x hidden on the device, or in pinned host
memory with calibration.cache_device cpu); "act" holds each batch's routed down_proj inputs (top_k x
moe_intermediate per token: 4 calibration caches for OLMoE-1B-7B) with their routing, on the device only (not with
calibration.cache_device cpu; nor where it would take more than walker.ACT_MAX_SHARE of the GPU's memory), and
saves the propagation its norm, router, gate/up matmuls and activation.
`calibration.reuse_attention: false` turns all of it off. Only for layers whose forward can resume part-way
(`ArchAdapter.attention_reuse`: the local families), with true-sequential groups, not with gptq.asymmetric (its fp
copy of the layer runs whole) nor on layers replayed from a resume state. Each pass must hand every calibration
sample to the capture (checked: an incomplete cache is not used; "act" is only filled where the MoE block takes its
grouped path, which calls `expert_act`).
"""
from __future__ import annotations

from dataclasses import dataclass

CORE, H, ACT = "calib_core", "calib_h", "calib_act"   # the caches' stream names (stores on the runner)
RESUME = {ACT: "down", H: "mlp", CORE: "o_proj"}       # cache -> DecoderLayer.forward(resume=...)
SUPERSEDES = {H: CORE}          # capturing h makes the core cache useless (act is read beside h, not instead)


@dataclass(frozen=True)
class ReusePoints:
    """Names (relative to the layer) of a layer's attention half: its q/k/v-side linears, o_proj (whose input is
    the "core" cache) and the module whose input is h (the "h" cache)."""

    qkv: frozenset[str]
    o: str
    h: str
    act: str | None = None          # the MoE block's expert_act (its input: the routed down_proj inputs), or None
    act_deps: frozenset[str] = frozenset()   # every linear those inputs depend on (attention, router, gate/up)
    act_token_bytes: int = 0        # those inputs' bytes per calibration token (top_k x moe_intermediate x dtype)


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
        return self.resume_from if any(SUPERSEDES.get(c) == self.resume_from for c, _ in self.capture) else None


def start_from(held: set[str]) -> str | None:
    """The furthest complete cache a pass can start from ("act" needs "h" beside it)."""
    return ACT if {ACT, H} <= held else H if H in held else CORE if CORE in held else None


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
    if points.act and ACT not in held and not later & (points.qkv | {points.o} | points.act_deps):
        capture.append((ACT, points.act))
    return PassReuse(resume_from, tuple(capture))
