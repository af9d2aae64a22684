"""The router hook contract of models/common/moe.py and the arch adapters built on it."""

import torch

from alphaquant import models
from alphaquant import arch
from alphaquant.models.common.moe import SparseMoeBlock, TopKRouter

OLMOE = dict(model_type="olmoe", vocab_size=128, hidden_size=32, intermediate_size=16, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=4, num_experts=8, num_experts_per_tok=2,
             initializer_range=0.2)
QWEN = dict(model_type="qwen2_moe", vocab_size=128, hidden_size=32, intermediate_size=40, moe_intermediate_size=16,
            shared_expert_intermediate_size=24, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
            num_experts=4, num_experts_per_tok=2, mlp_only_layers=[1], initializer_range=0.2)
MIXTRAL = dict(model_type="mixtral", vocab_size=128, hidden_size=32, intermediate_size=24, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)
DEEPSEEK = dict(model_type="deepseek", vocab_size=128, hidden_size=32, intermediate_size=48, moe_intermediate_size=8,
                num_hidden_layers=3, num_attention_heads=4, n_shared_experts=2, n_routed_experts=8,
                num_experts_per_tok=2, first_k_dense_replace=1, moe_layer_freq=1)


def test_mixtral_rule_equals_topk_then_softmax():
    logits = torch.randn(50, 8, generator=torch.Generator().manual_seed(0))
    ids, w = TopKRouter(2, norm_topk_prob=True, weights_in_input_dtype=False)(logits)
    top, top_ids = logits.topk(2, dim=-1)
    assert torch.equal(ids, top_ids)
    torch.testing.assert_close(w, top.softmax(-1))


def test_router_hook_reproduces_block_output():
    # Recompute a block's output from what a hook on `router` (and on each expert) saw: the contract holds.
    model = models.from_config(QWEN, seed=0)
    block = model.model.layers[0].mlp
    seen, expert_inputs = {}, {}
    block.router.register_forward_hook(lambda m, args, out: seen.update(logits=args[0], ids=out[0], w=out[1]))
    block.shared_gate_act.register_forward_hook(lambda m, args, out: seen.update(shared_w=out))
    for e, expert in enumerate(block.experts):
        expert.register_forward_hook(lambda m, args, out, e=e: expert_inputs.update({e: args[0]}))
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = block(x).reshape(10, 32)
        flat = x.reshape(10, 32)
        expect = seen["shared_w"] * block.shared_expert(flat)
        for e, (tok, w) in enumerate(models.expert_token_weights(seen["ids"], seen["w"], 4)):
            if tok.numel():
                assert torch.equal(expert_inputs[e], flat[tok])  # rows in increasing token order
                expect[tok] += w[:, None] * block.experts[e](flat[tok])
    assert seen["ids"].shape == (10, 2) and seen["ids"].dtype == torch.long
    torch.testing.assert_close(seen["w"], torch.softmax(seen["logits"], -1).gather(1, seen["ids"]))
    torch.testing.assert_close(y, expect)


def test_route_all_tokens_keeps_output():
    model = models.from_config(OLMOE, seed=0)
    block = model.model.layers[0].mlp
    x = torch.randn(1, 6, 32)
    with torch.no_grad():
        routed = block(x)
        block.route_all_tokens = True
        sizes = []
        hook = block.experts[0].register_forward_hook(lambda m, a, o: sizes.append(a[0].shape[0]))
        everyone = block(x)
        hook.remove()
    assert sizes == [6]
    torch.testing.assert_close(everyone, routed)


def test_detect_all_families(tmp_path):
    for cfg, family in [(OLMOE, "olmoe"), (QWEN, "qwen2_moe"), (MIXTRAL, "mixtral"), (DEEPSEEK, "deepseek_moe")]:
        model = models.from_config(cfg, seed=0)
        assert arch.detect(model) == arch.detect(model.config) == arch.detect(cfg) == family
    import transformers
    assert arch.detect(transformers.MixtralConfig()) == "mixtral"
    try:
        arch.detect({"model_type": "gpt2"})
    except models.UnsupportedModelError as e:
        assert "gpt2" in str(e) and "olmoe" in str(e)
    else:
        raise AssertionError("gpt2 must be rejected")


def test_sequential_groups_cover_every_quantizable_linear():
    for cfg in (OLMOE, QWEN, MIXTRAL, DEEPSEEK):
        model = models.from_config(cfg, seed=0)
        adapter = arch.get_adapter(model)
        skip = set(adapter.skip_modules(model))
        listed = []
        for i, layer in enumerate(adapter.decoder_layers(model)):
            groups = adapter.sequential_groups(layer)
            assert len(groups) == 4 and groups[0] == ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]
            for name in sum(groups, []):
                assert isinstance(layer.get_submodule(name), torch.nn.Linear)
            listed += [f"model.layers.{i}.{n}" for n in sum(groups, [])]
        all_linears = {n for n, _, _ in adapter.linear_modules(model)}
        assert len(listed) == len(set(listed))
        assert set(listed) | skip == all_linears and not set(listed) & skip


def test_moe_block_info():
    qwen = models.from_config(QWEN, seed=0)
    ad = arch.get_adapter(qwen)
    info, = ad.moe_blocks(qwen.model.layers[0])
    assert (info.router_name, info.gate_name, info.num_experts, info.top_k) == ("mlp.router", "mlp.gate", 4, 2)
    assert info.shared_expert == "mlp.shared_expert" and info.shared_gate == "mlp.shared_expert_gate"
    assert info.shared_gate_act_name == "mlp.shared_gate_act"
    assert ad.moe_blocks(qwen.model.layers[1]) == []  # mlp_only_layers -> dense
    mix = models.from_config(MIXTRAL, seed=0)
    info, = arch.get_adapter(mix).moe_blocks(mix.model.layers[1])
    assert info.expert_linear_names(3) == ["block_sparse_moe.experts.3.w1", "block_sparse_moe.experts.3.w3",
                                           "block_sparse_moe.experts.3.w2"]
    ds = models.from_config(DEEPSEEK, seed=0)
    ad = arch.get_adapter(ds)
    assert ad.moe_blocks(ds.model.layers[0]) == []
    assert ad.moe_blocks(ds.model.layers[1])[0].shared_expert == "mlp.shared_experts"
    assert ad.sequential_groups(ds.model.layers[0])[2] == ["mlp.gate_proj", "mlp.up_proj"]


def _index_add_reference(block, x):
    """The reference implementations' expert loop: out.index_add_(tokens_e, w * y_e) for e = 0, 1, ..."""
    x = x.reshape(-1, x.shape[-1])
    ids, w = block.router(block.gate(x))
    out = torch.zeros_like(x)
    for e, expert in enumerate(block.experts):
        tok, slot = torch.where(ids == e)
        if tok.numel():
            out.index_add_(0, tok, (expert(x[tok]) * w[tok, slot][:, None]).to(out.dtype))
    return out


def test_sorted_combine_equals_index_add_bit_for_bit():
    """ExpertRoute.combine sums each token's contributions in expert order with one rounding per add:
    identical to the index_add_ loop in bf16, fp16 and fp32, with top-1..top-4 and unused experts."""
    for cfg, dtype, k in ((OLMOE, torch.bfloat16, 2), (OLMOE, torch.float16, 4), (MIXTRAL, torch.float32, 2),
                          (MIXTRAL, torch.bfloat16, 1)):
        model = models.from_config({**cfg, "num_experts_per_tok": k}, seed=0).to(dtype)
        block = next(m for m in model.modules() if isinstance(m, SparseMoeBlock))
        x = torch.randn(3, 40, 32, generator=torch.Generator().manual_seed(k)).to(dtype)
        with torch.no_grad():
            got = block(x).reshape(-1, 32)
            ref = _index_add_reference(block, x)
        if block.shared_attr:
            continue
        assert torch.equal(got, ref), (cfg["model_type"], dtype, k)
    # an expert that gets no token is skipped, not an error
    block = models.from_config(OLMOE, seed=0).model.layers[0].mlp
    with torch.no_grad():
        block.gate.weight[3] = -100.0
        x = torch.randn(1, 6, 32, generator=torch.Generator().manual_seed(5))
        assert torch.equal(block(x).reshape(-1, 32), _index_add_reference(block, x))
