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
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

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


class ExpertRoute:
    """All experts' rows of one router output, from ONE stable sort of the (token, slot) pairs by expert.

    Expert e's rows of the sorted order are `rows(e)` = `start[e]:start[e] + counts[e]`, its tokens
    (increasing) `token_idx[rows]` and routing weights `weights[rows]` -- exactly the rows
    `expert_token_weights` gives. Slices of one sorted index instead of a `torch.where` per
    expert: one host sync per forward (the counts; `count_tensor` is the same on the device).

    `combine` adds the experts' weighted outputs (in sorted-row order) back per token. It sums
    each token's k contributions in increasing expert order, one bf16/fp16 rounding per addition
    -- the same value, bit for bit, as `out.index_add_(0, token_idx_e, y_e)` for e = 0, 1, ... (the
    reference implementation's loop), with k gathers and adds instead of one atomic scatter-add per
    expert (those were ~0.3 ms each on an H100, 64 per forward).
    """

    def __init__(self, topk_ids: torch.Tensor, topk_weights: torch.Tensor, num_experts: int):
        self.shape = topk_ids.shape                                  # (T, k)
        flat = topk_ids.reshape(-1)
        self.order = torch.argsort(flat, stable=True)                # [T*k] sorted row -> (token, slot) pair
        self.token_idx = self.order // self.shape[-1]                # [T*k]
        self.weights = topk_weights.reshape(-1)[self.order]          # [T*k]
        self.count_tensor = torch.bincount(flat, minlength=num_experts)
        self.counts = self.count_tensor.tolist()
        self.start = [0]
        for n in self.counts[:-1]:
            self.start.append(self.start[-1] + n)

    def rows(self, e: int) -> slice:
        return slice(self.start[e], self.start[e] + self.counts[e])

    @functools.cached_property
    def rows_by_token(self) -> torch.Tensor:
        """[T, k]: each token's sorted rows, ascending = its experts in increasing order (the sort is by expert)."""
        row_of_pair = torch.empty_like(self.order)
        row_of_pair[self.order] = torch.arange(self.order.numel(), device=self.order.device)
        return row_of_pair.view(self.shape).sort(dim=-1).values

    def combine(self, contrib: torch.Tensor) -> torch.Tensor:
        """contrib [T*k, H] (sorted rows) -> [T, H]: per token, the sum over its experts in expert order."""
        out = contrib.index_select(0, self.rows_by_token[:, 0])
        for r in range(1, self.rows_by_token.shape[1]):
            out.add_(contrib.index_select(0, self.rows_by_token[:, r]))
        return out


class SparseMoeBlock(nn.Module):
    """gate (router linear) -> router -> per-expert SwiGLU MLPs, plus an optional shared expert.

    Submodules carry checkpoint names: ``gate``, ``experts.N.{gate,up,down}`` (names from cfg.proj_names),
    ``shared_expert`` / ``shared_experts`` and ``shared_expert_gate``.
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

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])  # (T, H)
        topk_ids, topk_weights = self.router(self.gate(x))  # (T, k), (T, k)
        route = ExpertRoute(topk_ids, topk_weights, self.num_experts)
        contrib = x.new_empty(topk_ids.numel(), x.shape[-1])  # (T*k, H): weighted outputs, rows sorted by expert
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
        out = route.combine(contrib)
        if self.shared_attr:
            shared = getattr(self, self.shared_attr)(x)  # (T, H)
            if hasattr(self, "shared_expert_gate"):
                shared = self.shared_gate_act(self.shared_expert_gate(x)) * shared
            out = out + shared
        return out.reshape(shape)
