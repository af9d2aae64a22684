"""The batched routed-Hessian path (one sort per router output) equals the per-expert definition, bit for bit on CPU."""
import pytest
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


def _per_expert_reference(H, x, counts, w, hessian):
    """The one-call-per-expert loop with the module's own split and matmul (what the GPU path did before)."""
    start = 0
    for e, n in enumerate(counts):
        if n:
            hi, lo = hessian.split_weighted(x[start:start + n], w[start:start + n])
            xs = x[start:start + n]
            hessian._addmm_fp32(H[e], hi.T, xs)
            hessian._addmm_fp32(H[e], lo.T, xs)
        start += n


def test_weighted_runs_of_experts_equal_one_split_per_expert(monkeypatch):
    """`_weighted_segments` splits runs of consecutive experts' rows at once (the GPU path): each expert gets the
    very products of its own split. Checked on CPU with the split's torch reference and a float32 matmul standing
    in for the half-precision one (both sides use the same two), for runs of several experts, an expert larger than
    a run, experts without rows and a matmul that fails part-way (the rest falls back expert by expert)."""
    from alphaquant.gptq import hessian
    from alphaquant.gptq.weighted_split import split_torch

    monkeypatch.setattr(hessian, "_addmm_fp32", lambda H, a, b: H.add_(a.float() @ b.float()))
    monkeypatch.setattr(hessian, "split_weighted", split_torch)
    g = torch.Generator().manual_seed(4)
    counts = [5, 0, 17, 3, 0, 40, 1, 9]
    C = 128
    x = torch.randn(sum(counts), C, generator=g).to(torch.bfloat16)
    w = torch.rand(sum(counts), generator=g)
    ref = torch.zeros(len(counts), C, C)
    _per_expert_reference(ref, x, counts, w, hessian)
    for rows_per_run in (1, 8, 20, 1000):
        monkeypatch.setattr(hessian, "SPLIT_CHUNK_ELEMS", rows_per_run * C)
        got = torch.zeros_like(ref)
        hessian._weighted_segments(got, x, counts, w)
        assert torch.equal(got, ref), rows_per_run
    # the half-precision matmul refused at expert 3: experts 0-2 as above, 3.. through accumulate_hessian_fast
    calls = []

    def refusing(H, a, b):
        calls.append(1)
        if len(calls) > 4:          # experts 0 and 2 (two products each), then expert 3's first
            raise RuntimeError("no float32 output here")
        H.add_(a.float() @ b.float())
    monkeypatch.setattr(hessian, "_addmm_fp32", refusing)
    monkeypatch.setattr(hessian, "_HALF_MM_FP32_OUT", [True])
    got = torch.zeros_like(ref)
    hessian._weighted_segments(got, x, counts, w)
    assert hessian._HALF_MM_FP32_OUT == [False]
    assert torch.equal(got[:3], ref[:3])
    fallback = torch.zeros_like(ref)
    hessian._each_segment(fallback, x, counts, w, 3, sum(counts[:3]))
    assert torch.equal(got[3:], fallback[3:]) and got[3:].any()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_weighted_runs_on_cuda_give_the_bits_of_one_split_per_expert(monkeypatch):
    """On the GPU, with the Triton split and the half-precision matmul with float32 output: the same bits."""
    from alphaquant.gptq import hessian

    g = torch.Generator().manual_seed(5)
    counts = [700, 0, 1300, 64, 2500, 1]
    C = 1024
    x = torch.randn(sum(counts), C, generator=g).to("cuda", torch.bfloat16)
    w = torch.rand(sum(counts), generator=g).cuda()
    ref = torch.zeros(len(counts), C, C, device="cuda")
    _per_expert_reference(ref, x, counts, w, hessian)
    for rows_per_run in (1, 2048, 10**6):
        monkeypatch.setattr(hessian, "SPLIT_CHUNK_ELEMS", rows_per_run * C)
        got = torch.zeros_like(ref)
        hessian._weighted_segments(got, x, counts, w)
        assert torch.equal(got, ref), rows_per_run
