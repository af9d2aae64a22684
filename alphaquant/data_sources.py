"""Where calibration/evaluation text and tokens come from: hub datasets, local files, splits.

Sources (`calibration.dataset`, `eval.dataset`):
  wikitext2   wikitext-2-raw-v1 from the hub (needs `datasets` and the network or its cache);
              the split's lines joined with "\\n\\n" (GPTQ convention)
  c4          allenai/c4 en, first shard: train = first 5000 documents joined with "\\n\\n",
              validation = first 1100 documents joined with " " (GPTQ's c4 evaluation text)
  *.txt       a local text file
  *.jsonl     one JSON object per line, the text in `text_field`; documents joined with "\\n\\n"
              (both must be UTF-8: a byte that is not is refused, naming its line, never replaced)
  *.pt *.npy  a pre-tokenized 1-D (or flattened) integer tensor/array
  *.bin       raw token ids, `token_dtype` uint16 or uint32 (nanoGPT's train.bin layout)

Splits of a LOCAL source, so one corpus can feed calibration and evaluation disjointly:
  train = "0:0.9", validation = test = "0.9:1", all = "0:1", or any "a:b" fraction range.
Text is cut at the first newline at or after each fraction of its characters; token files
at the fraction of their tokens. Ranges that do not overlap give disjoint data.

    text = load_text("corpus.txt", "train")            # first ~90% of the characters
    ids = load_token_file("train.bin", "0.5:1", "uint16")
"""
from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import NamedTuple

import torch

from alphaquant.errors import ConfigError, DataError

HUB_SPLITS = {"wikitext2": ("train", "validation", "test"), "c4": ("train", "validation")}
TEXT_SUFFIXES = (".txt", ".jsonl")
TOKEN_SUFFIXES = (".pt", ".npy", ".bin")
NAMED_SPLITS = {"train": (0.0, 0.9), "validation": (0.9, 1.0), "test": (0.9, 1.0), "all": (0.0, 1.0)}
C4_FILES = {"train": "en/c4-train.00000-of-01024.json.gz", "validation": "en/c4-validation.00000-of-00008.json.gz"}
C4_DOCS = {"train": 5000, "validation": 1100}


class Split(NamedTuple):
    name: str | None     # the named split, or None for an "a:b" range
    lo: float            # fraction range [lo, hi) of a local source
    hi: float


def parse_split(split: str, key: str = "split") -> Split:
    """"train" -> Split("train", 0.0, 0.9); "0.25:0.5" -> Split(None, 0.25, 0.5)."""
    if split in NAMED_SPLITS:
        return Split(split, *NAMED_SPLITS[split])
    lo_s, sep, hi_s = str(split).partition(":")
    try:
        lo, hi = float(lo_s or 0.0), float(hi_s or 1.0)
    except ValueError:
        lo = hi = -1.0
    if not sep or not 0.0 <= lo < hi <= 1.0:
        raise ConfigError(f"{key} must be one of {', '.join(NAMED_SPLITS)} or a fraction range "
                          f"'a:b' with 0 <= a < b <= 1 (e.g. '0:0.9'); got {split!r}")
    return Split(None, lo, hi)


def _cut(text: str, frac: float) -> int:
    """Character index for `frac` of `text`, moved forward to the next newline."""
    i = int(len(text) * frac)
    if i <= 0 or i >= len(text):
        return max(0, min(i, len(text)))
    j = text.find("\n", i)
    return len(text) if j < 0 else j


def split_text(text: str, split: Split) -> str:
    return text[_cut(text, split.lo):_cut(text, split.hi)]


def split_tokens(tokens: torch.Tensor, split: Split) -> torch.Tensor:
    n = tokens.numel()
    return tokens[int(n * split.lo):int(n * split.hi)]


def local_path(source: str, key: str) -> Path:
    """The local file `source` names, or DataError saying what a source may be."""
    p = Path(source).expanduser()
    kinds = f"wikitext2, c4, or a local {'/'.join(TEXT_SUFFIXES + TOKEN_SUFFIXES)} file"
    if p.suffix not in TEXT_SUFFIXES + TOKEN_SUFFIXES:
        raise DataError(f"{key} must be {kinds}; got {source!r}")
    if not p.is_file():
        tried = "" if p.is_absolute() else f"; tried '{Path.cwd() / p}', as a relative path is resolved against " \
                                            f"the current directory"
        raise DataError(f"{key}: the file '{source}' does not exist (a source is {kinds}{tried})")
    return p


def load_text(source: str, split: str = "train", text_field: str = "text", key: str = "dataset") -> str:
    """The text of `source` restricted to `split` (see the module docstring)."""
    sp = parse_split(split, key=f"{key} split")
    if source in HUB_SPLITS:
        return _hub_text(source, sp, key)
    p = local_path(source, key)
    if p.suffix == ".txt":
        text = read_utf8(p, key)
    elif p.suffix == ".jsonl":
        text = "\n\n".join(_jsonl_texts(p, text_field, key))
    else:
        raise DataError(f"{key}: '{source}' is a token file; it needs no text loading")
    out = split_text(text, sp)
    if not out.strip():
        raise DataError(f"{key}: '{source}' split {split!r} holds no text ({len(text)} characters in the file); "
                        f"point {key} at a file with text or choose another split")
    return out


def read_utf8(p: Path, key: str) -> str:
    """The text of a local data file; DataError naming the first byte that is not UTF-8.

    Strict rather than errors="replace": a file in another encoding (latin-1, cp1252) would
    otherwise calibrate on U+FFFD in place of every accented letter, without a word."""
    raw = p.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise DataError(f"{key}: '{p}' is not UTF-8 text: byte 0x{raw[e.start]:02x} at line {line} (offset "
                        f"{e.start}) is not valid UTF-8; convert the file, e.g. iconv -f latin1 -t utf-8") from None
    return text.replace("\r\n", "\n").replace("\r", "\n")     # universal newlines, as read_text gives


def _jsonl_texts(p: Path, field: str, key: str) -> list[str]:
    texts = []
    with io.StringIO(read_utf8(p, key), newline=None) as f:        # the lines a text-mode file iterates
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{key}: '{p}' line {n} is not valid JSON ({e.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get(field), str):
                raise DataError(f"{key}: '{p}' line {n} has no string field {field!r} "
                                f"(set text_field to the field holding the text)")
            texts.append(row[field])
    return texts


def load_token_file(source: str, split: str = "all", token_dtype: str = "uint16",
                    key: str = "dataset") -> torch.Tensor:
    """1-D LongTensor of the token ids in a .pt / .npy / .bin file, restricted to `split`."""
    sp = parse_split(split, key=f"{key} split")
    p = local_path(source, key)
    try:
        if p.suffix == ".pt":
            t = torch.load(p, map_location="cpu", weights_only=True)
        elif p.suffix == ".npy":
            import numpy as np
            t = torch.from_numpy(np.load(p, allow_pickle=False))
        elif p.suffix == ".bin":
            dtype = {"uint16": torch.uint16, "uint32": torch.uint32}[token_dtype]
            raw = bytearray(p.read_bytes())
            width = torch.empty((), dtype=dtype).element_size()
            if len(raw) % width:
                raise DataError(f"{key}: '{source}' has {len(raw)} bytes, not a whole number of {token_dtype} tokens")
            t = torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)
        else:
            raise DataError(f"{key}: '{source}' is not a token file (.pt, .npy, .bin)")
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - torch.load/np.load raise many kinds (pickle, OSError, ...)
        raise DataError(f"{key}: could not read the token file '{source}' ({e})") from None
    if not isinstance(t, torch.Tensor) or t.dtype.is_floating_point or t.dtype == torch.bool:
        raise DataError(f"{key}: '{source}' must hold an integer tensor of token ids")
    return split_tokens(t.reshape(-1).to(torch.long), sp)


def _hub_load(path: str, name: str | None, split: str, data_files: dict | None = None):
    """`datasets.load_dataset`, kept apart so tests can replace it."""
    import datasets
    return datasets.load_dataset(path, name, split=split, data_files=data_files)


def check_hub_split(source: str, sp: Split, key: str) -> None:
    """ConfigError when a hub dataset has no such split (fraction ranges apply to local files only)."""
    if sp.name not in HUB_SPLITS[source] or sp.name == "all":
        raise ConfigError(f"{key}: {source} has the splits {', '.join(HUB_SPLITS[source])}; got "
                          f"{sp.name or f'{sp.lo}:{sp.hi}'!r} (fraction ranges apply to local files)")


def _hub_text(source: str, sp: Split, key: str) -> str:
    check_hub_split(source, sp, key)
    try:
        if source == "wikitext2":
            return "\n\n".join(_hub_load("Salesforce/wikitext", "wikitext-2-raw-v1", sp.name)["text"])
        ds = _hub_load("allenai/c4", None, sp.name, data_files={sp.name: C4_FILES[sp.name]})
        docs = ds["text"][:C4_DOCS[sp.name]]
        return (" " if sp.name == "validation" else "\n\n").join(docs)
    except Exception as e:  # noqa: BLE001 - datasets raises many kinds (ConnectionError, OSError, ...)
        offline = any(os.environ.get(v, "0") not in ("", "0") for v in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"))
        why = "offline and not in the datasets cache" if offline else f"{type(e).__name__}: {str(e)[:120]}"
        raise DataError(f"{key}: could not load the hub dataset {source!r} ({why}); save the text to a "
                        f"local .txt or .jsonl file and set {key} to its path") from None
