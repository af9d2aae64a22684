"""Writing each finished decoder layer (checkpoint shards, resume state) behind the next one's work.

Compressing a layer's experts (encode, verify, pack; in stacks of experts), copying the result
to the host and handing it to the shard writer and the resume state takes as long as a
sizeable part of the layer's compute. None of it feeds the next
layer, so it runs on one background thread, on its own CUDA stream, while the walker goes on
with layer i+1. The finished layer stays loaded (its weights are what is being compressed)
until its write is done; the walker frees it through `release` then. At most one layer is in
flight: submitting layer i+1 first waits for layer i (and raises its error, e.g. a full disk).
"""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

import torch

from alphaquant.export.writer import to_host


class LayerSink:
    def __init__(self, writer, resume, compressor, device: torch.device):
        self.writer = writer              # QuantizedCheckpointWriter / Dequantized... or None
        self.resume = resume              # ResumeState (writing rank) or None
        self.compressor = compressor      # LayerCompressor for the resume state (the writer when it compresses)
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="layer-write")
        self._inflight: tuple[Future, Callable[[], None]] | None = None

    def submit(self, i: int, layer, records: dict, save_resume: bool, release: Callable[[], None]) -> None:
        """Write layer i (records: its solved linears') in the background; `release()` (free the layer)
        runs once that is done."""
        self.wait()
        save_resume = save_resume and self.resume is not None
        if self.writer is None and not save_resume:
            release()
            return
        ready = None
        if self.stream is not None:       # the write stream starts after the layer's last kernel
            ready = torch.cuda.Event()
            ready.record()
        future = self._pool.submit(self._write, i, layer, records, save_resume, ready)
        self._inflight = (future, release)

    def run(self, task: Callable[[], None]) -> None:
        """Run `task` (host-side writer work) on the write thread, in turn with the layers."""
        self.wait()
        self._inflight = (self._pool.submit(task), lambda: None)

    def wait(self) -> None:
        """Finish the write in flight, free its layer, re-raise its error."""
        if self._inflight is None:
            return
        future, release = self._inflight
        self._inflight = None
        try:
            future.result()
        finally:
            release()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._pool.shutdown(wait=True)

    # -- on the write thread -------------------------------------------------------------
    @torch.no_grad()
    def _write(self, i, layer, records, save_resume, ready) -> None:
        if self.stream is None:
            self._write_on_current_stream(i, layer, records, save_resume)
            return
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(ready)
            self._write_on_current_stream(i, layer, records, save_resume)

    def _write_on_current_stream(self, i, layer, records, save_resume) -> None:
        quantized = None
        if self.writer is not None:
            host = to_host(self.writer.layer_tensors(i, layer))
            self.writer.add_layer(i, host)
            if self.writer is self.compressor:       # the checkpoint's tensors are the resume state's
                quantized = host
        if save_resume:
            if quantized is None:
                quantized = to_host(self.compressor.layer_tensors(i, layer))
            solved = {k: t for k, t in quantized.items() if k.rpartition(".")[0] in records}
            self.resume.save_layer(i, solved, records)

