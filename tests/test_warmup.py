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


def test_the_triton_key_thread_is_joined_before_the_first_triton_kernel(tmp_path, monkeypatch):
    """_warm waits for the thread computing Triton's installation key before its first Triton kernel (the two would
    otherwise both compute it), runs the solve's Triton-free linear algebra before that wait, and
    _triton_cache_key never raises (CI's CPU torch has no Triton)."""
    import threading
    import time

    from alphaquant.gptq import solver
    from alphaquant.models.common import kernels
    cfg = load_config(_cfg(tmp_path), [])
    done, seen, prepared = threading.Event(), [], []
    key = threading.Thread(target=lambda: (time.sleep(2.0), done.set()))
    real, real_prepare = kernels.rms_norm, solver._prepare_hessian
    monkeypatch.setattr(kernels, "rms_norm", lambda *a, **k: (seen.append(done.is_set()), real(*a, **k))[1])
    monkeypatch.setattr(solver, "_prepare_hessian",
                        lambda *a, **k: (prepared.append(done.is_set()), real_prepare(*a, **k))[1])
    key.start()
    warmup._warm(torch.device("cpu"), warmup._default_format(cfg), cfg, key)
    assert seen == [True]
    assert prepared == [False, True]         # before the key (its own step), then inside the Triton solve
    warmup._triton_cache_key()


def test_the_switch_interval_is_short_until_the_warmup_is_joined():
    import sys
    before = sys.getswitchinterval()
    try:
        sys.setswitchinterval(0.004)
        warmup._switch_often()
        warmup._switch_often()                       # once: the saved interval stays the user's
        assert sys.getswitchinterval() == pytest.approx(warmup.SWITCH_INTERVAL_S)
        warmup.join_warmup(None)
        assert sys.getswitchinterval() == pytest.approx(0.004)
        warmup.join_warmup(None)                     # nothing to restore twice
        assert sys.getswitchinterval() == pytest.approx(0.004)
        sys.setswitchinterval(0.0001)                # a shorter interval of the user's own is kept
        warmup._switch_often()
        assert sys.getswitchinterval() == pytest.approx(0.0001, rel=0.05)
        warmup.join_warmup(None)
    finally:
        sys.setswitchinterval(before)


def test_the_kernels_are_warmed_at_the_models_widths(tmp_path):
    cfg = load_config(_cfg(tmp_path), [])
    assert warmup._widths(cfg) == (tiny.BASE["hidden_size"], tiny.FAMILIES["olmoe"]["num_experts_per_tok"])
    cfg.model.path = str(tmp_path / "nowhere")
    assert warmup._widths(cfg) == (256, 2)


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
