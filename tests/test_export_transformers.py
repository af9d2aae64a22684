"""Our checkpoints through transformers' own loader, per format x family (tiny models, 12 tokens).

For each case a tiny OLMoE / Qwen2-MoE / Mixtral checkpoint is rounded to nearest with one recipe
(solver-independent: the layout is the subject), written by QuantizedCheckpointWriter, then:
- compressed-tensors' own compressors (the arithmetic vLLM uses) decompress every module to our
  weights bit for bit;
- `alphaquant.export.compat.serving_warnings` predicts whether transformers reads it right, and
  transformers is run to check that prediction both ways: where no warning is given, loading prints
  no "Could not match" line, every dense and fused-expert weight equals ours exactly, and logits equal
  ours (to 1e-5 of their scale once transformers' bf16 expert copies are upcast: float32 summation
  order); where a warning is given, transformers really fails or is really wrong, in the way
  alphaquant/export/README.md says (a test here fails when a new version fixes it).
DeepSeek-MoE v1 has no transformers class: its checkpoints are checked with compressed-tensors and
our reader. Whole pipeline runs through transformers are in test_export_checkpoint.py.
"""
from __future__ import annotations

import fnmatch
import json
import logging
import re
import types

import pytest
import torch
from torch import nn
from tiny import make_checkpoint

from alphaquant import models
from alphaquant.export import QuantizedCheckpointWriter, load_quantized
from alphaquant.export.compat import serving_warnings
from alphaquant.export.qconfig import module_groups
from alphaquant.config.recipe import QuantSpec, build_format

ct = pytest.importorskip("compressed_tensors")
transformers = pytest.importorskip("transformers")

IDS = torch.randint(0, 320, (2, 12), generator=torch.Generator().manual_seed(1))
ROUTED = "*.experts.*"
F32, BF16 = torch.float32, torch.bfloat16


def _is_router(name: str) -> bool:
    return name == "lm_head" or name.endswith((".gate", "shared_expert_gate"))


# name: (model dtype, [(glob, "wq/group[/asym]")] applied in order to every linear but routers and lm_head)
CASES = {
    "int4-g32": (F32, [("*", "int4/32")]),
    "int2-g16": (F32, [("*", "int2/16")]),
    "int3-g32": (F32, [("*", "int3/32")]),
    "int5-row": (F32, [("*", "int5/-1")]),
    "int6-g16": (F32, [("*", "int6/16")]),
    "int7-g32": (F32, [("*", "int7/32")]),
    "int8-row": (F32, [("*", "int8/-1")]),
    "fp8": (F32, [("*", "fp8_e4m3/-1")]),
    "mxfp4": (BF16, [("*", "mxfp4/32")]),
    "mxfp6": (BF16, [("*", "mxfp6_e2m3/32")]),
    "mxfp4-experts-f32": (F32, [("*", "int8/-1"), (ROUTED, "mxfp4/32")]),   # FP4 experts in a float32 model
    "nvfp4-dense": (BF16, [("*", "nvfp4/16"), (ROUTED, "int4/32")]),        # int experts: exact in float32
    "mxfp8-dense": (BF16, [("*", "mxfp8_e4m3/32"), (ROUTED, "mxfp4/32")]),
    "int4-bf16-scales": (BF16, [("*", "int4/32/sym/bfloat16")]),              # quant.int_scale_dtype: bfloat16
    # transformers' known problems (compat.serving_warnings names each one)
    "int4-bf16": (BF16, [("*", "int4/32")]),                                   # float16 scales in a bf16 model
    "nvfp4-experts": (BF16, [("*", "mxfp4/32"), (ROUTED, "nvfp4/16")]),
    "mxfp8-experts": (BF16, [("*", "mxfp4/32"), (ROUTED, "mxfp8_e4m3/32")]),
    "int4-asym-experts": (F32, [("*", "int4/32"), (ROUTED, "int4/32/asym")]),
    "int4-asym-dense": (F32, [("*", "int4/-1/asym"), (ROUTED, "int4/32")]),
    "mxfp4-dense-f32": (F32, [("*", "mxfp4/32"), (ROUTED, "int4/32")]),
}
FAMILIES = ["olmoe", "qwen2_moe", "mixtral"]
# kept fast: every case on OLMoE; on Qwen2-MoE (shared expert) and Mixtral (renamed block) one case per layout
EVERY_FAMILY = ("int4-g32", "fp8", "mxfp4", "nvfp4-dense", "mxfp8-dense", "nvfp4-experts")
MATRIX = [(c, f) for c in CASES for f in FAMILIES if f == "olmoe" or c in EVERY_FAMILY]
# transformers loads these without an error, but wrong (int4-bf16's dense linears are wrong too, but its
# float32 experts fail the CUDA forward first)
SILENT = ("nvfp4-experts",)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_src")
    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = make_checkpoint(family, root / family)
        return cache[family]
    return get


def _spec(name: str, shape, rules) -> QuantSpec:
    """rules: [(glob, "wq/group[/sym|asym[/scale dtype]]")], the last matching one wins."""
    wq, g, sym, sd = "bf16", -1, True, "float16"
    for pat, fmt in rules:
        if fnmatch.fnmatchcase(name, pat):
            wq, g, *rest = fmt.split("/")
            sym = not rest or rest[0] == "sym"
            sd = rest[1] if len(rest) > 1 else "float16"
    return QuantSpec(wq=wq, group_size=int(g), sym=sym, aq="bf16", skip=_is_router(name), shape=tuple(shape),
                     scale_dtype=sd)


def quantize_write(src, out, rules, dtype, quantize_routers=False):
    """RTN-quantize every linear of the checkpoint at `src` by `rules` and write it to `out`."""
    model = models.from_pretrained(src, dtype=dtype)
    specs, records = {}, {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            spec = _spec(name, m.weight.shape, rules)
            if quantize_routers and name.endswith(".gate"):
                spec = QuantSpec("int8", -1, True, "bf16", False, shape=spec.shape)
            specs[name] = spec
            if spec.quantized:
                fmt = build_format(spec)
                p = fmt.params(m.weight.data)
                m.weight.data = fmt.round_with(m.weight.data, p)
                records[name] = types.SimpleNamespace(params=p, g_idx=None)
    out.mkdir()
    w = QuantizedCheckpointWriter(out, model, specs, records, source_dir=src)
    for i, layer in enumerate(model.model.layers):
        w.write_layer(i, layer)
    w.finish()
    for p in model.parameters():
        p.data = p.data.clone()          # own, aligned storage (see test_export_checkpoint.run)
    return model.eval(), json.loads((out / "config.json").read_text())


def ct_weights(out, model) -> dict[str, torch.Tensor]:
    """Every quantized module's weight as compressed-tensors' own compressor decompresses it."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from safetensors.torch import load_file

    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    parsed = QuantizationConfig.model_validate(qcfg)
    tensors = load_file(out / "model.safetensors")
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    got = {}
    for name, gname in module_groups(qcfg, linears).items():
        group = parsed.config_groups[gname]
        local = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".") and k[len(name) + 1:].startswith("weight")}
        got[name] = BaseCompressor.get_value_from_registry(group.format).decompress(local, group)["weight"]
    return got


def assert_ct_reads(out, model):
    """compressed-tensors' decompression, cast to the model dtype as transformers casts it, is ours."""
    for name, w in ct_weights(out, model).items():
        ours = model.get_submodule(name).weight
        assert torch.equal(w.to(ours.dtype), ours), name


class _Log(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def hf_load(out, dtype):
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    log = _Log()
    lg = logging.getLogger("compressed_tensors")
    lg.addHandler(log)
    try:
        # batched_mm: the experts implementation transformers runs on CUDA (measured on an H200); on a CPU it
        # picks grouped_mm, which hides a dtype mismatch the GPU forward fails on (float32 experts, bf16 inputs)
        model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=dtype, experts_implementation="batched_mm")
    finally:
        lg.removeHandler(log)
    return model.eval(), log.lines


def hf_experts(hf, ours) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(name, transformers' fused tensor, ours stacked the same way) per MoE layer."""
    out = []
    for k, v in hf.state_dict().items():
        m = re.fullmatch(r"model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)", k)
        if not m:
            continue
        layer = ours.model.layers[int(m.group(1))]
        blk = layer.block_sparse_moe if hasattr(layer, "block_sparse_moe") else layer.mlp
        experts = list(blk.experts)
        get = lambda e, a: getattr(e, a).weight  # noqa: E731
        names = ("w1", "w3", "w2") if hasattr(experts[0], "w1") else ("gate_proj", "up_proj", "down_proj")
        if m.group(2) == "gate_up_proj":
            want = torch.stack([torch.cat([get(e, names[0]), get(e, names[1])]) for e in experts])
        else:
            want = torch.stack([get(e, names[2]) for e in experts])
        out.append((k, v, want))
    return out


def logits(model, ids=IDS):
    with torch.no_grad():
        out = model(ids)
    return getattr(out, "logits", out).float()


def transformers_reads_it_right(ours, out, dtype):
    """(ok, what): transformers' weights and logits against ours; ok False says how it went wrong."""
    try:
        hf, log = hf_load(out, dtype)
        logits(hf)                      # compressed-tensors decompresses dense linears on the first forward
    except Exception as e:              # noqa: BLE001 - any failure is the finding
        return False, f"fails: {type(e).__name__}: {str(e)[:200]}", None
    hf.noisy = [line for line in log if "Could not match" in line]
    hf_sd = {k: v for k, v in hf.state_dict().items() if not k.endswith(("weight_scale", "weight_shape"))}
    ours_sd = {k.replace(".block_sparse_moe.", ".mlp."): v for k, v in ours.state_dict().items()}
    # transformers keeps some decompressed tensors in another dtype than the model's (int experts of a
    # bf16 model in float32: the stored values, exactly; FP4 experts of a float32 model in bf16, exact
    # too): each must round to our weight in the model dtype
    for k, v in hf_sd.items():
        if k in ours_sd and not torch.equal(v.to(ours_sd[k].dtype), ours_sd[k]):
            return False, f"wrong weight {k}", hf
    fused = hf_experts(hf, ours)
    assert fused, "no fused experts found in transformers' model"
    for k, v, want in fused:
        if not torch.equal(v.to(want.dtype), want):
            return False, f"wrong experts {k}", hf
    for p in hf.parameters():           # the same weights in both models, summed in float32
        if p.is_floating_point():
            p.data = p.data.to(dtype).float()
    for p in ours.parameters():
        p.data = p.data.float()
    a, b = logits(ours), logits(hf)
    err = ((a - b).abs().max() / a.abs().max()).item()
    return err <= 1e-5, f"logits differ by {err:.2e} of their scale", hf


@pytest.mark.parametrize("case,family", MATRIX, ids=[f"{c}-{f}" for c, f in MATRIX])
def test_transformers_reads_ours_or_we_warn(sources, tmp_path, case, family):
    dtype, rules = CASES[case]
    ours, config = quantize_write(sources(family), tmp_path / "out", rules, dtype)
    assert_ct_reads(tmp_path / "out", ours)
    back = load_quantized(tmp_path / "out")                         # our reader: every layout, exactly
    assert all(torch.equal(p, ours.get_parameter(k)) for k, p in back.named_parameters())
    warns = serving_warnings(config)
    ok, what, hf = transformers_reads_it_right(ours, tmp_path / "out", dtype)
    assert ok == (not warns), (what, warns)
    if ok:
        assert not hf.noisy, hf.noisy   # quiet loads: no "Could not match" line for a correct checkpoint
    if case == "nvfp4-experts":
        # the silent one, as README.md describes it: each expert comes out times its weight_global_scale
        assert "wrong experts" in what and any("WRONG" in w for w in warns)
        from safetensors.torch import load_file
        t = load_file(tmp_path / "out" / "model.safetensors")
        k, v, want = next(x for x in hf_experts(hf, ours) if x[0].endswith("down_proj"))
        layer = k.split(".")[2]
        proj = "w2" if family == "mixtral" else "down_proj"
        blk = "block_sparse_moe" if family == "mixtral" else "mlp"
        gs = torch.stack([t[f"model.layers.{layer}.{blk}.experts.{e}.{proj}.weight_global_scale"]
                          for e in range(v.shape[0])]).float()                       # [E, 1]
        assert gs.min() > 100                                                         # far from 1: not a rounding
        # transformers' bf16 value of code x block scale vs ours (code x block / global) x global: bf16 rounding apart
        torch.testing.assert_close(v.float(), want.float() * gs[:, :, None], rtol=2 ** -7, atol=0)
    elif warns:
        assert what.startswith("wrong" if case in SILENT else "fails"), (what, warns)


def test_quantized_router_is_warned_and_not_read_by_transformers(sources, tmp_path):
    ours, config = quantize_write(sources("mixtral"), tmp_path / "out", [("*", "int4/32")], F32, quantize_routers=True)
    warns = serving_warnings(config)
    assert any("router" in w for w in warns), warns
    ok, what, _ = transformers_reads_it_right(ours, tmp_path / "out", F32)
    assert not ok and "gate" in what, what
    q = load_quantized(tmp_path / "out", dtype="fp32")                        # ours reads it
    assert torch.equal(logits(q), logits(ours))


@pytest.mark.parametrize("case", ["int4-g32", "mxfp4", "nvfp4-experts", "mxfp8-dense", "fp8"])
def test_deepseek_has_no_transformers_class_but_reads_back(sources, tmp_path, case):
    dtype, rules = CASES[case]
    src = tmp_path / "src"
    make_checkpoint("deepseek_moe", src)
    ours, config = quantize_write(src, tmp_path / "out", rules, dtype)
    assert_ct_reads(tmp_path / "out", ours)
    q = load_quantized(tmp_path / "out")
    assert torch.equal(logits(q), logits(ours))
    assert any("no transformers class" in w for w in serving_warnings(config))
    with pytest.raises((ValueError, KeyError)):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")


def test_correct_layouts_get_no_warning():
    """The predictions used above, on config dicts alone: no warning for what transformers reads right."""
    base = {"model_type": "olmoe", "dtype": "bfloat16", "quantization_config": {"config_groups": {"group_0": {
        "targets": [r"re:model\.layers\.\d+\.mlp\.experts(?:\.\d+\.(?:gate_proj|up_proj|down_proj))?$"],
        "format": "mxfp4-pack-quantized", "weights": {"symmetric": True}}}}}
    assert serving_warnings(base) == []
    assert any("experts" in w and "WRONG" in w for w in serving_warnings(
        {**base, "quantization_config": {"config_groups": {"group_0": {
            **base["quantization_config"]["config_groups"]["group_0"], "format": "nvfp4-pack-quantized"}}}}))


def test_run_ends_with_one_warning_line_per_problem(sources, tmp_path):
    """The run's last lines (pipeline.summary): one 'warning:' line naming the format and the reader."""
    from rich.console import Console

    from alphaquant.pipeline.summary import print_serving_warnings
    _, config = quantize_write(sources("olmoe"), tmp_path / "out", CASES["nvfp4-experts"][1], BF16)
    console = Console(record=True, width=100)
    lines = print_serving_warnings(console, str(tmp_path / "out"))
    text = console.export_text()
    assert len(lines) == 1 and text.count("warning:") == 1 and text.strip().startswith("warning:")
    assert "nvfp4" in lines[0] and "transformers 5.24.0" in lines[0] and "weight_global_scale" in lines[0]
    assert print_serving_warnings(console, None) == []


GENERIC = {"mxfp4-experts": ({"default": {"wq": "int4", "group_size": 32},
                              "overrides": [{"pattern": "*.mlp.experts.*", "wq": "mxfp4"},
                                            {"pattern": "lm_head", "skip": True}]},
                             False),
           "nvfp4-experts": ({"default": {"wq": "int4", "group_size": 32},
                              "overrides": [{"pattern": "*.mlp.experts.*", "wq": "nvfp4"},
                                            {"pattern": "lm_head", "skip": True}]},
                             True)}


@pytest.mark.parametrize("case", list(GENERIC))
def test_generic_path_qwen3_moe(tmp_path, case):
    """A model only transformers builds (Qwen3-MoE, the generic path through the calibration session):
    the same prediction, checked against transformers' loader on the logits."""
    from pipeline_utils import run_session, write_config
    from test_generic_models import make_hf_checkpoint

    from tiny import write_corpus
    quant, broken = GENERIC[case]
    src = make_hf_checkpoint("qwen3_moe", tmp_path / "src")
    out = tmp_path / "out"
    s = run_session(write_config(tmp_path / "c.yaml", src, write_corpus(tmp_path), quant=quant, eval={"enabled": False},
                                 calibration={"num_samples": 4, "seq_len": 32, "batch_size": 2, "min_tokens_warn": 16},
                                 output={"save": True, "dir": str(out)}))
    config = json.loads((out / "config.json").read_text())
    warns = serving_warnings(config)
    if broken:
        assert warns and "WRONG" in warns[0], warns
    else:        # a float32 model: FP experts come out in bf16, which only the CUDA forward trips on (cast below)
        assert all("dtype error" in w for w in warns), warns
    hf, log = hf_load(out, F32)
    assert not [line for line in log if "Could not match" in line]
    with torch.no_grad():
        a = s.model(IDS).float()
        for p in hf.parameters():                # FP4 experts come out in bf16 (exact values)
            if p.dtype == torch.bfloat16:
                p.data = p.data.float()
        err = ((a - logits(hf)).abs().max() / a.abs().max()).item()
    assert (err > 1e-2) if broken else (err <= 1e-5), err


@pytest.mark.parametrize("model_dtype,scale_dtype,warned", [("bfloat16", "float16", True), ("bfloat16", "bfloat16", False),
                                                            ("float16", "float16", False), ("float16", "float32", True),
                                                            ("float32", "float16", False)])
def test_int_scale_warning_only_where_the_model_dtype_rounds_them(model_dtype, scale_dtype, warned):
    cfg = {"model_type": "olmoe", "dtype": model_dtype, "quantization_config": {
        "config_groups": {"group_0": {"targets": [r"re:model\.layers\.\d+\.self_attn\.q_proj$"], "format": "pack-quantized",
                                      "weights": {"symmetric": True}}},
        "alphaquant": {"groups": {"group_0": {"wq": "int4", "group_size": 32, "sym": True, "scale_dtype": scale_dtype}}}}}
    assert bool(serving_warnings(cfg)) == warned
