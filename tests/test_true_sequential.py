"""`gptq.true_sequential: false` (issue 23): every linear of a decoder layer in one collect pass.

Each linear must get the Hessian of its own input, not of another linear of the same width
(o_proj has q_proj's width, Mixtral's w2 has w1's). With true_sequential false every linear of
layer i is calibrated on the fp layer's own inputs, so a plain forward pre-hook on the fp layer,
fed the outputs of the already-quantized layers below, gives the exact reference:
H = Σ_t c_t x_t x_tᵀ with c the routing weight (routed experts), sigmoid(shared gate) (Qwen2-MoE
shared expert) or 1.
"""
from __future__ import annotations

import re

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from alphaquant import models
import tiny
from alphaquant.config.recipe import build_format
from alphaquant.callbacks.hessian import HessianCollector
from pipeline_utils import run_session, write_config

FAMILIES = list(tiny.FAMILIES)
EXPERT = re.compile(r"^(.*)\.experts\.(\d+)\.")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    _, corpus, dirs = tiny.family_checkpoints(tmp_path_factory.mktemp("ckpt"))
    return corpus, dirs


def _spy_hessians(monkeypatch) -> dict:
    """layer index -> [{linear: (key, raw H, n_tokens)}] per collect pass, as the solver reads them."""
    passes: dict[int, list] = {}
    original = HessianCollector.on_predict_end

    def on_predict_end(self, trainer, runner):
        original(self, trainer, runner)
        if runner.plan.phase == "collect":
            passes.setdefault(runner.plan.layer_index, []).append(
                {n: (k, self.states[k].H.clone(), int(self.states[k].n_tokens)) for n, k in self.keys.items()})
    monkeypatch.setattr(HessianCollector, "on_predict_end", on_predict_end)
    return passes


@torch.no_grad()
def _reference_hessians(layer: nn.Module, batches) -> dict[str, torch.Tensor]:
    """Σ c_t² x_t x_tᵀ (float64) of every linear of the fp `layer` over `batches` of (hidden, kwargs): the
    default calibration.hessian routed_sq, c = the routing weight (or Qwen2-MoE's shared-expert gate)."""
    xs, routes, gates, handles = {}, {}, {}, []
    for name, m in layer.named_modules():
        if isinstance(m, nn.Linear):
            handles.append(m.register_forward_pre_hook(
                lambda _m, a, name=name: xs.setdefault(name, []).append(a[0].reshape(-1, a[0].shape[-1]).clone())))
        elif name.endswith(".router"):
            handles.append(m.register_forward_hook(
                lambda _m, _a, out, b=name[:-len(".router")]: routes.setdefault(b, []).append(out)))
        elif name.endswith(".shared_gate_act"):
            handles.append(m.register_forward_hook(
                lambda _m, _a, out, b=name[:-len(".shared_gate_act")]: gates.setdefault(b, []).append(out.reshape(-1))))
    for hidden, kw in batches:
        layer(hidden, **kw)
    for h in handles:
        h.remove()
    H = {}
    for name, chunks in xs.items():
        x = torch.cat(chunks).double()                                         # [T, C]
        expert = EXPERT.match(name)
        if expert:                        # the tokens routed to e, in token order, weighted by their routing weight
            block, e = expert.group(1), int(expert.group(2))
            c = torch.cat([(w * (ids == e)).sum(-1)[(ids == e).any(-1)] for ids, w in routes[block]])
        elif ".shared_expert." in name:   # Qwen2-MoE: the shared expert's output is scaled by sigmoid(gate)
            c = torch.cat(gates[name.split(".shared_expert.")[0]])
        else:
            c = torch.ones(x.shape[0])
        H[name] = (x * c.double().square()[:, None]).T @ x
    return H


def _batches(session, model, i, batch_size):
    """The calibration batches entering layer i: embeddings through the session's (quantized) layers below i."""
    ids_all = session.windows["calib"]
    out = []
    with torch.no_grad():
        for s in range(0, ids_all.shape[0], batch_size):
            hidden = model.model.embed_tokens(ids_all[s:s + batch_size])
            kw = model.layer_kwargs(hidden)
            for layer in model.model.layers[:i]:
                hidden = layer(hidden, **kw)
            out.append((hidden, kw))
    return out


def _output_error(W, Wq, H):
    """tr(ΔW H ΔWᵀ): the squared output error of a linear on the inputs that made H."""
    D = (Wq.double() - W.double())
    return float(torch.einsum("rc,rc->", D @ H, D))


@pytest.mark.parametrize("family", FAMILIES)
def test_one_group_per_layer_each_linear_gets_its_own_hessian(family, checkpoints, tmp_path, monkeypatch):
    corpus, dirs = checkpoints
    passes = _spy_hessians(monkeypatch)
    cfg = write_config(tmp_path / "run.yaml", dirs[family], corpus, gptq={"true_sequential": False},
                       calibration={"num_samples": 4, "seq_len": 32}, eval={"enabled": False},
                       logging={"csv": {"enabled": False}})
    session = run_session(cfg)
    records, quantized = session.results["records"], [n for n, s in session.specs.items() if s.quantized]
    assert quantized and set(records) == set(quantized)                  # the run completed: every linear solved
    fp = models.from_pretrained(dirs[family], dtype="fp32")
    prefix = session.adapter.layer_prefix
    for i, layer_passes in passes.items():
        assert len(layer_passes) == 1                                    # one collect pass per layer
        seen = layer_passes[0]
        assert set(seen) == {n[len(prefix(i)):] for n in quantized if n.startswith(prefix(i))}
        assert seen["self_attn.k_proj"][0] == seen["self_attn.v_proj"][0] == "self_attn.q_proj"   # still stacked
        assert seen["self_attn.o_proj"][0] == "self_attn.o_proj"
        ref = _reference_hessians(fp.model.layers[i], _batches(session, session.model, i, 2))
        q_err = rtn_err = 0.0
        for name, (_key, H, n_tokens) in seen.items():
            assert_close(H.double(), ref[name], rtol=1e-4, atol=1e-4 * float(ref[name].abs().max()),
                         msg=lambda m, name=name: f"layer {i} {name}: not the Hessian of its own input\n{m}")
            full = prefix(i) + name
            W = fp.get_submodule(full).weight.detach()
            Wq = session.model.get_submodule(full).weight.detach()
            if n_tokens == 0:
                continue
            q, r = _output_error(W, Wq, ref[name]), _output_error(W, build_format(session.specs[full]).fake_quantize(W), ref[name])
            assert q < r, f"layer {i} {name}: GPTQ output error {q:.4g} not below round-to-nearest {r:.4g}"
            q_err, rtn_err = q_err + q, rtn_err + r
        assert q_err < 0.9 * rtn_err
    assert set(passes) == set(range(session.adapter.num_layers(session.model)))
