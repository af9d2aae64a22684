"""The four local families through `model.implementation: transformers` against our own model code.

Same tiny checkpoints (tests/tiny.py, saved in the hub layout), same recipe and data: the generic path (transformers'
classes, per-layer key conversion, structural groups, routing from the experts' arguments) must give the same
routing (tokens per expert, exactly) and the same quantized weights (to solver tolerance: the two models sum
in different orders, so a few weights may land one grid step apart).
"""
from __future__ import annotations

import re

import pytest
import torch

from alphaquant import models
import tiny
from alphaquant import arch
from pipeline_utils import run_session, write_config

QUANT = {"default": {"wq": "int4", "group_size": 32}, "overrides": [{"pattern": "lm_head", "skip": True}]}
MIXTRAL_NAMES = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}


def generic_name(name: str) -> str:
    """Our local module name -> the generic path's (Mixtral: block_sparse_moe.experts.E.w1 -> mlp.experts.E.gate_proj)."""
    name = name.replace(".block_sparse_moe.", ".mlp.")
    return re.sub(r"\.(w1|w2|w3)$", lambda m: "." + MIXTRAL_NAMES[m.group(1)], name)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return root, tiny.write_corpus(root)


def test_deepseek_moe_v1_is_local_only():
    """DeepSeek-MoE v1 (model_type 'deepseek') is not in transformers: the transformers way refuses it."""
    assert arch.detect({"model_type": "deepseek"}) == "deepseek_moe"
    with pytest.raises(models.UnsupportedModelError, match="deepseek"):
        arch.detect({"model_type": "deepseek"}, implementation="transformers")


@pytest.mark.parametrize("family", ["olmoe", "qwen2_moe", "mixtral"])
def test_same_quantized_weights_both_ways(family, work):
    root, corpus = work
    d = tiny.make_checkpoint(family, root / family)
    runs = {}
    for impl in ("local", "transformers"):
        cfg = write_config(root / f"{family}-{impl}.yaml", d, corpus, quant=QUANT,
                           model={"path": str(d), "dtype": "float32", "lazy": False, "implementation": impl})
        runs[impl] = run_session(cfg)
    local, generic = runs["local"], runs["transformers"]
    assert local.adapter.family == family and generic.adapter.family == "generic_moe"
    rl, rg = local.results["records"], generic.results["records"]
    assert {generic_name(n) for n in rl} == set(rg)
    for n, r in rl.items():                   # routing: identical token counts per expert (and per linear)
        assert rg[generic_name(n)].tokens == r.tokens, n
    same_all = []
    ours = dict(local.model.named_parameters())
    theirs = dict(generic.model.named_parameters())
    for n in rl:
        a, b = ours[f"{n}.weight"], theirs[f"{generic_name(n)}.weight"]
        same = (a == b).float().mean()
        assert same > 0.999, (n, float(same))
        step = float(rl[n].params.scale.abs().max())          # one grid step of the widest group
        assert (a - b).abs().max() <= 1.01 * step, n
        same_all.append(float(same))
    print(f"{family}: fraction of equal quantized weights min {min(same_all):.4f} mean "
          f"{sum(same_all) / len(same_all):.4f}")
    pl, pg = local.results["perplexity"], generic.results["perplexity"]
    assert pg["original"] == pytest.approx(pl["original"], rel=1e-4)
    assert pg["quantized"] == pytest.approx(pl["quantized"], rel=1e-2)
