"""Wire the Lightning pieces together and walk the model; write the checkpoint atomically."""
from __future__ import annotations

import contextlib
import time
from concurrent.futures import ThreadPoolExecutor

from alphaquant.pipeline.accelerator import release_cached_memory
from alphaquant.pipeline.datamodule import WindowDataModule
from alphaquant.pipeline.gc_pause import GCWatch, frozen_heap
from alphaquant.pipeline.plots import PlotWorkers, log_plots, preload_pyplot, save_plots
from alphaquant.pipeline.progress import LayerProgress
from alphaquant.pipeline.report import expert_token_table, layer_error_table
from alphaquant.pipeline.trainer import build_loggers, build_trainer, quiet_lightning
from alphaquant.pipeline.walker import LayerWalker, WalkOptions, peak_memory


def solver_options(g) -> dict:
    """gptq_quantize's keyword arguments from the `gptq` config section."""
    return dict(block_size=g.block_size, damp=g.damp, act_order=g.act_order, static_groups=g.static_groups,
                fused=None if g.sweep == "auto" else False,      # None: the fused sweep wherever it applies
                scale_search=g.scale_search)


def build_and_walk(session, writer_factory, prefetch=None) -> dict:
    """prefetch: a LayerPrefetcher started before the walk (session.run: layer 0 read during the data stage),
    used when it reads what the walk would; the walk closes it."""
    from alphaquant.callbacks.hessian import HessianCollector
    from alphaquant.callbacks.perplexity import PerplexityCallback
    from alphaquant.callbacks.solve import GPTQSolve

    cfg, adapter = session.cfg, session.adapter
    t_setup = time.perf_counter()
    quiet_lightning()
    collector = HessianCollector(adapter, mode=cfg.calibration.hessian, asymmetric=cfg.gptq.asymmetric)
    g = cfg.gptq
    solver = GPTQSolve(collector, session.specs, adapter.layer_prefix, solver_options(g),
                       budget=cfg.quant if cfg.quant.budget_bits is not None else None,
                       expert_chunk=g.expert_chunk)
    ppl = PerplexityCallback()
    loggers = build_loggers(cfg, session.name)
    trainer = build_trainer(cfg, [collector, solver, ppl], loggers)
    session.trainer, session.loggers = trainer, loggers
    dm = WindowDataModule(session.windows, {"calib": cfg.calibration.batch_size, "eval": cfg.eval.batch_size})
    opts = WalkOptions(true_sequential=g.true_sequential, evaluate=cfg.eval.enabled,
                       eval_before=cfg.eval.before, eval_rtn=cfg.eval.rtn,
                       cache_device="cpu" if cfg.calibration.cache_device == "cpu" else None,
                       asymmetric=g.asymmetric, reuse_attention=cfg.calibration.reuse_attention)
    rank0 = trainer.global_rank == 0
    n_layers = adapter.num_layers(session.model)
    # the saved run and the eval.compare_hessians runs are told apart in logs without a terminal
    label = getattr(session, "progress_label", None) or f"quantize: {cfg.calibration.hessian} Hessians"
    progress = LayerProgress(n_layers, enabled=rank0, label=label)

    plotter = []                  # a GPU run's PlotWorkers (plots.py), started after the first layer

    def on_layer_end(i, stats):
        if draws and i == 0:      # matplotlib's one-time costs, after the first layer's own warm-up: in a child
            if plots_in_children(trainer):                      # process beside a GPU walk, else in a thread
                plotter.append(PlotWorkers())
            else:
                preload_pyplot()
        stats.phases["gc"] = gc_watch.take()      # collector seconds during the layer (inside its phases' times)
        if plotter and i == n_layers - 1:     # every record is final: the children draw beside the last write
            plotter[0].start({"layers": layer_error_table(solver.records, walker.layer_stats),
                              "experts": expert_token_table(solver.records, cfg.calibration.min_tokens_warn)},
                             plots_dir(session, tmp))
        rows = layer_error_table({k: r for k, r in solver.records.items()}, [stats])
        progress.layer_done(i, stats, mean_error=rows[0]["mean_rel_error"])
        for lg in loggers:
            lg.log_metrics({"layer/seconds": stats.seconds, "layer/mean_rel_error": rows[0]["mean_rel_error"],
                            "layer/max_rel_error": rows[0]["max_rel_error"]}, step=i)

    out = session.out_dir if (writer_factory and rank0) else None
    draws = rank0 and plots_dir(session, session.out_dir if out is not None else None) is not None
    # the resume state is written by the last rank, the checkpoint by rank 0: under DDP the two
    # background writes (and their host time) fall on different processes; one process does both
    resume = _resume_state(session, rank0, writes=trainer.global_rank == trainer.world_size - 1)
    t0 = time.perf_counter()
    stages = session.stage_seconds
    stages["setup"] = t0 - t_setup       # trainer, loggers, resume fingerprint
    gc_watch = GCWatch()
    writers = []                  # the checkpoint writer, abandoned before a failed run's directory is removed
    with (_atomic(out, cfg.output.overwrite)) as tmp, _abandoning(writers), progress, _clear_on_user_error(resume), \
            _closing(plotter), frozen_heap(), gc_watch:
        writer = writer_factory(tmp, solver.records) if tmp is not None else None
        writers.extend([writer] if writer is not None else [])
        walker = LayerWalker(trainer, session.model, adapter, session.specs, dm, collector=collector,
                             solver=solver, perplexity=ppl, opts=opts, writer=writer,
                             on_layer_end=on_layer_end, progress=progress.group_done, resume=resume,
                             prefetch=prefetch)
        perplexity = walker.run()
        for k, v in perplexity.items():
            progress.stream_done(_PPL_NAMES.get(k, k), v)
        release_cached_memory()
        stages["walk"] = time.perf_counter() - t0
        results = {
            "run": session.name, "model": cfg.model.path, "family": adapter.family,
            "perplexity": {**{_PPL_NAMES[k]: v for k, v in perplexity.items()}, **session.extra_perplexity},
            "layers": layer_error_table(solver.records, walker.layer_stats),
            "experts": expert_token_table(solver.records, cfg.calibration.min_tokens_warn),
            "fallbacks": {n: r.fallback for n, r in solver.records.items() if r.fallback},
            "calibration_tokens": int(session.windows["calib"].numel()),
            "seconds_walk": time.perf_counter() - t0, "solve_seconds": solver.solve_seconds,
            "memory": peak_memory(), "output_dir": str(out) if out else None, "gc": gc_watch.summary(),
            "modules": {n: {"format": r.spec.label, "tokens": r.tokens, "rel_error": r.rel_error,
                            "loss": r.loss, "fallback": r.fallback} for n, r in solver.records.items()},
        }
        if cfg.quant.budget_bits is not None:
            results["budget"] = budget_summary(session)
        t1 = time.perf_counter()
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="last-shard") as pool:
            # the last shard is written while the plots are drawn (disk vs. matplotlib)
            tensors = pool.submit(writer.finish_tensors) if writer is not None else None
            if rank0 and plots_dir(session, tmp) is not None:
                directory = plots_dir(session, tmp)     # drawn since the last layer (start) unless the data moved
                drawn = plotter[0].draw(results, directory) if plotter else save_plots(results, directory)
                log_plots(loggers, {k: str(v) for k, v in drawn.items()})
                # the summary names where the plots will be once the temporary directory is renamed into place
                results["plots"] = {k: str(out / v.relative_to(tmp)) if tmp is not None else str(v)
                                    for k, v in drawn.items()}
            stages["plots"] = time.perf_counter() - t1
            t1 = time.perf_counter()
            if tensors is not None:
                tensors.result()
        if writer is not None:
            results["stage_seconds"] = stages
            writer.finish(extra_files={"alphaquant_recipe.json": _recipe_json(session),
                                       "alphaquant_summary.json": results})
        stages["finish"] = time.perf_counter() - t1     # the last shard after the plots, JSON files
        t1 = time.perf_counter()
    results["records"] = solver.records
    if resume is not None:
        trainer.strategy.barrier()      # the checkpoint is in place and every rank has read the resume
        # state before its writer (the last rank) removes it
        resume.clear()                  # the checkpoint is complete: nothing left to resume
    # the output moved into place and the resume state removed (seconds at OLMoE-1B-7B size: unlinking its files);
    # after the summary file was written, so only the returned results and the run's log carry it
    stages["cleanup"] = time.perf_counter() - t1
    return results


@contextlib.contextmanager
def _closing(workers):
    """End the run's plot worker however the walk ends (a failed run leaves no child process behind)."""
    try:
        yield
    finally:
        for w in workers:
            w.close()


@contextlib.contextmanager
def _abandoning(writers):
    """A failed run's checkpoint writer finishes its background shard write before the output's temporary
    directory is removed (nothing may be written into it afterwards)."""
    try:
        yield
    except BaseException:
        for w in writers:
            w.abandon()
        raise


def _resume_state(session, rank0, writes):
    """The run's ResumeState (None when output.resume is off); says so when it resumes.
    `writes`: this rank writes (and finally removes) the state; the others only read it."""
    cfg = session.cfg
    if not cfg.output.resume:
        return None
    from alphaquant.pipeline.resume import ResumeState, fingerprint
    state = ResumeState(session.out_dir, fingerprint(cfg), writer=writes)
    if state.layers_done and rank0:
        print(f"resuming: layers 0-{state.layers_done - 1} were finished by an earlier run of this command "
              f"({state.dir}); their solved weights are reused")
    return state


@contextlib.contextmanager
def _clear_on_user_error(resume):
    """A user error (bad data, NaN weights) will recur on a rerun: its partial state is no use. A state
    that could not be written, or a run stopped by a signal, keeps what is on disk for the rerun
    (the layer write in flight is finished first, so the last finished layer is kept too)."""
    from alphaquant.errors import UserError
    from alphaquant.pipeline.resume import ResumeWriteError
    from alphaquant.pipeline.signals import RunInterrupted
    try:
        yield
    except RunInterrupted:
        if resume is not None:
            with contextlib.suppress(Exception):
                resume.wait()
        raise
    except ResumeWriteError:
        raise
    except UserError:
        if resume is not None:
            resume.clear()
        raise


def plots_in_children(trainer) -> bool:
    """The plots are drawn by child processes (PlotWorkers) on a GPU run: its host cores are otherwise idle, while a
    CPU run's walk needs them."""
    return trainer.strategy.root_device.type == "cuda"


def plots_dir(session, tmp):
    """plots/ inside the checkpoint when one is written, else beside the CSV logs."""
    from pathlib import Path
    if tmp is not None:
        return Path(tmp) / "plots"
    csv = session.cfg.logging.csv
    return Path(csv.dir) / session.name / "plots" if csv.enabled else None


_PPL_NAMES = {"eval_fp": "original", "eval_rtn": "rtn", "eval_q": "quantized"}


def _recipe_json(session) -> dict:
    out = {"config": session.cfg.to_dict(),
           "modules": {n: {"wq": s.wq, "group_size": s.group_size, "sym": s.sym, "aq": s.aq, "skip": s.skip,
                           "rule": s.rule} for n, s in session.specs.items()}}
    if session.cfg.quant.budget_bits is not None:
        out["budget"] = {**budget_summary(session), "quant": budget_quant_section(session)}
    return out


def budget_summary(session) -> dict:
    """quant.budget_bits' outcome: the budget, the average bits reached, modules per format."""
    from alphaquant.config.recipe import BUDGET_RULE, average_bits, format_counts
    q = session.cfg.quant
    chosen = {n: s for n, s in session.specs.items() if s.quantized}
    return {"budget_bits": q.budget_bits, "candidates": list(q.budget_candidates),
            "average_bits": average_bits(chosen), "modules_per_format": format_counts(chosen),
            "chosen_by_budget": sum(s.rule == BUDGET_RULE for s in chosen.values())}


def budget_quant_section(session) -> dict:
    """A plain quant section (no budget) giving every module the format the budget chose: exact-name
    overrides after the run's own rules, so `--recipe` with it reproduces the recipe without a search."""
    from alphaquant.config.recipe import BUDGET_RULE
    q = session.cfg.to_dict()["quant"]
    q.pop("budget_bits", None)
    q.pop("budget_candidates", None)
    q["overrides"] = list(q.get("overrides", [])) + [
        {"pattern": n, "wq": s.wq, "group_size": s.group_size}
        for n, s in session.specs.items() if s.rule == BUDGET_RULE]
    return q


@contextlib.contextmanager
def _atomic(out, overwrite):
    if out is None:
        yield None
        return
    from alphaquant.export.atomic import AtomicDir
    with AtomicDir(out, overwrite=overwrite) as tmp:
        yield tmp
