"""`alphaquant.quantize`'s arguments -> the plain config dict the YAML would hold.

Every argument may be what the YAML section holds (a mapping) or its typed dataclass; some take
objects the YAML cannot hold, which are written to a temporary directory for the run and named
there, so the run itself is exactly the file-based one:

    model        a hub id / directory, or a loaded model (ours, or a transformers PreTrainedModel):
                 saved with its tokenizer to <tmp>/model (the checkpoint is quantized from there)
    recipe       the quant section (mapping, QuantConfig, .json/.yaml recipe file), or a whole run
                 config (Config, or a mapping with run-config keys)
    calibration  a dataset name or file, token ids (a 1-D or 2-D integer tensor: <tmp>/calibration.pt,
                 as a token file), texts (a list of str or a datasets.Dataset: <tmp>/calibration.jsonl)
    eval         the same as calibration, or False (no evaluation)

An argument of another kind is one ConfigError naming the argument and the kind it got (never
the object's repr, which for a model is thousands of lines).
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from alphaquant.errors import ConfigError
from alphaquant.config.recipe_file import QUANT_KEYS, RUN_KEYS, check_recipe_shape, load_recipe_file

SECTIONS = ("model", "calibration", "eval", "gptq", "trainer", "logging", "output")
PLAIN = (str, int, float, bool, type(None))


def kind(obj) -> str:
    """"a torch.Tensor" / "an OlmoeForCausalLM": the kind of `obj` in words, never its repr."""
    name = type(obj).__name__
    return f"{'an' if name[:1].lower() in 'aeiou' else 'a'} {name}"


def arg_error(arg: str, obj, takes: str) -> ConfigError:
    return ConfigError(f"alphaquant.quantize({arg}=...) takes {takes}; got {kind(obj)}")


def plain(obj, arg: str, path: str = ""):
    """`obj` as plain YAML data (dicts, lists, scalars); ConfigError naming the key holding anything else."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, str):
                raise ConfigError(f"alphaquant.quantize({arg}=...): the key {k!r} must be a string")
            out[k] = plain(v, arg, f"{path}.{k}" if path else k)
        return out
    if isinstance(obj, (list, tuple)):
        return [plain(v, arg, f"{path}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, PLAIN):
        return obj
    where = f"{arg}" + (f"['{path}']" if path else "")
    raise ConfigError(f"alphaquant.quantize: {where} must be a YAML value (a string, number, bool, list or "
                      f"mapping); got {kind(obj)}")


def merge(base: dict, extra: dict) -> dict:
    """`extra` over `base`, mapping by mapping (a key `extra` names replaces only that key)."""
    out = dict(base)
    for k, v in extra.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


# -- recipe ---------------------------------------------------------------------------------------------------
def recipe_data(recipe) -> tuple[dict | None, dict | None]:
    """(quant section, whole run config) from `recipe`; one of the two is None."""
    from alphaquant.config.run import Config, QuantConfig

    if recipe is None:
        return None, None
    if isinstance(recipe, Config):
        return None, recipe.to_dict()
    if isinstance(recipe, QuantConfig):
        return dataclasses.asdict(recipe), None
    if isinstance(recipe, (str, os.PathLike)):
        return load_recipe_file(recipe, "recipe"), None
    if isinstance(recipe, dict):
        data = plain(recipe, "recipe")
        if data and all(k in RUN_KEYS for k in data) and not any(k in QUANT_KEYS for k in data):
            return None, data               # a whole run config given as the recipe
        return check_recipe_shape(data, "alphaquant.quantize(recipe=...)"), None
    raise arg_error("recipe", recipe, "a mapping (the quant section: default, overrides), a .json/.yaml recipe "
                                      "file, an alphaquant.config.QuantConfig or a whole alphaquant.config.Config")


def config_data(config) -> tuple[dict, str]:
    """(run config dict, label) from config=: a YAML path, a mapping or a Config."""
    from alphaquant.config.run import Config, read_config_file

    if config is None:
        return {}, "alphaquant.quantize's arguments"
    if isinstance(config, Config):
        return config.to_dict(), "config="
    if isinstance(config, (str, os.PathLike)):
        data, label = read_config_file(config)
        if not isinstance(data, dict):
            raise ConfigError(f"the config file '{config}' must hold a mapping with keys {', '.join(RUN_KEYS)}")
        if isinstance(data.get("quant"), str):
            data["quant"] = load_recipe_file(data["quant"], f"quant in {label}")
        return data, label
    if isinstance(config, dict):
        return plain(config, "config"), "config="
    raise arg_error("config", config, "a run-config YAML path, a mapping or an alphaquant.config.Config")


# -- model ------------------------------------------------------------------------------------------------------
def model_data(model, tokenizer, tmp: Path | None) -> dict | None:
    """The model section from model= (and tokenizer=); a loaded model is saved under `tmp`."""
    import torch.nn as nn

    from alphaquant.config.run import ModelConfig

    if model is None:
        data = None
    elif isinstance(model, (str, os.PathLike)):
        data = {"path": os.fspath(model)}
    elif isinstance(model, ModelConfig):
        data = dataclasses.asdict(model)
    elif isinstance(model, dict):
        data = plain(model, "model")
    elif isinstance(model, nn.Module):
        return _saved_model(model, tokenizer, tmp)
    else:
        raise arg_error("model", model, "a hub id or model directory, a mapping (the model section), "
                                        "or a loaded model (models.from_pretrained, or a transformers PreTrainedModel)")
    if tokenizer is not None:
        data = dict(data or {})
        data["tokenizer"] = _tokenizer_path(tokenizer, tmp)
    return data


def _saved_model(model, tokenizer, tmp: Path) -> dict:
    """A loaded model written to tmp/model in the hub layout, with its tokenizer when one is known."""
    import torch
    from alphaquant import models
    from alphaquant.models.common.decoder import MoEForCausalLM

    out = tmp / "model"
    try:
        from transformers import PreTrainedModel
    except ImportError:        # pragma: no cover
        PreTrainedModel = ()
    if isinstance(model, MoEForCausalLM):
        models.save_pretrained(model, out)
        origin = model.checkpoint.directory if model.checkpoint is not None else None
        dtype = model.model.embed_tokens.weight.dtype
    elif PreTrainedModel and isinstance(model, PreTrainedModel):
        if any(p.is_meta for p in model.parameters()):
            raise ConfigError(f"alphaquant.quantize(model=...) got {kind(model)} with weights on the meta "
                              f"device; pass the directory it was loaded from instead")
        model.save_pretrained(out)
        origin = getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", None)
        dtype = next(model.parameters()).dtype
    else:
        raise arg_error("model", model, "a hub id or model directory, a mapping (the model section), "
                                        "or a loaded model (models.from_pretrained, or a transformers PreTrainedModel)")
    if tokenizer is not None:
        _copy_tokenizer(tokenizer, out)
    elif origin is not None and Path(origin).is_dir():
        _copy_tokenizer(str(origin), out)
    names = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
    data = {"path": str(out), "lazy": False, "_name": _model_name(model, origin)}
    if dtype in names:
        data["dtype"] = names[dtype]
    return data


def _model_name(model, origin) -> str:
    """The run name of a loaded model: the directory or hub id it came from, else its model_type."""
    if origin:
        return Path(str(origin).rstrip("/")).name
    return str(getattr(model.config, "model_type", None) or "model")


def _copy_tokenizer(tokenizer, out: Path) -> None:
    import shutil

    from alphaquant.data import TOKENIZER_VOCAB_FILES
    from alphaquant.export.writer import TOKENIZER_FILES     # what the checkpoint writer copies from model.path
    if isinstance(tokenizer, (str, os.PathLike)):
        src = Path(tokenizer).expanduser()
        if not src.is_dir():
            raise ConfigError(f"alphaquant.quantize(tokenizer=...): '{tokenizer}' is not a tokenizer directory; "
                              f"with a loaded model give a directory or a tokenizer object")
        for name in dict.fromkeys((*TOKENIZER_FILES, *TOKENIZER_VOCAB_FILES)):
            if (src / name).is_file():
                shutil.copyfile(src / name, out / name)
    elif hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(out)
    else:
        raise arg_error("tokenizer", tokenizer, "a tokenizer directory, a hub id or a transformers tokenizer")


def _tokenizer_path(tokenizer, tmp: Path) -> str:
    if isinstance(tokenizer, (str, os.PathLike)):
        return os.fspath(tokenizer)
    if hasattr(tokenizer, "save_pretrained"):
        out = tmp / "tokenizer"
        tokenizer.save_pretrained(out)
        return str(out)
    raise arg_error("tokenizer", tokenizer, "a tokenizer directory, a hub id or a transformers tokenizer")


# -- data -------------------------------------------------------------------------------------------------------
def data_section(value, arg: str, tmp: Path) -> dict | None:
    """The calibration/eval section from calibration=/eval=: a name, a file, tokens, texts or a mapping."""
    if value is None:
        return None
    if value is False and arg == "eval":
        return {"enabled": False}
    if isinstance(value, dict):
        section = dict(value)
        if "dataset" in section and not isinstance(section["dataset"], (str, os.PathLike)):
            section.update(_in_memory(section["dataset"], arg, tmp, section.get("text_field", "text")))
            section.setdefault("split", "all")
        return plain(section, arg)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, (str, os.PathLike)):
        return {"dataset": os.fspath(value)}
    return {**_in_memory(value, arg, tmp, "text"), "split": "all"}


def _in_memory(value, arg: str, tmp: Path, text_field: str) -> dict:
    """Token ids -> <tmp>/<arg>.pt, texts -> <tmp>/<arg>.jsonl; the keys that point the section at them."""
    import torch

    name = "calibration" if arg == "calibration" else "eval"
    if isinstance(value, torch.Tensor):
        if value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool or value.dim() > 2:
            raise ConfigError(f"alphaquant.quantize({arg}=...): a tensor must hold integer token ids, 1-D (a token "
                              f"stream) or 2-D (rows joined into one stream); got {tuple(value.shape)} {value.dtype}")
        path = tmp / f"{name}.pt"
        torch.save(value.detach().to("cpu", torch.long).reshape(-1).clone(), path)
        return {"dataset": str(path)}
    texts = _texts(value, arg, text_field)
    path = tmp / f"{name}.jsonl"
    with path.open("w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({"text": t}, ensure_ascii=False) + "\n")
    return {"dataset": str(path), "text_field": "text"}


def _texts(value, arg: str, text_field: str) -> list[str]:
    if isinstance(value, (list, tuple)) and value and all(isinstance(t, str) for t in value):
        return list(value)
    try:
        import datasets
    except ImportError:        # pragma: no cover
        datasets = None
    if datasets is not None and isinstance(value, datasets.Dataset):
        if text_field not in value.column_names:
            raise ConfigError(f"alphaquant.quantize({arg}=...): the datasets.Dataset has no column {text_field!r} "
                              f"(it has {', '.join(value.column_names)}); pass {{'dataset': ds, 'text_field': ...}}")
        texts = value[text_field]
        if not all(isinstance(t, str) for t in texts):
            raise ConfigError(f"alphaquant.quantize({arg}=...): the column {text_field!r} must hold strings")
        return list(texts)
    raise arg_error(arg, value, "a dataset name (wikitext2, c4), a data file, a mapping (the section), integer "
                                "token ids (a torch.Tensor), a list of texts or a datasets.Dataset")

