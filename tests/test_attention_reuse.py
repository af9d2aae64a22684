"""Attention reuse (alphaquant/pipeline/attention_reuse.py): later passes of a layer start from the attention half's
cached output. The schedule against hand-written cases; whole runs with it on and off give the same weights,
records and perplexities bit for bit (OLMoE and Qwen2-MoE with its shared expert, the calibration cache on the
device and on the host), the resumed forwards really ran, and an incomplete cache is not used."""
from __future__ import annotations

import pytest
import torch

import tiny
from alphaquant.pipeline.attention_reuse import ACT, CORE, H, PassReuse, ReusePoints, plan, start_from
from pipeline_utils import run_session, write_config

P = ReusePoints(qkv=frozenset({"a.q", "a.k", "a.v"}), o="a.o", h="norm2")
PA = ReusePoints(qkv=P.qkv, o="a.o", h="norm2", act="m.act", act_deps=frozenset({"m.gate", "m.e0.g", "m.e0.u"}))


def _schedule(groups, points=P):
    """(resume, captures) of each group's pass, then the propagation's resume."""
    held, out = set(), []
    for g in range(len(groups)):
        r = plan(points, {n for grp in groups[g:] for n in grp}, held)
        out.append((r.resume, tuple(c for c, _ in r.capture)))
        held |= {c for c, _ in r.capture}
        held.discard(r.supersedes)
    return out + [PassReuse(start_from(held)).resume]


def test_schedule():
    qkv, o, gu, d = ["a.q", "a.k", "a.v"], ["a.o"], ["m.e0.g", "m.e0.u"], ["m.e0.d"]
    assert _schedule([qkv, o, gu, d]) == [(None, ()), (None, (CORE,)), ("o_proj", (H,)), ("mlp", ()), "mlp"]
    assert _schedule([qkv, gu, d]) == [(None, ()), (None, (CORE, H)), ("mlp", ()), "mlp"]  # o_proj not quantized
    assert _schedule([qkv + o + gu + d]) == [(None, ()), None]                            # not true-sequential
    assert _schedule([gu, d]) == [(None, (CORE, H)), ("mlp", ()), "mlp"]                  # attention not quantized
    # with the MoE block's down inputs: captured in the down pass (beside h, which stays), the propagation
    # continues from them; not while gate/up (or attention) are still to be solved
    assert _schedule([qkv, o, gu, d], PA) == [(None, ()), (None, (CORE,)), ("o_proj", (H,)), ("mlp", (ACT,)), "down"]
    assert _schedule([qkv + o + gu + d], PA) == [(None, ()), None]
    assert _schedule([qkv, o, gu + d], PA) == [(None, ()), (None, (CORE,)), ("o_proj", (H,)), "mlp"]
    assert _schedule([gu, d], PA) == [(None, (CORE, H)), ("mlp", (ACT,)), "down"]
    assert plan(PA, set(), {H}).supersedes is None and start_from({ACT}) is None     # act is read beside h
    assert plan(P, set(), {CORE}) == PassReuse(CORE, ((H, "norm2"),))
    assert plan(P, set(), {CORE}).supersedes == CORE and plan(P, set(), {H}).supersedes is None
    assert PassReuse(H).resume == "mlp" and PassReuse(CORE).resume == "o_proj" and PassReuse().resume is None


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("reuse")
    return root, tiny.write_corpus(root), {f: tiny.make_checkpoint(f, root / f) for f in ("olmoe", "qwen2_moe")}


def _run(root, corpus, ckpt, name, reuse, cache_device="auto", gpu=False):
    extra = {"trainer": {"accelerator": "gpu", "devices": 1},
             "model": {"path": str(ckpt), "dtype": "bfloat16", "lazy": True}} if gpu else {}
    cfg = write_config(root / f"{name}.yaml", ckpt, corpus,
                       calibration={"dataset": str(corpus), "split": "train", "num_samples": 6, "seq_len": 48,
                                    "batch_size": 4, "min_tokens_warn": 16, "reuse_attention": reuse,
                                    "cache_device": cache_device}, **extra)
    s = run_session(cfg)
    assert set(s.results["stage_seconds"]) == {"data", "warmup", "setup", "walk", "plots", "finish", "cleanup"}   # all timed
    weights = {n: m.weight.detach().clone() for n, m in s.model.named_modules() if isinstance(m, torch.nn.Linear)}
    losses = {n: (r.loss, r.rel_error, r.tokens) for n, r in s.results["records"].items()} \
        if "records" in s.results else None
    return weights, losses, s.results.get("perplexity")


def _resumes(monkeypatch):
    from models.common.decoder import DecoderLayer
    calls = []
    forward = DecoderLayer.forward

    def counting(self, *a, resume=None, **k):
        calls.append(resume)
        return forward(self, *a, resume=resume, **k)
    monkeypatch.setattr(DecoderLayer, "forward", counting)
    return calls


@pytest.mark.parametrize("family,cache_device", [("olmoe", "auto"), ("qwen2_moe", "cpu")])
def test_same_bits_as_recomputing(models_dir, monkeypatch, family, cache_device):
    root, corpus, ckpts = models_dir
    calls = _resumes(monkeypatch)
    off = _run(root, corpus, ckpts[family], f"{family}_off", False, cache_device)
    assert set(calls) == {None}
    calls.clear()
    on = _run(root, corpus, ckpts[family], f"{family}_on", True, cache_device)
    # per layer: the gate/up pass from the o_proj input, the down pass from h (2 batches each), the propagation
    # from the down inputs (device cache) or from h (cache_device cpu)
    assert calls.count("o_proj") >= 2 and calls.count("mlp") >= 2
    assert calls.count("down") >= (2 if cache_device == "auto" else 0) and calls.count("mlp") >= (
        2 if cache_device == "auto" else 4)
    if cache_device == "cpu":
        assert "down" not in calls
    assert off[0].keys() == on[0].keys()
    for n in off[0]:
        assert torch.equal(off[0][n], on[0][n]), n
    assert off[1] and off[2] and off[1] == on[1] and off[2] == on[2]      # records, perplexities


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("family", ["olmoe", "qwen2_moe"])
def test_same_bits_as_recomputing_on_gpu(models_dir, monkeypatch, family):
    """bf16 on CUDA, lazy (the next layer copied to the GPU ahead): the grouped experts path, whose down inputs the
    propagation continues from, the fused RMSNorm and combine kernels -- the same bits with the caches and without."""
    root, corpus, ckpts = models_dir
    calls = _resumes(monkeypatch)
    off = _run(root, corpus, ckpts[family], f"{family}_gpu_off", False, gpu=True)
    calls.clear()
    on = _run(root, corpus, ckpts[family], f"{family}_gpu_on", True, gpu=True)
    assert calls.count("down") >= 2 and calls.count("o_proj") >= 2
    # a lazy run's layers are freed after their write (meta): every module's loss and error, bit for bit, instead
    assert off[1] and off[1] == on[1] and off[2] == on[2]


def test_incomplete_cache_is_not_used(models_dir, monkeypatch):
    """A capture that misses a batch leaves its cache unused: the later passes recompute, same weights."""
    from alphaquant.pipeline.runner import LayerRunner
    root, corpus, ckpts = models_dir
    ref = _run(root, corpus, ckpts["olmoe"], "ref", False)
    capturer = LayerRunner._capturer

    def skipping(self, cache):
        pre = capturer(self, cache)

        def maybe(mod, args, kwargs):
            if 0 not in {int(i) for i in self._idx}:      # the batch holding sample 0 is never cached
                pre(mod, args, kwargs)
        return maybe
    monkeypatch.setattr(LayerRunner, "_capturer", skipping)
    calls = _resumes(monkeypatch)
    got = _run(root, corpus, ckpts["olmoe"], "skip", True)
    assert set(calls) == {None}
    for n in ref[0]:
        assert torch.equal(ref[0][n], got[0][n]), n


def test_the_down_input_cache_is_left_out_where_it_would_crowd_the_gpu(models_dir, monkeypatch):
    """On a GPU the down inputs are cached only when they take at most ACT_MAX_SHARE of its memory (checked here
    with a stand-in device and layer; on the CPU the rule does not apply)."""
    from types import SimpleNamespace
    from alphaquant.pipeline import walker as W
    from alphaquant.pipeline.attention_reuse import ReusePoints
    from alphaquant import models
    from alphaquant.arch import get_adapter
    model = models.from_config({**tiny.BASE, **tiny.FAMILIES["olmoe"]}, seed=0).to(torch.bfloat16)
    real = get_adapter(model).attention_reuse(model.model.layers[0])   # top_k 2 rows of the intermediate 32, bf16
    assert real.act == "mlp.expert_act" and real.act_token_bytes == 2 * 32 * 2
    points = ReusePoints(qkv=frozenset(), o="o", h="h", act="mlp.expert_act", act_token_bytes=2 * 32 * 2)
    w = W.LayerWalker.__new__(W.LayerWalker)
    w.dm = SimpleNamespace(windows={"calib": torch.zeros(8, 64, dtype=torch.long)})       # 512 tokens
    w.trainer = SimpleNamespace(world_size=1, strategy=SimpleNamespace(root_device=torch.device("cuda", 0)))
    need = 512 * 2 * 32 * 2                                                                 # 64 KiB
    for total, fits in ((4 * need, True), (4 * need - 1, False)):
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d, t=total: SimpleNamespace(total_memory=t))
        assert w._act_fits(points) is fits
    w.trainer.world_size = 2                                                                # half the tokens per rank
    assert w._act_fits(points)
    w.trainer.strategy.root_device = torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: SimpleNamespace(total_memory=0))
    assert w._act_fits(points)
