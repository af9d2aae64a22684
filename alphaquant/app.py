"""`python train_quant.py --config X.yaml [--dotted.key value ...]`: the whole product.

Order matters for the user: everything that can be checked without weights (config,
the model's config.json, data files, tokenizer, devices, recipe against the model's shapes,
output directory) is checked before any weight is read (`--dry-run` checks what the plan
needs: config, model files, recipe, output directory), and a user error is one sentence on
stderr with exit code 2. A write that fails for lack of space or permission is a user error
too: the atomic output directory has already been removed when its message is printed.
"""
from __future__ import annotations

import argparse
import errno
import os
import sys
import time

from alphaquant.errors import ConfigError, UserError

USAGE = "python train_quant.py --config CONFIG.yaml [--dry-run] [--overwrite] [--eval-only DIR] [--section.key VALUE ...]"

# errno of a failed write -> what the user is told
WRITE_ERRORS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
                errno.EROFS: "the file system is read-only", errno.EACCES: "permission is denied",
                errno.EPERM: "permission is denied"}


def parse_cli(argv):
    p = argparse.ArgumentParser(prog="train_quant.py", usage=USAGE, description=__doc__.splitlines()[0])
    p.add_argument("--config", help="YAML run configuration (configs/*.yaml)")
    p.add_argument("--dry-run", action="store_true", help="print the per-module plan and memory estimate, then exit")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--eval-only", metavar="DIR", help="evaluate a saved quantized checkpoint and exit")
    return p.parse_known_args(argv)


def main(argv=None) -> int:
    args, rest = parse_cli(sys.argv[1:] if argv is None else argv)
    state: dict = {}
    from alphaquant.pipeline.signals import RunInterrupted, stop_on_signals
    try:
        with stop_on_signals():
            return run(args, rest, state)
    except RunInterrupted as e:
        print(f"{e}: {_interrupted_state(state)}", file=sys.stderr)
        return e.exit_code
    except UserError as e:
        return _fail(str(e), e.exit_code)
    except OSError as e:
        if e.errno in WRITE_ERRORS:
            return _fail(_write_error(e, state.get("out_dir")))
        if _is_model_input_error(e):
            return _fail(str(e))
        raise
    except ValueError as e:
        # Model-loading errors from models/ (unsupported family, bad config.json, corrupt or
        # incomplete safetensors) are user errors too; anything else is a bug and keeps its traceback.
        if _is_model_input_error(e):
            return _fail(str(e))
        raise


def _interrupted_state(state: dict) -> str:
    """What an interrupted run leaves, in words: the resume state and how to use it, or nothing."""
    out = state.get("out_dir")
    if out is None or not state.get("resume"):
        return "nothing was saved"
    from alphaquant.pipeline.resume import saved_layers
    from pathlib import Path
    n, where = saved_layers(Path(out))
    if not n:
        return f"no layer was finished, nothing was saved to output.dir '{out}'"
    return (f"layers 0-{n - 1} are kept in {where}; no partial checkpoint was left in output.dir '{out}'; "
            f"run the same command again to resume from layer {n}")


def _fail(message: str, code: int = 2) -> int:
    print(f"error: {' '.join(message.split())}", file=sys.stderr)     # one line, whatever the message held
    return code


def _write_error(e: OSError, out_dir) -> str:
    what = WRITE_ERRORS[e.errno]
    path = f" at '{e.filename}'" if e.filename else (f" under '{out_dir}'" if out_dir else "")
    saved = f"nothing was saved to output.dir '{out_dir}'" if out_dir else "nothing was saved"
    fix = "free some space or set output.dir to another disk" if e.errno in (errno.ENOSPC, errno.EDQUOT) \
        else "set output.dir (and logging dirs) to a place you can write"
    return f"{what}{path} ({e.strerror}), so {saved}; {fix}"


def _is_model_input_error(e: BaseException) -> bool:
    import models
    return isinstance(e, (models.UnsupportedModelError, models.ModelConfigError, models.CheckpointError,
                          FileNotFoundError))


def run(args, rest, state: dict | None = None) -> int:
    from alphaquant.config import load_config

    state = {} if state is None else state
    cfg = load_config(args.config, rest)
    if args.overwrite:
        cfg.output.overwrite = True
    if cfg.output.save:
        state["out_dir"] = cfg.output.dir
        state["resume"] = cfg.output.resume and not args.eval_only
    if args.eval_only:
        from alphaquant.pipeline.evaluate import evaluate_checkpoint
        check_devices(cfg.trainer)
        return evaluate_checkpoint(cfg, args.eval_only)
    check_recipe(cfg)                     # the recipe against the model's shapes, from config.json alone
    if not args.dry_run:                  # a plan needs no data, and may be made on a laptop for a GPU machine
        preflight(cfg)                    # data files, tokenizer, devices: no weights read
    from alphaquant.pipeline.session import CalibrationSession

    session = CalibrationSession(cfg)
    session.prepare()                     # model skeleton, recipe, output dir: no weights read yet
    if args.dry_run:
        session.print_plan()
        return 0
    t0 = time.perf_counter()
    session.run()
    session.finish(time.perf_counter() - t0)
    return 0


def check_recipe(cfg) -> None:
    """Resolve the recipe on the meta skeleton of a local model (config.json only, no weights), so a
    group size that does not divide or a pattern that matches nothing fails before a model load.
    A hub id is checked by the session once its files are fetched."""
    model_dir = cfg.model.local_dir
    if model_dir is None:
        return
    from alphaquant.arch import load_model
    from alphaquant.recipe import resolve_recipe

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
    from models.loading import read_config_dict

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
