"""Bit packing of element codes into uint8 bytes.

One layout for every width: the tensor is flattened in row-major order and written as a
little-endian bit stream, element i occupying stream bits [i*b, (i+1)*b), stream bit j
being bit (j % 8) of byte j // 8. This gives the usual layouts without special cases:

    b = 8: one code per byte
    b = 4: two codes per byte, the first in the LOW nibble
    b = 2: four codes per byte, the first in the lowest two bits
    b = 6: four codes per three bytes
    b = 3, 5, 7: a plain stream; the last byte is zero-padded

Rows are NOT byte-aligned for odd widths (a row of 5 int3 codes ends mid-byte); the
padding is only at the very end. Codes here are unsigned (0 .. 2^b - 1); formats map
signed codes to this range before calling (see each format's pack).

    data = pack_bits(codes_u8, 4)           # [numel // 2] uint8
    codes = unpack_bits(data, 4, codes_u8.numel()).reshape(codes_u8.shape)
"""
from __future__ import annotations

import torch


def packed_nbytes(numel: int, bits: int) -> int:
    return (numel * bits + 7) // 8


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes (any int dtype, values < 2^bits) -> 1-D uint8 little-endian bit stream."""
    flat = codes.reshape(-1).to(torch.int32)                       # [N]
    if bits == 8:
        return flat.to(torch.uint8)
    # Fast path for widths that divide 8: k codes per byte, shifted and OR-ed.
    if 8 % bits == 0:
        k = 8 // bits
        pad = (-flat.numel()) % k
        flat = torch.nn.functional.pad(flat, (0, pad)).reshape(-1, k)     # [N/k, k]
        shifts = torch.arange(k, device=flat.device, dtype=torch.int32) * bits
        return (flat << shifts).sum(-1).to(torch.uint8)
    # Generic path: explode into bits, regroup by 8. Memory is 8x the codes: export only.
    shifts = torch.arange(bits, device=flat.device, dtype=torch.int32)
    stream = ((flat[:, None] >> shifts) & 1).reshape(-1)                 # [N*bits]
    stream = torch.nn.functional.pad(stream, (0, (-stream.numel()) % 8)).reshape(-1, 8)
    weights = torch.arange(8, device=flat.device, dtype=torch.int32)
    return (stream << weights).sum(-1).to(torch.uint8)                  # [ceil(N*bits/8)]


def unpack_bits(data: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of pack_bits: 1-D uint8 -> [numel] int32 unsigned codes."""
    data = data.reshape(-1).to(torch.int32)
    if data.numel() != packed_nbytes(numel, bits):
        raise ValueError(f"{data.numel()} bytes cannot hold {numel} codes of {bits} bits "
                         f"(expected {packed_nbytes(numel, bits)})")
    mask = (1 << bits) - 1
    if bits == 8:
        return data
    if 8 % bits == 0:
        k = 8 // bits
        shifts = torch.arange(k, device=data.device, dtype=torch.int32) * bits
        return ((data[:, None] >> shifts) & mask).reshape(-1)[:numel]
    weights = torch.arange(8, device=data.device, dtype=torch.int32)
    stream = ((data[:, None] >> weights) & 1).reshape(-1)[: numel * bits].reshape(numel, bits)
    shifts = torch.arange(bits, device=data.device, dtype=torch.int32)
    return (stream << shifts).sum(-1)
