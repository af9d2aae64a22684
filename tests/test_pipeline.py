"""The calibration loop end to end on tiny checkpoints of all four families (CPU, seconds each)."""
from __future__ import annotations

import math

import pytest
import torch

from alphaquant import models
import tiny
from alphaquant.config.recipe import build_format
from pipeline_utils import run_session, write_config

FAMILIES = list(tiny.FAMILIES)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return tiny.family_checkpoints(tmp_path_factory.mktemp("ckpt"))


@pytest.mark.parametrize("family", FAMILIES)
def test_quantized_weights_on_grid_skipped_unchanged_ppl_bounded(family, checkpoints, tmp_path):
    root, corpus, dirs = checkpoints
    session = run_session(write_config(tmp_path / "run.yaml", dirs[family], corpus, eval={"rtn": True}))
    original = models.CheckpointReader(dirs[family])
    model, records = session.model, session.results["records"]
    quantized = [n for n, s in session.specs.items() if s.quantized]
    assert quantized and set(quantized) == set(records)           # every quantized linear was solved
    for name, spec in session.specs.items():
        w = model.get_submodule(name).weight.detach()
        w0 = original.read(name + ".weight").to(w.dtype)
        if not spec.quantized:
            assert torch.equal(w, w0), f"{name} is skipped but changed"
            continue
        rec = records[name]
        fmt = build_format(spec)
        assert torch.equal(fmt.round_with(w, rec.params), w), f"{name} is off its {spec.label} grid"
        assert not torch.equal(w, w0)
        assert w.abs().sum() > 0                                   # no expert zeroed
        assert rec.tokens > 0 and math.isfinite(rec.rel_error)
    ppl = session.results["perplexity"]
    assert set(ppl) == {"original", "quantized", "rtn"}
    assert all(math.isfinite(v) for v in ppl.values())
    assert ppl["quantized"] < 1.2 * ppl["original"]


def test_expert_without_tokens_is_not_zeroed_and_is_reported(checkpoints, tmp_path):
    root, corpus, dirs = checkpoints
    from alphaquant.config.run import load_config
    from alphaquant.pipeline.session import CalibrationSession

    session = CalibrationSession(load_config(write_config(tmp_path / "run.yaml", dirs["olmoe"], corpus)))
    session.prepare()
    # The router of layer 1 never picks expert 3: its logit is masked before top-k.
    def never_three(_mod, args):
        logits = args[0].clone()
        logits[:, 3] = float("-inf")
        return (logits,)
    session.model.model.layers[1].mlp.router.register_forward_pre_hook(never_three)
    session.run()
    name = "model.layers.1.mlp.experts.3.gate_proj"
    rec = session.results["records"][name]
    assert rec.tokens == 0 and rec.fallback == "no tokens"
    w = session.model.get_submodule(name).weight
    w0 = models.CheckpointReader(dirs["olmoe"]).read(name + ".weight")
    fmt = build_format(session.specs[name])
    torch.testing.assert_close(w, fmt.fake_quantize(w0))            # round-to-nearest, never zero
    assert name in session.results["fallbacks"]
    block = next(b for b in session.results["experts"] if b["block"] == "model.layers.1.mlp")
    assert 3 in block["below_threshold"] and block["counts"][3] == 0


@pytest.mark.parametrize("family", ["olmoe", "qwen2_moe"])
def test_routing_weighted_hessians_follow_the_definition(family, checkpoints):
    """H_e = Σ c_t x_t x_tᵀ over routed tokens (routed), c = 1 (uniform), all tokens (all_experts);
    the Qwen2-MoE shared expert weighted by sigmoid(shared_expert_gate(x))."""
    from alphaquant.arch import get_adapter
    from alphaquant.pipeline.runner import PassPlan
    from alphaquant.callbacks.hessian import HessianCollector

    _, _, dirs = checkpoints
    model = models.from_pretrained(dirs[family], dtype="fp32")
    adapter = get_adapter(model)
    layer = model.model.layers[0]
    group = adapter.sequential_groups(layer)[2]                      # every gate/up
    ids = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(0))
    hidden, kw = model.prepare_layer_inputs(ids)
    seen = {}
    layer.mlp.register_forward_pre_hook(lambda _m, a: seen.__setitem__("x", a[0].reshape(-1, a[0].shape[-1])))
    layer.mlp.router.register_forward_hook(lambda _m, _a, out: seen.__setitem__("route", out))

    class Runner:                                                    # what the callback reads
        block, device = layer, torch.device("cpu")
        plan = PassPlan("collect", "calib", 0, 2, group)

    states = {}
    for mode in ("routed", "routed_sq", "uniform", "all_experts"):
        col = HessianCollector(adapter, mode)
        col.on_predict_start(None, Runner)
        with torch.no_grad():
            layer(hidden, **kw)
        col.on_predict_end(None, Runner)
        states[mode] = col.states
    x, (topk_ids, topk_w) = seen["x"], seen["route"]
    for e in range(layer.mlp.num_experts):
        hit = (topk_ids == e)
        rows = hit.any(-1)
        c = (topk_w * hit).sum(-1)[rows]
        xe = x[rows]
        key = f"mlp.experts.{e}.gate_proj"
        torch.testing.assert_close(states["routed"][key].H, (xe * c[:, None]).T @ xe)
        torch.testing.assert_close(states["routed_sq"][key].H, (xe * (c * c)[:, None]).T @ xe)
        torch.testing.assert_close(states["uniform"][key].H, xe.T @ xe)
        torch.testing.assert_close(states["all_experts"][key].H, x.T @ x)
        assert int(states["uniform"][key].n_tokens) == int(rows.sum())
    assert not torch.allclose(states["routed"]["mlp.experts.0.gate_proj"].H,
                              states["uniform"]["mlp.experts.0.gate_proj"].H)
    if family == "qwen2_moe":
        s = torch.sigmoid(layer.mlp.shared_expert_gate(x)).reshape(-1)
        torch.testing.assert_close(states["routed"]["mlp.shared_expert.gate_proj"].H, (x * s[:, None]).T @ x)
        torch.testing.assert_close(states["routed_sq"]["mlp.shared_expert.gate_proj"].H, (x * (s * s)[:, None]).T @ x)
        torch.testing.assert_close(states["uniform"]["mlp.shared_expert.gate_proj"].H, x.T @ x)


def test_all_experts_down_proj_sees_every_token(checkpoints):
    from alphaquant.arch import get_adapter
    from alphaquant.pipeline.runner import PassPlan
    from alphaquant.callbacks.hessian import HessianCollector

    _, _, dirs = checkpoints
    model = models.from_pretrained(dirs["olmoe"], dtype="fp32")
    adapter = get_adapter(model)
    layer = model.model.layers[0]
    group = adapter.sequential_groups(layer)[3]                      # every down_proj
    hidden, kw = model.prepare_layer_inputs(torch.arange(32).reshape(2, 16))
    seen = {}
    layer.mlp.register_forward_pre_hook(lambda _m, a: seen.__setitem__("x", a[0].reshape(-1, a[0].shape[-1])))

    class Runner:
        block, device = layer, torch.device("cpu")
        plan = PassPlan("collect", "calib", 0, 3, group)

    col = HessianCollector(adapter, "all_experts")
    col.on_predict_start(None, Runner)
    with torch.no_grad():
        layer(hidden, **kw)
    col.on_predict_end(None, Runner)
    ex = layer.mlp.experts[5]
    with torch.no_grad():
        h = torch.nn.functional.silu(ex.gate_proj(seen["x"])) * ex.up_proj(seen["x"])   # [T, I]
    torch.testing.assert_close(col.states["mlp.experts.5.down_proj"].H, h.T @ h)
    assert int(col.states["mlp.experts.5.down_proj"].n_tokens) == 32


def test_early_stop_learned_once_and_hessians_unchanged(checkpoints):
    """A plain group's collect forward stops at its last input: learned on the first batch of the first
    layer, reused by the next layer from its first batch on; the Hessians equal full forwards'."""
    from alphaquant.arch import get_adapter
    from alphaquant.pipeline.runner import PassPlan
    from alphaquant.callbacks.hessian import HessianCollector

    _, _, dirs = checkpoints
    model = models.from_pretrained(dirs["olmoe"], dtype="fp32")
    adapter = get_adapter(model)
    batches = [model.prepare_layer_inputs(torch.arange(32).reshape(2, 16) + 7 * b) for b in range(2)]
    mlp_calls = []

    def collect(col, i):
        layer = model.model.layers[i]
        group = adapter.sequential_groups(layer)[0]                  # q/k/v: the MLP is not needed

        class Runner:
            block, device = layer, torch.device("cpu")
            plan = PassPlan("collect", "calib", i, 0, group)
        h = layer.mlp.register_forward_pre_hook(lambda *_: mlp_calls.append(i))
        col.on_predict_start(None, Runner)
        with torch.no_grad():
            for hidden, kw in batches:
                Runner.block(hidden, **kw)
        col.on_predict_end(None, Runner)
        h.remove()
        return {k: s.H.clone() for k, s in col.states.items()}

    full = HessianCollector(adapter)
    full.early_stop = False
    reference = [collect(full, i) for i in (0, 1)]
    assert mlp_calls == [0, 0, 1, 1]
    mlp_calls.clear()
    col = HessianCollector(adapter)
    stopped = [collect(col, i) for i in (0, 1)]
    assert mlp_calls == [0]                     # only the first batch of layer 0 ran the whole layer
    for ref, got in zip(reference, stopped):
        assert ref.keys() == got.keys()
        for k in ref:
            assert torch.equal(ref[k], got[k]), k


def test_down_group_stops_at_expert_act_and_hessians_unchanged(checkpoints):
    """The routed experts' down_proj group (fed from the block's expert_act on its grouped path) stops once the
    activations exist: the MoE block never finishes its forward; the Hessians equal full forwards'."""
    from alphaquant.arch import get_adapter
    from alphaquant.pipeline.runner import PassPlan
    from alphaquant.callbacks.hessian import HessianCollector

    _, _, dirs = checkpoints
    model = models.from_pretrained(dirs["olmoe"], dtype="fp32")
    adapter = get_adapter(model)
    layer = model.model.layers[0]
    group = adapter.sequential_groups(layer)[-1]
    assert all(n.endswith("down_proj") for n in group)
    batches = [model.prepare_layer_inputs(torch.arange(32).reshape(2, 16) + 7 * b) for b in range(2)]
    finished = []

    def collect(col):
        class Runner:
            block, device = layer, torch.device("cpu")
            plan = PassPlan("collect", "calib", 0, len(adapter.sequential_groups(layer)) - 1, group)
        h = layer.mlp.register_forward_hook(lambda *_: finished.append(1))
        col.on_predict_start(None, Runner)
        assert col._from_expert_act == set(group)          # the grouped path's hook point, not per-expert hooks
        with torch.no_grad():
            for hidden, kw in batches:
                Runner.block(hidden, **kw)
        col.on_predict_end(None, Runner)
        h.remove()
        return {k: (s.H.clone(), int(s.n_tokens)) for k, s in col.states.items()}

    full = HessianCollector(adapter)
    full.early_stop = False
    reference = collect(full)
    assert len(finished) == 2
    finished.clear()
    stopped = collect(HessianCollector(adapter))
    assert finished == []
    assert reference.keys() == stopped.keys()
    for k in reference:
        assert torch.equal(reference[k][0], stopped[k][0]) and reference[k][1] == stopped[k][1], k
