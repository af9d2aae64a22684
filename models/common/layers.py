"""Building blocks shared by the four families: RMSNorm, rotary embedding, SwiGLU MLP."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32, cast back before the weight, as the reference implementations do (bf16 parity);
        # on CUDA one kernel for the chain (models/common/kernels.py: within one ulp of it)
        if kernels.enabled(x, self.weight):
            return kernels.rms_norm(x, self.weight, self.eps)
        return kernels.rms_norm_eager(x, self.weight, self.eps)


def rotary_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, linear_factor: float,
                   dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (B or 1, S, head_dim) for the half-rotation ("rotate_half") RoPE layout.

    Computed on the fly (no buffer) so the model holds no tensor that is not in the checkpoint.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float, device=positions.device) / head_dim))
    freqs = (positions.float() / linear_factor)[..., None] * inv_freq  # (B, S, head_dim/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (B, S, head_dim)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """q: (B, nh, S, hd), k: (B, nkv, S, hd), cos/sin: (B, S, hd)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


class SwiGLUMLP(nn.Module):
    """down(silu(gate(x)) * up(x)); the three linears carry the checkpoint's names.

    `names` = (gate, up, down): ('gate_proj', 'up_proj', 'down_proj') for OLMoE/Qwen2-MoE/DeepSeek and dense
    layers, ('w1', 'w3', 'w2') for Mixtral experts.
    """

    def __init__(self, hidden: int, intermediate: int,
                 names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")) -> None:
        super().__init__()
        self.names = names
        gate, up, down = names
        setattr(self, gate, nn.Linear(hidden, intermediate, bias=False))
        setattr(self, up, nn.Linear(hidden, intermediate, bias=False))
        setattr(self, down, nn.Linear(intermediate, hidden, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up, down = (getattr(self, n) for n in self.names)
        return down(F.silu(gate(x)) * up(x))
