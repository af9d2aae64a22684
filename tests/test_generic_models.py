"""The generic path (transformers' own modeling classes) on tiny random models: structure and fp forward.

Models are built with `transformers.AutoConfig.for_model(...)` + `AutoModelForCausalLM.from_config` and saved
with transformers' own `save_pretrained` (no network); transformers' own full forward is the reference.
Helpers here (`make_hf_checkpoint`, `HF_MODELS`) are imported by the other test_generic_* files.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from alphaquant import models
from alphaquant import arch

_BASE = dict(vocab_size=320, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=256, tie_word_embeddings=False, eos_token_id=0, bos_token_id=None,
             pad_token_id=None)

HF_MODELS = {
    "qwen3_moe": dict(head_dim=16, intermediate_size=96, moe_intermediate_size=32, num_experts=8,
                      num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[]),
    "deepseek_v3": dict(num_hidden_layers=3, num_key_value_heads=4, intermediate_size=96, moe_intermediate_size=32,
                        n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1, first_k_dense_replace=1,
                        q_lora_rank=32, kv_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=16,
                        n_shared_experts=1, routed_scaling_factor=2.5, norm_topk_prob=True),
    "llama": dict(intermediate_size=96),
    "gpt_oss": dict(head_dim=16, intermediate_size=32, num_local_experts=4, num_experts_per_tok=2, sliding_window=8,
                    layer_types=["sliding_attention", "full_attention"]),
}
KIND = {"qwen3_moe": "generic_moe", "deepseek_v3": "generic_moe", "llama": "standard", "gpt_oss": "generic_moe"}


def make_hf_checkpoint(model_type: str, directory: Path, seed: int = 0, tokenizer: bool = True, **overrides) -> Path:
    """A random tiny transformers model of `model_type`, saved by transformers (+ a byte-level tokenizer).
    Routers get non-zero biases where they have them (DeepSeek-V3's e_score_correction_bias), so routing
    depends on them; weights are scaled up a little so routing is not near-uniform."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(model_type, **{**_BASE, **HF_MODELS.get(model_type, {}), **overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.08)
            elif "bias" in name:
                p.normal_(0, 0.05)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(0, 0.1)
    model.save_pretrained(directory)
    if tokenizer:
        import tiny
        tiny.write_tokenizer(directory, tiny.corpus_text(40_000), cfg.vocab_size)
    return Path(directory)


# Tiny stand-ins for the shipped generic-path configs (configs/<stem>.yaml), with shapes their recipes'
# group sizes divide (int4/g128 on every linear but the experts'): used by test_cli's dry runs
SHIPPED = {
    "qwen3_moe": dict(hidden_size=128, head_dim=32, intermediate_size=128, moe_intermediate_size=64),
    "deepseek_v3": dict(hidden_size=128, intermediate_size=128, moe_intermediate_size=64, q_lora_rank=128,
                        kv_lora_rank=128, qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=32),
    "llama": dict(hidden_size=128, intermediate_size=128),
}


def tiny_for_shipped_config(stem: str, directory: Path) -> Path | None:
    """A tiny transformers checkpoint for configs/<stem>.yaml of the generic path, else None."""
    if stem not in SHIPPED:
        return None
    return make_hf_checkpoint(stem, directory, **SHIPPED[stem])


def hf_reference(directory: Path):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {t: make_hf_checkpoint(t, root / t, tokenizer=False) for t in HF_MODELS}


@pytest.mark.parametrize("model_type", list(HF_MODELS))
def test_detect_kind(model_type, hf_dirs):
    assert arch.detect(hf_dirs[model_type]) == KIND[model_type]
    from transformers import AutoConfig
    assert arch.detect(AutoConfig.from_pretrained(hf_dirs[model_type])) == KIND[model_type]


def test_detect_refusals_and_local_families():
    from transformers import AutoConfig
    for cfg, why in [(AutoConfig.for_model("t5"), "encoder-decoder"), (AutoConfig.for_model("bert"), "causal"),
                     ({"model_type": "no_such_arch_xyz"}, "no_such_arch_xyz")]:
        with pytest.raises(models.UnsupportedModelError, match=why):
            arch.detect(cfg)
    assert arch.detect({"model_type": "olmoe"}) == "olmoe"
    assert arch.detect(AutoConfig.for_model("olmoe", num_hidden_layers=1, hidden_size=32, intermediate_size=16,
                                            num_attention_heads=2, num_experts=4), implementation="transformers") \
        == "generic_moe"
    assert arch.detect(AutoConfig.for_model("mixtral", num_hidden_layers=1, hidden_size=32, intermediate_size=16,
                                            num_attention_heads=2, num_key_value_heads=2, num_local_experts=4),
                       implementation="transformers") == "generic_moe"


@pytest.mark.parametrize("model_type", list(HF_MODELS))
def test_layer_walk_reproduces_transformers_logits(model_type, hf_dirs):
    """Lazy load, one layer at a time (installed, run, unloaded), against transformers' full load + forward."""
    from alphaquant.models import hf_backend
    d = hf_dirs[model_type]
    model = hf_backend.from_pretrained(d, dtype="float32", lazy=True)
    adapter = arch.get_adapter(model)
    ids = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hidden = adapter.embed_fn(model)(ids)
        kw_fn = adapter.layer_kwargs_fn(model)
        for i in range(adapter.num_layers(model)):
            assert all(p.is_meta for p in model.model.layers[i].parameters())
            layer = adapter.install_layer(model, i, adapter.read_layer(model, i))
            hidden = layer(hidden, **kw_fn(hidden))
            adapter.unload_layer(model, i)
        ours = adapter.head_module(model)(hidden)
        ref = hf_reference(d)(ids).logits
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("model_type", list(HF_MODELS))
def test_groups_cover_every_linear_once(model_type, hf_dirs):
    """True-sequential groups: every linear of a layer but routers/shared gates exactly once, attention first,
    an expert's down after its gate/up."""
    from alphaquant.models import hf_backend
    model = hf_backend.skeleton(hf_dirs[model_type], "float32")
    adapter = arch.get_adapter(model)
    for layer in model.model.layers:
        groups = adapter.sequential_groups(layer)
        flat = [n for g in groups for n in g]
        kept = {n for b in adapter.moe_blocks(layer) for n in (b.gate_name, b.shared_gate) if n}
        linears = [n for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)]
        assert sorted(flat) == sorted(set(linears) - kept)
        level = {n: g for g, names in enumerate(groups) for n in names}
        assert all("attn" in n for n in groups[0])
        for n in flat:
            if n.endswith("down_proj"):
                up = n.rsplit(".", 1)[0] + ".up_proj"
                assert level[up] < level[n]


def test_deepseek_v3_mla_groups(hf_dirs):
    from alphaquant.models import hf_backend
    model = hf_backend.skeleton(hf_dirs["deepseek_v3"], "float32")
    groups = arch.get_adapter(model).sequential_groups(model.model.layers[1])
    a = "self_attn."
    assert groups[:3] == [[a + "q_a_proj", a + "kv_a_proj_with_mqa"], [a + "q_b_proj", a + "kv_b_proj"], [a + "o_proj"]]
    assert "mlp.shared_experts.gate_proj" in groups[3] and "mlp.experts.7.up_proj" in groups[3]
    assert "mlp.shared_experts.down_proj" in groups[4] and "mlp.experts.0.down_proj" in groups[4]


def test_more_architectures_walk_like_transformers(tmp_path):
    """Architectures with nothing of their own in AlphaQuant: Gemma (scaled embedding with a computed
    buffer), PhiMoE (router subclassing nn.Linear, returning a tuple), Qwen3-Next (hybrid linear attention,
    sigmoid-gated shared expert), GLM-4-MoE (partial rotary, grouped sigmoid routing)."""
    from alphaquant.models import hf_backend
    extra = {
        "gemma": dict(head_dim=16, intermediate_size=96),
        "phimoe": dict(intermediate_size=96, num_local_experts=4, num_experts_per_tok=2),
        "qwen3_next": dict(head_dim=16, intermediate_size=96, moe_intermediate_size=32,
                           shared_expert_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
                           layer_types=["linear_attention", "full_attention"], linear_num_value_heads=4,
                           linear_num_key_heads=2, linear_key_head_dim=16, linear_value_head_dim=16),
        "glm4_moe": dict(head_dim=16, intermediate_size=96, moe_intermediate_size=32, n_routed_experts=8,
                         num_experts_per_tok=2, n_group=1, topk_group=1, first_k_dense_replace=1,
                         n_shared_experts=1, partial_rotary_factor=0.5),
    }
    ids = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(0))
    for mt, kw in extra.items():
        d = make_hf_checkpoint(mt, tmp_path / mt, tokenizer=False, **kw)
        model = hf_backend.from_pretrained(d, dtype="float32", lazy=False)
        adapter = arch.get_adapter(model)
        with torch.no_grad():
            torch.testing.assert_close(model(ids), hf_reference(d)(ids).logits, rtol=1e-4, atol=1e-5)
        layer = model.model.layers[-1]
        blocks = adapter.moe_blocks(layer)
        assert (adapter.family == "standard") == (not blocks), mt
        flat = [n for g in adapter.sequential_groups(layer) for n in g]
        kept = {n for b in blocks for n in (b.gate_name, b.shared_gate) if n}
        assert not kept & set(flat)
        if mt == "qwen3_next":
            assert blocks[0].shared_gate == "mlp.shared_expert_gate" and blocks[0].shared_expert == "mlp.shared_expert"
        if mt == "phimoe":
            assert blocks[0].gate_name == "mlp.router"


def test_refusals_name_the_reason(tmp_path):
    from transformers import AutoConfig
    from alphaquant.models import hf_backend
    with pytest.raises(models.UnsupportedModelError, match="embedding_multiplier"):
        hf_backend.build_meta(AutoConfig.for_model("granitemoe", embedding_multiplier=12.0), torch.float32)
    with pytest.raises(models.UnsupportedModelError, match="final_logit_softcapping"):
        hf_backend.build_meta(AutoConfig.for_model("gemma2"), torch.float32)
    cfg = AutoConfig.for_model("llama", quantization_config={"quant_method": "fp8"})
    with pytest.raises(models.UnsupportedModelError, match="already quantized"):
        hf_backend.build_meta(cfg, torch.float32)
    with pytest.raises(models.UnsupportedModelError, match="layout"):
        arch.detect({"model_type": "gpt2", "n_layer": 1})


def test_renumbered_key_plans_equal_transformers_conversion(tmp_path):
    """Layers past the second of a structure get their checkpoint key plan by renumbering; it must equal what
    transformers' inverse conversion gives for that layer (Mixtral: renamed block + w1/w3/w2 merged)."""
    from alphaquant.models import hf_backend
    from alphaquant.models.hf_keys import layer_plan
    import tiny
    d = tiny.make_checkpoint("mixtral", tmp_path / "mixtral", num_hidden_layers=4)
    model = hf_backend.skeleton(d, "float32")
    for i in range(4):
        got = model.key_plan(i)
        tensors, fused, _ = model._hf_tensors(f"model.layers.{i}.", i)
        want = layer_plan(model.hf, tensors, fused)
        assert got.plain == want.plain and got.shapes == want.shapes
        assert {k: [(c, r.tolist()) for c, r in v] for k, v in got.fused.items()} == \
            {k: [(c, r.tolist()) for c, r in v] for k, v in want.fused.items()}
    assert model._renumbers and all(model._renumbers.values())
    assert "model.layers.3.block_sparse_moe.experts.2.w3.weight" in {c for c, _ in got.fused[
        "model.layers.3.mlp.experts.gate_up_proj"]}


@pytest.mark.parametrize("model_type", list(HF_MODELS))
def test_bf16_walk_equals_transformers_eager_experts_bitwise(model_type, hf_dirs):
    """In bf16 our split experts give transformers' eager experts bit for bit: same bias-add rounding
    (GPT-OSS), the fp32 tensors transformers keeps (DeepSeek-V3's router and correction bias), the same
    per-expert accumulation order. (transformers' grouped_mm sums the top-k in fp32 and differs from its own
    eager forward by a few bf16 steps.)"""
    from transformers import AutoModelForCausalLM
    from alphaquant.models import hf_backend
    d = hf_dirs[model_type]
    model = hf_backend.from_pretrained(d, dtype="bfloat16", lazy=True)
    for i in range(len(model.model.layers)):
        model.install_layer(i, model.read_layer(i))
    ref = AutoModelForCausalLM.from_pretrained(d, dtype=torch.bfloat16, experts_implementation="eager").eval()
    ids = torch.randint(0, 320, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(ids), ref(ids).logits)
    kept = {n: p.dtype for n, p in ref.named_parameters() if p.dtype != torch.bfloat16}
    ours = dict(model.named_parameters())
    assert all(ours[n].dtype == dt for n, dt in kept.items() if n in ours)
