"""calibration.cache_device: cpu keeps the cached layer inputs/outputs (SampleStore) in host memory, pinned when
the layers run on a GPU, and moves one batch at a time to the accelerator; the quantized checkpoint is the same
bits as with the default (auto: the inputs stay on the accelerator)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import tiny
from pipeline_utils import run_session, write_config

from alphaquant.errors import ConfigError
from alphaquant.pipeline import stores, walker
from alphaquant.pipeline.stores import SampleStore


def test_config_key_default_and_values(tmp_path):
    from alphaquant.config.run import load_config

    cfg = write_config(tmp_path / "run.yaml", tmp_path / "m", tmp_path / "c.txt")
    assert load_config(cfg, []).calibration.cache_device == "auto"
    assert load_config(cfg, ["--calibration.cache_device", "cpu"]).calibration.cache_device == "cpu"
    with pytest.raises(ConfigError, match="cache_device"):
        load_config(cfg, ["--calibration.cache_device", "disk"])


def test_store_on_host_same_rows_any_batching():
    x = torch.randn(6, 5, 4)
    s = SampleStore(torch.zeros(6, 5, dtype=torch.long), lambda ids: x[:len(ids)], "cpu")
    for b in (torch.tensor([0, 1, 2]), torch.tensor([3, 4, 5])):
        s.put(b, x[b] * 2)
    assert s.cached_devices() == {torch.device("cpu")}
    assert torch.equal(s.get(torch.tensor([3, 4, 5]), torch.device("cpu")), x[3:] * 2)
    assert torch.equal(s.get(torch.tensor([1, 4]), torch.device("cpu")), x[[1, 4]] * 2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_store_on_host_from_gpu_is_pinned_and_exact():
    dev = torch.device("cuda")
    x = torch.randn(8, 16, 32, device=dev, dtype=torch.bfloat16)
    s = SampleStore(torch.zeros(8, 16, dtype=torch.long), lambda ids: x[:len(ids)], "cpu")
    batches = [torch.arange(0, 4), torch.arange(4, 8)]
    for b in batches:
        s.put(b, x[b.to(dev)] + 1)                 # the GPU output is freed and its memory reused below
    torch.randn(8, 16, 32, device=dev)
    assert s.cached_devices() == {torch.device("cpu")}
    assert all(h.is_pinned() for h in s.hidden.values())
    for b in batches:
        y = s.get(b, dev)
        assert y.device.type == "cuda" and torch.equal(y, x[b.to(dev)] + 1)
    assert torch.equal(s.get(torch.tensor([6, 1]), dev), x[[6, 1]] + 1)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cache_device")
    return tmp, tiny.make_checkpoint("olmoe", tmp / "olmoe", num_hidden_layers=2), tiny.write_corpus(tmp)


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.suffix == ".safetensors"}


def test_checkpoint_identical_with_cache_on_host(tiny_run, monkeypatch):
    tmp, ckpt, corpus = tiny_run
    made = []
    init = SampleStore.__init__

    def spy(self, *a, **kw):
        init(self, *a, **kw)
        made.append(self)
    monkeypatch.setattr(stores.SampleStore, "__init__", spy)
    outs, ppl = {}, {}
    for mode in ("auto", "cpu"):
        made.clear()
        cfg = write_config(tmp / f"{mode}.yaml", ckpt, corpus, eval={"max_windows": 4},
                           calibration={"cache_device": mode}, output={"save": True, "dir": str(tmp / mode)})
        session = run_session(cfg)
        ppl[mode] = (session.results["perplexity"], session.results["modules"])
        streams = [s for s in made if s.embed is not walker._cache_miss]    # not the attention reuse caches
        assert streams and all(s.hidden for s in streams)    # every stream cached hidden states
        assert len(streams) < len(made)                      # the reuse caches follow cache_device too
        want = torch.device("cpu") if mode == "cpu" else None
        assert all(s.device == want for s in made)
        assert set().union(*(s.cached_devices() for s in made)) == {torch.device("cpu")}   # a CPU run
        outs[mode] = _files(tmp / mode)
    assert outs["auto"] and outs["auto"] == outs["cpu"]
    assert ppl["auto"] == ppl["cpu"]
