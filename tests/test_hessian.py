"""HessianState / accumulate_hessian: streaming sums equal one-shot, weights act as √c."""
import torch
from torch.testing import assert_close

from alphaquant.gptq import HessianState, accumulate_hessian


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_batches_equal_one_shot_2d():
    g = _gen()
    x = torch.randn(6, 50, 32, generator=g)                  # 6 batches of 50 tokens
    state = HessianState.zeros(32)
    for xb in x:
        state.add(xb)
    xf = x.reshape(-1, 32).double()
    assert int(state.n_tokens) == 300
    assert_close(state.finalize(), (2 * xf.T @ xf / 300).float(), rtol=1e-5, atol=1e-5)


def test_batches_equal_one_shot_3d_with_leading_token_dims():
    g = _gen(1)
    x = torch.randn(4, 3, 2, 10, 16, generator=g)            # [batches, E, B, S, C]
    state = HessianState.zeros(16, experts=3)
    for xb in x:
        state.add(xb.reshape(3, -1, 16))                     # [E, T, C]
    xe = x.permute(1, 0, 2, 3, 4).reshape(3, -1, 16).double()
    ref = 2 * xe.transpose(1, 2) @ xe / 80
    assert state.n_tokens.tolist() == [80, 80, 80]
    assert_close(state.finalize(), ref.float(), rtol=1e-5, atol=1e-5)


def test_weighted_equals_inputs_scaled_by_sqrt_weight():
    g = _gen(2)
    x = torch.randn(200, 24, generator=g)
    c = torch.rand(200, generator=g)
    H_w = accumulate_hessian(torch.zeros(24, 24), x, weight=c)
    H_s = accumulate_hessian(torch.zeros(24, 24), x * c.sqrt()[:, None])
    assert_close(H_w, H_s, rtol=1e-5, atol=1e-5)


def test_shared_tokens_with_routing_weights_equal_per_expert_loop():
    g = _gen(3)
    x = torch.randn(120, 16, generator=g)                    # tokens shared by all experts
    probs = torch.rand(4, 120, generator=g)
    probs[probs < 0.6] = 0                                   # not routed to that expert
    probs[2] = 0                                             # expert 2 gets no tokens
    state = HessianState.zeros(16, experts=4)
    for chunk in range(3):
        sl = slice(40 * chunk, 40 * (chunk + 1))
        state.add(x[sl], weight=probs[:, sl])
    H = state.finalize()
    for e in range(4):
        n = int((probs[e] > 0).sum())
        assert int(state.n_tokens[e]) == n
        assert_close(float(state.weight_sum[e]), float(probs[e].double().sum()))
        ref = 2 * (x * probs[e, :, None]).T @ x / max(n, 1)
        assert_close(H[e], ref, rtol=1e-5, atol=1e-5)
    assert torch.count_nonzero(H[2]) == 0                    # zero H tells the solver "no tokens"


def test_merged_rank_states_equal_one_process():
    """Summing raw H, n_tokens and weight_sum (what all_reduce(SUM) does) == one process."""
    g = _gen(4)
    x = torch.randn(90, 12, generator=g)
    c = torch.rand(90, generator=g)
    one = HessianState.zeros(12).add(x, weight=c)
    rank0 = HessianState.zeros(12).add(x[:30], weight=c[:30])
    rank1 = HessianState.zeros(12).add(x[30:], weight=c[30:])
    merged = rank0.merge(rank1)
    assert_close(merged.finalize(), one.finalize(), rtol=1e-5, atol=1e-6)
    assert int(merged.n_tokens) == 90
    assert_close(merged.weight_sum, one.weight_sum)


def test_low_precision_inputs_accumulate_in_fp32():
    g = _gen(5)
    x = torch.randn(64, 8, generator=g).bfloat16()
    state = HessianState.zeros(8).add(x)
    assert state.H.dtype == torch.float32
    xf = x.double()
    assert_close(state.finalize(), (2 * xf.T @ xf / 64).float(), rtol=1e-5, atol=1e-5)
