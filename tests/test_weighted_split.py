"""The one-kernel split c·x = hi + lo (alphaquant/gptq/weighted_split.py) against the torch expression, bit for bit.

Values: normal N(0, 3) rows with outliers, float16-subnormal and bfloat16-tiny products, products that overflow
float16 (inf in hi, nan-free lo is not required there: both sides must agree), exact rounding ties of c·x, weights
0 and 1, and a row count that is not a multiple of the kernel's block. On a GPU (marked gpu) and on the CPU under
Triton's interpreter (in a subprocess, as tests/test_gptq_fused.py)."""
import pytest
import torch

from alphaquant.gptq import fused_sweep, weighted_split


def _cases(device):
    g = torch.Generator().manual_seed(0)
    T, C = 301, 96                                   # T*C = 28896: not a multiple of BLOCK
    x = torch.randn(T, C, generator=g) * 3
    x[torch.rand(T, C, generator=g) < 0.02] *= 50
    c = torch.rand(T, generator=g)
    c[:3] = torch.tensor([0.0, 1.0, 0.5])
    x[3] = 1e-4                                      # c·x float16-subnormal
    c[3] = 1e-3
    x[4] = 2.0 ** torch.arange(C).remainder(16)      # power-of-two x; c with 9 significant bits: ties in bf16
    c[4] = 1 + 2.0 ** -8
    x[5] = 6e4                                       # c·x beyond float16's range: inf in both
    c[5] = 3.0
    for dtype in (torch.bfloat16, torch.float16):
        yield dtype, x.to(dtype).to(device), c.to(device)


def check_all(device):
    for dtype, x, c in _cases(device):
        assert weighted_split.available(x)
        hi, lo = weighted_split.split_weighted(x, c)
        rhi, rlo = weighted_split.split_torch(x, c)
        assert hi.dtype == lo.dtype == dtype
        assert torch.equal(hi.view(torch.int16), rhi.view(torch.int16)), dtype
        assert torch.equal(lo.view(torch.int16), rlo.view(torch.int16)), dtype
        v = x.double() * c.double()[:, None]
        ok = torch.isfinite(v.to(dtype))
        err = (hi.double() + lo.double() - v)[ok].abs().max() / v[ok].abs().max()
        assert err < 2.0 ** -16, (dtype, float(err))
    print("split ok")


def test_cpu_tensors_take_torch():
    x = torch.randn(4, 8).to(torch.bfloat16)
    if not fused_sweep.INTERPRETED:
        assert not weighted_split.available(x)
    hi, lo = weighted_split.split_weighted(x, torch.rand(4))
    assert hi.dtype == lo.dtype == torch.bfloat16


@pytest.mark.skipif(weighted_split.triton is None, reason="Triton is not installed")
def test_kernel_in_triton_interpreter():
    from triton_interp import run_under_triton_interpreter
    assert "split ok" in run_under_triton_interpreter(__file__)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or weighted_split.triton is None, reason="needs a CUDA device and Triton")
def test_kernel_on_gpu():
    check_all("cuda")


if __name__ == "__main__":                           # run under TRITON_INTERPRET=1 by the test above
    check_all("cpu")
