"""The batched routed-Hessian path (one sort per router output) equals the per-expert definition, bit for bit on CPU."""
import torch

from alphaquant.gptq import HessianState, accumulate_hessian
from alphaquant.gptq.hessian import accumulate_segments
from alphaquant.routing import RoutePlan, expert_token_weights
from alphaquant.models.common.moe import ExpertRoute, expert_token_weights as moe_rows


def _routing(T=200, E=6, k=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    probs = torch.rand(T, E, generator=g).softmax(-1)
    probs[:, 5] = 0                                   # expert 5 gets no tokens
    w, ids = probs.topk(k, dim=-1)
    return ids, w, g


def test_sorted_rows_equal_per_expert_rows():
    ids, w, _ = _routing()
    route = ExpertRoute(ids, w, 6)
    for e, (t1, w1) in enumerate(moe_rows(ids, w, 6)):
        t2, w2 = route.token_idx[route.rows(e)], route.weights[route.rows(e)]
        assert torch.equal(t1, t2) and torch.equal(w1, w2)


def test_segments_equal_per_expert_accumulation():
    ids, w, g = _routing(seed=1)
    x = torch.randn(ids.shape[0], 16, generator=g)
    plan = RoutePlan(ids, w, 6)
    for weighted in (True, False):
        ref = HessianState.zeros(16, experts=6)
        for e in range(6):
            tok, c = expert_token_weights(ids, w, e)
            if tok.numel():
                accumulate_hessian(ref.H[e], x[tok], c if weighted else None)
                ref.n_tokens[e] += int((c > 0).sum()) if weighted else tok.numel()
                ref.weight_sum[e] += float(c.double().sum()) if weighted else tok.numel()
        got = HessianState.zeros(16, experts=6)
        accumulate_segments(got, x[plan.token_idx], plan.counts, plan.weights if weighted else None, plan.experts)
        assert torch.equal(got.H, ref.H)
        assert torch.equal(got.n_tokens, ref.n_tokens)
        torch.testing.assert_close(got.weight_sum, ref.weight_sum)
        assert plan.counts[5] == 0 and not got.H[5].any()
