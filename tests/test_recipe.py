"""Recipe resolution: rule order, field-wise overrides, checks, plan printout, size estimates."""
from __future__ import annotations

from pathlib import Path

import pytest

from alphaquant.config.run import load_config
from alphaquant.errors import ConfigError
from alphaquant.config.quant import QuantConfig, QuantOverride, QuantRule
from alphaquant.config.recipe import (QuantSpec, build_format, estimate_memory, format_counts, plan_table, render_plan,
                               resolve_recipe, weight_bytes)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def fake_moe(layers=2, experts=2, hidden=256, inter=128):
    """(name, in_features, out_features) of a small OLMoE-style model."""
    mods = []
    for n in range(layers):
        p = f"model.layers.{n}"
        mods += [(f"{p}.self_attn.{x}_proj", hidden, hidden) for x in "qkvo"]
        mods.append((f"{p}.mlp.gate", hidden, experts))
        for e in range(experts):
            mods += [(f"{p}.mlp.experts.{e}.gate_proj", hidden, inter), (f"{p}.mlp.experts.{e}.up_proj", hidden, inter),
                     (f"{p}.mlp.experts.{e}.down_proj", inter, hidden)]
    return mods + [("lm_head", hidden, 1000)]


def quant(*overrides, nonstandard_blocks=False, **default) -> QuantConfig:
    return QuantConfig(default=QuantRule(**default), overrides=[QuantOverride(**o) for o in overrides],
                       nonstandard_blocks=nonstandard_blocks)


def test_later_rules_win_field_by_field():
    q = quant({"pattern": "*.mlp.experts.*", "wq": "mxfp4/32"},
              {"pattern": "*.down_proj", "group_size": 64},       # keeps mxfp4 from the rule before
              {"pattern": "model.layers.1.*", "sym": False},      # touches attention and experts alike
              {"pattern": "*.mlp.gate", "skip": True},
              {"pattern": "lm_head", "wq": "int8", "group_size": -1, "aq": "fp8_e4m3"},
              nonstandard_blocks=True)                            # mxfp4/64: alphaquant-packed, asked for
    specs = resolve_recipe(q, fake_moe())
    o = [f"quant.overrides[{i}] ('{p}')" for i, p in enumerate(
        ["*.mlp.experts.*", "*.down_proj", "model.layers.1.*", "*.mlp.gate", "lm_head"])]
    expected = {  # name: (wq, group_size, sym, aq, skip, last rule)
        "model.layers.0.self_attn.q_proj": ("int4", 128, True, "bf16", False, "quant.default"),
        "model.layers.0.mlp.gate": ("int4", 128, True, "bf16", True, o[3]),
        "model.layers.0.mlp.experts.1.up_proj": ("mxfp4", 32, True, "bf16", False, o[0]),
        "model.layers.0.mlp.experts.1.down_proj": ("mxfp4", 64, True, "bf16", False, o[1]),
        "model.layers.1.self_attn.o_proj": ("int4", 128, False, "bf16", False, o[2]),
        "model.layers.1.mlp.gate": ("int4", 128, False, "bf16", True, o[3]),
        "model.layers.1.mlp.experts.0.gate_proj": ("mxfp4", 32, False, "bf16", False, o[2]),
        "model.layers.1.mlp.experts.0.down_proj": ("mxfp4", 64, False, "bf16", False, o[2]),
        "lm_head": ("int8", -1, True, "fp8_e4m3", False, o[4]),
    }
    for name, want in expected.items():
        s = specs[name]
        assert (s.wq, s.group_size, s.sym, s.aq, s.skip, s.rule) == want, name
    assert len(specs) == len(fake_moe())
    assert specs["model.layers.0.mlp.experts.1.down_proj"].shape == (256, 128)


def test_glob_router_does_not_match_gate_proj():
    specs = resolve_recipe(quant({"pattern": "*.mlp.gate", "skip": True}), fake_moe())
    assert specs["model.layers.0.mlp.gate"].skip
    assert not specs["model.layers.0.mlp.experts.0.gate_proj"].skip


def test_pattern_matching_nothing_names_pattern_and_index():
    q = quant({"pattern": "lm_head", "skip": True}, {"pattern": "*.block_sparse_moe.gate", "skip": True})
    with pytest.raises(ConfigError, match=r"quant.overrides\[1\].pattern '\*.block_sparse_moe.gate' matches no module"):
        resolve_recipe(q, fake_moe())


def test_group_size_must_divide_in_features():
    q = quant({"pattern": "*.down_proj", "group_size": 96})
    with pytest.raises(ConfigError) as e:
        resolve_recipe(q, fake_moe(inter=128))
    msg = str(e.value)
    for w in ("group_size 96", "quant.overrides[0]", "in_features 128", "model.layers.0.mlp.experts.0.down_proj"):
        assert w in msg
    # the default's group size is reported as coming from quant.default
    with pytest.raises(ConfigError, match=r"group_size 128 \(set by quant.default\).*in_features 96"):
        resolve_recipe(quant(), [("m", 96, 8)])


def test_non_dividing_group_is_fine_when_not_quantized():
    specs = resolve_recipe(quant({"pattern": "m", "skip": True}, {"pattern": "n", "wq": "bf16"}),
                           [("m", 96, 8), ("n", 96, 8)])
    assert not specs["m"].quantized and not specs["n"].quantized


def test_empty_and_conflicting_overrides_are_errors():
    with pytest.raises(ConfigError, match=r"quant.overrides\[0\] \(pattern 'lm_head'\) sets no field"):
        resolve_recipe(quant({"pattern": "lm_head"}), fake_moe())
    with pytest.raises(ConfigError, match=r"skip: true and also wq"):
        resolve_recipe(quant({"pattern": "lm_head", "skip": True, "wq": "int8"}), fake_moe())
    with pytest.raises(ConfigError, match=r"quant.overrides\[0\].pattern is required"):
        resolve_recipe(quant({"pattern": "", "wq": "int8"}), fake_moe())


def test_rules_built_in_code_accept_shorthand():
    specs = resolve_recipe(quant({"pattern": "*.experts.*", "wq": "nvfp4/16"}, wq="int8/64"), fake_moe())
    assert (specs["model.layers.0.self_attn.q_proj"].wq, specs["model.layers.0.self_attn.q_proj"].group_size) == ("int8", 64)
    assert specs["model.layers.0.mlp.experts.0.up_proj"].group_size == 16


def test_counts_plan_and_memory():
    specs = resolve_recipe(quant({"pattern": "*.mlp.experts.*", "wq": "mxfp4/32"},
                                 {"pattern": "*.mlp.gate", "skip": True}, {"pattern": "lm_head", "skip": True}),
                           fake_moe(layers=2, experts=2))
    assert format_counts(specs) == {"mxfp4/g32": 12, "int4/g128": 8, "skip": 3}
    rows = plan_table(specs)
    row = next(r for r in rows if r["modules"] == "model.layers.*.mlp.experts.*.down_proj")
    assert row["count"] == 4 and row["format"] == "mxfp4/g32" and row["shape"] == (256, 128)
    assert sum(r["count"] for r in rows) == len(specs)
    assert "model.layers.*.self_attn.q_proj" in render_plan(rows)
    mem = estimate_memory(specs)
    assert mem["original_bytes"] == sum(i * o * 2 for _, i, o in fake_moe())
    assert mem["quantized_bytes"] == sum(mem["by_label"].values()) < mem["original_bytes"]


@pytest.mark.parametrize("wq,group,sym,bits", [
    ("int4", 128, True, 4 + 16 / 128),          # fp16 scale per group
    ("int4", 128, False, 4 + (16 + 4) / 128),   # + a 4-bit zero point
    ("mxfp4", 32, True, 4 + 8 / 32),            # E8M0 scale per 32
    ("mxfp6", 32, True, 6 + 8 / 32),
    ("mxfp8_e4m3", 32, True, 8 + 8 / 32),
    ("nvfp4", 16, True, 4 + 8 / 16),            # fp8 scale per 16 (+ one fp32 per tensor)
    ("bf16", 128, True, 16),
])
def test_weight_bytes(wq, group, sym, bits):
    s = QuantSpec(wq, group, sym, "bf16", False, shape=(64, 256))
    extra = 4 if wq == "nvfp4" else 0
    assert weight_bytes(s) == 64 * 256 * bits / 8 + extra
    assert weight_bytes(QuantSpec(wq, group, sym, "bf16", True, shape=(64, 256))) == 64 * 256 * 2


def test_build_format_passes_the_spec():
    pytest.importorskip("alphaquant.formats", reason="formats layer not present")
    from alphaquant import formats
    if not hasattr(formats, "get_format"):
        pytest.skip("alphaquant.formats.get_format not written yet")
    f = build_format(QuantSpec("int4", 64, False, "bf16", False, shape=(8, 128)))
    assert (f.name, f.group_size, f.bits) == ("int4", 64, 4)
    assert build_format(QuantSpec("mxfp4", 32, True, "bf16", False)).group_size == 32
    assert build_format(QuantSpec("int4", 64, True, "bf16", True)) is None


# --- the shipped configs against each family's real module names and shapes -------------------
def _attn(p, hidden, kv=None):
    kv = hidden if kv is None else kv
    return [(f"{p}.self_attn.{x}_proj", hidden, hidden if x in "qo" else kv) for x in "qkvo"]


def _swiglu(prefix, hidden, inter):
    return [(f"{prefix}.gate_proj", hidden, inter), (f"{prefix}.up_proj", hidden, inter),
            (f"{prefix}.down_proj", inter, hidden)]


def _routed(p, E, hidden, inter, n_router):
    experts = [m for e in range(E) for m in _swiglu(f"{p}.mlp.experts.{e}", hidden, inter)]
    return [(f"{p}.mlp.gate", hidden, n_router)] + experts


def olmoe(L=2, E=3):
    m = []
    for n in range(L):
        p = f"model.layers.{n}"
        m += _attn(p, 2048) + _routed(p, E, 2048, 1024, 64)
    return m + [("lm_head", 2048, 50304)]


def qwen2_moe(L=2, E=3):
    m = []
    for n in range(L):
        p = f"model.layers.{n}"
        m += _attn(p, 2048) + _routed(p, E, 2048, 1408, 60) + _swiglu(f"{p}.mlp.shared_expert", 2048, 5632)
        m.append((f"{p}.mlp.shared_expert_gate", 2048, 1))
    return m + [("lm_head", 2048, 151936)]


def mixtral(L=2, E=2):
    m = []
    for n in range(L):
        p = f"model.layers.{n}"
        m += _attn(p, 4096, kv=1024)
        m.append((f"{p}.block_sparse_moe.gate", 4096, 8))
        for e in range(E):
            b = f"{p}.block_sparse_moe.experts.{e}"
            m += [(f"{b}.w1", 4096, 14336), (f"{b}.w3", 4096, 14336), (f"{b}.w2", 14336, 4096)]
    return m + [("lm_head", 4096, 32000)]


def deepseek_moe(L=3, E=3):
    m = []
    for n in range(L):
        p = f"model.layers.{n}"
        m += _attn(p, 2048)
        if n == 0:   # first_k_dense_replace = 1
            m += _swiglu(f"{p}.mlp", 2048, 10944)
        else:
            m += _routed(p, E, 2048, 1408, 64) + _swiglu(f"{p}.mlp.shared_experts", 2048, 2816)
    return m + [("lm_head", 2048, 102400)]


FAMILIES = {"olmoe.yaml": olmoe, "qwen2_moe.yaml": qwen2_moe, "mixtral.yaml": mixtral,
            "deepseek_moe.yaml": deepseek_moe}


@pytest.mark.parametrize("fname", sorted(FAMILIES))
def test_shipped_recipes_resolve_on_real_module_names(fname):
    modules = FAMILIES[fname]()
    specs = resolve_recipe(load_config(CONFIGS / fname).quant, modules)
    for name, s in specs.items():
        leaf = name.rsplit(".", 1)[-1]
        if name == "lm_head" or leaf in ("gate", "shared_expert_gate"):
            assert s.skip, name                                      # routers, gates and lm_head stay
        elif ".experts." in name and not (fname == "mixtral.yaml" and leaf == "w2"):
            assert (s.wq, s.group_size) == ("mxfp4", 32), name       # routed experts
        elif ".shared_expert" in name:
            assert (s.wq, s.group_size) == ("mxfp6", 32), name       # the OCP MX block: servable
        else:
            assert s.wq == "int4" and not s.skip, name               # attention, dense MLP, Mixtral w2
            assert s.group_size == (64 if name == "model.layers.0.mlp.down_proj" else 128), name
        assert s.aq == "bf16"
