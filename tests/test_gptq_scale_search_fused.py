"""The fused MSE scale search (alphaquant/gptq/fused_scale_search.py, one Triton kernel) against the torch search.

For int2/int3/int4 symmetric and asymmetric (float16, bfloat16 and float32 scales), group lengths 16 .. 128,
a per-channel group that is not a power of two, and MX formats (floor and ceil), with and without column
weights, float32 and bfloat16 weights, on random weights with outliers, tiny weights (float16-subnormal
scales), huge ones (saturated float16 scales) and all-zero / all-positive / all-negative groups:
  (a) where the kernel picks the torch search's candidate, its params are the torch search's, bit for bit;
  (b) >= 99% of the groups pick the same candidate;
  (c) where they differ, the torch errors of the two picks agree to 1e-5 relative (a near-tie);
  (d) every group's params are fmt.params of the group clamped to its chosen p·[lo, hi] (an independent
      check of the kernel's arithmetic), bit for bit.
Before those, the kernel's params formula alone (`params_of_extremes`) is compared with fmt.params on
crafted extremes: float16/bfloat16 rounding ties of the scale, subnormal and saturated scales, half-way
asymmetric zeros, MX amax at the floor/ceil boundaries.
The kernel runs on a GPU (test marked gpu) and on the CPU under Triton's interpreter (in a subprocess, as
tests/test_gptq_fused.py); without the interpreter CPU tensors keep the torch loop.
"""

import pytest
import torch

from alphaquant.formats import get_format
from alphaquant.gptq import fused_scale_search, fused_sweep
from alphaquant.gptq.scale_search import GRID, MAX_SHRINK, NORM, group_error, search_params

# (name, options, with column weights)
INT_CASES = [
    ("int4", {"group_size": 128}, False),
    ("int4", {"group_size": 64, "scale_dtype": torch.bfloat16}, True),
    ("int3", {"group_size": 32}, True),
    ("int3", {"group_size": 128, "scale_dtype": torch.bfloat16}, False),
    ("int2", {"group_size": 16, "scale_dtype": torch.float32}, False),
    ("int4", {"group_size": 32, "sym": False, "scale_dtype": torch.bfloat16}, False),
    ("int4", {"group_size": 64, "sym": False}, True),
    ("int3", {"group_size": 64, "sym": False}, False),
    ("int3", {"group_size": 128, "sym": False, "scale_dtype": torch.bfloat16}, True),
]
MX_CASES = [("mxfp4", {}, True), ("mxfp4", {"scale_mode": "ceil"}, False), ("mxint8", {}, False),
            ("mxfp6_e3m2", {"group_size": 64}, True)]


def _weights(E=2, R=13, C=256, seed=0):
    """[E, R, C]: N(0, 0.02) with 2% outliers x8 and one row of heavy tails; row 1 of expert 0 holds an
    all-zero, an all-positive, an all-negative, two tiny (float16-subnormal int scales; scales that
    round to 0 -> eps) and a huge group (1e6: saturates float16 scales) at group lengths up to 32."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(E, R, C, generator=g) * 0.02
    w[torch.rand(E, R, C, generator=g) < 0.02] *= 8
    w[:, 2] = torch.distributions.StudentT(2.0).sample((E, C)) * 0.01
    s = w[0, 1]
    s[:32] = 0.0
    s[32:64] = s[32:64].abs()
    s[64:96] = -s[64:96].abs()
    s[96:128] *= 1e-3
    s[128:160] *= 5e-6
    s[160:192] *= 5e7
    return w


def _all_candidates(fmt, w, cw):
    """Per candidate i (the torch search's p = 1 - i/GRID): fmt.params of the clamped groups and their torch
    errors [n, ..., G], computed here the way search_params does."""
    wg = fmt.split_groups(w)
    lo = wg.amin(-1, keepdim=True).clamp(max=0)
    hi = wg.amax(-1, keepdim=True).clamp(min=0)
    params, errs = [], []
    for i in range(int(MAX_SHRINK * GRID)):
        p = 1 - i / GRID
        cand = fmt.params(torch.clamp(wg, lo * p, hi * p).flatten(-2))
        params.append(cand)
        errs.append(group_error(fmt, w, cand, cw, NORM))
    return params, torch.stack(errs)


def _fields(p):
    """The per-group tensors of params p as exact int32 bit patterns (scale, zero, E8M0 code)."""
    out = {"scale": p.scale.view(torch.int32)}
    if p.zero is not None:
        out["zero"] = p.zero.view(torch.int32)
    if "scale_e8m0" in p.extra:
        out["e8m0"] = p.extra["scale_e8m0"].to(torch.int32)
    return out


def _extremes():
    """(lo, hi) float32 pairs, lo <= 0 <= hi: random over 14 decades, zeros, and crafted edge cases: float16 /
    bfloat16 rounding ties of the int scales (normal and subnormal), saturation, exact ties of the asymmetric
    zero, and MX amax at and next to max_elem * 2^k and powers of two (the ceil / floor boundaries)."""
    g = torch.Generator().manual_seed(4)
    n = 2000
    mag = lambda: torch.randn(n, generator=g).abs() * 10.0 ** (torch.rand(n, generator=g) * 14 - 8)  # noqa: E731
    lo, hi = [-mag()], [mag()]
    lo[0][:100], hi[0][100:200] = 0.0, 0.0
    lo[0][200:250] = hi[0][200:250] = 0.0
    for levels in (3.0, 7.0, 15.0):                                 # int2 .. int4
        for mbits in (10, 7):                                         # float16, bfloat16 ties (and subnormal ones)
            k = torch.arange(0, 2 ** mbits, 7, dtype=torch.float64)
            for e in (-28, -24, -20, -14, -9, -3, 0, 5, 12, 16):
                t = ((2 ** (mbits + 1) + 2 * k + 1) * 2.0 ** (e - mbits - 1)).float()
                lo += [torch.zeros_like(t), -t * (levels / 2)]
                hi += [t * levels, t * (levels / 2) * 0.5]
        for e in (-20, -6, 0, 3):                                     # qmin - lo / raw exactly half-way
            m = torch.arange(0, int(levels), dtype=torch.float32)
            lo_t = -(2 * m + 1) / 2 * 2.0 ** e
            lo += [lo_t]
            hi += [levels * 2.0 ** e + lo_t]
    big = torch.tensor([6e4, 6.6e4 * 7.5, 1e6, 1e30, 3e38])
    lo, hi = lo + [-big, torch.zeros(5)], hi + [big, big]
    for vmax in (6.0, 7.5, 28.0, 448.0, 57344.0, 127 / 64, 1.0):      # MX boundaries
        k = torch.arange(-140, 120, 3, dtype=torch.float64)
        a = (vmax * 2.0 ** k).float()
        a = a[a < 3e38]
        for x in (a, torch.nextafter(a, torch.zeros(())), torch.nextafter(a, torch.full((), float("inf")))):
            lo, hi = lo + [-x, torch.zeros_like(x)], hi + [x * 0.5, x]
    return torch.cat(lo), torch.cat(hi)


def check_params_of_extremes(cases):
    """The kernel's params formula == fmt.params of the group [lo, hi] (it depends on the extremes only)."""
    lo, hi = _extremes()
    for name, opts, _ in cases:
        fmt = get_format(name, **opts)
        ref = get_format(name, **{**opts, "group_size": 2}).params(torch.stack([lo, hi], -1))
        got = fused_scale_search.params_of_extremes(fmt, lo, hi)
        got_f = _fields(got)
        assert set(got_f) == set(_fields(ref)), f"{name} {opts}"
        for k, v in _fields(ref).items():
            bad = got_f[k].cpu() != v[:, 0]
            assert not bad.any(), f"{name} {opts}: {k} differs at lo={lo[bad][:3]}, hi={hi[bad][:3]}"


def check_case(name, opts, weighted, w, block_groups=None, device="cpu", min_same=0.99):
    fmt = get_format(name, **opts)
    cw = (torch.rand(w.shape[0], 1, w.shape[-1], generator=torch.Generator().manual_seed(1)) * 3) if weighted else None
    what = f"{name} {opts} col_weight={weighted}"
    got, idx = fused_scale_search.search(fmt, w.to(device), None if cw is None else cw.to(device), grid=GRID,
                                         max_shrink=MAX_SHRINK, norm=NORM, block_groups=block_groups)
    got_f = {k: v.cpu() for k, v in _fields(got).items()}
    idx = idx.cpu().long()
    assert set(got.extra) == ({"scale_e8m0"} if name.startswith("mx") else set()), what
    ref = search_params(fmt, w, cw, fused=False)                       # the torch loop
    ref_f = _fields(ref)
    params, errs = _all_candidates(fmt, w, cw)
    ref_idx = errs.argmin(0)                                           # first least: what the loop keeps
    cand_f = [_fields(p) for p in params]
    stacked = {k: torch.stack([c[k] for c in cand_f]) for k in ref_f}
    for k in ref_f:                                                    # the loop indeed picked ref_idx
        assert torch.equal(stacked[k].gather(0, ref_idx[None])[0], ref_f[k]), f"{what}: {k} of the torch loop"
        # (d) the kernel's params are the format's own for its chosen p, bit for bit
        assert torch.equal(stacked[k].gather(0, idx[None])[0], got_f[k]), f"{what}: {k} is not fmt.params at p"
    same = idx == ref_idx
    for k in ref_f:                                                    # (a) same pick, same bits
        assert torch.equal(got_f[k][same], ref_f[k][same]), f"{what}: {k}"
    # (b) nearly every group picks the same candidate; (c) the others are near-ties
    assert same.float().mean().item() >= min_same, f"{what}: {int((~same).sum())} of {same.numel()} differ"
    e_got, e_ref = errs.gather(0, idx[None])[0], errs.gather(0, ref_idx[None])[0]
    assert ((e_got - e_ref).abs() <= 1e-5 * e_ref.abs())[~same].all(), f"{what}: not a near-tie"
    return int((~same).sum()), same.numel()


def check_all(device="cpu", big=False):
    differ = total = 0
    w = _weights(E=4, R=64, C=512) if big else _weights()
    for name, opts, weighted in INT_CASES + MX_CASES:
        d, n = check_case(name, opts, weighted, w, device=device)
        differ, total = differ + d, total + n
    # per-channel groups of a length that is not a power of two (96: padded to 128 and masked)
    w96 = _weights(R=7, C=96, seed=2)
    for opts, weighted in [({"group_size": -1, "sym": False}, True), ({"group_size": -1}, False)]:
        d, n = check_case("int4", opts, weighted, w96, device=device)
        differ, total = differ + d, total + n
    # bfloat16 weights (loaded as such, rounded in float32)
    d, n = check_case("int4", {"group_size": 64, "sym": False}, True, w.to(torch.bfloat16), device=device)
    differ, total = differ + d, total + n
    # several programs, the last one partly filled (3 x 13 x 2 = 78 groups of 32 in programs of 64)
    check_case("int3", {"group_size": 32, "sym": False}, True, _weights(E=3, C=64, seed=3), block_groups=64,
               device=device)
    return differ, total


def check_shapes(device="cpu"):
    """1-D and 4-D weights, column weights broadcast over leading dims (a view or, [3, 1, 1, C], a copy)."""
    g = torch.Generator().manual_seed(5)
    fmt = get_format("int4", group_size=32, sym=False)
    for shape, cshape in [((256,), (256,)), ((3, 2, 4, 64), (3, 1, 1, 64)), ((3, 2, 4, 64), (2, 1, 64))]:
        w, cw = torch.randn(*shape, generator=g) * 0.02, torch.rand(*cshape, generator=g)
        got = search_params(fmt, w.to(device), cw.to(device), fused=True)
        ref = search_params(fmt, w, cw, fused=False)
        assert got.scale.shape == ref.scale.shape
        assert torch.equal(got.scale.cpu(), ref.scale) and torch.equal(got.zero.cpu(), ref.zero), (shape, cshape)
    # every candidate's error inf (|d|^2.4 overflows: float16 scales saturate) or NaN (a NaN column weight):
    # the torch search keeps fmt.params (p = 1), so must the kernel
    w = torch.randn(2, 3, 64, generator=g) * 0.02
    w[0, 0, :32] *= 1e19
    cw = torch.ones(64)
    cw[40] = float("nan")
    for fmt, c in [(get_format("int4", group_size=32), None), (get_format("int4", group_size=32), cw),
                   (get_format("mxfp4"), cw)]:
        got, idx = fused_scale_search.search(fmt, w.to(device), None if c is None else c.to(device), grid=GRID,
                                             max_shrink=MAX_SHRINK, norm=NORM)
        assert torch.equal(got.scale.cpu(), search_params(fmt, w, c, fused=False).scale), (fmt, c)
        assert idx.min() >= 0 and idx.max() < int(MAX_SHRINK * GRID)


def test_cpu_tensors_keep_the_torch_loop_without_the_interpreter(monkeypatch):
    fmt = get_format("int4", group_size=32)
    w = _weights(E=1, R=4, C=64)
    if fused_scale_search.INTERPRETED:
        pytest.skip("this process runs Triton's interpreter")
    assert not fused_scale_search.supports(fmt, w)
    monkeypatch.setattr(fused_scale_search, "search_params", lambda *a, **k: pytest.fail("dispatched to the kernel"))
    assert torch.equal(search_params(fmt, w).scale, search_params(fmt, w, fused=False).scale)
    with pytest.raises(ValueError, match="fused=True needs"):
        search_params(fmt, w, fused=True)


def test_supports(monkeypatch):
    # as if the CPU were the kernel's device (the interpreter), so that only the format and shapes decide
    monkeypatch.setattr(fused_scale_search, "INTERPRETED", True)
    monkeypatch.setattr(fused_scale_search, "available", lambda: True)
    w = torch.zeros(2, 3, 96)
    for name, opts in [("int4", {"group_size": 32}), ("int3", {"group_size": -1, "sym": False}),
                       ("int4", {"scale_dtype": torch.bfloat16, "group_size": 48}), ("mxfp4", {}),
                       ("mxint8", {"scale_mode": "ceil"})]:
        assert fused_scale_search.supports(get_format(name, **opts), w), (name, opts)
    for name, opts in [("nvfp4", {}), ("fp8_e4m3", {}), ("bf16", {}), ("int4", {"group_size": 64}),
                       ("int4", {"group_size": 32, "check_finite": False})]:
        assert not fused_scale_search.supports(get_format(name, **opts), w), (name, opts)
    fmt = get_format("int4", group_size=32)
    assert not fused_scale_search.supports(fmt, w.double())
    assert not fused_scale_search.supports(get_format("int4", group_size=-1), torch.zeros(2, 8192))  # > MAX_GROUP
    assert fused_scale_search.supports(fmt, w, torch.ones(2, 1, 96)) and fused_scale_search.supports(fmt, w, torch.ones(96))
    assert not fused_scale_search.supports(fmt, w, torch.ones(2, 3, 2, 96))          # would broadcast the error up
    assert not fused_scale_search.supports(fmt, w, torch.ones(2, 1, 96, dtype=torch.float64))


@pytest.mark.skipif(fused_sweep.triton is None, reason="Triton is not installed")
def test_kernel_in_triton_interpreter():
    from triton_interp import run_under_triton_interpreter
    out = run_under_triton_interpreter(__file__)
    assert "params ok" in out and "fused search ok" in out


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or fused_sweep.triton is None, reason="needs a CUDA device and Triton")
def test_kernel_on_gpu_equals_torch_search(monkeypatch):
    monkeypatch.setattr(fused_scale_search, "FAST_LOG2", False)       # the precise software log2
    check_all("cuda", big=True)
    fmt = get_format("int4", group_size=128)
    w = _weights().cuda()
    assert fused_scale_search.supports(fmt, w)
    assert torch.equal(search_params(fmt, w).scale, search_params(fmt, w, fused=True).scale)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or fused_sweep.triton is None, reason="needs a CUDA device and Triton")
def test_fast_log2_on_gpu(monkeypatch):
    monkeypatch.setattr(fused_scale_search, "FAST_LOG2", True)         # the default on CUDA
    w = _weights(E=4, R=64, C=512)
    for name, opts, weighted in INT_CASES + MX_CASES:
        check_case(name, opts, weighted, w, device="cuda")
    check_all("cuda", big=True)


if __name__ == "__main__":             # the interpreter run (see test_kernel_in_triton_interpreter)
    assert fused_scale_search.INTERPRETED and fused_scale_search.supports(get_format("int4"), _weights())
    check_params_of_extremes(INT_CASES + MX_CASES)
    print("params ok")
    check_shapes()
    differ, total = check_all()
    print(f"fused search ok: {differ} of {total} groups picked another (near-tie) candidate")
