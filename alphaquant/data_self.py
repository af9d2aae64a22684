"""Expert-balanced self-generated calibration windows (`calibration.dataset: self`).

After MoEQuant's EBSS (Expert-Balanced Self-Sampling, Hu et al. 2025): the model being quantized (full
precision, before any quantization) writes its own calibration windows, steered towards a balanced expert
load so that rarely routed experts still see calibration tokens. MoEQuant runs a beam search whose score
combines a sequence's cumulative log-probability with the standard deviation of its expert-load
distribution. Our simplification decides token by token, one choice per window (no beams):

1. The window starts from a prompt of `calibration.self_prompt_len` tokens: the first tokens of seeded
   random windows of `calibration.self_prompts` (a source of the same kinds as `calibration.dataset`), or,
   when that is unset, one start token (the tokenizer's BOS, else its EOS, else the model config's).
2. At each step the next-token log-probabilities log p = log_softmax(logits / temperature) are perturbed
   with Gumbel noise G (one uniform draw per vocabulary entry from the window's own seeded generator),
   and the `self_candidates` tokens with the highest log p + G are the candidates (Gumbel-top-k: a sample
   without replacement from softmax(logits / temperature)).
3. Each candidate runs through the model at the next position (all candidates of a window in one batch
   over the shared KV cache); its routing gives the experts it would load in every MoE layer.
4. The window takes the candidate maximising  log p + G - balance * overload, where overload is the
   candidate's first-order increase of the load imbalance: the mean over MoE layers and its top-k experts
   of (n_e - mean(n)) / max(mean(n), 1), with n the window's running per-layer expert counts (prompt
   tokens included). It is positive for an over-used expert, negative for an under-used one, and does not
   shrink as the window grows (unlike the change of the standard deviation itself).

With `balance` 0 (or one candidate) step 4 picks argmax(log p + G): exact sampling from
softmax(logits / temperature) (the Gumbel-max trick), so the windows equal plain seeded sampling.
Window i uses its own generator seeded from (calibration.seed, i), so the windows do not depend on how
many are generated at once (`calibration.batch_size` rows per batch).

The whole model must be in memory (model.lazy: false) and generation runs where the model is loaded; only
AlphaQuant's own code for the four local families (olmoe, qwen2_moe, mixtral, deepseek_moe) is supported.

    windows = self_windows(model, num_samples=128, seq_len=256, prompts=torch.zeros(128, 1, dtype=torch.long),
                           seed=0, temperature=1.0, balance=10.0, candidates=8)       # (128, 256) long
"""
from __future__ import annotations

import torch

from alphaquant.errors import ConfigError

__all__ = ["check_model", "gumbel", "moe_routers", "overload", "self_windows", "start_token", "window_generator"]

SEED_STRIDE = 1_000_003      # window i of seed s uses the generator seeded (s * SEED_STRIDE + i) mod 2**63


def window_generator(seed: int, index: int) -> torch.Generator:
    """The CPU generator of window `index` for calibration.seed `seed` (its Gumbel draws)."""
    return torch.Generator().manual_seed((seed * SEED_STRIDE + index) % 2**63)


def moe_routers(model) -> list:
    """The routers of the model's MoE blocks, in layer order (dense layers have none)."""
    return [layer.mlp_block.router for layer in model.model.layers if hasattr(layer.mlp_block, "router")]


def start_token(tokenizer, model_config) -> int:
    """The token a prompt-less window starts from: BOS, else EOS, of the tokenizer, else of the model config."""
    for owner in (tokenizer, model_config):
        for name in ("bos_token_id", "eos_token_id"):
            tid = getattr(owner, name, None) if owner is not None else None
            if isinstance(tid, (list, tuple)):
                tid = tid[0] if tid else None
            if tid is not None:
                return int(tid)
    raise ConfigError("calibration.dataset self needs a start token and neither the tokenizer nor the model config "
                      "has a bos_token_id or eos_token_id; set calibration.self_prompts to a text or token source")


def check_model(model) -> None:
    """ConfigError when `model` cannot generate its own calibration data here (lazy, or not our local code)."""
    from alphaquant.models.common.decoder import MoEForCausalLM

    if not isinstance(model, MoEForCausalLM):
        raise ConfigError("calibration.dataset self is supported for AlphaQuant's own code of the four local families "
                          "(olmoe, qwen2_moe, mixtral, deepseek_moe), not the transformers path; use a text or token "
                          "dataset, or model.implementation: local")
    if getattr(model, "lazy", False) or any(p.is_meta for p in model.parameters()):
        raise ConfigError("calibration.dataset self generates with the whole model in memory; set model.lazy: false")


def overload(counts: torch.Tensor, routed: torch.Tensor) -> torch.Tensor:
    """How much each candidate would raise the expert-load imbalance (the balance penalty, see the module doc).

    counts [B, L, E]: running expert counts per window and MoE layer; routed [B, K, L, k]: the experts of
    candidate j in layer l. Returns [B, K]: the mean over layers and slots of (n_e - mean(n)) / max(mean(n), 1).

    >>> overload(torch.tensor([[[3., 1.]]]), torch.tensor([[[[0]], [[1]]]])).tolist()
    [[0.5, -0.5]]
    """
    mean = counts.mean(-1, keepdim=True)                                     # (B, L, 1)
    rel = (counts - mean) / mean.clamp_min(1.0)                             # (B, L, E)
    B, K, L, k = routed.shape
    idx = routed.permute(0, 2, 1, 3).reshape(B, L, K * k)                   # (B, L, K*k)
    per = rel.gather(-1, idx).reshape(B, L, K, k)                           # (B, L, K, k)
    return per.mean(dim=(1, 3))                                             # (B, K)


class _RouteRecorder:
    """Forward hooks on the routers: the topk_ids [T, k] of every MoE layer for the last forward."""

    def __init__(self, routers: list):
        self.ids: list = [None] * len(routers)
        self.handles = [r.register_forward_hook(self._hook(i)) for i, r in enumerate(routers)]

    def _hook(self, i: int):
        def hook(_module, _inputs, output):
            self.ids[i] = output[0]
        return hook

    def take(self, B: int, S: int) -> torch.Tensor:
        """[B, S, L, k] expert ids of the B x S tokens of the last forward (row-major tokens)."""
        return torch.stack([x.reshape(B, S, -1) for x in self.ids], dim=2)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _candidate_step(model, cand: torch.Tensor, caches: list, t: int):
    """Logits (B, K, V) of K candidate tokens per row, all at position t over the shared cache, and their
    new keys/values per layer [(k, v) of shape (B, nkv, K, hd)]; each candidate sees the cache and itself."""
    from alphaquant.models.common.layers import rotary_cos_sin

    cfg = model.config
    B, K = cand.shape
    h = model.model.embed_tokens(cand)                                      # (B, K, H)
    positions = torch.full((1, K), t, device=cand.device)
    cos, sin = rotary_cos_sin(positions, cfg.head_dim, cfg.rope_theta, cfg.rope_linear_factor, h.dtype)
    new = []
    for layer, cache in zip(model.model.layers, caches):
        attn = layer.self_attn
        q, k, v = attn.heads(layer.input_layernorm(h), cos, sin)           # (B, nh, K, hd), (B, nkv, K, hd)
        T = cache[0].shape[2]
        kpos = torch.arange(T, device=cand.device)
        old = torch.ones(K, T, dtype=torch.bool, device=cand.device)
        if attn.sliding_window:
            old = old & (t - kpos < attn.sliding_window)[None]
        mask = torch.cat((old, torch.eye(K, dtype=torch.bool, device=cand.device)), dim=1)   # (K, T + K)
        h = h + attn.attend(q, torch.cat((cache[0], k), 2), torch.cat((cache[1], v), 2), mask[None, None])
        h = h + layer.mlp_block(layer.post_attention_layernorm(h))
        new.append((k, v))
    return model.head(h).float(), new                                       # (B, K, V)


@torch.no_grad()
def _generate_batch(model, prompts: torch.Tensor, seq_len: int, gens: list, temperature: float, balance: float,
                    candidates: int) -> torch.Tensor:
    """[B, seq_len] windows continuing prompts [B, P], row b drawing its noise from gens[b]."""
    from alphaquant.models.common.generate import _forward

    device = model.model.embed_tokens.weight.device
    routers = moe_routers(model)
    rec = _RouteRecorder(routers)
    try:
        ids = prompts.to(device)
        B, P = ids.shape
        rows = torch.arange(B, device=device)
        caches: list[list] = [[] for _ in model.model.layers]
        logits = _forward(model, ids, caches, 0)                            # (B, V) of the last prompt position
        L = len(routers)
        E = max((layer.mlp_block.num_experts for layer in model.model.layers if hasattr(layer.mlp_block, "router")),
                default=1)
        counts = torch.zeros(B, L, E, device=device)                        # running expert counts per window
        if routers:
            prompt_ids = rec.take(B, P).permute(0, 2, 1, 3).reshape(B, L, -1)   # (B, L, P*k)
            counts.scatter_add_(-1, prompt_ids, torch.ones_like(prompt_ids, dtype=counts.dtype))
        V = logits.shape[-1]
        # balance 0 (or no MoE layer) picks the top candidate whatever the others are: only it runs
        K = 1 if balance == 0 or not routers else min(candidates, V)
        out = [ids]
        for t in range(P, seq_len):
            logp = torch.log_softmax(logits / temperature, dim=-1)           # (B, V)
            u = torch.stack([torch.rand(V, generator=g) for g in gens]).to(device)
            score, cand = torch.topk(logp + gumbel(u), K, dim=-1)           # (B, K): Gumbel-top-K candidates
            if K == 1 and t == seq_len - 1:                                  # the last token needs no forward
                out.append(cand)
                break
            step_logits, new = _candidate_step(model, cand, caches, t)       # (B, K, V)
            routed = rec.take(B, K) if routers else None                     # (B, K, L, k)
            pick = (score - balance * overload(counts, routed)).argmax(-1) if K > 1 else \
                torch.zeros(B, dtype=torch.long, device=device)
            out.append(cand.gather(1, pick[:, None]))                        # (B, 1)
            if t == seq_len - 1:
                break
            logits = step_logits[rows, pick]
            for cache, (k, v) in zip(caches, new):                           # the picked candidate's keys/values
                sel = pick[:, None, None, None].expand(-1, k.shape[1], 1, k.shape[3])
                cache[0] = torch.cat((cache[0], k.gather(2, sel)), 2)
                cache[1] = torch.cat((cache[1], v.gather(2, sel)), 2)
            if routers:
                chosen = routed[rows, pick]                                  # (B, L, k)
                counts.scatter_add_(-1, chosen, torch.ones_like(chosen, dtype=counts.dtype))
        return torch.cat(out, dim=1).cpu()
    finally:
        rec.remove()


def gumbel(u: torch.Tensor) -> torch.Tensor:
    """Standard Gumbel noise -log(-log(u)) of uniforms u in [0, 1) (clamped away from 0 and 1)."""
    return -torch.log(-torch.log(u.clamp(1e-20, 1.0 - 1e-7)))


def self_windows(model, num_samples: int, seq_len: int, prompts: torch.Tensor, *, seed: int = 0,
                 temperature: float = 1.0, balance: float = 10.0, candidates: int = 8,
                 batch_size: int = 16) -> torch.Tensor:
    """[num_samples, seq_len] long windows the model writes itself, each continuing its prompt row.

    prompts [num_samples, P] (P < seq_len) are the windows' first tokens. `batch_size` windows are generated
    at once; the result does not depend on it (each window has its own generator, `window_generator`)."""
    check_model(model)
    if prompts.dim() != 2 or prompts.shape[0] != num_samples:
        raise ValueError(f"prompts must be [num_samples={num_samples}, P]; got {tuple(prompts.shape)}")
    if prompts.shape[1] >= seq_len:
        raise ConfigError(f"calibration.self_prompt_len ({prompts.shape[1]}) must be smaller than "
                          f"calibration.seq_len ({seq_len})")
    was_training = model.training
    model.eval()
    try:
        rows = []
        for i in range(0, num_samples, batch_size):
            gens = [window_generator(seed, j) for j in range(i, min(i + batch_size, num_samples))]
            rows.append(_generate_batch(model, prompts[i:i + len(gens)], seq_len, gens, temperature, balance,
                                        candidates))
        return torch.cat(rows).long()
    finally:
        model.train(was_training)
