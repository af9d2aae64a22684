"""Quality on trained MoEs: perplexity gap to fp of RTN, llm-compressor GPTQ and our GPTQ options.

    PYTHONPATH=. python bench/quality.py --out bench/results/quality.json                       # the full grid
    PYTHONPATH=. python bench/quality.py --formats w3g64,w4g128 --llmc-python /work/venv-llmc/bin/python
    PYTHONPATH=. python bench/quality.py --quick --out /tmp/q.json                              # CI smoke, < 1 min

Models (bench/quality_models.py): OLMoE, Qwen2-MoE and Mixtral, 4 layers, hidden 128, 8 experts top-2,
trained with transformers' own classes on demo/corpus/train.txt, seeded and cached under --cache-dir
(default ~/.cache/alphaquant/quality-models, or $ALPHAQUANT_CACHE); --quick uses the shipped demo/olmoe-tiny
instead (no training).

For every model, format and calibration seed, every method sees the SAME windows: calibration windows
drawn by `alphaquant.data.calibration_windows` from the tokens of train.txt (what our pipeline draws for
that seed; checked against the windows our run used), evaluation on the first --eval-windows
non-overlapping windows of demo/corpus/test.txt. Perplexity is computed by one function for every
method (our model code in float32, exp of the mean next-token cross-entropy), from the method's
dequantized weights.

Methods: fp; rtn and rtn_mse (round-to-nearest with plain / MSE-searched scales: no calibration, the
same for every seed); llmc (llm-compressor's oneshot + GPTQModifier, experts linearised with
`load_quantizable_moe` as bench/e2e.py does, its defaults otherwise: static act order, all experts
calibrated, dampening 0.01; run as a subprocess of --llmc-python, skipped with a line if that cannot
import llmcompressor); ours with one option changed at a time from the defaults (act_order,
hessian uniform, true_sequential false, damp 0.1, scale_search mse / mse_hdiag).

Formats (routers, shared-expert gates and lm_head kept): w3g64 / w4g64 / w4g128 (every linear of the
decoder layers int3/int4, symmetric), mxfp4 (routed experts MXFP4 g32, the rest int4 g128).

Output: one table (mean over seeds of the gap ppl - ppl_fp, its spread min..max, and the ratio of the
mean gap to llm-compressor's), the JSON (--out) with every perplexity, and a .md beside it.
Scratch (our checkpoints, llm-compressor's weights) lives in a temporary directory removed at the end.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

FORMATS = {   # name -> (quant.default, quant.overrides, llm-compressor config group kind)
    "w3g64": ({"wq": "int3", "group_size": 64, "sym": True}, [], "int3g64"),
    "w4g64": ({"wq": "int4", "group_size": 64, "sym": True}, [], "int4g64"),
    "w4g128": ({"wq": "int4", "group_size": 128, "sym": True}, [], "int4g128"),
    "mxfp4": ({"wq": "int4", "group_size": 128, "sym": True}, [{"pattern": "*.experts.*", "wq": "mxfp4"}], "mxfp4"),
    # quant.budget_bits (alphaquant/gptq/budget.py): per module one of int2/3/4/8 at group 64 (2.25/3.25/4.25/8.25
    # bits incl. fp16 scales), least routing-weighted output error within the average; ours only (no llmc kind)
    # the uniform recipes of the budgets' sizes (16-bit scales: g32 = 3.5 bits; per row 3 + 16/C, 3.125 at C = 128)
    "w3g32": ({"wq": "int3", "group_size": 32, "sym": True}, [], None),
    "w3pc": ({"wq": "int3", "group_size": -1, "sym": True}, [], None),
    "budget3.0": ({"wq": "int4", "group_size": 64, "sym": True}, [], None),
    "budget3.25": ({"wq": "int4", "group_size": 64, "sym": True}, [], None),
    "budget3.5": ({"wq": "int4", "group_size": 64, "sym": True}, [], None),
    # the same 3.0 bits with group-128 candidates too (int2/3/4 at 2.125 / 3.125 / 4.125 bits)
    "budget3.0+g128": ({"wq": "int4", "group_size": 64, "sym": True}, [], None),
}
GRID_FORMATS = ("w3g64", "w4g64", "w4g128", "mxfp4")
BUDGETS = {f: {"budget_bits": float(f[6:].split("+")[0]),
               "budget_candidates": ["int2", "int3", "int4", "int8"] + (
                   ["int2/128", "int3/128", "int4/128"] if f.endswith("+g128") else [])}
           for f in FORMATS if f.startswith("budget")}
DEFAULTS = {"act_order": False, "damp": 0.01, "true_sequential": True, "scale_search": "none", "hessian": "routed"}
OURS = {   # method -> changes from DEFAULTS
    "gptq": {},
    "act_order": {"act_order": True},
    "uniform": {"hessian": "uniform"},
    "routed_sq": {"hessian": "routed_sq"},
    "act_order+routed_sq": {"act_order": True, "hessian": "routed_sq"},
    "act_order+uniform": {"act_order": True, "hessian": "uniform"},
    "no_true_seq": {"true_sequential": False},
    "damp0.1": {"damp": 0.1},
    "mse": {"scale_search": "mse"},
    "mse_hdiag": {"scale_search": "mse_hdiag"},
    "act_order+mse": {"act_order": True, "scale_search": "mse"},
    "act_order+mse+uniform": {"act_order": True, "scale_search": "mse", "hessian": "uniform"},
    "act_order+mse+routed_sq": {"act_order": True, "scale_search": "mse", "hessian": "routed_sq"},
    "act_order+mse_hdiag": {"act_order": True, "scale_search": "mse_hdiag"},
    # gptq.asymmetric (GPTAQ, alphaquant/gptq/gptaq.py): solve toward the fp layer's outputs on fp inputs
    "act_order+mse+gptaq": {"act_order": True, "scale_search": "mse", "asymmetric": True},
    "act_order+mse+routed_sq+gptaq": {"act_order": True, "scale_search": "mse", "hessian": "routed_sq", "asymmetric": True},
    # calibration.dataset self (EBSS, alphaquant/data_self.py): windows the fp model writes itself, expert-balanced
    "act_order+mse+ebss": {"act_order": True, "scale_search": "mse", "dataset": "self"},
    "act_order+mse+routed_sq+ebss": {"act_order": True, "scale_search": "mse", "hessian": "routed_sq", "dataset": "self"},
}
ARCHS = ("olmoe", "qwen2_moe", "mixtral", "olmoe_demo")   # olmoe_demo: the shipped demo/olmoe-tiny (longer trained)
DEMO_MODEL = ROOT / "demo" / "olmoe-tiny"
ROUTER_IGNORE = ["lm_head", "re:.*mlp\\.gate$", "re:.*block_sparse_moe\\.gate$", "re:.*shared_expert_gate$"]


def log(msg: str) -> None:
    print(f"[quality] {msg}", flush=True)


# ------------------------------------------------------------------------------------------------ data
def tokens_of(tokenizer_dir: Path, path: Path) -> torch.Tensor:
    from alphaquant.data import tokenize
    from transformers import AutoTokenizer
    return tokenize(path.read_text(encoding="utf-8"), AutoTokenizer.from_pretrained(tokenizer_dir))


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, batch: int = 16) -> float:
    """exp(mean next-token NLL) over [N, S] windows, each scored on its S - 1 predictions."""
    nll, n = 0.0, 0
    for i in range(0, len(windows), batch):
        x = windows[i:i + batch]
        logits = model(x)[:, :-1].float()
        nll += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                                 reduction="sum").item()
        n += x[:, 1:].numel()
    return math.exp(nll / n)


class Evaluator:
    """The fp model of one checkpoint; perplexity of any set of replaced weights on the same windows."""

    def __init__(self, model_dir: Path, windows: torch.Tensor):
        from alphaquant import models
        self.model = models.from_pretrained(model_dir, dtype="fp32").eval()
        self.windows = windows
        self.fp = {k: v.clone() for k, v in self.model.state_dict().items()}

    def ppl(self, weights: dict | None = None) -> float:
        sd = self.model.state_dict()
        missing = sorted(set(weights or {}) - set(sd))
        if missing:
            raise KeyError(f"weights for parameters the model does not have: {missing[:3]}")
        for k, v in (weights or {}).items():
            sd[k].copy_(v.to(sd[k].dtype))
        try:
            return perplexity(self.model, self.windows)
        finally:
            for k in weights or {}:
                sd[k].copy_(self.fp[k])


# ------------------------------------------------------------------------------------------------ ours
def our_config(model_dir: Path, tokens_pt: Path, fmt: str, seed: int, opts: dict, args, out_dir: Path) -> dict:
    default, overrides, _ = FORMATS[fmt]
    return {
        "name": "quality",
        "model": {"path": str(model_dir), "dtype": "float32", "lazy": False},
        "calibration": {"dataset": str(tokens_pt), "split": "all", "num_samples": args.samples,
                        "seq_len": args.seq_len, "seed": seed, "batch_size": 16, "hessian": opts["hessian"],
                        **({"dataset": "self"} if opts.get("dataset") == "self" else {})},
        "eval": {"enabled": False},
        "quant": {"default": dict(default), "overrides": [dict(o) for o in overrides], **BUDGETS.get(fmt, {})},
        "gptq": {"block_size": 128, "damp": opts["damp"], "act_order": opts["act_order"], "static_groups": True,
                 "true_sequential": opts["true_sequential"], "scale_search": opts["scale_search"],
                 "asymmetric": opts.get("asymmetric", False)},
        "trainer": {"accelerator": "cpu", "devices": 1},
        "logging": {"wandb": {"mode": "disabled"}, "csv": {"enabled": False}},
        "output": {"dir": str(out_dir), "overwrite": True, "save": True, "resume": False, "format": "dequantized"},
    }


def run_ours(model_dir, tokens_pt, fmt, seed, opts, args, work: Path, expect_windows: torch.Tensor) -> dict:
    """Our pipeline on the model; returns the dequantized weights of the quantized linears."""
    import contextlib
    import io

    import yaml
    from safetensors.torch import load_file

    from alphaquant.config.run import load_config
    from alphaquant.pipeline.session import CalibrationSession

    out = work / "ours_out"
    shutil.rmtree(out, ignore_errors=True)
    cfg_path = work / "ours.yaml"
    cfg_path.write_text(yaml.safe_dump(our_config(model_dir, tokens_pt, fmt, seed, opts, args, out), sort_keys=False))
    session = CalibrationSession(load_config(str(cfg_path), []))
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        session.prepare()
        session.run()
    if "budget" in session.results:
        b = session.results["budget"]
        log(f"{fmt}: average {b['average_bits']:.3f} bits (budget {b['budget_bits']}); {b['modules_per_format']}")
    if opts.get("dataset") == "self":     # self-generated windows: llm-compressor's are not them, only their shape
        if session.windows["calib"].shape != expect_windows.shape:
            raise RuntimeError(f"our self-generated windows are {tuple(session.windows['calib'].shape)}, "
                               f"not {tuple(expect_windows.shape)}")
    elif not torch.equal(session.windows["calib"].cpu(), expect_windows):
        raise RuntimeError("our run calibrated on other windows than the benchmark gives llm-compressor")
    solved = {n + ".weight" for n, s in session.specs.items() if not s.skip}
    weights = {}
    for f in sorted(out.glob("*.safetensors")):
        weights.update({k: v for k, v in load_file(f).items() if k in solved})
    if len(weights) != len(solved):
        raise RuntimeError(f"our checkpoint holds {len(weights)} of the {len(solved)} quantized linears")
    shutil.rmtree(out, ignore_errors=True)
    return weights


def quant_config(fmt: str):
    from alphaquant.config.quant import QuantConfig, QuantOverride, QuantRule
    default, overrides, _ = FORMATS[fmt]
    qc = QuantConfig(default=QuantRule(**default), overrides=[QuantOverride(**o) for o in overrides])
    for i, o in enumerate(qc.overrides):
        o.check(f"quant.overrides[{i}]")
    return qc


def rtn_weights(model_dir: Path, fmt: str, scale_search: str, fp: dict) -> dict:
    """Round-to-nearest of every linear our recipe quantizes (plain or MSE-searched scales)."""
    from alphaquant.gptq.scale_search import choose_params
    from alphaquant.config.recipe import build_format

    out = {}
    for name, spec in _solved_specs(model_dir, quant_config(fmt)).items():
        f, w = build_format(spec), fp[name + ".weight"].float()
        out[name + ".weight"] = f.round_with(w, choose_params(f, w, scale_search))
    return out


def _solved_specs(model_dir: Path, qc) -> dict:
    """Module name -> QuantSpec of the linears the pipeline solves (decoder-layer linears, not routers)."""
    from alphaquant.arch import load_model
    from alphaquant.config.run import ModelConfig
    from alphaquant.config.recipe import resolve_recipe

    model, adapter = load_model(ModelConfig(path=str(model_dir), dtype="float32", lazy=False), skeleton_only=True)
    specs = resolve_recipe(qc, adapter.linear_modules(model))
    solved = set()
    for i, layer in enumerate(adapter.decoder_layers(model)):
        prefix = adapter.layer_prefix(i)
        solved.update(prefix + n for g in adapter.sequential_groups(layer) for n in g)
    return {n: s for n, s in specs.items() if n in solved and not s.skip}


# ------------------------------------------------------------------------------------------------ llm-compressor
def llmc_env() -> dict:
    """llm-compressor's stage sees its own packages only, not ours: PYTHONPATH is QUALITY_LLMC_PYTHONPATH
    (e.g. wheels unpacked into a folder on a machine without a venv for it), else empty."""
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.environ.get("QUALITY_LLMC_PYTHONPATH", ""))


def llmc_python(args) -> str | None:
    """The interpreter that runs llm-compressor's stage, or None (with the reason printed)."""
    py = args.llmc_python or sys.executable
    r = subprocess.run([py, "-c", "import llmcompressor, sys; print(llmcompressor.__version__)"],
                       capture_output=True, text=True, env=llmc_env())
    if r.returncode != 0:
        log(f"llm-compressor is not importable by {py} (pass --llmc-python PATH to a venv that has it): "
            "its rows are skipped")
        return None
    log(f"llm-compressor {r.stdout.strip().splitlines()[-1]} from {py}")
    return py


def stage_llmc(a) -> None:
    """In the llm-compressor interpreter: oneshot GPTQ on the windows, dequantized linears to a file."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modeling.moe.linearize import load_quantizable_moe
    from llmcompressor.modifiers.gptq import GPTQModifier
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    windows = torch.load(a.windows)
    ds = Dataset.from_dict({"input_ids": windows.tolist(), "attention_mask": torch.ones_like(windows).tolist()})
    tok = AutoTokenizer.from_pretrained(a.model)
    # transformers' apply_patches (which load_quantizable_moe uses) calls dir() on every loaded transformers
    # module; a lazy one whose import needs a missing optional package (aria's image processor: torchvision)
    # raises there. Such modules cannot be used anyway: drop them from sys.modules first.
    for name, mod in list(sys.modules.items()):
        if name.startswith("transformers") and mod is not None:
            try:
                dir(mod)
            except Exception:        # noqa: BLE001 - any import failure inside a lazy module
                del sys.modules[name]
    with load_quantizable_moe():
        model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    intargs = lambda b, g: QuantizationArgs(num_bits=b, type="int", symmetric=True, strategy="group",  # noqa: E731
                                            group_size=g)
    kind = a.kind
    if kind == "mxfp4":
        from compressed_tensors.quantization.quant_scheme import MXFP4A16
        groups = {"experts": QuantizationScheme(targets=["re:.*experts\\..*"], **MXFP4A16),
                  "rest": QuantizationScheme(targets=["Linear"], weights=intargs(4, 128))}
    else:
        bits, g = int(kind[3]), int(kind.split("g")[1])
        groups = {"all": QuantizationScheme(targets=["Linear"], weights=intargs(bits, g))}
    recipe = GPTQModifier(config_groups=groups, ignore=ROUTER_IGNORE, block_size=128, dampening_frac=0.01)
    oneshot(model=model, dataset=ds, recipe=recipe, processor=tok, max_seq_length=windows.shape[1],
            num_calibration_samples=len(windows), shuffle_calibration_samples=False, batch_size=1)
    out, args_seen = {}, set()
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and hasattr(mod, "weight_scale") and ".layers." in name:
            out[name + ".weight"] = mod.weight.detach().float().contiguous().clone()
            qa = getattr(getattr(mod, "quantization_scheme", None), "weights", None)
            if qa is not None:
                args_seen.add(f"{qa.type}{qa.num_bits} g{qa.group_size} actorder={qa.actorder}")
    save_file(out, a.result)
    Path(a.result + ".json").write_text(json.dumps({"args": sorted(args_seen), "linears": len(out)}))


def run_llmc(py: str, model_dir: Path, fmt: str, windows: torch.Tensor, work: Path, our_keys: set) -> tuple:
    from safetensors.torch import load_file

    wpath, res = work / "llmc_windows.pt", work / "llmc_weights.safetensors"
    torch.save(windows, wpath)
    cmd = [py, str(Path(__file__).resolve()), "--stage", "llmc", "--model", str(model_dir), "--windows", str(wpath),
           "--kind", FORMATS[fmt][2], "--result", str(res)]
    env = llmc_env()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"llm-compressor stage failed:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
    raw, meta = load_file(res), json.loads(Path(str(res) + ".json").read_text())
    weights = {}
    for k, v in raw.items():      # transformers' module names -> the checkpoint's (Mixtral: mlp -> block_sparse_moe)
        key = k
        if key not in our_keys:   # llm-compressor linearises Mixtral's experts as gate/up/down_proj (hub: w1/w3/w2)
            key = k.replace(".mlp.", ".block_sparse_moe.")
            for a, b in ((".gate_proj.", ".w1."), (".up_proj.", ".w3."), (".down_proj.", ".w2.")):
                key = key.replace(a, b) if ".experts." in key else key
        if key not in our_keys:
            raise KeyError(f"llm-compressor quantized {k}, which the model does not have")
        weights[key] = v
    if set(weights) != our_keys:
        raise RuntimeError(f"llm-compressor quantized {len(weights)} linears, ours {len(our_keys)}: "
                           f"missing {sorted(our_keys - set(weights))[:3]}")
    for p in (wpath, res, Path(str(res) + ".json")):
        p.unlink(missing_ok=True)
    return weights, meta


# ------------------------------------------------------------------------------------------------ driver
def bench_model(arch: str, model_dir: Path, args, work: Path, llmc_py: str | None, rows: list, out=None) -> None:
    """Every format, seed and method on one model; rows appended (and dumped to OUT.partial.json as they come)."""
    from alphaquant.data import calibration_windows, eval_windows

    tokens = tokens_of(model_dir, ROOT / "demo" / "corpus" / "train.txt")
    tokens_pt = work / f"{arch}_train_tokens.pt"
    torch.save(tokens, tokens_pt)
    test = eval_windows(tokens_of(model_dir, ROOT / "demo" / "corpus" / "test.txt"), args.seq_len, args.eval_windows)
    ev = Evaluator(model_dir, test)
    t0 = time.perf_counter()
    fp = ev.ppl()
    rows.append({"model": arch, "format": None, "method": "fp", "seed": None, "ppl": fp})
    log(f"{arch}: fp ppl {fp:.3f} on {len(test)} x {args.seq_len} test tokens ({time.perf_counter() - t0:.1f} s)")
    for fmt in args.formats:
        our_keys = {n + ".weight" for n in _solved_specs(model_dir, quant_config(fmt))}
        for method in args.methods:
            if method in ("rtn", "rtn_mse"):
                ppl = ev.ppl(rtn_weights(model_dir, fmt, "mse" if method == "rtn_mse" else "none", ev.fp))
                rows.append({"model": arch, "format": fmt, "method": method, "seed": None, "ppl": ppl})
                log(f"{arch} {fmt} {method}: ppl {ppl:.3f}")
        for seed in args.seeds:
            windows = calibration_windows(tokens, args.samples, args.seq_len, seed=seed)
            for method in args.methods:
                if method in ("fp", "rtn", "rtn_mse") or (method == "llmc" and (llmc_py is None or FORMATS[fmt][2] is None)):
                    continue            # llmc: not importable, or a format it has no scheme for (ours only)
                t0 = time.perf_counter()
                extra = {}
                if method == "llmc":
                    try:
                        weights, extra = run_llmc(llmc_py, model_dir, fmt, windows, work, our_keys)
                    except (RuntimeError, KeyError) as e:      # its row is left out, the rest goes on
                        log(f"{arch} {fmt} seed {seed} llmc: skipped ({str(e).splitlines()[0]}; last lines: "
                            f"{' | '.join(str(e).strip().splitlines()[-2:])})")
                        continue
                else:
                    weights = run_ours(model_dir, tokens_pt, fmt, seed, {**DEFAULTS, **OURS[method]}, args, work,
                                       windows)
                ppl = ev.ppl(weights)
                dt = time.perf_counter() - t0
                rows.append({"model": arch, "format": fmt, "method": method, "seed": seed, "ppl": ppl,
                             "seconds": round(dt, 1), **({"llmc": extra} if extra else {})})
                log(f"{arch} {fmt} seed {seed} {method}: ppl {ppl:.3f} (gap {ppl - fp:+.3f}, {dt:.0f} s)")
                if out:       # a long run keeps what it measured so far
                    Path(str(out) + ".partial.json").write_text(json.dumps(rows, indent=1) + "\n")


def summarize(rows: list, args) -> list:
    """Per model, format and method: mean / min / max of the gap to fp over seeds, ratio to llmc's mean gap."""
    fp = {r["model"]: r["ppl"] for r in rows if r["method"] == "fp"}
    out = []
    for arch in args.models:
        for fmt in args.formats:
            by = {}
            for r in rows:
                if r["model"] == arch and r["format"] == fmt:
                    by.setdefault(r["method"], []).append(r["ppl"] - fp[arch])
            llmc = by.get("llmc")
            llmc_mean = sum(llmc) / len(llmc) if llmc else None
            for m in [m for m in args.methods if m in by]:
                g = by[m]
                mean = sum(g) / len(g)
                out.append({"model": arch, "format": fmt, "method": m, "n": len(g), "gap_mean": mean,
                            "gap_min": min(g), "gap_max": max(g), "fp": fp[arch],
                            "ratio_to_llmc": mean / llmc_mean if llmc_mean and llmc_mean > 0 else None})
    return out


def averages(summary: list) -> list:
    """Per format and method, the mean over models of the ratio to llm-compressor and of the gap."""
    out = {}
    for s in summary:
        o = out.setdefault((s["format"], s["method"]), {"format": s["format"], "method": s["method"], "ratios": [],
                                                         "gaps": []})
        o["gaps"].append(s["gap_mean"])
        if s["ratio_to_llmc"] is not None:
            o["ratios"].append(s["ratio_to_llmc"])
    return [{"format": o["format"], "method": o["method"], "gap_mean_over_models": sum(o["gaps"]) / len(o["gaps"]),
             "ratio_to_llmc_mean": sum(o["ratios"]) / len(o["ratios"]) if o["ratios"] else None}
            for o in out.values()]


def render(result: dict) -> str:
    s = result["summary"]
    archs = list(dict.fromkeys(x["model"] for x in s))
    lines = [f"### Perplexity gap to fp (mean over calibration seeds {result['seeds']}, min..max; "
             f"x = ratio of the mean gap to llm-compressor's)", "",
             f"`{result['command']}`", "",
             f"{result['samples']} calibration windows x {result['seq_len']} tokens (train.txt), "
             f"{result['eval_windows']} x {result['seq_len']} evaluation tokens (test.txt); fp perplexity: "
             + ", ".join(f"{a} {result['fp'][a]:.3f}" for a in archs), "",
             "| format | method | " + " | ".join(archs) + " | mean x llmc |", "|---|---|" + "---|" * len(archs) + "---|"]
    avg = {(a["format"], a["method"]): a for a in result["averages"]}
    for fmt in result["formats"]:
        for m in result["methods"]:
            cells = []
            for a in archs:
                x = next((y for y in s if y["model"] == a and y["format"] == fmt and y["method"] == m), None)
                if x is None:
                    cells.append("-")
                    continue
                c = f"{x['gap_mean']:+.3f}"
                if x["n"] > 1:
                    c += f" ({x['gap_min']:+.2f}..{x['gap_max']:+.2f})"
                if x["ratio_to_llmc"] is not None and m != "llmc":
                    c += f" {x['ratio_to_llmc']:.2f}x"
                cells.append(c)
            if all(c == "-" for c in cells):
                continue
            r = avg.get((fmt, m), {}).get("ratio_to_llmc_mean")
            lines.append(f"| {fmt} | {m} | " + " | ".join(cells) + f" | {'-' if r is None or m == 'llmc' else f'{r:.2f}x'} |")
    return "\n".join(lines)


def merge(args, argv) -> dict:
    """One table from several runs (e.g. one per model, or a partial run): rows pooled, fp kept once per model."""
    rows, seen_fp = [], set()
    for f in args.merge:
        data = json.loads(Path(f).read_text())
        for r in data["rows"] if isinstance(data, dict) else data:
            if r["method"] == "fp":
                if r["model"] in seen_fp:
                    continue
                seen_fp.add(r["model"])
            rows.append(r)
    first = json.loads(Path(args.merge[0]).read_text())
    meta = first if isinstance(first, dict) else {}
    order = lambda key: list(dict.fromkeys(r[key] for r in rows if r[key] is not None))  # noqa: E731
    args.models, args.formats, args.methods = order("model"), order("format"), order("method")
    args.seeds = sorted({r["seed"] for r in rows if r["seed"] is not None})
    result = {"command": "PYTHONPATH=. python bench/quality.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
              "merged": args.merge, "models": args.models, "formats": args.formats, "methods": args.methods,
              "seeds": args.seeds, "samples": meta.get("samples", args.samples), "seq_len": meta.get("seq_len", args.seq_len),
              "eval_windows": meta.get("eval_windows", args.eval_windows), "rows": rows,
              "fp": {r["model"]: r["ppl"] for r in rows if r["method"] == "fp"}, "defaults": DEFAULTS, "options": OURS}
    result["summary"] = summarize(rows, args)
    result["averages"] = averages(result["summary"])
    table = render(result)
    print(table)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
        Path(args.out).with_suffix(".md").write_text(table + "\n")
    return result


def main(argv=None) -> dict | None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(ARCHS[:3]))
    p.add_argument("--formats", default=",".join(GRID_FORMATS),
                   help=f"default: the grid {','.join(GRID_FORMATS)}; also {','.join(f for f in FORMATS if f not in GRID_FORMATS)}")
    p.add_argument("--methods", default=",".join(["fp", "rtn", "rtn_mse", "llmc", *OURS]))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--samples", type=int, default=128, help="calibration windows")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--eval-windows", type=int, default=128)
    p.add_argument("--llmc-python", default=None, help="interpreter with llmcompressor (default: this one, if it has it)")
    p.add_argument("--no-llmc", action="store_true")
    p.add_argument("--cache-dir", type=Path, default=None, help="trained models (default: ~/.cache/alphaquant/quality-models)")
    p.add_argument("--train-steps", type=int, default=None, help="training steps of the three models (default: "
                   "bench/quality_models.TRAIN, 250: what 2 shared CPU cores train in ~10 min; far from converged)")
    p.add_argument("--train-batch", type=int, default=None, help="training windows per step (default 8)")
    p.add_argument("--train-device", default=None, help="where the three models train (default cpu; cuda on a GPU)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: two ran 10x slower on a shared 2-core machine)")
    p.add_argument("--quick", action="store_true", help="CI smoke: demo/olmoe-tiny, w3g64, fp/rtn/gptq, 2 seeds, small windows")
    p.add_argument("--keep", action="store_true", help="keep the scratch directory")
    p.add_argument("--out", default=None, help="JSON path (a .md table is written beside it)")
    p.add_argument("--stage", default=None, choices=["llmc"], help=argparse.SUPPRESS)
    for k in ("--model", "--windows", "--kind", "--result"):
        p.add_argument(k, default=None, help=argparse.SUPPRESS)
    p.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                   help="no run: one table from the rows of earlier runs' JSON (or .partial.json) files")
    args = p.parse_args(argv)
    if args.stage == "llmc":
        stage_llmc(args)
        return None
    if args.merge:
        return merge(args, argv)
    torch.set_num_threads(args.threads)
    import signal
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))     # a killed run still removes its scratch dir
    if args.quick:
        args.models, args.formats, args.methods, args.seeds = "olmoe", "w3g64", "fp,rtn,gptq", "0,1"
        args.samples, args.seq_len, args.eval_windows, args.no_llmc = 16, 128, 16, True
    args.models, args.formats = args.models.split(","), args.formats.split(",")
    args.methods, args.seeds = args.methods.split(","), [int(s) for s in args.seeds.split(",")]
    bad = [m for m in args.methods if m not in ("fp", "rtn", "rtn_mse", "llmc", *OURS)] + \
          [f for f in args.formats if f not in FORMATS] + [a for a in args.models if a not in ARCHS]
    if bad:
        p.error(f"unknown model/format/method {bad[0]!r}")
    llmc_py = None if args.no_llmc or "llmc" not in args.methods else llmc_python(args)
    if llmc_py is None:
        args.methods = [m for m in args.methods if m != "llmc"]
    from bench.quality_models import default_cache_dir, ensure_model
    cache = args.cache_dir or default_cache_dir()
    work = Path(tempfile.mkdtemp(prefix="aq-quality-"))
    command = "PYTHONPATH=. python bench/quality.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    rows, t0 = [], time.perf_counter()
    try:
        for arch in args.models:
            model_dir = DEMO_MODEL if args.quick or arch == "olmoe_demo" else ensure_model(
                arch, cache, log=log, steps=args.train_steps, batch_size=args.train_batch,
                device=args.train_device)
            bench_model(arch, model_dir, args, work, llmc_py, rows, args.out)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
            log(f"removed the scratch directory {work}")
    result = {"command": command, "models": args.models, "formats": args.formats, "methods": args.methods,
              "seeds": args.seeds, "samples": args.samples, "seq_len": args.seq_len, "eval_windows": args.eval_windows,
              "quick": args.quick, "model_dirs": {a: str(DEMO_MODEL) if args.quick or a == "olmoe_demo"
                                                  else str(ensure_model(a, cache, log=lambda m: None,
                                                                        steps=args.train_steps,
                                                                        batch_size=args.train_batch,
                                                                        device=args.train_device))
                                                  for a in args.models},
              "llmc_python": llmc_py, "torch": torch.__version__, "rows": rows,
              "fp": {r["model"]: r["ppl"] for r in rows if r["method"] == "fp"},
              "defaults": DEFAULTS, "options": OURS, "seconds": round(time.perf_counter() - t0, 1)}
    result["summary"] = summarize(rows, args)
    result["averages"] = averages(result["summary"])
    table = render(result)
    print(table)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1) + "\n")
        out.with_suffix(".md").write_text(table + "\n")
        Path(str(out) + ".partial.json").unlink(missing_ok=True)     # the run is complete: its rows are in OUT
    return result


if __name__ == "__main__":
    main()
