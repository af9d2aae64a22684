"""The GPTQ column sweep, batched over experts: one loop over columns for all E matrices.

Layout: the working weight is kept TRANSPOSED, Wt [E, C, R], so that column j of every
expert's W is the contiguous slab Wt[:, j] and the in-block OBS update touches contiguous
memory. Columns are in processing order (act_order permutes them beforehand).

Per column the loop launches only the format's rounding kernels plus two small ones (a
subtraction and one fused multiply-add over the rest of the sub-block); per-column
params are gathered once per block, nothing in the loop reads a value back to the host,
and on CUDA full blocks replay as one CUDA graph (see GraphedBlock).
"""
from __future__ import annotations

from collections import OrderedDict

import torch

from alphaquant.formats.base import Format, QParams


def is_group_field(t, p: QParams) -> bool:
    """True for a params tensor with one entry per group (same rule as QParams.select)."""
    return torch.is_tensor(t) and t.dim() == p.scale.dim() and t.shape[-1] == p.scale.shape[-1]


def map_group_fields(p: QParams, fn) -> QParams:
    """Apply fn to every per-group tensor of p (scale, zero, per-group extras)."""
    extra = {k: (fn(v) if is_group_field(v, p) else v) for k, v in p.extra.items()}
    return QParams(fn(p.scale), None if p.zero is None else fn(p.zero), extra)


def map_tensors(p: QParams, fn) -> QParams:
    """Apply fn to EVERY tensor of p, per-group or not."""
    extra = {k: (fn(v) if torch.is_tensor(v) else v) for k, v in p.extra.items()}
    return QParams(fn(p.scale), None if p.zero is None else fn(p.zero), extra)


def tensors_of(p: QParams) -> list:
    """p's tensors in a fixed order (scale, zero, extras by key)."""
    extra = [p.extra[k] for k in sorted(p.extra) if torch.is_tensor(p.extra[k])]
    return [p.scale] + ([] if p.zero is None else [p.zero]) + extra


def cat_group_params(ps: list[QParams]) -> QParams:
    """Concatenate one-group params [E, R, 1] along the group dim -> [E, R, G].

    Fields that are not per group (e.g. a tensor-level scale) are kept once when every
    group agrees, else stacked along a new last dim so nothing is silently dropped.
    """
    p0 = ps[0]
    cat = lambda k, get: torch.cat([get(p) for p in ps], -1)  # noqa: E731
    extra = {}
    for k, v in p0.extra.items():
        if is_group_field(v, p0):
            extra[k] = cat(k, lambda p: p.extra[k])
        elif all(torch.equal(p.extra[k], v) for p in ps[1:]):
            extra[k] = v
        else:
            extra[k] = torch.stack([p.extra[k] for p in ps], -1)
    zero = None if p0.zero is None else cat("zero", lambda p: p.zero)
    return QParams(cat("scale", lambda p: p.scale), zero, extra)


class StaticColumnParams:
    """Params fixed before the sweep (static groups): column j uses its ORIGINAL group.

    p: params of the original W [E, R, G]; col_group: [E, C] group of each column in
    processing order (with act_order this is perm // g, so no g_idx is needed at load).
    """

    def __init__(self, p: QParams, col_group: torch.Tensor):
        self.p, self.col_group = p, col_group
        self.P1: QParams | None = None
        self.block: list[QParams] | None = None

    def begin_block(self, Wt: torch.Tensor, i1: int, i2: int) -> None:
        idx = self.col_group[:, i1:i2]                                  # [E, B]

        def gather(t):                                                  # [E, R, G] -> [E, B, R]
            # float8 extras (NVFP4 block scales) have no gather kernel: move them as bytes
            raw = t.view(torch.uint8) if t.dtype.is_floating_point and t.element_size() == 1 else t
            out = raw.gather(-1, idx[:, None, :].expand(*t.shape[:-1], idx.shape[-1])).transpose(1, 2)
            return out.view(t.dtype) if raw is not t else out

        self.P1 = map_group_fields(self.p, lambda t: gather(t).contiguous())   # [E, B, R]
        self.block = None                       # a graphed block never needs the column views

    def column(self, Wt: torch.Tensor, j: int, i: int) -> QParams:
        if self.block is None:                  # one [E, R, 1] view per column, made once a block
            B = self.P1.scale.shape[1]
            self.block = [map_group_fields(self.P1, lambda t, k=k: t[:, k].unsqueeze(-1)) for k in range(B)]
        return self.block[i]


class DynamicColumnParams:
    """Params chosen from the error-updated weights at each group's first column.

    As in the original GPTQ algorithm: groups are g consecutive columns in processing
    order. The caller aligns blocks with groups, so Wt[:, j:j+g] holds every update from
    the columns before j when a group starts.
    """

    def __init__(self, fmt: Format, g: int):
        self.fmt, self.g = fmt, g
        self.groups: list[QParams] = []

    def begin_block(self, Wt: torch.Tensor, i1: int, i2: int) -> None:
        pass

    def column(self, Wt: torch.Tensor, j: int, i: int) -> QParams:
        if j % self.g == 0:
            group = Wt[:, j:j + self.g].transpose(1, 2).contiguous()     # [E, R, g]
            self.groups.append(self.fmt.params(group))                  # [E, R, 1]
        return self.groups[-1]


SUB_BLOCK = 16
"""Columns per sub-block inside a lazy block (a second level of lazy batching)."""


def quantize_block(W1, Hs1, d1, col_params, fmt: Format, Q1=None, Err1=None):
    """The column loop of one lazy block; returns (Q1, Err1) [E, B, R], updates W1 in place.

    W1: [E, B, R] weights of the block.  Hs1: [E, B, B] block of Hinv with rows divided by
    their diagonal d1 [E, B]: quantizing column i moves column k > i by
    -(w_i - q_i)·Hinv[i, k]/Hinv[i, i] (the OBS update). col_params(i) -> QParams [E, R, 1].
    Err1 = (W1 - Q1) / d1 feeds the lazy update of the later columns.

    Updating the whole rest of the block after every column moves B²/2 column slabs
    through memory per block; instead each column updates only its SUB_BLOCK-column
    sub-block and every sub-block updates the rest of the block with one matmul, the
    paper's lazy batching applied once more inside the block (same maths).
    """
    B = W1.shape[1]
    qs = []
    for s1 in range(0, B, SUB_BLOCK):
        s2 = min(s1 + SUB_BLOCK, B)
        deltas = []
        for i in range(s1, s2):
            w = W1[:, i]                                                # [E, R]
            q = fmt.round_with(w.unsqueeze(-1), col_params(i)).squeeze(-1)  # [E, R]
            qs.append(q)
            deltas.append(w - q)
            W1[:, i + 1:s2].addcmul_(Hs1[:, i, i + 1:s2, None], deltas[-1].unsqueeze(1), value=-1)
        if s2 < B:
            W1[:, s2:].baddbmm_(Hs1[:, s1:s2, s2:].transpose(1, 2), torch.stack(deltas, 1), alpha=-1)
    Q1 = torch.stack(qs, 1, out=Q1)                                     # [E, B, R]
    Err1 = torch.sub(W1, Q1, out=Err1).div_(d1.unsqueeze(-1))           # [E, B, R]
    return Q1, Err1


class GraphedBlock:
    """`quantize_block` for full blocks with static params, replayed as one CUDA graph.

    The sweep is launch-bound: each column is a handful of tiny kernels (dozens for
    MX/NVFP4 rounding). One block is captured once and replayed for every later block
    (and, through `graphed_block`'s cache, for later calls with the same shapes);
    inputs are copied into fixed buffers first. The first block runs eagerly as the
    warm-up that capture needs. If the format's rounding cannot be captured, blocks
    keep running eagerly.
    """

    def __init__(self, fmt: Format, P1: QParams, E: int, B: int, R: int, dtype, device):
        self.fmt, self.graph, self.failed = fmt, None, False
        new = lambda *shape: torch.empty(*shape, dtype=dtype, device=device)  # noqa: E731
        self.W1, self.Hs1, self.d1 = new(E, B, R), new(E, B, B), new(E, B)
        self.Q1, self.Err1 = new(E, B, R), new(E, B, R)
        self.P1 = map_tensors(P1, torch.empty_like)                     # [E, B, R] per-group fields
        self.cols = [map_group_fields(self.P1, lambda t, i=i: t[:, i].unsqueeze(-1)) for i in range(B)]

    def _body(self):
        quantize_block(self.W1, self.Hs1, self.d1, self.cols.__getitem__, self.fmt, self.Q1, self.Err1)

    def __call__(self, W1, Hs1, d1, P1: QParams):
        """Quantize one block; the returned (Q1, Err1) buffers are reused by the next call."""
        self.W1.copy_(W1)
        self.Hs1.copy_(Hs1)
        self.d1.copy_(d1)
        for dst, src in zip(tensors_of(self.P1), tensors_of(P1)):      # every field, none stale
            dst.copy_(src)
        if self.graph is not None:
            self.graph.replay()
        elif not self.failed:
            self._warm_up_and_capture()
        else:
            self._body()
        return self.Q1, self.Err1

    def _warm_up_and_capture(self):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._body()                                                # real result of this block
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:                                    # capturing records kernels, runs none of them
            # thread_local: other threads (the pipeline's background layer write) may keep calling
            # CUDA while this thread captures; "global" mode would make their syncs fail
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                self._body()
            self.graph = graph
        except RuntimeError:
            self.failed = True


_GRAPH_CACHE: OrderedDict = OrderedDict()
GRAPH_CACHE_SIZE = 8
"""Captured blocks kept for reuse (LRU). A layer walker calls the solver with the same few
shapes for every decoder layer; each entry holds ~6 buffers of [E, B, R] plus the graph's
memory pool (about 0.5 GB at E=64, R=2048, B=128 in fp32)."""


def graphed_block(fmt: Format, P1: QParams, E: int, B: int, R: int, dtype, device) -> GraphedBlock:
    """A GraphedBlock for these shapes, captured once and reused across calls."""
    key = (fmt, E, B, R, dtype, str(device), SUB_BLOCK,
           tuple((tuple(t.shape), t.dtype) for t in tensors_of(P1)), P1.zero is None, tuple(P1.extra))
    if key in _GRAPH_CACHE:
        _GRAPH_CACHE.move_to_end(key)
        return _GRAPH_CACHE[key]
    block = _GRAPH_CACHE[key] = GraphedBlock(fmt, P1, E, B, R, dtype, device)
    while len(_GRAPH_CACHE) > GRAPH_CACHE_SIZE:
        _GRAPH_CACHE.popitem(last=False)
    return block


def clear_graph_cache() -> None:
    """Free every captured block (and its GPU memory pool)."""
    _GRAPH_CACHE.clear()


def gptq_sweep(Wt: torch.Tensor, Hinv: torch.Tensor, fmt: Format, colparams, blocksize: int,
               cuda_graph: bool = False):
    """Quantize all columns of Wt in order; returns (Qt [E, C, R], loss [E]).

    Wt: [E, C, R] working weights (overwritten with error-updated values).
    Hinv: [E, C, C] upper Cholesky factor of the damped H⁻¹ (processing order).
    loss: Σ_j ||w_j - q_j||² / (2 Hinv[j, j]²), the GPTQ proxy objective.
    cuda_graph: replay full blocks as a CUDA graph (needs StaticColumnParams, CUDA).
    """
    E, C, R = Wt.shape
    Qt = torch.empty_like(Wt)                                           # [E, C, R]
    err_sq = torch.zeros(E, dtype=Wt.dtype, device=Wt.device)
    d = Hinv.diagonal(dim1=-2, dim2=-1)                                 # [E, C]
    graphed = None
    for i1 in range(0, C, blocksize):
        i2 = min(i1 + blocksize, C)
        colparams.begin_block(Wt, i1, i2)
        W1 = Wt[:, i1:i2]                                               # [E, B, R] view
        Hs1 = Hinv[:, i1:i2, i1:i2] / d[:, i1:i2, None]                 # [E, B, B]
        if cuda_graph and i2 - i1 == blocksize and C >= 2 * blocksize:
            graphed = graphed or graphed_block(fmt, colparams.P1, E, blocksize, R, Wt.dtype, Wt.device)
            Q1, Err1 = graphed(W1, Hs1, d[:, i1:i2], colparams.P1)
        else:
            Q1, Err1 = quantize_block(W1, Hs1, d[:, i1:i2], lambda i: colparams.column(Wt, i1 + i, i), fmt)
        Qt[:, i1:i2] = Q1
        err_sq += Err1.square().sum((1, 2))
        # lazy batch update: all later columns at once, one batched matmul
        Wt[:, i2:].baddbmm_(Hinv[:, i1:i2, i2:].transpose(1, 2), Err1, alpha=-1)
    return Qt, err_sq / 2
