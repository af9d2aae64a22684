"""Mixtral: every layer MoE ('block_sparse_moe', experts w1/w3/w2), top-k then softmax over the k, GQA,
optional sliding window. top-k-then-softmax == softmax -> top-k -> renormalise, so norm_topk_prob=True."""

from __future__ import annotations

from ..common.config import MoEModelConfig, trunk_fields


class MixtralConfig(MoEModelConfig):
    model_type = "mixtral"
    family = "mixtral"

    @classmethod
    def _fields_from_hf(cls, d):
        trunk = trunk_fields(d, eps=1e-5, theta=1e6)
        return dict(
            trunk,
            sliding_windows=[d.get("sliding_window")] * trunk["num_hidden_layers"],
            moe_attr="block_sparse_moe", proj_names=("w1", "w3", "w2"),
            num_experts=d.get("num_local_experts", 8), top_k=d.get("num_experts_per_tok", 2),
            moe_intermediate_size=d["intermediate_size"],
            norm_topk_prob=True,
            weights_in_input_dtype=False,  # transformers multiplies by the fp32 weights, then casts
        )
