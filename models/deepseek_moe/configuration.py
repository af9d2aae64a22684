"""DeepSeek-MoE v1 (deepseek-ai/deepseek-moe-16b-*, config.json model_type 'deepseek'; not in transformers).

Architecture (from the hub repo's modeling_deepseek.py): Llama attention; layer i is MoE iff
n_routed_experts is set, i >= first_k_dense_replace and i % moe_layer_freq == 0, else a dense SwiGLU MLP of
intermediate_size. The MoE block: gate -> softmax -> top-k (renormalised with +1e-20 if norm_topk_prob and
k > 1) over fine-grained routed experts of moe_intermediate_size, plus `shared_experts`: ONE SwiGLU MLP of
width moe_intermediate_size * n_shared_experts, added unweighted.
"""

from __future__ import annotations

from ..common.config import ModelConfigError, MoEModelConfig, trunk_fields


class DeepseekMoeConfig(MoEModelConfig):
    model_type = "deepseek"
    family = "deepseek_moe"

    @classmethod
    def _fields_from_hf(cls, d):
        if d.get("scoring_func", "softmax") != "softmax":
            raise ModelConfigError(f"scoring_func={d['scoring_func']!r} is not supported; DeepSeek-MoE v1 uses 'softmax'.")
        trunk = trunk_fields(d, eps=1e-6, theta=10000.0)
        n = trunk["num_hidden_layers"]
        routed = d.get("n_routed_experts")
        first_dense, freq = d.get("first_k_dense_replace", 0), d.get("moe_layer_freq", 1)
        top_k = d.get("num_experts_per_tok", 6)
        shared = d.get("n_shared_experts")
        bias = bool(d.get("attention_bias", False))
        return dict(
            trunk,
            qkv_bias=bias, o_bias=bias,
            num_experts=routed or 0, top_k=top_k,
            moe_intermediate_size=d.get("moe_intermediate_size", 1408),
            norm_topk_prob=bool(d.get("norm_topk_prob", False)) and top_k > 1, norm_eps=1e-20,
            intermediate_size=d["intermediate_size"],
            moe_layers=[routed is not None and i >= first_dense and i % freq == 0 for i in range(n)],
            shared_attr="shared_experts" if shared else None,
            shared_intermediate_size=(d.get("moe_intermediate_size", 1408) * shared) if shared else 0,
        )
