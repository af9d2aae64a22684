"""Quantized checkpoints end to end on tiny models: pipeline -> output dir -> readers.

(a) transformers (with compressed-tensors) loads OLMoE / Mixtral / Qwen2-MoE checkpoints;
(b) save -> load_quantized gives the in-memory quantized model's logits bit for bit;
(c) config.json's quantization_config, tokenizer and JSON side files;
(d) atomic writes and --overwrite; (e) sharded output.
Each pipeline run is a few seconds (2 layers, 4 short calibration windows, eval off) and
is shared by the tests of a module through `run()`'s cache.
"""
from __future__ import annotations

import json
import re

import pytest
import torch
from pipeline_utils import run_session, slow_save_file, write_config
from tiny import make_checkpoint, write_corpus

from alphaquant.errors import UserError
from alphaquant.export import QuantizedCheckpointWriter, load_quantized

MIXED = {"default": {"wq": "int4", "group_size": 32, "sym": True},
         "overrides": [{"pattern": "*.experts.*", "wq": "mxfp4/32"},
                       {"pattern": "*.o_proj", "wq": "int8", "group_size": -1},      # per channel
                       {"pattern": "*.gate", "skip": True}, {"pattern": "lm_head", "skip": True}]}
FAST = {"num_samples": 4, "seq_len": 32, "batch_size": 2, "min_tokens_warn": 16}
IDS = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("export")


_CACHE: dict = {}


@pytest.fixture(autouse=True)
def _no_plots(monkeypatch):
    """The run's PNG plots (matplotlib, seconds per run) are not part of the checkpoint format."""
    monkeypatch.setattr("alphaquant.pipeline.calibrate.save_plots", lambda results, directory: {})


def run(work, family, name, quant=MIXED, out=None, **sections):
    """Quantize tiny `family` with `quant`, saving to work/name/out (cached per module)."""
    key = (str(work), name)
    if key not in _CACHE:
        d = work / name
        d.mkdir()
        model = make_checkpoint(family, d / "model")
        cfg = write_config(d / "c.yaml", model, write_corpus(d), quant=quant, eval={"enabled": False},
                           calibration=FAST, output={"save": True, "dir": str(out or d / "out"), **sections.pop("output", {})},
                           **sections)
        s = run_session(cfg)
        for p in s.model.parameters():
            # the in-memory model's tensors come from a safetensors buffer at an 8-byte (not 64-byte)
            # aligned address, and CPU matmul kernels sum in another order for those: re-allocate so
            # both models run the same kernels (the values do not change)
            p.data = p.data.clone()
        _CACHE[key] = (s, out or d / "out")
    return _CACHE[key]


def logits(model, ids=IDS):
    with torch.no_grad():
        out = model(ids)
    return getattr(out, "logits", out).float()


def hf_load(out):
    import transformers
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    return transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, output_loading_info=True)


# --- (a) transformers + compressed-tensors ---------------------------------------------------
EXPERT_PROJ = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down", "w1": "gate", "w3": "up", "w2": "down"}


def ours_experts(sd, layer):
    """{(kind, e): weight} of layer `layer`'s routed experts in our model's state dict."""
    out = {}
    for k, v in sd.items():
        m = re.fullmatch(rf"model\.layers\.{layer}\.\w+\.experts\.(\d+)\.(\w+)\.weight", k)
        if m:
            out[EXPERT_PROJ[m.group(2)], int(m.group(1))] = v
    return out


def recipe(family):
    # NVFP4 is covered at the tensor level (test_export_layouts) and by our reader below; transformers
    # is not given an FP4 *dense* module here: compressed-tensors decompresses FP4 to bfloat16 and
    # transformers then runs a bf16 weight against float32 activations (dtype error) in a fp32 model.
    return MIXED


@pytest.mark.parametrize("family", ["olmoe", "mixtral", "qwen2_moe"])
def test_transformers_loads_ours(work, family):
    s, out = run(work, family, family, quant=recipe(family))
    hf, info = hf_load(out)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    a, b = logits(s.model), logits(hf)      # compressed-tensors decompresses on the first forward
    ours = {k.replace(".block_sparse_moe.", ".mlp."): v for k, v in s.model.state_dict().items()}
    hf_sd = {k: v for k, v in hf.state_dict().items() if not k.endswith(("weight_scale", "weight_shape"))}
    fused = [k for k in hf_sd if k.endswith(("experts.gate_up_proj", "experts.down_proj"))]
    dense = [k for k in hf_sd if k not in fused]
    assert not [k for k in hf_sd if "weight_packed" in k]
    for k in dense:                          # attention (int4, int8/row), shared experts, norms, skipped
        assert hf_sd[k].dtype == torch.float32 and torch.equal(hf_sd[k], ours[k]), k
    assert len(fused) == 2 * len(s.model.model.layers)
    for k in fused:
        layer = int(k.split(".")[2])
        exp = ours_experts(ours, layer)
        E = max(e for _, e in exp) + 1
        if k.endswith("gate_up_proj"):      # [E, 2I, H] = gate then up
            want = torch.stack([torch.cat([exp["gate", e], exp["up", e]]) for e in range(E)])
        else:
            want = torch.stack([exp["down", e] for e in range(E)])
        # transformers keeps the decompressed MXFP4 experts in bf16 (compressed-tensors' FP4 output
        # dtype); E2M1 code * 2^e is exact in bf16, so they equal ours exactly as numbers
        assert hf_sd[k].dtype == torch.bfloat16 and torch.equal(hf_sd[k].float(), want), k
    # As loaded, transformers runs the bf16 expert weights with bf16 activations (8 significant bits:
    # relative error ~2^-9 per product, accumulated over two MoE layers), so the logits agree to ~1e-3
    # of their scale, not exactly. Upcasting the expert tensors (exact values) removes that: what is
    # left is float32 summation order (~1e-6), which shows every weight and the routing are ours.
    scale = a.abs().max()
    assert (a - b).abs().max() <= 1e-2 * scale
    for k, p in hf.named_parameters():
        if p.dtype == torch.bfloat16:
            p.data = p.data.float()
    assert (a - logits(hf)).abs().max() <= 1e-5 * scale


# --- (b) save -> load_quantized ------------------------------------------------------------
def assert_exact(s, out):
    q = load_quantized(out, dtype="fp32")
    ours, back = dict(s.model.named_parameters()), dict(q.named_parameters())
    assert set(ours) == set(back)
    for k in ours:
        assert torch.equal(ours[k], back[k]), k
    assert torch.equal(logits(s.model), logits(q))
    return q


@pytest.mark.parametrize("family", ["olmoe", "mixtral", "qwen2_moe"])
def test_load_quantized_exact(work, family):
    assert_exact(*run(work, family, family, quant=recipe(family)))


def test_load_quantized_exact_deepseek_alphaquant_packed(work):
    """DeepSeek-MoE (dense first layer, shared + routed experts) with what compressed-tensors
    cannot express: MXFP6-E3M2 routed experts, act-order (non-static groups, so weight_g_idx)
    on int4-asym attention / dense MLP and MXFP4 shared experts."""
    quant = {"default": {"wq": "int4", "group_size": 32, "sym": False},
             "overrides": [{"pattern": "*.experts.*", "wq": "mxfp6_e3m2/32"},
                           {"pattern": "*.shared_experts.*", "wq": "mxfp4/32"},
                           {"pattern": "*.gate", "skip": True}, {"pattern": "lm_head", "skip": True}]}
    s, out = run(work, "deepseek_moe", "packed", quant=quant, gptq={"act_order": True, "static_groups": False})
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qcfg["format"] == "alphaquant-packed" and qcfg["alphaquant"]["standard"] is False
    groups = qcfg["alphaquant"]["groups"]
    assert {(g["wq"], g["act_order"]) for g in groups.values()} >= {("int4", True), ("mxfp6_e3m2", True)}
    from safetensors import safe_open
    with safe_open(out / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert "model.layers.0.self_attn.q_proj.weight_g_idx" in keys
    assert "model.layers.1.mlp.experts.0.up_proj.weight_packed" in keys
    assert_exact(s, out)


# --- (c) config.json and side files ----------------------------------------------------------
def test_config_and_side_files(work):
    from compressed_tensors.quantization import QuantizationConfig
    from compressed_tensors.utils.match import match_named_modules

    s, out = run(work, "olmoe", "olmoe")
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "alphaquant_recipe.json", "alphaquant_summary.json"} <= names
    assert not any(n.startswith(".") for n in names)
    recipe = json.loads((out / "alphaquant_recipe.json").read_text())
    assert recipe["modules"]["model.layers.0.mlp.gate"]["skip"] is True
    json.loads((out / "alphaquant_summary.json").read_text())
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "olmoe" and config["dtype"] == "float32"
    qcfg = config["quantization_config"]
    assert qcfg["quant_method"] == "compressed-tensors" and qcfg["format"] == "mixed-precision"
    assert qcfg["alphaquant"]["standard"] is True

    specs = s.specs
    skipped = {n for n, sp in specs.items() if not sp.quantized}
    assert skipped == {"model.layers.0.mlp.gate", "model.layers.1.mlp.gate", "lm_head"}
    parsed = QuantizationConfig.model_validate(qcfg)
    # compressed-tensors' own matcher, on our model's module names: the ignore list is exactly the
    # skipped modules, and each group's targets are exactly the modules of that format
    linears = {n for n, m in s.model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert linears == set(specs)
    ignored = {n for n, _ in match_named_modules(s.model, parsed.ignore)}
    assert ignored == skipped
    seen = set()
    for gname, group in parsed.config_groups.items():
        hits = dict(match_named_modules(s.model, group.targets, parsed.ignore))
        got = {n for n, m in hits.items() if isinstance(m, torch.nn.Linear)}
        # expert targets also match the experts container (transformers' fused experts module has
        # that name: no "Could not match" warning there); compressed-tensors quantizes Linears only
        assert all(re.fullmatch(r"model\.layers\.\d+\.mlp\.experts", n) for n in set(hits) - got), gname
        ours = qcfg["alphaquant"]["groups"][gname]
        want = {n for n, sp in specs.items() if sp.quantized and (sp.wq, sp.group_size) == (ours["wq"], ours["group_size"])}
        assert got == want and ours["modules"] == len(want), gname
        assert all(t.startswith("re:") for t in group.targets)
        assert not got & seen
        seen |= got
    assert seen == set(specs) - skipped
    experts = [g for g in parsed.config_groups.values() if g.format == "mxfp4-pack-quantized"]
    assert len(experts) == 1 and any("experts" in t for t in experts[0].targets)   # transformers' lookup


# --- (d) atomic writes, overwrite -------------------------------------------------------------
def _fails_at_layer_1(work, monkeypatch, name, before_failing=lambda: None):
    """A run whose write of layer 1 fails (a simulated full disk): it raises, and leaves no output directory and no
    temporary one."""
    d = work / name
    d.mkdir()
    model = make_checkpoint("olmoe", d / "model")
    out = d / "out"
    orig = QuantizedCheckpointWriter.add_layer

    def add_layer(self, i, tensors):          # runs on the background write thread
        if i == 1:
            before_failing()
            raise RuntimeError("disk full (simulated)")
        return orig(self, i, tensors)

    monkeypatch.setattr(QuantizedCheckpointWriter, "add_layer", add_layer)
    cfg = write_config(d / "c.yaml", model, write_corpus(d), quant=MIXED, eval={"enabled": False},
                       calibration=FAST, output={"save": True, "dir": str(out)})
    with pytest.raises(RuntimeError, match="disk full"):
        run_session(cfg)
    assert not out.exists()
    assert not [p.name for p in d.iterdir() if p.name.startswith(".out.tmp-")]


def test_failed_write_leaves_nothing(work, monkeypatch):
    _fails_at_layer_1(work, monkeypatch, "fail")


def test_failed_run_with_a_shard_in_flight_leaves_nothing(work, monkeypatch):
    """Layer 1's write fails while an earlier shard is still being written by the shard writer's own thread: the
    run waits for that write before removing its temporary directory (nothing is written into it afterwards)."""
    import threading

    _sharded(monkeypatch)
    started, writes = slow_save_file(monkeypatch, 0.5)
    _fails_at_layer_1(work, monkeypatch, "fail_inflight", before_failing=lambda: started.wait(10))
    assert started.is_set() and writes        # the write in flight finished before the directory went
    assert not any(t.name.startswith("shard-write") for t in threading.enumerate())


def test_existing_dir_refused_then_overwritten(work, monkeypatch):
    d = work / "exists"
    d.mkdir()
    model = make_checkpoint("olmoe", d / "model")
    out = d / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    cfg = write_config(d / "c.yaml", model, write_corpus(d), quant=MIXED, eval={"enabled": False},
                       calibration=FAST, output={"save": True, "dir": str(out)})
    with pytest.raises(UserError, match="already exists"):
        run_session(cfg)
    assert (out / "keep.txt").read_text() == "user data"
    # --overwrite replaces only an earlier AlphaQuant checkpoint (or an empty dir), never the user's files
    with pytest.raises(UserError, match="not an AlphaQuant checkpoint"):
        run_session(cfg, ["--output.overwrite"])
    assert (out / "keep.txt").read_text() == "user data"
    (out / "keep.txt").unlink()
    (out / "alphaquant_recipe.json").write_text("{}")                  # an earlier checkpoint of ours
    (out / "old-model.safetensors").write_bytes(b"old")
    # with overwrite (and small shards, for (e)): replaced, nothing of the old dir left
    _sharded(monkeypatch)
    s = run_session(cfg, ["--output.overwrite"])
    assert not (out / "old-model.safetensors").exists() and (out / "config.json").is_file()
    assert not [p.name for p in d.iterdir() if p.name.startswith(".out.tmp-")]
    for p in s.model.parameters():
        p.data = p.data.clone()                                        # see run()
    _CACHE[(str(work), "sharded")] = (s, out)


# --- (e) shards -------------------------------------------------------------------------------
def _sharded(monkeypatch):
    import alphaquant.export as export

    class Small(QuantizedCheckpointWriter):
        def __init__(self, *a, **k):
            super().__init__(*a, **{**k, "max_shard_size": "40KB"})

    monkeypatch.setattr(export, "QuantizedCheckpointWriter", Small)


def test_sharded_checkpoint_reads_back(work):
    if (str(work), "sharded") not in _CACHE:
        pytest.skip("needs test_existing_dir_refused_then_overwritten (writes the sharded checkpoint)")
    s, out = _CACHE[(str(work), "sharded")]
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) >= 3 and "model.safetensors" not in shards
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    assert "model.layers.1.mlp.experts.7.down_proj.weight_packed" in index["weight_map"]
    assert_exact(s, out)
    hf, info = hf_load(out)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    a = logits(s.model)
    assert (a - logits(hf)).abs().max() <= 1e-2 * a.abs().max()


@pytest.mark.parametrize("layers", [2, 4])
def test_the_last_layer_of_a_sharded_checkpoint_gets_shards_of_its_own(tmp_path, layers):
    """Once a checkpoint is sharded anyway, what the writer holds when one layer is left goes out then, so the end of
    the run writes that layer alone; a checkpoint that fits one shard stays one file. Layers of 400 bytes, shards of
    at most 1000: without the early roll, layers 2 and 3 of four would share the last shard."""
    from alphaquant import models
    model = models.from_pretrained(make_checkpoint("olmoe", tmp_path / "m", num_hidden_layers=layers), lazy=True)
    w = QuantizedCheckpointWriter(tmp_path / "out", model, {}, {}, max_shard_size=1000)
    for i in range(layers):
        w.add_layer(i, {f"model.layers.{i}.w": torch.full((100,), float(i))})
    w.shards.close()
    if layers == 2:
        assert [p.name for p in (tmp_path / "out").iterdir()] == ["model.safetensors"]
        return
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())["weight_map"]
    assert index == {"model.layers.0.w": "model-00001-of-00003.safetensors",
                     "model.layers.1.w": "model-00001-of-00003.safetensors",
                     "model.layers.2.w": "model-00002-of-00003.safetensors",
                     "model.layers.3.w": "model-00003-of-00003.safetensors"}
