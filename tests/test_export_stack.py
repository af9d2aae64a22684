"""Compressing a layer's linears as stacks (compress_stack) and copying them out (writer.to_host).

The reference is the per-linear `compress`: row n of every stacked tensor must equal what it
gives linear n, bit for bit, for every format that can be stacked; to_host must give each
tensor its own storage with the same values as a per-tensor `.cpu()`.
"""
from __future__ import annotations

import pytest
import torch

from alphaquant.export.compressed import can_stack, compress, compress_stack, layout_of
from alphaquant.export.writer import _stack_params, to_host
from alphaquant.config.recipe import build_format
from test_export_layouts import C, FLOAT_CASES, INT_CASES, R, on_grid, spec


def _stack(sp, n=3, dtype=torch.float32):
    """n linears of one spec on the grid of their own params (different seeds)."""
    cases = [on_grid(sp, dtype, seed=s) for s in range(n)]
    fmt = cases[0][0]
    return fmt, [w for _, w, _, _ in cases], [p for _, _, p, _ in cases]


@pytest.mark.parametrize("wq,g,sym", [(w, g, s) for w, g, s in INT_CASES] + [(w, g, True) for w, g in FLOAT_CASES])
def test_stack_rows_equal_per_linear_compress(wq, g, sym):
    sp = spec(wq, g, sym)
    fmt, ws, ps = _stack(sp)
    lay = layout_of(sp)
    assert can_stack(fmt, lay, tuple(ws[0].shape))
    stacked = compress_stack(torch.stack(ws), _stack_params(ps), fmt, lay)
    for n, (w, p) in enumerate(zip(ws, ps)):
        one = compress(w, p, fmt, lay)
        assert set(one) == set(stacked)
        for k, t in one.items():
            row = stacked[k][n]
            assert row.dtype == t.dtype and row.shape == t.shape, k
            dense = lambda x: x.clone(memory_format=torch.contiguous_format).view(torch.uint8)  # noqa: E731
            assert torch.equal(dense(row), dense(t)), k


def test_stack_stores_scales_in_model_dtype_only_when_lossless_for_all():
    from alphaquant.formats.base import QParams
    sp = spec("int4", 32)
    fmt, lay = build_format(sp), layout_of(sp)
    gen = torch.Generator().manual_seed(0)
    exact = lambda: (torch.randint(-8, 8, (R, C), generator=gen) * 2.0 ** -4).to(torch.bfloat16)  # noqa: E731
    p_pow2 = QParams(torch.full((R, C // 32), 2.0 ** -4))             # a bfloat16 value
    p_odd = QParams(torch.full((R, C // 32), 1 + 2.0 ** -10))         # a float16 value, not a bfloat16
    zero = torch.zeros(R, C, dtype=torch.bfloat16)                    # on any grid
    assert compress(zero, p_odd, fmt, lay)["weight_scale"].dtype == torch.float32
    assert compress(exact(), p_pow2, fmt, lay)["weight_scale"].dtype == torch.bfloat16
    both = compress_stack(torch.stack([exact(), exact()]), _stack_params([p_pow2, p_pow2]), fmt, lay)
    mixed = compress_stack(torch.stack([exact(), zero]), _stack_params([p_pow2, p_odd]), fmt, lay)
    assert both["weight_scale"].dtype == torch.bfloat16 and mixed["weight_scale"].dtype == torch.float32


def test_act_order_and_ragged_fp6_are_not_stacked():
    fmt = on_grid(spec("mxfp6_e2m3", 32))[0]
    assert can_stack(fmt, layout_of(spec("mxfp6_e2m3", 32)), (3, 32))            # 96 codes: 72 whole bytes
    assert not can_stack(fmt, layout_of(spec("mxfp6_e2m3", 32)), (1, 34))        # 34 codes: not whole 3-byte words
    int4 = on_grid(spec("int4", 32))[0]
    assert not can_stack(int4, layout_of(spec("int4", 32), act_order=True), (24, 128))


def _own(t):
    return t.untyped_storage().nbytes() == t.numel() * t.element_size()


def _shared_tensors(device):
    base = torch.arange(4 * 6 * 8, dtype=torch.float32, device=device).reshape(4, 6, 8)
    codes = torch.arange(4 * 16, device=device).to(torch.uint8).reshape(4, 16)
    zp = torch.arange(4 * 3 * 5, dtype=torch.int32, device=device).reshape(4, 3, 5).transpose(-1, -2)
    big = torch.zeros(1000, device=device)                 # a storage the dict uses little of
    out = {f"w{n}": base[n] for n in range(4)}
    out.update({f"c{n}": codes[n].view(torch.float8_e4m3fn) for n in range(4)})
    out.update({f"z{n}": zp[n] for n in range(4)})
    out["small"] = big[10:20]
    out["alone"] = torch.ones(3, device=device)
    out["again"] = out["alone"]                            # one tensor under two keys
    return out


def _check_to_host(device, copy=to_host):
    tensors = _shared_tensors(device)
    host = copy(tensors)
    assert set(host) == set(tensors)
    for k, t in tensors.items():
        h = host[k]
        assert h.device.type == "cpu" and h.dtype == t.dtype and h.shape == t.shape and _own(h), k
        assert torch.equal(h.view(torch.uint8) if h.dtype == torch.float8_e4m3fn else h,
                           (t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t).cpu()), k
    ptrs = [h.untyped_storage().data_ptr() for h in host.values()]
    assert len(set(ptrs)) == len(ptrs)                     # safetensors' condition: nothing shared


def test_to_host_gives_own_storage_on_cpu():
    _check_to_host("cpu")


def _staged(device, staging_bytes):
    from alphaquant.export.writer import host_transfers, transfer_plan

    def copy(tensors):
        out = host_transfers(transfer_plan(tensors), pinned=device == "cuda", staging_bytes=staging_bytes)
        return {k: out[k] if k != "again" else out[k].clone() for k in tensors}     # to_host's own de-duplication
    return copy


@pytest.mark.parametrize("staging_bytes", [64, 200, 1 << 20])
def test_staged_transfers_in_many_batches_give_the_tensors(staging_bytes):
    """The staging path on host tensors (plain buffers, synchronous copies): with buffers of 64 bytes every source
    is a batch of its own and the two buffers alternate many times; a buffer reused before its batch was read out
    would hand back the next batch's bytes."""
    _check_to_host("cpu", _staged("cpu", staging_bytes))


def test_transfer_plan_copies_shared_storage_once():
    from alphaquant.export.writer import transfer_plan
    plan = transfer_plan(_shared_tensors("cpu"))
    # one source per shared stack (w, c, z), one for the slice of the big storage, one each for "alone" and
    # "again" (the same tensor under two keys)
    assert len(plan) == 6
    assert sorted(len(users) for _, users in plan) == [1, 1, 1, 4, 4, 4]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("staging_bytes", [64, None])
def test_to_host_copies_device_tensors_through_staging(staging_bytes):
    _check_to_host("cuda", to_host if staging_bytes is None else _staged("cuda", staging_bytes))


def test_kept_tensors_the_model_holds_wider_keep_their_dtype():
    """A bf16 model's fp32 tensors (transformers' _keep_in_fp32_modules: DeepSeek-V3's router weight and
    e_score_correction_bias) are stored in fp32; everything else kept is stored in the model dtype."""
    import torch
    from torch import nn

    from alphaquant.export.writer import LayerCompressor

    layer = nn.Module()
    layer.norm = nn.Linear(4, 4, bias=False).to(torch.bfloat16)
    layer.router = nn.Module()
    layer.router.weight = nn.Parameter(torch.randn(8, 4))                     # fp32 in a bf16 model
    layer.router.e_score_correction_bias = nn.Parameter(torch.randn(8, dtype=torch.float64))
    out = LayerCompressor({}, {}, torch.bfloat16).layer_tensors(0, layer)
    assert out["model.layers.0.norm.weight"].dtype == torch.bfloat16
    assert out["model.layers.0.router.weight"].dtype == torch.float32
    assert torch.equal(out["model.layers.0.router.weight"], layer.router.weight)
    assert out["model.layers.0.router.e_score_correction_bias"].dtype == torch.float64


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_staging_warmed_before_the_walk_is_reused_by_a_layer_write():
    """warm_host_staging leaves two staging buffers in torch's pinned-memory cache; a layer's worth of stacks (each
    the staging size) then goes to the host without page-locking any new memory."""
    from alphaquant.export.writer import STAGING_BYTES, warm_host_staging
    warm_host_staging()
    before = torch.cuda.host_memory_stats()["num_host_alloc"]
    stacks = [torch.full((32, STAGING_BYTES // 128), n, dtype=torch.int32, device="cuda") for n in range(6)]
    tensors = {f"s{n}.e{j}": s[j] for n, s in enumerate(stacks) for j in range(32)}
    host = to_host(tensors)
    assert torch.cuda.host_memory_stats()["num_host_alloc"] == before
    assert all(torch.equal(host[k], t.cpu()) for k, t in tensors.items())
    assert not any(h.is_pinned() for h in host.values())
