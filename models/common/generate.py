"""Greedy and sampled decoding with a KV cache, so a quantized model's output can be read without transformers.

    ids = tokenizer("def fib(n):", return_tensors="pt").input_ids          # (1, S)
    out = model.generate(ids, max_new_tokens=32)                             # greedy, (1, S + 32)
    out = model.generate(ids, max_new_tokens=32, do_sample=True, temperature=0.8, top_p=0.95,
                         generator=torch.Generator().manual_seed(0))
    tokenizer.decode(out[0])

The prompt is run once through every layer; each new token then runs alone, its attention reading
the keys and values cached for the positions before it (rotary already applied, before the
grouped-query repeat), so a step costs one token's work per layer. Attention here is the same
computation as `Attention.forward` (qk-norm, qkv clipping, rotary, GQA, sliding window), written for
queries at positions t0..t0+s-1 over keys 0..t0+s-1; the MoE blocks, MLPs and norms are the model's
own modules. Rows of a batch share one prompt length (no padding).
"""
from __future__ import annotations

import torch

from .layers import rotary_cos_sin


def _attend(attn, x: torch.Tensor, cos, sin, cache: list, t0: int) -> torch.Tensor:
    """Attention of queries at positions t0.. over the cached keys and the new ones; extends `cache`."""
    s = x.shape[1]
    q, k, v = attn.heads(x, cos, sin)
    if cache:
        k, v = torch.cat((cache[0], k), dim=2), torch.cat((cache[1], v), dim=2)   # (B, nkv, T, hd)
    cache[:] = [k, v]
    T = k.shape[2]
    qpos = torch.arange(t0, t0 + s, device=x.device)[:, None]         # (s, 1)
    kpos = torch.arange(T, device=x.device)[None, :]                  # (1, T)
    mask = kpos <= qpos                                               # causal
    if attn.sliding_window:
        mask = mask & (qpos - kpos < attn.sliding_window)
    return attn.attend(q, k, v, mask[None, None])


def _forward(model, ids: torch.Tensor, caches: list[list], t0: int) -> torch.Tensor:
    """Logits of the last position for tokens `ids` (B, s) at positions t0..t0+s-1."""
    cfg = model.config
    h = model.model.embed_tokens(ids)                                 # (B, s, H)
    positions = torch.arange(t0, t0 + ids.shape[1], device=ids.device)[None]
    # (1, s, hd) for the absolute positions of these tokens
    cos, sin = rotary_cos_sin(positions, cfg.head_dim, cfg.rope_theta, cfg.rope_linear_factor, h.dtype)
    for layer, cache in zip(model.model.layers, caches):
        h = h + _attend(layer.self_attn, layer.input_layernorm(h), cos, sin, cache, t0)
        h = h + layer.mlp_block(layer.post_attention_layernorm(h))
    return model.head(h[:, -1:])[:, -1].float()                      # (B, V)


def _pick(logits: torch.Tensor, do_sample: bool, temperature: float, top_k: int | None, top_p: float | None,
          generator) -> torch.Tensor:
    """Next token per row (B,) from last-position logits (B, V)."""
    if not do_sample:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p                       # keep the smallest set reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(logits.device)


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, max_new_tokens: int = 32, *, do_sample: bool = False,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             eos_token_id: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, S + n) token ids: the prompt and up to `max_new_tokens` new tokens (greedy unless do_sample).

    eos_token_id: a row that produced it is filled with it from then on; decoding stops when every row has.
    generator: a CPU torch.Generator for reproducible sampling."""
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if any(p.is_meta for p in model.parameters()):
        raise ValueError("generate needs the model's weights in memory; load it with lazy=False "
                         "(models.from_pretrained(path) or alphaquant.export.load_quantized(path))")
    if do_sample and not temperature > 0:
        raise ValueError(f"temperature must be > 0 when sampling; got {temperature}")
    device = model.model.embed_tokens.weight.device
    ids = input_ids.to(device)
    caches: list[list] = [[] for _ in model.model.layers]
    logits = _forward(model, ids, caches, 0)
    out, done = [ids], torch.zeros(ids.shape[0], dtype=torch.bool, device=device)
    t = ids.shape[1]
    for step in range(max_new_tokens):
        nxt = _pick(logits, do_sample, temperature, top_k, top_p, generator)
        if eos_token_id is not None:
            nxt = torch.where(done, torch.full_like(nxt, eos_token_id), nxt)
            done = done | (nxt == eos_token_id)
        out.append(nxt[:, None])
        if (eos_token_id is not None and bool(done.all())) or step == max_new_tokens - 1:
            break
        logits = _forward(model, nxt[:, None], caches, t)
        t += 1
    return torch.cat(out, dim=1)
