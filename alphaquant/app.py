"""`python train_quant.py --config X.yaml [--dotted.key value ...]`: the whole product.

Order matters for the user: everything that can be checked without weights (config,
recipe against the model's shapes, output directory, data) is checked before any weight
is read, and a user error is one sentence on stderr with exit code 2.
"""
from __future__ import annotations

import argparse
import sys
import time

from alphaquant.errors import UserError

USAGE = "python train_quant.py --config CONFIG.yaml [--dry-run] [--overwrite] [--eval-only DIR] [--section.key VALUE ...]"


def parse_cli(argv):
    p = argparse.ArgumentParser(prog="train_quant.py", usage=USAGE, description=__doc__.splitlines()[0])
    p.add_argument("--config", help="YAML run configuration (configs/*.yaml)")
    p.add_argument("--dry-run", action="store_true", help="print the per-module plan and memory estimate, then exit")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--eval-only", metavar="DIR", help="evaluate a saved quantized checkpoint and exit")
    return p.parse_known_args(argv)


def main(argv=None) -> int:
    args, rest = parse_cli(sys.argv[1:] if argv is None else argv)
    try:
        return run(args, rest)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except (ValueError, FileNotFoundError, OSError) as e:
        # Model-loading errors from models/ (unsupported family, missing config.json, corrupt
        # safetensors) are user errors too; anything else is a bug and keeps its traceback.
        if _is_model_input_error(e):
            print(f"error: {e}", file=sys.stderr)
            return 2
        raise


def _is_model_input_error(e: BaseException) -> bool:
    import models
    return isinstance(e, (models.UnsupportedModelError, models.ModelConfigError, FileNotFoundError))


def run(args, rest) -> int:
    from alphaquant.config import load_config

    cfg = load_config(args.config, rest)
    if args.overwrite:
        cfg.output.overwrite = True
    if args.eval_only:
        from alphaquant.pipeline.evaluate import evaluate_checkpoint
        return evaluate_checkpoint(cfg, args.eval_only)
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

