"""quant.budget_bits (issue 21 point 4): per-module format choice under an average-bits budget.

The knapsack against brute force; a tiny-model run whose checkpoint (tensors, recipe file,
summary) holds a mix of formats within the budget; a budget equal to int4's width giving the
uniform int4 checkpoint; the chosen assignment's loss against the uniform one; load_quantized.
"""
from __future__ import annotations

import json
import random

import pytest
import torch
from pipeline_utils import run_session, write_config
from tiny import make_checkpoint, write_corpus

from alphaquant.config.recipe import BUDGET_RULE, QuantSpec, bits_per_weight, weight_bits
from alphaquant.errors import ConfigError
from alphaquant.gptq.budget import brute_force, choose

FAST = {"num_samples": 4, "seq_len": 32, "batch_size": 2, "min_tokens_warn": 16}
CANDS = ["int2", "int3", "int4"]
QUANT = {"default": {"wq": "int4", "group_size": 32},
         "overrides": [{"pattern": "*.gate", "skip": True}, {"pattern": "lm_head", "skip": True}]}


def test_bits_per_weight_includes_scales():
    spec = lambda wq, g, sym=True: QuantSpec(wq, g, sym, "bf16", False, shape=(128, 256))  # noqa: E731
    assert bits_per_weight(spec("int3", 64)) == 3.25
    assert bits_per_weight(spec("int4", 64)) == 4.25
    assert bits_per_weight(spec("int4", 128)) == 4.125
    assert bits_per_weight(spec("int4", 64, sym=False)) == 4 + 20 / 64
    assert bits_per_weight(spec("mxfp4", 32)) == 4.25
    assert weight_bits(spec("int2", 64)) == 128 * 256 * 2 + 128 * 4 * 16


@pytest.mark.parametrize("seed", range(60))
def test_knapsack_matches_brute_force(seed):
    r = random.Random(seed)
    n = r.randint(1, 6)
    costs = [[r.choice([0, 3, 5, 8, 13]) * r.randint(1, 4) for _ in range(r.randint(1, 4))] for _ in range(n)]
    losses = [[r.random() for _ in c] for c in costs]
    lo, hi = sum(min(c) for c in costs), sum(max(c) for c in costs)
    budget = r.uniform(lo, hi)
    ks = choose(costs, losses, budget)
    assert sum(costs[i][k] for i, k in enumerate(ks)) <= budget
    best, _ = brute_force(costs, losses, budget)
    assert sum(losses[i][k] for i, k in enumerate(ks)) == pytest.approx(best, abs=1e-12)


def test_knapsack_coarse_grid_stays_within_budget():
    r = random.Random(0)
    costs = [[r.randint(0, 10**6) for _ in range(3)] for _ in range(8)]
    losses = [[r.random() for _ in range(3)] for _ in range(8)]
    budget = sum(min(c) for c in costs) + 2 * 10**6
    ks = choose(costs, losses, budget, max_units=50)
    assert sum(costs[i][k] for i, k in enumerate(ks)) <= budget
    with pytest.raises(ValueError):
        choose(costs, losses, sum(min(c) for c in costs) - 1)


# --- the pipeline ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def work(tmp_path_factory):
    d = tmp_path_factory.mktemp("budget")
    return d, make_checkpoint("olmoe", d / "model"), write_corpus(d)


_RUNS: dict = {}


def run(work, name, **quant):
    if name not in _RUNS:
        d, model, corpus = work
        cfg = write_config(d / f"{name}.yaml", model, corpus, quant={**QUANT, **quant}, eval={"enabled": False},
                           calibration=FAST, output={"save": True, "dir": str(d / name)})
        _RUNS[name] = run_session(cfg), d / name
    return _RUNS[name]


def stored_bits(out) -> tuple[float, dict]:
    """Average bits per weight of the quantized linears, from the checkpoint's own tensors and config."""
    from safetensors import safe_open
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    groups = cfg["config_groups"]
    bits, numel, per_format = 0, 0, {}
    shapes = {}
    for f in out.glob("*.safetensors"):
        with safe_open(str(f), "pt") as h:
            for k in h.keys():
                if k.endswith(".weight_shape"):
                    shapes[k[:-len(".weight_shape")]] = tuple(int(v) for v in h.get_tensor(k).tolist())
    targets = {}
    for g in groups.values():
        for t in g["targets"]:
            targets[t] = g["weights"]
    for name, (R, C) in shapes.items():
        w = next(v for t, v in targets.items() if _matches(t, name))
        e, gs = w["num_bits"], w["group_size"] or C
        bits += R * C * e + R * (C // gs) * 16
        numel += R * C
        per_format[f"int{e}/g{gs}"] = per_format.get(f"int{e}/g{gs}", 0) + 1
    return bits / numel, per_format


def _matches(target: str, name: str) -> bool:
    import re
    return re.fullmatch(target[3:], name) is not None if target.startswith("re:") else target == name


def test_budget_between_candidates_mixes_formats(work):
    s, out = run(work, "b3", budget_bits=3.4, budget_candidates=CANDS)
    avg, per_format = stored_bits(out)
    assert 2 + 16 / 32 <= avg <= 3.4 + 1e-9
    assert len(per_format) >= 2, per_format
    summary = json.loads((out / "alphaquant_summary.json").read_text())["budget"]
    assert summary["average_bits"] == pytest.approx(avg)
    assert sum(summary["modules_per_format"].values()) == sum(per_format.values())
    recipe = json.loads((out / "alphaquant_recipe.json").read_text())
    chosen = {n: m for n, m in recipe["modules"].items() if m["rule"] == BUDGET_RULE}
    assert len(chosen) == sum(per_format.values())
    assert {m["wq"] for m in chosen.values()} == {k.split("/")[0] for k in per_format}
    # the plain quant section with exact-name overrides resolves to the same recipe, without a budget
    from alphaquant.config.quant import QuantConfig, QuantOverride, QuantRule
    from alphaquant.config.recipe import resolve_recipe
    q = recipe["budget"]["quant"]
    qc = QuantConfig(default=QuantRule(**q["default"]), overrides=[QuantOverride(**o) for o in q["overrides"]])
    again = resolve_recipe(qc, s.adapter.linear_modules(s.model))
    for n, m in chosen.items():
        assert (again[n].wq, again[n].group_size) == (m["wq"], m["group_size"])


def test_budget_at_int4_width_is_uniform_int4(work):
    s4, out4 = run(work, "u4")
    sb, outb = run(work, "b4", budget_bits=4.5, budget_candidates=CANDS)   # int4/g32 = 4.5 bits
    assert {sp.wq for n, sp in sb.specs.items() if sp.quantized} == {"int4"}
    from safetensors.torch import load_file
    a = {k: v for f in sorted(out4.glob("*.safetensors")) for k, v in load_file(f).items()}
    b = {k: v for f in sorted(outb.glob("*.safetensors")) for k, v in load_file(f).items()}
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_chosen_loss_at_most_uniform_of_same_size(work):
    s, _ = run(work, "b35", budget_bits=3.5, budget_candidates=CANDS)    # = int3/g32 exactly
    total_chosen = total_uniform = 0.0
    for n, r in s.results["records"].items():
        ch = r.extra.get("budget_choice")
        if ch:
            total_chosen += ch["loss"]
            total_uniform += ch["candidates"]["int3/g32"]
    assert total_chosen <= total_uniform * (1 + 1e-9)
    assert s.results["budget"]["average_bits"] <= 3.5 + 1e-9


def test_load_quantized_reads_mixed_checkpoint(work):
    from alphaquant.export import load_quantized
    s, out = run(work, "b3", budget_bits=3.4, budget_candidates=CANDS)
    q = load_quantized(out)
    ours = s.model.state_dict()
    theirs = q.state_dict()
    for n, spec in s.specs.items():
        if spec.quantized:
            torch.testing.assert_close(theirs[n + ".weight"].float(), ours[n + ".weight"].float(), rtol=0, atol=1e-6)


def test_budget_below_cheapest_is_refused(work):
    d, model, corpus = work
    cfg = write_config(d / "bad.yaml", model, corpus, quant={**QUANT, "budget_bits": 2.0, "budget_candidates": CANDS},
                       eval={"enabled": False}, calibration=FAST)
    with pytest.raises(ConfigError, match="below"):
        run_session(cfg)


def test_resume_keeps_the_budget_choices(tmp_path):
    """A run killed after layer 0 and rerun restores layer 0's chosen formats from the resume state."""
    import signal

    from test_resume import _cmd, _files
    model, corpus = make_checkpoint("olmoe", tmp_path / "model"), write_corpus(tmp_path)

    def config(name):
        return write_config(tmp_path / f"{name}.yaml", model, corpus, eval={"enabled": False}, calibration=FAST,
                            quant={**QUANT, "budget_bits": 3.4, "budget_candidates": CANDS},
                            output={"save": True, "dir": str(tmp_path / name)})
    ref = _cmd(config("ref"))
    assert ref.returncode == 0, ref.stderr[-3000:]
    cfg = config("killed")
    assert _cmd(cfg, kill_at=0).returncode == -signal.SIGKILL
    again = _cmd(cfg)
    assert again.returncode == 0 and "resuming: layers 0-0" in again.stdout, again.stderr[-3000:]
    a, b = _files(tmp_path / "ref"), _files(tmp_path / "killed")
    assert a.keys() == b.keys() and all(a[k] == b[k] for k in a)
    ra, rb = (json.loads((tmp_path / d / "alphaquant_recipe.json").read_text())["modules"] for d in ("ref", "killed"))
    assert ra == rb and any(m["rule"] == BUDGET_RULE and m["wq"] != "int4" for m in ra.values())
