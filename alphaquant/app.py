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

from alphaquant.api.checks import check_devices, check_recipe, preflight  # noqa: F401 (shared with the Python API)
from alphaquant.errors import UserError

USAGE = ("python train_quant.py --config CONFIG.yaml [--recipe FILE] [--dry-run] [--print-config] [--overwrite]\n"
         "       [--eval-only DIR] [--section.key VALUE ...]   (installed: alphaquant ...)")

DESCRIPTION = ("Quantize a Mixture-of-Experts LLM with GPTQ: a YAML config plus --section.key overrides, the same\n"
               "run as alphaquant.quantize(...) in Python. Bad input is one line on stderr and exit code 2.")

# errno of a failed write -> what the user is told
WRITE_ERRORS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
                errno.EROFS: "the file system is read-only", errno.EACCES: "permission is denied",
                errno.EPERM: "permission is denied"}


def parse_cli(argv):
    """(the CLI's own flags, the rest: --section.key VALUE config overrides)."""
    from alphaquant.config.cli_help import render_keys

    p = argparse.ArgumentParser(prog="train_quant.py", usage=USAGE, description=DESCRIPTION,
                                epilog=render_keys(), formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)      # --eval is a config section, not --eval-only
    p.add_argument("--config", help="YAML run configuration (configs/*.yaml)")
    p.add_argument("--recipe", metavar="FILE", help="a recipe file (.json/.yaml: the quant section, e.g. "
                   "configs/gptq_olmoe_mixed.json) that replaces the config's quant section")
    p.add_argument("--dry-run", action="store_true", help="print the per-module plan (format, shape, size of every "
                   "linear, the rule that chose it) and the estimated peak GPU and host memory for "
                   "calibration.batch_size, without reading a weight (a hub id: its json files and safetensors "
                   "headers only), then exit")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as YAML, then exit")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--eval-only", metavar="DIR", help="evaluate a saved quantized checkpoint and exit "
                   "(--config is optional: without it model.path is DIR)")
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
    from alphaquant import models
    return isinstance(e, (models.UnsupportedModelError, models.ModelConfigError, models.CheckpointError,
                          FileNotFoundError))


def run(args, rest, state: dict | None = None) -> int:
    """The CLI over `alphaquant.api.run_config`, the function `alphaquant.quantize` calls too."""
    from alphaquant.config.cli_help import check_flags
    from alphaquant.config.run import load_config

    state = {} if state is None else state
    check_flags(rest)                     # a typo in a flag: the closest known one, before any file is read
    if args.recipe is not None:           # first, so --quant.* flags refine the recipe
        rest = ["--quant", args.recipe, *rest]
    if args.eval_only and args.config is None:
        rest = ["--model.path", args.eval_only, *rest]    # the checkpoint's own config.json and tokenizer
    cfg = load_config(args.config, rest)
    if args.overwrite:
        cfg.output.overwrite = True
    if args.print_config:
        import yaml
        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
        return 0
    if cfg.output.save:
        state["out_dir"] = cfg.output.dir
        state["resume"] = cfg.output.resume and not args.eval_only
    if args.eval_only:
        from alphaquant.pipeline.evaluate import evaluate_checkpoint
        check_devices(cfg.trainer)
        return evaluate_checkpoint(cfg, args.eval_only)
    from alphaquant.api import run_config
    run_config(cfg, dry_run=args.dry_run)
    return 0


def console_main() -> int:
    """`alphaquant` / `python train_quant.py`: main() with stdout closed early (`| head`) ending quietly."""
    try:
        try:
            code = main()
        except SystemExit as e:            # argparse: --help, a usage error
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
        sys.stdout.flush()
    except BrokenPipeError:
        # the reader is gone: point stdout at /dev/null so the interpreter's final flush cannot fail again
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 128 + 13          # as a shell reports a process ended by SIGPIPE
    return code

