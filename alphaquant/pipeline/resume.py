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

STATE_VERSION = 3          # 2: compressed tensors instead of dequantized weights; 3: records as JSON + safetensors
RECORD = "record/"         # key prefix of the records' tensors in a layer's safetensors file


def resume_dir(out_dir: Path) -> Path:
    out_dir = Path(out_dir)
    return out_dir.parent / f".{out_dir.name}.resume"


def fingerprint(cfg) -> str:
    """Hash of everything that decides the quantized weights (not eval, logging, output, trainer)."""
    d = cfg.to_dict()
    keep = {k: d[k] for k in ("model", "calibration", "quant", "gptq", "seed")}
    keep["calibration"] = {k: v for k, v in keep["calibration"].items() if k not in ("batch_size", "min_tokens_warn")}
    keep["version"] = STATE_VERSION
    model_dir = cfg.model.local_dir
    if model_dir is not None and (model_dir / "config.json").is_file():
        keep["model_config"] = (model_dir / "config.json").read_text()
    data = Path(cfg.calibration.dataset)
    if data.is_file():                        # the data itself, not only its name
        h = hashlib.sha256()
        with data.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                h.update(chunk)
        keep["data"] = h.hexdigest()
    return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)


class ResumeState:
    """The resume directory of one run; `layers_done` is 0 for a fresh run."""

    def __init__(self, out_dir, fp: str, *, writer: bool = True):
        self.dir = resume_dir(out_dir)
        self.fp, self.writer = fp, writer
        self.layers_done = 0
        self._thread: threading.Thread | None = None     # the layer write in flight
        self._error: BaseException | None = None
        state = self.dir / "state.json"
        if state.is_file():
            saved = json.loads(state.read_text())
            if saved.get("fingerprint") == fp:
                self.layers_done = int(saved["layers_done"])
            elif writer:                      # another model/data/recipe: its layers are of no use here
                print(f"note: discarding {self.dir}: it was saved by a run with a different model, data, "
                      f"recipe or GPTQ options")
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
            _atomic_write(base.with_suffix(".safetensors"), lambda p: save_file(host, str(p)))
            _atomic_write(base.with_suffix(".json"), lambda p: p.write_text(json.dumps({"records": meta})))
            _atomic_write(self.dir / "state.json", lambda p: p.write_text(json.dumps(
                {"fingerprint": self.fp, "layers_done": i + 1, "version": STATE_VERSION,
                 "saved_at": time.strftime("%Y-%m-%d %H:%M:%S")}, indent=2) + "\n"))
            self.layers_done = i + 1
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
        import shutil
        if self._thread is not None:
            self._thread.join()
        self._thread, self._error = None, None
        if self.writer:
            shutil.rmtree(self.dir, ignore_errors=True)

    # -- reading ---------------------------------------------------------------------------
    def load_layer(self, i: int, specs: dict, dtype: torch.dtype):
        """(weights {full name: tensor in dtype}, records {full name: ModuleRecord}) of layer i."""
        from callbacks.solve import ModuleRecord
        from alphaquant.export import decompress_modules
        from alphaquant.formats.base import QParams

        base = self.dir / f"layer_{i:05d}"
        saved = json.loads(base.with_suffix(".json").read_text())["records"]
        everything = load_file(str(base.with_suffix(".safetensors")))
        tensors = {k: v for k, v in everything.items() if not k.startswith(RECORD)}
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
