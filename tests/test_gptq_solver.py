"""gptq_quantize: quality vs round-to-nearest, agreement with a slow textbook GPTQ,
2D/3D/batched consistency, and the MoE robustness paths (no tokens, dead columns,
Cholesky failure, NaN)."""
import pytest
import torch
from torch.testing import assert_close

from alphaquant.formats import get_format
from alphaquant.gptq import CHOLESKY_FAILED, NO_TOKENS, gptq_quantize, upper_cholesky_of_inverse


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def correlated_inputs(E, T, C, seed=0, dtype=torch.float32):
    """X [E, T, C] = Z @ A_e with a random mixing matrix: strongly correlated channels."""
    g = _gen(seed)
    Z = torch.randn(E, T, C, generator=g, dtype=torch.float64)
    A = torch.randn(E, C, C, generator=g, dtype=torch.float64) / C ** 0.5 + 0.3 * torch.eye(C, dtype=torch.float64)
    return (Z @ A).to(dtype)


def hessian_of(X):
    """H = 2 XᵀX / T per expert, [E, C, C]."""
    return 2 * X.transpose(-1, -2) @ X / X.shape[-2]


def output_error(W, Q, X):
    """||(W - Q) Xᵀ|| per expert [E]."""
    return ((W - Q) @ X.transpose(-1, -2)).flatten(1).norm(dim=1)


# --- the slow textbook reference ----------------------------------------------------------

def textbook_gptq(W, H, fmt, damp=0.01, act_order=False, static_groups=True):
    """Column by column, no lazy blocks, H⁻¹ updated explicitly by the OBS formula. float64.

    W [R, C], H [C, C] -> (Q [R, C], loss).
    """
    W = W.double().clone()
    H = H.double().clone()
    C = W.shape[1]
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    order = torch.argsort(torch.diag(H), descending=True, stable=True) if act_order else torch.arange(C)
    H += damp * torch.diag(H).mean() * torch.eye(C, dtype=H.dtype)
    Hinv = torch.linalg.inv(H)
    g = fmt.group_len(C)
    p_static = fmt.params(W)
    Q = torch.zeros_like(W)
    loss = 0.0
    for pos, j in enumerate(order.tolist()):
        if static_groups:
            p = p_static.select(j // g)                       # the column's ORIGINAL group
        elif pos % g == 0:
            p = fmt.params(W[:, order[pos:pos + g]])           # current weights of the group
        q = fmt.round_with(W[:, j:j + 1], p)[:, 0]
        Q[:, j] = q
        rest = order[pos + 1:]
        err = (W[:, j] - q) / Hinv[j, j]
        loss += float(((W[:, j] - q) ** 2).sum() / Hinv[j, j] / 2)
        W[:, rest] -= err[:, None] * Hinv[j, rest][None, :]
        Hinv = Hinv - Hinv[:, j:j + 1] @ Hinv[j:j + 1, :] / Hinv[j, j]   # OBS: drop column j
    return Q, loss


FORMATS = {
    "int4_g128": lambda: get_format("int4", group_size=128),
    "int3": lambda: get_format("int3", group_size=64),
    "mxfp4": lambda: get_format("mxfp4"),
    "nvfp4": lambda: get_format("nvfp4"),
}


@pytest.mark.parametrize("name", list(FORMATS))
@pytest.mark.parametrize("act_order", [False, True])
def test_output_error_below_rtn(name, act_order):
    fmt = FORMATS[name]()
    E, R, C = 2, 48, 256
    X = correlated_inputs(E, 512, C, seed=1)
    W = torch.randn(E, R, C, generator=_gen(2))
    res = gptq_quantize(W, hessian_of(X), fmt, act_order=act_order)
    err_gptq = output_error(W, res.weight, X)
    err_rtn = output_error(W, fmt.fake_quantize(W), X)
    assert (err_gptq < 0.9 * err_rtn).all(), (err_gptq, err_rtn)
    assert res.fallback == [None, None]


TEXTBOOK_FORMATS = {
    "int4_asym_g16": lambda: get_format("int4", group_size=16, sym=False),
    "mxfp4_g16": lambda: get_format("mxfp4", group_size=16),
}


@pytest.mark.parametrize("name", list(TEXTBOOK_FORMATS))
@pytest.mark.parametrize("static_groups", [True, False])
@pytest.mark.parametrize("act_order", [False, True])
def test_matches_textbook(name, static_groups, act_order):
    fmt = TEXTBOOK_FORMATS[name]()
    R, C = 12, 64
    X = correlated_inputs(1, 256, C, seed=3, dtype=torch.float64)[0]
    H = hessian_of(X)
    W = torch.randn(R, C, generator=_gen(4), dtype=torch.float64)
    # block_size 24: several lazy blocks, not aligned with the groups of 16
    res = gptq_quantize(W, H, fmt, block_size=24, act_order=act_order, static_groups=static_groups)
    Q_ref, loss_ref = textbook_gptq(W, H, fmt, act_order=act_order, static_groups=static_groups)
    assert_close(res.weight, Q_ref, rtol=0, atol=1e-9)
    assert_close(float(res.loss[0]), loss_ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("static_groups", [True, False])
@pytest.mark.parametrize("act_order", [False, True])
def test_export_codes_dequantize_to_weight(static_groups, act_order):
    fmt = get_format("int4", group_size=32, sym=False)
    E, R, C = 3, 16, 128
    X = correlated_inputs(E, 256, C, seed=5)
    W = torch.randn(E, R, C, generator=_gen(6))
    res = gptq_quantize(W, hessian_of(X), fmt, act_order=act_order, static_groups=static_groups)
    q = res.qtensor
    assert q.codes.shape == W.shape and q.params.scale.shape == (E, R, C // 32)
    if act_order:
        diag = hessian_of(X).diagonal(dim1=-2, dim2=-1)
        assert (diag.gather(1, res.perm).diff(dim=1) <= 0).all()        # descending diag(H)
        if static_groups:
            assert torch.equal(res.g_idx, (torch.arange(C) // 32).int().expand(E, C))
    else:
        assert res.perm is None and res.g_idx is None
    # dequantize column by column through g_idx (what a GPTQ-format loader does)
    g_idx = res.g_idx.long() if res.g_idx is not None else (torch.arange(C) // 32).expand(E, C)
    scale = q.params.scale.gather(-1, g_idx[:, None, :].expand(E, R, C))
    zero = q.params.zero.gather(-1, g_idx[:, None, :].expand(E, R, C))
    assert torch.equal((q.codes.float() - zero) * scale, res.weight)
    if static_groups:
        assert torch.equal(fmt.dequantize(q), res.weight)                # contiguous groups


def test_loss_is_the_quadratic_form_of_the_damped_hessian():
    fmt = get_format("int4", group_size=32)
    E, R, C = 2, 16, 96
    H = hessian_of(correlated_inputs(E, 300, C, seed=7, dtype=torch.float64))
    W = torch.randn(E, R, C, generator=_gen(8), dtype=torch.float64)
    res = gptq_quantize(W, H, fmt, block_size=32, act_order=True)
    Hd = H + 0.01 * H.diagonal(dim1=-2, dim2=-1).mean(-1)[:, None, None] * torch.eye(C, dtype=H.dtype)
    D = W - res.weight
    assert_close(res.loss.double(), 0.5 * torch.einsum("erc,ecd,erd->e", D, Hd, D), rtol=1e-5, atol=0)
    assert_close(res.damp, torch.full((E,), 0.01))


def test_2d_equals_3d_with_one_expert():
    fmt = get_format("mxfp4")
    X = correlated_inputs(1, 256, 128, seed=9)
    W = torch.randn(24, 128, generator=_gen(10))
    r2 = gptq_quantize(W, hessian_of(X)[0], fmt, act_order=True, block_size=32)
    r3 = gptq_quantize(W[None], hessian_of(X), fmt, act_order=True, block_size=32)
    assert r2.weight.shape == W.shape and r2.qtensor.codes.shape == W.shape
    assert torch.equal(r2.weight, r3.weight[0])
    assert torch.equal(r2.qtensor.codes, r3.qtensor.codes[0])
    assert torch.equal(r2.qtensor.params.scale, r3.qtensor.params.scale[0])
    assert torch.equal(r2.perm, r3.perm[0]) and torch.equal(r2.g_idx, r3.g_idx[0])
    assert r2.loss.shape == (1,) and r2.fallback == [None]


@pytest.mark.parametrize("static_groups", [True, False])
def test_3d_equals_loop_of_2d(static_groups):
    fmt = get_format("int4", group_size=32, sym=False)
    E, R, C = 4, 16, 128
    X = correlated_inputs(E, 256, C, seed=11)
    H = hessian_of(X)
    W = torch.randn(E, R, C, generator=_gen(12))
    batched = gptq_quantize(W, H, fmt, act_order=True, static_groups=static_groups, block_size=48)
    for e in range(E):
        solo = gptq_quantize(W[e], H[e], fmt, act_order=True, static_groups=static_groups, block_size=48)
        assert_close(batched.weight[e], solo.weight, rtol=0, atol=1e-6)
        assert torch.equal(batched.perm[e], solo.perm)
        assert_close(batched.loss[e], solo.loss[0], rtol=1e-5, atol=0)


def test_gate_and_up_stacked_along_rows_equal_separate_solves():
    """The OLMoE trick: gate and up read the same input, so one call with rows stacked."""
    fmt = get_format("int4", group_size=32)
    E, I, C = 2, 8, 64
    H = hessian_of(correlated_inputs(E, 200, C, seed=13))
    gate, up = torch.randn(2, E, I, C, generator=_gen(14))
    both = gptq_quantize(torch.cat([gate, up], 1), H, fmt)
    assert_close(both.weight[:, :I], gptq_quantize(gate, H, fmt).weight, rtol=0, atol=1e-6)
    assert_close(both.weight[:, I:], gptq_quantize(up, H, fmt).weight, rtol=0, atol=1e-6)


# --- robustness ----------------------------------------------------------------------------

@pytest.mark.parametrize("static_groups", [True, False])
def test_expert_without_tokens_falls_back_to_rtn_not_zero(static_groups):
    fmt = get_format("int4", group_size=32)
    E, R, C = 3, 16, 64
    H = hessian_of(correlated_inputs(E, 200, C, seed=15))
    H[1] = 0                                                         # expert 1 saw no tokens
    W = torch.randn(E, R, C, generator=_gen(16))
    res = gptq_quantize(W, H, fmt, static_groups=static_groups, act_order=True)
    assert res.fallback == [None, NO_TOKENS, None]
    assert torch.equal(res.weight[1], fmt.fake_quantize(W[1]))
    assert res.weight[1].abs().sum() > 0
    assert float(res.damp[1]) == 0.0
    solo = gptq_quantize(W[0], H[0], fmt, static_groups=static_groups, act_order=True)
    assert_close(res.weight[0], solo.weight, rtol=0, atol=1e-6)      # neighbours unaffected


def test_dead_columns_are_rounded_not_zeroed():
    fmt = get_format("int4", group_size=16)
    E, R, C = 2, 16, 64
    X = correlated_inputs(E, 300, C, seed=17)
    dead = torch.tensor([3, 17, 40, 41])
    X[0][:, dead] = 0                                                # input channels never active
    H = hessian_of(X)
    W = torch.randn(E, R, C, generator=_gen(18))
    res = gptq_quantize(W, H, fmt, act_order=True)
    assert res.fallback == [None, None] and torch.isfinite(res.weight).all()
    # a dead column gets no error from other columns (its H row is zero): plain RTN
    rtn = fmt.fake_quantize(W[0])
    assert torch.equal(res.weight[0][:, dead], rtn[:, dead])
    assert res.weight[0][:, dead].abs().sum() > 0
    assert (output_error(W, res.weight, X) < output_error(W, fmt.fake_quantize(W), X)).all()


def test_cholesky_failure_raises_damping_then_falls_back():
    fmt = get_format("int4", group_size=32)
    E, R, C = 4, 16, 64
    H = hessian_of(correlated_inputs(E, 400, C, seed=19)).double()
    mean_diag = H[1].diagonal().mean()
    lam_min = torch.linalg.eigvalsh(H[1])[0]
    # expert 1: indefinite, min eigenvalue -0.05·mean(diag): λ=0.01 fails, λ=0.1 succeeds
    H[1] -= (lam_min + 0.05 * mean_diag) * torch.eye(C, dtype=H.dtype)
    H[2] = -1e6 * torch.eye(C, dtype=H.dtype)                        # huge, negative definite
    v = torch.randn(C, 1, generator=_gen(20), dtype=H.dtype)
    H[3] = H[3] - 100 * H[3].diagonal().mean() * (v @ v.T) / (v.T @ v)   # indefinite beyond λ=1
    W = torch.randn(E, R, C, generator=_gen(21), dtype=torch.float64)
    res = gptq_quantize(W, H, fmt)
    assert res.fallback == [None, None, CHOLESKY_FAILED, CHOLESKY_FAILED]
    assert_close(res.damp.double(), torch.tensor([0.01, 0.1, 1.0, 1.0], dtype=torch.float64))
    for e in (2, 3):
        assert torch.equal(res.weight[e], fmt.fake_quantize(W[e]))
    assert torch.isfinite(res.loss).all()


def test_nan_or_inf_raise_clear_errors():
    fmt = get_format("int4", group_size=32)
    H = torch.eye(64).expand(2, 64, 64).clone()
    W = torch.randn(2, 8, 64, generator=_gen(22))
    W_bad = W.clone()
    W_bad[1, 3, 5] = float("nan")
    with pytest.raises(ValueError, match=r"W contains NaN or Inf \(expert\(s\) \[1\]\)"):
        gptq_quantize(W_bad, H, fmt)
    H_bad = H.clone()
    H_bad[0, 2, 2] = float("inf")
    with pytest.raises(ValueError, match="H contains NaN or Inf"):
        gptq_quantize(W, H_bad, fmt)
    with pytest.raises(ValueError, match="H must be"):
        gptq_quantize(W, H[0], fmt)


def test_identity_format_returns_weight_unchanged():
    fmt = get_format("bf16")
    W = torch.randn(2, 8, 64, generator=_gen(23)).bfloat16()
    res = gptq_quantize(W, torch.eye(64).expand(2, 64, 64), fmt)
    assert torch.equal(res.weight, W) and res.weight.dtype == torch.bfloat16
    assert res.loss.tolist() == [0.0, 0.0] and res.fallback == [None, None]


def test_low_precision_weight_keeps_dtype():
    fmt = get_format("int4", group_size=32)
    W = torch.randn(2, 8, 64, generator=_gen(24)).bfloat16()
    H = hessian_of(correlated_inputs(2, 128, 64, seed=25))
    res = gptq_quantize(W, H, fmt)
    assert res.weight.dtype == torch.bfloat16 and res.weight.shape == W.shape


def test_upper_cholesky_of_inverse_matches_gptq_reference_steps():
    H = hessian_of(correlated_inputs(3, 200, 48, seed=26, dtype=torch.float64))
    H += 0.01 * torch.eye(48, dtype=H.dtype)
    U, bad = upper_cholesky_of_inverse(H)
    # the GPTQ reference: cholesky, cholesky_inverse, upper cholesky
    ref = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    assert not bad.any()
    assert_close(U, ref, rtol=1e-8, atol=1e-10)


def test_graph_cache_is_keyed_by_format_value_not_object():
    """The pipeline builds a new Format for every solve: equal formats must find the captured block
    (with identity hashing every decoder layer re-captured its CUDA graphs)."""
    from alphaquant.gptq.sweep import _GRAPH_CACHE, clear_graph_cache, graphed_block
    clear_graph_cache()
    fmt1, fmt2 = get_format("int4", group_size=32), get_format("int4", group_size=32)
    P = fmt1.params(torch.randn(2, 8, 64))
    P1 = P.__class__(P.scale[:, :, :1].expand(2, 8, 4).transpose(1, 2).contiguous(), None, {})
    a = graphed_block(fmt1, P1, 2, 4, 8, torch.float32, "cpu")
    b = graphed_block(fmt2, P1, 2, 4, 8, torch.float32, "cpu")
    assert a is b and len(_GRAPH_CACHE) == 1
    c = graphed_block(get_format("int4", group_size=32, sym=False), P1, 2, 4, 8, torch.float32, "cpu")
    assert c is not a and len(_GRAPH_CACHE) == 2
    clear_graph_cache()
