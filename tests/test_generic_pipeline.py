"""The generic path end to end through the calibration session on tiny transformers models (CPU, seconds each).

References: transformers' own forward (routing as its experts receive it, tokens per expert, logits of the
checkpoint transformers loads back), and round-to-nearest with the same recipe (GPTQ must beat it).
"""
from __future__ import annotations

import re

import pytest
import torch

import tiny
from alphaquant.config.recipe import build_format
from pipeline_utils import assert_reads_back_exactly, run_session, write_config
from test_generic_models import hf_reference, make_hf_checkpoint

E2E = ["qwen3_moe", "deepseek_v3", "llama", "gpt_oss"]
# int4 everywhere: compressed-tensors decompresses int4 to the model dtype (fp32 here), so the checkpoint
# transformers loads back holds exactly our weights
QUANT = {"default": {"wq": "int4", "group_size": 32}, "overrides": [{"pattern": "lm_head", "skip": True}]}


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("generic")
    return root, tiny.write_corpus(root), {}


def run(work, model_type, **sections):
    root, corpus, cache = work
    key = (model_type, repr(sorted(sections.items())))
    if key not in cache:
        d = root / model_type
        if not d.exists():
            make_hf_checkpoint(model_type, d)
        out = root / f"out-{len(cache)}"
        sections = {"quant": QUANT, "eval": {"rtn": True}, "output": {"save": True, "dir": str(out)}, **sections}
        cache[key] = (run_session(write_config(root / f"{len(cache)}.yaml", d, corpus, **sections)), d, out)
    return cache[key]


def expert_modules(model):
    """(layer index, transformers experts module) of a transformers model."""
    from alphaquant.models.hf_experts import is_experts_module
    return [(i, m) for i, layer in enumerate(model.model.layers) for m in layer.modules() if is_experts_module(m)]


def reference_routing(hf, ids):
    """{layer: (top_k_index, top_k_weights)} as transformers' experts receive them on a forward of ids."""
    seen = {}

    def hook(i):
        def pre(_m, args, kwargs):
            seen[i] = [t for t in list(args[1:]) + list(kwargs.values()) if isinstance(t, torch.Tensor)]
        return pre
    handles = [m.register_forward_pre_hook(hook(i), with_kwargs=True) for i, m in expert_modules(hf)]
    with torch.no_grad():
        hf(ids)
    for h in handles:
        h.remove()
    return {i: (idx, w) if not idx.is_floating_point() else (w, idx) for i, (idx, w) in seen.items()}


@pytest.mark.parametrize("model_type", ["qwen3_moe", "deepseek_v3", "gpt_oss"])
def test_route_hook_sees_the_routing_transformers_applies(model_type, work):
    """Our route hook point, on our layer-by-layer model, against the arguments transformers' own experts
    forward is called with in transformers' own full model (softmax / sigmoid + bias + group top-k + scaling)."""
    from alphaquant.models import hf_backend
    root = work[0]
    d = root / f"{model_type}-route"
    make_hf_checkpoint(model_type, d, tokenizer=False)
    ours = hf_backend.from_pretrained(d, dtype="float32", lazy=False)
    seen = {}
    for i, layer in enumerate(ours.model.layers):
        for name, m in layer.named_modules():
            if name.endswith("experts.route"):
                m.register_forward_hook(lambda _m, _a, out, i=i: seen.setdefault(i, out))
    ids = torch.randint(0, 320, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours(ids)
    ref = reference_routing(hf_reference(d), ids)
    assert set(seen) == set(ref) and ref
    for i in ref:
        torch.testing.assert_close(seen[i][0], ref[i][0], rtol=0, atol=0)
        torch.testing.assert_close(seen[i][1], ref[i][1], rtol=1e-5, atol=1e-6)
    if model_type == "deepseek_v3":      # the scaling factor is in the weights as applied
        w = ref[1][1].sum(-1)
        torch.testing.assert_close(w, torch.full_like(w, 2.5), rtol=1e-5, atol=1e-5)


# GPT-OSS stores its experts fused on disk (no per-expert conversion in transformers), and our writer
# writes per-expert linears: transformers cannot load that checkpoint (a known gap, see the README)
LOADABLE = ["qwen3_moe", "deepseek_v3", "llama"]


def quantized_in_transformers(s, d, out, model_type):
    """transformers' own model holding our quantized weights: loaded from our checkpoint where transformers
    reads it, else transformers' fp model with our weights copied in (experts fused back per their layout)."""
    if model_type in LOADABLE:
        return hf_reference(out)
    hf = hf_reference(d)
    ours = dict(s.model.named_parameters())
    with torch.no_grad():
        for i, layer in enumerate(s.model.model.layers):
            for path, layout in s.model.experts[i].items():
                prefix = f"model.layers.{i}.{path}."
                split = {k[len(prefix):]: v for k, v in ours.items() if k.startswith(prefix)}
                E = s.model.model.layers[i].get_submodule(path).num_experts
                for name, t in layout.fuse(split, E).items():
                    hf.get_parameter(prefix + name).copy_(t)
        for k, p in hf.named_parameters():
            if k in ours:
                p.copy_(ours[k])
    return hf


@pytest.mark.parametrize("model_type", E2E)
def test_every_expert_calibrated_token_counts(model_type, work):
    """Every expert has a Hessian (tokens > 0, no fallback) and its token count equals the count made here
    with transformers' own model holding our quantized weights (so deeper layers see the quantized earlier
    ones, as in calibration)."""
    s, d, out = run(work, model_type)
    recs = s.results["records"]
    assert not s.results["fallbacks"]
    calib = s.windows["calib"]
    hf = quantized_in_transformers(s, d, out, model_type)
    ref_counts = {}
    with torch.no_grad():
        for b in range(0, calib.shape[0], 2):
            for i, (idx, _w) in reference_routing(hf, calib[b:b + 2]).items():
                E = next(m for j, m in expert_modules(hf) if j == i).down_proj.shape[0]
                ref_counts[i] = ref_counts.get(i, 0) + torch.bincount(idx.reshape(-1), minlength=E)
    if model_type == "llama":
        assert not ref_counts and s.adapter.family == "standard"
        assert all(r.tokens == calib.numel() for r in recs.values())
        return
    assert ref_counts
    for i, counts in ref_counts.items():
        for e, n in enumerate(counts.tolist()):
            names = [k for k in recs if k.startswith(f"model.layers.{i}.") and f".experts.{e}." in k]
            assert len(names) == 3, names
            for k in names:
                assert recs[k].tokens == n > 0, (k, recs[k].tokens, n)


@pytest.mark.parametrize("model_type", E2E)
def test_gptq_beats_rtn(model_type, work):
    """Model output error after GPTQ below round-to-nearest's (same recipe), and on layer 0's first group (its
    inputs are the fp embeddings, so the Hessian is computed here) GPTQ's output error below RTN's per linear."""
    from alphaquant.models import hf_backend
    s, d, _ = run(work, model_type)
    # random tiny models: perplexity moves either way under quantization noise, so the measure is the
    # logits' squared error against the fp model on the calibration windows (what GPTQ minimises layerwise)
    fp, rtn = (hf_backend.from_pretrained(d, dtype="float32", lazy=False) for _ in range(2))
    with torch.no_grad():
        for name, m in rtn.named_modules():
            spec = s.specs.get(name)
            if isinstance(m, torch.nn.Linear) and spec is not None and spec.quantized:
                m.weight.copy_(build_format(spec).fake_quantize(m.weight.float()))
        calib = s.windows["calib"]
        ref = fp(calib)
        e_gptq, e_rtn = ((s.model(calib) - ref).pow(2).mean(), (rtn(calib) - ref).pow(2).mean())
    assert e_gptq < e_rtn, (float(e_gptq), float(e_rtn))
    hf = hf_reference(d)
    layer0 = hf.model.layers[0]
    group = s.adapter.sequential_groups(s.model.model.layers[0])[0]
    xs = []
    h = layer0.get_submodule(group[0]).register_forward_pre_hook(lambda _m, a: xs.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        for b in range(0, s.windows["calib"].shape[0], 2):
            hf(s.windows["calib"][b:b + 2])
    h.remove()
    X = torch.cat(xs).double()
    H = X.T @ X
    for name in group:
        W = layer0.get_submodule(name).weight.double()
        Q = s.model.model.layers[0].get_submodule(name).weight.double()
        R = build_format(s.specs[f"model.layers.0.{name}"]).fake_quantize(W.float()).double()
        err = lambda A: torch.trace((A - W) @ H @ (A - W).T)  # noqa: E731
        assert err(Q) < err(R), name


@pytest.mark.parametrize("model_type", LOADABLE)
def test_checkpoint_loads_in_transformers(model_type, work):
    """The compressed-tensors checkpoint loads in transformers (no missing/unexpected keys) with our logits."""
    import transformers
    s, _, out = run(work, model_type)
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    ids = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a, b = s.model(ids), hf(ids).logits
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * float(a.abs().max()))


def test_gpt_oss_quantized_forward_matches_transformers(work):
    """GPT-OSS (interleaved gate/up, clamped SwiGLU, expert biases kept in full precision, sliding-window
    layers): our quantized model against transformers' forward with the same weights fused back."""
    s, d, out = run(work, "gpt_oss")
    hf = quantized_in_transformers(s, d, out, "gpt_oss")
    ids = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a, b = s.model(ids), hf(ids).logits
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * float(a.abs().max()))
    fp = hf_reference(d)
    for k in ("model.layers.0.mlp.experts.gate_up_proj_bias", "model.layers.1.mlp.experts.down_proj_bias"):
        assert torch.equal(hf.get_parameter(k), fp.get_parameter(k)), k     # biases not quantized


@pytest.mark.parametrize("mode", ["uniform", "all_experts"])
def test_hessian_modes(mode, work):
    """calibration.hessian on the generic path: uniform = routed tokens with weight 1 (Σw == tokens);
    all_experts = every calibration token through every expert (DeepSeek-V3: shared + routed)."""
    s, _, _ = run(work, "deepseek_v3", calibration={"hessian": mode}, output={"save": False})
    recs = s.results["records"]
    T = s.windows["calib"].numel()
    experts = {n: r for n, r in recs.items() if re.search(r"\.experts\.\d+\.", n)}
    assert experts and not s.results["fallbacks"]
    routed, _, _ = run(work, "deepseek_v3")
    for n, r in experts.items():
        if mode == "uniform":
            assert r.weight_sum == pytest.approx(r.tokens)
            if n.startswith("model.layers.1."):     # the first MoE layer: its inputs are the same in both runs
                assert r.tokens == routed.results["records"][n].tokens, n
        else:
            assert r.tokens == T, n
    if mode == "uniform":          # routed mode weights by the applied routing weights (scaled by 2.5 here)
        assert any(abs(r.weight_sum - r.tokens) > 1e-3 for n, r in routed.results["records"].items() if n in experts)


@pytest.mark.parametrize("model_type", E2E)
def test_load_quantized_generic_exact(model_type, work):
    """Our reader gives back exactly the quantized model (every tensor, the logits), GPT-OSS included."""
    from alphaquant.arch.generic_checkpoint import load_quantized_generic
    s, _, out = run(work, model_type)
    q = load_quantized_generic(out, dtype="fp32")
    assert_reads_back_exactly(s.model, q)


def test_eval_only_reads_a_generic_checkpoint(work, capsys):
    """--eval-only (alphaquant.export.load_quantized) dispatches a non-local model type to the generic reader
    and evaluates the same perplexity the run itself measured for its quantized model (same eval windows)."""
    import json

    from alphaquant.app import main
    s, _, out = run(work, "qwen3_moe")
    root, corpus, _ = work
    cfg = write_config(root / "eval_only.yaml", out, corpus, model={"path": str(out), "dtype": "float32"})
    assert main(["--config", str(cfg), "--eval-only", str(out)]) == 0
    printed = capsys.readouterr().out
    got = json.loads(printed[printed.index("{"):])["perplexity"]
    assert got == pytest.approx(s.results["perplexity"]["quantized"], rel=1e-4)


@pytest.mark.parametrize("model_type", ["qwen3_moe", "llama"])
def test_gptaq_generic_early_stop_exact(model_type, work, monkeypatch):
    """gptq.asymmetric on transformers' own classes: the fp copy of each layer stops once its group's inputs exist,
    with the same quantized weights as a run whose forwards all go to the end, and not those of plain GPTQ."""
    from alphaquant.callbacks.hessian import HessianCollector

    def linears(s):
        return {n: m.weight.detach().clone() for n, m in s.model.named_modules() if isinstance(m, torch.nn.Linear)}
    plain = linears(run(work, model_type, eval={"enabled": False})[0])
    early = linears(run(work, model_type, eval={"enabled": False}, gptq={"asymmetric": True})[0])
    init = HessianCollector.__init__

    def no_early_stop(self, *a, **k):
        init(self, *a, **k)
        self.early_stop = False
    monkeypatch.setattr(HessianCollector, "__init__", no_early_stop)
    # block_size 128 is the default: it only gives this run its own key in the fixture's cache
    full = linears(run(work, model_type, eval={"enabled": False}, gptq={"asymmetric": True, "block_size": 128})[0])
    assert all(torch.equal(early[n], full[n]) for n in early)
    assert any(not torch.equal(early[n], plain[n]) for n in early if ".layers.1." in n)
