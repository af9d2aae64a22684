"""Causal self-attention with the options the four families need, and the shared attention mask."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from .config import MoEModelConfig
from .layers import RMSNorm, apply_rotary


# SDPA on CUDA without the cuDNN backend, which PyTorch prefers on Hopper: cuDNN builds an execution plan
# the first time it sees a shape (1.4 s of the first decoder layer on an H100, for calibration batches,
# again for evaluation batches); flash and memory-efficient attention need no such set-up.
CUDA_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def causal_mask(attention_mask: torch.Tensor | None, batch: int, seq: int, device) -> torch.Tensor | None:
    """Boolean (B, 1, S, S) mask, True where query i may attend key j: j <= i and key j is not padding.

    None when there is no padding (attention_mask None): attention is then plain causal, which
    SDPA runs with is_causal=True on its fused kernels (an explicit mask forces a slower path).

    A query row with no allowed key (a left-padding position) is allowed its own position, so padded rows stay
    finite (no NaN from an all-masked softmax) and cannot leak into real tokens; their outputs are meaningless
    and callers ignore them (calibration should drop them using the attention mask).
    """
    if attention_mask is None:
        return None
    mask = _causal(seq, device).expand(batch, 1, seq, seq) & attention_mask.bool()[:, None, None, :]
    return mask | (torch.eye(seq, dtype=torch.bool, device=device) & ~mask.any(-1, keepdim=True))


def _causal(seq: int, device) -> torch.Tensor:
    idx = torch.arange(seq, device=device)
    return (idx[None, :] <= idx[:, None])[None, None]  # (1, 1, S, S)


class Attention(nn.Module):
    def __init__(self, cfg: MoEModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        q_out, kv_out = self.n_heads * self.head_dim, self.n_kv * self.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, q_out, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, kv_out, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, kv_out, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(q_out, cfg.hidden_size, bias=cfg.o_bias)
        if cfg.qk_norm:  # OLMoE: normalise the whole projection, before the head split
            self.q_norm = RMSNorm(q_out, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(kv_out, cfg.rms_norm_eps)
        self.clip_qkv = cfg.clip_qkv
        self.sliding_window = cfg.sliding_windows[layer_idx]

    def forward(self, x: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
                attention_mask: torch.Tensor | None) -> torch.Tensor:
        S = x.shape[1]
        q, k, v = self.heads(x, *position_embeddings)
        mask = attention_mask
        if self.sliding_window:  # key j visible from query i only if i - j < window
            idx = torch.arange(S, device=x.device)
            band = (idx[:, None] - idx[None, :]) < self.sliding_window
            mask = (_causal(S, x.device) if mask is None else mask) & band
        return self.attend(q, k, v, mask)

    def heads(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x (B, S, H) -> q (B, nh, S, hd), k and v (B, nkv, S, hd): projected, normed, clipped, rotated.
        Shared with the KV-cache decoding of models/common/generate.py."""
        B, S, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip_qkv is not None:
            q, k, v = (t.clamp(-self.clip_qkv, self.clip_qkv) for t in (q, k, v))
        q = q.view(B, S, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, S, hd)
        k = k.view(B, S, self.n_kv, self.head_dim).transpose(1, 2)  # (B, nkv, S, hd)
        v = v.view(B, S, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, k, cos, sin)
        return q, k, v

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """q (B, nh, s, hd) over k, v (B, nkv, T, hd) -> (B, s, H) after o_proj; mask None = plain causal."""
        rep = self.n_heads // self.n_kv
        if rep > 1:  # grouped-query attention: each kv head serves `rep` query heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        # (B, nh, s, hd); no mask = no padding and no window: plain causal on the fused kernels
        if q.is_cuda:
            with sdpa_kernel(CUDA_SDPA_BACKENDS):
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
        B, _, s, _ = q.shape
        return self.o_proj(out.transpose(1, 2).reshape(B, s, -1))
