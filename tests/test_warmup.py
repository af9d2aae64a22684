"""The GPU warm-up (alphaquant/pipeline/warmup.py): it draws no random numbers, needs nothing of the model, and
changes no result (GPU: a run with it gives the same quantized weights as one without)."""
import pytest
import torch

import tiny
from pipeline_utils import run_session, write_config
from alphaquant.config.run import load_config
from alphaquant.pipeline import warmup


def _cfg(tmp_path, **sections):
    ckpt = tiny.make_checkpoint("olmoe", tmp_path / "olmoe")
    return write_config(tmp_path / "run.yaml", ckpt, tiny.write_corpus(tmp_path), **sections)


def test_warmup_draws_no_random_numbers_and_solves_the_default_format(tmp_path):
    cfg = load_config(_cfg(tmp_path), [])
    fmt = warmup._default_format(cfg)
    assert fmt is not None and fmt.name == "int4"      # quant.default; the overrides name modules not known yet
    before = torch.get_rng_state()
    warmup._warm(torch.device("cpu"), fmt, cfg)        # the same operations as on the GPU, on the CPU
    assert torch.equal(torch.get_rng_state(), before)


def test_the_kernels_are_warmed_at_the_models_widths(tmp_path):
    cfg = load_config(_cfg(tmp_path), [])
    assert warmup._widths(cfg) == (tiny.BASE["hidden_size"], tiny.FAMILIES["olmoe"]["num_experts_per_tok"])
    assert warmup._solve_widths(cfg) == (tiny.BASE["hidden_size"], tiny.FAMILIES["olmoe"]["intermediate_size"])
    cfg.model.path = str(tmp_path / "nowhere")
    assert warmup._widths(cfg) == (256, 2) and warmup._solve_widths(cfg) == ()


def test_no_warmup_on_the_cpu_or_for_a_kept_default(tmp_path):
    cfg = load_config(_cfg(tmp_path), [])
    assert warmup.start_warmup(cfg) is None             # trainer.accelerator: cpu
    cfg.quant.default.skip = True
    assert warmup._default_format(cfg) is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_run_with_the_warmup_gives_the_same_weights_as_one_without(tmp_path, monkeypatch):
    path = _cfg(tmp_path, trainer={"accelerator": "gpu", "devices": 1},
                model={"path": str(tmp_path / "olmoe"), "dtype": "bfloat16", "lazy": False})
    started = []
    real = warmup.start_warmup
    monkeypatch.setattr(warmup, "start_warmup", lambda cfg: started.append(real(cfg)) or started[-1])
    warm = run_session(path)
    assert started and started[0] is not None
    monkeypatch.setattr(warmup, "start_warmup", lambda cfg: None)
    cold = run_session(path)
    a, b = dict(warm.model.named_parameters()), dict(cold.model.named_parameters())
    for k in a:
        assert torch.equal(a[k].cpu(), b[k].cpu()), k


@pytest.mark.parametrize("family", ["olmoe", "qwen2_moe", "mixtral", "deepseek_moe"])
def test_a_layer_of_the_runs_own_family_is_run_with_fewer_experts(tmp_path, monkeypatch, family):
    """_warm_layer: one forward of the family's decoder layer 0 at the model's widths, 2 x top_k experts at most,
    no random numbers drawn."""
    from alphaquant.models.common.decoder import DecoderLayer
    ckpt = tiny.make_checkpoint(family, tmp_path / family)
    cfg = load_config(write_config(tmp_path / "run.yaml", ckpt, tiny.write_corpus(tmp_path)), [])
    seen = []
    real = DecoderLayer.forward
    monkeypatch.setattr(DecoderLayer, "forward", lambda self, h, *a, **k: seen.append((self, h.shape)) or
                        real(self, h, *a, **k))
    before = torch.get_rng_state()
    warmup._warm_layer(torch.device("cpu"), torch.float32, cfg, tokens=16)
    assert torch.equal(torch.get_rng_state(), before)
    (layer, shape), = seen
    assert shape == (1, 16, tiny.BASE["hidden_size"]) and layer.layer_idx == 0
    k = tiny.FAMILIES[family]["num_experts_per_tok"]
    moe = getattr(layer, layer.mlp_attr)
    if hasattr(moe, "experts"):
        assert len(moe.experts) == min(tiny.FAMILIES[family].get("num_experts", tiny.FAMILIES[family].get(
            "num_local_experts", tiny.FAMILIES[family].get("n_routed_experts"))), max(2 * k, 2))


def test_another_models_layer_is_not_warmed(tmp_path):
    import json
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({"model_type": "qwen3_moe", "hidden_size": 64}))
    cfg = load_config(_cfg(tmp_path), [])
    cfg.model.path = str(tmp_path / "m")
    with pytest.raises(Exception):                      # _warm skips it (caught there)
        warmup._warm_layer(torch.device("cpu"), torch.float32, cfg)
