"""Typed dataclasses from plain dicts, with errors that name the YAML key.

`build(cls, data, source)` walks `cls`'s fields (nested dataclasses, lists of dataclasses,
`Literal`, `X | None`, int/float/bool/str), rejects unknown keys (suggesting the closest
one), coerces and type-checks values, then calls each section's `check(path)` hook bottom-up
so semantic errors name the key too.

    @dataclass
    class Gptq:
        block_size: int = 128
        def check(self, path):
            if self.block_size <= 0:
                raise ConfigError(f"{path}.block_size must be > 0; got {self.block_size}")

    build(Gptq, {"blok_size": 64}, "run.yaml")
    # ConfigError: unknown key 'blok_size' in run.yaml; did you mean 'block_size'? allowed: block_size

`yaml_load` parses with YAML 1.2 scalar rules (`1e-2` is a float, `0:0.9` is a string,
`no` is a string), so numbers and split ranges read the way a user expects.
"""
from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from typing import Any, Literal, Union

import yaml

from alphaquant.errors import ConfigError


def join(path: str, key: str | int) -> str:
    """Key path for messages: join("quant.overrides", 2) -> "quant.overrides[2]"."""
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def closest(word: str, options, prefix: str = "") -> str:
    """"; did you mean 'prefix.x'?" for the option closest to `word`, or "" when none is close."""
    near = difflib.get_close_matches(str(word), [str(o) for o in options], n=1, cutoff=0.6)
    return f"; did you mean '{join(prefix, near[0])}'?" if near else ""


def where(source, path: str) -> str:
    """`source` is a label ("run.yaml") or a function path -> label (file vs command line)."""
    return source(path) if callable(source) else source


def field_names(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.init]


def field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def describe(tp) -> str:
    """Human words for a type: Literal['a','b'] -> "one of 'a', 'b'"."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(describe(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args) if len(args) > 1 else repr(args[0])
    if origin is list:
        return f"a list of {describe(args[0])}"
    if dataclasses.is_dataclass(tp):
        return "a mapping with keys " + ", ".join(field_names(tp))
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string",
            type(None): "null"}.get(tp, getattr(tp, "__name__", str(tp)))


def coerce(value, tp, path: str, source):
    """Check `value` against type `tp`; returns the converted value or raises ConfigError."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return coerce(value, a, path, source)
            except ConfigError:
                continue
        raise _wrong(path, value, tp, source)
    if origin is Literal:
        if any(value == a and type(value) is type(a) for a in args):
            return value
        hint = closest(value, args) if isinstance(value, str) else ""
        raise ConfigError(f"{path} must be {describe(tp)}; got {value!r} (in {where(source, path)}){hint}")
    if origin is list:
        if not isinstance(value, list):
            raise _wrong(path, value, tp, source)
        return [coerce(v, args[0], join(path, i), source) for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        return build(tp, value, source, path)
    if tp is bool and isinstance(value, bool):
        return value
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp is float and not isinstance(value, bool):
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    if tp is str and isinstance(value, str):
        return value
    if tp is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)      # `name: 2024` in YAML is an int; a string was meant
    raise _wrong(path, value, tp, source)


def _wrong(path, value, tp, source) -> ConfigError:
    return ConfigError(f"{path} must be {describe(tp)}; got {value!r} (in {where(source, path)})")


def build(cls, data, source, path: str = ""):
    """An instance of dataclass `cls` from dict `data`; errors name `path.key` and `source`."""
    names = field_names(cls)
    at = f"'{path}'" if path else "the top level"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'the config'} must be a mapping with keys {', '.join(names)}; "
                          f"got {data!r} (in {where(source, path)})")
    for key in data:
        if key not in names:
            raise ConfigError(f"unknown key '{join(path, str(key))}' in {where(source, join(path, str(key)))} (allowed at {at}: "
                              f"{', '.join(names)}){closest(key, names, path)}")
    hints = field_types(cls)
    obj = cls(**{k: coerce(v, hints[k], join(path, k), source) for k, v in data.items()})
    if hasattr(obj, "check"):
        try:
            obj.check(path)
        except ConfigError as e:
            # name where the offending key came from when the message names one ("calibration.num_samples")
            keys = [join(path, k) for k in names if re.search(rf"(?<![\w.]){re.escape(join(path, k))}\b", str(e))]
            raise ConfigError(f"{e} (in {where(source, keys[0] if keys else path)})") from None
    return obj


def check_key_path(cls, keys: list[str], flag: str) -> type:
    """Type of the field at `keys` (e.g. ["calibration", "seq_len"]) or ConfigError for `flag`."""
    tp = cls
    for i, key in enumerate(keys):
        origin = typing.get_origin(tp)
        if origin is list:
            if not key.isdigit():
                raise ConfigError(f"{flag}: '{key}' must be a list index (0, 1, ...)")
            tp = typing.get_args(tp)[0]
            continue
        if not dataclasses.is_dataclass(tp):
            raise ConfigError(f"{flag}: '{'.'.join(keys[:i])}' is a value, not a section")
        names = field_names(tp)
        if key not in names:
            at = ".".join(keys[:i])
            hint = closest(key, names, at).replace("mean '", "mean '--")    # the flag: '--calibration.seed'
            raise ConfigError(f"unknown option {flag} (allowed at {repr(at) if at else 'the top level'}: "
                              f"{', '.join(names)}){hint}")
        tp = field_types(tp)[key]
    return tp


# --- YAML 1.2 scalars ------------------------------------------------------------------
class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 core-schema ints, floats and bools."""


_Loader.yaml_implicit_resolvers = {
    ch: [(tag, rx) for tag, rx in rs if tag not in (
        "tag:yaml.org,2002:int", "tag:yaml.org,2002:float", "tag:yaml.org,2002:bool")]
    for ch, rs in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                              list("tTfF"))
_Loader.add_implicit_resolver("tag:yaml.org,2002:int", re.compile(r"^[-+]?(?:[0-9]+|0x[0-9a-fA-F]+|0o[0-7]+)$"),
                              list("-+0123456789"))
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."))
_Loader.add_constructor("tag:yaml.org,2002:bool", lambda loader, node: loader.construct_scalar(node) in ("true", "True", "TRUE"))


def _int(loader, node) -> int:
    text = loader.construct_scalar(node)
    body = text.lstrip("+-")
    sign = -1 if text.startswith("-") else 1
    base = 16 if body[:2] == "0x" else 8 if body[:2] == "0o" else 10
    return sign * int(body[2:] if base != 10 else body, base)


_Loader.add_constructor("tag:yaml.org,2002:int", _int)


def yaml_load(text: str, source: str):
    """Parse YAML text; a syntax error or a repeated key becomes ConfigError naming `source` and the line.

    PyYAML lets the last of two equal keys win silently; a config that says `seq_len: 512` and,
    further down, `seq_len: 2048` is refused instead:

        yaml_load("gptq:\n  damp: 0.01\n  damp: 0.1\n", "run.yaml")
        # ConfigError: run.yaml sets the key 'gptq.damp' twice, at line 2 and line 3; ...
    """
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_duplicate_keys(node, "", source, set())
        return loader.construct_document(node)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        line = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{source} is not valid YAML{line}: {problem}") from None
    finally:
        loader.dispose()


def _check_duplicate_keys(node, path: str, source: str, seen: set) -> None:
    """ConfigError for the first mapping (at any depth) that holds the same scalar key twice.
    Merge keys (`<<: *base`) are left to YAML: a key given beside a merge overrides it by design."""
    if id(node) in seen:                      # an alias of a node already walked (anchors may recurse)
        return
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        first: dict = {}
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
                name = join(path, key.value)
                here = (key.start_mark.line + 1, key.start_mark.column + 1)
                if (key.tag, key.value) in first:
                    there = first[(key.tag, key.value)]
                    at = (f"at line {there[0]} and line {here[0]}" if there[0] != here[0] else
                          f"on line {here[0]} (columns {there[1]} and {here[1]})")
                    raise ConfigError(f"{source} sets the key '{name}' twice, {at}; a key may appear once "
                                      f"per mapping (YAML would silently keep the last), so delete one of them")
                first[(key.tag, key.value)] = here
                _check_duplicate_keys(value, name, source, seen)
            else:
                _check_duplicate_keys(value, path, source, seen)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _check_duplicate_keys(item, join(path, i), source, seen)
