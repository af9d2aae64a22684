"""GPU-only checks of the solver: the CUDA-graph sweep equals the eager sweep bit for bit (both
the torch sweep, fused=False; the fused Triton sweep is tests/test_gptq_fused.py), and CUDA
results agree with the CPU ones. Skipped without a GPU (CI has none)."""
import pytest
import torch
from torch.testing import assert_close

from alphaquant.formats import get_format
from alphaquant.gptq import clear_graph_cache, gptq_quantize

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _problem(E=3, R=64, C=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(E, 1024, C, generator=g) @ (torch.randn(E, C, C, generator=g) / C ** 0.5)
    H = 2 * X.transpose(1, 2) @ X / 1024
    H[1] = 0                                                         # a no-token expert too
    return torch.randn(E, R, C, generator=g), H


@pytest.mark.parametrize("name", ["int4", "mxfp4", "nvfp4"])
@pytest.mark.parametrize("act_order", [False, True])
def test_cuda_graph_equals_eager(name, act_order):
    fmt = get_format(name)
    W, H = (t.cuda() for t in _problem())
    eager = gptq_quantize(W, H, fmt, act_order=act_order, cuda_graph=False, block_size=64, fused=False)
    graph = gptq_quantize(W, H, fmt, act_order=act_order, cuda_graph=True, block_size=64, fused=False)
    assert torch.equal(eager.weight, graph.weight)
    assert torch.equal(eager.qtensor.codes, graph.qtensor.codes)
    assert torch.equal(eager.loss, graph.loss) and graph.fallback == eager.fallback


def test_cached_graph_reused_with_new_data_equals_eager():
    """The second call replays the first call's captured block: nothing may be stale."""
    clear_graph_cache()
    fmt = get_format("nvfp4")
    for seed in (2, 3):
        W, H = (t.cuda() for t in _problem(seed=seed))
        W = W * seed                                                 # other scales, other global scale
        eager = gptq_quantize(W, H, fmt, cuda_graph=False, block_size=64, fused=False)
        graph = gptq_quantize(W, H, fmt, cuda_graph=True, block_size=64, fused=False)
        assert torch.equal(eager.weight, graph.weight)


def test_cuda_agrees_with_cpu():
    fmt = get_format("int4")
    W, H = _problem(seed=1)
    cpu = gptq_quantize(W, H, fmt, act_order=True)
    gpu = gptq_quantize(W.cuda(), H.cuda(), fmt, act_order=True)
    # fp32 on different hardware: a rare rounding decision may flip, nothing more
    flipped = (cpu.weight != gpu.weight.cpu()).float().mean()
    assert flipped < 1e-3
    assert_close(gpu.loss.cpu(), cpu.loss, rtol=1e-3, atol=0)
    assert gpu.fallback == cpu.fallback


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("weighted", [False, True])
def test_fast_hessian_matches_fp64(dtype, weighted):
    """The tensor-core Hessian (half-precision operands, fp32 output) against a float64 sum."""
    from alphaquant.gptq.hessian import accumulate_hessian_fast
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(3000, 256, generator=g) * 3).to(dtype)
    c = torch.rand(3000, generator=g) if weighted else None
    H = accumulate_hessian_fast(torch.zeros(256, 256, device="cuda"), x.cuda(), None if c is None else c.cuda())
    xd = x.double()
    ref = (xd * (1 if c is None else c.double()[:, None])).T @ xd
    assert_close(H.cpu().double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


@pytest.mark.parametrize("weighted", [False, True])
def test_hessian_state_of_a_plain_linear_matches_fp64(weighted):
    """HessianState.add (the attention and shared linears' Hessians) on CUDA bf16 [B, T, C] inputs: the sums and
    counts of a float64 reference."""
    from alphaquant.gptq.hessian import HessianState
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(2, 1500, 192, generator=g) * 2).to(torch.bfloat16)
    c = torch.rand(2, 1500, generator=g).masked_fill_(torch.rand(2, 1500, generator=g) < 0.2, 0) if weighted else None
    state = HessianState.zeros(192, device="cuda").add(x.cuda(), None if c is None else c.cuda())
    xd = x.double().reshape(-1, 192)
    cd = torch.ones(3000, dtype=torch.float64) if c is None else c.double().reshape(-1)
    ref = (xd * cd[:, None]).T @ xd
    assert_close(state.H.cpu().double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    assert int(state.n_tokens) == int((cd > 0).sum()) and abs(float(state.weight_sum) - float(cd.sum())) < 1e-6
