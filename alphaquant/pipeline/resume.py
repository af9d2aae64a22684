"""Resume after a crash: after each decoder layer, what is needed to skip its GPTQ work later.

    <output.dir's parent>/.<name>.resume/
        state.json             {"fingerprint": ..., "layers_done": k, ...}   (written last, atomically)
        layer_00000.safetensors  layer 0's solved linears as the checkpoint stores them (packed codes + scales),
                                 and their ModuleRecords' tensors (scales/zeros/g_idx) under "record/<name>/<field>"
        layer_00000.json         the rest of those ModuleRecords (tokens, errors, fallbacks)
        ...

A rerun of the same command finds state.json, checks that everything that decides the
quantized weights (model, calibration data, recipe, GPTQ options, seed) is unchanged, and
replays layers 0..k-1: it loads their saved quantized weights instead of collecting
Hessians and solving, and propagates the activation streams through them exactly as the
first run did (same batches, same kernels), so layers k.. see bit-identical inputs and the
final checkpoint is bit-identical to an uninterrupted run. Only the compressed weights are
saved (one quantized checkpoint's worth in total; they decompress to exactly the solved
weights), never the activation caches (gigabytes per layer).

Files are written (by a background thread, overlapping the next layer's work) to a temporary
name and renamed, and state.json is replaced last, so a SIGKILL at any moment leaves the
previous consistent state. The directory is removed when
the run ends successfully. Under DDP the last rank writes (rank 0 writes the checkpoint) and
every rank reads. Records go to JSON + safetensors rather than torch.save: pickling a layer's
~600 record tensors held the interpreter lock for tens of milliseconds on the write thread,
which the main thread's kernel launches waited for.
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from alphaquant.errors import UserError

# 2: compressed tensors instead of dequantized weights; 3: records as JSON + safetensors;
# 4: fingerprint by part (weights, tokenizer, data), a sha256 per layer file verified before replay
STATE_VERSION = 4
RECORD = "record/"         # key prefix of the records' tensors in a layer's safetensors file


def resume_dir(out_dir: Path) -> Path:
    out_dir = Path(out_dir)
    return out_dir.parent / f".{out_dir.name}.resume"


def saved_layers(out_dir: Path) -> tuple[int, Path]:
    """(layers a resume state beside out_dir holds, its directory): 0 when there is none or it is unreadable."""
    d = resume_dir(out_dir)
    try:
        return int(json.loads((d / "state.json").read_text()).get("layers_done", 0)), d
    except (OSError, ValueError, AttributeError):
        return 0, d


def fingerprint(cfg) -> dict[str, str]:
    """Hashes of everything that decides the quantized weights, by part, so a mismatch can say what changed.

    config: the model/calibration/quant/gptq sections and the seed (not eval, logging, output, trainer);
    weights: every weight file of a local model directory by name, size, mtime and safetensors header
    (cheap: no tensor data is read; a rewritten or replaced file changes its mtime or header);
    tokenizer and data: the tokenizer files' and the calibration file's bytes.
    """
    d = cfg.to_dict()
    keep = {k: d[k] for k in ("model", "calibration", "quant", "gptq", "seed")}
    keep["calibration"] = {k: v for k, v in keep["calibration"].items() if k not in ("batch_size", "min_tokens_warn")}
    keep["gptq"] = {k: v for k, v in keep["gptq"].items() if k != "expert_chunk"}   # how many experts per solve call:
    # the same weights (tests/test_expert_chunk.py), so a run resumes under another chunk
    keep["version"] = STATE_VERSION
    parts = {"config": _digest(json.dumps(keep, sort_keys=True, default=str).encode())}
    model_dir = cfg.model.local_dir
    if model_dir is not None:
        parts["weights"] = _weights_signature(model_dir)
    tok = Path(cfg.model.tokenizer or cfg.model.path)
    if tok.is_dir():
        parts["tokenizer"] = _files_digest(sorted(p for p in tok.iterdir() if p.name in _TOKENIZER_FILES))
    data = Path(cfg.calibration.dataset)
    if data.is_file():                        # the data itself, not only its name
        parts["data"] = _files_digest([data])
    return parts


_TOKENIZER_FILES = {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                    "tokenizer.model", "added_tokens.json"}
_PART_WORDS = {"config": "the model, calibration, recipe, GPTQ or seed settings", "weights": "the model's weight files",
               "tokenizer": "the tokenizer files", "data": "the calibration data file", "version": "the state format"}


def _digest(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()[:16]


def _file_sha(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def _files_digest(paths) -> str:
    return _digest(json.dumps([(p.name, _file_sha(p)) for p in paths]).encode())


def _weights_signature(model_dir: Path) -> str:
    """Name, size, mtime and (for safetensors) the header of each weight file: ~1 ms per shard."""
    sig = []
    for p in sorted(model_dir.iterdir()):
        if not (p.suffix in (".safetensors", ".bin", ".pt", ".pth") or p.name.endswith(".index.json")
                or p.name == "config.json"):
            continue
        st = p.stat()
        entry = [p.name, st.st_size, st.st_mtime_ns]
        if p.suffix == ".safetensors":
            with p.open("rb") as f:
                head = f.read(8)
                n = int.from_bytes(head, "little") if len(head) == 8 else 0
                entry.append(_digest(f.read(min(n, 100 << 20))))
        sig.append(entry)
    return _digest(json.dumps(sig).encode())


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)


class ResumeWriteError(UserError):
    """The resume state could not be written (disk full, permission, a file in its place)."""


class ResumeState:
    """The resume directory of one run; `layers_done` is 0 for a fresh run."""

    def __init__(self, out_dir, fp: dict[str, str], *, writer: bool = True):
        self.dir = resume_dir(out_dir)
        self.fp, self.writer = fp, writer
        self.layers_done = 0
        self.checksums: list[dict[str, str]] = []      # per finished layer: file name -> sha256
        self._thread: threading.Thread | None = None     # the layer write in flight
        self._error: BaseException | None = None
        if (self.dir / "state.json").is_file():
            self._load_state()

    def _load_state(self) -> None:
        """Take the saved layers that match this run and whose files are intact; discard the rest,
        saying why in one line."""
        try:
            saved = json.loads((self.dir / "state.json").read_text())
            if not isinstance(saved, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as e:              # truncated, damaged, unreadable
            return self._discard(f"its state.json is damaged ({type(e).__name__})")
        if saved.get("version") != STATE_VERSION:
            return self._discard(f"it was written by another version of AlphaQuant (state format "
                                 f"{saved.get('version')!r}, this one reads {STATE_VERSION})")
        theirs = saved.get("fingerprint") if isinstance(saved.get("fingerprint"), dict) else {}
        changed = [k for k in sorted(set(self.fp) | set(theirs)) if self.fp.get(k) != theirs.get(k)]
        if changed:
            return self._discard(f"{' and '.join(_PART_WORDS.get(k, k) for k in changed)} changed since it was saved")
        checksums = saved.get("layers") if isinstance(saved.get("layers"), list) else []
        done = min(int(saved.get("layers_done", 0)), len(checksums))
        for i in range(done):
            bad = self._damaged(i, checksums[i])
            if bad:
                if self.writer:
                    print(f"note: resume state {self.dir}: layer {i}'s {bad}; "
                          f"{f'reusing layers 0-{i - 1} and ' if i else ''}solving from layer {i} on")
                done = i
                break
        self.layers_done, self.checksums = done, checksums[:done]

    def _damaged(self, i: int, sums) -> str | None:
        """What is wrong with layer i's saved files, or None when every file has its recorded sha256."""
        if not isinstance(sums, dict) or not sums:
            return "checksums are missing"
        for name, sha in sums.items():
            p = self.dir / name
            if not p.is_file():
                return f"file {name} is missing"
            if _file_sha(p) != sha:
                return f"file {name} is damaged (its sha256 differs from the one recorded when it was written)"
        return None

    def _discard(self, why: str) -> None:
        if self.writer:            # another model/data/recipe, or damaged: its layers are of no use here
            print(f"note: discarding the resume state {self.dir}: {why}; starting from layer 0")
            self.clear()

    # -- writing ---------------------------------------------------------------------------
    def save_layer(self, i: int, tensors: dict[str, torch.Tensor], records: dict) -> None:
        """After layer i: its solved linears' checkpoint tensors (LayerCompressor's, keyed
        `<module>.weight_packed` ...) and records; then state.json says i+1 done.

        Tensors are copied to the host here (`to_host`); the files are written by a background thread.
        Only one write is in flight: the previous one is finished (and its error, e.g. a full
        disk, raised) before a new one starts.
        """
        if not self.writer:
            return
        self.wait()
        from alphaquant.export.writer import to_host
        meta, record_tensors = _records_to_files(records)
        # one copy to the host for both: the records of one solve are views of that solve's params,
        # so this is a few transfers, not one per tensor (a MoE layer has ~600 record tensors)
        host = {k: v.contiguous() for k, v in to_host({**tensors, **record_tensors}).items()}
        self._thread = threading.Thread(target=self._write, args=(i, host, meta), daemon=True,
                                        name=f"resume-layer-{i}")
        self._thread.start()

    def _write(self, i: int, host: dict, meta: dict) -> None:
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            base = self.dir / f"layer_{i:05d}"
            st, js = base.with_suffix(".safetensors"), base.with_suffix(".json")
            _atomic_write(st, lambda p: save_file(host, str(p)))
            _atomic_write(js, lambda p: p.write_text(json.dumps({"records": meta})))
            # read back from the page cache: the checksum is of the bytes on disk, at no extra memory
            sums = {st.name: _file_sha(st), js.name: _file_sha(js)}
            checksums = self.checksums[:i] + [sums]
            _atomic_write(self.dir / "state.json", lambda p: p.write_text(json.dumps(
                {"fingerprint": self.fp, "layers_done": i + 1, "version": STATE_VERSION, "layers": checksums,
                 "saved_at": time.strftime("%Y-%m-%d %H:%M:%S")}, indent=2) + "\n"))
            self.layers_done, self.checksums = i + 1, checksums
        except OSError as e:
            self._error = ResumeWriteError(
                f"the resume state could not be written to {str(self.dir)!r} "
                f"({e.strerror or e}{f': {e.filename}' if e.filename else ''}); free some space or make that "
                f"directory writable, or set output.resume: false to run without one")
        except BaseException as e:   # noqa: BLE001 - handed to the main thread by wait()
            self._error = e

    def wait(self) -> None:
        """Block until the last save_layer is on disk; re-raise its error."""
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join()
        err, self._error = self._error, None
        if err is not None:
            raise err

    def clear(self) -> None:
        """Remove the state (the run completed, or cannot be resumed); a failed last write no longer matters."""
        from alphaquant.export.atomic import remove_tree
        if self._thread is not None:
            self._thread.join()
        self._thread, self._error = None, None
        if self.writer:
            remove_tree(self.dir)

    # -- reading ---------------------------------------------------------------------------
    def load_layer(self, i: int, specs: dict, dtype: torch.dtype):
        """(weights {full name: tensor in dtype}, records {full name: ModuleRecord}) of layer i."""
        from alphaquant.callbacks.solve import ModuleRecord
        from alphaquant.export import decompress_modules
        from alphaquant.formats.base import QParams

        base = self.dir / f"layer_{i:05d}"
        saved = json.loads(base.with_suffix(".json").read_text())["records"]
        everything = load_file(str(base.with_suffix(".safetensors")))
        tensors = {k: v for k, v in everything.items() if not k.startswith(RECORD)}
        for n, r in saved.items():          # quant.budget_bits chose this module's format in the saved run
            choice = r["extra"].get("budget_choice")
            if choice:
                from dataclasses import replace

                from alphaquant.config.recipe import BUDGET_RULE
                specs[n] = replace(specs[n], wq=choice["wq"], group_size=choice["group_size"], rule=BUDGET_RULE)
        weights = decompress_modules(tensors, {n: specs[n] for n in saved}, dtype)
        records = {}
        for n, r in saved.items():
            get = lambda f, n=n: everything.get(f"{RECORD}{n}/{f}")  # noqa: E731
            extra = {k: get("extra." + k) if f"{RECORD}{n}/extra.{k}" in everything else r["params_extra_values"][k]
                     for k in r["params_extra"]}
            records[n] = ModuleRecord(name=n, spec=specs[n], params=QParams(get("scale"), get("zero"), extra),
                                      g_idx=get("g_idx"), tokens=r["tokens"], weight_sum=r["weight_sum"],
                                      loss=r["loss"], rel_error=r["rel_error"], fallback=r["fallback"],
                                      extra=r["extra"])
        return weights, records


def _records_to_files(records: dict) -> tuple[dict, dict]:
    """(JSON-able {name: a record's numbers}, {"record/<name>/<field>": its tensor, where it is})."""
    meta, tensors = {}, {}
    for n, r in records.items():
        fields = {"scale": r.params.scale, "zero": r.params.zero, "g_idx": r.g_idx,
                  **{"extra." + k: v for k, v in r.params.extra.items()}}
        tensors.update({f"{RECORD}{n}/{f}": t.detach() for f, t in fields.items() if torch.is_tensor(t)})
        meta[n] = {"tokens": int(r.tokens), "weight_sum": float(r.weight_sum), "loss": float(r.loss),
                   "rel_error": float(r.rel_error), "fallback": r.fallback, "extra": dict(r.extra),
                   "params_extra": list(r.params.extra),
                   "params_extra_values": {k: v for k, v in r.params.extra.items() if not torch.is_tensor(v)}}
    return meta, tensors
