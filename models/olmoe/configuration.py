"""OLMoE (allenai/OLMoE-1B-7B-*): every layer MoE, softmax -> top-k (norm_topk_prob optional), q/k RMSNorm."""

from __future__ import annotations

from ..common.config import MoEModelConfig, trunk_fields


class OlmoeConfig(MoEModelConfig):
    model_type = "olmoe"
    family = "olmoe"

    @classmethod
    def _fields_from_hf(cls, d):
        bias = bool(d.get("attention_bias", False))
        return dict(
            trunk_fields(d, eps=1e-5, theta=10000.0),
            qkv_bias=bias, o_bias=bias, qk_norm=True, clip_qkv=d.get("clip_qkv"),
            num_experts=d.get("num_experts", 64), top_k=d.get("num_experts_per_tok", 8),
            moe_intermediate_size=d["intermediate_size"],  # OLMoE's intermediate_size is the expert width
            norm_topk_prob=bool(d.get("norm_topk_prob", False)),
        )
