"""GPT-OSS checkpoints from the generic path that transformers serves: GPT-OSS's own MXFP4 layout.

A tiny random gpt_oss (2 layers, 4 experts, hidden 64, intermediate 32; sliding + full attention) is quantized
through the calibration session with GPT-OSS's own recipe (routed experts mxfp4/32, everything else kept).
The checkpoint must be transformers' GPT-OSS mxfp4 layout (transformers/integrations/mxfp4.py): keys, dtypes,
shapes; its experts must decode, with a table written here (FP4 values, low nibble first, 2**(scale - 127),
gate/up rows interleaved), to our GPTQ weights exactly; transformers must load it (dequantizing, as on any
machine without the gpt-oss Triton kernels) with our logits; `alphaquant.export.load_quantized` must give our
model back exactly. Any other recipe keeps the per-expert compressed-tensors layout, which transformers
cannot load for gpt_oss: the run says so in one line.
"""
from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors import safe_open

import tiny
from pipeline_utils import assert_reads_back_exactly, run_session, write_config
from test_generic_models import make_hf_checkpoint

NATIVE = {"default": {"wq": "bf16"}, "overrides": [{"pattern": "*.mlp.experts.*", "wq": "mxfp4/32"}]}
# attention quantized too: one quantization_config cannot say "mxfp4 experts + int4 attention" to transformers
MIXED = {"default": {"wq": "bf16"}, "overrides": [{"pattern": "*.mlp.experts.*", "wq": "mxfp4/32"},
                                                  {"pattern": "*.self_attn.q_proj", "wq": "int4", "group_size": 32}]}
E, H, INTER, LAYERS = 4, 64, 32, 2
FP4 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpt_oss_serving")
    src = make_hf_checkpoint("gpt_oss", root / "src")
    return root, tiny.write_corpus(root), src, {}


def run(work, name, quant, **sections):
    root, corpus, src, cache = work
    if name not in cache:
        out = root / f"out-{name}"
        cfg = write_config(root / f"{name}.yaml", src, corpus, quant=quant,
                           output={"save": True, "dir": str(out)}, **sections)
        cache[name] = (run_session(cfg), out)
    return cache[name]


def tensors(directory) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


def decode(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Independent MXFP4 decode: [E, R, G, 16] bytes, [E, R, G] E8M0 -> [E, R, G*32] float64."""
    lut = torch.tensor(FP4, dtype=torch.float64)
    lo, hi = lut[(blocks & 0x0F).long()], lut[(blocks >> 4).long()]
    vals = torch.stack((lo, hi), -1).flatten(-2)                               # element 2k low, 2k+1 high
    return (vals * torch.pow(2.0, scales.double() - 127).unsqueeze(-1)).flatten(-2)


def our_experts(model, i):
    ex = model.model.layers[i].mlp.experts
    return [ex.expert(e) for e in range(ex.num_experts)]


def test_native_layout_keys_dtypes_shapes(work):
    """config.json says mxfp4 as GPT-OSS's does; the tensors are transformers' mxfp4 names, dtypes and shapes
    (Mxfp4HfQuantizer.serialized_names), every other key is the one transformers' own save of the source has."""
    from transformers.quantizers.quantizer_mxfp4 import Mxfp4HfQuantizer

    from alphaquant.export.gpt_oss_mxfp4 import MODULES_TO_NOT_CONVERT
    s, out = run(work, "native", NATIVE)
    q = json.loads((out / "config.json").read_text())["quantization_config"]
    assert q["quant_method"] == "mxfp4" and q["modules_to_not_convert"] == MODULES_TO_NOT_CONVERT
    assert "config_groups" not in q
    got, src = tensors(out), tensors(work[2])
    fused = {n for names in Mxfp4HfQuantizer.serialized_names.values() for n in names}
    assert fused == {"gate_up_proj_blocks", "gate_up_proj_scales", "down_proj_blocks", "down_proj_scales"}
    want = {k for k in src if not re.search(r"experts\.(gate_up_proj|down_proj)$", k)}
    want |= {f"model.layers.{i}.mlp.experts.{n}" for i in range(LAYERS) for n in fused}
    assert set(got) == want
    assert not any(re.search(r"experts\.\d+\.", k) for k in got)
    shapes = {"gate_up_proj_blocks": (E, 2 * INTER, H // 32, 16), "gate_up_proj_scales": (E, 2 * INTER, H // 32),
              "down_proj_blocks": (E, H, INTER // 32, 16), "down_proj_scales": (E, H, INTER // 32),
              "gate_up_proj_bias": (E, 2 * INTER), "down_proj_bias": (E, H)}
    for i in range(LAYERS):
        for n, shape in shapes.items():
            t = got[f"model.layers.{i}.mlp.experts.{n}"]
            assert tuple(t.shape) == shape, n
            assert t.dtype == (torch.float32 if n.endswith("_bias") else torch.uint8), n
    for k, t in got.items():                                   # everything but the experts: as stored in the source
        if "experts" not in k:
            assert torch.equal(t, src[k]), k


def test_native_tensors_decode_to_our_weights(work):
    """Decoded here from the FP4 table and 2**(s-127) (not with AlphaQuant's or transformers' code), the
    checkpoint's experts are our GPTQ weights bit for bit, gate/up rows interleaved, biases as kept."""
    from transformers.integrations.mxfp4 import FP4_VALUES, convert_moe_packed_tensors
    assert FP4_VALUES == FP4
    s, out = run(work, "native", NATIVE)
    got = tensors(out)
    for i in range(LAYERS):
        p = f"model.layers.{i}.mlp.experts."
        gu = decode(got[p + "gate_up_proj_blocks"], got[p + "gate_up_proj_scales"])     # [E, 2I, H]
        dn = decode(got[p + "down_proj_blocks"], got[p + "down_proj_scales"])           # [E, H, I]
        for e, x in enumerate(our_experts(s.model, i)):
            assert torch.equal(gu[e, 0::2], x.gate_proj.weight.double()), (i, e)
            assert torch.equal(gu[e, 1::2], x.up_proj.weight.double()), (i, e)
            assert torch.equal(dn[e], x.down_proj.weight.double()), (i, e)
            assert torch.equal(got[p + "gate_up_proj_bias"][e, 0::2], x.gate_proj.bias)
            assert torch.equal(got[p + "gate_up_proj_bias"][e, 1::2], x.up_proj.bias)
            assert torch.equal(got[p + "down_proj_bias"][e], x.down_proj.bias)
        # transformers' own dequantization ([E, in, out]) agrees with the table above
        theirs = convert_moe_packed_tensors(got[p + "gate_up_proj_blocks"], got[p + "gate_up_proj_scales"],
                                            dtype=torch.float32)
        assert torch.equal(theirs.double(), gu.transpose(1, 2))


def test_transformers_loads_native_with_our_logits(work):
    """AutoModelForCausalLM.from_pretrained loads it (no missing/unexpected keys; dequantized, as transformers
    does without the gpt-oss Triton kernels) with our expert weights exactly and our logits."""
    import transformers
    s, out = run(work, "native", NATIVE)
    kw = {"quantization_config": transformers.Mxfp4Config(dequantize=True)}
    try:
        import accelerate  # noqa: F401 - transformers' mxfp4 quantizer needs it unless told to dequantize
        kw = {}
    except ImportError:
        with pytest.raises(ImportError, match="Accelerate"):
            transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, output_loading_info=True,
                                                                 **kw)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    for i in range(LAYERS):
        m = hf.model.layers[i].mlp.experts
        for e, x in enumerate(our_experts(s.model, i)):
            assert torch.equal(m.gate_up_proj[e][:, 0::2].T, x.gate_proj.weight)
            assert torch.equal(m.gate_up_proj[e][:, 1::2].T, x.up_proj.weight)
            assert torch.equal(m.down_proj[e].T, x.down_proj.weight)
            assert torch.equal(m.gate_up_proj_bias[e, 0::2], x.gate_proj.bias)
    ours = dict(s.model.named_parameters())
    for k, p in hf.named_parameters():
        if "experts" not in k:
            assert torch.equal(p, ours[k]), k
    ids = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a, b = s.model(ids), hf(ids).logits
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * float(a.abs().max()))


def test_load_quantized_reads_native_exactly(work):
    """alphaquant.export.load_quantized gives back exactly our quantized model (every tensor, the logits)."""
    from alphaquant.export import load_quantized
    s, out = run(work, "native", NATIVE)
    q = load_quantized(out, dtype="fp32")
    assert_reads_back_exactly(s.model, q)


def test_native_bf16(work):
    """A bfloat16 model (GPT-OSS's own dtype): bf16 biases, and transformers' bf16 dequantization is our
    weights exactly (E2M1 times a power of two is exact in bf16); load_quantized reads it back exactly."""
    import transformers

    from alphaquant.export import load_quantized
    s, out = run(work, "native-bf16", NATIVE, model={"path": str(work[2]), "dtype": "bfloat16", "lazy": False},
                 eval={"enabled": False})
    got = tensors(out)
    assert got["model.layers.0.mlp.experts.gate_up_proj_bias"].dtype == torch.bfloat16
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        out, dtype=torch.bfloat16, quantization_config=transformers.Mxfp4Config(dequantize=True))
    q = load_quantized(out)
    for i in range(LAYERS):
        m = hf.model.layers[i].mlp.experts
        for e, x in enumerate(our_experts(s.model, i)):
            assert torch.equal(m.gate_up_proj[e][:, 0::2].T, x.gate_proj.weight)
            assert torch.equal(m.down_proj[e].T, x.down_proj.weight)
    ours, back = dict(s.model.named_parameters()), dict(q.named_parameters())
    for k in ours:
        assert torch.equal(ours[k], back[k]), k


def test_other_recipe_keeps_compressed_tensors_and_warns(work, capsys):
    """Attention quantized too: per-expert compressed-tensors (load_quantized reads it exactly), which
    transformers loads with its experts missing (what the warning says; this fails once transformers fixes
    it), and the run's summary prints the one GPT-OSS line."""
    import transformers

    from alphaquant.app import main
    from alphaquant.export import load_quantized
    from alphaquant.export.compat import GPT_OSS_PER_EXPERT, plan_warnings, serving_warnings
    root, corpus, src, _ = work
    out = root / "out-mixed"
    cfg = write_config(root / "mixed.yaml", src, corpus, quant=MIXED, output={"save": True, "dir": str(out)},
                       eval={"enabled": False})
    capsys.readouterr()
    assert main(["--config", str(cfg)]) == 0
    printed = capsys.readouterr().out
    assert printed.count("GPT-OSS experts written per expert") == 1, printed[-2000:]
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    assert serving_warnings(config) == [GPT_OSS_PER_EXPERT]
    assert any(re.search(r"experts\.\d+\.gate_proj\.weight_packed$", k) for k in tensors(out))
    _, info = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    assert "model.layers.0.mlp.experts.gate_up_proj" in info["missing_keys"]
    assert "model.layers.0.mlp.experts.0.gate_proj.weight_packed" in info["unexpected_keys"]
    q, fp = load_quantized(out, dtype="fp32"), tensors(src)
    assert torch.equal(q.model.layers[0].self_attn.k_proj.weight, fp["model.layers.0.self_attn.k_proj.weight"])
    assert not torch.equal(q.model.layers[0].self_attn.q_proj.weight, fp["model.layers.0.self_attn.q_proj.weight"])
    # the plan (--dry-run resolves the same specs) gives the line too, with the reason
    from alphaquant.api.core import run_config
    from alphaquant.config.run import load_config
    plan_cfg = write_config(root / "mixed-plan.yaml", src, corpus, quant=MIXED,
                            output={"save": True, "dir": str(root / "out-plan")})
    plan = run_config(load_config(plan_cfg, []), dry_run=True)
    lines = plan_warnings("gpt_oss", plan.specs)
    assert len(lines) == 1 and lines[0].startswith(GPT_OSS_PER_EXPERT) and "self_attn.q_proj" in lines[0], lines
    capsys.readouterr()
    assert main(["--config", str(plan_cfg), "--dry-run"]) == 0           # the plan the user sees says it too
    assert f"warning: {lines[0]}" in capsys.readouterr().out
    s, _ = run(work, "native", NATIVE)
    assert plan_warnings("gpt_oss", s.specs) == []


def test_native_reason():
    """Which recipes GPT-OSS's layout holds: experts mxfp4/32 weights-only and nothing else quantized."""
    from alphaquant.config.recipe import QuantSpec
    from alphaquant.export.compat import plan_warnings
    from alphaquant.export.gpt_oss_mxfp4 import native_reason

    mx = QuantSpec(wq="mxfp4", group_size=32, sym=True, aq="bf16", skip=False)
    keep = QuantSpec(wq="bf16", group_size=-1, sym=True, aq="bf16", skip=False)
    experts = {f"model.layers.{i}.mlp.experts.{e}.{p}": mx for i in range(2) for e in range(4)
               for p in ("gate_proj", "up_proj", "down_proj")}
    attn = {f"model.layers.{i}.self_attn.{p}": keep for i in range(2) for p in ("q_proj", "k_proj", "v_proj", "o_proj")}
    specs = {**experts, **attn, "lm_head": keep}
    assert native_reason("gpt_oss", specs) is None and plan_warnings("gpt_oss", specs) == []
    assert "not gpt_oss" in native_reason("qwen3_moe", specs)
    cases = {
        "model.layers.0.self_attn.q_proj": QuantSpec(wq="int4", group_size=32, sym=True, aq="bf16", skip=False),
        "model.layers.1.mlp.experts.2.down_proj": QuantSpec(wq="mxfp4", group_size=16, sym=True, aq="bf16", skip=False),
        "model.layers.1.mlp.experts.3.up_proj": QuantSpec(wq="int4", group_size=32, sym=True, aq="bf16", skip=False),
        "model.layers.0.mlp.experts.0.gate_proj": QuantSpec(wq="mxfp4", group_size=32, sym=True, aq="mxfp8",
                                                            skip=False),
        "model.layers.0.mlp.experts.1.gate_proj": QuantSpec(wq="mxfp4", group_size=32, sym=True, aq="bf16", skip=True),
        "lm_head": mx,
    }
    for name, spec in cases.items():
        why = native_reason("gpt_oss", {**specs, name: spec})
        assert why is not None and name in why, (name, why)
        lines = plan_warnings("gpt_oss", {**specs, name: spec})
        assert len(lines) == 1 and lines[0].startswith("GPT-OSS experts written per expert") and name in lines[0]


def test_dequantized_output_is_transformers_fused_layout(work):
    """output.format: dequantized writes GPT-OSS's experts fused as transformers saves them (per-expert keys
    would leave transformers' experts missing): it loads with no missing keys and our logits."""
    import transformers
    root, corpus, src, _ = work
    out2 = root / "out-dequantized-2"
    cfg = write_config(root / "deq.yaml", src, corpus, quant=NATIVE, eval={"enabled": False},
                       output={"save": True, "dir": str(out2), "format": "dequantized"})
    s = run_session(cfg)
    assert set(tensors(out2)) == set(tensors(src))
    assert "quantization_config" not in json.loads((out2 / "config.json").read_text())
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(out2, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    ids = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        a, b = s.model(ids), hf(ids).logits
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * float(a.abs().max()))


def test_fuse_layer_keeps_its_input_and_refuses_act_order():
    """fuse_layer returns a new dict (the resume state keeps the per-expert tensors the writer was given)
    and refuses a weight_g_idx (act-order groups: GPT-OSS's layout has no place for one)."""
    from alphaquant.export.gpt_oss_mxfp4 import GptOssMxfp4
    p = "model.layers.0.mlp.experts."
    t = {f"{p}{e}.{proj}.{leaf}": torch.zeros(shape, dtype=torch.uint8)
         for e in range(2) for proj, R, C in (("gate_proj", 4, 64), ("up_proj", 4, 64), ("down_proj", 64, 32))
         for leaf, shape in (("weight_packed", (R, C // 2)), ("weight_scale", (R, C // 32)))}
    t["model.layers.0.self_attn.q_proj.weight"] = torch.ones(3)
    before = dict(t)
    out = GptOssMxfp4({}).fuse_layer(0, t)
    assert t == before
    assert out[p + "gate_up_proj_blocks"].shape == (2, 8, 2, 16) and out[p + "down_proj_scales"].shape == (2, 64, 1)
    assert "model.layers.0.self_attn.q_proj.weight" in out
    with pytest.raises(ValueError, match="act-order"):
        GptOssMxfp4({}).fuse_layer(0, {**t, f"{p}0.gate_proj.weight_g_idx": torch.zeros(64, dtype=torch.int32)})
