"""The sparse MoE block shared by the four families, and its hook points.

Hook contract (what the calibration callbacks rely on):

* ``<block>.router`` is a parameter-free module called once per forward as
  ``topk_ids, topk_weights = block.router(router_logits)``. A forward hook on it sees
  ``router_logits`` [T, E] (T = B*S flattened tokens, in row-major (batch, position) order) and returns
  ``topk_ids`` [T, k] (long) and ``topk_weights`` [T, k]: the weights exactly as multiplied into the expert
  outputs (softmax, top-k, optional renormalisation, dtype as the family applies them).
* Expert ``e`` receives the tokens ``t`` with ``(topk_ids == e).any(-1)``, in increasing token order, and
  token t's weight for ``e`` is ``topk_weights[t, slot]`` where ``topk_ids[t, slot] == e``;
  ``expert_token_weights`` recomputes exactly these rows. (With ``block.route_all_tokens = True`` every
  expert instead receives all T tokens, in order, and unrouted tokens get weight 0 in the output.)
* Qwen2-MoE: ``<block>.shared_gate_act`` (parameter-free sigmoid) returns the [T, 1] factor that scales the
  shared expert's output; its hook sees the weight each token gives the shared expert.
* ``<block>.expert_act`` (parameter-free identity, `ExpertActivations`) is called on the grouped path (below)
  with the down_proj inputs of all routed experts at once, act(gate(x))·up(x) [T*k, I], rows sorted by expert as
  `ExpertRoute` sorts them (expert e's rows `rows(e)`, its tokens increasing): a forward hook on it sees what
  hooks on every expert's down_proj would see, concatenated in expert order. The loop never calls it;
  ``grouped_blocker`` says whether a forward takes the grouped path (a forward hook on ``expert_act`` makes
  "auto" take it on CPU too).

The routed experts run one of two ways, with the same result (``SparseMoeBlock.experts_impl``):

* grouped: all experts at once, three grouped matmuls (``torch.nn.functional.grouped_mm``, else
  ``torch._grouped_mm``) over the (token, slot) rows sorted by expert, the weights stacked [E, N, K] from the
  expert modules on every forward (never cached, so a weight the solver writes between passes is always the one
  used), no host sync. Taken only when nothing needs the expert modules to run: see
  ``SparseMoeBlock.grouped_blocker``. The expert modules are then never called, so their hooks would not fire --
  which is why any hook on an expert or its linears makes the block take the loop.
* loop: each expert module called on its tokens (the contract above), one host sync for the counts.

On CPU the two agree bit for bit (float32, bf16 and fp16 measured: the grouped matmul runs the same matmul per
group); on CUDA they are different kernels and bf16 outputs may differ by roundings (tests/test_moe_grouped.py
bounds the difference at 1% of the output's norm). "auto" takes the grouped path on accelerators only (see
GROUPED_ON_CPU).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .config import MoEModelConfig
from .layers import SwiGLUMLP


class TopKRouter(nn.Module):
    """softmax over all experts -> top-k -> optional renormalisation (parameter-free: a hook point).

    Mixtral's "top-k on logits, then softmax over the k" equals softmax -> top-k -> renormalise, so all four
    families use this one rule (Mixtral: norm_topk_prob=True, weights kept fp32 as transformers does).
    """

    def __init__(self, top_k: int, norm_topk_prob: bool, norm_eps: float = 0.0,
                 weights_in_input_dtype: bool = True) -> None:
        super().__init__()
        self.top_k, self.norm_topk_prob, self.norm_eps = top_k, norm_topk_prob, norm_eps
        self.weights_in_input_dtype = weights_in_input_dtype

    def forward(self, router_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs = F.softmax(router_logits, dim=-1, dtype=torch.float32)  # (T, E)
        topk_weights, topk_ids = torch.topk(probs, self.top_k, dim=-1)  # (T, k), (T, k)
        if self.norm_topk_prob:
            topk_weights = topk_weights / (topk_weights.sum(dim=-1, keepdim=True) + self.norm_eps)
        if self.weights_in_input_dtype:
            topk_weights = topk_weights.to(router_logits.dtype)
        return topk_ids, topk_weights

    def extra_repr(self) -> str:
        return f"top_k={self.top_k}, norm_topk_prob={self.norm_topk_prob}"


class ExpertActivations(nn.Module):
    """The routed experts' down_proj inputs [T*k, I] on the grouped path, returned unchanged (a hook point).
    `route` (keyword: a plain forward hook sees only h) is the ExpertRoute that sorted them, for hooks that keep
    both (calibration's reuse of the down inputs, alphaquant/pipeline/attention_reuse.py)."""

    def forward(self, h: torch.Tensor, route: "ExpertRoute | None" = None) -> torch.Tensor:
        return h


class SharedGateAct(nn.Sigmoid):
    """sigmoid(shared_expert_gate(x)) [T, 1]: a named hook point for the shared expert's per-token weight."""


def expert_token_weights(topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                         num_experts: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """For each expert e: (token_idx [n_e] long, weight [n_e]) of the tokens routed to e, in token order.

    >>> ids = torch.tensor([[0, 2], [2, 1]]); w = torch.tensor([[.75, .25], [.5, .5]])
    >>> [(t.tolist(), x.tolist()) for t, x in expert_token_weights(ids, w, 3)]
    [([0], [0.75]), ([1], [0.5]), ([0, 1], [0.25, 0.5])]
    """
    out = []
    for e in range(num_experts):
        token_idx, slot = torch.where(topk_ids == e)  # row-major: increasing token order, one slot per token
        out.append((token_idx, topk_weights[token_idx, slot]))
    return out


def _grouped_mm_fn():
    """torch.nn.functional.grouped_mm (torch >= 2.10), else torch._grouped_mm, else None."""
    return getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


_GROUPED_ACCEPTS: dict[tuple, bool] = {}


def grouped_mm_accepts(device: torch.device, dtype: torch.dtype, hidden: int, inter: int) -> bool:
    """Whether this torch's grouped matmul runs [M, K] x [E, K, N] (N-major, a transposed [E, N, K]) on `device`
    in `dtype` for the expert shapes (K, N) = (hidden, inter) (gate, up) and (inter, hidden) (down), empty groups
    included.

    Asked once per (device, dtype, shapes) with a tiny problem and remembered: the kernels refuse some dtypes
    (CPU: float64; CUDA builds may take only bf16) and shapes (strides that are not 16-byte multiples)
    with an error raised before any kernel runs.
    """
    device = torch.device(device)
    key = (device.type, device.index, dtype, hidden, inter)
    if key not in _GROUPED_ACCEPTS:
        fn, ok = _grouped_mm_fn(), False
        if fn is not None and device.type != "meta":
            try:
                offs = torch.tensor([1, 1, 3], dtype=torch.int32, device=device)  # expert 1 gets no row
                for k, n in ((hidden, inter), (inter, hidden)):
                    a = torch.zeros(3, k, dtype=dtype, device=device)
                    b = torch.zeros(3, n, k, dtype=dtype, device=device).transpose(1, 2)
                    y = fn(a, b, offs=offs)
                    if y.shape != (3, n) or y.dtype != dtype:
                        raise RuntimeError(f"grouped_mm returned {tuple(y.shape)} {y.dtype}")
                ok = True
            except (RuntimeError, NotImplementedError, TypeError, ValueError):
                ok = False
        _GROUPED_ACCEPTS[key] = ok
    return _GROUPED_ACCEPTS[key]


class ExpertRoute:
    """All experts' rows of one router output, from ONE stable sort of the (token, slot) pairs by expert.

    Expert e's rows of the sorted order are `rows(e)` = `start[e]:start[e] + counts[e]`, its tokens
    (increasing) `token_idx[rows]` and routing weights `weights[rows]` -- exactly the rows
    `expert_token_weights` gives. Slices of one sorted index instead of a `torch.where` per
    expert: one host sync per forward, on first use of `counts` / `start` / `rows` (`count_tensor` and
    `ends` are the same on the device and never sync; the grouped experts path uses only those).

    `combine` adds the experts' weighted outputs (in sorted-row order) back per token. It sums
    each token's k contributions in increasing expert order, one bf16/fp16 rounding per addition
    -- the same value, bit for bit, as `out.index_add_(0, token_idx_e, y_e)` for e = 0, 1, ... (the
    reference implementation's loop), with k gathers and adds instead of one atomic scatter-add per
    expert (those were ~0.3 ms each on an H100, 64 per forward).
    """

    def __init__(self, topk_ids: torch.Tensor, topk_weights: torch.Tensor, num_experts: int):
        self.shape = topk_ids.shape                                  # (T, k)
        self.num_experts = num_experts
        flat = topk_ids.reshape(-1)
        self.order = torch.argsort(flat, stable=True)                # [T*k] sorted row -> (token, slot) pair
        self.token_idx = self.order // self.shape[-1]                # [T*k]
        self.weights = topk_weights.reshape(-1)[self.order]          # [T*k]
        self.experts = flat[self.order]                              # [T*k] the expert of each sorted row

    # Counts and offsets are computed on first use: `ends` / `count_tensor` stay on the device (no host sync:
    # searchsorted on the sorted experts, where CUDA's bincount reads its input's max back to the host);
    # `counts` / `start` / `rows` are host lists (one sync, on first use).
    @functools.cached_property
    def ends(self) -> torch.Tensor:
        """[E] long: end row of each expert's segment (cumulative counts), on the device."""
        bounds = torch.arange(1, self.num_experts + 1, device=self.experts.device, dtype=self.experts.dtype)
        return torch.searchsorted(self.experts, bounds)

    @functools.cached_property
    def count_tensor(self) -> torch.Tensor:
        """[E] long: rows (tokens) per expert, on the device."""
        return torch.diff(self.ends, prepend=self.ends.new_zeros(1))

    @functools.cached_property
    def counts(self) -> list[int]:
        return self.count_tensor.tolist()

    @functools.cached_property
    def start(self) -> list[int]:
        start = [0]
        for n in self.counts[:-1]:
            start.append(start[-1] + n)
        return start

    def rows(self, e: int) -> slice:
        return slice(self.start[e], self.start[e] + self.counts[e])

    @functools.cached_property
    def rows_by_token(self) -> torch.Tensor:
        """[T, k]: each token's sorted rows, ascending = its experts in increasing order (the sort is by expert)."""
        rows = torch.arange(self.order.numel(), device=self.order.device)
        row_of_pair = torch.empty_like(self.order).scatter_(0, self.order, rows)
        return row_of_pair.view(self.shape).sort(dim=-1).values

    def combine(self, contrib: torch.Tensor) -> torch.Tensor:
        """contrib [T*k, H] (sorted rows) -> [T, H]: per token, the sum over its experts in expert order."""
        return kernels.combine_rows(contrib, self.rows_by_token)

    def combine_weighted(self, y: torch.Tensor) -> torch.Tensor:
        """`combine` of y scaled by each row's routing weight (rounded to y's dtype, as ``(y * w).to(y.dtype)``):
        on CUDA one kernel (models/common/kernels.py, the same bits), else y.mul_(weights) in place, then combine."""
        if kernels.enabled(y):
            return kernels.weighted_combine(y, self.weights, self.rows_by_token)
        return kernels.weighted_combine_eager(y, self.weights, self.rows_by_token)


EXPERTS_IMPLS = ("auto", "grouped", "loop")
# "auto" on CPU takes the loop: CPU has no host syncs or launch overheads to save, its grouped matmul is a loop
# of matmuls, and stacking the weights each forward costs extra (measured, 64 experts, hidden 512, 2048 tokens,
# float32, one thread: loop 229 ms, grouped 297 ms). Tests set this to exercise "auto"'s rules on CPU.
GROUPED_ON_CPU = False


def _hooked(m: nn.Module) -> bool:
    """Anything that would run on a call of `m` beyond its class's forward: hooks or an instance forward."""
    return bool(m._forward_hooks or m._forward_pre_hooks or "forward" in m.__dict__)


def _global_hooks() -> bool:
    from torch.nn.modules import module as mod
    return bool(mod._global_forward_hooks or mod._global_forward_pre_hooks)


class SparseMoeBlock(nn.Module):
    """gate (router linear) -> router -> per-expert SwiGLU MLPs, plus an optional shared expert.

    Submodules carry checkpoint names: ``gate``, ``experts.N.{gate,up,down}`` (names from cfg.proj_names),
    ``shared_expert`` / ``shared_experts`` and ``shared_expert_gate``.

    ``experts_impl``: "auto" (default) runs the routed experts as grouped matmuls on an accelerator (on CPU
    only with ``GROUPED_ON_CPU`` or a hook on ``expert_act``) whenever `grouped_blocker` finds nothing that
    needs the expert modules to run, else the per-expert loop; "loop" always the loop; "grouped" always
    grouped (a RuntimeError naming the blocker otherwise, on CPU too).
    ``last_experts_impl`` says which one the latest forward took ("grouped" / "loop").
    """

    def __init__(self, cfg: MoEModelConfig) -> None:
        super().__init__()
        self.num_experts, self.top_k = cfg.num_experts, cfg.top_k
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        self.router = TopKRouter(cfg.top_k, cfg.norm_topk_prob, cfg.norm_eps, cfg.weights_in_input_dtype)
        self.experts = nn.ModuleList(
            SwiGLUMLP(cfg.hidden_size, cfg.moe_intermediate_size, cfg.proj_names) for _ in range(cfg.num_experts))
        self.shared_attr = cfg.shared_attr
        if cfg.shared_attr:
            setattr(self, cfg.shared_attr, SwiGLUMLP(cfg.hidden_size, cfg.shared_intermediate_size))
        if cfg.shared_gate:
            self.shared_expert_gate = nn.Linear(cfg.hidden_size, 1, bias=False)
            self.shared_gate_act = SharedGateAct()
        # Calibration option: run every expert on every token (outputs of unrouted tokens weighted 0).
        self.route_all_tokens = False
        self.expert_act = ExpertActivations()
        self.experts_impl = "auto"
        self.last_experts_impl: str | None = None

    def grouped_blocker(self, x: torch.Tensor) -> str | None:
        """Why the grouped experts path cannot run on `x` [T, H] (None: it can).

        It runs only when no one needs the expert modules themselves to run: no forward (pre-)hook or
        instance forward on any expert or its linears (calibration hooks, activation quantization) and no
        global module hooks; every expert a plain SwiGLUMLP with the block's projection names and every
        expert linear a plain bias-free nn.Linear (no subclass, parametrization or wrapper) of x's dtype and
        device; route_all_tokens off; no autograd graph wanted; and a grouped matmul that takes this
        dtype / device / shape here (`grouped_mm_accepts`).
        """
        if self.route_all_tokens:
            return "route_all_tokens is set"
        if x.shape[0] == 0:
            return "no tokens"
        if x.device.type == "meta":
            return "meta tensors"
        if _global_hooks():
            return "global module forward hooks are registered"
        if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.experts.parameters())):
            return "autograd is recording (grouped_mm's backward is not used here)"
        names = self.experts[0].names if len(self.experts) and type(self.experts[0]) is SwiGLUMLP else None
        if names is None:
            return "expert 0 is not a SwiGLUMLP"
        for e, m in enumerate(self.experts):
            if type(m) is not SwiGLUMLP or m.names != names or len(m._modules) != 3:
                return f"expert {e} is not a plain SwiGLUMLP ({type(m).__name__})"
            if _hooked(m):
                return f"expert {e} has forward hooks"
            for n in names:
                lin = m._modules.get(n)
                if type(lin) is not nn.Linear:
                    return f"experts.{e}.{n} is not a plain nn.Linear ({type(lin).__name__})"
                if _hooked(lin):
                    return f"experts.{e}.{n} has forward hooks"
                if lin.bias is not None:
                    return f"experts.{e}.{n} has a bias"
                if lin.weight.dtype != x.dtype or lin.weight.device != x.device:
                    return (f"experts.{e}.{n} is {lin.weight.dtype} on {lin.weight.device}, "
                            f"the input {x.dtype} on {x.device}")
        gate, _, down = (self.experts[0]._modules[n] for n in names)
        if not grouped_mm_accepts(x.device, x.dtype, gate.in_features, gate.out_features) \
                or down.in_features != gate.out_features or down.out_features != gate.in_features:
            return f"no grouped matmul for {x.dtype} on {x.device.type} at these shapes"
        return None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])  # (T, H)
        topk_ids, topk_weights = self.router(self.gate(x))  # (T, k), (T, k)
        route = ExpertRoute(topk_ids, topk_weights, self.num_experts)
        impl = self.experts_impl
        if impl not in EXPERTS_IMPLS:
            raise ValueError(f"experts_impl must be one of {EXPERTS_IMPLS}, got {impl!r}")
        act_hooked = bool(self.expert_act._forward_hooks or self.expert_act._forward_pre_hooks)
        cpu_loop = x.device.type == "cpu" and not GROUPED_ON_CPU and not act_hooked
        if impl == "loop" or (impl == "auto" and cpu_loop):
            blocker = "loop"
        else:
            blocker = self.grouped_blocker(x)
        if impl == "grouped" and blocker is not None:
            raise RuntimeError(f"experts_impl='grouped' but the grouped path cannot run: {blocker}")
        if blocker is None:
            self.last_experts_impl = "grouped"
            out = route.combine_weighted(self._experts_grouped(x, route))
        else:
            self.last_experts_impl = "loop"
            out = route.combine(self._experts_loop(x, route))
        return self._plus_shared(out, x).reshape(shape)

    def _plus_shared(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The routed experts' combined output [T, H] plus the shared expert's on x [T, H] (if the block has one)."""
        if self.shared_attr:
            shared = getattr(self, self.shared_attr)(x)  # (T, H)
            if hasattr(self, "shared_expert_gate"):
                shared = self.shared_gate_act(self.shared_expert_gate(x)) * shared
            out = out + shared
        return out

    def from_down_inputs(self, act: torch.Tensor, route: ExpertRoute, x_fn) -> torch.Tensor:
        """The block's output [T, H] from the routed experts' down_proj inputs `act` [T*k, I] and the `route` an
        earlier forward of the same weights sorted them by (what `expert_act` received): the grouped path's down
        matmul, weights and combine on those values, so the same bits as that forward's rest. x_fn() gives the
        block's input [T, H], asked for only by a shared expert."""
        offs = route.ends.to(torch.int32)
        out = route.combine_weighted(_grouped_mm_fn()(act, self._stacked(self.experts[0].names[2]), offs=offs))
        return self._plus_shared(out, x_fn()) if self.shared_attr else out

    def _experts_loop(self, x: torch.Tensor, route: ExpertRoute) -> torch.Tensor:
        """Each expert module on its tokens -> (T*k, H) weighted outputs, rows sorted by expert."""
        contrib = x.new_empty(route.order.numel(), x.shape[-1])
        for e in range(self.num_experts):
            rows = route.rows(e)
            if not route.counts[e]:
                continue
            token_idx = route.token_idx[rows]
            if self.route_all_tokens:
                y = self.experts[e](x)[token_idx]
            else:
                y = self.experts[e](x[token_idx])  # (n_e, H)
            contrib[rows] = (y * route.weights[rows][:, None]).to(x.dtype)
        return contrib

    def _stacked(self, leaf: str) -> torch.Tensor:
        """[E, K, N]: the transposed view of the experts' `leaf` weights stacked [E, N, K]."""
        return torch.stack([m._modules[leaf].weight for m in self.experts]).transpose(1, 2)

    def down_inputs(self, x: torch.Tensor, route: ExpertRoute, offs: torch.Tensor | None = None) -> torch.Tensor:
        """(T*k, I): every expert's down_proj input silu(gate(x))·up(x) at its routed rows of x [T, H] (route's
        sorted order), two grouped matmuls; the rows the loop's per-expert linears compute (bit for bit on CPU).
        Needs `grouped_blocker(x) is None`. GPTAQ's collector asks the fp layer's block for these."""
        mm = _grouped_mm_fn()
        g, u, _ = self.experts[0].names
        if offs is None:
            offs = route.ends.to(torch.int32)
        xs = x.index_select(0, route.token_idx)                                           # (T*k, H)
        h = F.silu(mm(xs, self._stacked(g), offs=offs))                                   # (T*k, I)
        h.mul_(mm(xs, self._stacked(u), offs=offs))
        return h

    def _experts_grouped(self, x: torch.Tensor, route: ExpertRoute) -> torch.Tensor:
        """All experts at once -> (T*k, H) outputs before the routing weights (`ExpertRoute.combine_weighted`
        applies them), rows sorted by expert; no host sync.

        The expert's own math (SwiGLUMLP: down(silu(gate(x)) * up(x))) as three grouped matmuls, each weight
        passed as the transposed view [E, K, N] of its stack [E, N, K] (the column-major layout the CUDA kernels
        take). Gate and up stay two matmuls, not one over [gate; up]: silu of a strided half rounds differently
        from silu of a contiguous tensor on CPU (vectorised vs scalar exp), one of them would then differ from
        the loop by an ulp in float32.
        """
        mm = _grouped_mm_fn()
        offs = route.ends.to(torch.int32)                                                 # [E] cumulative counts
        h = self.expert_act(self.down_inputs(x, route, offs), route=route)                # (T*k, I)
        # the routing weights are applied by combine_weighted: in the promoted dtype (fp32 for Mixtral's) and
        # rounded once to x's, as the loop's (y * w).to(x.dtype)
        return mm(h, self._stacked(self.experts[0].names[2]), offs=offs)                  # (T*k, H)
