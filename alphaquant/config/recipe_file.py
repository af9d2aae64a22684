"""Recipe files: the `quant` section on its own, as JSON or YAML, taken as it is.

    {"default": {"wq": "int4", "aq": "bf16", "group_size": 128},
     "overrides": [{"pattern": "*.mlp.experts.*", "wq": "mxfp4", "group_size": 32},
                   {"pattern": "*.mlp.gate", "skip": true}]}

Three ways to use one (configs/gptq_*_mixed.json ship for OLMoE, Qwen2-MoE and Mixtral):

    python train_quant.py --config configs/olmoe.yaml --recipe configs/gptq_olmoe_mixed.json
    quant: configs/gptq_olmoe_mixed.json          # in a run config, instead of a mapping
    alphaquant.quantize(model=..., recipe="configs/gptq_olmoe_mixed.json", ...)

A relative recipe path is resolved against the current directory, like every other path in a
config (model.path, calibration.dataset, ...); a missing file's message names the absolute path
that was tried. The file's keys are checked like the `quant` section of a YAML config.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from alphaquant.errors import ConfigError

QUANT_KEYS = ("default", "overrides", "nonstandard_blocks", "budget_bits", "budget_candidates")
RUN_KEYS = ("model", "calibration", "eval", "quant", "gptq", "trainer", "logging", "output", "name", "seed")


def recipe_path(path: str | os.PathLike, key: str) -> Path:
    """The recipe file `path` names (~ expanded), or ConfigError naming the absolute path tried."""
    p = Path(path).expanduser()
    if not p.is_file():
        tried = p if p.is_absolute() else Path.cwd() / p
        what = "is not a file" if p.exists() else "does not exist"
        raise ConfigError(f"{key}: the recipe file '{path}' {what} (tried '{tried}'; a relative path is "
                          f"resolved against the current directory); give a .json or .yaml recipe file")
    return p


def load_recipe_file(path: str | os.PathLike, key: str = "--recipe") -> dict:
    """The `quant` section held in a .json / .yaml / .yml file, as a plain dict (checked later by build)."""
    p = recipe_path(path, key)
    label = f"the recipe file '{path}'"
    raw = p.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{label} ({key}) is not UTF-8 text: byte 0x{raw[e.start]:02x} at offset {e.start}; "
                          f"save it as UTF-8") from None
    if p.suffix == ".json":
        data = _json(text, label)
    elif p.suffix in (".yaml", ".yml"):
        from alphaquant.config.schema import yaml_load
        data = yaml_load(text, label)
    else:
        raise ConfigError(f"{key}: '{path}' is not a recipe file; a recipe is a .json, .yaml or .yml file")
    return check_recipe_shape(data, f"{label} ({key})")


def check_recipe_shape(data, label: str) -> dict:
    """`data` is a quant section (keys default/overrides/nonstandard_blocks); a run config is named as one."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{label} must be a mapping with keys {', '.join(QUANT_KEYS)}; got a "
                          f"{type(data).__name__}")
    run_keys = [k for k in data if k in RUN_KEYS and k not in QUANT_KEYS]
    if run_keys:
        raise ConfigError(f"{label} has the run-config key(s) {', '.join(map(repr, run_keys))}: a recipe holds "
                          f"only {', '.join(QUANT_KEYS)} (the quant section); pass a run config with --config "
                          f"(config= in Python)")
    return data


def _json(text: str, label: str):
    def no_repeats(pairs):
        seen = {}
        for k, v in pairs:
            if k in seen:
                raise ConfigError(f"{label} sets the key {k!r} twice in one object; a key may appear once, "
                                  f"so delete one of them")
            seen[k] = v
        return seen

    try:
        return json.loads(text, object_pairs_hook=no_repeats)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{label} is not valid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
