"""models/common/kernels.py against the eager ops they replace: the weighted combine bit for bit, RMSNorm within one
unit in the last place (its sum of squares runs in another order), on the CPU under Triton's interpreter (in a
subprocess, as tests/test_gptq_fused.py) and on a GPU (marked gpu, also through SparseMoeBlock and RMSNorm)."""
import pytest
import torch

from alphaquant.models.common import kernels


def _route_rows(T, k, E, g):
    """rows_by_token of a random top-k routing, as ExpertRoute builds it (sorted rows, each token's ascending)."""
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    order = torch.argsort(ids.reshape(-1), stable=True)
    row_of_pair = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel()))
    return row_of_pair.view(T, k).sort(dim=-1).values


def _ulps_apart(a, b):
    """|a - b| in units of b's last place (half precision: the spacing at b's binade, finite values)."""
    a, b = a.double(), b.double()
    fi = torch.finfo(torch.bfloat16 if a.dtype == torch.bfloat16 else torch.float16)
    return (a - b).abs() / (b.abs().clamp_min(fi.tiny) * fi.eps)


def check_combine(device):
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.bfloat16, torch.float16):
        for wdtype in (dtype, torch.float32):            # OLMoE-style weights in the input dtype; Mixtral's fp32
            for T, k, E, H in ((37, 2, 8, 96), (64, 8, 64, 160)):   # H not a multiple of the kernel's block
                rows = _route_rows(T, k, E, g)
                y = (torch.randn(T * k, H, generator=g) * 4).to(dtype)
                y[0, :5] = torch.tensor([0.0, -0.0, 1.0, 6e4 if dtype == torch.float16 else 3e38, 1e-3])
                w = torch.rand(T * k, generator=g)
                w[:3] = torch.tensor([0.0, 1.0, 0.5])
                w = w.to(wdtype)
                y, w, rows = y.to(device), w.to(device), rows.to(device)
                ref = kernels.weighted_combine_eager(y.clone(), w, rows)
                got = kernels.weighted_combine(y, w, rows)
                assert got.dtype == dtype and got.shape == (T, H)
                assert torch.equal(got.view(torch.int16), ref.view(torch.int16)), (dtype, wdtype, T, k, H)
    print("combine ok")


def check_rms_norm(device):
    g = torch.Generator().manual_seed(1)
    for dtype in (torch.bfloat16, torch.float16):
        for rows, H in ((33, 96), (16, 2048), (8, 5120)):
            x = torch.randn(rows, H, generator=g) * 3
            x[torch.rand(rows, H, generator=g) < 0.01] *= 40
            x[0] = 0.0                                   # an all-zero row: rsqrt(eps), zeros out
            w = (1 + 0.1 * torch.randn(H, generator=g)).to(dtype).to(device)
            x = x.to(dtype).to(device)
            ref = kernels.rms_norm_eager(x, w, 1e-6)
            got = kernels.rms_norm(x, w, 1e-6)
            assert got.dtype == dtype and got.shape == x.shape
            assert torch.isfinite(got).all()
            apart = _ulps_apart(got, ref)
            assert apart.max() <= 1.0, (dtype, H, float(apart.max()))
            assert (got != ref).float().mean() < 0.01, (dtype, H)
            assert torch.equal(got[0], torch.zeros_like(got[0]))
    print("rms_norm ok")


def test_eager_fallbacks_on_cpu():
    """Without the interpreter CPU tensors take the eager ops (the same functions the model called before)."""
    x = torch.randn(4, 8).to(torch.bfloat16)
    w = torch.ones(8, dtype=torch.bfloat16)
    assert not kernels.enabled(x)
    if torch.cuda.is_available():      # autograd through the weight keeps the eager ops
        w = torch.ones(8, device="cuda", requires_grad=True)
        with torch.enable_grad():
            assert not kernels.enabled(x.cuda(), w)
        with torch.no_grad():
            assert kernels.enabled(x.cuda(), w) == (kernels.triton is not None)
    assert torch.equal(kernels.rms_norm(x, w, 1e-6), kernels.rms_norm_eager(x, w, 1e-6))
    rows = _route_rows(4, 2, 3, torch.Generator().manual_seed(0))
    y, wr = torch.randn(8, 8).to(torch.bfloat16), torch.rand(8)
    assert torch.equal(kernels.weighted_combine(y.clone(), wr, rows), kernels.weighted_combine_eager(y.clone(), wr, rows))


@pytest.mark.skipif(kernels.triton is None, reason="Triton is not installed")
def test_kernels_in_triton_interpreter():
    from triton_interp import run_under_triton_interpreter
    out = run_under_triton_interpreter(__file__)
    assert "combine ok" in out and "rms_norm ok" in out


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or kernels.triton is None, reason="needs a CUDA device and Triton")
def test_kernels_on_gpu():
    check_combine("cuda")
    check_rms_norm("cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or kernels.triton is None, reason="needs a CUDA device and Triton")
@pytest.mark.parametrize("family", ["olmoe", "mixtral", "qwen2_moe", "deepseek_moe"])
def test_the_model_with_the_kernels_matches_the_eager_ops(family, monkeypatch):
    """A tiny bf16 model of each family on the GPU: its MoE block's output the same bits with the kernels and
    without (Mixtral's routing weights are fp32), the whole forward's logits within bf16 noise (RMSNorm's ulps)."""
    import tiny
    from alphaquant import models
    from alphaquant.models.common.moe import SparseMoeBlock
    cfg = {**tiny.BASE, **tiny.FAMILIES[family], "num_hidden_layers": 2}
    model = models.from_config(cfg, seed=0).to("cuda", torch.bfloat16)
    block = next(m for m in model.modules() if isinstance(m, SparseMoeBlock))
    x = torch.randn(2, 48, cfg["hidden_size"], device="cuda", generator=torch.Generator("cuda").manual_seed(0)
                    ).to(torch.bfloat16)
    ids = torch.randint(0, cfg["vocab_size"], (2, 48), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    with torch.no_grad():
        got, logits = block(x), model(ids)
        assert block.last_experts_impl == "grouped"
        monkeypatch.setattr(kernels, "FUSED", False)
        ref, ref_logits = block(x), model(ids)
    assert torch.equal(got.view(torch.int16), ref.view(torch.int16))
    rel = ((logits.float() - ref_logits.float()).norm() / ref_logits.float().norm()).item()
    assert rel < 1e-2, rel


if __name__ == "__main__":                           # run under TRITON_INTERPRET=1 by the test above
    check_combine("cpu")
    check_rms_norm("cpu")
