"""Peak GPU and host memory of a calibration run, estimated from shapes alone (the `--dry-run` plan prints it).

`model_shape(model, adapter, specs)` reads the shapes from the meta skeleton (no weight read);
`estimate_peak_memory(shape, ...)` is the pure count. The terms follow what the layer walk does
(alphaquant/pipeline/walker.py, stores.py, callbacks/hessian.py, callbacks/solve.py):

accelerator (one GPU; under DDP each rank holds its share of the cached inputs, everything else in full):
  layer weights     one decoder layer's parameters in the compute dtype (model.dtype), twice: the layer being
                    calibrated and the previous one, compressed and written in the background during it
                    (a third with eval.rtn: the round-to-nearest copy), and one more on a GPU unless
                    calibration.cache_device is cpu: the next layer, copied there ahead (pipeline/prefetch.py)
  cached inputs     every stream's layer inputs, kept on the accelerator between passes (SampleStore):
                    calibration.num_samples x seq_len x hidden_size x dtype bytes, plus each evaluation stream's
                    windows (quantized, original with eval.before, RTN with eval.rtn) when their number is known
  attention reuse   calibration.reuse_attention (local families, true-sequential, not gptq.asymmetric): the
                    attention half's output of every calibration sample, one more calibration cache, plus one
                    batch while a pass replaces one such cache by the next (pipeline/attention_reuse.py); and,
                    unless calibration.cache_device is cpu, every calibration token's routed down_proj inputs
                    (top_k x moe_intermediate_size in the dtype), from the down pass to the propagation
  embedding         a device copy of the embedding during layer 0 (vocab_size x hidden_size)
  Hessians          of the largest true-sequential group: one fp32 C x C matrix per distinct input
                    (an expert's gate/up share one, so E x C x C for the routed experts; q/k/v share one)
  then the larger of
    activations     one batch (calibration.batch_size x seq_len tokens) through the layer: the batch in and
                    out, the residual stream, every non-expert linear's output and the router's fp32 logits
                    and probabilities, plus the larger of a collect pass's buffered group inputs (top_k rows
                    per token for an expert group, sorted by expert and weighted: 2 copies in the dtype) and
                    a propagate pass's expert intermediates (experts run one at a time: gate, up, their
                    product and down for one expert's tokens, taken as 2 x top_k / E of the batch)
    GPTQ solve      at the end of a collect pass (callbacks/solve.py, gptq/solver.py, gptq/linalg.py): the
                    group's weights in fp32, twice (the stack and the result), plus, for the bucket (stacks of
                    one shape and format) whose solve call is largest, per stack solved in that one call
                    (gptq.expert_chunk of them; 0 or auto with room = the whole bucket): 3 Hessian-sized fp32
                    tensors beside the collected Hessians (the chunk's finalised Hessians, then at most two
                    more at once: the dead-column-fixed act-order copy, the flipped damped copy, its Cholesky
                    factor, the triangular inverse, Hinv; 5 with gptq.asymmetric, whose W̃ = W + W P (H+λI)⁻¹
                    adds P and gptaq.py's damped copies) and 4 weight-sized ones (the transposed working
                    weights, the sweep's result in both orders, the codes): `solve_stack_bytes`. A group's
                    solve coexists with its own collected Hessians, so this term is what the largest of
                    (group's Hessians + its solve) adds above the Hessians term
host:
  outside layers    embeddings, final norm and lm_head in the compute dtype (a lazy model keeps only these)
  layer staging     the next layer read ahead from the checkpoint (pinned on a GPU) and the finished layer's
                    compressed tensors waiting for the writer: 2 x one layer's weights
  token ids         calibration windows as int64, twice (offsets and gathered windows), per process
  on CPU            (trainer.accelerator: cpu) the accelerator terms above are host memory too

Not counted: the Python/torch runtime itself (~1 GiB of host memory), the CUDA context, allocator
fragmentation, the evaluation head pass (final norm + lm_head + batch x seq_len x vocab fp32 logits,
after the last layer) and attention scores (causal SDPA with no mask uses fused kernels that need none).
Against README's H200 measurements (128 x 2048 tokens, eval off, act-order), taken when the solve made ~6
Hessian-sized copies per expert and this count said so: OLMoE-1B-7B shapes at batch 64 estimated 16.8 GiB
of GPU memory for a measured 14.5; Mixtral-8x7B at batch 16 estimated 54 GiB for a measured 69 (the CUDA
caching allocator keeps freed solve temporaries). The solve now makes 3 per expert (tests/test_expert_chunk.py
measures the drop on CPU: an 8-expert bucket's solve peak 51 -> 25 Hessian sizes, 5 with gptq.expert_chunk 1);
the same Mixtral run now estimates 42.7 GiB, 18.5 GiB with gptq.expert_chunk 1 and calibration.cache_device
cpu. Measured since on an H200 (README, bench/results/e2e_*): OLMoE-1B-7B at batch 64 12.8 GiB (13.3 with
calibration.reuse_attention; 16.1 with its down-input cache and the next layer copied ahead, e2e_olmoe_s11_*); Mixtral-8x7B's 2-layer cut at batch 16 37.3 GiB with the defaults (expert_chunk
auto with the whole GPU free), 18.2 GiB with expert_chunk 1 and cache_device cpu under a 22 GiB cap, 21.4 GiB with
auto and cache_device cpu under a 24 GiB cap (auto fills what it is allowed). Host memory is under-estimated by the runtime, pinned-memory pools and the
CUDA context (OLMoE: 2.0 GiB estimated, 5.9 measured).
"""
from __future__ import annotations

from dataclasses import dataclass, field

TOKEN_WINDOW_BYTES = 16          # int64 per token, twice (alphaquant.data.TOKEN_WINDOW_BYTES)
FP32 = 4
SOLVE_HESSIAN_COPIES = 3         # per stack in one solve call: its H-sized fp32 tensors (see the module docstring)
ASYMMETRIC_HESSIAN_COPIES = 5    # the same with gptq.asymmetric (P and gptaq.asymmetric_target's damped copies)
SOLVE_WEIGHT_COPIES = 4          # per stack in one solve call: its [R, C] fp32 working tensors


def solve_stack_bytes(rows: int, cols: int, asymmetric: bool = False) -> int:
    """Bytes one stack ([rows, cols] weights, a [cols, cols] Hessian) adds to a GPTQ solve call, beside the
    collected Hessians and the bucket's fp32 weights and result (callbacks/solve.py sizes gptq.expert_chunk auto
    with it)."""
    copies = ASYMMETRIC_HESSIAN_COPIES if asymmetric else SOLVE_HESSIAN_COPIES
    return (copies * cols * cols + SOLVE_WEIGHT_COPIES * rows * cols) * FP32


@dataclass(frozen=True)
class LayerShape:
    """What one decoder layer costs, in bytes (see the module docstring for each term)."""

    weight_bytes: int            # sum of numel x itemsize of the layer's parameters (compute dtype)
    hessian_bytes: int           # fp32 Hessians of the layer's largest true-sequential group
    group_weight_fp32_bytes: int  # that group's weights in fp32 (what the solve stacks)
    token_activation_bytes: int  # activations per token of one forward through the layer
    largest_group: str = ""      # a name for the largest group, for the printout
    # per true-sequential group: (its Hessian bytes, its fp32 weight bytes, its buckets as (stacks, rows, cols))
    solve_groups: tuple = ()
    down_input_token_bytes: int = 0   # the routed experts' down_proj inputs per token (top_k x moe_intermediate)


@dataclass(frozen=True)
class ModelShape:
    hidden_size: int
    dtype_bytes: int             # bytes per element of the compute dtype
    embed_bytes: int             # the input embedding (copied to the accelerator for layer 0)
    outside_bytes: int           # every parameter outside the decoder layers (embeddings, norm, lm_head)
    layers: list[LayerShape] = field(default_factory=list)


def estimate_peak_memory(shape: ModelShape, *, num_samples: int, seq_len: int, batch_size: int,
                         eval_windows: int | None = 0, eval_seq_len: int = 0, eval_batch_size: int = 1,
                         eval_streams: int = 0, rtn: bool = False, gpu: bool = True, devices: int = 1,
                         cache_on_host: bool = False, expert_chunk: int | str = 0, asymmetric: bool = False,
                         reuse_attention: bool = False) -> dict:
    """{"gpu": {term: bytes}, "host": {term: bytes}, "gpu_total", "host_total", "per_eval_window"}.

    Each layer term is the largest over the model's layers. eval_windows None: unknown (the per-window cost
    of the evaluation streams' cached inputs is returned as "per_eval_window"); gpu False: a CPU run, where
    the accelerator terms are host memory. devices: processes (DDP ranks), each caching its share of inputs.
    cache_on_host: calibration.cache_device cpu, the cached inputs live in pinned host memory instead.
    expert_chunk: gptq.expert_chunk, stacks per solve call (0 and "auto": a whole bucket, what auto does when the
    GPU has room; "solve_chunk_1" is the solve term at 1, the least auto or a setting can reach); asymmetric:
    gptq.asymmetric (more Hessian-sized copies per stack); reuse_attention: the attention reuse cache is held (the
    caller decides whether the run's layers and settings allow it: `plan_memory`)."""
    b, h = shape.dtype_bytes, shape.hidden_size
    devices = max(int(devices), 1)
    layers = shape.layers or [LayerShape(0, 0, 0, 0)]
    weights = max(s.weight_bytes for s in layers)
    hessians = max(s.hessian_bytes for s in layers)
    chunk = expert_chunk if isinstance(expert_chunk, int) and expert_chunk > 0 else None
    solve = max(_solve_bytes(s, chunk, asymmetric)[0] for s in layers)
    solve_chunk_1 = max(_solve_bytes(s, 1, asymmetric)[0] for s in layers)
    # a group's solve coexists with its own Hessians, not the largest group's: the excess over the Hessians term
    solve_excess = max(_solve_bytes(s, chunk, asymmetric)[1] for s in layers) - hessians
    biggest = max(layers, key=lambda s: s.hessian_bytes)
    per_eval_window = eval_streams * eval_seq_len * h * b
    cache = -(-num_samples // devices) * seq_len * h * b
    if eval_windows:
        cache += -(-eval_windows // devices) * per_eval_window
    tokens = max(batch_size * seq_len, (eval_batch_size * eval_seq_len) if eval_streams else 0)
    activations = tokens * max(s.token_activation_bytes for s in layers) + 2 * tokens * h * b   # + batch in/out
    ahead = 1 if gpu and not cache_on_host else 0       # the next layer, copied to the GPU ahead (prefetch.py)
    device = {"layer weights": (3 if rtn else 2) * weights + ahead * weights, "cached inputs": cache,
              "embedding (layer 0)": shape.embed_bytes, "Hessians": hessians,
              "activations or solve": max(activations, solve_excess)}
    ids = num_samples * seq_len * TOKEN_WINDOW_BYTES * devices + (eval_windows or 0) * eval_seq_len * 8 * devices
    host = {"outside layers": shape.outside_bytes, "layer staging": 2 * weights, "token ids": ids}
    if reuse_attention:
        device["attention reuse cache"] = -(-num_samples // devices) * seq_len * h * b + batch_size * seq_len * h * b
        if not cache_on_host:               # the MoE blocks' down inputs, where the layer runs (attention_reuse.py)
            down_in = max(s.down_input_token_bytes for s in layers)
            if down_in:
                device["down-input cache"] = -(-num_samples // devices) * seq_len * down_in
    if cache_on_host and gpu:
        host["cached inputs (pinned)"] = device.pop("cached inputs")
        if reuse_attention:
            host["attention reuse cache (pinned)"] = device.pop("attention reuse cache")
    if not gpu:
        device.pop("embedding (layer 0)")        # on CPU the embedding is used where it is
        host.update({f"{k} (CPU run)": v for k, v in device.items()})
        device = {}
    return {"gpu": device, "host": host, "gpu_total": sum(device.values()),
            "host_total": sum(host.values()), "per_eval_window": per_eval_window, "largest_group": biggest.largest_group,
            "activations": activations, "solve": solve, "layer_weight_bytes": weights,
            "solve_chunk_1": solve_chunk_1, "expert_chunk": expert_chunk,
            "bucket_stacks": max((b[0] for s in layers for *_, bs in s.solve_groups for b in bs), default=1)}


def _solve_bytes(s: LayerShape, chunk: int | None, asymmetric: bool) -> tuple[int, int]:
    """(the largest GPTQ solve of one layer's groups, the largest such solve plus its group's collected Hessians),
    `chunk` stacks per solve call (None: a whole bucket)."""
    if not s.solve_groups:       # a LayerShape written by hand: one bucket, its Hessians all solved at once
        copies = ASYMMETRIC_HESSIAN_COPIES if asymmetric else SOLVE_HESSIAN_COPIES
        solve = copies * s.hessian_bytes + 2 * s.group_weight_fp32_bytes
        return solve, solve + s.hessian_bytes
    solves = [(hb, 2 * gw + max((min(n, chunk or n) * solve_stack_bytes(r, c, asymmetric) for n, r, c in buckets),
                                default=0))
              for hb, gw, buckets in s.solve_groups]
    return max(x for _, x in solves), max(hb + x for hb, x in solves)


# --- shapes from the meta skeleton ---------------------------------------------------------------------

def _nbytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in params)


def layer_shape(adapter, model, index: int, specs: dict, linears: dict[str, tuple[int, int]], hidden: int,
                true_sequential: bool = True) -> LayerShape:
    """The LayerShape of decoder layer `index` of a (meta) model: parameters, groups and experts from the adapter."""
    layer = adapter.decoder_layers(model)[index]
    prefix = adapter.layer_prefix(index)
    b = next((p.element_size() for p in layer.parameters()), 2)
    blocks = adapter.moe_blocks(layer)
    expert_of = {}                                   # relative linear name -> its MoE block
    for blk in blocks:
        for e in range(blk.num_experts):
            for n in blk.expert_linear_names(e):
                expert_of[n] = blk

    def shape_of(n):
        return linears.get(prefix + n, (0, 0))

    def quantized(n):
        s = specs.get(prefix + n)
        return s is not None and s.quantized

    groups = [[n for n in g if quantized(n)] for g in adapter.sequential_groups(layer)]
    if not true_sequential:
        groups = [[n for g in groups for n in g]]
    hess, fp32_w, name, best = 0, 0, "", -1
    solve_groups = []
    for g in groups:
        stacks = {}                                  # (Hessian key, spec) -> [rows, cols]: linears stacked by rows
        for n in g:
            key = ((n.rpartition(".")[0], shape_of(n)[0]), specs.get(prefix + n))
            stacks.setdefault(key, [0, shape_of(n)[0]])[0] += shape_of(n)[1]
        buckets = {}                                 # (rows, cols, spec) -> stacks: one solve each
        for (_, spec), (r, c) in stacks.items():
            buckets[(r, c, spec)] = buckets.get((r, c, spec), 0) + 1
        keys = {(n.rpartition(".")[0], shape_of(n)[0]) for n in g}     # linears reading one tensor share one
        hb = sum(c * c * FP32 for _, c in keys)
        solve_groups.append((hb, sum(shape_of(n)[0] * shape_of(n)[1] * FP32 for n in g),
                             tuple((k, r, c) for (r, c, _), k in buckets.items())))
        if hb > best:
            best, hess = hb, hb
            fp32_w = sum(shape_of(n)[0] * shape_of(n)[1] * FP32 for n in g)
            name = _group_name(g)
    # activations per token
    plain_out = sum(shape_of(n)[1] for g in adapter.sequential_groups(layer) for n in g if n not in expert_of)
    act = 4 * hidden * b + plain_out * b          # residual, norm, attention and MLP outputs
    experts = 0                                   # a propagate pass: one expert's tokens at a time
    for blk in blocks:
        one = blk.expert_linear_names(0)
        act += 2 * blk.num_experts * FP32         # router logits and probabilities
        share = min(1.0, 2 * blk.top_k / max(blk.num_experts, 1))
        experts += int(share * (sum(shape_of(n)[1] for n in one) + shape_of(one[0])[1]) * b)
    group_in = max((sum(shape_of(n)[0] * (expert_of[n].top_k if n in expert_of else 1)
                        for n in {_input_of(n, expert_of): n for n in g}.values()) for g in groups if g), default=0)
    act += max(2 * group_in * b, experts)         # a collect pass's buffered inputs, or the experts
    down_in = sum(blk.top_k * shape_of(blk.expert_linear_names(0)[0])[1] * b for blk in blocks)
    return LayerShape(_nbytes(layer.parameters()), hess, fp32_w, act, name, tuple(solve_groups), down_in)


def _input_of(name: str, expert_of: dict) -> str:
    """Which buffered input a linear reads: every routed expert of a block reads the block's tokens (top_k
    rows each, counted once per block); other linears one per parent module (q/k/v share one)."""
    blk = expert_of.get(name)
    if blk is not None:
        return f"{blk.name}:{name.rpartition('.')[2]}" if name.endswith(blk.proj_names[2]) else f"{blk.name}:in"
    return name.rpartition(".")[0]


def _group_name(group: list[str]) -> str:
    import re
    names = list(dict.fromkeys(re.sub(r"\.\d+\.", ".*.", n) for n in group))
    return ", ".join(names[:3]) + (f" +{len(names) - 3}" if len(names) > 3 else "")


def model_shape(model, adapter, specs: dict, true_sequential: bool = True) -> ModelShape:
    """The ModelShape of a model (meta skeleton or loaded): every decoder layer's LayerShape."""
    linears = {n: (c_in, c_out) for n, c_in, c_out in adapter.linear_modules(model)}
    layers = adapter.decoder_layers(model)
    in_layers = {id(p) for p in layers.parameters()}
    outside = [p for p in model.parameters() if id(p) not in in_layers]      # tied weights counted once
    embed = adapter.embed_fn(model)
    embed_bytes = _nbytes(embed.parameters()) if hasattr(embed, "parameters") else 0
    first = next(iter(layers.parameters()), None)
    hidden = int(getattr(model.config, "hidden_size", None) or getattr(embed, "weight").shape[-1])
    shapes = [layer_shape(adapter, model, i, specs, linears, hidden, true_sequential) for i in range(len(layers))]
    return ModelShape(hidden_size=hidden, dtype_bytes=first.element_size() if first is not None else 2,
                      embed_bytes=embed_bytes, outside_bytes=_nbytes(outside), layers=shapes)


def plan_memory(cfg, model, adapter, specs) -> dict:
    """`estimate_peak_memory` for a run config: calibration, eval and trainer settings."""
    ev, cal = cfg.eval, cfg.calibration
    streams = (1 + int(ev.before) + int(ev.rtn)) if ev.enabled else 0
    devices = cfg.trainer.devices if isinstance(cfg.trainer.devices, int) else 1
    shape = model_shape(model, adapter, specs, cfg.gptq.true_sequential)
    layers = adapter.decoder_layers(model)
    reuse = (cal.reuse_attention and cfg.gptq.true_sequential and not cfg.gptq.asymmetric and len(layers) > 0
             and adapter.attention_reuse(layers[0]) is not None)

    def estimate(chunk):
        return estimate_peak_memory(shape, num_samples=cal.num_samples, seq_len=cal.seq_len, batch_size=cal.batch_size,
                                    eval_windows=ev.max_windows if streams else 0, eval_seq_len=ev.seq_len,
                                    eval_batch_size=ev.batch_size, eval_streams=streams, rtn=ev.enabled and ev.rtn,
                                    gpu=cfg.trainer.accelerator != "cpu", devices=devices,
                                    cache_on_host=getattr(cal, "cache_device", "auto") == "cpu",
                                    expert_chunk=chunk, asymmetric=cfg.gptq.asymmetric, reuse_attention=reuse)
    est = estimate(cfg.gptq.expert_chunk)
    one = estimate(1)                 # the least the solve can take: what a smaller GPU would need
    est["gpu_total_chunk_1"], est["host_total_chunk_1"] = one["gpu_total"], one["host_total"]
    est["eval_windows_unknown"] = bool(streams) and ev.max_windows is None
    return est


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def render_memory(cfg, est: dict) -> str:
    """The plan's memory lines."""
    cal = cfg.calibration
    head = (f"memory estimate (calibration.batch_size {cal.batch_size}, num_samples {cal.num_samples} x seq_len "
            f"{cal.seq_len}, {cfg.model.dtype}):")
    gpu = (f"peak GPU memory ~{_gib(est['gpu_total'])} per GPU" if est["gpu"]
           else "peak GPU memory: none (trainer.accelerator is cpu)")
    lines = [head, f"  {gpu}, peak host memory ~{_gib(est['host_total'])}"]
    if est["gpu"]:
        lines.append("  GPU: " + ", ".join(f"{k} {_gib(v)}" for k, v in est["gpu"].items()))
    lines.append("  host: " + ", ".join(f"{k} {_gib(v)}" for k, v in est["host"].items()))
    if est.get("largest_group"):
        lines.append(f"  largest Hessian group: {est['largest_group']}")
    if est.get("bucket_stacks", 1) > 1:
        c, n = est.get("expert_chunk", 0), est["bucket_stacks"]
        per = f"{min(c, n)} at a time" if isinstance(c, int) and c > 0 else f"all {n} at once"
        if c == "auto":
            per += " where the GPU has room, else fewer" if est["gpu"] else " (a CPU run)"
        total = (f", peak GPU memory ~{_gib(est['gpu_total_chunk_1'])}" if est["gpu"] and "gpu_total_chunk_1" in est
                 else "")
        one = "" if c == 1 else f"; with gptq.expert_chunk 1: {_gib(est['solve_chunk_1'])}{total}"
        lines.append(f"  GPTQ solve: up to {n} experts per bucket, {per} (gptq.expert_chunk {c}): solve term "
                     f"{_gib(est['solve'])}{one}")
    if est.get("eval_windows_unknown"):
        where = "GPU" if est["gpu"] else "host"
        lines.append(f"  plus {_gib(est['per_eval_window'])} of {where} memory per evaluation window (eval.max_windows "
                     f"is not set: their number is known once the data is read)")
    return "\n".join(lines)
