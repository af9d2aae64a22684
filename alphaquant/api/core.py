"""`alphaquant.quantize`: the one public verb; `python train_quant.py` calls the same `run_config`.

    import alphaquant

    result = alphaquant.quantize(
        model="demo/olmoe-tiny",
        recipe={"default": {"wq": "int4", "group_size": 128},
                "overrides": [{"pattern": "*.mlp.experts.*", "wq": "mxfp4", "group_size": 32},
                              {"pattern": "*.mlp.gate", "skip": True}]},
        calibration={"dataset": "demo/corpus/train.txt", "num_samples": 16, "seq_len": 256},
        eval={"dataset": "demo/corpus/test.txt", "seq_len": 256, "max_windows": 8},
        output={"dir": "outputs/olmoe-tiny-w4"},
        logging={"wandb": {"mode": "disabled"}},
    )
    result.perplexity            # {"original": 57.7, "quantized": 58.2}
    result.output_dir            # Path("outputs/olmoe-tiny-w4"): a compressed-tensors checkpoint
    result.modules["model.layers.0.mlp.experts.0.up_proj"]   # format, tokens, rel_error, loss, fallback
    model = result.model         # the quantized model, read back from output_dir (load_quantized)

Keyword names are the YAML sections; each takes what that section holds (see alphaquant/api/inputs.py
for the objects the YAML cannot hold: loaded models, token tensors, texts). Bad input raises the
UserError / ConfigError the CLI prints as one line; model-loading errors are models.* errors
(ValueError subclasses), as from models.from_pretrained.
"""
from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alphaquant.api.inputs import SECTIONS, config_data, data_section, merge, model_data, plain, recipe_data


@dataclass
class QuantizeResult:
    """What one `quantize` call produced (for a dry run: the plan only).

    output_dir: the checkpoint directory (None when output.save is false or for a dry run).
    perplexity: {"original", "rtn", "quantized", "gptq_<mode>"} as far as the config asked for them.
    modules: per module: {"format", "tokens", "rel_error", "loss", "fallback"}; records: the solver's
    ModuleRecord per module (spec, tokens per expert, errors); specs: the resolved recipe (QuantSpec
    per linear, the kept ones included); layers / experts: the summary tables; summary: all of it as
    written to alphaquant_summary.json.
    """

    config: Any = field(repr=False)                  # the resolved alphaquant.config.Config
    specs: dict = field(repr=False)
    output_dir: Path | None = None
    perplexity: dict = field(default_factory=dict)
    modules: dict = field(default_factory=dict, repr=False)
    records: dict = field(default_factory=dict, repr=False)
    layers: list = field(default_factory=list, repr=False)
    experts: list = field(default_factory=list, repr=False)
    seconds: float = 0.0
    summary: dict = field(default_factory=dict, repr=False)
    dry_run: bool = False
    _model: Any = field(default=None, repr=False)

    @property
    def model(self):
        """The quantized model: read back from output_dir on first use (our families: weights decoded from
        the stored codes by alphaquant.export.load_quantized); without a checkpoint, the model the run
        quantized in memory when it kept its layers (model.lazy: false), else an error saying why not."""
        if self._model is None:
            self._model = self.load_model()
        return self._model

    def load_model(self, dtype=None, device=None):
        from alphaquant.errors import UserError
        if self.dry_run:
            raise UserError("a dry run quantizes nothing: there is no quantized model to load")
        if self.output_dir is not None:
            if self.config.output.format == "dequantized":
                from alphaquant import models
                return models.from_pretrained(self.output_dir, dtype=dtype, device=device)
            from alphaquant.export import load_quantized
            return load_quantized(self.output_dir, dtype=dtype, device=device)
        if self._model is not None:
            return self._model
        raise UserError("the run wrote no checkpoint (output.save: false) and streamed its layers (model.lazy: "
                        "true), so no quantized model was kept; set output.save: true or model.lazy: false")


def quantize(model=None, recipe=None, calibration=None, *, eval=None, gptq=None, trainer=None, logging=None,
             output=None, name: str | None = None, seed: int | None = None, config=None, tokenizer=None,
             dry_run: bool = False) -> QuantizeResult:
    """Quantize `model` with `recipe`, calibrated on `calibration`; returns a QuantizeResult.

    model: hub id or directory, the `model` section as a mapping, or a loaded model (ours or a
    transformers PreTrainedModel; saved to a temporary directory for the run, with `tokenizer` or
    the tokenizer of the directory it came from). recipe: the `quant` section (mapping, QuantConfig,
    or a .json/.yaml recipe file such as configs/gptq_olmoe_mixed.json), or a whole Config.
    calibration / eval: the section as a mapping, a dataset name or file, integer token ids (a tensor;
    split 'all'), a list of texts or a datasets.Dataset; eval=False turns evaluation off.
    gptq, trainer, logging, output: the sections as mappings or their dataclasses; name, seed: top-level keys.
    config: a run config (YAML path, mapping or Config) the other arguments override, key by key.
    dry_run: resolve and print the per-module plan without reading a weight.

        r = quantize(model="demo/olmoe-tiny", recipe="configs/gptq_olmoe_mixed.json",
                     calibration={"dataset": "demo/corpus/train.txt", "num_samples": 16, "seq_len": 256},
                     eval=False, output={"dir": "outputs/tiny-mixed"})
        r.output_dir, r.modules["model.layers.0.self_attn.q_proj"]["rel_error"]
    """
    from alphaquant.config.run import Config

    with tempfile.TemporaryDirectory(prefix="alphaquant-inputs-") as tmp:
        sections = {"eval": eval, "gptq": gptq, "trainer": trainer, "logging": logging, "output": output}
        if isinstance(config, Config) and all(v is None for v in (model, recipe, calibration, name, seed,
                                                                   tokenizer, *sections.values())):
            cfg = config                 # the CLI's path: a config load_config has already checked
        else:
            cfg = _build_config(model, recipe, calibration, sections, name, seed, config, tokenizer, Path(tmp))
        return run_config(cfg, dry_run=dry_run)


def _build_config(model, recipe, calibration, sections, name, seed, config, tokenizer, tmp: Path):
    from alphaquant.config.run import Config
    from alphaquant.config.schema import build

    quant, whole = recipe_data(recipe)
    if whole is not None and config is not None:
        from alphaquant.errors import ConfigError
        raise ConfigError("alphaquant.quantize got a whole run config twice (recipe= and config=); give one")
    data, label = config_data(whole if whole is not None else config)
    given: dict[str, Any] = {}
    import torch.nn as nn
    loaded = model if isinstance(model, nn.Module) else None
    m = model_data(model, tokenizer, tmp)
    if m is not None:
        suggested = m.pop("_name", None)      # a loaded model's own name, not its temporary directory's
        if suggested and name is None and not data.get("name"):
            name = suggested
        given["model"] = m
    if quant is not None:
        given["quant"] = quant
    for arg, value in (("calibration", calibration), ("eval", sections.pop("eval"))):
        section = data_section(value, arg, tmp)
        if section is not None:
            given[arg] = section
    for arg, value in sections.items():
        if value is not None:
            given[arg] = plain(value, arg)
    for arg, value in (("name", name), ("seed", seed)):
        if value is not None:
            given[arg] = plain(value, arg)
    for arg, value in given.items():
        if isinstance(value, dict) and isinstance(data.get(arg), dict) and arg != "quant":
            data[arg] = merge(data[arg], value)
        else:
            data[arg] = value
    if "model" in given and isinstance(config, Config):
        data["name"] = given.get("name")   # derived again from the new model.path (a Config holds the old one)
        if not (given.get("output") or {}).get("dir"):
            data["output"]["dir"] = None

    def source(path: str) -> str:
        top = path.split(".")[0].split("[")[0]
        if top in given:
            return f"alphaquant.quantize({'recipe' if top == 'quant' else top}=...)"
        return label

    cfg = build(Config, data, source)
    if loaded is not None:
        _check_loaded_tokenizer(cfg, loaded)
    return cfg


def _check_loaded_tokenizer(cfg, model) -> None:
    """A loaded model whose tokenizer is unknown cannot tokenize text data: say what to pass."""
    from alphaquant.data import TOKENIZER_VOCAB_FILES, needs_tokenizer
    from alphaquant.errors import ConfigError
    from alphaquant.api.inputs import kind

    here = Path(cfg.model.path)
    if cfg.model.tokenizer is None and needs_tokenizer(cfg) and not any((here / f).is_file() for f in TOKENIZER_VOCAB_FILES):
        raise ConfigError(f"alphaquant.quantize(model=...) got {kind(model)} without a tokenizer (it was not loaded "
                          f"from a directory holding one) and the calibration/eval data is text; pass tokenizer= "
                          f"(a directory, hub id or tokenizer object), or token ids as calibration= and eval=")


def run_config(cfg, dry_run: bool = False) -> QuantizeResult:
    """Everything after the config: checks without weights, the plan or the run, the summary."""
    from alphaquant.api.checks import check_recipe, preflight
    from alphaquant.pipeline.session import CalibrationSession

    check_recipe(cfg)                     # the recipe against the model's shapes, from config.json alone
    if not dry_run:                       # a plan needs no data, and may be made on a laptop for a GPU machine
        preflight(cfg)                    # data files, tokenizer, devices: no weights read
    session = CalibrationSession(cfg)
    session.prepare(dry_run=dry_run)      # model skeleton, recipe, output dir: no weights read yet
    if dry_run:
        session.print_plan()
        return QuantizeResult(config=cfg, specs=session.specs, dry_run=True)
    t0 = time.perf_counter()
    session.run()
    session.finish(time.perf_counter() - t0)
    return _result(cfg, session)


def _result(cfg, session) -> QuantizeResult:
    res = session.results
    out = Path(res["output_dir"]) if res.get("output_dir") else None
    kept = None if (out is not None or getattr(session.model, "lazy", False)) else session.model
    summary = {k: v for k, v in res.items() if k != "records"}
    return QuantizeResult(config=cfg, specs=session.specs, output_dir=out, perplexity=dict(res["perplexity"]),
                          modules=res["modules"], records=res["records"], layers=res["layers"],
                          experts=res["experts"], seconds=res.get("seconds_total", 0.0), summary=summary,
                          _model=kept)


__all__ = ["QuantizeResult", "quantize", "run_config"]
