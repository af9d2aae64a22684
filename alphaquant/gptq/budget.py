"""Per-module format choice under a bit budget (`quant.budget_bits`, issue 21 point 4).

Design
------
    quant:
      default: {wq: int4, group_size: 64}
      budget_bits: 3.5                                # average bits per weight, scales included
      budget_candidates: [int2, int3, int4, int8]     # NAME (the module's group size) or NAME/GROUP

*Unit.* A module's cost is its stored bits, `numel x bits_per_weight(format)` with the
per-group scale (and zero point) overhead included (`alphaquant.config.recipe.weight_bits`:
int3/g64 = 3.25, int4/g64 = 4.25, int2/g64 = 2.25, int8/g64 = 8.25, mxfp4 = 4.25). The budget is
`budget_bits x Σ numel` over the modules the recipe quantizes (skipped / bf16 modules and
routers are outside it, as they are outside "the recipe quantizes").

*Where.* The pipeline streams the model layer by layer and solves each true-sequential group
(q/k/v, o, gate/up, down) on the outputs of the already quantized groups before it. The
budget is therefore applied per group: every group, hence every decoder layer, gets the
average budget, and the whole model ends at or below it. Groups do not trade bits with each
other (a later group's losses are not known when an earlier group must be fixed).

*Loss.* In each group every module is solved by GPTQ (experts batched as without a budget)
once per candidate format. A module's measured loss for a candidate is its output error on
the calibration tokens, Σ_t c_t ||(Ŵ - W) x_t||² = tr(ΔW H_raw ΔWᵀ) with H_raw the raw
(un-normalised) Hessian: c_t is the routing weight for routed experts (1 for attention), so
an expert that sees few tokens or small routing weights counts little, as in the model's
output. GPTQ treats rows independently, so the loss is computed per linear (rows of a stacked
gate+up split exactly) and each expert linear is chosen separately. An expert with no tokens
has loss 0 for every candidate and takes the cheapest.

*Choice.* Minimise Σ_m loss[m, k_m] subject to Σ_m cost[m, k_m] <= budget: a multiple-choice
knapsack, solved exactly by dynamic programming (`choose`) on the costs above each module's
cheapest candidate, in units of their greatest common divisor (numel for same-shaped
int formats of one group size), so the DP is exact at realistic sizes; when that grid would
exceed `max_units` cells the costs are rounded UP onto a coarser grid, which keeps the result
within the budget (it may then be slightly suboptimal). Ties go to the cheaper candidate.
The chosen candidate's quantized weights stay in the layer, so later groups calibrate on
them (true-sequential as before).

*Output.* The choice is written into the run's specs (rule "quant.budget_bits"), so the
checkpoint's tensors, its quantization_config, alphaquant_recipe.json (per-module wq /
group_size, plus a "budget" section with the achieved average bits and an equivalent plain
quant section of exact-name overrides) and alphaquant_summary.json ("budget": average bits,
modules per format) all say what each module is; `--eval-only` and `load_quantized` read it
unchanged. `budget_bits: null` (the default) is exactly the behaviour without this module.
"""
from __future__ import annotations

import math
from functools import reduce

import numpy as np


def choose(costs, losses, budget, max_units: int = 200_000) -> list[int]:
    """Index of the chosen candidate per item minimising Σ losses under Σ costs <= budget.

    costs, losses: one sequence per item (its candidates); costs are non-negative integers (bits).
    Raises ValueError when even the cheapest candidates exceed the budget."""
    n = len(costs)
    if n == 0:
        return []
    c = [np.asarray(x, dtype=np.int64) for x in costs]
    l = [np.asarray(x, dtype=np.float64) for x in losses]
    base = sum(int(x.min()) for x in c)
    slack = int(math.floor(budget)) - base
    if slack < 0:
        raise ValueError(f"budget {budget} bits is below the cheapest assignment ({base} bits)")
    extra = [x - x.min() for x in c]
    g = reduce(math.gcd, (int(v) for x in extra for v in x if v), 0) or 1
    units = slack // g
    if units > max_units:                         # coarser grid; costs rounded up: still within budget
        step = -(-slack // max_units)
        ex = [-(-x // step) for x in extra]
        units = slack // step
    else:
        ex = [x // g for x in extra]
    units = int(units)
    # dp[b]: least loss of the items so far with extra cost <= b
    dp = np.zeros(units + 1)
    pick = np.zeros((n, units + 1), dtype=np.int16)
    for i in range(n):
        # cheaper candidates first, so ties keep the cheaper one
        order = sorted(range(len(ex[i])), key=lambda k: (int(ex[i][k]), l[i][k]))
        new = np.full(units + 1, np.inf)
        arg = np.zeros(units + 1, dtype=np.int16)
        for k in order:
            e = int(ex[i][k])
            if e > units:
                continue
            cand = np.full(units + 1, np.inf)
            cand[e:] = dp[:units + 1 - e] + l[i][k]
            better = cand < new
            new[better], arg[better] = cand[better], k
        dp, pick[i] = new, arg
    out = [0] * n
    b = units
    for i in range(n - 1, -1, -1):
        k = int(pick[i, b])
        out[i] = k
        b -= int(ex[i][k])
    return out


def brute_force(costs, losses, budget) -> tuple[float, list[int]]:
    """The exact optimum by enumeration (tests only)."""
    import itertools
    best = (math.inf, [])
    for ks in itertools.product(*(range(len(c)) for c in costs)):
        if sum(costs[i][k] for i, k in enumerate(ks)) <= budget:
            loss = sum(losses[i][k] for i, k in enumerate(ks))
            if loss < best[0]:
                best = (loss, list(ks))
    return best
