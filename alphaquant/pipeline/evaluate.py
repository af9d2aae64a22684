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
import time
from pathlib import Path

import torch

from alphaquant.errors import UserError


def _device(cfg) -> torch.device:
    """The accelerator trainer.accelerator asks for (app.check_devices has refused what is not there)."""
    return torch.device("cuda" if cfg.trainer.accelerator != "cpu" and torch.cuda.is_available() else "cpu")


def _aq_hooks(model, directory: Path) -> list:
    """Activation fake-quantization exactly as calibration installed it (from the saved recipe)."""
    from alphaquant.pipeline.activations import activation_hooks
    from alphaquant.recipe import QuantSpec

    recipe = directory / "alphaquant_recipe.json"
    if not recipe.is_file():
        return []
    modules = json.loads(recipe.read_text())["modules"]
    specs = {n: QuantSpec(wq=m["wq"], group_size=m["group_size"], sym=m["sym"], aq=m["aq"], skip=m["skip"])
             for n, m in modules.items()}
    return activation_hooks(model, "", specs)


@torch.no_grad()
def checkpoint_perplexity(model, windows: torch.Tensor, batch_size: int, device: torch.device) -> float:
    """exp(mean next-token cross-entropy) over [N, T] windows, through torchmetrics."""
    from torchmetrics.text import Perplexity

    metric = Perplexity().to(device)
    for i in range(0, windows.shape[0], batch_size):
        x = windows[i:i + batch_size].to(device)
        logits = model(x)
        metric.update(logits[:, :-1].float(), x[:, 1:])
    return float(metric.compute())


def evaluate_checkpoint(cfg, directory) -> int:
    from alphaquant.data import eval_windows, load_tokens
    from alphaquant.export import load_quantized
    from alphaquant.pipeline.session import _load_tokenizer

    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise UserError(f"--eval-only {str(directory)!r} is not a checkpoint directory (no config.json)")
    ev = cfg.eval
    device = _device(cfg)
    t0 = time.perf_counter()
    try:
        model = load_quantized(directory, dtype=cfg.model.dtype)
    except (KeyError, ValueError) as e:
        raise UserError(f"--eval-only {str(directory)!r} could not be read as a quantized checkpoint: {e}") from None
    model.to(device)
    hooks = _aq_hooks(model, directory)
    tokenizer = _load_tokenizer(cfg.model.tokenizer or str(directory))
    tokens = load_tokens(ev.dataset, ev.split, tokenizer, text_field=ev.text_field, token_dtype=ev.token_dtype,
                         vocab_size=model.config.vocab_size, key="eval.dataset")
    windows = eval_windows(tokens, ev.seq_len, ev.max_windows,
                           source=f"eval.dataset '{ev.dataset}' (split {ev.split!r})")
    ppl = checkpoint_perplexity(model, windows, ev.batch_size, device)
    for h in hooks:
        h.remove()
    result = {"checkpoint": str(directory), "perplexity": ppl, "windows": int(windows.shape[0]),
              "seq_len": int(windows.shape[1]), "dataset": ev.dataset, "split": ev.split,
              "seconds": time.perf_counter() - t0}
    print(json.dumps(result, indent=2))
    return 0
