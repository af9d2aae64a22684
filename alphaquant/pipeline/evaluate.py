"""`python train_quant.py --eval-only DIR [--config X.yaml] [--eval.key value ...]`.

Perplexity of a saved quantized checkpoint, with the same evaluation windows and the same
torchmetrics Perplexity as a calibration run: the checkpoint is read back with
alphaquant.export.load_quantized (weights decoded from the stored codes, not from any
in-memory copy), the recipe's activation quantization (`aq`) is re-installed from
alphaquant_recipe.json, and the result is printed as JSON. The checkpoint directory is only
read, never modified. Without --config, model.path is DIR and the eval section's defaults
apply (override them on the command line, e.g. --eval.dataset data/test.txt).
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from alphaquant.errors import UserError


def _device(cfg) -> torch.device:
    """The accelerator trainer.accelerator asks for (app.check_devices has refused what is not there)."""
    return torch.device("cuda" if cfg.trainer.accelerator != "cpu" and torch.cuda.is_available() else "cpu")


SPEC_FIELDS = ("wq", "group_size", "sym", "aq", "skip")


def read_recipe_specs(directory: Path) -> dict | None:
    """{module: QuantSpec} from the checkpoint's alphaquant_recipe.json (None when it has none); a file
    that is truncated or not the recipe calibration wrote is a UserError naming it."""
    from alphaquant.config.recipe import QuantSpec

    recipe = directory / "alphaquant_recipe.json"
    if not recipe.is_file():
        return None
    bad = f"--eval-only: '{recipe}'"
    try:
        modules = json.loads(recipe.read_text(encoding="utf-8"))["modules"]
        return {n: QuantSpec(**{k: m[k] for k in SPEC_FIELDS}) for n, m in modules.items()}
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        why = f"{e.msg}: line {e.lineno}, column {e.colno}" if isinstance(e, json.JSONDecodeError) else str(e)
        raise UserError(f"{bad} is not valid JSON ({why}): truncated or damaged; copy it again from where the "
                        f"checkpoint was written, or quantize again") from None
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        raise UserError(f"{bad} is not an AlphaQuant recipe (it needs 'modules' mapping each module name to "
                        f"{', '.join(SPEC_FIELDS)}; {type(e).__name__}: {e}); copy it again or quantize again") from None


def _aq_hooks(model, specs: dict | None) -> list:
    """Activation fake-quantization exactly as calibration installed it (from the saved recipe)."""
    from alphaquant.pipeline.activations import activation_hooks

    return activation_hooks(model, "", specs) if specs else []


def check_tensor_names(directory: Path, meta_model) -> None:
    """UserError when the checkpoint holds tensors of modules its config.json does not build
    (e.g. a layer more than num_hidden_layers), or a stored full-precision tensor whose shape is not
    the one config.json gives; headers only. Dequantized weights are checked after the load."""
    from alphaquant.models import CheckpointReader

    modules = dict(meta_model.named_modules())
    params = dict(meta_model.named_parameters(remove_duplicate=False))
    reader = CheckpointReader(directory)
    try:
        for key in reader.keys():
            owner = key.rpartition(".")[0]
            if owner not in modules:
                raise UserError(f"--eval-only '{directory}': the tensor {key!r} belongs to no module of the model "
                                f"its config.json describes; config.json and the weights do not match")
            if key in params and reader.shape(key) != tuple(params[key].shape):
                raise _shape_error(directory, key, reader.shape(key), tuple(params[key].shape))
    finally:
        reader.close()


def check_loaded_shapes(directory: Path, model, meta_model) -> None:
    """UserError when a loaded (dequantized) weight's shape is not the one config.json builds."""
    expected = dict(meta_model.named_parameters(remove_duplicate=False))
    for name, p in model.named_parameters(remove_duplicate=False):
        if name in expected and tuple(p.shape) != tuple(expected[name].shape):
            raise _shape_error(directory, name, tuple(p.shape), tuple(expected[name].shape))


def _shape_error(directory, key, stored, expected) -> UserError:
    return UserError(f"--eval-only '{directory}': the tensor {key!r} has shape {stored} in the checkpoint but "
                     f"its config.json builds {expected}; config.json and the weights do not match, so the "
                     f"perplexity would be wrong")


@torch.no_grad()
def checkpoint_perplexity(model, windows: torch.Tensor, batch_size: int, device: torch.device,
                          progress=None) -> float:
    """exp(mean next-token cross-entropy) over [N, T] windows, through torchmetrics; a UserError naming
    where the model goes non-finite (a decoder layer or the head) instead of a NaN/Inf perplexity."""
    from torchmetrics.text import Perplexity

    metric = Perplexity().to(device)
    for i in range(0, windows.shape[0], batch_size):
        x = windows[i:i + batch_size].to(device)
        logits = model(x)
        if not bool(torch.isfinite(torch.linalg.vector_norm(logits.float(), float("inf")))):
            raise UserError(f"the checkpoint's logits hold NaN or Inf for evaluation windows {i}..{i + len(x) - 1}: "
                            f"{non_finite_origin(model, x)}; its perplexity is undefined")
        metric.update(logits[:, :-1].float(), x[:, 1:])
        if progress is not None:
            progress(i + len(x))
    ppl = float(metric.compute())
    if not math.isfinite(ppl):
        raise UserError(f"the checkpoint's perplexity overflows ({ppl}): its mean next-token loss is too large "
                        f"for exp(); the model is broken (finite but huge logits), not the data")
    return ppl


@torch.no_grad()
def non_finite_origin(model, x: torch.Tensor) -> str:
    """Where a forward of `x` first goes non-finite: "the output of model.layers.N" or "the head"."""
    first: list[int] = []

    def hook(i):
        def check(_module, _args, out):
            h = out[0] if isinstance(out, tuple) else out
            if not first and not bool(torch.isfinite(h).all()):
                first.append(i)
        return check

    layers = list(getattr(getattr(model, "model", None), "layers", None) or [])
    if not layers:
        return "the model has no model.layers to narrow it down"
    handles = [layer.register_forward_hook(hook(i)) for i, layer in enumerate(layers)]
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    if first:
        return (f"the hidden states turn non-finite in model.layers.{first[0]} (the output of that decoder "
                f"layer; its weights overflow in {str(next(model.parameters()).dtype).removeprefix('torch.')})")
    return "the decoder layers' outputs are finite, so the head (model.norm + lm_head) produces them"


def evaluate_checkpoint(cfg, directory) -> int:
    from alphaquant.data import check_tokenizer_dir, check_vocab, eval_windows, load_tokens
    from alphaquant.export import load_quantized
    from alphaquant.pipeline.session import _load_tokenizer
    from alphaquant.models import UnsupportedModelError
    from alphaquant.models.loading import skeleton

    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise UserError(f"--eval-only {str(directory)!r} is not a checkpoint directory (no config.json)")
    ev = cfg.eval
    device = _device(cfg)
    t0 = time.perf_counter()
    # everything that needs no weights first: recipe, config.json against the tensor headers, tokenizer, data
    specs = read_recipe_specs(directory)
    unreadable = f"--eval-only {str(directory)!r} could not be read as a quantized checkpoint"
    try:
        meta = skeleton(directory, cfg.model.dtype)
        check_tensor_names(directory, meta)
    except UnsupportedModelError:    # not a local family: load_quantized decides whether it can read it
        meta = None
    except ValueError as e:          # ModelConfigError, CheckpointError
        raise UserError(f"{unreadable}: {e}") from None
    tokenizer_dir = cfg.model.tokenizer or str(directory)
    check_tokenizer_dir(tokenizer_dir, "model.tokenizer" if cfg.model.tokenizer else
                        "model.tokenizer (default: the --eval-only directory)")
    tokenizer = _load_tokenizer(tokenizer_dir)
    tokens = load_tokens(ev.dataset, ev.split, tokenizer, text_field=ev.text_field, token_dtype=ev.token_dtype,
                         vocab_size=meta.config.vocab_size if meta is not None else None, key="eval.dataset")
    windows = eval_windows(tokens, ev.seq_len, ev.max_windows,
                           source=f"eval.dataset '{ev.dataset}' (split {ev.split!r})")
    try:
        model = load_quantized(directory, dtype=cfg.model.dtype)
    except (KeyError, ValueError) as e:
        raise UserError(f"{unreadable}: {e}") from None
    if meta is not None:
        check_loaded_shapes(directory, model, meta)
    else:
        check_vocab(tokens, model.config.vocab_size, f"eval.dataset '{ev.dataset}' (split {ev.split!r})")
    model.to(device)
    hooks = _aq_hooks(model, specs)
    from alphaquant.pipeline.progress import WindowProgress
    with WindowProgress(int(windows.shape[0])) as bar:     # lines on stderr when it is not a terminal
        ppl = checkpoint_perplexity(model, windows, ev.batch_size, device, progress=bar.update)
    for h in hooks:
        h.remove()
    result = {"checkpoint": str(directory), "perplexity": ppl, "windows": int(windows.shape[0]),
              "seq_len": int(windows.shape[1]), "dataset": ev.dataset, "split": ev.split,
              "seconds": time.perf_counter() - t0}
    print(json.dumps(result, indent=2))
    return 0
