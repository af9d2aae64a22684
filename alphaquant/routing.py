"""Pure tensor helpers that turn a router's output into per-expert token weights.

Contract with models/: an MoE block's router returns `topk_ids` [T, k] and `topk_weights`
[T, k] exactly as the family applies them to expert outputs, and expert e is called on the
tokens t with e in topk_ids[t], in increasing t. So the rows an expert's linears see are
`expert_tokens(topk_ids, e)` and their routing weights `expert_token_weights(...)`.
"""
from __future__ import annotations

import torch


def expert_token_weights(topk_ids: torch.Tensor, topk_weights: torch.Tensor, expert: int):
    """Token indices routed to `expert` (increasing) and their routing weights.

    topk_ids, topk_weights: [T, k]. Returns (tokens [n] long, weights [n] float32).
    """
    hit = topk_ids == expert                                            # [T, k]
    tokens = hit.any(dim=-1).nonzero(as_tuple=True)[0]                  # [n]
    weights = (topk_weights.float() * hit).sum(dim=-1).index_select(0, tokens)
    return tokens, weights


def tokens_per_expert(topk_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """How many tokens each expert received: [num_experts] long."""
    return torch.bincount(topk_ids.reshape(-1), minlength=num_experts)


class RoutePlan:
    """All experts' token lists of one router output at once, from one stable sort.

    The (token, slot) pairs sorted by expert: rows `start[e]:start[e] + counts[e]` of `tokens` and
    `weights` are expert e's tokens (increasing) and routing weights, exactly the rows
    `expert_token_weights(ids, w, e)` gives (and the order in which the expert receives them).
    `counts` is a host list (one sync per plan instead of one per expert).
    """

    def __init__(self, topk_ids: torch.Tensor, topk_weights: torch.Tensor, num_experts: int):
        k = topk_ids.shape[-1]
        flat = topk_ids.reshape(-1)
        order = torch.argsort(flat, stable=True)
        self.experts = flat[order]                                       # [N] expert of each row
        self.tokens = order // k                                         # [N]
        self.weights = topk_weights.reshape(-1)[order].float()          # [N]
        self.counts = torch.bincount(flat, minlength=num_experts).tolist()
        self.starts, s = [], 0
        for n in self.counts:
            self.starts.append(s)
            s += n

    def rows(self, e: int) -> slice:
        return slice(self.starts[e], self.starts[e] + self.counts[e])
