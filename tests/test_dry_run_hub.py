"""`--dry-run` of a hub id downloads no weights (issue 20 point 5): config.json and the other json files
come from snapshot_download(allow_patterns=["*.json"]), the tensors' names/shapes/dtypes from
get_safetensors_metadata (HTTP range requests for the headers). huggingface_hub is replaced by fakes that
serve a tiny model saved to a temporary directory and fail the test if asked for a *.safetensors file.
The plan prints the memory estimate (alphaquant/pipeline/memory_plan.py), checked here against counts.
"""
from __future__ import annotations

import fnmatch
import json
import shutil
import struct
from pathlib import Path

import huggingface_hub
import pytest
import torch

import tiny
from alphaquant.app import main

REPO_ID = "org/tiny-moe"


def _headers(path: Path) -> dict:
    with path.open("rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n))


class FakeHub:
    """snapshot_download / hf_hub_download / get_safetensors_metadata over a local directory; records calls."""

    def __init__(self, src: Path, cache: Path):
        self.src, self.cache, self.calls = src, cache, []

    def snapshot_download(self, repo_id, allow_patterns=None, **kw):
        self.calls.append(("snapshot_download", repo_id, allow_patterns))
        if repo_id != REPO_ID:
            import httpx
            url = f"https://huggingface.co/api/models/{repo_id}"
            raise huggingface_hub.errors.RepositoryNotFoundError(
                f"404 Client Error. (Request ID: x)\n\nRepository Not Found for url: {url}.",
                response=httpx.Response(404, request=httpx.Request("GET", url)))
        patterns = list(allow_patterns or ["*"])
        if any(fnmatch.fnmatch("model.safetensors", p) for p in patterns):
            pytest.fail(f"a dry run asked snapshot_download for weights: allow_patterns={patterns}")
        out = self.cache / repo_id.replace("/", "--")
        out.mkdir(parents=True, exist_ok=True)
        for f in self.src.iterdir():
            if any(fnmatch.fnmatch(f.name, p) for p in patterns):
                shutil.copy(f, out / f.name)
        return str(out)

    def hf_hub_download(self, repo_id, filename, **kw):
        self.calls.append(("hf_hub_download", repo_id, filename))
        if filename.endswith(".safetensors"):
            pytest.fail(f"a dry run downloaded the weight file {filename}")
        return str(self.src / filename)

    def get_safetensors_metadata(self, repo_id, revision=None, **kw):
        from huggingface_hub.utils import SafetensorsFileMetadata, SafetensorsRepoMetadata, TensorInfo
        self.calls.append(("get_safetensors_metadata", repo_id, revision))
        files = sorted(p.name for p in self.src.glob("*.safetensors"))
        metas, weight_map = {}, {}
        for name in files:                       # only the header bytes, as the HTTP range request reads
            h = _headers(self.src / name)
            meta = h.pop("__metadata__", {})
            metas[name] = SafetensorsFileMetadata(metadata=meta, tensors={
                k: TensorInfo(dtype=v["dtype"], shape=v["shape"], data_offsets=tuple(v["data_offsets"]))
                for k, v in h.items()})
            weight_map.update({k: name for k in h})
        return SafetensorsRepoMetadata(metadata=None, sharded=len(files) > 1, weight_map=weight_map,
                                       files_metadata=metas)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return tiny.make_checkpoint("olmoe", tmp_path_factory.mktemp("hub") / "tiny-moe")


@pytest.fixture
def hub(tiny_model, tmp_path, monkeypatch):
    fake = FakeHub(tiny_model, tmp_path / "cache")
    for name in ("snapshot_download", "hf_hub_download", "get_safetensors_metadata"):
        monkeypatch.setattr(huggingface_hub, name, getattr(fake, name))
    monkeypatch.chdir(tmp_path)                  # 'org/tiny-moe' is no local directory here
    return fake


def _argv(tmp_path, *extra):
    return ["--model.path", REPO_ID, "--model.dtype", "float32", "--trainer.accelerator", "cpu",
            "--calibration.num_samples", "8", "--calibration.seq_len", "64", "--calibration.batch_size", "2",
            "--eval.max_windows", "4", "--eval.seq_len", "64", "--quant.default.group_size", "32",
            "--logging.wandb.mode", "disabled", "--output.dir", str(tmp_path / "out"), "--dry-run", *extra]


def test_hub_dry_run_reads_headers_only(hub, tmp_path, capsys):
    assert main(_argv(tmp_path)) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "model.layers.*.mlp.experts.*.gate_proj" in out and "self_attn.q_proj" in out, out
    assert "x the size)" in out and "x smaller" not in out, out
    assert "peak GPU memory: none (trainer.accelerator is cpu), peak host memory ~" in out, out
    assert "host: outside layers" in out and "Hessians" in out, out
    kinds = [c[0] for c in hub.calls]
    assert ("snapshot_download", REPO_ID, ["*.json"]) in hub.calls, hub.calls
    assert "get_safetensors_metadata" in kinds, hub.calls
    assert not (tmp_path / "out").exists()


def test_hub_dry_run_gpu_lines_and_batch_size(hub, tmp_path, capsys):
    def gpu_peak(batch):
        assert main(_argv(tmp_path, "--trainer.accelerator", "auto", "--calibration.batch_size", str(batch))) == 0
        out = capsys.readouterr().out
        line = next(ln for ln in out.splitlines() if "peak GPU memory ~" in ln)
        assert "GPU: layer weights" in out, out
        return line
    assert gpu_peak(1) != gpu_peak(8)               # the estimate follows calibration.batch_size


def test_hub_dry_run_checks_the_headers(hub, tiny_model, tmp_path, capsys):
    """A tensor missing from the headers is found without a download: one sentence, exit 2."""
    real = hub.get_safetensors_metadata

    def lacking(repo_id, revision=None, **kw):
        m = real(repo_id, revision)
        m.weight_map.pop("model.layers.1.mlp.experts.3.up_proj.weight")
        return m
    huggingface_hub.get_safetensors_metadata = lacking       # restored by monkeypatch (set in the fixture)
    assert main(_argv(tmp_path)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1, err
    assert "model.layers.1.mlp.experts.3.up_proj.weight" in err and REPO_ID in err, err


def test_unknown_hub_id_is_one_sentence(hub, tmp_path, capsys):
    argv = _argv(tmp_path)
    argv[argv.index(REPO_ID)] = "org/no-such-model"
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1, err
    assert "'org/no-such-model'" in err and "no such repository" in err, err
    assert err.count(". ") == 0 and "Request ID" not in err, err


def test_real_run_still_asks_for_the_weights(hub):
    from alphaquant.models.loading import resolve_checkpoint_dir
    calls = []
    huggingface_hub.snapshot_download = lambda repo_id, allow_patterns=None, **kw: calls.append(allow_patterns) or "."
    resolve_checkpoint_dir(REPO_ID)
    assert calls == [["*.json", "*.safetensors"]]


# --- the estimate against straightforward counts ---------------------------------------------------------

def _tiny_meta(tiny_model, dtype="bfloat16"):
    from alphaquant.arch import get_adapter
    from alphaquant.config.recipe import resolve_recipe
    from alphaquant.config.run import load_config
    from alphaquant.models.loading import skeleton
    model = skeleton(tiny_model, dtype)
    adapter = get_adapter(model)
    cfg = load_config(None, ["--model.path", str(tiny_model), "--quant.default.group_size", "32"])
    return model, adapter, resolve_recipe(cfg.quant, adapter.linear_modules(model))


def test_estimate_terms_are_the_counts(tiny_model):
    from alphaquant.pipeline.memory_plan import estimate_peak_memory, model_shape
    model, adapter, specs = _tiny_meta(tiny_model)
    shape = model_shape(model, adapter, specs)
    layer0 = model.model.layers[0]
    assert shape.layers[0].weight_bytes == sum(p.numel() * p.element_size() for p in layer0.parameters())
    assert shape.dtype_bytes == 2 and shape.hidden_size == 64
    # OLMoE: 8 experts, gate/up share each expert's input (H=64), down reads I=32: gate/up is the largest group
    assert shape.layers[0].hessian_bytes == 8 * 64 * 64 * 4
    n, t, b = 8, 32, 4
    est = estimate_peak_memory(shape, num_samples=n, seq_len=t, batch_size=b)
    assert est["gpu"]["cached inputs"] == n * t * 64 * 2
    # the layer, the previous one being written and the next one copied to the GPU ahead
    assert est["gpu"]["layer weights"] == 3 * shape.layers[0].weight_bytes
    assert est["gpu"]["Hessians"] == 8 * 64 * 64 * 4
    assert est["host"]["token ids"] == n * t * 16
    vocab, hidden = 320, 64
    assert shape.embed_bytes == vocab * hidden * 2
    assert shape.outside_bytes == (2 * vocab * hidden + hidden) * 2          # embed, lm_head, final norm
    bigger = estimate_peak_memory(shape, num_samples=n, seq_len=t, batch_size=4 * b)
    assert bigger["activations"] == 4 * est["activations"]
    cpu = estimate_peak_memory(shape, num_samples=n, seq_len=t, batch_size=b, gpu=False)
    assert cpu["gpu_total"] == 0 and cpu["host_total"] > est["host_total"]
    # calibration.cache_device cpu: the cached inputs move from the GPU to pinned host memory, and the next layer
    # is no longer copied to the GPU ahead
    pinned = estimate_peak_memory(shape, num_samples=n, seq_len=t, batch_size=b, cache_on_host=True)
    assert "cached inputs" not in pinned["gpu"] and pinned["host"]["cached inputs (pinned)"] == n * t * 64 * 2
    assert pinned["gpu"]["layer weights"] == 2 * shape.layers[0].weight_bytes
    assert pinned["gpu_total"] == est["gpu_total"] - n * t * 64 * 2 - shape.layers[0].weight_bytes
    assert pinned["host_total"] == est["host_total"] + n * t * 64 * 2
    # calibration.reuse_attention: one more calibration cache and one batch, where the cache is
    reuse = estimate_peak_memory(shape, num_samples=n, seq_len=t, batch_size=b, reuse_attention=True)
    assert reuse["gpu"]["attention reuse cache"] == (n + b) * t * 64 * 2
    # ... and the MoE block's down inputs of every calibration token: top_k 2 rows of the intermediate width 32
    assert shape.layers[0].down_input_token_bytes == 2 * 32 * 2
    assert reuse["gpu"]["down-input cache"] == n * t * 2 * 32 * 2
    assert reuse["gpu_total"] == est["gpu_total"] + (n + b) * t * 64 * 2 + n * t * 2 * 32 * 2
    assert reuse["host_total"] == est["host_total"]
    both = estimate_peak_memory(shape, num_samples=n, seq_len=t, batch_size=b, reuse_attention=True, cache_on_host=True)
    assert both["gpu_total"] == pinned["gpu_total"] and both["host_total"] == pinned["host_total"] + (n + b) * t * 64 * 2
