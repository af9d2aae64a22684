"""Checks that need no weights, run before any weight is read (the CLI and `alphaquant.quantize` alike).

    check_recipe(cfg)     # the recipe against the model's shapes, from config.json alone
    preflight(cfg)        # data files, tokenizer, devices, memory of the calibration windows
"""
from __future__ import annotations

import os

from alphaquant.errors import ConfigError


def check_recipe(cfg) -> None:
    """Resolve the recipe on the meta skeleton of a local model (config.json only, no weights), so a
    group size that does not divide or a pattern that matches nothing fails before a model load.
    A hub id is checked by the session once its files are fetched."""
    model_dir = cfg.model.local_dir
    if model_dir is None:
        return
    from alphaquant.arch import load_model
    from alphaquant.config.recipe import resolve_recipe

    model, adapter = load_model(cfg.model, skeleton_only=True)
    resolve_recipe(cfg.quant, adapter.linear_modules(model))


def preflight(cfg) -> None:
    """Checks that need no weights, so a typo costs seconds, not a model load.

    A local model directory's config.json gives the vocabulary size and the maximum sequence
    length the data is checked against; a hub id is checked when the session fetches it.
    """
    from alphaquant.data import check_calibration_memory, check_sources, check_tokenizer_dir, needs_tokenizer
    from alphaquant.pipeline.trainer import check_wandb_online

    vocab_size = max_pos = None
    model_dir = cfg.model.local_dir
    if model_dir is not None:
        from alphaquant.arch import model_limits
        vocab_size, max_pos = model_limits(cfg.model)
    check_sources(cfg, vocab_size=vocab_size, max_pos=max_pos)
    if needs_tokenizer(cfg):
        check_tokenizer_dir(cfg.model.tokenizer or cfg.model.path,
                            "model.tokenizer" if cfg.model.tokenizer else "model.tokenizer (default: model.path)")
    check_devices(cfg.trainer)
    hidden = _hidden_size(model_dir) if model_dir is not None else None
    if hidden is not None:                # the windows' activations against host RAM / GPU memory
        import torch
        gpus = torch.cuda.device_count() if cfg.trainer.accelerator != "cpu" and torch.cuda.is_available() else 0
        gpus = min(gpus, cfg.trainer.devices) if isinstance(cfg.trainer.devices, int) and gpus else gpus
        # free memory of GPU 0 (a CUDA context in this process: not before a ddp_fork, which forbids one)
        free = torch.cuda.mem_get_info(0)[0] if gpus and cfg.trainer.strategy != "ddp_fork" else None
        check_calibration_memory(cfg, hidden, gpus=gpus, gpu_free=free)
    check_wandb_online(cfg.logging.wandb)  # credentials + a 3 s probe, not wandb.init's retries after the load


def _hidden_size(model_dir) -> int | None:
    """config.json's hidden_size (a multimodal config nests it in text_config); None when absent."""
    from alphaquant.models.loading import read_config_dict

    d = read_config_dict(model_dir)
    h = d.get("hidden_size", (d.get("text_config") or {}).get("hidden_size"))
    return h if isinstance(h, int) and not isinstance(h, bool) and h > 0 else None


def check_devices(t) -> None:
    """ConfigError when trainer.accelerator/devices ask for more than this machine has."""
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    acc = t.accelerator if t.accelerator != "auto" else ("gpu" if gpus else "cpu")
    if acc in ("gpu", "cuda"):
        if gpus == 0:
            raise ConfigError(f"trainer.accelerator is {t.accelerator!r} but torch sees no CUDA GPU on this "
                              f"machine; set trainer.accelerator to cpu or auto")
        if isinstance(t.devices, int) and t.devices > gpus:
            raise ConfigError(f"trainer.devices is {t.devices} but this machine has {gpus} CUDA GPU(s); "
                              f"set trainer.devices to at most {gpus} or auto")
    elif isinstance(t.devices, int):
        cpus = os.cpu_count() or 1
        if t.devices > cpus:
            raise ConfigError(f"trainer.devices is {t.devices} but this machine has {cpus} CPU cores (on CPU each "
                              f"device is a process); set trainer.devices to at most {cpus}, 1 is usual")
