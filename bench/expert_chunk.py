"""gptq.expert_chunk on a GPU: (1) chunked vs one-call gptq_quantize results on CUDA, (2) the GPTQ solve's peak
GPU memory and time for a Mixtral-8x7B down_proj bucket (8 experts, W [4096, 14336], H [14336, 14336]) per chunk,
through the solve callback, optionally under torch.cuda.set_per_process_memory_fraction.

    PYTHONPATH=. python bench/expert_chunk.py [--gpu-memory-gib 24] [--out results.json]

Not a test: CUDA only. The whole pipeline under a memory cap is bench/e2e.py --gpu-memory-gib X --expert-chunk N.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import types

import torch


def _lightning_stub():
    """callbacks/ subclass lightning's Callback; an image with only pytorch_lightning (or neither) still runs this."""
    try:
        import lightning.pytorch.callbacks  # noqa: F401
        return
    except ImportError:
        pass
    mods = {n: types.ModuleType(n) for n in ("lightning", "lightning.pytorch", "lightning.pytorch.callbacks")}
    mods["lightning.pytorch.callbacks"].Callback = type("Callback", (), {})
    sys.modules.update(mods)


def identity_check(E=8, R=1024, C=2048, chunks=(1, 2, 3)) -> list[dict]:
    """gptq_quantize on all E experts vs on consecutive chunks of them: fraction of codes and weights that differ."""
    from alphaquant.formats import get_format
    from alphaquant.gptq import gptq_quantize
    g = torch.Generator(device="cuda").manual_seed(0)
    X = torch.randn(E, 4 * C, C, device="cuda", generator=g) * torch.linspace(0.1, 3, C, device="cuda")
    H = X.transpose(1, 2) @ X / X.shape[1]
    del X
    W = torch.randn(E, R, C, device="cuda", generator=g) * 0.02
    rows = []
    for fused in (None, False):
        for act_order, search in ((True, "mse"), (False, "none")):
            fmt = get_format("int4", group_size=128)
            kw = dict(act_order=act_order, scale_search=search, fused=fused)
            full = gptq_quantize(W, H, fmt, **kw)
            for k in chunks:
                parts = [gptq_quantize(W[a:a + k], H[a:a + k], fmt, **kw) for a in range(0, E, k)]
                codes = torch.cat([p.qtensor.codes for p in parts])
                weight = torch.cat([p.weight for p in parts])
                loss = torch.cat([p.loss for p in parts])
                rows.append({"fused": fused is None, "act_order": act_order, "scale_search": search, "chunk": k,
                             "codes_equal": bool(torch.equal(codes, full.qtensor.codes)),
                             "codes_diff_frac": float((codes != full.qtensor.codes).float().mean()),
                             "weight_equal": bool(torch.equal(weight, full.weight)),
                             "loss_max_rel_diff": float(((loss - full.loss).abs() / full.loss.abs().clamp_min(1e-30)).max())})
                print(json.dumps(rows[-1]), flush=True)
    return rows


class _Layer(torch.nn.Module):
    def __init__(self, E, hidden, inter):
        super().__init__()
        self.experts = torch.nn.ModuleList()
        for _ in range(E):
            m = torch.nn.Module()
            m.w2 = torch.nn.Linear(inter, hidden, bias=False, device="cuda", dtype=torch.bfloat16)
            torch.nn.init.normal_(m.w2.weight, std=0.02)
            self.experts.append(m)


def memory_run(chunk, E=8, hidden=4096, inter=14336, tokens=16384, asymmetric=False) -> dict:
    """One GPTQSolve pass over the w2 bucket: peak GPU memory above what existed before it (Hessians, weights)."""
    from types import SimpleNamespace

    from alphaquant.callbacks.solve import GPTQSolve
    from alphaquant.config.recipe import resolve_recipe
    from alphaquant.config.run import load_config
    from alphaquant.gptq import HessianState
    torch.cuda.empty_cache()
    torch.manual_seed(0)
    layer = _Layer(E, hidden, inter)
    g = torch.Generator(device="cuda").manual_seed(0)
    states, keys = {}, {}
    for e in range(E):
        st = HessianState.zeros(inter, device="cuda")
        x = torch.randn(tokens, inter, device="cuda", generator=g, dtype=torch.bfloat16)
        st.H.add_((x.T @ x).float())
        st.n_tokens += tokens
        st.weight_sum += tokens
        del x
        keys[f"experts.{e}.w2"] = f"experts.{e}.w2"
        states[f"experts.{e}.w2"] = st
    collector = SimpleNamespace(keys=keys, states=states, asymmetric=False)
    cfg = load_config(None, ["--model.path", "unused"])
    specs = resolve_recipe(cfg.quant, [(n, m.in_features, m.out_features) for n, m in layer.named_modules()
                                       if isinstance(m, torch.nn.Linear)])
    gq = cfg.gptq
    opts = dict(block_size=gq.block_size, damp=gq.damp, act_order=gq.act_order, static_groups=gq.static_groups,
                fused=None, scale_search=gq.scale_search)
    solve = GPTQSolve(collector, specs, lambda i: "", opts, expert_chunk=chunk)
    runner = SimpleNamespace(plan=SimpleNamespace(phase="collect", layer_index=0), block=layer)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    out = {"chunk": chunk, "before_gib": base / 2**30}
    try:
        solve.on_predict_end(None, runner)
        torch.cuda.synchronize()
        out.update(seconds=time.perf_counter() - t0, used_chunk=list(solve.chunks.values()),
                   solve_peak_gib=(torch.cuda.max_memory_allocated() - base) / 2**30,
                   peak_reserved_gib=torch.cuda.max_memory_reserved() / 2**30,
                   mean_rel_error=sum(r.rel_error for r in solve.records.values()) / len(solve.records))
    except torch.OutOfMemoryError as e:
        out.update(oom=str(e).splitlines()[0][:200], seconds=time.perf_counter() - t0)
    del solve, layer, collector, states
    torch.cuda.empty_cache()
    print(json.dumps(out), flush=True)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gpu-memory-gib", type=float, default=0.0, help="cap (set_per_process_memory_fraction); 0 = none")
    p.add_argument("--chunks", default="0,auto,4,2,1")
    p.add_argument("--skip-identity", action="store_true")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    _lightning_stub()
    res = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "cap_gib": args.gpu_memory_gib}
    if not args.skip_identity:
        res["identity"] = identity_check()
    if args.gpu_memory_gib > 0:
        torch.cuda.set_per_process_memory_fraction(
            min(1.0, args.gpu_memory_gib * 2**30 / torch.cuda.get_device_properties(0).total_memory))
    res["memory"] = [memory_run(int(c) if c.isdigit() else c) for c in args.chunks.split(",")]
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    return res


if __name__ == "__main__":
    main()
