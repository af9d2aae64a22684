"""gptq.expert_chunk: a bucket's experts solved N at a time (callbacks/solve.py) give the same weights as one call.

GPTQ treats experts independently, so chunking must not change a bit of the weights, params, g_idx and proxy
losses on CPU (the reported relative error, a batched einsum, to float32 rounding): checked through the solve callback
on a synthetic MoE layer (plain, act order + dynamic groups, an expert with no tokens, gptq.asymmetric and
quant.budget_bits) and through the whole pipeline on a tiny Mixtral. The memory estimate's solve term is checked
against counts written here, and a subprocess measures that a chunked solve's peak host memory really drops.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import tiny
from alphaquant.config.recipe import resolve_recipe
from alphaquant.config.run import load_config
from alphaquant.errors import ConfigError
from alphaquant.gptq import HessianState
from pipeline_utils import run_session, write_config

ROOT = Path(__file__).resolve().parents[1]


# --- a synthetic MoE layer through the solve callback ----------------------------------------------------------

class _Expert(torch.nn.Module):
    def __init__(self, hidden, inter):
        super().__init__()
        self.w1 = torch.nn.Linear(hidden, inter, bias=False)
        self.w3 = torch.nn.Linear(hidden, inter, bias=False)
        self.w2 = torch.nn.Linear(inter, hidden, bias=False)


class _Layer(torch.nn.Module):
    def __init__(self, experts, hidden, inter, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.experts = torch.nn.ModuleList(_Expert(hidden, inter) for _ in range(experts))


class _Collector:
    """What GPTQSolve reads of the HessianCollector: keys, states, and (asymmetric) cross terms and the target."""

    def __init__(self, layer, group, experts, seed=0, empty=(), asymmetric=False):
        from alphaquant.callbacks.hessian import HessianCollector
        g = torch.Generator().manual_seed(seed)
        self.keys, self.states, self.cross, self.asymmetric = {}, {}, {}, asymmetric
        self._target = HessianCollector.asymmetric_target
        for e in range(experts):
            for n in group:
                name = f"experts.{e}.{n}"
                key = f"experts.{e}.in" if n in ("w1", "w3") else name
                self.keys[name] = key
                if key in self.states:
                    continue
                cols = layer.get_submodule(name).in_features
                st = HessianState.zeros(cols)
                if e not in empty:
                    x = torch.randn(48 + 16 * e, cols, generator=g) * torch.linspace(0.2, 2.0, cols)
                    x[:, 3] = 0                                           # a dead input channel
                    st.add(x, weight=torch.rand(x.shape[0], generator=g))
                    self.cross[key] = 0.1 * torch.randn(cols, cols, generator=g) @ st.H / x.shape[0]
                else:
                    self.cross[key] = torch.zeros(cols, cols)
                self.states[key] = st

    def asymmetric_target(self, W, H, keys, damp):
        return self._target(self, W, H, keys, damp)


def _specs(layer, overrides=(), budget=None):
    linears = [(n, m.in_features, m.out_features) for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)]
    argv = ["--model.path", "unused", "--quant.default.wq", "int4", "--quant.default.group_size", "16", *overrides]
    if budget is not None:
        argv += ["--quant.budget_bits", str(budget), "--quant.budget_candidates", "[int2, int4, int8]"]
    q = load_config(None, argv).quant
    return resolve_recipe(q, linears), (q if budget is not None else None)


def _solve(chunk, *, group=("w1", "w3"), experts=5, opts=None, empty=(), asymmetric=False, budget=None,
           overrides=()):
    """(layer weights, records, the chunk used) of one GPTQSolve pass over `group` of a fresh synthetic layer."""
    from alphaquant.callbacks.solve import GPTQSolve
    from alphaquant.pipeline.calibrate import solver_options
    layer = _Layer(experts, hidden=64, inter=32)
    specs, quant = _specs(layer, overrides, budget)
    g = load_config(None, ["--model.path", "unused", "--gptq.sweep", "torch"]).gptq
    for k, v in (opts or {}).items():
        setattr(g, k, v)
    solve = GPTQSolve(_Collector(layer, group, experts, empty=empty, asymmetric=asymmetric), specs,
                      lambda i: "", solver_options(g), budget=quant, expert_chunk=chunk)
    runner = SimpleNamespace(plan=SimpleNamespace(phase="collect", layer_index=0), block=layer)
    solve.on_predict_end(None, runner)
    return {k: v.clone() for k, v in layer.state_dict().items()}, solve.records, solve.chunks


def _assert_same(a, b):
    wa, ra, _ = a
    wb, rb, _ = b
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    assert ra.keys() == rb.keys() and ra
    for n in ra:
        x, y = ra[n], rb[n]
        assert x.spec == y.spec and x.fallback == y.fallback, n
        assert (x.loss, x.tokens, x.weight_sum) == (y.loss, y.tokens, y.weight_sum), n
        # the reported tr(ΔW H ΔWᵀ) / tr(W H Wᵀ): a batched einsum whose summation order may follow the batch size
        assert x.rel_error == pytest.approx(y.rel_error, rel=1e-5), n
        assert torch.equal(x.params.scale, y.params.scale), n
        assert (x.params.zero is None) == (y.params.zero is None)
        if x.params.zero is not None:
            assert torch.equal(x.params.zero, y.params.zero), n
        assert x.params.extra.keys() == y.params.extra.keys()
        for k in x.params.extra:
            assert torch.equal(torch.as_tensor(x.params.extra[k]), torch.as_tensor(y.params.extra[k])), (n, k)
        assert (x.g_idx is None) == (y.g_idx is None)
        if x.g_idx is not None:
            assert torch.equal(x.g_idx, y.g_idx), n
        assert x.extra == y.extra, n


@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 7])
def test_chunked_solve_is_bit_identical(chunk):
    whole = _solve(0, empty=(2,))
    assert whole[1]["experts.2.w1"].fallback == "no tokens"
    assert set(whole[2].values()) == {5}
    part = _solve(chunk, empty=(2,))
    assert set(part[2].values()) == {min(chunk, 5)}
    _assert_same(whole, part)


@pytest.mark.parametrize("opts, overrides", [
    ({"act_order": True, "static_groups": False, "scale_search": "mse_hdiag"}, ()),
    ({"act_order": False, "scale_search": "none"}, ("--quant.default.wq", "mxfp4", "--quant.default.group_size", "32")),
    ({}, ("--quant.default.wq", "nvfp4", "--quant.default.group_size", "16")),
    ({}, ("--quant.default.sym", "false",)),
])
def test_chunked_solve_is_bit_identical_across_options(opts, overrides):
    _assert_same(_solve(0, group=("w2",), opts=opts, overrides=overrides),
                 _solve(2, group=("w2",), opts=opts, overrides=overrides))


def test_chunked_asymmetric_target_is_bit_identical():
    whole = _solve(0, asymmetric=True, empty=(4,))
    _assert_same(whole, _solve(2, asymmetric=True, empty=(4,)))
    _assert_same(whole, _solve(1, asymmetric=True, empty=(4,)))
    plain = _solve(0, empty=(4,))
    assert not torch.equal(whole[0]["experts.0.w1.weight"], plain[0]["experts.0.w1.weight"])   # the target was used


def test_chunked_budget_is_bit_identical():
    whole = _solve(0, budget=3.5)
    assert {r.extra["budget_choice"]["wq"] for r in whole[1].values()} > {"int4"} or len(
        {r.spec for r in whole[1].values()}) > 1                     # the budget chose between candidates
    _assert_same(whole, _solve(2, budget=3.5))
    _assert_same(whole, _solve(1, budget=3.5))


def test_auto_chunk_from_free_memory():
    from alphaquant.callbacks.solve import GPTQSolve, auto_chunk
    from alphaquant.pipeline.memory_plan import solve_stack_bytes
    per = solve_stack_bytes(4096, 14336)            # Mixtral-8x7B's down_proj: one expert's solve
    assert per == (3 * 14336 * 14336 + 4 * 4096 * 14336) * 4
    result = 8 * 4096 * 14336 * 4                  # the bucket's fp32 result, allocated once
    assert auto_chunk(8, 4096, 14336, free_bytes=100 * 2**30) == 8      # an H200: all at once, as before
    assert auto_chunk(8, 4096, 14336, free_bytes=int((3.2 * per + result) / 0.9)) == 3
    assert auto_chunk(8, 4096, 14336, free_bytes=int((2.9 * per + result) / 0.9)) == 2
    assert auto_chunk(8, 4096, 14336, free_bytes=0) == 1                # never 0: one at a time at the least
    # quant.budget_bits keeps one result per candidate: 4 candidates leave room for fewer stacks per call
    assert auto_chunk(8, 4096, 14336, free_bytes=int((3.2 * per + 4 * result) / 0.9), results=4) == 3
    assert auto_chunk(8, 4096, 14336, free_bytes=int((3.2 * per + result) / 0.9), results=4) == 1
    asym = solve_stack_bytes(4096, 14336, asymmetric=True)
    assert asym == (5 * 14336 * 14336 + 4 * 4096 * 14336) * 4
    assert auto_chunk(8, 4096, 14336, free_bytes=int((2.5 * per + result) / 0.9), asymmetric=True) == 1
    solve = GPTQSolve(None, {}, None, {}, expert_chunk="auto")
    assert solve._chunk(torch.zeros(1, 4, 4), 8) == 8                    # CPU tensors: all at once
    assert GPTQSolve(None, {}, None, {}, expert_chunk=3)._chunk(torch.zeros(1, 4, 4), 8) == 3
    assert GPTQSolve(None, {}, None, {}, expert_chunk=30)._chunk(torch.zeros(1, 4, 4), 8) == 8
    assert GPTQSolve(None, {}, None, {}, expert_chunk=0)._chunk(torch.zeros(1, 4, 4), 8) == 8


# --- the pipeline on a tiny Mixtral ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    root = tmp_path_factory.mktemp("chunk")
    return root, tiny.write_corpus(root), tiny.make_checkpoint("mixtral", root / "mixtral", num_local_experts=5)


def _run(mixtral, name, **gptq):
    root, corpus, model = mixtral
    cfg = write_config(root / f"{name}.yaml", model, corpus, eval={"enabled": False},
                       calibration={"num_samples": 6, "seq_len": 48, "batch_size": 3},
                       gptq={"sweep": "torch", **gptq})
    s = run_session(cfg)
    return {k: v.clone() for k, v in s.model.state_dict().items()}, s.results


@pytest.mark.parametrize("gptq", [{}, {"asymmetric": True}], ids=["plain", "asymmetric"])
def test_pipeline_chunked_is_bit_identical(mixtral, gptq):
    whole, res0 = _run(mixtral, "whole", expert_chunk=0, **gptq)
    part, res2 = _run(mixtral, "part", expert_chunk=2, **gptq)       # 5 experts: chunks of 2, 2 and 1
    assert whole.keys() == part.keys()
    for k in whole:
        assert torch.equal(whole[k], part[k]), k
    assert res0["fallbacks"] == res2["fallbacks"]
    for a, b in zip(res0["layers"], res2["layers"], strict=True):
        assert (a["layer"], a["modules"], a["fallbacks"]) == (b["layer"], b["modules"], b["fallbacks"])
        assert a["mean_rel_error"] == pytest.approx(b["mean_rel_error"], rel=1e-5)


def test_pipeline_budget_chunked_is_bit_identical(mixtral):
    root, corpus, model = mixtral
    runs = []
    for chunk in (0, 1):
        cfg = write_config(root / f"budget{chunk}.yaml", model, corpus, eval={"enabled": False},
                           calibration={"num_samples": 6, "seq_len": 48, "batch_size": 3},
                           quant={"default": {"wq": "int4", "group_size": 32}, "budget_bits": 4.0,
                                  "budget_candidates": ["int2", "int4", "int8"],
                                  "overrides": [{"pattern": "*.gate", "skip": True}, {"pattern": "lm_head", "skip": True}]},
                           gptq={"sweep": "torch", "expert_chunk": chunk})
        runs.append(run_session(cfg))
    a, b = (dict(s.model.state_dict()) for s in runs)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert {n: s.wq for n, s in runs[0].specs.items()} == {n: s.wq for n, s in runs[1].specs.items()}


# --- config -----------------------------------------------------------------------------------------------------

def test_config_values_and_errors():
    def gptq(*argv):
        return load_config(None, ["--model.path", "unused", *argv]).gptq
    assert gptq().expert_chunk == "auto"
    assert gptq("--gptq.expert_chunk", "0").expert_chunk == 0
    assert gptq("--gptq.expert_chunk", "2").expert_chunk == 2
    with pytest.raises(ConfigError, match=r"gptq\.expert_chunk must be auto, 0 .* or a positive number of experts "
                                          r"per solve; got -1"):
        gptq("--gptq.expert_chunk", "-1")
    with pytest.raises(ConfigError, match=r"gptq\.expert_chunk must be an integer or 'auto'; got 'all'"):
        gptq("--gptq.expert_chunk", "all")
    with pytest.raises(ConfigError, match=r"gptq\.expert_chunk must be an integer or 'auto'; got 1\.5"):
        gptq("--gptq.expert_chunk", "1.5")


def test_resume_fingerprint_ignores_the_chunk():
    from alphaquant.pipeline.resume import fingerprint
    cfg = lambda *a: load_config(None, ["--model.path", "unused", *a])     # noqa: E731
    assert fingerprint(cfg("--gptq.expert_chunk", "1")) == fingerprint(cfg())
    assert fingerprint(cfg("--gptq.damp", "0.1")) != fingerprint(cfg())


# --- the memory estimate -----------------------------------------------------------------------------------------

def test_estimate_solve_term_scales_with_the_chunk():
    from alphaquant.pipeline.memory_plan import LayerShape, ModelShape, estimate_peak_memory
    # Mixtral-8x7B's down_proj group: 8 stacks [4096, 14336], fp32 weights 8 x 4096 x 14336 x 4 bytes
    gw = 8 * 4096 * 14336 * 4
    layer = LayerShape(weight_bytes=0, hessian_bytes=8 * 14336 ** 2 * 4, group_weight_fp32_bytes=gw,
                       token_activation_bytes=0, solve_groups=((8 * 14336 ** 2 * 4, gw, ((8, 4096, 14336),)),))
    shape = ModelShape(hidden_size=4096, dtype_bytes=2, embed_bytes=0, outside_bytes=0, layers=[layer])

    def solve(**kw):
        return estimate_peak_memory(shape, num_samples=1, seq_len=1, batch_size=1, **kw)["solve"]
    # per stack in a call: 3 Hessian-sized [14336, 14336] fp32 tensors and 4 weight-sized [4096, 14336] ones
    per = (3 * 14336 * 14336 + 4 * 4096 * 14336) * 4
    assert per == 3_405_774_848
    assert solve() == solve(expert_chunk="auto") == solve(expert_chunk=8) == solve(expert_chunk=99) == 2 * gw + 8 * per
    assert solve(expert_chunk=2) == 2 * gw + 2 * per
    assert solve(expert_chunk=1) == 2 * gw + per == 7_163_871_232       # 6.67 GiB instead of 28.9
    asym = estimate_peak_memory(shape, num_samples=1, seq_len=1, batch_size=1, expert_chunk=1, asymmetric=True)
    assert asym["solve"] == 2 * gw + (5 * 14336 * 14336 + 4 * 4096 * 14336) * 4
    est = estimate_peak_memory(shape, num_samples=1, seq_len=1, batch_size=1, expert_chunk=1)
    assert est["gpu"]["activations or solve"] == est["solve"] and est["solve_chunk_1"] == est["solve"]


def test_estimate_buckets_of_a_tiny_mixtral(mixtral, capsys):
    from alphaquant.arch import get_adapter
    from alphaquant.models.loading import skeleton
    from alphaquant.pipeline.memory_plan import model_shape, plan_memory, render_memory
    _, _, path = mixtral
    model = skeleton(path, "bfloat16")
    adapter = get_adapter(model)
    cfg = load_config(None, ["--model.path", str(path), "--quant.default.group_size", "32",
                             "--trainer.accelerator", "gpu", "--gptq.expert_chunk", "2"])
    specs = resolve_recipe(cfg.quant, adapter.linear_modules(model))
    groups = model_shape(model, adapter, specs).layers[0].solve_groups
    # hidden 64, 5 experts of intermediate 64. q [64, 64] and k, v [32, 64] share an input but not a spec (its shape):
    # q is one stack, k and v another, of one bucket each; o one; w1/w3 stack by expert [128, 64], w2 [64, 64]
    assert [sorted(bs) for *_, bs in groups] == [[(1, 64, 64), (1, 64, 64)], [(1, 64, 64)], [(5, 128, 64)],
                                                 [(5, 64, 64)]]
    assert [gw for _, gw, _ in groups] == [128 * 64 * 4, 64 * 64 * 4, 5 * 128 * 64 * 4, 5 * 64 * 64 * 4]
    assert [hb for hb, *_ in groups] == [64 * 64 * 4, 64 * 64 * 4, 5 * 64 * 64 * 4, 5 * 64 * 64 * 4]
    est = plan_memory(cfg, model, adapter, specs)
    per = lambda r, c: (3 * c * c + 4 * r * c) * 4                     # noqa: E731
    assert est["solve"] == 2 * 5 * 128 * 64 * 4 + 2 * per(128, 64)       # gate/up, 2 experts per call
    # the solve coexists with its own group's Hessians (here as large as the largest group's)
    assert est["gpu"]["activations or solve"] == max(est["activations"], est["solve"])
    text = render_memory(cfg, est)
    assert "GPTQ solve: up to 5 experts per bucket, 2 at a time (gptq.expert_chunk 2)" in text, text
    one = est["gpu_total"] - est["gpu"]["activations or solve"] + max(est["activations"], est["solve_chunk_1"])
    assert est["solve_chunk_1"] == 2 * 5 * 128 * 64 * 4 + per(128, 64) and est["gpu_total_chunk_1"] == one
    line = next(ln for ln in text.splitlines() if "GPTQ solve" in ln)
    assert line.endswith(f"; with gptq.expert_chunk 1: {est['solve_chunk_1'] / 2**20:.1f} MiB, peak GPU memory "
                         f"~{est['gpu_total_chunk_1'] / 2**20:.1f} MiB"), line


# --- peak memory, measured --------------------------------------------------------------------------------------

PEAK_SCRIPT = textwrap.dedent("""
    import json, os, sys, threading, time, torch
    sys.path[:0] = [sys.argv[2], sys.argv[2] + "/tests"]
    torch.set_num_threads(1)
    import test_expert_chunk as t
    from alphaquant.callbacks.solve import GPTQSolve
    from alphaquant.pipeline.calibrate import solver_options
    E, H, I = 8, 256, 1024
    layer = t._Layer(E, hidden=H, inter=I)
    specs, _ = t._specs(layer)
    g = t.load_config(None, ["--model.path", "unused"]).gptq
    solve = GPTQSolve(t._Collector(layer, ("w2",), E), specs, lambda i: "", solver_options(g),
                      expert_chunk=int(sys.argv[1]))
    runner = t.SimpleNamespace(plan=t.SimpleNamespace(phase="collect", layer_index=0), block=layer)
    # the resident set sampled every 0.2 ms while the solve runs (torch ops release the GIL), not ru_maxrss: a
    # high-water mark from before the solve (seen after other tests had run in the parent) would hide its peak
    page = os.sysconf("SC_PAGE_SIZE") // 1024
    rss = lambda: int(open("/proc/self/statm").read().split()[1]) * page
    base, peak, done = rss(), [0], threading.Event()
    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.0002)
    th = threading.Thread(target=sample)
    th.start()
    solve.on_predict_end(None, runner)
    done.set()
    th.join()
    print(json.dumps({"peak_kib": max(peak[0], rss()) - base}))
""")


def _peak_kib(*chunks: int) -> list[int]:
    """The solve's peak per chunk, one fresh process each, run side by side (one thread each; each measures its
    own resident set, so they do not disturb each other's numbers)."""
    # a fixed mmap threshold: glibc returns every freed tensor to the system at once (its dynamic threshold
    # would keep freed 4 MiB blocks in the heap and blur the peak)
    procs = [subprocess.Popen([sys.executable, "-c", PEAK_SCRIPT, str(c), str(ROOT)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, cwd=ROOT,
                              env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}) for c in chunks]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    return [json.loads(out.strip().splitlines()[-1])["peak_kib"] for out, _ in outs]


def test_chunked_solve_peak_memory_drops():
    """8 experts' down_proj [256, 1024]: one Hessian is 4 MiB; solved all at once the solve adds ~8 x (3 Hessians +
    4 weights) = 128 MiB above the collected Hessians, one at a time ~16 MiB (resident set of a fresh process)."""
    whole, one = _peak_kib(0, 1)
    assert whole > 80 * 1024, whole
    assert one < 0.4 * whole, (one, whole)
