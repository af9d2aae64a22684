"""The layer walk: for each decoder layer, collect -> solve -> propagate, as predict passes.

    for layer i:
        install its weights (read from the checkpoint by the prefetch thread during layer i-1)
        propagate the fp evaluation stream through the original layer      (ppl before)
        [propagate the RTN stream through a round-to-nearest copy]         (ppl RTN)
        for each true-sequential group: collect Hessians, solve (callbacks)
        [gptq.asymmetric: each collect pass also runs an unquantized copy of the layer on the fp
         model's own layer inputs (stream "calib_fp"), which is then propagated through that copy]
        propagate the calibration stream through the quantized layer       (inputs of i+1)
        propagate the quantized evaluation stream                          (ppl after)
        hand the layer to the sink (compressed and written in the background during layer i+1,
        then freed)
    head passes turn each evaluation stream into a perplexity.

Every pass is one `trainer.predict` over the sample indices of one stream; the runner
holds only the block of the moment, so only that block moves to the accelerator.
"""
from __future__ import annotations

import copy
import dataclasses
import resource
import time
from dataclasses import dataclass, field

import torch

from alphaquant.export.writer import LayerCompressor
from alphaquant.pipeline.activations import activation_hooks
from alphaquant.pipeline.attention_reuse import ACT as CACHE_ACT, CORE as CACHE_CORE, H as CACHE_H, PassReuse, \
    plan as reuse_plan, start_from as reuse_start
from alphaquant.pipeline.layer_sink import LayerSink
from alphaquant.pipeline.prefetch import LayerPrefetcher
from alphaquant.pipeline.runner import LayerRunner, PassPlan
from alphaquant.config.recipe import build_format
from alphaquant.pipeline.stores import BatchStore, SampleStore


ACT_MAX_SHARE = 0.25
"""The down-input cache of attention reuse is kept only when it needs at most this share of the GPU's memory."""


@dataclass
class WalkOptions:
    true_sequential: bool = True
    evaluate: bool = True           # perplexity of the quantized model
    eval_before: bool = True        # ... and of the original model
    eval_rtn: bool = False          # ... and of round-to-nearest with the same recipe
    cache_device: str | None = None  # where layer inputs are kept (None: the accelerator; "cpu": pinned host
                                     # memory, one batch at a time on the accelerator: calibration.cache_device)
    # gptq.asymmetric (GPTAQ): a second calibration cache "calib_fp", the fp model's layer inputs (twice the
    # calibration cache memory), and per layer an unquantized copy of it on the accelerator (one layer more)
    asymmetric: bool = False
    # calibration.reuse_attention: later passes of a layer start from its attention half's cached output
    # (pipeline/attention_reuse.py; one calibration cache more)
    reuse_attention: bool = True


@dataclass
class LayerStats:
    index: int
    seconds: float
    phases: dict = field(default_factory=dict)     # pass kind -> seconds
    passes: dict = field(default_factory=dict)     # "phase:stream[:gN]" -> seconds of each pass (diagnostics)
    restored: bool = False                          # solved weights came from the resume state


class LayerWalker:
    def __init__(self, trainer, model, adapter, specs, datamodule, *, collector, solver, perplexity,
                 opts: WalkOptions, writer=None, on_layer_end=None, progress=None, resume=None, prefetch=None):
        self.trainer, self.model, self.adapter, self.specs = trainer, model, adapter, specs
        self.dm, self.collector, self.solver, self.ppl = datamodule, collector, solver, perplexity
        self.opts, self.writer, self.on_layer_end, self.progress = opts, writer, on_layer_end, progress
        self.resume = resume            # ResumeState: layers below resume.layers_done are replayed
        self.runner = LayerRunner(layer_kwargs=self.adapter.layer_kwargs_fn(model))
        self.layer_stats: list[LayerStats] = []
        self._held: set[str] = set()      # attention reuse: the caches complete for the layer of the moment
        self._early = prefetch            # a LayerPrefetcher started before the walk (closed by run)

    # -- passes -------------------------------------------------------------------------------
    def _predict(self, block, phase, stream, stats=None, **plan):
        t0 = time.perf_counter()
        self.dm.stream = "calib" if stream in ("calib", "calib_fp") else "eval"   # the same batches
        self.runner.set_block(block, PassPlan(phase, stream, **plan))
        try:
            self.trainer.predict(self.runner, datamodule=self.dm, return_predictions=False)
        finally:
            self.runner.end_pass()
        if stats is not None:
            if self.device.type == "cuda":    # the pass's kernels count in its own phase (not the
                torch.cuda.current_stream().synchronize()    # background write's: another stream)
            key = phase if phase != "collect" else "collect+solve"
            dt = time.perf_counter() - t0
            stats.phases[key] = stats.phases.get(key, 0.0) + dt
            name = f"{phase}:{stream}" + (f":g{plan['group_index']}" if "group_index" in plan else "")
            stats.passes[name] = stats.passes.get(name, 0.0) + dt

    def _streams(self):
        names = ["calib"]
        if self.opts.evaluate:
            names += ["eval_q"] + (["eval_fp"] if self.opts.eval_before else []) + (
                ["eval_rtn"] if self.opts.eval_rtn else [])
        return names

    def _groups(self, index, layer):
        """True-sequential groups of the layer, without skipped and identity-format linears."""
        prefix = self.adapter.layer_prefix(index)
        groups = [[n for n in g if self.specs[prefix + n].quantized] for g in self.adapter.sequential_groups(layer)]
        if not self.opts.true_sequential:
            groups = [[n for g in groups for n in g]]
        return [g for g in groups if g]

    # -- the walk -------------------------------------------------------------------------------
    def run(self):
        embed = self.adapter.embed_fn(self.model)
        device_embed = self._embed_on_device(embed)
        for s in self._streams():
            windows = self.dm.windows["calib" if s == "calib" else "eval"]
            self.runner.stores[s] = SampleStore(windows, device_embed, self.opts.cache_device)
        if self.opts.asymmetric:       # not one of _streams: no head pass, no perplexity
            self.runner.stores["calib_fp"] = SampleStore(self.dm.windows["calib"], device_embed, self.opts.cache_device)
        n = self.adapter.num_layers(self.model)
        done = self.resume.layers_done if self.resume is not None else 0
        self.prefetch = LayerPrefetcher.for_walk(self.adapter, self.model, self.device,
                                                 cache_on_host=self.opts.cache_device == "cpu")
        if self._early is not None:      # started before the walk: taken over when it reads what the walk would
            if self._early.matches(self.prefetch):
                self.prefetch.close()
                self.prefetch = self._early
            else:
                self._early.close()
            self._early = None
        resume_writer = self.resume if self.resume is not None and self.resume.writer else None
        compresses = self.writer is not None and self.writer.stores_quantized
        compressor = self.writer if compresses else LayerCompressor(self.specs, self.solver.records, embed.weight.dtype)
        self.sink = LayerSink(self.writer, resume_writer, compressor, self.device)
        if self.writer is not None:       # embedding and head go into an early shard, during layer 0
            self.sink.run(self.writer.add_non_layer)
        try:
            for i in range(n):
                self._layer(i, last=(i == n - 1), replay=i < done)
                if i == 0:         # every stream now holds hidden states: the device copy is not needed again
                    for store in self.runner.stores.values():
                        store.embed = embed
                    del device_embed
        finally:
            self.prefetch.close()
            self.sink.close()
        if self.opts.evaluate:
            head = self.adapter.head_module(self.model).to(self.device)
            for s in self._streams()[1:]:
                self._predict(head, "head", s)
            head.to("cpu")
        return self.ppl.results

    def _embed_on_device(self, embed):
        """The first layer's inputs are embedded where it runs (a CPU embedding would send every
        batch's hidden states over PCIe once per pass of layer 0)."""
        weight = next(embed.parameters(), None)
        if weight is None or weight.device == self.device:
            return embed
        on_device = copy.deepcopy(embed).to(self.device)
        return lambda ids: on_device(ids.to(self.device, non_blocking=True))

    @property
    def device(self) -> torch.device:
        """This rank's accelerator (the runner is not registered with weights, so blocks are placed here)."""
        return self.trainer.strategy.root_device

    def _layer(self, i, last, replay=False):
        """Quantize layer i; with `replay`, take its solved weights from the resume state instead."""
        stats = LayerStats(i, 0.0)
        t0 = time.perf_counter()
        layer = self.adapter.install_layer(self.model, i, self.prefetch.take(i), self.device)  # stays there
        self.prefetch.request(i + 1)          # the next layer is read from disk while this one computes
        stats.phases["load"] = time.perf_counter() - t0
        if self.opts.evaluate and self.opts.eval_before:
            self._predict(layer, "propagate", "eval_fp", stats)
        fp_copy = None          # gptq.asymmetric: the unquantized layer (before any activation hook)
        if self.opts.asymmetric and replay:
            if not last:
                self._predict(layer, "propagate", "calib_fp", stats)
        elif self.opts.asymmetric:
            fp_copy = copy.deepcopy(layer)
        fp = {"fp_block": fp_copy, "fp_stream": "calib_fp"} if fp_copy is not None else {}
        aq_handles = activation_hooks(layer, self.adapter.layer_prefix(i), self.specs)
        if self.opts.evaluate and self.opts.eval_rtn:
            self._predict(self._rtn_copy(i, layer), "propagate", "eval_rtn", stats)
        if replay:
            self._restore(i, layer)
            stats.restored = True
        else:
            groups = self._groups(i, layer)
            points = self._reuse_points(layer, last)
            for g, group in enumerate(groups):
                reuse = PassReuse()
                if points is not None:
                    reuse = reuse_plan(points, {n for grp in groups[g:] for n in grp}, self._held)
                    for cache, _module in reuse.capture:
                        self.runner.stores[cache] = BatchStore() if cache == CACHE_ACT else SampleStore(
                            self.dm.windows["calib"], _cache_miss, self.opts.cache_device)
                self._predict(layer, "collect", "calib", stats, layer_index=i, group_index=g, group=group,
                              reuse=reuse, **fp)
                self._keep_complete(reuse)
                if self.progress:
                    self.progress(i, g)
            for key, cb in (("hessian", self.collector), ("solve", self.solver)):   # parts of collect+solve
                stats.phases[key] = getattr(cb, "layer_seconds", {}).pop(i, 0.0)
        if fp_copy is not None:
            if not last:
                self._predict(fp_copy, "propagate", "calib_fp", stats)
            del fp, fp_copy
        if not last:
            self._predict(layer, "propagate", "calib", stats, reuse=PassReuse(reuse_start(self._held)))
        self._drop_caches()
        if self.opts.evaluate:
            self._predict(layer, "propagate", "eval_q", stats)
        self.runner.block = None
        for h in aq_handles:
            h.remove()
        t1 = time.perf_counter()
        prefix = self.adapter.layer_prefix(i)
        records = {n: r for n, r in self.solver.records.items() if n.startswith(prefix)}
        # the last layer's resume state would be written only to be removed with the rest once the checkpoint is
        # complete (0.3-0.4 s of disk writes beside the last shard and the plots); a run stopped after it resumes
        # the layers before it and solves the last one again
        self.sink.submit(i, layer, records, save_resume=self.resume is not None and not replay and not last,
                         release=lambda: self._release(i, layer))
        stats.phases["write"] = time.perf_counter() - t1     # waiting for the previous layer's write
        stats.seconds = time.perf_counter() - t0
        self.layer_stats.append(stats)
        if self.on_layer_end:
            self.on_layer_end(i, stats)

    # -- attention reuse (pipeline/attention_reuse.py) -----------------------------------------------
    def _reuse_points(self, layer, last=False):
        """The layer's resume points when its passes may reuse the attention half's output, else None (the
        previous layer's caches were dropped after its propagation). The down-input cache serves only the
        propagation: not for the last layer (none), nor with calibration.cache_device cpu (it is device-only)."""
        if not self.opts.reuse_attention or self.opts.asymmetric:
            return None
        points = self.adapter.attention_reuse(layer)
        if points is not None and (last or self.opts.cache_device is not None or not self._act_fits(points)):
            points = dataclasses.replace(points, act=None, act_deps=frozenset())
        return points

    def _act_fits(self, points) -> bool:
        """Whether the down-input cache (every calibration token's top_k routed down_proj inputs) takes at most
        ACT_MAX_SHARE of the GPU's memory: a default that adds 4.3 GB to OLMoE-1B-7B's run at 128 x 2048 tokens must
        not push a larger MoE on a smaller GPU out of memory (Mixtral-8x7B there: 15 GB)."""
        if points.act is None or self.device.type != "cuda":
            return True
        tokens = -(-self.dm.windows["calib"].numel() // max(1, self.trainer.world_size))    # this rank's share
        return tokens * points.act_token_bytes <= ACT_MAX_SHARE * torch.cuda.get_device_properties(
            self.device).total_memory

    def _keep_complete(self, reuse: PassReuse) -> None:
        """Caches this pass filled for every sample it ran become usable; an incomplete one is dropped (the
        passes after it then recompute). A cache captured from another supersedes it."""
        for cache, _module in reuse.capture:
            if self.runner.captured.get(cache, set()) == self.runner.seen:
                self._held.add(cache)
            else:
                self.runner.stores.pop(cache, None)
        if reuse.supersedes:
            self._held.discard(reuse.supersedes)      # its samples were dropped batch by batch
            self.runner.stores.pop(reuse.supersedes, None)

    def _drop_caches(self) -> None:
        for cache in (CACHE_CORE, CACHE_H, CACHE_ACT):
            self.runner.stores.pop(cache, None)
        self._held = set()

    def _release(self, i, layer):
        """Free layer i once its write is done (the sink calls this)."""
        self.adapter.unload_layer(self.model, i)
        if not getattr(self.model, "lazy", False):
            layer.to("cpu")       # an eager model keeps its layers: give the accelerator back

    # -- resume -----------------------------------------------------------------------------------
    @torch.no_grad()
    def _restore(self, i, layer) -> None:
        """Layer i's solved weights and records from the resume state (no Hessians, no solve)."""
        prefix = self.adapter.layer_prefix(i)
        weights, records = self.resume.load_layer(i, self.specs, next(layer.parameters()).dtype)
        for n, w in weights.items():
            layer.get_submodule(n[len(prefix):]).weight.copy_(w)
        self.solver.records.update(records)

    @torch.no_grad()
    def _rtn_copy(self, i, layer):
        """A copy of the layer with every quantized linear rounded to nearest (same recipe)."""
        rtn = copy.deepcopy(layer)
        prefix = self.adapter.layer_prefix(i)
        for g in self._groups(i, layer):
            for n in g:
                w = rtn.get_submodule(n).weight
                w.copy_(build_format(self.specs[prefix + n]).fake_quantize(w.float()).to(w.dtype))
        return rtn


def _cache_miss(_ids):
    raise RuntimeError("attention reuse: a cache was read for a sample it does not hold")


def peak_memory() -> dict:
    """Peak accelerator memory (bytes, all devices of this process) and host RSS."""
    out = {"host_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if torch.cuda.is_available():
        out["accelerator_bytes"] = max(torch.cuda.max_memory_allocated(d) for d in range(torch.cuda.device_count()))
    return out
