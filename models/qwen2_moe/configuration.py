"""Qwen2-MoE / Qwen1.5-MoE: qkv bias, a sigmoid-gated shared expert, dense layers via decoder_sparse_step and
mlp_only_layers, optional sliding window on the lower layers."""

from __future__ import annotations

from ..common.config import MoEModelConfig, trunk_fields


class Qwen2MoeConfig(MoEModelConfig):
    model_type = "qwen2_moe"
    family = "qwen2_moe"

    @classmethod
    def _fields_from_hf(cls, d):
        trunk = trunk_fields(d, eps=1e-6, theta=10000.0)
        n = trunk["num_hidden_layers"]
        num_experts, step = d.get("num_experts", 60), d.get("decoder_sparse_step", 1)
        only_dense = set(d.get("mlp_only_layers") or [])
        moe_layers = [i not in only_dense and num_experts > 0 and (i + 1) % step == 0 for i in range(n)]
        return dict(
            trunk,
            qkv_bias=bool(d.get("qkv_bias", True)),  # Qwen1.5-MoE configs predate the key; they have biases
            sliding_windows=_sliding_windows(d, n),
            num_experts=num_experts, top_k=d.get("num_experts_per_tok", 4),
            moe_intermediate_size=d.get("moe_intermediate_size", 1408),
            norm_topk_prob=bool(d.get("norm_topk_prob", False)),
            intermediate_size=d.get("intermediate_size", 5632),
            moe_layers=moe_layers,
            shared_attr="shared_expert", shared_gate=True,
            shared_intermediate_size=d.get("shared_expert_intermediate_size", 5632),
        )


def _sliding_windows(d, n):
    # Same rule as transformers' Qwen2MoeConfig: explicit layer_types win; otherwise, with use_sliding_window,
    # even-indexed layers below max_window_layers slide.
    if not d.get("use_sliding_window"):
        return [None] * n
    window = d.get("sliding_window")
    types = d.get("layer_types") or [
        "sliding_attention" if (i + 1) % 2 and i < d.get("max_window_layers", 28) else "full_attention"
        for i in range(n)]
    return [window if t == "sliding_attention" else None for t in types]
