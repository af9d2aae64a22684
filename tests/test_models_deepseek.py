"""DeepSeek-MoE v1 (not in transformers) against a slow reference written here from the architecture's
definition (hub repo deepseek-ai/deepseek-moe-16b-base, modeling_deepseek.py):

  layer i is MoE iff i >= first_k_dense_replace and i % moe_layer_freq == 0, else a dense SwiGLU MLP;
  MoE: s = softmax(x W_gate^T); top-k of s; renormalise by (sum + 1e-20) if norm_topk_prob;
       y = sum_k s_k * expert_k(x) + shared_experts(x)   (one MLP of width moe_intermediate * n_shared)
  attention: Llama (RoPE rotate-half, causal), RMSNorm pre-norm residual blocks.
"""

import math

import torch
import torch.nn.functional as F

from alphaquant import models

CONFIG = dict(model_type="deepseek", vocab_size=128, hidden_size=48, intermediate_size=64,
              moe_intermediate_size=16, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
              n_shared_experts=2, n_routed_experts=8, num_experts_per_tok=2, first_k_dense_replace=1,
              moe_layer_freq=2, norm_topk_prob=True, scoring_func="softmax", rms_norm_eps=1e-6,
              rope_theta=10000.0, attention_bias=False, tie_word_embeddings=False, initializer_range=0.2)


def rms(x, w, eps=1e-6):
    return w * (x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps))


def mlp(sd, p, x):
    return F.silu(x @ sd[p + "gate_proj.weight"].T) * (x @ sd[p + "up_proj.weight"].T) @ sd[p + "down_proj.weight"].T


def attention(sd, p, x, cfg):
    S, H = x.shape
    nh = cfg["num_attention_heads"]
    hd = H // nh
    q, k, v = (x @ sd[f"{p}{n}_proj.weight"].T for n in "qkv")
    # RoPE: rotate pairs (i, i + hd/2) by angle pos * theta^(-2i/hd)
    pos = torch.arange(S, dtype=torch.float32)[:, None]
    ang = pos * cfg["rope_theta"] ** (-torch.arange(0, hd, 2, dtype=torch.float32) / hd)  # (S, hd/2)
    out = torch.zeros(S, H)
    for h in range(nh):
        sl = slice(h * hd, (h + 1) * hd)
        qh, kh, vh = q[:, sl], k[:, sl], v[:, sl]

        def rot(t):
            a, b = t[:, : hd // 2], t[:, hd // 2:]
            return torch.cat([a * ang.cos() - b * ang.sin(), b * ang.cos() + a * ang.sin()], -1)

        scores = rot(qh) @ rot(kh).T / math.sqrt(hd)
        scores = scores.masked_fill(torch.ones(S, S).triu(1).bool(), float("-inf"))
        out[:, sl] = scores.softmax(-1) @ vh
    return out @ sd[p + "o_proj.weight"].T


def moe(sd, p, x, cfg):
    probs = (x @ sd[p + "gate.weight"].T).softmax(-1)  # (S, E)
    y = mlp(sd, p + "shared_experts.", x)
    for t in range(x.shape[0]):
        w, idx = probs[t].topk(cfg["num_experts_per_tok"])
        if cfg["norm_topk_prob"]:
            w = w / (w.sum() + 1e-20)
        for wk, e in zip(w, idx.tolist()):
            y[t] += wk * mlp(sd, f"{p}experts.{e}.", x[t:t + 1])[0]
    return y


def reference_logits(sd, ids, cfg):
    x = sd["model.embed_tokens.weight"][ids]  # (S, H)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        x = x + attention(sd, p + "self_attn.", rms(x, sd[p + "input_layernorm.weight"]), cfg)
        h = rms(x, sd[p + "post_attention_layernorm.weight"])
        is_moe = i >= cfg["first_k_dense_replace"] and i % cfg["moe_layer_freq"] == 0
        x = x + (moe(sd, p + "mlp.", h, cfg) if is_moe else mlp(sd, p + "mlp.", h))
    return rms(x, sd["model.norm.weight"]) @ sd["lm_head.weight"].T


def test_structure_follows_config():
    model = models.from_config(CONFIG, seed=0)
    layers = model.model.layers
    assert [isinstance(layer.mlp, models.SparseMoeBlock) for layer in layers] == [False, False, True, False]
    sd = model.state_dict()
    assert sd["model.layers.0.mlp.gate_proj.weight"].shape == (64, 48)  # dense layer: intermediate_size
    assert sd["model.layers.2.mlp.shared_experts.up_proj.weight"].shape == (32, 48)  # 2 shared * 16
    assert sd["model.layers.2.mlp.experts.7.down_proj.weight"].shape == (48, 16)
    assert sd["model.layers.2.mlp.gate.weight"].shape == (8, 48)


def test_logits_match_reference():
    cfg = dict(CONFIG, moe_layer_freq=1)  # every layer after the first is MoE
    model = models.from_config(cfg, seed=0)
    sd = {k: v.float() for k, v in model.state_dict().items()}
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = model(ids)
        for b in range(2):
            torch.testing.assert_close(got[b], reference_logits(sd, ids[b], cfg), rtol=1e-4, atol=1e-4)
    assert got.std() > 0.1


def test_padding_does_not_change_real_tokens():
    model = models.from_config(CONFIG, seed=0)
    ids = torch.randint(1, 128, (1, 7), generator=torch.Generator().manual_seed(2))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], 1)
    mask = torch.cat([torch.zeros(1, 3), torch.ones(1, 7)], 1).long()
    with torch.no_grad():
        # right padding keeps positions, so real tokens must be unchanged bit for bit up to float noise
        right = model(torch.cat([ids, torch.zeros(1, 3, dtype=torch.long)], 1),
                      torch.cat([torch.ones(1, 7), torch.zeros(1, 3)], 1).long())
        plain = model(ids)
        left = model(padded, mask)
    torch.testing.assert_close(right[:, :7], plain, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(left).all()  # padded query rows attend to themselves, never NaN
