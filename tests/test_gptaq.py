"""gptq.asymmetric (GPTAQ, alphaquant/gptq/gptaq.py): GPTQ toward the fp layer's outputs on fp inputs.

The pure correction W̃ = W + W P (H + λI)⁻¹ is checked against a float64 least-squares solution of
min_Q Σ c ||Q x̃ − W x||² + λ ||Q − W||² written here; the pipeline against plain GPTQ where nothing before
a group is quantized (X == X̃: layer 0's first group), against the asymmetric objective it is meant to lower,
and with the option off against a run that never heard of it.
"""
from __future__ import annotations

import pytest
import torch

import tiny
from alphaquant.callbacks.hessian import HessianCollector
from alphaquant.formats import get_format
from alphaquant.gptq import gptq_quantize
from alphaquant.gptq.gptaq import accumulate_cross, accumulate_cross_segments, asymmetric_target
from pipeline_utils import run_session, write_config


def _data(E=3, R=5, C=8, T=64, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(E, R, C, generator=g, dtype=dtype)
    Xq = torch.randn(E, T, C, generator=g, dtype=dtype)
    Xfp = Xq + 0.3 * torch.randn(E, T, C, generator=g, dtype=dtype)
    c = torch.rand(E, T, generator=g, dtype=dtype)
    return W, Xq, Xfp, c


def _lstsq_target(W, Xq, Xfp, c, lam):
    """argmin_Q Σ_t c_t ||Q x̃_t − W x_t||² + lam ||Q − W||², per expert, by float64 least squares."""
    out = []
    for e in range(W.shape[0]):
        s = c[e].sqrt()[:, None]
        C = W.shape[-1]
        A = torch.cat([s * Xq[e], lam[e].sqrt() * torch.eye(C, dtype=W.dtype)])           # [T + C, C]
        B = torch.cat([s * (Xfp[e] @ W[e].T), lam[e].sqrt() * W[e].T])                    # [T + C, R]
        out.append(torch.linalg.lstsq(A, B).solution.T)
    return torch.stack(out)


@pytest.mark.parametrize("damp", [0.0, 0.01, 0.1])
def test_target_is_the_least_squares_solution(damp):
    W, Xq, Xfp, c = _data()
    H = torch.einsum("et,etc,etd->ecd", c, Xq, Xq)
    P = torch.zeros_like(H)
    for e in range(W.shape[0]):
        accumulate_cross(P[e], Xfp[e], Xq[e], c[e])
    assert torch.allclose(P, torch.einsum("et,etc,etd->ecd", c, Xfp - Xq, Xq), atol=1e-10)
    lam = damp * H.diagonal(dim1=-2, dim2=-1).mean(-1)
    ref = _lstsq_target(W, Xq, Xfp, c, lam)
    assert torch.allclose(asymmetric_target(W, H, P, damp), ref, atol=1e-8, rtol=1e-8)
    # scale-invariant: the pipeline normalises H and P by 2/N, the result is the same
    assert torch.allclose(asymmetric_target(W, H * 0.37, P * 0.37, damp), ref, atol=1e-8, rtol=1e-8)
    assert torch.allclose(asymmetric_target(W[0], H[0], P[0], damp), ref[0], atol=1e-8, rtol=1e-8)   # 2D


def test_segments_and_edge_cases():
    W, Xq, Xfp, c = _data(E=1, T=30, dtype=torch.float32)
    counts = [7, 0, 23]
    P = torch.zeros(3, 8, 8)
    accumulate_cross_segments(P, Xfp[0], Xq[0], counts, c[0])
    ref = torch.zeros(3, 8, 8)
    accumulate_cross(ref[0], Xfp[0, :7], Xq[0, :7], c[0, :7])
    accumulate_cross(ref[2], Xfp[0, 7:], Xq[0, 7:], c[0, 7:])
    assert torch.equal(P, ref)
    W3 = torch.randn(3, 4, 8)
    H = torch.stack([torch.eye(8), torch.zeros(8, 8), torch.eye(8)])
    P[0] = 0
    out = asymmetric_target(W3, H, P)
    assert torch.equal(out[0], W3[0]) and torch.equal(out[1], W3[1])      # P == 0, H == 0: W exactly
    assert not torch.equal(out[2], W3[2])


def test_equal_inputs_give_plain_gptq_exactly():
    """X == X̃: P is exactly zero, W̃ is W bit for bit, and so is the GPTQ result."""
    W, Xq, _, c = _data(E=2, R=16, C=64, T=256, dtype=torch.float32)
    H = torch.einsum("et,etc,etd->ecd", c, Xq, Xq)
    P = torch.zeros_like(H)
    for e in range(2):
        accumulate_cross(P[e], Xq[e], Xq[e], c[e])
    assert not P.any()
    Wt = asymmetric_target(W, H, P)
    assert torch.equal(Wt, W)
    fmt = get_format("int3", group_size=32)
    a, b = gptq_quantize(W, H, fmt, act_order=True), gptq_quantize(Wt, H, fmt, act_order=True)
    assert torch.equal(a.weight, b.weight)


def test_asymmetric_objective_is_lower():
    """On inputs where the quantized model's x̃ differs from the fp x, GPTQ on (W̃, H) has a lower
    Σ c ||Q x̃ − W x||² than plain GPTQ on (W, H) (summed over experts and seeds)."""
    fmt = get_format("int3", group_size=32)
    plain = asym = 0.0
    for seed in range(3):
        W, Xq, Xfp, c = _data(E=4, R=32, C=64, T=512, seed=seed, dtype=torch.float32)
        H = torch.einsum("et,etc,etd->ecd", c, Xq, Xq)
        P = torch.einsum("et,etc,etd->ecd", c, Xfp - Xq, Xq)
        obj = lambda Q: float(torch.einsum("et,etr->", c, (Xq @ Q.transpose(1, 2) - Xfp @ W.transpose(1, 2)) ** 2))  # noqa: E731
        plain += obj(gptq_quantize(W, H, fmt, act_order=True).weight)
        asym += obj(gptq_quantize(asymmetric_target(W, H, P), H, fmt, act_order=True).weight)
    assert asym < 0.9 * plain


def test_all_experts_refused(tmp_path):
    """Refused by the config check, before any weight is read."""
    from alphaquant.config.run import load_config
    from alphaquant.errors import ConfigError
    path = tmp_path / "run.yaml"
    path.write_text("model: {path: org/model}\ncalibration: {hessian: all_experts}\ngptq: {asymmetric: true}\n")
    with pytest.raises(ConfigError, match="all_experts"):
        load_config(path)
    with pytest.raises(ValueError, match="all_experts"):
        HessianCollector(None, mode="all_experts", asymmetric=True)


# ------------------------------------------------------------------------------------------------ pipeline
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("gptaq")
    return root, tiny.write_corpus(root), tiny.make_checkpoint("qwen2_moe", root / "qwen2_moe")


def _spy(monkeypatch):
    """Per collect pass of the asymmetric run: (layer, {key: (W, H, P, W̃)}) as the solver reads them."""
    seen = []
    original = HessianCollector.asymmetric_target

    def spy(self, W, H, keys, damp):
        out = original(self, W, H, keys, damp)
        P = torch.stack([self.cross[k] * (2.0 / self.states[k].n_tokens.clamp(min=1).float()) for k in keys])
        seen.append({k: (W[i].clone(), H[i].clone(), P[i].clone(), out[i].clone()) for i, k in enumerate(keys)})
        return out
    monkeypatch.setattr(HessianCollector, "asymmetric_target", spy)
    return seen


def _count_early_stops(monkeypatch):
    """The groups of the passes whose fp forward may stop early (HessianCollector._hook_fp wrapped it)."""
    stopped = []
    original = HessianCollector._hook_fp

    def counting(self, fp):
        original(self, fp)
        if "forward" in vars(fp):          # wrapped: this pass may stop the fp forward early
            stopped.append(tuple(self._group))
    monkeypatch.setattr(HessianCollector, "_hook_fp", counting)
    return stopped


@pytest.fixture(scope="module")
def asymmetric_run(checkpoint):
    """One gptq.asymmetric run (early stop on, the default) watched by both spies (they only record): its linears,
    what the solver read per pass, and the groups whose fp forward may stop early. Shared by test_pipeline and
    test_fp_layer_early_stop_changes_nothing (the same config; was one run each)."""
    root, corpus, ckpt = checkpoint
    with pytest.MonkeyPatch.context() as mp:
        seen = _spy(mp)
        stopped = _count_early_stops(mp)
        assert not seen and not stopped
        on = run_session(write_config(root / "on.yaml", ckpt, corpus, eval={"enabled": False},
                                      gptq={"asymmetric": True}))
    return _linears(on), seen, stopped


def _linears(session):
    return {n: m.weight.detach().clone() for n, m in session.model.named_modules() if isinstance(m, torch.nn.Linear)}


def test_pipeline(checkpoint, asymmetric_run):
    root, corpus, ckpt = checkpoint
    # off: no fp stream, no cross sums (the run is byte-identical to the code before the option: checked
    # against that commit by hand, README "Quality")
    off = run_session(write_config(root / "off.yaml", ckpt, corpus, eval={"enabled": False},
                                   gptq={"asymmetric": False}))
    off_w = _linears(off)
    on_w, seen, _ = asymmetric_run
    assert off.cfg.gptq.asymmetric is False
    # layer 0, group 0 (q/k/v): nothing before it is quantized, so X == X̃, P == 0 and plain GPTQ exactly
    first = seen[0]
    assert all(k.startswith("self_attn.") for k in first)
    for W, _H, P, Wt in first.values():
        assert not P.any() and torch.equal(W, Wt)
    for n in ("q_proj", "k_proj", "v_proj"):
        name = f"model.layers.0.self_attn.{n}"
        assert torch.equal(on_w[name], off_w[name])
    # later groups see quantized inputs: a correction is applied, and GPTQ on W̃ lowers the asymmetric
    # objective tr(D H Dᵀ) − 2 tr(Dᵀ W P) (D = Q − W; Σ c ||Q x̃ − W x||² up to a constant) against
    # plain GPTQ on the same H, summed over each later pass's stacks
    fmt = get_format("int4", group_size=32)
    later = [p for p in seen[1:] if any(P.any() for _W, _H, P, _Wt in p.values())]
    assert len(later) >= 4

    def objective(Q, W, H, P):
        D = Q - W
        return float(torch.einsum("rc,rc->", D @ H, D) - 2 * torch.einsum("rc,rc->", D, W @ P))

    for p in later:
        attn = [v for k, v in p.items() if "experts" not in k]
        if not attn:
            continue
        a = sum(objective(gptq_quantize(Wt, H, fmt, act_order=True, scale_search="mse").weight, W, H, P)
                for W, H, P, Wt in attn)
        b = sum(objective(gptq_quantize(W, H, fmt, act_order=True, scale_search="mse").weight, W, H, P)
                for W, H, P, Wt in attn)
        assert a < b
    assert any(not torch.equal(on_w[n], off_w[n]) for n in on_w if ".layers.1." in n)


def test_fp_layer_early_stop_changes_nothing(checkpoint, asymmetric_run, monkeypatch):
    """The fp copy of the layer stops at the pre-hook that completes its group's inputs (its experts never run for
    attention or routed-expert groups): the quantized weights are the same, bit for bit, as with every forward
    run to the end, and the stop really happens."""
    root, corpus, ckpt = checkpoint
    cfg = dict(eval={"enabled": False}, gptq={"asymmetric": True})
    early, _, stopped = asymmetric_run
    assert any(any("experts" in n for n in g) for g in stopped) and any(
        all("self_attn" in n for n in g) for g in stopped)
    init = HessianCollector.__init__

    def no_early_stop(self, *a, **k):
        init(self, *a, **k)
        self.early_stop = False
    monkeypatch.setattr(HessianCollector, "__init__", no_early_stop)
    full = _linears(run_session(write_config(root / "full.yaml", ckpt, corpus, **cfg)))
    assert early.keys() == full.keys()
    for n in early:
        assert torch.equal(early[n], full[n]), n
