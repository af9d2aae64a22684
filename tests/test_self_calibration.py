"""calibration.dataset self (alphaquant/data_self.py): expert-balanced windows the model writes itself.

Tiny checkpoints of the four families; every reference below is written independently of the module's
KV-cache / candidate-batch code: full forwards of the whole prefix, router hooks for the routing.
"""
from __future__ import annotations

import pytest
import torch

import tiny
from alphaquant import models
from alphaquant.data_self import self_windows, window_generator
from alphaquant.errors import ConfigError
from pipeline_utils import run_session, write_config

FAMILIES = list(tiny.FAMILIES)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return tiny.family_checkpoints(tmp_path_factory.mktemp("ckpt"))


def _model(dirs, family):
    return models.from_pretrained(dirs[family], dtype="float32").eval()


def _routers(model):
    return [m.router for m in model.modules() if hasattr(m, "router") and hasattr(m, "num_experts")]


def _routing(model, ids: torch.Tensor) -> list[torch.Tensor]:
    """Per MoE layer, the topk_ids [B * S, k] of a plain full forward of ids [B, S] (router hooks)."""
    seen = []
    hooks = [r.register_forward_hook(lambda _m, _i, out: seen.append(out[0].clone())) for r in _routers(model)]
    try:
        with torch.no_grad():
            model(ids)
    finally:
        for h in hooks:
            h.remove()
    return seen


def _load(model, windows: torch.Tensor) -> list[torch.Tensor]:
    """Per MoE layer, how many routed (token, slot) pairs each expert got over all windows."""
    E = next(m.num_experts for m in model.modules() if hasattr(m, "router"))
    return [torch.bincount(ids.reshape(-1), minlength=E).float() for ids in _routing(model, windows)]


def _cv(model, windows) -> float:
    """Coefficient of variation (std / mean) of the per-expert load, averaged over the MoE layers."""
    loads = _load(model, windows)
    return sum(float(c.std(unbiased=False) / c.mean()) for c in loads) / len(loads)


def _noise(gen, V):
    u = torch.rand(V, generator=gen).clamp(1e-20, 1.0 - 1e-7)
    return -torch.log(-torch.log(u))


@torch.no_grad()
def _reference(model, prompts, seq_len, seed, temperature, balance, candidates):
    """The sampler as the module documents it, one window and one token at a time, full forwards only."""
    out = []
    for i, prompt in enumerate(prompts):
        gen, ids = window_generator(seed, i), prompt.clone()
        E = next(m.num_experts for m in model.modules() if hasattr(m, "router"))
        counts = torch.stack([torch.bincount(r.reshape(-1), minlength=E).float() for r in _routing(model, ids[None])])
        while len(ids) < seq_len:
            logits = model(ids[None])[0, -1].float()
            score = torch.log_softmax(logits / temperature, -1) + _noise(gen, logits.numel())
            if balance == 0:
                nxt = int(score.argmax())
            else:
                top = torch.topk(score, candidates)
                best = None
                for s, c in zip(top.values.tolist(), top.indices.tolist()):
                    last = [r.reshape(len(ids) + 1, -1)[-1] for r in _routing(model, torch.cat((ids, torch.tensor([c])))[None])]
                    mean = counts.mean(-1, keepdim=True)
                    rel = (counts - mean) / mean.clamp_min(1.0)                       # (L, E)
                    over = sum(float(rel[l, e].mean()) for l, e in enumerate(last)) / len(last)
                    if best is None or s - balance * over > best[0]:
                        best = (s - balance * over, c, last)
                nxt = best[1]
                for l, e in enumerate(best[2]):
                    counts[l] += torch.bincount(e, minlength=E).float()
            ids = torch.cat((ids, torch.tensor([nxt])))
        out.append(ids)
    return torch.stack(out)


@pytest.mark.parametrize("family", FAMILIES)
def test_windows_shape_dtype_range_prompt_and_seed(family, checkpoints):
    _, _, dirs = checkpoints
    model = _model(dirs, family)
    prompts = torch.randint(0, model.config.vocab_size, (5, 3), generator=torch.Generator().manual_seed(1))
    w = self_windows(model, 5, 20, prompts, seed=3, balance=2.0, candidates=4, batch_size=2)
    assert w.shape == (5, 20) and w.dtype == torch.long
    assert int(w.min()) >= 0 and int(w.max()) < model.config.vocab_size
    assert torch.equal(w[:, :3], prompts)                                     # the prompt is the window's start
    assert torch.equal(w, self_windows(model, 5, 20, prompts, seed=3, balance=2.0, candidates=4, batch_size=5))
    assert not torch.equal(w, self_windows(model, 5, 20, prompts, seed=4, balance=2.0, candidates=4))


@pytest.mark.parametrize("family", ["olmoe", "mixtral"])
def test_balance_zero_is_plain_seeded_sampling(family, checkpoints):
    _, _, dirs = checkpoints
    model = _model(dirs, family)
    prompts = torch.zeros(3, 1, dtype=torch.long)
    w = self_windows(model, 3, 16, prompts, seed=7, temperature=0.8, balance=0.0, candidates=8, batch_size=2)
    assert torch.equal(w, _reference(model, prompts, 16, 7, 0.8, 0.0, 8))


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_moe"])
def test_balanced_choice_matches_full_forward_reference(family, checkpoints):
    _, _, dirs = checkpoints
    model = _model(dirs, family)
    prompts = torch.tensor([[0, 5], [7, 9]])
    w = self_windows(model, 2, 12, prompts, seed=1, balance=5.0, candidates=4, batch_size=2)
    assert torch.equal(w, _reference(model, prompts, 12, 1, 1.0, 5.0, 4))


def test_balance_lowers_the_expert_load_spread(checkpoints):
    _, _, dirs = checkpoints
    model = _model(dirs, "olmoe")
    prompts = torch.zeros(16, 1, dtype=torch.long)
    plain = self_windows(model, 16, 64, prompts, seed=0, balance=0.0)
    balanced = self_windows(model, 16, 64, prompts, seed=0, balance=10.0, candidates=8)
    cv0, cv1 = _cv(model, plain), _cv(model, balanced)
    assert cv1 < 0.8 * cv0, (cv0, cv1)


def test_refusals(checkpoints, tmp_path):
    _, corpus, dirs = checkpoints
    with pytest.raises(ConfigError, match="local families"):
        self_windows(torch.nn.Linear(2, 2), 1, 4, torch.zeros(1, 1, dtype=torch.long))
    with pytest.raises(ConfigError, match="lazy"):
        run_session(write_config(tmp_path / "lazy.yaml", dirs["olmoe"], corpus,
                                 model={"path": str(dirs["olmoe"]), "lazy": True},
                                 calibration={"dataset": "self", "num_samples": 2, "seq_len": 16, "batch_size": 1}))
    with pytest.raises(ConfigError, match="self_prompt_len"):
        run_session(write_config(tmp_path / "long.yaml", dirs["olmoe"], corpus,
                                 calibration={"dataset": "self", "num_samples": 2, "seq_len": 16, "batch_size": 1,
                                              "self_prompt_len": 16}))


def test_pipeline_run_with_self_data_and_prompts(checkpoints, tmp_path):
    from alphaquant.data import calibration_windows, load_tokens
    from transformers import AutoTokenizer

    _, corpus, dirs = checkpoints
    cal = {"dataset": "self", "num_samples": 4, "seq_len": 32, "batch_size": 2, "seed": 5,
           "self_prompts": str(corpus), "self_prompt_len": 4, "self_candidates": 4}
    session = run_session(write_config(tmp_path / "run.yaml", dirs["olmoe"], corpus, calibration=cal))
    w = session.windows["calib"]
    assert w.shape == (4, 32) and session.results["records"]
    tokens = load_tokens(str(corpus), "train", AutoTokenizer.from_pretrained(dirs["olmoe"]))
    assert torch.equal(w[:, :4], calibration_windows(tokens, 4, 4, seed=5))   # prompts: seeded corpus windows
    # without self_prompts every window starts from the tokenizer's start token (BOS, else EOS: id 0 here)
    cal = {**cal, "self_prompts": None, "self_prompt_len": 1}
    session = run_session(write_config(tmp_path / "run2.yaml", dirs["mixtral"], corpus, calibration=cal,
                                       eval={"enabled": False}))
    assert session.windows["calib"].shape == (4, 32) and bool((session.windows["calib"][:, 0] == 0).all())
