"""Contract tests run over every format: registry, consistency, column slices, packing."""
import pytest
import torch

from alphaquant.formats import FORMAT_NAMES, FormatError, QParams, get_format
from alphaquant.formats.packing import pack_bits, unpack_bits

QUANT_NAMES = [n for n in FORMAT_NAMES if n not in ("bf16", "fp16")]


def _w(shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 0.1


def test_registry_errors_name_the_problem():
    with pytest.raises(FormatError, match="unknown format 'int9'.*int4.*nvfp4"):
        get_format("int9")
    with pytest.raises(FormatError, match="unknown option.*sym.*allowed: group_size"):
        get_format("mxfp4", sym=False)
    with pytest.raises(FormatError, match="unknown option.*group_size.*none"):
        get_format("bf16", group_size=128)
    with pytest.raises(FormatError, match="group_size"):
        get_format("int4", group_size=0)
    with pytest.raises(FormatError, match="scale_mode"):
        get_format("mxfp4", scale_mode="round")
    with pytest.raises(FormatError, match="scale_dtype"):
        get_format("int4", scale_dtype=torch.int8)
    assert get_format("int4", scale_dtype="bfloat16").scale_dtype == torch.bfloat16


def test_format_attributes():
    expect = {"int3": 3, "mxfp4": 4, "mxfp6": 6, "mxfp6_e3m2": 6, "mxfp8_e5m2": 8, "mxint8": 8,
              "nvfp4": 4, "fp8_e4m3": 8, "bf16": 16}
    for name, bits in expect.items():
        f = get_format(name)
        assert f.bits == bits and f.is_identity == (name == "bf16")
    assert get_format("mxfp4").group_size == 32 and get_format("nvfp4").group_size == 16
    assert get_format("fp8_e4m3").group_size == -1 and get_format("int4").group_size == 128


@pytest.mark.parametrize("name", FORMAT_NAMES)
def test_fake_equals_dequant_quant_equals_round_with(name):
    fmt = get_format(name)
    for dtype in (torch.float32, torch.bfloat16):
        w = _w((2, 8, 256)).to(dtype)
        fq = fmt.fake_quantize(w)
        assert fq.dtype == dtype and fq.shape == w.shape
        assert torch.equal(fmt.dequantize(fmt.quantize(w)).to(dtype), fq)
        assert torch.equal(fmt.round_with(w, fmt.params(w)), fq)


@pytest.mark.parametrize("name", FORMAT_NAMES)
def test_column_slice_rounding_matches_whole_tensor(name):
    """GPTQ rounds w[:, :, j:j+1] against p.select(group of j) from the whole weight."""
    fmt = get_format(name)
    w = _w((3, 5, 256), seed=1)                                # [E, R, C]
    p = fmt.params(w)
    fq = fmt.fake_quantize(w)
    g = fmt.group_len(256)
    for j in (0, 1, 15, 16, 37, 128, 255):
        col = fmt.round_with(w[:, :, j:j + 1], p.select(j // g))   # [E, R, 1]
        assert torch.equal(col, fq[:, :, j:j + 1]), j
    if fmt.num_groups(256) > 1:                                 # several groups via a tensor index
        sel = p.select(torch.tensor([0, 1]))
        assert torch.equal(fmt.round_with(w[:, :, :2 * g], sel), fq[:, :, :2 * g])


@pytest.mark.parametrize("name", QUANT_NAMES)
def test_not_divisible_group_raises(name):
    fmt = get_format(name, group_size=32)
    with pytest.raises(FormatError, match="last dimension 48 is not divisible by group_size 32"):
        fmt.params(torch.randn(4, 48))


@pytest.mark.parametrize("name", QUANT_NAMES)
def test_nan_raises_unless_disabled(name):
    w = _w((2, 64))
    w[1, 7] = float("nan")
    with pytest.raises(FormatError, match="NaN/Inf"):
        get_format(name, group_size=32).params(w)
    out = get_format(name, group_size=32, check_finite=False).fake_quantize(w)
    assert torch.isnan(out[1, 7])                               # NaN propagates, never hidden


@pytest.mark.parametrize("name", FORMAT_NAMES)
@pytest.mark.parametrize("shape", [(4, 64), (3, 2, 32)])
def test_pack_unpack_round_trip(name, shape):
    fmt = get_format(name, group_size=32) if name not in ("bf16", "fp16") else get_format(name)
    q = fmt.quantize(_w(shape, seed=2) * 10)
    data = fmt.pack(q.codes)
    assert data.dtype == torch.uint8 and data.dim() == 1
    assert data.numel() == (q.codes.numel() * fmt.bits + 7) // 8
    back = fmt.unpack(data, q.codes.shape)
    assert back.dtype == q.codes.dtype and torch.equal(back, q.codes)


@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_bits_round_trip_odd_lengths(bits):
    g = torch.Generator().manual_seed(bits)
    for n in (1, 3, 7, 8, 13, 64):
        c = torch.randint(0, 1 << bits, (n,), generator=g)
        assert torch.equal(unpack_bits(pack_bits(c, bits), bits, n), c.to(torch.int32))


def test_pack_layouts():
    assert pack_bits(torch.tensor([1, 2, 15, 0]), 4).tolist() == [0x21, 0x0F]     # low nibble first
    assert pack_bits(torch.tensor([1, 2, 3, 0]), 2).tolist() == [0b00111001]
    # four 6-bit codes in three bytes: stream 000001 000010 000011 111111 (LSB first)
    assert pack_bits(torch.tensor([1, 2, 3, 63]), 6).tolist() == [0x81, 0x30, 0xFC]
    # signed int codes are stored offset by 2^(b-1)
    fmt = get_format("int4")
    assert fmt.pack(torch.tensor([-8, 7], dtype=torch.int8)).tolist() == [0xF0]


def test_fp8_e4m3_format_is_torch_cast():
    fmt = get_format("fp8_e4m3")
    w = _w((6, 128), seed=3)
    scale = w.abs().amax(-1, keepdim=True) / 448
    ref = (w / scale).to(torch.float8_e4m3fn)
    q = fmt.quantize(w)
    assert torch.equal(q.params.scale, scale)
    assert torch.equal(q.codes, ref.view(torch.uint8))
    assert torch.equal(fmt.fake_quantize(w), ref.float() * scale)


def test_identity_formats():
    w = _w((4, 33))                                            # any width: no groups
    for name, dt in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        fmt = get_format(name)
        assert fmt.is_identity
        assert torch.equal(fmt.fake_quantize(w), w.to(dt).float())
        p = fmt.params(w)
        assert torch.equal(fmt.round_with(w[:, 3:4], p.select(0)), w[:, 3:4].to(dt).float())


def test_round_with_needs_matching_groups():
    fmt = get_format("int4", group_size=32)
    p = QParams(torch.ones(4, 3))
    with pytest.raises(FormatError, match="does not split into the 3 groups"):
        fmt.round_with(torch.randn(4, 64), p)


def test_fp8_channel_matches_compressed_tensors():
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils.helpers import calculate_qparams

    w = _w((16, 128), seed=4)
    args = QuantizationArgs(num_bits=8, type="float", symmetric=True, strategy="channel")
    scale, zp = calculate_qparams(w.amin(-1, keepdim=True), w.amax(-1, keepdim=True), args)
    fmt = get_format("fp8_e4m3")
    assert torch.equal(fmt.params(w).scale, scale)
    assert torch.equal(fmt.fake_quantize(w), fake_quantize(w, scale, None, args))


@pytest.mark.parametrize("name", FORMAT_NAMES)
def test_formats_built_from_the_same_options_are_equal_and_hash_equal(name):
    a, b = get_format(name), get_format(name)
    assert a is not b and a == b and hash(a) == hash(b) and len({a, b}) == 1
    if "group_size" in vars(a) and a.group_size not in (-1, 32) and not a.is_identity:
        assert a != get_format(name, group_size=32)


def test_int_formats_differ_by_symmetry_and_bits():
    assert get_format("int4", sym=True) != get_format("int4", sym=False)
    assert get_format("int4") != get_format("int8")
    assert get_format("int4") != get_format("int4", check_finite=False)
    assert get_format("mxfp4") != get_format("mxfp6_e2m3")
