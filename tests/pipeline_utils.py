"""Helpers for tests that run the calibration pipeline on tiny checkpoints."""
from __future__ import annotations

from pathlib import Path

import yaml


def write_config(path: Path, model_dir: Path, corpus: Path, **sections) -> Path:
    """A small run config: few short windows, CPU, no W&B, no checkpoint unless asked."""
    cfg = {
        "model": {"path": str(model_dir), "dtype": "float32", "lazy": False},
        "calibration": {"dataset": str(corpus), "split": "train", "num_samples": 8, "seq_len": 64,
                        "batch_size": 2, "min_tokens_warn": 16},
        "eval": {"dataset": str(corpus), "split": "test", "seq_len": 64, "max_windows": 6},
        "quant": {"default": {"wq": "int4", "group_size": 32},
                  "overrides": [{"pattern": "*.experts.*", "wq": "mxfp4/32"},
                                {"pattern": "*.gate", "skip": True}, {"pattern": "lm_head", "skip": True}]},
        "trainer": {"accelerator": "cpu", "devices": 1},
        "logging": {"wandb": {"mode": "disabled"}, "csv": {"dir": str(path.parent / "logs")}},
        "output": {"save": False, "dir": str(path.parent / "out")},
    }
    for section, values in sections.items():
        if isinstance(values, dict) and isinstance(cfg.get(section), dict):
            cfg[section] = {**cfg[section], **values}
        else:
            cfg[section] = values
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def run_session(config_path: Path, overrides=()):
    """Run a calibration in-process; returns the session (model, specs, results)."""
    from alphaquant.config.run import load_config
    from alphaquant.pipeline.session import CalibrationSession

    session = CalibrationSession(load_config(config_path, list(overrides)))
    session.prepare()
    session.run()
    return session


def assert_reads_back_exactly(model, loaded, vocab: int = 320) -> None:
    """`loaded` (a checkpoint read back) holds exactly `model`'s parameters and gives its logits bit for bit."""
    import torch
    ours, back = dict(model.named_parameters()), dict(loaded.named_parameters())
    assert set(ours) == set(back)
    for k in ours:
        assert torch.equal(ours[k], back[k]), k
    ids = torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(model(ids), loaded(ids))


def slow_save_file(monkeypatch, seconds: float):
    """Checkpoint shards (models/common/checkpoint.py's save_file) written `seconds` late: (an Event set when a write
    starts, the list of paths whose write finished)."""
    import threading
    import time

    import models.common.checkpoint as ckpt_mod
    real, started, done = ckpt_mod.save_file, threading.Event(), []

    def slow(tensors, filename, metadata=None):
        started.set()
        time.sleep(seconds)
        real(tensors, filename, metadata=metadata)
        done.append(filename)

    monkeypatch.setattr(ckpt_mod, "save_file", slow)
    return started, done
