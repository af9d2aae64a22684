"""Writing a servable quantized checkpoint layer by layer (compressed-tensors layout).

    with AtomicDir(out, overwrite) as tmp:                   # atomicity is the caller's
        w = QuantizedCheckpointWriter(tmp, model, specs, records, source_dir=src)
        for i, layer in ...:                                 # after layer i is quantized
            w.write_layer(i, layer)
        w.finish(extra_files={"alphaquant_recipe.json": recipe, "alphaquant_summary.json": summary})

Only one layer's tensors (plus the current shard) are in memory at a time. Quantized linears
become compressed tensors (compressed.py) under their checkpoint names, e.g.
`model.layers.0.mlp.experts.3.up_proj.weight_packed`; everything else is written as is in
the model dtype. `records[name]` must exist by the time layer i is written (the dict may be
filled after construction: the writer looks names up lazily).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from torch import nn

from alphaquant.models import ShardWriter

from .compressed import Layout, can_stack, compress, compress_stack, is_trivial_g_idx, layout_of
from .qconfig import quantization_config

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "tokenizer.model", "added_tokens.json", "chat_template.jinja",
                   "generation_config.json")


def _model_dtype(model) -> torch.dtype:
    return model.model.embed_tokens.weight.dtype


class LayerCompressor:
    """A solved decoder layer as checkpoint tensors: quantized linears compressed (compressed.py),
    everything else as is in the model dtype. Works where the layer is (the accelerator during a
    run: encoding and packing every expert on the host dominated the write)."""

    stores_quantized = True

    def __init__(self, specs: dict, records: dict, dtype: torch.dtype):
        self.specs, self.records, self.dtype = specs, records, dtype
        self.act_order: set[str] = set()          # modules stored with a weight_g_idx
        self._formats: dict = {}                  # spec -> Format, built once per distinct spec

    @torch.no_grad()
    def layer_tensors(self, i: int, layer: nn.Module) -> dict[str, torch.Tensor]:
        """{checkpoint key: tensor on the layer's device} for every tensor of decoder layer i.

        Linears of one spec and shape (a layer's experts) are compressed as stacks, so tensors of
        different linears may be views of one stacked tensor: copy them out with `to_host`."""
        prefix = f"model.layers.{i}."
        out: dict[str, torch.Tensor] = {}
        done: set[str] = set()
        stacks: dict[tuple, list] = {}
        for mod_name, mod in layer.named_modules():
            full = prefix + mod_name
            if isinstance(mod, nn.Linear) and self._is_quantized(full):
                act, layout = self._layout(full)
                fmt = self._format(self.specs[full])
                if act or not can_stack(fmt, layout, tuple(mod.weight.shape)):
                    for key, t in self._linear_tensors(full, mod, act, layout).items():
                        out[f"{full}.{key}"] = t
                else:
                    key = (self.specs[full], tuple(mod.weight.shape), mod.weight.dtype, layout.key())
                    stacks.setdefault(key, []).append((full, mod))
                done.update(f"{mod_name}.{p}" for p, _ in mod.named_parameters(recurse=False))
        for members in stacks.values():
            out.update(self._stacked_tensors(members))
        for name, p in layer.named_parameters():
            if name not in done:
                if p.is_meta:
                    raise ValueError(f"{prefix}{name} is on the meta device: write_layer needs layer {i} loaded")
                out[prefix + name] = p.detach().to(_stored_dtype(p, self.dtype))
        return out

    def _layout(self, name: str) -> tuple[bool, Layout]:
        rec = self._record(name)
        act = rec.g_idx is not None and not is_trivial_g_idx(rec.g_idx)
        if act:
            self.act_order.add(name)
        return act, layout_of(self.specs[name], act_order=act)

    def _record(self, name: str):
        rec = self.records.get(name)
        if rec is None:
            raise KeyError(f"{name} is quantized by the recipe but has no ModuleRecord; "
                           f"write_layer must run after the layer's GPTQ solve")
        return rec

    def _stacked_tensors(self, members: list) -> dict[str, torch.Tensor]:
        """compress_stack over chunks of `members` (linears of one spec and shape); rows are views."""
        name0, mod0 = members[0]
        spec = self.specs[name0]
        fmt = self._format(spec)
        layout = layout_of(spec)
        R, C = mod0.weight.shape
        # bounded temporaries: packing widths that do not divide 8 expands codes into bits
        per_chunk = max(1, (STACK_CODES if 8 % fmt.bits == 0 else STACK_CODES // 4) // (R * C))
        dev = mod0.weight.device
        out: dict[str, torch.Tensor] = {}
        for c0 in range(0, len(members), per_chunk):
            chunk = members[c0:c0 + per_chunk]
            W = torch.stack([m.weight.detach() for _, m in chunk])
            params = _stack_params([_params_to(self._record(n).params, dev) for n, _ in chunk])
            stacked = compress_stack(W, params, fmt, layout)
            for j, (full, mod) in enumerate(chunk):
                for key, t in stacked.items():
                    out[f"{full}.{key}"] = t[j]
                if mod.bias is not None:
                    out[f"{full}.bias"] = mod.bias.detach().to(self.dtype)
        return out

    def _is_quantized(self, name: str) -> bool:
        spec = self.specs.get(name)
        return spec is not None and spec.quantized

    def _format(self, spec):
        if spec not in self._formats:
            from alphaquant.config.recipe import build_format
            self._formats[spec] = build_format(spec)
        return self._formats[spec]

    def _linear_tensors(self, name: str, lin: nn.Linear, act: bool, layout: Layout) -> dict[str, torch.Tensor]:
        """compress() of one linear; act, layout: `_layout(name)`."""
        rec = self._record(name)
        dev = lin.weight.device
        g_idx = rec.g_idx.detach().to(dev) if act else None
        out = compress(lin.weight.detach(), _params_to(rec.params, dev), self._format(self.specs[name]), layout, g_idx)
        if lin.bias is not None:                      # biases stay dense, as compressed-tensors keeps them
            out["bias"] = lin.bias.detach().to(self.dtype)
        return out


def _stored_dtype(p: torch.Tensor, dtype: torch.dtype) -> torch.dtype:
    """A kept tensor is stored in the model dtype, unless the model holds it wider on purpose (transformers'
    `_keep_in_fp32_modules`, e.g. DeepSeek-V3's router weight and e_score_correction_bias in a bf16 model)."""
    if p.dtype.is_floating_point and p.dtype.itemsize > dtype.itemsize:
        return p.dtype
    return dtype


class QuantizedCheckpointWriter(LayerCompressor):
    """Streams a quantized model into `out_dir` (an existing, empty directory).

    Shards of at most 1 GB: a full shard is written out by a thread of its own while the walk goes on (the
    pipeline adds layers from its background write thread, which then goes on with the next layer), so
    only the last one waits at the end. A failed run calls `abandon` before removing the directory. With 5 GB
    shards a quantized OLMoE-1B-7B (3.7 GB) was one shard, all of it written after the last layer.
    """

    def __init__(self, out_dir, model, specs: dict, records: dict, *, max_shard_size="1GB", source_dir=None):
        super().__init__(specs, records, _model_dtype(model))
        self.out = Path(out_dir)
        self.model = model
        self.source_dir = Path(source_dir) if source_dir is not None else None
        self.layers_written: set[int] = set()
        self.shards = ShardWriter(self.out, max_shard_size, background=True)
        self._non_layer_added = self._tensors_done = False
        # listed here, on the caller's thread: add_non_layer may run on the pipeline's write thread while
        # the walker installs and frees decoder layers, so it must not walk the model's parameters then
        tied = model.config.tie_word_embeddings
        self._non_layer_keys = [k for k, _ in model.named_parameters(remove_duplicate=False)
                                if not k.startswith("model.layers.") and not (tied and k == "lm_head.weight")]
        # GPT-OSS, whose experts transformers only loads fused (gpt_oss_mxfp4.py): with its own recipe (experts
        # mxfp4/32, nothing else quantized) its native MXFP4 layout, dequantized its fused dense layout;
        # layer_tensors stays per expert (the resume state's form), add_layer fuses
        from .gpt_oss_mxfp4 import GptOssFusedDense, GptOssMxfp4
        self.native = (GptOssMxfp4.for_model(model, specs) if self.stores_quantized
                       else GptOssFusedDense.for_model(model))

    # --- per layer -------------------------------------------------------------------------
    def write_layer(self, i: int, layer: nn.Module) -> None:
        """Every tensor of decoder layer i, quantized linears compressed."""
        self.add_layer(i, to_host(self.layer_tensors(i, layer)))

    def add_layer(self, i: int, tensors: dict[str, torch.Tensor]) -> None:
        """Layer i's `layer_tensors`, already in host memory, into the shards."""
        if self.native is not None:
            tensors = self.native.fuse_layer(i, tensors)
        for key, t in tensors.items():
            self.shards.add(key, t)
        self.layers_written.add(i)
        if self.shards.shards_started and len(self.layers_written) == len(self.model.model.layers) - 1:
            # one layer to go in a checkpoint that is sharded anyway: what is held goes out now, beside the last
            # layer's passes, so the end of the run writes a shard of that layer alone (~0.2 GB for
            # OLMoE-1B-7B int4 instead of up to 1 GB)
            self.shards.roll()

    # --- the end ---------------------------------------------------------------------------
    @torch.no_grad()
    def add_non_layer(self) -> None:
        """Embedding, final norm and LM head into the shards (none of them is quantized). The pipeline
        calls this from its background write thread before the first layer, so they go out with an early
        shard instead of adding to the last one, which is written after the last layer."""
        if self._non_layer_added:
            return
        for key in self._non_layer_keys:
            p = self.model.get_parameter(key)
            t = self.model.checkpoint.read(key) if p.is_meta else p.detach()
            self.shards.add(key, t.to(self.dtype))
        self._non_layer_added = True

    def finish_tensors(self) -> None:
        """Every tensor on disk: the non-layer ones (unless added already) and the last shard."""
        if self._tensors_done:
            return
        n = len(self.model.model.layers)
        missing = sorted(set(range(n)) - self.layers_written)
        if missing:
            raise ValueError(f"finish() before every layer was written; missing layers {missing}")
        self.add_non_layer()
        self.shards.close()
        self._tensors_done = True

    def abandon(self) -> None:
        """A failed run: the shard being written in the background finishes (its error ignored) before the
        caller removes the output directory, so nothing is written into it afterwards."""
        self.shards.abandon()

    def finish(self, extra_files: dict[str, dict] | None = None) -> None:
        """The remaining tensors (`finish_tensors`), config.json, index, tokenizer files, extra JSON files."""
        self.finish_tensors()
        self._write_json("config.json", self.config_dict())
        self._copy_tokenizer()
        for fname, data in (extra_files or {}).items():
            self._write_json(fname, data)

    def config_dict(self) -> dict:
        config = self.model.config.to_hf()
        config.pop("torch_dtype", None)
        config["dtype"] = str(self.dtype).removeprefix("torch.")
        config["quantization_config"] = (self.native.quantization_config() if self.native is not None
                                         else quantization_config(self.specs, sorted(self.act_order)))
        return config

    def _write_json(self, fname: str, data) -> None:
        (self.out / fname).write_text(json.dumps(data, indent=2, default=str) + "\n")

    def _copy_tokenizer(self) -> None:
        if self.source_dir is None:
            return
        for fname in TOKENIZER_FILES:
            src = self.source_dir / fname
            if src.is_file():
                shutil.copyfile(src, self.out / fname)


class DequantizedCheckpointWriter(QuantizedCheckpointWriter):
    """Same interface; writes the dequantized weights as a plain checkpoint (any loader reads it)."""

    stores_quantized = False

    def _is_quantized(self, name: str) -> bool:
        return False

    def config_dict(self) -> dict:
        config = super().config_dict()
        config.pop("quantization_config")
        return config


STACK_CODES = 1 << 26
"""Codes compressed in one stack (64M: 32 OLMoE experts' gate or up; a few hundred MB of temporaries)."""


STAGING_BYTES = 32 << 20
"""Bytes of each of to_host's two page-locked staging buffers (a larger source gets buffers of its size): one
32-expert stack of OLMoE-1B-7B's int4 codes."""


def to_host(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Host copies, each with its own storage (safetensors refuses shared ones), in few transfers.

    Tensors that are views of one device tensor (rows of a compressed stack) are copied over
    as that one storage, then split on the host: one transfer per stack instead of one per
    tensor (a MoE layer has ~800 of them). A storage is copied whole only when the views cover
    most of it; anything else is copied on its own.

    A CUDA transfer goes through page-locked staging (`host_transfers`), and the copies handed back are ordinary
    memory. `.cpu()` into pageable memory took the driver's copy path that blocks other threads' CUDA calls: on
    the write thread it stalled the walker's kernel launches and host reads for ~100 ms per MoE layer; a
    page-locked copy of the whole layer instead page-locked ~200 MB of new memory while the walk computed its
    second layer (0.16 s of that layer on an H200 host, bench/results/threads_h200_s13.txt)."""
    out: dict[str, torch.Tensor] = {}
    on_device: dict[torch.device, dict[str, torch.Tensor]] = {}
    for k, t in tensors.items():
        if t.device.type == "cpu":
            out[k] = t if t.untyped_storage().nbytes() == _nbytes(t) else t.clone()
        else:
            on_device.setdefault(t.device, {})[k] = t
    for device, group in on_device.items():
        out.update(host_transfers(transfer_plan(group), pinned=device.type == "cuda"))
    seen: set[int] = set()
    for k in tensors:                    # one tensor under two keys (stacked linears share a g_idx)
        h = out[k]
        if h.untyped_storage().data_ptr() in seen:
            out[k] = h = h.clone()
        seen.add(h.untyped_storage().data_ptr())
    return {k: out[k] for k in tensors}


def transfer_plan(tensors: dict[str, torch.Tensor]) -> list[tuple[torch.Tensor, list[tuple[str, torch.Tensor]]]]:
    """[(source, [(key, tensor), ...])]: what to copy over and the tensors each copy serves. A source is a
    whole storage as flat bytes when its views cover at least half of it (each tensor is then read out of the
    copy at its own offset), else one tensor."""
    used: dict[int, int] = {}
    for t in tensors.values():
        key = t.untyped_storage().data_ptr()
        used[key] = used.get(key, 0) + _nbytes(t)
    plan, whole = [], {}
    for k, t in tensors.items():
        st = t.untyped_storage()
        if st.nbytes() == _nbytes(t) or 2 * used[st.data_ptr()] < st.nbytes():
            plan.append((t, [(k, t)]))
        elif st.data_ptr() in whole:
            whole[st.data_ptr()][1].append((k, t))
        else:
            whole[st.data_ptr()] = (torch.empty(0, dtype=torch.uint8, device=t.device).set_(st), [(k, t)])
            plan.append(whole[st.data_ptr()])
    return plan


def host_transfers(plan, pinned: bool, staging_bytes: int = STAGING_BYTES) -> dict[str, torch.Tensor]:
    """{key: host copy in storage of its own} for a `transfer_plan` of one device's tensors.

    Sources are packed into batches that fit a staging buffer; two buffers alternate, so one batch's copies run
    on the current stream while the previous batch is read out of its buffer (one wait per batch). Pinned: the
    buffers are page-locked and the copies asynchronous (CUDA); torch's pinned-memory cache keeps the buffers
    from one call to the next, so page-locking them is paid once per process (`warm_host_staging`)."""
    aligned = lambda n: -(-n // 64) * 64           # noqa: E731 - any dtype's view may start at a batch offset
    capacity = max([staging_bytes] + [aligned(_nbytes(src)) for src, _ in plan])
    batches, batch, used = [], [], 0
    for src, users in plan:
        n = aligned(_nbytes(src))
        if batch and used + n > capacity:
            batches.append(batch)
            batch, used = [], 0
        batch.append((src, users, used))
        used += n
    if batch:
        batches.append(batch)
    out: dict[str, torch.Tensor] = {}
    buffers: list[torch.Tensor] = []
    pending = None
    for b, batch in enumerate(batches):
        if len(buffers) < 2:
            buffers.append(torch.empty(capacity, dtype=torch.uint8, pin_memory=pinned))
        buf = buffers[b % 2]          # its last batch (b - 2) was read out when batch b - 1 was queued
        for src, _users, offset in batch:
            _slot(buf, offset, src).copy_(src, non_blocking=pinned)
        done = None
        if pinned:
            done = torch.cuda.Event()
            done.record()
        if pending is not None:
            _read_out(*pending, out)
        pending = (batch, buf, done)
    if pending is not None:
        _read_out(*pending, out)
    return out


def _read_out(batch, buf, done, out) -> None:
    if done is not None:
        done.synchronize()
    for src, users, offset in batch:
        for k, t in users:
            if t is src:                              # a tensor copied on its own, contiguously
                out[k] = _slot(buf, offset, t).clone()
            else:                                     # a view of a storage copied whole, as flat bytes: t's own
                start = offset // t.element_size() + t.storage_offset()    # offset and strides in the copy
                out[k] = torch.empty(0, dtype=t.dtype).set_(buf.untyped_storage(), start, t.shape, t.stride()).clone()


def _slot(buf: torch.Tensor, offset: int, t: torch.Tensor) -> torch.Tensor:
    """The contiguous place of t's values in staging buffer buf at byte `offset` (a multiple of 64)."""
    return buf[offset:offset + _nbytes(t)].view(t.dtype).view(t.shape)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def warm_host_staging() -> None:
    """Page-lock to_host's two staging buffers of the usual size now and leave them in torch's pinned-memory
    cache (a CUDA run, while the main thread waits for the GPU warm-up): the first layer write then reuses
    them instead of page-locking memory while the walk runs."""
    try:
        buffers = [torch.empty(STAGING_BYTES, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
        del buffers
    except RuntimeError:     # no page-locked memory to be had: the layer write meets it and reports it there
        pass


def _stack_params(ps: list):
    """Per-linear QParams -> one QParams with a leading stack dim on every tensor."""
    from alphaquant.formats.base import QParams
    p0 = ps[0]
    stack = lambda get: torch.stack([get(p) for p in ps])  # noqa: E731
    extra = {k: stack(lambda p, k=k: p.extra[k]) if torch.is_tensor(v) else v for k, v in p0.extra.items()}
    return QParams(stack(lambda p: p.scale), None if p0.zero is None else stack(lambda p: p.zero), extra)


def _params_to(p, device):
    from alphaquant.formats.base import QParams
    to = lambda t: None if t is None else t.detach().to(device)  # noqa: E731
    return QParams(to(p.scale), to(p.zero), {k: to(v) if torch.is_tensor(v) else v for k, v in p.extra.items()})


__all__ = ["LayerCompressor", "QuantizedCheckpointWriter", "DequantizedCheckpointWriter", "TOKENIZER_FILES", "to_host",
           "warm_host_staging"]
