"""Pure tensor helpers that turn a router's output into per-expert token weights.

Contract with models/: an MoE block's router returns `topk_ids` [T, k] and `topk_weights`
[T, k] exactly as the family applies them to expert outputs, and expert e is called on the
tokens t with e in topk_ids[t], in increasing t. So the rows an expert's linears see are
`expert_tokens(topk_ids, e)` and their routing weights `expert_token_weights(...)`.
"""
from __future__ import annotations

import torch

from alphaquant.models.common.moe import ExpertRoute


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


class RoutePlan(ExpertRoute):
    """The model's one-sort routing (`ExpertRoute`: `token_idx`, `weights`, `counts`, `rows(e)`, `experts` [N]
    the expert of each sorted row) with the weights in float32, as the routed Hessians take them.
    Rows `rows(e)` are expert e's tokens (increasing) and routing weights, exactly the rows
    `expert_token_weights(ids, w, e)` gives (and the order in which the expert receives them).
    """

    def __init__(self, topk_ids: torch.Tensor, topk_weights: torch.Tensor, num_experts: int):
        super().__init__(topk_ids, topk_weights, num_experts)
        self.weights = self.weights.float()                              # [N]
