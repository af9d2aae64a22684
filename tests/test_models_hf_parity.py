"""Our OLMoE / Mixtral / Qwen2-MoE code against transformers' own implementation of the same checkpoint."""

import pytest
import torch
import transformers

from alphaquant import models

TINY = dict(vocab_size=128, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
            initializer_range=0.2, pad_token_id=0)
CASES = {
    "olmoe": (transformers.OlmoeConfig, transformers.OlmoeForCausalLM,
              dict(intermediate_size=16, num_experts=8, num_experts_per_tok=2, norm_topk_prob=False)),
    "olmoe_norm_topk": (transformers.OlmoeConfig, transformers.OlmoeForCausalLM,
                        dict(intermediate_size=16, num_experts=4, num_experts_per_tok=2, norm_topk_prob=True,
                             clip_qkv=0.5)),
    "mixtral": (transformers.MixtralConfig, transformers.MixtralForCausalLM,
                dict(intermediate_size=24, num_local_experts=4, num_experts_per_tok=2)),
    "mixtral_sliding": (transformers.MixtralConfig, transformers.MixtralForCausalLM,
                        dict(intermediate_size=24, num_local_experts=4, num_experts_per_tok=2, sliding_window=3)),
    "qwen2_moe": (transformers.Qwen2MoeConfig, transformers.Qwen2MoeForCausalLM,
                  dict(intermediate_size=40, moe_intermediate_size=16, shared_expert_intermediate_size=24,
                       num_experts=8, num_experts_per_tok=3, norm_topk_prob=False, decoder_sparse_step=1,
                       mlp_only_layers=[1])),
    "qwen2_moe_step2": (transformers.Qwen2MoeConfig, transformers.Qwen2MoeForCausalLM,
                        dict(intermediate_size=40, moe_intermediate_size=16, shared_expert_intermediate_size=24,
                             num_experts=4, num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=2)),
}


def save_hf_model(case, directory):
    cfg_cls, model_cls, extra = CASES[case]
    torch.manual_seed(0)
    config = cfg_cls(**TINY, **extra)
    config._attn_implementation = "eager"  # the plain reference path, no fused kernels
    ref = model_cls(config).eval()
    ref.save_pretrained(directory)
    return ref


def padded_batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 128, (2, 10), generator=g)
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, :3] = 0  # left padding in row 1
    ids[1, :3] = 0
    return ids, mask


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(case, tmp_path):
    ref = save_hf_model(case, tmp_path)
    ours = models.from_pretrained(tmp_path, dtype="fp32")
    ids, mask = padded_batch()
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=mask).logits
        got = ours(ids, attention_mask=mask)
        got_nomask = ours(ids[:1])
        expected_nomask = ref(input_ids=ids[:1]).logits
    real = mask.bool()  # padded positions carry no meaning in either implementation
    torch.testing.assert_close(got[real], expected[real], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got_nomask, expected_nomask, rtol=1e-4, atol=1e-5)
    assert got.std() > 0.1  # the logits are not trivially small (a real comparison)


def test_hf_writes_per_expert_keys(tmp_path):
    # transformers 5 fuses experts in memory but writes the hub (per-expert) layout; our reader relies on it.
    save_hf_model("mixtral", tmp_path)
    keys = models.CheckpointReader(tmp_path).keys()
    assert "model.layers.0.block_sparse_moe.experts.3.w2.weight" in keys
    assert not any("gate_up_proj" in k for k in keys)
