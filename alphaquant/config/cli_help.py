"""The command line's help and flag checks, generated from the typed config (alphaquant/config/run.py).

Every config key is a flag (`--calibration.num_samples 16`); its type and default come from the
dataclass field, its meaning from the comment on (or just above) the field in the source, so the
documentation is written once, beside the code:

    for key in config_keys():
        print(key.flag, key.type, key.default, key.meaning)
    # --calibration.num_samples int 128 random windows (GPTQ convention: random start offsets)

`check_flags(argv)` refuses an unknown flag before anything else runs, suggesting the closest
known one (`--calibraton.num_samples` -> `--calibration.num_samples`, `--dryrun` -> `--dry-run`).
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import inspect
import io
import re
import textwrap
import tokenize
import types
import typing
from typing import Literal, Union

from alphaquant.errors import ConfigError

# The flags the CLI itself takes (not config keys); kept beside parse_cli's add_argument calls.
CLI_FLAGS = ("--config", "--recipe", "--dry-run", "--print-config", "--overwrite", "--eval-only", "--help")


@dataclasses.dataclass(frozen=True)
class KeyDoc:
    flag: str           # --section.key (a list entry's keys as --section.key[N].field)
    type: str           # int, float, bool, str, a|b|c, ... | null
    default: str        # as YAML writes it; "required" for model.path
    meaning: str


def type_words(tp) -> str:
    """Compact type: Literal['a','b'] -> 'a|b', int | None -> 'int|null', list[X] -> 'list[X]'."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        return "|".join(type_words(a) for a in args)
    if origin is Literal:
        return "|".join(str(a) for a in args)
    if origin is list:
        return f"list[{type_words(args[0])}]"
    if dataclasses.is_dataclass(tp):
        return "{" + ", ".join(f.name for f in dataclasses.fields(tp)) + "}"
    return {type(None): "null"}.get(tp, getattr(tp, "__name__", str(tp)))


def yaml_words(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(yaml_words(v) for v in value) + "]"
    return str(value)


@functools.cache
def field_comments(cls) -> dict[str, str]:
    """{field name: the comment at the end of its line, after the comment lines just above it}."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    comments: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
    lines = source.splitlines()
    out: dict[str, str] = {}
    names = {f.name for f in dataclasses.fields(cls)}
    for n, line in enumerate(lines, 1):
        m = re.match(r"\s+(\w+)\s*:", line)
        if not m or m.group(1) not in names or m.group(1) in out:
            continue
        above, k = [], n - 1
        while k >= 1 and lines[k - 1].strip().startswith("#"):
            above.insert(0, comments.get(k, ""))
            k -= 1
        trailing = comments.get(n) if not line.strip().startswith("#") else None
        text = " ".join(p for p in (*above, trailing) if p)
        out[m.group(1)] = text
    return out


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def config_keys(cls=None, prefix: str = "") -> list[KeyDoc]:
    """Every leaf key of the run config, in declaration order, with type, default and meaning."""
    from alphaquant.config.run import Config

    cls = Config if cls is None else cls
    hints = typing.get_type_hints(cls)
    comments = field_comments(cls)
    out: list[KeyDoc] = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        key = f"{prefix}.{f.name}" if prefix else f.name
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out += config_keys(tp, key)
            continue
        item = typing.get_args(tp)[0] if typing.get_origin(tp) is list else None
        default = _default(f)
        shown = "required" if key == "model.path" else yaml_words(default)
        meaning = comments.get(f.name, "")
        if dataclasses.is_dataclass(item):
            out.append(KeyDoc(f"--{key}", f"list of {type_words(item)}", shown, meaning))
            out += config_keys(item, f"{key}[N]")
        else:
            out.append(KeyDoc(f"--{key}", type_words(tp), shown, meaning))
    return out


def render_keys(width: int = 100) -> str:
    """The config-key part of --help: one block per section."""
    lines = ["config keys (in the YAML as section: {key: value}; on the command line as --section.key VALUE,",
             "values parsed as YAML; the command line wins over the file):"]
    section = None
    for k in config_keys():
        top = k.flag[2:].split(".")[0] if "." in k.flag else ""
        if top != section:
            section = top
            lines.append("")
            lines.append(f"  {section or 'top level'}:")
        head = f"    {k.flag} {k.type}"
        info = f"(default: {k.default}) {k.meaning}".strip()
        lines.append(head)
        lines += textwrap.wrap(info, width=width, initial_indent="        ", subsequent_indent="        ")
    return "\n".join(lines)


def _known_flags() -> list[str]:
    return [*CLI_FLAGS, *(k.flag for k in config_keys())]


def check_flags(argv: list[str]) -> None:
    """ConfigError for the first --flag that is neither a CLI flag nor a config key, naming the closest one."""
    from alphaquant.config.run import Config
    from alphaquant.config.schema import check_key_path

    for tok in argv:
        if not tok.startswith("--") or tok == "--":
            continue
        flag = tok.split("=", 1)[0]
        keys = flag[2:].replace("[", ".").replace("]", "").split(".")
        try:
            check_key_path(Config, keys, flag)
            continue
        except ConfigError as e:
            err = e
        near = suggest(flag)
        if near:
            raise ConfigError(f"unknown option {flag}; did you mean '{near}'? (--help lists every option)") from None
        raise err


def suggest(flag: str) -> str | None:
    """The known flag closest to `flag` (list indices compared as [N]), or None."""
    norm = re.sub(r"(\.|\[)(\d+)\]?", r"[N]", flag) if re.search(r"\.\d+|\[\d+\]", flag) else flag
    near = difflib.get_close_matches(norm, _known_flags(), n=1, cutoff=0.75)
    if not near:
        return None
    if "[N]" in near[0] and "[N]" in norm:        # give the user's own index back
        idx = re.search(r"(?:\.|\[)(\d+)", flag).group(1)
        return near[0].replace("[N]", f"[{idx}]")
    return near[0]
