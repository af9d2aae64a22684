"""One calibration run: prepare (no weights read), run the layer walk, finish (summary, files).

    session = CalibrationSession(cfg)
    session.prepare()        # model skeleton on meta, recipe, output dir checks
    session.run()            # data, trainer, layer walk, checkpoint written atomically
    session.finish(seconds)  # summary table, JSON, loggers
"""
from __future__ import annotations

import copy
import dataclasses
import json
import time
from pathlib import Path

import torch

from alphaquant.errors import UserError
from alphaquant.export.atomic import AtomicDir, recover_interrupted_swap
from alphaquant.export.output_dir import check_output_dir, run_inputs
from alphaquant.config.recipe import check_formats, estimate_memory, format_counts, plan_table, render_plan, resolve_recipe

OUTSIDE_LAYERS = "kept: AlphaQuant calibrates the linears of decoder layers (not routers, gates, lm_head)"


class CalibrationSession:
    def __init__(self, cfg):
        self.cfg = cfg
        self.name = cfg.name or cfg.model.path.rstrip("/").split("/")[-1]
        self.out_dir = Path(cfg.output.dir or f"outputs/{self.name}")
        self.results: dict = {}
        self.extra_perplexity: dict[str, float] = {}   # e.g. {"gptq_uniform": ppl} from eval.compare_hessians
        self.stage_seconds: dict[str, float] = {}      # data, warmup, setup, walk, plots, finish, cleanup (time outside the layers)
        self._warmup = None                             # pipeline/warmup.py's thread, from prepare until the data is in

    # -- before any weight is read ----------------------------------------------------------
    def prepare(self, dry_run: bool = False) -> None:
        """dry_run: the model is the meta skeleton checked against the safetensors headers (a hub id downloads
        its json files only); otherwise decoder layers stay on meta and the rest is loaded."""
        from alphaquant.arch import load_model

        from alphaquant.pipeline.warmup import join_warmup, start_warmup

        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        if cfg.output.save:
            check_run_output(cfg, self.out_dir)
        # the GPU's one-time costs (context, Triton, cuSOLVER, lazily loaded kernels) while the model loads
        self._warmup = None if dry_run else start_warmup(cfg)
        try:
            # lazy: decoder layers stay on the meta device; shapes are all the recipe needs. The local family
            # code or transformers' classes (model.implementation; every other model takes transformers')
            self.model, self.adapter = load_model(cfg.model, skeleton_only=dry_run, headers=dry_run)
            self.specs = resolve_recipe(cfg.quant, self.adapter.linear_modules(self.model))
            check_formats(self.specs)
            self.specs = self._only_calibrated(self.specs)
        except BaseException:
            join_warmup(self._warmup)
            raise

    def _only_calibrated(self, specs):
        """Linears outside the true-sequential groups (routers, shared-expert gates, lm_head)
        are never solved: mark them kept so the plan and the checkpoint say what happens."""
        solved = set()
        for i, layer in enumerate(self.adapter.decoder_layers(self.model)):
            prefix = self.adapter.layer_prefix(i)
            solved.update(prefix + n for g in self.adapter.sequential_groups(layer) for n in g)
        return {n: s if (n in solved or s.skip) else dataclasses.replace(s, skip=True, rule=OUTSIDE_LAYERS)
                for n, s in specs.items()}

    def print_plan(self) -> None:
        from alphaquant.pipeline.memory_plan import plan_memory, render_memory

        mem = estimate_memory(self.specs)
        print(render_plan(plan_table(self.specs)))
        print("\nmodules per format: " + ", ".join(f"{k}: {v}" for k, v in format_counts(self.specs).items()))
        # ratio = quantized / original bytes: 0.36x the size
        print(f"linear weights: {mem['original_bytes'] / 2**20:.1f} MiB -> {mem['quantized_bytes'] / 2**20:.1f} MiB "
              f"({mem['ratio']:.2f}x the size)")
        print(render_memory(self.cfg, plan_memory(self.cfg, self.model, self.adapter, self.specs)))
        from alphaquant.export.compat import plan_warnings
        for line in plan_warnings(getattr(self.model.config, "model_type", None), self.specs, self.cfg.output.format):
            print(f"warning: {line}")

    # -- the run ---------------------------------------------------------------------------------
    def run(self) -> None:
        from alphaquant.data import build_windows
        from alphaquant.pipeline.calibrate import build_and_walk
        from alphaquant.pipeline.warmup import join_warmup

        cfg = self.cfg
        compares = [mode for mode in dict.fromkeys(cfg.eval.compare_hessians)
                    if mode != cfg.calibration.hessian and cfg.eval.enabled]
        early = self._early_first_layer() if not compares else None
        try:
            t0 = time.perf_counter()
            try:
                tokenizer = _load_tokenizer(cfg.model.tokenizer or cfg.model.path)
                mc = self.model.config
                self.windows = build_windows(cfg, tokenizer, vocab_size=mc.vocab_size,
                                             max_pos=getattr(mc, "max_position_embeddings", None), model=self.model)
                self.stage_seconds["data"] = time.perf_counter() - t0
                t0 = time.perf_counter()
                if self._warmup is not None and (cfg.output.save or cfg.output.resume):
                    from alphaquant.export.writer import warm_host_staging
                    warm_host_staging()     # the layer writes' page-locked staging, while this thread waits anyway
            finally:     # the warm-up (prepare's) overlapped the data stage; none of it runs beside the walk
                join_warmup(self._warmup)
                self._warmup = None
                self.stage_seconds["warmup"] = time.perf_counter() - t0    # the wait for it after the data
            # comparison runs first, so the saved summary and the loggers carry their perplexities too
            self.extra_perplexity = {f"gptq_{mode}": self._compare(mode) for mode in compares}
            self.results = build_and_walk(self, self._writer_factory(), prefetch=early)
        except BaseException:
            if early is not None:
                early.close()
            raise
        self.results["hessian"] = cfg.calibration.hessian
        self.results["stage_seconds"] = self.stage_seconds

    def _early_first_layer(self):
        """A LayerPrefetcher already reading layer 0 (and copying it to the GPU), or None. Only beside the GPU
        warm-up (one CUDA device): the data stage and the wait for the warm-up then hide the first layer's read,
        which the walk otherwise does itself before its first pass (~0.27 s for an OLMoE-1B-7B layer on an H200
        host). Read into page-locked memory, as the walk's later reads: torch's pinned-memory cache then holds a
        layer's worth of blocks before the walk, which the read of layer 1 reuses; page-locking them during layer 0
        instead (604 cudaHostAlloc calls, 0.46 s on the H200 host) held up layer 0's first pass by ~0.4 s."""
        if self._warmup is None:
            return None
        from alphaquant.pipeline.prefetch import LayerPrefetcher
        prefetch = LayerPrefetcher.for_walk(self.adapter, self.model, torch.device("cuda", 0),
                                            cache_on_host=self.cfg.calibration.cache_device == "cpu")
        prefetch.request(0)
        return prefetch

    def _compare(self, mode: str) -> float:
        """Perplexity of GPTQ with another Hessian mode: a fresh model, nothing saved or logged."""
        from alphaquant.arch import load_model

        cfg = copy.deepcopy(self.cfg)
        cfg.calibration.hessian = mode
        cfg.eval.before, cfg.eval.rtn, cfg.output.save, cfg.output.resume = False, False, False, False
        cfg.logging.wandb.mode, cfg.logging.csv.enabled = "disabled", False
        other = copy.copy(self)
        other.cfg, other.extra_perplexity, other.stage_seconds = cfg, {}, {}
        other.progress_label = f"compare: {mode} Hessians, not saved"
        other.model, other.adapter = load_model(cfg.model)
        from alphaquant.pipeline.calibrate import build_and_walk
        return build_and_walk(other, None)["perplexity"]["quantized"]

    def _writer_factory(self):
        if not self.cfg.output.save:
            return None

        def make(tmp, records):
            from alphaquant.export import QuantizedCheckpointWriter, DequantizedCheckpointWriter
            cls = QuantizedCheckpointWriter if self.cfg.output.format == "compressed-tensors" else DequantizedCheckpointWriter
            return cls(tmp, self.model, self.specs, records, source_dir=self.cfg.model.local_dir)
        return make

    def finish(self, seconds: float) -> None:
        from alphaquant.pipeline.summary import finish_run
        finish_run(self, seconds)


def check_run_output(cfg, out_dir: Path) -> None:
    """The output directory and the resume state beside it may be written: before any weight is read.
    A checkpoint a killed overwrite left renamed away is put back first (`recover_interrupted_swap`)."""
    note = recover_interrupted_swap(out_dir)
    if note:
        print(f"note: {note}")
    check_output_dir(out_dir, cfg.output.overwrite, run_inputs(cfg))
    if cfg.output.resume:
        from alphaquant.pipeline.resume import resume_dir
        state = resume_dir(out_dir)
        if state.exists() and not state.is_dir():
            raise UserError(f"the resume state {str(state)!r} of output.dir {str(out_dir)!r} exists and is not a "
                            f"directory; remove it, or set output.resume: false")


def _load_tokenizer(path: str):
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()   # it warns about model types it does not know (deepseek)
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise UserError(f"model.tokenizer: no tokenizer could be loaded from {path!r} ({str(e).splitlines()[0]}); "
                        f"point model.tokenizer at a directory with tokenizer.json") from None


def dump_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")


__all__ = ["CalibrationSession", "AtomicDir", "dump_json"]
