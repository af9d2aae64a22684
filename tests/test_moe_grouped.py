"""SparseMoeBlock's grouped experts path (grouped matmuls over all experts, models/common/moe.py) against
its per-expert loop, and the rules that send a forward to the loop.

Tolerances: float32 on CPU, tight (rtol 1e-6, atol 1e-7: the two paths call the same matmul per group on
CPU and in practice agree bit for bit; the bound leaves room for another BLAS). bf16: the loop and the
grouped kernels may accumulate in a different order (on CUDA they are different kernels), so each output
may differ by a bf16 rounding of its terms; the bound is 1% of the output's norm (relative Frobenius
error), a few bf16 ulps, well below the ~3% a bf16 forward differs from the float32 one. On CPU they agree
bit for bit here too.
"""
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from alphaquant import models
from alphaquant.models.common import moe
from alphaquant.models.common.moe import ExpertRoute, SparseMoeBlock

import tiny


@pytest.fixture(autouse=True)
def _auto_grouped_on_cpu(monkeypatch):
    """"auto" takes the grouped path on CPU here too, so its rules are tested without a GPU."""
    monkeypatch.setattr(moe, "GROUPED_ON_CPU", True)


def family_model(family: str, dtype=torch.float32, **overrides):
    cfg = {**tiny.BASE, **tiny.FAMILIES[family], "num_hidden_layers": 2, **overrides}
    return models.from_config(cfg, seed=0).to(dtype)


def moe_block(model) -> SparseMoeBlock:
    return next(m for m in model.modules() if isinstance(m, SparseMoeBlock))


def block_outputs(block: SparseMoeBlock, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The block's output on x under each forced path (and which path each forward took)."""
    out = {}
    with torch.no_grad():
        for impl in ("grouped", "loop"):
            block.experts_impl = impl
            out[impl] = block(x)
            assert block.last_experts_impl == impl
    block.experts_impl = "auto"
    return out


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def tokens(n: int = 96, hidden: int = 64, dtype=torch.float32, seed: int = 1) -> torch.Tensor:
    return torch.randn(2, n // 2, hidden, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("family", list(tiny.FAMILIES))
def test_grouped_equals_loop_float32(family):
    """All four families (Qwen2-MoE: shared expert + sigmoid gate; DeepSeek: shared experts; Mixtral: fp32
    routing weights), float32: the grouped path is the loop to rounding."""
    block = moe_block(family_model(family))
    x = tokens()
    out = block_outputs(block, x)
    assert out["loop"].std() > 0
    torch.testing.assert_close(out["grouped"], out["loop"], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("family", list(tiny.FAMILIES))
def test_grouped_equals_loop_whole_model(family):
    """Logits of the whole model with every block forced to one path."""
    model = family_model(family)
    ids = torch.randint(0, tiny.BASE["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(3))
    logits = {}
    with torch.no_grad():
        for impl in ("grouped", "loop"):
            for b in model.modules():
                if isinstance(b, SparseMoeBlock):
                    b.experts_impl = impl
            logits[impl] = model(ids)
    torch.testing.assert_close(logits["grouped"], logits["loop"], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("family", ["olmoe", "qwen2_moe", "deepseek_moe", "mixtral"])
def test_grouped_equals_loop_bf16(family):
    block = moe_block(family_model(family, torch.bfloat16))
    x = tokens(dtype=torch.bfloat16)
    out = block_outputs(block, x)
    assert out["grouped"].dtype == torch.bfloat16
    assert rel_err(out["grouped"], out["loop"]) < 1e-2


def test_empty_experts():
    """Experts that get no token (count 0: an empty group of the grouped matmul), in the middle and at both ends."""
    block = moe_block(family_model("olmoe"))
    with torch.no_grad():
        for e in (0, 3, 7):
            block.gate.weight[e] = -100.0          # never in the top-k (the tokens' entries are positive)
    x = tokens().abs() + 0.05
    with torch.no_grad():
        ids, w = block.router(block.gate(x.reshape(-1, 64)))
    counts = ExpertRoute(ids, w, 8).counts
    assert [counts[e] for e in (0, 3, 7)] == [0, 0, 0] and sum(counts) == ids.numel()
    out = block_outputs(block, x)
    torch.testing.assert_close(out["grouped"], out["loop"], rtol=1e-6, atol=1e-7)
    # top-1 with all tokens on one expert: every other group empty
    block = moe_block(family_model("olmoe", num_experts_per_tok=1))
    with torch.no_grad():
        block.gate.weight.fill_(-100.0)
        block.gate.weight[5] = 0.0
        ids, w = block.router(block.gate(x.reshape(-1, 64)))
    assert ExpertRoute(ids, w, 8).counts == [0] * 5 + [ids.numel()] + [0] * 2
    out = block_outputs(block, x)
    torch.testing.assert_close(out["grouped"], out["loop"], rtol=1e-6, atol=1e-7)


def test_auto_takes_grouped_when_nothing_needs_the_experts():
    block = moe_block(family_model("qwen2_moe"))
    x = tokens()
    assert block.grouped_blocker(x.reshape(-1, 64)) is None
    with torch.no_grad():
        block(x)
    assert block.last_experts_impl == "grouped"


def test_hook_on_one_expert_linear_takes_the_loop():
    block = moe_block(family_model("olmoe"))
    x = tokens()
    with torch.no_grad():
        expected = block_outputs(block, x)["loop"]
    seen = []
    handle = block.experts[2].down_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[0]))
    assert "experts.2.down_proj has forward hooks" == block.grouped_blocker(x.reshape(-1, 64))
    with torch.no_grad():
        got = block(x)
        assert block.last_experts_impl == "loop"
        assert len(seen) == 1 and seen[0] > 0           # the hook fired, on expert 2's tokens
        block.experts_impl = "grouped"
        with pytest.raises(RuntimeError, match="experts.2.down_proj has forward hooks"):
            block(x)
    block.experts_impl = "auto"
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    handle.remove()
    with torch.no_grad():
        block(x)
    assert block.last_experts_impl == "grouped" and len(seen) == 1


def test_other_reasons_for_the_loop():
    block = moe_block(family_model("mixtral"))
    x = tokens().reshape(-1, 64)
    assert block.grouped_blocker(x) is None
    # a forward hook on an expert module itself
    h = block.experts[1].register_forward_hook(lambda *a: None)
    assert "expert 1 has forward hooks" == block.grouped_blocker(x)
    h.remove()
    # route_all_tokens
    block.route_all_tokens = True
    assert block.grouped_blocker(x) == "route_all_tokens is set"
    block.route_all_tokens = False
    # a global module hook
    h = nn.modules.module.register_module_forward_pre_hook(lambda *a: None)
    try:
        assert "global" in block.grouped_blocker(x)
    finally:
        h.remove()
    # an expert linear replaced by a subclass (a wrapper), or given a bias
    orig = block.experts[0].w2

    class Wrapped(nn.Linear):
        pass
    with torch.no_grad():           # new linears' weights want gradients: the autograd rule would answer first
        block.experts[0].w2 = Wrapped(orig.in_features, orig.out_features, bias=False)
        assert "experts.0.w2 is not a plain nn.Linear" in block.grouped_blocker(x)
        block.experts[0].w2 = nn.Linear(orig.in_features, orig.out_features, bias=True)
        assert block.grouped_blocker(x) == "experts.0.w2 has a bias"
    block.experts[0].w2 = orig
    # a dtype the input does not have
    assert "is torch.float32" in block.grouped_blocker(x.to(torch.bfloat16))
    # autograd recording with weights that want gradients
    block.experts[3].w1.weight.requires_grad_(True)
    assert "autograd" in block.grouped_blocker(x)
    with torch.no_grad():
        assert block.grouped_blocker(x) is None
    block.experts[3].w1.weight.requires_grad_(False)
    assert block.grouped_blocker(x) is None
    block.experts_impl = "fast"
    with pytest.raises(ValueError, match="experts_impl"):
        block(x)


def test_activation_quantization_takes_the_loop():
    """alphaquant.pipeline.activations installs input fake-quantization as pre-hooks on the expert linears."""
    from alphaquant.pipeline.activations import activation_hooks

    model = family_model("olmoe")
    layer = model.model.layers[0]
    block = layer.mlp
    x = tokens()
    with torch.no_grad():
        plain = block(x)
    assert block.last_experts_impl == "grouped"
    specs = {n: SimpleNamespace(aq="int8", skip=False)
             for n, m in layer.named_modules() if isinstance(m, nn.Linear) and ".experts." in f".{n}"}
    handles = activation_hooks(layer, "", specs)
    assert handles
    with torch.no_grad():
        quant = block(x)
    assert block.last_experts_impl == "loop"
    assert not torch.equal(quant, plain)       # the hooks ran
    for h in handles:
        h.remove()


def test_weights_written_between_forwards_are_used():
    """The solver writes quantized weights into the expert linears in place between passes; the grouped path
    stacks them every forward, so it can never use stale ones."""
    block = moe_block(family_model("deepseek_moe"))
    x = tokens()
    before = block_outputs(block, x)["grouped"]
    with torch.no_grad():
        for m in block.experts:
            m.down_proj.weight.mul_(0.5).round_()
            m.gate_proj.weight.copy_(m.gate_proj.weight.flip(0))
    out = block_outputs(block, x)
    assert not torch.allclose(out["grouped"], before)
    torch.testing.assert_close(out["grouped"], out["loop"], rtol=1e-6, atol=1e-7)


def test_grouped_path_never_reads_counts_to_the_host(monkeypatch):
    """The grouped path uses only the device-side offsets (`ends`): no `counts` / `start` (host lists)."""
    block = moe_block(family_model("qwen2_moe"))
    x = tokens()

    def refuse(self):
        raise AssertionError("counts read on the grouped path")
    monkeypatch.setattr(ExpertRoute, "counts", property(refuse))
    monkeypatch.setattr(ExpertRoute, "start", property(refuse))
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: refuse(self))
    with torch.no_grad():
        block.experts_impl = "grouped"
        block(x)
        block.experts_impl = "loop"
        with pytest.raises(AssertionError, match="counts read"):
            block(x)


def test_lazy_counts_equal_bincount():
    ids = torch.tensor([[0, 2], [2, 1], [4, 2], [0, 4]])
    w = torch.rand(4, 2)
    route = ExpertRoute(ids, w, 6)
    assert torch.equal(route.count_tensor, torch.bincount(ids.reshape(-1), minlength=6))
    assert route.counts == [2, 1, 3, 0, 2, 0]
    assert route.start == [0, 2, 3, 6, 6, 8]
    assert route.ends.tolist() == [2, 3, 6, 6, 8, 8]
    assert route.experts.tolist() == sorted(ids.reshape(-1).tolist())
    assert route.token_idx[route.rows(2)].tolist() == [0, 1, 2]


def test_auto_on_cpu_takes_the_loop(monkeypatch):
    monkeypatch.setattr(moe, "GROUPED_ON_CPU", False)
    block = moe_block(family_model("olmoe"))
    with torch.no_grad():
        block(tokens())
        assert block.last_experts_impl == "loop"
        block.experts_impl = "grouped"
        block(tokens())
        assert block.last_experts_impl == "grouped"


def test_grouped_mm_accepts_cpu_dtypes():
    """What this torch's CPU grouped matmul takes: float32, bf16, fp16; not float64 (the loop runs)."""
    cpu = torch.device("cpu")
    assert moe.grouped_mm_accepts(cpu, torch.float32, 64, 32)
    assert moe.grouped_mm_accepts(cpu, torch.bfloat16, 64, 32)
    assert moe.grouped_mm_accepts(cpu, torch.float16, 64, 32)
    assert not moe.grouped_mm_accepts(cpu, torch.float64, 64, 32)
    block = moe_block(family_model("olmoe", torch.float64))
    x = tokens(dtype=torch.float64)
    with torch.no_grad():
        block(x)
    assert block.last_experts_impl == "loop"


# ---- CUDA (skipped without a GPU; run on the H200 with `pytest -q -m gpu tests/test_moe_grouped.py`) ----------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("family", ["olmoe", "qwen2_moe", "mixtral"])
def test_cuda_bf16_grouped_equals_loop(family):
    block = moe_block(family_model(family, torch.bfloat16)).cuda()
    x = tokens(n=512, dtype=torch.bfloat16).cuda()
    assert block.grouped_blocker(x.reshape(-1, 64)) is None, block.grouped_blocker(x.reshape(-1, 64))
    out = block_outputs(block, x)
    assert rel_err(out["grouped"], out["loop"]) < 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_grouped_forward_has_no_host_sync():
    block = moe_block(family_model("olmoe", torch.bfloat16)).cuda()
    x = tokens(n=512, dtype=torch.bfloat16).cuda()
    with torch.no_grad():
        block(x)                                     # warm-up: the one-time grouped_mm probe
        assert block.last_experts_impl == "grouped"
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            block(x)
        finally:
            torch.cuda.set_sync_debug_mode("default")


# ---- the collector's down_proj Hessians from <block>.expert_act (callbacks/hessian.py) ------------------------

from alphaquant.callbacks.hessian import HessianCollector  # noqa: E402
from pipeline_utils import run_session, write_config  # noqa: E402


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    corpus = tiny.write_corpus(root)
    return corpus, {f: tiny.make_checkpoint(f, root / f) for f in ("mixtral", "qwen2_moe", "deepseek_moe")}


def _collect(monkeypatch, cfg_path, hooked: bool):
    """Run a session; per collect pass {key: (H, n_tokens, weight_sum, P or None)}, the passes that took the
    down inputs from expert_act, and the final weights. hooked=True: per-expert down_proj hooks (the reference)."""
    passes, via_act = [], []
    end, add = HessianCollector.on_predict_end, HessianCollector._add_from_act

    def on_predict_end(self, trainer, runner):
        end(self, trainer, runner)
        if runner.plan.phase == "collect":
            passes.append({k: (st.H.clone(), st.n_tokens.clone(), st.weight_sum.clone(),
                               self.cross[k].clone() if k in self.cross else None) for k, st in self.states.items()})

    def add_from_act(self, block, leaf, plan):
        via_act.append((block, leaf))
        return add(self, block, leaf, plan)
    with monkeypatch.context() as m:
        m.setattr(HessianCollector, "on_predict_end", on_predict_end)
        m.setattr(HessianCollector, "_add_from_act", add_from_act)
        if hooked:
            m.setattr(HessianCollector, "_act_point", staticmethod(lambda layer, b: None))
        session = run_session(cfg_path)
    weights = {n: m.weight.detach().clone() for n, m in session.model.named_modules() if isinstance(m, nn.Linear)}
    return passes, via_act, weights


@pytest.mark.parametrize("family, gptq", [("mixtral", {}), ("qwen2_moe", {"asymmetric": True}),
                                          ("deepseek_moe", {"true_sequential": False})])
def test_down_hessians_from_expert_act_equal_per_expert_hooks(family, gptq, checkpoints, tmp_path, monkeypatch):
    """float32, CPU: the down_proj Hessians (and GPTAQ's cross sums, token counts, weight sums) the collector
    builds from the block's expert_act rows equal, bit for bit, those from a pre-hook on every expert's down_proj;
    so do the quantized weights of the whole run."""
    corpus, dirs = checkpoints
    cfg = write_config(tmp_path / "run.yaml", dirs[family], corpus, gptq=gptq, eval={"enabled": False},
                       calibration={"num_samples": 4, "seq_len": 32}, logging={"csv": {"enabled": False}})
    got, via_act, w_got = _collect(monkeypatch, cfg, hooked=False)
    ref, via_ref, w_ref = _collect(monkeypatch, cfg, hooked=True)
    assert via_act and not via_ref                       # the new path ran; the reference hooked every down_proj
    assert {leaf for _b, leaf in via_act} == {"w2" if family == "mixtral" else "down_proj"}
    assert len(got) == len(ref)
    downs = 0
    for g, r in zip(got, ref):
        assert g.keys() == r.keys()
        for k in g:
            for a, b in zip(g[k], r[k]):
                assert (a is None) == (b is None) and (a is None or torch.equal(a, b)), k
            downs += k.endswith(("w2", "down_proj")) and ".experts." in k and bool(g[k][1] > 0)
    assert downs > 0
    if gptq.get("asymmetric"):
        assert any(v[3] is not None and v[3].any() for p in got for k, v in p.items() if k.endswith("down_proj"))
    assert all(torch.equal(w_got[n], w_ref[n]) for n in w_ref)


def test_expert_act_sees_all_experts_down_inputs():
    """The hook point's rows are exactly what pre-hooks on every expert's down_proj see, in expert order."""
    block = moe_block(family_model("qwen2_moe"))
    x = tokens().reshape(-1, 64)
    acts, downs = [], {}
    h = block.expert_act.register_forward_hook(lambda m, a, out: acts.append(out))
    with torch.no_grad():
        block(x)                                  # auto on CPU: the hook on expert_act asks for the grouped path
    h.remove()
    assert block.last_experts_impl == "grouped" and len(acts) == 1
    handles = [m.down_proj.register_forward_pre_hook(lambda mod, a, e=e: downs.update({e: a[0]}))
               for e, m in enumerate(block.experts)]
    with torch.no_grad():
        block(x)
        ids, w = block.router(block.gate(x))
    for hd in handles:
        hd.remove()
    route = ExpertRoute(ids, w, block.num_experts)
    assert torch.equal(acts[0], torch.cat([downs[e] for e in sorted(downs)]))
    assert all(torch.equal(acts[0][route.rows(e)], downs[e]) for e in downs)
