"""Warm the GPU up while the model loads: one-time costs of the first layer, paid in a background thread.

The first decoder layer of a run took ~1.6 s longer than the others on an H200 (OLMoE-1B-7B shapes,
bench/trace_report.py over bench/e2e.py --profile --trace): the CUDA context, Triton's driver set-up and its
first kernel launches (~0.6 s in the scale search), cuSOLVER/cuBLAS handles and lazily loaded kernels (Cholesky,
triangular solves, flash attention, grouped GEMM). None of that depends on the model's weights, so a thread
runs the same operations on a tiny synthetic problem while the main thread reads the model and the calibration
data, and the walk joins it before its first pass.

Nothing here changes a result: the warm-up's tensors are built from arange (no random generator is drawn
from), live on their own CUDA stream and are freed; every failure is ignored (the run meets the same operation
again and reports it there). It runs only for a single-GPU CUDA run: under DDP each rank's device is known once
the trainer exists.
"""
from __future__ import annotations

import math
import threading
import time

import torch

TIMELINE: list[tuple[str, float]] = []
"""The last warm-up's steps as (name, time.perf_counter() at its end), from "start": what bench/e2e.py reports of
the warm-up thread beside the model load (diagnostics; nothing reads it to decide anything)."""


def _mark(step: str) -> None:
    TIMELINE.append((step, time.perf_counter()))


def start_warmup(cfg) -> threading.Thread | None:
    """A started warm-up thread for this run's GPU, or None (CPU, several devices, no CUDA)."""
    t = cfg.trainer
    if t.accelerator == "cpu" or not torch.cuda.is_available():
        return None
    if t.devices not in (1, "auto") or t.num_nodes != 1 or (t.devices == "auto" and torch.cuda.device_count() != 1):
        return None
    fmt = _default_format(cfg)
    _switch_often()
    # Triton's key of its own installation, in a thread of its own from the start: it is file reads and hashing
    # (the GIL is given up for each 1 MB chunk), while the warm-up thread creates the CUDA context and loads cuBLAS
    # and the attention kernels
    triton_key = threading.Thread(target=_triton_cache_key, name="triton-key")
    triton_key.start()
    # not a daemon: an interpreter that exits (an error, a plan-only run) waits for it instead of tearing CUDA
    # down under it
    thread = threading.Thread(target=_quietly, args=(torch.device("cuda", 0), fmt, cfg, triton_key),
                              name="gpu-warmup")
    thread.start()
    return thread


SWITCH_INTERVAL_S = 0.0005
"""Python's thread switch interval from the warm-up's start until it is joined (the default is 5 ms)."""

_saved_interval: float | None = None


def _switch_often() -> None:
    """Until `join_warmup`, a thread waiting for the GIL gets it after 0.5 ms instead of 5 ms. The warm-up and
    Triton-key threads give the GIL up at every torch op and every 1 MB hashed, and the main thread holds it
    while it builds the model: each reacquisition waited up to the interval. Hashing 100 MB in 1 MB chunks beside
    a busy Python thread took 1.07 s at 5 ms and 0.19 s at 0.5 ms (0.06 s alone); on an H200 host the key
    thread took ~0.9-1.1 s (0.47 s alone) and the warm-up ended ~1.7 s after its start (~1.0 s alone)."""
    import sys
    global _saved_interval
    if _saved_interval is None:
        _saved_interval = sys.getswitchinterval()
        sys.setswitchinterval(min(_saved_interval, SWITCH_INTERVAL_S))


def _switch_as_before() -> None:
    import sys
    global _saved_interval
    if _saved_interval is not None:
        sys.setswitchinterval(_saved_interval)
        _saved_interval = None


def _triton_cache_key() -> None:
    """Compute what the process's first Triton launch computes before anything else: the key of the Triton
    installation for its on-disk kernel cache (a hash of Triton's sources and its ~100 MB library, cached for the
    process) and the import of its `experimental.gluon` package. On an H200 host that was 0.35 + 0.12 s of the
    warm-up's 1.08 s (bench/results/warmup_profile_h200_s13.txt, cProfile of the warm-up alone), before its
    first Triton kernel."""
    try:
        try:
            from triton.runtime.cache import triton_key
        except ImportError:
            from triton.compiler.compiler import triton_key
        triton_key()
        import triton.experimental.gluon  # noqa: F401
    except Exception:     # noqa: BLE001 - another Triton (or none): its first launch does what it does
        pass


def _default_format(cfg):
    """The format of a linear no override touches (None when the default keeps weights as they are): the
    one-time costs are the same for every format, and the model's names are not known yet."""
    import dataclasses

    from alphaquant.config.recipe import build_format, resolve_recipe
    try:
        default_only = dataclasses.replace(cfg.quant, overrides=[], budget_bits=None)
        return build_format(resolve_recipe(default_only, [("warmup", 256, 256)])["warmup"])
    except Exception:     # noqa: BLE001 - an unusual recipe: the warm-up skips the solve
        return None


def _quietly(device, fmt, cfg, triton_key: threading.Thread | None = None) -> None:
    TIMELINE.clear()
    _mark("start")
    try:
        with torch.cuda.device(device), torch.cuda.stream(torch.cuda.Stream(device)):
            _mark("context")
            _warm(device, fmt, cfg, triton_key)
            torch.cuda.current_stream().synchronize()
    except Exception:     # noqa: BLE001 - the run itself meets and reports any real failure
        pass
    finally:
        if triton_key is not None:      # joining the warm-up joins both
            triton_key.join()
        _mark("end")


@torch.no_grad()
def _warm(device, fmt, cfg, triton_key: threading.Thread | None = None) -> None:
    """triton_key: the thread computing Triton's installation key (`_triton_cache_key`), joined before the first
    Triton kernel here so the two do not both compute it."""
    dtype = getattr(torch, cfg.model.dtype, torch.bfloat16) if isinstance(cfg.model.dtype, str) else torch.bfloat16
    if dtype not in (torch.bfloat16, torch.float16):
        dtype = torch.bfloat16
    ramp = lambda *shape: (torch.arange(math.prod(shape), device=device, dtype=torch.float32)  # noqa: E731
                           .reshape(shape).remainder(7).sub(3).mul(0.1))
    # the layer's forward: linears, attention, the routed experts' grouped GEMM
    x = ramp(256, 256).to(dtype)
    torch.nn.functional.linear(x, x)
    from torch.nn.attention import sdpa_kernel

    from alphaquant.models.common.attention import CUDA_SDPA_BACKENDS     # the kernels the model's attention takes
    from alphaquant.models.common.moe import _grouped_mm_fn
    q = ramp(1, 2, 128, 128).to(dtype)
    with sdpa_kernel(CUDA_SDPA_BACKENDS):
        torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
    gmm = _grouped_mm_fn()
    if gmm is not None:
        gmm(x, ramp(2, 256, 256).to(dtype).transpose(-2, -1), offs=torch.tensor([128, 256], device=device,
                                                                               dtype=torch.int32))
    _mark("forward kernels")
    # While Triton's key thread is still hashing (~0.6 s beside the model load on an H200 host): what needs no
    # Triton kernel. The Hessian's half-precision products, and the solve's input checks and damped inverse
    # factor (Cholesky, triangular solves: gptq/solver.py's own first steps, on the same shapes as below)
    from alphaquant.gptq import solver
    from alphaquant.gptq.hessian import HessianState
    state = HessianState.zeros(256, device=device)
    state.add(x)
    W = ramp(2, 16, 256)
    H = state.finalize().expand(2, 256, 256).contiguous()
    g = cfg.gptq
    if fmt is not None:
        W3, H3 = solver._check_inputs(W, H, g.block_size, g.damp)
        solver._prepare_hessian(H3, torch.float32, g.damp, solver.MAX_DAMP, g.act_order)
    _mark("before triton")
    # the decoder layer's Triton kernels (models/common/kernels.py) at the model's own widths: Triton compiles (or
    # loads) one program per block size and top-k, so a tiny width would warm a program the run never uses
    from alphaquant.models.common import kernels
    hidden, top_k = _widths(cfg)
    if triton_key is not None:
        triton_key.join()
    _mark("triton key")
    h = ramp(4, hidden).to(dtype)
    kernels.rms_norm(h, ramp(hidden).to(dtype), 1e-6)
    rows = torch.arange(4 * top_k, device=device).reshape(4, top_k)
    kernels.weighted_combine(ramp(4 * top_k, hidden).to(dtype), ramp(4 * top_k).to(dtype), rows)
    _mark("layer triton kernels")
    # the routing-weighted Hessian: the weights split into half-precision parts (a Triton kernel)
    state.add(x, weight=ramp(256).abs().add(0.1))
    _mark("hessians")
    if fmt is None:
        return
    # the solve: the scale search and sweep kernels (Triton), the lazy updates' batched GEMMs
    from alphaquant.pipeline.calibrate import solver_options
    # cuda_graph off: capturing a graph here would forbid the main thread's CUDA calls meanwhile
    solver.gptq_quantize(W, H, fmt, **solver_options(g), cuda_graph=False)
    _mark("solve")


def _widths(cfg) -> tuple[int, int]:
    """(hidden_size, experts per token) from the model directory's config.json; (256, 2) when it says nothing."""
    from pathlib import Path

    from alphaquant.models.loading import read_config_dict
    try:
        c = read_config_dict(Path(cfg.model.path))
        c = c.get("text_config", c)
        return int(c.get("hidden_size", 256)), int(c.get("num_experts_per_tok", c.get("top_k", 2)) or 2)
    except (OSError, ValueError, TypeError, AttributeError):
        return 256, 2


def join_warmup(thread: threading.Thread | None) -> None:
    """Wait for the warm-up: before the first pass (no GPU work of it left running beside the walk) and before
    an error leaves prepare."""
    if thread is not None:
        thread.join()
    _switch_as_before()
