"""Reading and writing safetensors checkpoints one tensor at a time.

`CheckpointReader` indexes key -> file (sharded with model.safetensors.index.json, or single files) and reads
single tensors with safe_open, so a model never has to fit in host RAM. It also accepts the fused expert
layout (`...experts.gate_up_proj` [E, 2I, H], `...experts.down_proj` [E, H, I]) by slicing one expert out.
`ShardWriter` takes (key, tensor) pairs and rolls to a new shard file at a size limit; it is meant to be reused
by exporters.
"""

from __future__ import annotations

import json
import os
import re
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

# per-expert key -> (fused key suffix, which part): gate/w1 = first half of gate_up, up/w3 = second half
_EXPERT_KEY = re.compile(r"^(?P<block>.*)\.experts\.(?P<e>\d+)\.(?P<proj>gate_proj|up_proj|down_proj|w1|w3|w2)\.weight$")
class CheckpointError(ValueError):
    """A checkpoint directory whose files are truncated, corrupt, or lack a tensor the model needs."""


# A model weight (`*.weight`, `*.bias`, a fused `experts.gate_up_proj` / `experts.down_proj`) is a float
# tensor; an integer one would be copied into the model's dtype as if its codes were values. (Quantized
# tensors have names of their own: weight_packed, weight_scale, weight_zero_point, ...)
_WEIGHT_KEY = re.compile(r"(\.weight|\.bias|\.experts\.gate_up_proj|\.experts\.down_proj)$")
_INTEGER_DTYPES = ("BOOL", "I8", "I16", "I32", "I64", "U8", "U16", "U32", "U64")


def check_float_weight(key: str, dtype: str, where: str) -> None:
    """CheckpointError when `key` is a model weight stored with an integer safetensors dtype (`where`: the
    file it is in, as the message names it)."""
    if _WEIGHT_KEY.search(key) and dtype in _INTEGER_DTYPES:
        raise CheckpointError(
            f"the tensor {key!r} in {where} is stored as {dtype}, an integer type; model weights must be "
            f"floating point (F32, F16, BF16 or F8_*): is this checkpoint already quantized? point "
            f"model.path at the unquantized model")


def _check_float_weights(handle, path: Path) -> None:
    """CheckpointError naming the first weight stored with an integer dtype (read from the header only)."""
    for key in handle.keys():
        if _WEIGHT_KEY.search(key):
            check_float_weight(key, handle.get_slice(key).get_dtype(), f"'{path}'")


def _corrupt(path: Path, e: Exception) -> CheckpointError:
    why = str(e).splitlines()[0] if str(e) else type(e).__name__
    return CheckpointError(f"the safetensors file '{path}' is truncated or corrupt ({why}); "
                           f"download or save the checkpoint again")


_FUSED_PART = {"gate_proj": ("gate_up_proj", 0), "w1": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
               "w3": ("gate_up_proj", 1), "down_proj": ("down_proj", None), "w2": ("down_proj", None)}


class CheckpointReader:
    """Key -> file index over a checkpoint directory; `read(key)` loads one tensor.

    >>> ckpt = CheckpointReader("path/to/model")            # doctest: +SKIP
    >>> w = ckpt.read("model.layers.0.mlp.experts.3.up_proj.weight")   # doctest: +SKIP
    """

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)
        index = self.directory / INDEX_NAME
        self._handles: dict[Path, object] = {}
        self._checked: set[Path] = set()        # files whose weight dtypes were checked
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as e:
                raise CheckpointError(f"the checkpoint index '{index}' is not valid: it must be JSON with a "
                                      f"'weight_map' of tensor name -> shard file ({type(e).__name__}: {e})") from None
            self.key_to_file = {k: self.directory / f for k, f in weight_map.items()}
            for f in sorted(set(self.key_to_file.values())):
                if not f.is_file():
                    raise CheckpointError(f"the shard '{f}' listed in '{index}' does not exist; "
                                          f"the checkpoint download is incomplete")
                self._handle(f)                 # parse every header now: a corrupt shard fails here
        else:
            files = sorted(self.directory.glob("*.safetensors"))
            if not files:
                raise FileNotFoundError(f"no *.safetensors files in {self.directory}.")
            self.key_to_file = {}
            for f in files:
                self.key_to_file.update({k: f for k in self._handle(f).keys()})

    def keys(self) -> list[str]:
        return list(self.key_to_file)

    def __contains__(self, key: str) -> bool:
        return key in self.key_to_file or self._fused_source(key) is not None

    def shape(self, key: str) -> tuple[int, ...]:
        """The stored shape of `key`, from the file's header (no data read)."""
        return tuple(self._handle(self.key_to_file[key]).get_slice(key).get_shape())

    def _handle(self, path: Path):
        if path not in self._handles:  # keep files open: re-parsing a large shard header per tensor is slow
            try:
                handle = safe_open(path, "pt")
            except (SafetensorError, OSError) as e:
                raise _corrupt(path, e) from None
            if path not in self._checked:          # every file's dtypes once, on first open (the index)
                _check_float_weights(handle, path)
                self._checked.add(path)
            self._handles[path] = handle
        return self._handles[path]

    def close(self) -> None:
        self._handles.clear()

    def fork(self) -> "CheckpointReader":
        """The same index with its own file handles (for a reader thread; headers are parsed again on use)."""
        other = object.__new__(CheckpointReader)
        other.directory, other.key_to_file, other._handles = self.directory, self.key_to_file, {}
        other._checked = self._checked
        return other

    def read(self, key: str) -> torch.Tensor:
        """The tensor stored under `key` (or sliced out of a fused expert tensor), in its stored dtype."""
        if key in self.key_to_file:
            path = self.key_to_file[key]
            try:
                return self._handle(path).get_tensor(key)
            except (SafetensorError, OSError) as e:
                raise _corrupt(path, e) from None
        src = self._fused_source(key)
        if src is None:
            raise KeyError(f"{key!r} is not in the checkpoint at {self.directory}.")
        fused_key, expert, half = src
        path = self.key_to_file[fused_key]
        try:
            w = self._handle(path).get_slice(fused_key)[expert]  # (2I, H) or (H, I)
        except (SafetensorError, OSError) as e:
            raise _corrupt(path, e) from None
        if half is None:
            return w.contiguous()
        rows = w.shape[0] // 2
        return w[half * rows:(half + 1) * rows].contiguous()

    def _fused_source(self, key: str):
        m = _EXPERT_KEY.match(key)
        if not m:
            return None
        suffix, half = _FUSED_PART[m["proj"]]
        # transformers 5 calls Mixtral's block 'mlp' in memory; accept either prefix.
        for block in (m["block"], m["block"].replace("block_sparse_moe", "mlp")):
            fused = f"{block}.experts.{suffix}"
            if fused in self.key_to_file:
                return fused, int(m["e"]), half
        return None


def parse_size(size: int | str) -> int:
    """'5GB' / '500MB' / '2KB' / int bytes -> bytes (decimal units, as transformers uses)."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B)?\s*", size, re.I)
    if not m:
        raise ValueError(f"max_shard_size={size!r} is not a size; use bytes or e.g. '5GB', '500MB'.")
    unit = (m[2] or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}[unit]
    return int(float(m[1]) * scale)


def _as_os_error(e: SafetensorError, path: Path) -> Exception:
    """safetensors reports a failed write (disk full, read-only disk) as SafetensorError('... (os error 28)');
    give it back as the OSError it is, so callers can tell a full disk from a bug."""
    m = re.search(r"os error (\d+)", str(e))
    if m is None:
        return e
    code = int(m.group(1))
    return OSError(code, os.strerror(code), str(path))


class ShardWriter:
    """Write (key, tensor) pairs to safetensors shards of at most `max_shard_size` bytes (a single tensor
    larger than the limit gets its own shard). Only the current shard is held in memory (and, with
    `background`, the one being written).

    >>> with ShardWriter(out_dir, "2GB") as w:          # doctest: +SKIP
    ...     for key, t in tensors: w.add(key, t)
    On close: one shard -> model.safetensors; several -> model-0000i-of-0000n.safetensors + index json.
    """

    def __init__(self, directory: str | os.PathLike, max_shard_size: int | str = "5GB",
                 metadata: dict[str, str] | None = None, background: bool = False) -> None:
        """background: full shards are written by a thread of the writer's own, so `add` returns while one is
        going out (at most one in flight: the next full shard waits for it; its error is raised by the next
        `add`, `close` or `wait`). The quantizing pipeline adds layers from its write thread, and a 1 GB shard
        written there held up the walk's next layer by ~0.2 s (OLMoE-1B-7B shapes on an H200 host)."""
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.max_bytes = parse_size(max_shard_size)
        self.metadata = {"format": "pt", **(metadata or {})}
        self._current: dict[str, torch.Tensor] = {}
        self._current_bytes = 0
        self._shards: list[tuple[Path, list[str]]] = []  # temporary file, keys
        self.total_bytes = 0
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-write") if background else None
        self._inflight: Future | None = None

    def add(self, key: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self._current and self._current_bytes + nbytes > self.max_bytes:
            self._flush()
        # contiguous CPU copy: safetensors needs it, and the caller may free its tensor afterwards
        self._current[key] = tensor.detach().to("cpu").contiguous()
        self._current_bytes += nbytes
        self.total_bytes += nbytes

    @property
    def shards_started(self) -> int:
        """Shards handed out so far (written or being written); the current one is not counted."""
        return len(self._shards)

    def roll(self) -> None:
        """End the current shard now (written in the background with `background`); the next `add` starts a
        new one. A no-op while the current shard is empty."""
        if self._current:
            self._flush()

    def _flush(self, last: bool = False) -> None:
        path = self.directory / f"shard-{len(self._shards):05d}.tmp"
        tensors = self._current
        self._shards.append((path, list(tensors)))
        self._current, self._current_bytes = {}, 0
        self.wait()
        if self._pool is None or last:      # the last one: close() is waiting for it anyway
            self._write(tensors, path)
        else:
            self._inflight = self._pool.submit(self._write, tensors, path)

    def _write(self, tensors: dict[str, torch.Tensor], path: Path) -> None:
        try:
            save_file(tensors, str(path), metadata=self.metadata)
        except SafetensorError as e:
            raise _as_os_error(e, path) from None

    def wait(self) -> None:
        """The shard being written in the background is on disk (its error, e.g. a full disk, raised here)."""
        if self._inflight is not None:
            future, self._inflight = self._inflight, None
            future.result()

    def abandon(self) -> None:
        """A failed run: wait for the shard in flight (its error ignored) and end the thread, so nothing is
        written into the directory after this returns (the caller removes it)."""
        try:
            self.wait()
        except Exception:     # noqa: BLE001 - the run is failing for another reason; this one is moot
            pass
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)

    def close(self) -> list[Path]:
        """Flush, give the shards their final names, write the index if sharded; returns the shard paths."""
        try:
            if self._current or not self._shards:
                self._flush(last=True)
            self.wait()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
        n = len(self._shards)
        names = [SINGLE_NAME] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        weight_map = {}
        for (tmp, keys), name in zip(self._shards, names):
            os.replace(tmp, self.directory / name)
            weight_map.update({k: name for k in keys})
        if n > 1:
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
            (self.directory / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        return [self.directory / name for name in names]

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abandon()
