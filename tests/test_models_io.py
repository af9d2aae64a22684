"""Loading, saving, sharding, lazy layers and error messages of models/."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from alphaquant import models

QWEN = dict(model_type="qwen2_moe", vocab_size=128, hidden_size=32, intermediate_size=40, moe_intermediate_size=16,
            shared_expert_intermediate_size=24, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
            num_experts=4, num_experts_per_tok=2, mlp_only_layers=[1], initializer_range=0.2)
MIXTRAL = dict(model_type="mixtral", vocab_size=128, hidden_size=32, intermediate_size=24, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
               initializer_range=0.2, tie_word_embeddings=True)


def all_tensors(directory):
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def batch():
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[0, -2:] = 0
    return ids, mask


@pytest.mark.parametrize("config", [QWEN, MIXTRAL], ids=["qwen2_moe", "mixtral_tied"])
def test_round_trip_identical(config, tmp_path):
    model = models.from_config(config, seed=0)
    models.save_pretrained(model, tmp_path / "a")
    loaded = models.from_pretrained(tmp_path / "a")
    models.save_pretrained(loaded, tmp_path / "b")
    a, b = all_tensors(tmp_path / "a"), all_tensors(tmp_path / "b")
    assert a.keys() == b.keys() == {k for k in model.state_dict() if not (config.get("tie_word_embeddings")
                                                                          and k == "lm_head.weight")}
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ids, mask = batch()
    with torch.no_grad():  # same tensors; only BLAS summation order may differ with memory alignment
        torch.testing.assert_close(loaded(ids, mask), model(ids, mask), rtol=1e-5, atol=1e-6)


def test_sharded_checkpoint_loads(tmp_path):
    model = models.from_config(QWEN, seed=0)
    models.save_pretrained(model, tmp_path, max_shard_size="20KB", overwrite=True)
    shards = sorted(tmp_path.glob("model-*-of-*.safetensors"))
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(shards) > 2 and set(index["weight_map"].values()) == {s.name for s in shards}
    loaded = models.from_pretrained(tmp_path)
    ids, mask = batch()
    with torch.no_grad():  # same tensors; only BLAS summation order may differ with memory alignment
        torch.testing.assert_close(loaded(ids, mask), model(ids, mask), rtol=1e-5, atol=1e-6)


def test_lazy_layers_match_eager(tmp_path):
    models.save_pretrained(models.from_config(QWEN, seed=0), tmp_path, max_shard_size="30KB", overwrite=True)
    eager = models.from_pretrained(tmp_path)
    lazy = models.from_pretrained(tmp_path, lazy=True)
    assert all(p.is_meta for p in lazy.model.layers.parameters())
    assert not lazy.lm_head.weight.is_meta
    ids, mask = batch()
    with torch.no_grad():
        hidden, kw = lazy.prepare_layer_inputs(ids, mask)
        for i in range(len(lazy.model.layers)):
            layer = models.load_layer(lazy, i)
            hidden = layer(hidden, **kw)
            models.unload_layer(lazy, i)
            assert all(p.is_meta for p in layer.parameters())
        torch.testing.assert_close(lazy.head(hidden), eager(ids, mask), rtol=0, atol=0)
    # saving a lazy model streams the unloaded layers from its checkpoint
    models.save_pretrained(lazy, tmp_path / "resaved")
    a, b = all_tensors(tmp_path), all_tensors(tmp_path / "resaved")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_dtype_and_bf16_forward(tmp_path):
    models.save_pretrained(models.from_config(MIXTRAL, seed=0), tmp_path)
    model = models.from_pretrained(tmp_path, dtype="bf16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16} and model.dtype == torch.bfloat16
    ids, mask = batch()
    with torch.no_grad():
        ref = models.from_pretrained(tmp_path, dtype=torch.float32)(ids, mask)
        got = model(ids, mask)
    assert got.dtype == torch.bfloat16
    assert (got.float() - ref).abs().max() < 0.1 * ref.abs().max()


def test_fused_expert_layout_is_split(tmp_path):
    # A checkpoint with fused experts (gate_up_proj [E, 2I, H], down_proj [E, H, I]) loads into per-expert linears.
    model = models.from_config(QWEN, seed=0)
    models.save_pretrained(model, tmp_path / "hub")
    sd = all_tensors(tmp_path / "hub")
    fused = {}
    for key, t in sd.items():
        if ".mlp.experts." not in key:
            fused[key] = t
    for i in (0, 2):
        p = f"model.layers.{i}.mlp.experts"
        fused[f"{p}.gate_up_proj"] = torch.stack(
            [torch.cat([sd[f"{p}.{e}.gate_proj.weight"], sd[f"{p}.{e}.up_proj.weight"]]) for e in range(4)])
        fused[f"{p}.down_proj"] = torch.stack([sd[f"{p}.{e}.down_proj.weight"] for e in range(4)])
    (tmp_path / "fused").mkdir()
    save_file(fused, str(tmp_path / "fused" / "model.safetensors"))
    (tmp_path / "fused" / "config.json").write_text((tmp_path / "hub" / "config.json").read_text())
    loaded = models.from_pretrained(tmp_path / "fused")
    models.save_pretrained(loaded, tmp_path / "resaved")  # our save writes the per-expert hub layout
    resaved = all_tensors(tmp_path / "resaved")
    assert resaved.keys() == sd.keys() and all(torch.equal(resaved[k], sd[k]) for k in sd)


def test_unsupported_family_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    with pytest.raises(models.UnsupportedModelError, match="'llama'.*olmoe.*mixtral.*qwen2_moe.*deepseek"):
        models.from_pretrained(tmp_path)
    assert issubclass(models.UnsupportedModelError, ValueError)


def test_missing_directory_and_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        models.from_pretrained(tmp_path / "does-not-exist")
    with pytest.raises(FileNotFoundError, match="config.json"):
        models.from_pretrained(tmp_path)


def test_hub_id_offline_error_names_the_id():
    with pytest.raises(FileNotFoundError, match="no-such-org/no-such-model"):
        models.from_pretrained("no-such-org/no-such-model")


def test_save_refuses_to_overwrite(tmp_path):
    model = models.from_config(MIXTRAL, seed=0)
    models.save_pretrained(model, tmp_path / "out")
    with pytest.raises(FileExistsError, match="overwrite"):
        models.save_pretrained(model, tmp_path / "out")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary directory left behind


def test_shard_writer_rolls_at_size(tmp_path):
    with models.ShardWriter(tmp_path, max_shard_size=100) as w:
        for i in range(5):
            w.add(f"t{i}", torch.full((10,), float(i)))  # 40 bytes each -> 2 per shard
    assert len(list(tmp_path.glob("model-*-of-00003.safetensors"))) == 3
    reader = models.CheckpointReader(tmp_path)
    assert torch.equal(reader.read("t4"), torch.full((10,), 4.0))


@pytest.mark.parametrize("background", [False, True])
def test_shard_writer_roll_ends_the_current_shard(tmp_path, background):
    w = models.ShardWriter(tmp_path, max_shard_size=1000, background=background)
    w.roll()                                            # nothing held: no empty shard
    w.add("a", torch.zeros(10))
    w.roll()
    assert w.shards_started == 1
    w.roll()
    w.add("b", torch.ones(10))
    w.add("c", torch.ones(10))
    w.close()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    assert index == {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors",
                     "c": "model-00002-of-00002.safetensors"}
    reader = models.CheckpointReader(tmp_path)
    assert torch.equal(reader.read("a"), torch.zeros(10)) and torch.equal(reader.read("c"), torch.ones(10))


def _roll(writer, n=5):
    for i in range(n):
        writer.add(f"t{i}", torch.full((10,), float(i)))  # 40 bytes each -> 2 per shard at 100 bytes


def test_background_shard_writer_writes_the_same_files(tmp_path):
    with models.ShardWriter(tmp_path / "fg", max_shard_size=100) as w:
        _roll(w)
    with models.ShardWriter(tmp_path / "bg", max_shard_size=100, background=True) as w:
        _roll(w)
    names = sorted(p.name for p in (tmp_path / "fg").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "bg").iterdir()) and len(names) == 4   # 3 shards + index
    for n in names:
        assert (tmp_path / "fg" / n).read_bytes() == (tmp_path / "bg" / n).read_bytes()


def test_background_shard_write_error_is_raised_by_the_writer(tmp_path, monkeypatch):
    """A full disk in the background write: the next roll (or close) raises it as the OSError it is."""
    import errno

    from safetensors import SafetensorError

    import models.common.checkpoint as ckpt_mod
    real = ckpt_mod.save_file

    def full_first(tensors, filename, metadata=None):
        if filename.endswith("shard-00000.tmp"):
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(ckpt_mod, "save_file", full_first)
    w = models.ShardWriter(tmp_path, max_shard_size=100, background=True)
    for i in range(3):                    # the third add rolls shard 0 out (in the background)
        w.add(f"t{i}", torch.full((10,), float(i)))
    with pytest.raises(OSError) as info:
        _roll(w)                          # the next roll waits for shard 0
    assert info.value.errno == errno.ENOSPC and "shard-00000.tmp" in str(info.value)
    w.abandon()
    w2 = models.ShardWriter(tmp_path / "b", max_shard_size=100, background=True)
    for i in range(3):
        w2.add(f"t{i}", torch.full((10,), float(i)))
    with pytest.raises(OSError, match="No space left"):
        w2.close()                        # or close, when no roll comes first
    assert not list((tmp_path / "b").glob("*.safetensors"))


def test_abandon_waits_for_the_shard_in_flight(tmp_path, monkeypatch):
    """After abandon() returns nothing more is written: the caller may remove the directory."""
    import threading

    from pipeline_utils import slow_save_file
    started, done = slow_save_file(monkeypatch, 0.3)
    w = models.ShardWriter(tmp_path, max_shard_size=100, background=True)
    for i in range(3):
        w.add(f"t{i}", torch.full((10,), float(i)))
    assert started.wait(5) and not done   # shard 0 is being written
    w.abandon()
    assert done == [str(tmp_path / "shard-00000.tmp")]
    assert not any(t.name.startswith("shard-write") for t in threading.enumerate())


def test_adapter_layer_walk_on_lazy_model(tmp_path):
    # The calls alphaquant.pipeline makes: embed_fn -> layer(hidden, **layer_kwargs_fn(hidden)) -> head_module.
    from alphaquant.arch import get_adapter

    models.save_pretrained(models.from_config(QWEN, seed=0), tmp_path)
    eager, lazy = models.from_pretrained(tmp_path), models.from_pretrained(tmp_path, lazy=True)
    ad = get_adapter(lazy)
    ids = batch()[0]
    with torch.no_grad():
        hidden = ad.embed_fn(lazy)(ids)
        kwargs = ad.layer_kwargs_fn(lazy)
        for i in range(ad.num_layers(lazy)):
            layer = ad.load_layer(lazy, i)
            hidden = layer(hidden, **kwargs(hidden))
            ad.unload_layer(lazy, i)
        assert all(p.is_meta for p in lazy.model.layers.parameters())
        torch.testing.assert_close(ad.head_module(lazy)(hidden), eager(ids), rtol=0, atol=0)
        ad.unload_layer(eager, 0)  # an eagerly loaded model keeps its weights
    assert not any(p.is_meta for p in eager.parameters())


STREAM_RSS = """
import sys
from alphaquant import models

def rss():  # resident bytes now (Linux)
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024

m = models.from_pretrained(sys.argv[1], lazy=True)
before = rss()
for i in range(m.config.num_hidden_layers):
    models.load_layer(m, i)
    models.unload_layer(m, i)
print(rss() - before)
"""


def test_streaming_layers_does_not_keep_the_checkpoint_resident(tmp_path):
    """safetensors reads through mmap: a shard left open keeps every page read resident, so streaming a
    model larger than host RAM layer by layer would end with all of it mapped. After streaming every
    layer, resident memory must be about what it was, not that plus the checkpoint."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import tiny

    if not os.path.exists("/proc/self/status"):
        pytest.skip("needs /proc (Linux) to read resident memory")
    d = tiny.make_checkpoint("olmoe", tmp_path / "m", hidden_size=256, intermediate_size=512, num_experts=16,
                             num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=4)
    size = sum(p.stat().st_size for p in d.glob("*.safetensors"))
    repo = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", STREAM_RSS, str(d)], capture_output=True, text=True,
                         cwd=repo, env={**os.environ, "PYTHONPATH": str(repo)}, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    growth = int(out.stdout.split()[-1])
    assert growth < 0.25 * size, f"RSS grew {growth / 2**20:.0f} MiB streaming a {size / 2**20:.0f} MiB checkpoint"


def test_skeleton_without_meta_init_is_the_same_model():
    """_build_on_meta skips nn.init on meta tensors (_NoInitOnMeta): the same modules, names, shapes and dtypes
    as building under torch.device('meta') alone, and tensors that are not meta are still initialised."""
    from models import loading
    from models.registry import config_from_dict, model_class_for

    for cfg in (MIXTRAL, QWEN):
        d = dict(cfg)
        fast = loading._build_on_meta(d, torch.bfloat16)
        with torch.device("meta"):
            plain = model_class_for(d.get("model_type"))(config_from_dict(d)).to(torch.bfloat16)
        assert [(k, p.shape, p.dtype, p.is_meta) for k, p in fast.named_parameters()] == \
               [(k, p.shape, p.dtype, p.is_meta) for k, p in plain.named_parameters()]
        assert [type(m) for m in fast.modules()] == [type(m) for m in plain.modules()]
        assert all(p.is_meta for p in fast.parameters())
    with loading._NoInitOnMeta():
        real = torch.nn.init.constant_(torch.empty(3), 2.0)
        lin = torch.nn.Linear(8, 4)
    assert torch.equal(real, torch.full((3,), 2.0)) and lin.weight.abs().sum() > 0


def test_no_init_on_meta_dispatches_no_init_op():
    """The skipped work is real: building a meta Linear under the mode reaches no aten uniform_ at all."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from models import loading

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    for skip in (False, True):
        ops = Ops()
        with torch.device("meta"), ops:
            if skip:
                with loading._NoInitOnMeta():
                    torch.nn.Linear(8, 4)
            else:
                torch.nn.Linear(8, 4)
        assert ("uniform_" in ops.seen) is not skip, ops.seen
