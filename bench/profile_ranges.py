"""Profiler ranges over AlphaQuant's own functions, for `bench/e2e.py --profile` only.

Each function named in RANGES is wrapped in `torch.profiler.record_function("aq:<name>")` for the run, so a
timeline (and `bench/trace_report.py`'s "GPU idle by range" table) says which of our functions the host was in
while the GPU had nothing to run. The package itself carries no profiler code: the wrapping is done here, by
replacing the attribute in its class or module and in every loaded module that imported it by name.
"""
from __future__ import annotations

import functools
import importlib
import sys

RANGES = {
    "alphaquant.pipeline.walker": ["LayerWalker._layer", "LayerWalker._keep_complete", "LayerWalker._drop_caches"],
    "alphaquant.pipeline.runner": ["LayerRunner.set_block", "LayerRunner.end_pass", "LayerRunner.predict_step"],
    "alphaquant.pipeline.stores": ["SampleStore.get", "SampleStore.put", "SampleStore.drop"],
    "alphaquant.pipeline.layer_sink": ["LayerSink.submit", "LayerSink.wait", "LayerSink._write_on_current_stream"],
    "alphaquant.pipeline.prefetch": ["LayerPrefetcher.take", "LayerPrefetcher.request", "LayerPrefetcher._read"],
    # the other threads' work (layer writes, resume state, shards, plot workers): what the walk shares the host with
    "alphaquant.export.writer": ["LayerCompressor.layer_tensors", "to_host", "QuantizedCheckpointWriter.add_layer",
                                 "QuantizedCheckpointWriter.add_non_layer", "QuantizedCheckpointWriter.finish_tensors"],
    "alphaquant.pipeline.resume": ["ResumeState.save_layer", "ResumeState._write"],
    "models.common.checkpoint": ["ShardWriter._write"],
    "alphaquant.pipeline.plots": ["PlotWorkers.__init__", "PlotWorkers.draw"],
    "callbacks.hessian": ["HessianCollector.on_predict_start", "HessianCollector.on_predict_end",
                          "HessianCollector._flush", "HessianCollector._add_routed", "HessianCollector._add_from_act",
                          "HessianCollector._select", "HessianCollector._plan_batched"],
    "callbacks.solve": ["GPTQSolve.on_predict_end", "GPTQSolve._buckets", "GPTQSolve._inputs",
                        "GPTQSolve._solve_local", "GPTQSolve._keep", "_relative_error", "_check_finite",
                        "_result_tensors"],
    "alphaquant.gptq.solver": ["gptq_quantize", "_prepare_hessian"],
    "alphaquant.gptq.scale_search": ["choose_params"],
    "alphaquant.gptq.hessian": ["accumulate_segments", "accumulate_hessian_fast", "_weighted_segments",
                                "_add_split_products"],
    "alphaquant.gptq.linalg": ["damped_inverse_factor", "damped_inverse_factor_flipped"],
    "alphaquant.gptq.sweep": ["gptq_sweep"],
    "alphaquant.gptq.fused_sweep": ["fused_gptq_sweep"],
    "alphaquant.gptq.fused_scale_search": ["search"],
    "models.common.moe": ["SparseMoeBlock.forward", "SparseMoeBlock.down_inputs", "SparseMoeBlock._experts_grouped",
                          "ExpertRoute.__init__", "ExpertRoute.combine", "TopKRouter.forward"],
    "models.common.attention": ["Attention.forward", "Attention.heads", "Attention.attend"],
    "models.common.layers": ["RMSNorm.forward", "apply_rotary"],
    "models.common.decoder": ["DecoderLayer.forward"],
}


def install() -> list[str]:
    """Wrap every function of RANGES that exists; returns the names wrapped."""
    from torch.profiler import record_function

    done = []
    for modname, names in RANGES.items():
        try:
            mod = importlib.import_module(modname)
        except ImportError:
            continue
        for qual in names:
            owner, _, attr = qual.rpartition(".")
            holder = getattr(mod, owner, None) if owner else mod
            orig = getattr(holder, attr, None) if holder is not None else None
            if orig is None:
                continue
            raw = holder.__dict__.get(attr, orig) if owner else orig
            if isinstance(raw, staticmethod):
                continue            # called through the class or an instance alike: left unwrapped

            def make(fn, label):
                @functools.wraps(fn)
                def wrapped(*a, **k):
                    with record_function(label):
                        return fn(*a, **k)
                return wrapped
            new = make(orig, f"aq:{qual}")
            setattr(holder, attr, new)
            if not owner:            # a function imported by name elsewhere: replace those references too
                for m in list(sys.modules.values()):
                    if m is not None and getattr(m, attr, None) is orig:
                        setattr(m, attr, new)
            done.append(qual)
    return done
