"""Format block sizes from the spec: MX 32, NVFP4 16, fp8_e4m3 per row when a rule gives none;
other blocks for those formats refused (before any weight is read) unless asked for explicitly."""
from __future__ import annotations

import pytest

from alphaquant.config.run import load_config
from alphaquant.errors import ConfigError
from alphaquant.export.compressed import AQ_PACKED, layout_of
from alphaquant.config.quant import QuantConfig, QuantOverride, QuantRule
from alphaquant.config.recipe import resolve_recipe

MODS = [("model.layers.0.self_attn.q_proj", 256, 256), ("model.layers.0.mlp.experts.0.up_proj", 256, 128),
        ("model.layers.0.mlp.experts.0.down_proj", 128, 256), ("lm_head", 256, 1000)]
EXP = "model.layers.0.mlp.experts.0.up_proj"


def specs(*overrides, nonstandard=False, **default):
    q = QuantConfig(default=QuantRule(**default), overrides=[QuantOverride(**o) for o in overrides],
                    nonstandard_blocks=nonstandard)
    return resolve_recipe(q, MODS)


@pytest.mark.parametrize("wq,block,fmt", [("mxfp4", 32, "mxfp4-pack-quantized"), ("nvfp4", 16, "nvfp4-pack-quantized"),
                                          ("mxfp6", 32, "mxfp6-pack-quantized"), ("mxfp8", 32, "mxfp8-quantized"),
                                          ("fp8_e4m3", -1, "float-quantized")])
def test_a_rule_without_group_size_gets_the_formats_block(wq, block, fmt):
    s = specs({"pattern": "*.experts.*", "wq": wq}, wq="int4", group_size=128)[EXP]   # default says 128
    assert s.group_size == block
    assert layout_of(s).format == fmt                      # a standard layout, not alphaquant-packed
    assert specs(wq=wq)[EXP].group_size == block           # the default rule too


def test_int_keeps_the_modules_group_size():
    s = specs({"pattern": "*.experts.*", "wq": "int8"}, wq="int4", group_size=64)
    assert s[EXP].group_size == 64 and s["lm_head"].group_size == 64
    assert specs(wq="int4")[EXP].group_size == 128


@pytest.mark.parametrize("rules,default,bad", [
    ([{"pattern": "*.experts.*", "wq": "mxfp4/64"}], {}, ("mxfp4", "64", "quant.overrides[0]", "blocks of 32")),
    ([{"pattern": "*.experts.*", "wq": "nvfp4", "group_size": 32}], {}, ("nvfp4", "32", "blocks of 16")),
    ([{"pattern": "*.experts.*", "wq": "mxfp4"}, {"pattern": "*.down_proj", "group_size": 64}], {},
     ("quant.overrides[1]", "down_proj", "mxfp4")),
    ([], {"wq": "fp8_e4m3", "group_size": 128}, ("fp8_e4m3", "quant.default", "one scale per row")),
])
def test_nonstandard_block_is_refused_naming_rule_format_and_way_out(rules, default, bad):
    with pytest.raises(ConfigError) as e:
        specs(*rules, **default)
    msg = str(e.value)
    for w in bad + ("quant.nonstandard_blocks: true", "alphaquant-packed"):
        assert w in msg, (w, msg)


def test_nonstandard_block_when_asked_is_alphaquant_packed():
    s = specs({"pattern": "*.experts.*", "wq": "mxfp4/64"}, nonstandard=True)[EXP]
    assert s.group_size == 64 and layout_of(s).format == AQ_PACKED


def test_yaml_key_and_cli(tmp_path):
    p = tmp_path / "run.yaml"
    p.write_text("model: {path: x}\nquant: {overrides: [{pattern: a, wq: mxfp4}]}\n")
    cfg = load_config(p, ["--quant.nonstandard_blocks", "true"])
    assert cfg.quant.nonstandard_blocks is True
    assert load_config(p, []).quant.nonstandard_blocks is False
