"""NVFP4 against a slow spec-form reference and against compressed-tensors' own arithmetic."""
import pytest
import torch

from alphaquant.formats import FormatError, get_format

E2M1_POS = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6], dtype=torch.float64)


def ref_nvfp4(w):
    """Spec form, float64, loops over matrices and blocks: returns (nibble codes, values, block fp8)."""
    R, C = w.shape
    glob = w.abs().max().double().item() / (6 * 448)
    codes = torch.empty(R, C, dtype=torch.uint8)
    vals = torch.empty(R, C, dtype=torch.float64)
    blocks = torch.empty(R, C // 16)
    for r in range(R):
        for b in range(C // 16):
            v = w[r, 16 * b:16 * b + 16].double()
            bs = torch.tensor(v.abs().max().item() / (6 * glob)).float().clamp(max=448)
            bs = bs.to(torch.float8_e4m3fn).float().item() or 0.125
            blocks[r, b] = bs
            x = (v / (bs * glob)).abs().clamp(max=6)
            idx = (x[:, None] - E2M1_POS[None]).abs().argmin(-1)   # no ties in random data
            codes[r, 16 * b:16 * b + 16] = idx.to(torch.uint8) | (torch.signbit(v).to(torch.uint8) << 3)
            vals[r, 16 * b:16 * b + 16] = E2M1_POS[idx] * torch.sign(v) * bs * glob
    return codes, vals, blocks


def test_nvfp4_matches_slow_reference_per_expert():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, 8, 64, generator=g) * torch.tensor([0.01, 1.0, 30.0])[:, None, None]
    fmt = get_format("nvfp4")
    q = fmt.quantize(w)
    out = fmt.fake_quantize(w)
    assert q.params.extra["weight_global_scale"].shape == (3,)     # one per expert
    for e in range(3):
        codes, vals, blocks = ref_nvfp4(w[e])
        assert torch.equal(q.params.extra["block_scale_fp8"][e].float(), blocks)
        assert torch.equal(q.codes[e], codes)
        # spec form multiplies by amax/2688, we divide by 2688/amax (CT): equal up to an ulp
        torch.testing.assert_close(out[e].double(), vals, rtol=3e-7, atol=0)


def test_nvfp4_zero_and_tiny_matrix():
    fmt = get_format("nvfp4")
    assert torch.equal(fmt.fake_quantize(torch.zeros(2, 4, 32)), torch.zeros(2, 4, 32))
    w = torch.zeros(4, 32)
    w[1, 3] = 1e-3
    out = fmt.fake_quantize(w)
    assert out[1, 3].item() == pytest.approx(1e-3, rel=1e-6) and out.count_nonzero() == 1


def test_nvfp4_nan_raises_and_group_divisibility():
    w = torch.randn(4, 32)
    w[0, 0] = float("inf")
    with pytest.raises(FormatError, match="NaN/Inf"):
        get_format("nvfp4").quantize(w)
    with pytest.raises(FormatError, match="not divisible"):
        get_format("nvfp4").params(torch.randn(4, 40))


def test_nvfp4_matches_compressed_tensors():
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils.helpers import calculate_qparams, generate_gparam

    g = torch.Generator().manual_seed(1)
    w = torch.randn(32, 256, generator=g) * 0.02
    args = QuantizationArgs(num_bits=4, type="float", symmetric=True, strategy="tensor_group",
                            group_size=16, scale_dtype=torch.float8_e4m3fn)
    gs = generate_gparam(w.amin(), w.amax())                       # CT stores 6*448/amax
    wg = w.unflatten(-1, (16, 16))
    scale, _ = calculate_qparams(wg.amin(-1), wg.amax(-1), args, global_scale=gs)
    fmt = get_format("nvfp4")
    p = fmt.params(w)
    assert torch.equal(p.extra["weight_global_scale"].reshape(1), gs)
    assert torch.equal(p.extra["block_scale_fp8"].float(), scale.float())
    assert torch.equal(fmt.fake_quantize(w), fake_quantize(w, scale, None, args, global_scale=gs))


def test_nvfp4_pack_matches_compressed_tensors():
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors.nvfp4.helpers import pack_fp4_to_uint8

    fmt = get_format("nvfp4")
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(2))
    q = fmt.quantize(w)
    elems = (q.codes & 7).to(torch.int64)
    x = E2M1_POS.float()[elems] * torch.where(q.codes >= 8, -1.0, 1.0)   # element values
    assert torch.equal(fmt.pack(q.codes), pack_fp4_to_uint8(x).reshape(-1))
