"""End to end at real model shapes: AlphaQuant vs llm-compressor GPTQ W4A16 g128, same checkpoint and tokens.

    PYTHONPATH=. python bench/e2e.py --out bench/results/e2e.json            # OLMoE-1B-7B, all 16 layers
    PYTHONPATH=. python bench/e2e.py --llmc-layers 4 ...                     # llm-compressor on a 4-layer cut
    PYTHONPATH=. python bench/e2e.py --quick --device cpu --no-llmc          # smoke run, tiny shapes, < 1 min
    # llm-compressor from a venv of its own (it pins transformers <= 5.17); the error stage maps its
    # linearised expert names onto ours (LLMC_RENAMES): the quick smoke run of that, a few minutes on a CPU
    E2E_PYTHONPATH_LLMC=/work/venv-llmc/lib/python3.11/site-packages PYTHONPATH=. \
        python bench/e2e.py --family mixtral --quick --device cpu --llmc-layers 1

Stages, each in its own process so that peak host memory (ru_maxrss) and peak GPU memory are
the stage's own:
  build   a random checkpoint with the family's real shapes (hub layout, per-expert keys, bf16,
          weights N(0, 0.02)), a throwaway tokenizer, and random calibration tokens; the windows are
          drawn with `alphaquant.data.calibration_windows`, exactly as our pipeline draws them.
  ours    `CalibrationSession` in-process from a config dict (int4 g128 symmetric for every linear
          of the decoder layers, routers and lm_head kept, eval off, checkpoint written), timed
          from model load to the last byte written; per-layer phases from the walker.
  llmc    llm-compressor's oneshot with GPTQModifier(targets Linear, scheme W4A16, ignore lm_head
          and the router gates), model loaded with its MoE linearisation, the compressed
          checkpoint saved; then the error measurement below (its memory is taken before that).
  errors  (run in the llmc process, or alone with --no-llmc) every decoder layer run with our
          model code over the calibration windows: the fp layer, our quantized layer (read back
          from our checkpoint) and llm-compressor's (its in-memory dequantized weights), each
          given (a) the fp layer's input ("local") and (b) its own model's previous output
          ("propagated"); reported as ||Y_q - Y_fp|| / ||Y_fp|| per layer.

Output: a table on stdout, the JSON (--out) and a markdown table beside it (.md) that
includes the exact command.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Hub config.json values of the real models (the fields our model code and transformers read).
SHAPES = {
    "olmoe": dict(  # allenai/OLMoE-1B-7B-0924
        model_type="olmoe", architectures=["OlmoeForCausalLM"], vocab_size=50304, hidden_size=2048,
        intermediate_size=1024, num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=16,
        num_experts=64, num_experts_per_tok=8, norm_topk_prob=False, max_position_embeddings=4096,
        rms_norm_eps=1e-5, rope_theta=10000.0, clip_qkv=None, attention_bias=False, tie_word_embeddings=False,
        hidden_act="silu", initializer_range=0.02, pad_token_id=1, eos_token_id=50279, bos_token_id=None),
    "qwen2_moe": dict(  # Qwen/Qwen1.5-MoE-A2.7B
        model_type="qwen2_moe", architectures=["Qwen2MoeForCausalLM"], vocab_size=151936, hidden_size=2048,
        intermediate_size=5632, moe_intermediate_size=1408, shared_expert_intermediate_size=5632,
        num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=16, num_experts=60,
        num_experts_per_tok=4, norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[],
        max_position_embeddings=8192, rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=False,
        hidden_act="silu", initializer_range=0.02, use_sliding_window=False, eos_token_id=151643),
    "mixtral": dict(  # mistralai/Mixtral-8x7B-v0.1
        model_type="mixtral", architectures=["MixtralForCausalLM"], vocab_size=32000, hidden_size=4096,
        intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
        num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=32768, rms_norm_eps=1e-5,
        rope_theta=1000000.0, sliding_window=None, tie_word_embeddings=False, hidden_act="silu",
        initializer_range=0.02, bos_token_id=1, eos_token_id=2),
    "deepseek": dict(  # deepseek-ai/deepseek-moe-16b-base (first layer dense, 2 shared + 64 routed experts)
        model_type="deepseek", architectures=["DeepseekForCausalLM"], vocab_size=102400, hidden_size=2048,
        intermediate_size=10944, moe_intermediate_size=1408, num_hidden_layers=28, num_attention_heads=16,
        num_key_value_heads=16, n_shared_experts=2, n_routed_experts=64, num_experts_per_tok=6,
        first_k_dense_replace=1, moe_layer_freq=1, norm_topk_prob=False, scoring_func="softmax",
        max_position_embeddings=4096, rms_norm_eps=1e-6, rope_theta=10000.0, attention_bias=False,
        tie_word_embeddings=False, hidden_act="silu", initializer_range=0.02, bos_token_id=100000,
        eos_token_id=100001),
    "qwen3_moe": dict(  # Qwen/Qwen3-30B-A3B: through the generic path (transformers' own Qwen3-MoE classes)
        model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"], vocab_size=151936, hidden_size=2048,
        intermediate_size=6144, moe_intermediate_size=768, num_hidden_layers=48, num_attention_heads=32,
        num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8, norm_topk_prob=True,
        decoder_sparse_step=1, mlp_only_layers=[], max_position_embeddings=40960, rms_norm_eps=1e-6,
        rope_theta=1000000.0, attention_bias=False, tie_word_embeddings=False, hidden_act="silu",
        initializer_range=0.02, use_sliding_window=False, bos_token_id=151643, eos_token_id=151645),
}
# families our local model code does not have: built, loaded and quantized through transformers' classes
GENERIC = {"qwen3_moe"}
NAMES = {"olmoe": "OLMoE-1B-7B", "qwen2_moe": "Qwen1.5-MoE-A2.7B", "mixtral": "Mixtral-8x7B",
         "deepseek": "DeepSeek-MoE-16B", "qwen3_moe": "Qwen3-30B-A3B"}
# --quick: same families, tiny widths (multiples of 128 so group size 128 divides every input)
QUICK = {"olmoe": dict(vocab_size=512, hidden_size=128, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=4, num_experts=8, num_experts_per_tok=2),
         "qwen2_moe": dict(vocab_size=512, hidden_size=128, intermediate_size=256, moe_intermediate_size=128,
                           shared_expert_intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=4, num_experts=8, num_experts_per_tok=2),
         "mixtral": dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, num_local_experts=4),
         "deepseek": dict(vocab_size=512, hidden_size=128, intermediate_size=256, moe_intermediate_size=128,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8,
                          num_experts_per_tok=2),
         "qwen3_moe": dict(vocab_size=512, hidden_size=128, intermediate_size=256, moe_intermediate_size=128,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                           num_experts=8, num_experts_per_tok=2, bos_token_id=None, eos_token_id=2)}
ROUTER_IGNORE = {"olmoe": ["re:.*mlp\\.gate$"], "qwen2_moe": ["re:.*mlp\\.gate$", "re:.*shared_expert_gate$"],
                 # transformers 5 names Mixtral's sparse block `mlp` (hub checkpoints: block_sparse_moe)
                 "mixtral": ["re:.*block_sparse_moe\\.gate$", "re:.*mlp\\.gate$"], "qwen3_moe": ["re:.*mlp\\.gate$"]}
# llm-compressor's module names (relative to a decoder layer) -> ours, per family. llm-compressor 0.14 loads
# through transformers 5, which fuses each block's experts (MixtralExperts, OlmoeExperts, ... [E, 2I, H] and
# [E, H, I]), and its load_quantizable_moe linearises them again into LinearExperts2D: per expert
# `mlp.experts.N.{gate_proj,up_proj,down_proj}` (llmcompressor/modeling/moe/linear_experts.py,
# ExpertMLPWithGate: gate = the first I rows of gate_up_proj, up = the rest). That is the hub layout of
# OLMoE, Qwen1.5-MoE, Qwen3-MoE and DeepSeek-MoE (the names our models use too); Mixtral's hub checkpoint
# and our model have `block_sparse_moe.experts.N.{w1,w3,w2}` (w1 gate, w3 up, w2 down), which transformers'
# conversion mapping for mixtral turns into mlp.experts.gate_up_proj = cat(w1, w3) and down_proj = w2.
LLMC_RENAMES = {
    "mixtral": [(r"^mlp\.experts\.(\d+)\.gate_proj\b", r"block_sparse_moe.experts.\1.w1"),
                (r"^mlp\.experts\.(\d+)\.up_proj\b", r"block_sparse_moe.experts.\1.w3"),
                (r"^mlp\.experts\.(\d+)\.down_proj\b", r"block_sparse_moe.experts.\1.w2"),
                (r"^mlp\.gate\b", "block_sparse_moe.gate")],
}


def llmc_to_ours(family: str, name: str) -> str:
    """Our name of llm-compressor's module or parameter `name` (relative to the decoder layer)."""
    import re
    for pattern, repl in LLMC_RENAMES.get(family, ()):
        new, n = re.subn(pattern, repl, name)
        if n:
            return new
    return name


# --------------------------------------------------------------------------------------------
# helpers
def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def memory(device) -> dict:
    out = {"host_peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    if torch.device(device).type == "cuda":
        out["gpu_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        out["gpu_peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
    return out


def model_config(args) -> dict:
    cfg = dict(SHAPES[args.family])
    if args.quick:
        cfg.update(QUICK[args.family])
    if args.layers:
        cfg["num_hidden_layers"] = args.layers
    return cfg


def write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=2, default=float) + "\n")


# --------------------------------------------------------------------------------------------
# build: checkpoint, tokenizer, tokens
def write_tokenizer(directory: Path, vocab_size: int) -> None:
    """A word-level tokenizer over the model's vocabulary (calibration reads token files; the
    pipeline and llm-compressor only need a loadable tokenizer)."""
    from tokenizers import Tokenizer, models as tm, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(tm.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", eos_token="t2", pad_token="t1").save_pretrained(
        directory)


def hub_parameters(cfg: dict):
    """(checkpoint key, shape) of every tensor of the family's hub checkpoint, from a meta model."""
    if cfg["model_type"] not in GENERIC:
        from alphaquant.models.registry import config_from_dict, model_class_for
        with torch.device("meta"):
            meta = model_class_for(cfg["model_type"])(config_from_dict(cfg))
        yield from ((k, p.shape) for k, p in meta.named_parameters())
        return
    # transformers' class holds each block's experts fused ([E, 2I, H], [E, H, I]); the hub checkpoint
    # (and transformers' save_pretrained) has them per expert: mlp.experts.N.{gate,up,down}_proj.weight
    from transformers import AutoConfig, AutoModelForCausalLM
    config = AutoConfig.for_model(**cfg)
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(config)
    for key, p in meta.named_parameters():
        if key.endswith("mlp.experts.gate_up_proj"):
            E, two_i, H = p.shape
            for e in range(E):
                for proj in ("gate_proj", "up_proj"):
                    yield key.replace("gate_up_proj", f"{e}.{proj}.weight"), (two_i // 2, H)
        elif key.endswith("mlp.experts.down_proj"):
            for e in range(p.shape[0]):
                yield key.replace("down_proj", f"{e}.down_proj.weight"), tuple(p.shape[1:])
        else:
            yield key, p.shape


@torch.no_grad()
def stage_build(args, work: Path) -> dict:
    from alphaquant import models
    from alphaquant.data import calibration_windows

    t0 = time.perf_counter()
    cfg = model_config(args)
    ckpt = work / "model"
    ckpt.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator(device=args.device).manual_seed(args.seed)
    n_params = 0
    with models.ShardWriter(ckpt, "4GB") as writer:
        for key, shape in hub_parameters(cfg):
            p = torch.empty(shape, device="meta")
            if key.endswith("norm.weight") or key.endswith("layernorm.weight"):
                t = torch.ones(p.shape)
            elif key.endswith(".bias"):
                t = torch.zeros(p.shape)
            else:   # N(0, 0.02) as transformers initialises; generated on the device, stored bf16
                t = torch.randn(p.shape, generator=gen, device=args.device).mul_(cfg["initializer_range"])
            writer.add(key, t.to(torch.bfloat16).cpu())
            n_params += p.numel()
    hf = dict(cfg)
    hf["dtype"] = "bfloat16"
    (ckpt / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    write_tokenizer(ckpt, cfg["vocab_size"])
    g = torch.Generator().manual_seed(args.seed)
    tokens = torch.randint(0, cfg["vocab_size"], (args.samples * args.seq_len * 4,), generator=g)
    torch.save(tokens, work / "tokens.pt")
    windows = calibration_windows(tokens, args.samples, args.seq_len, seed=0)     # what our pipeline draws
    torch.save(windows, work / "windows.pt")
    return {"seconds": time.perf_counter() - t0, "params": n_params, "layers": cfg["num_hidden_layers"],
            "checkpoint_gib": sum(f.stat().st_size for f in ckpt.glob("*.safetensors")) / 2**30}


# --------------------------------------------------------------------------------------------
# ours
def our_config(args, work: Path) -> dict:
    return {
        "name": "e2e",
        "model": {"path": str(work / "model"), "dtype": "bfloat16", "lazy": True},
        "calibration": {"dataset": str(work / "tokens.pt"), "split": "all", "num_samples": args.samples,
                        "seq_len": args.seq_len, "seed": 0, "batch_size": args.batch_size, "hessian": args.hessian,
                        "cache_device": args.cache_device, "reuse_attention": bool(args.reuse_attention)},
        "eval": {"enabled": False},
        "quant": {"default": {"wq": "int4", "group_size": 128, "sym": True},
                  "overrides": [{"pattern": p, "skip": True} for p in our_skips(args.family)] + (
                      # DeepSeek-MoE-16B's dense first layer: 10944 = 64 x 171 inputs, which 128 does not divide
                      [{"pattern": "model.layers.0.mlp.down_proj", "wq": "int4/64"}]
                      if args.family == "deepseek" and not args.quick else [])},
        "gptq": {"block_size": 128, "damp": 0.01, "act_order": bool(args.act_order), "static_groups": True,
                 "true_sequential": True, "sweep": args.sweep, "scale_search": args.scale_search,
                 "asymmetric": bool(args.asymmetric),
                 "expert_chunk": int(args.expert_chunk) if args.expert_chunk.isdigit() else args.expert_chunk},
        "trainer": {"accelerator": "gpu" if args.device == "cuda" else "cpu", "devices": args.devices,
                    "strategy": "ddp" if args.devices > 1 else "auto"},
        "logging": {"wandb": {"mode": "disabled"}, "csv": {"enabled": False}},
        "output": {"dir": str(work / our_out_name(args)), "overwrite": True, "save": not args.no_save,
                   "resume": not args.no_save, "format": "compressed-tensors"},
    }


def our_out_name(args) -> str:
    """Our checkpoint's directory in the workdir (a multi-GPU run keeps the 1-GPU one for comparison)."""
    return "ours_out" if args.devices == 1 else f"ours_out_{args.devices}gpu"


def stage_result_name(args, stage: str) -> str:
    return f"ours_{args.devices}gpu.json" if stage == "ours" and args.devices > 1 else f"{stage}.json"


def our_skips(family):
    return {"olmoe": ["*.mlp.gate", "lm_head"], "qwen2_moe": ["*.mlp.gate", "*.shared_expert_gate", "lm_head"],
            "mixtral": ["*.block_sparse_moe.gate", "lm_head"], "deepseek": ["*.mlp.gate", "lm_head"],
            "qwen3_moe": ["lm_head"]}[family]      # transformers' Qwen3-MoE router is no nn.Linear: never quantized


def stage_ours(args, work: Path) -> dict:
    import yaml

    from alphaquant.config.run import load_config
    from alphaquant.pipeline.session import CalibrationSession
    # Imported before the clock starts, as llm-compressor's stage imports transformers and
    # llmcompressor before its clock: both tools are timed from model load, not interpreter start-up.
    import alphaquant.pipeline.calibrate  # noqa: F401  (lightning, torchmetrics, torch._dynamo)
    import alphaquant.callbacks.hessian, alphaquant.callbacks.perplexity, alphaquant.callbacks.solve  # noqa: F401,E401

    if args.switch_interval > 0:
        sys.setswitchinterval(args.switch_interval)
    path = work / stage_result_name(args, "ours").replace(".json", ".yaml")
    path.write_text(yaml.safe_dump(our_config(args, work), sort_keys=False))
    if args.device == "cuda" and args.gpu_memory_gib > 0:    # emulate a smaller GPU, before anything is allocated
        torch.cuda.set_per_process_memory_fraction(
            min(1.0, args.gpu_memory_gib * 2**30 / torch.cuda.get_device_properties(0).total_memory))
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    # an earlier run's checkpoint (--workdir, --reuse-build) and a killed run's resume state are removed before the
    # clock starts: every run is timed as a first, whole run into a new directory (replacing an old checkpoint
    # would add its removal, ~0.6 s at OLMoE size; a resume state would skip layers)
    import shutil

    from alphaquant.pipeline.resume import resume_dir
    for stale in (work / our_out_name(args), resume_dir(work / our_out_name(args))):
        if stale.is_dir():
            shutil.rmtree(stale)
    prof = None
    if args.profile:
        from torch.profiler import ProfilerActivity, profile
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
        try:     # every thread's ops and ranges (layer writes, prefetch reads), not only the main thread's
            from torch._C._profiler import _ExperimentalConfig
            prof = profile(activities=acts, experimental_config=_ExperimentalConfig(profile_all_threads=True))
        except (ImportError, TypeError):
            prof = profile(activities=acts)
        prof.__enter__()
        from torch.profiler import record_function

        import bench.profile_ranges
        from alphaquant.pipeline import walker as walker_mod
        bench.profile_ranges.install()     # aq:<function> ranges: which of our functions the GPU waits for
        orig = walker_mod.LayerWalker._predict

        def labelled(self, block, phase, stream, stats=None, **plan):    # one profiler range per pass kind
            with record_function(f"pass:{phase}:{stream}:g{plan.get('group_index', '')}"):
                return orig(self, block, phase, stream, stats, **plan)
        walker_mod.LayerWalker._predict = labelled
    cprof = None
    if args.cprofile:              # host-side (Python) time per function: where a CPU-bound run goes
        import cProfile
        cprof = cProfile.Profile()
        cprof.enable()
    t0 = time.perf_counter()
    session = CalibrationSession(load_config(str(path), []))
    session.prepare()
    t1 = time.perf_counter()
    session.run()
    sync(args.device)
    t2 = time.perf_counter()
    if cprof is not None:
        import io
        import pstats
        cprof.disable()
        for key in ("tottime", "cumulative"):
            buf = io.StringIO()
            pstats.Stats(cprof, stream=buf).sort_stats(key).print_stats(80)
            (work / f"cprofile_{key}.txt").write_text(buf.getvalue())
    if prof is not None:
        prof.__exit__(None, None, None)
        sort = "cuda_time_total" if args.device == "cuda" else "cpu_time_total"
        (work / "profile.txt").write_text(prof.key_averages().table(sort_by=sort, row_limit=40))
        (work / "profile_cpu.txt").write_text(prof.key_averages().table(sort_by="cpu_time_total", row_limit=60))
        if args.trace:             # the timeline (chrome://tracing, Perfetto): where the GPU waits for the host
            import gzip
            prof.export_chrome_trace(str(work / "trace.json"))
            with open(work / "trace.json", "rb") as src, gzip.open(work / "trace.json.gz", "wb") as dst:
                shutil.copyfileobj(src, dst)
            (work / "trace.json").unlink()
    rank = session.trainer.global_rank
    if args.devices > 1:       # every rank's peak memory; rank 0 reports them all (ranks re-run this stage)
        write_json(work / f"ours_{args.devices}gpu_rank{rank}_memory.json", memory(args.device))
        session.trainer.strategy.barrier()
        if rank != 0:
            return None
    res = session.results
    layers = []
    for row in res["layers"]:
        ph = dict(row["phases"])
        collect = ph.pop("collect+solve", 0.0)
        hess, solve = ph.pop("hessian", None), ph.pop("solve", 0.0)
        gc_seconds = ph.pop("gc", None)       # Python's collector, inside the other phases' times
        split = {"load": ph.pop("load", 0.0),
                 "forward": collect - (hess or 0.0) - solve,     # collect passes: layer forward + hooks
                 "hessian": hess, "solve": solve, "propagate": ph.pop("propagate", 0.0),
                 "write": ph.pop("write", 0.0)}
        split["other"] = row["seconds"] - sum(v or 0.0 for v in split.values())
        split["gc"] = gc_seconds
        layers.append({"layer": row["layer"], "seconds": row["seconds"], **split, "passes": row.get("passes", {}),
                       "mean_rel_error_proxy": row["mean_rel_error"], "fallbacks": row["fallbacks"]})
    from alphaquant.pipeline import warmup
    return {"seconds_end_to_end": t2 - t0, "seconds_prepare": t1 - t0, "seconds_run": t2 - t1,
            "stage_seconds": res.get("stage_seconds", {}),
            # when each step of the GPU warm-up thread ended, in seconds from the session's start
            "warmup_timeline": {step: t - t0 for step, t in warmup.TIMELINE}, "solve_seconds": res["solve_seconds"], "layers": layers,
            "gc": res.get("gc"), "memory": memory(args.device),
            "checkpoint_gib": sum(f.stat().st_size for f in (work / our_out_name(args)).glob("*.safetensors")) / 2**30,
            "devices": args.devices, "memory_per_rank": [
                json.loads((work / f"ours_{args.devices}gpu_rank{r}_memory.json").read_text())
                for r in range(args.devices)] if args.devices > 1 else None,
            "batch_size": args.batch_size, "hessian": args.hessian, "profiled": bool(args.profile or args.cprofile)}


# --------------------------------------------------------------------------------------------
# llm-compressor
def llmc_available() -> bool:
    """llmcompressor importable in the llmc stage's process (E2E_PYTHONPATH_LLMC counts, e.g. the
    site-packages of a venv with llm-compressor and the transformers it pins)."""
    try:
        import llmcompressor  # noqa: F401
        return True
    except Exception:     # noqa: BLE001 - missing, or missing one of its own needs
        pass
    if not os.environ.get("E2E_PYTHONPATH_LLMC"):
        return False
    probe = subprocess.run([sys.executable, "-c", "import llmcompressor"], env=stage_env("llmc"),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return probe.returncode == 0


def _drop_unimportable_transformers_aliases() -> None:
    """transformers 5.17's apply_patches (which load_quantizable_moe's linearised load enters) calls dir()
    on every transformers module in sys.modules, and dir() of a legacy image-processor alias module imports
    its target, which imports torchvision: without torchvision (a CPU box) the load fails with
    ModuleNotFoundError. Aliases whose target cannot be imported are dropped (nothing here uses them)."""
    import importlib.util
    if importlib.util.find_spec("torchvision") is not None:
        return
    for name, mod in list(sys.modules.items()):
        if (name.startswith("transformers") and mod is not None and getattr(mod, "__file__", "") is None
                and (getattr(mod, "__doc__", None) or "").startswith("Alias module")):
            try:
                dir(mod)
            except ImportError:
                del sys.modules[name]


def stage_llmc(args, work: Path) -> dict:
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modeling.moe.linearize import load_quantizable_moe
    from llmcompressor.modifiers.gptq import GPTQModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import llmcompressor
    windows = torch.load(work / "windows.pt")
    ds = Dataset.from_dict({"input_ids": windows.tolist(), "attention_mask": torch.ones_like(windows).tolist()})
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(work / "model")
    _drop_unimportable_transformers_aliases()
    with load_quantizable_moe():
        model = AutoModelForCausalLM.from_pretrained(work / "model", dtype=torch.bfloat16)
    t1 = time.perf_counter()
    recipe = GPTQModifier(targets="Linear", scheme="W4A16", ignore=["lm_head", *ROUTER_IGNORE[args.family]],
                          block_size=128, dampening_frac=0.01)
    oneshot(model=model, dataset=ds, recipe=recipe, processor=tok, max_seq_length=args.seq_len,
            num_calibration_samples=args.samples, shuffle_calibration_samples=False, batch_size=1)
    sync(args.device)
    t2 = time.perf_counter()
    weights = llmc_weights(model)          # before saving: saving may compress in place
    t3 = time.perf_counter()
    model.save_pretrained(work / "llmc_out", save_compressed=True)
    tok.save_pretrained(work / "llmc_out")
    t4 = time.perf_counter()
    out = {"seconds_end_to_end": (t4 - t0) - (t3 - t2), "seconds_load": t1 - t0, "seconds_oneshot": t2 - t1,
           "seconds_save": t4 - t3, "memory": memory(args.device),
           "checkpoint_gib": sum(f.stat().st_size for f in (work / "llmc_out").glob("*.safetensors")) / 2**30,
           "quantized_linears": len(weights), "version": llmcompressor.__version__}
    del model
    return out, weights


@torch.no_grad()
def llmc_weights(model) -> dict:
    """{our module name: dequantized weight (CPU, bf16)} of every linear llm-compressor quantized."""
    try:
        from compressed_tensors.offload import disable_onloading
        ctx = disable_onloading
    except ImportError:
        import contextlib
        ctx = contextlib.nullcontext
    out = {}
    with ctx():
        for name, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear) and hasattr(mod, "weight_scale") and ".layers." in name:
                out[name] = mod.weight.detach().to("cpu", torch.bfloat16).clone()
    return out


# --------------------------------------------------------------------------------------------
# per-layer output error, the same measurement for both tools
@torch.no_grad()
def layer_errors(args, work: Path, others: dict) -> dict:
    """others: tool -> callable(layer index) -> {name relative to the layer: weight} or None."""
    from alphaquant import models

    device = torch.device(args.device)
    fp = models.from_pretrained(work / "model", dtype="bfloat16", lazy=True)
    windows = torch.load(work / "windows.pt")
    B = max(1, min(args.samples, 8))
    embed = fp.model.embed_tokens
    streams = {"fp": torch.cat([embed(windows[i:i + B]).to(device) for i in range(0, len(windows), B)])}
    for tool in others:
        streams[tool] = streams["fp"].clone()
    kw = fp.layer_kwargs(streams["fp"][:B])
    result = {tool: {"local": [], "propagated": []} for tool in others}
    n_layers = fp.config.num_hidden_layers
    for i in range(n_layers):
        layer = models.load_layer(fp, i, device=device)
        fp_w = {n: p.detach().clone() for n, p in layer.named_parameters()}
        q_ws = {tool: fn(i) for tool, fn in others.items()}
        y_fp = torch.empty_like(streams["fp"])
        for s in range(0, len(windows), B):
            y_fp[s:s + B] = layer(streams["fp"][s:s + B], **kw)
        for tool, qw in q_ws.items():
            if qw is None:
                continue
            _load_weights(layer, qw, device)
            acc = torch.zeros(3, dtype=torch.float64, device=device)   # local err², prop err², ref²
            for s in range(0, len(windows), B):
                ref = y_fp[s:s + B].float()
                loc = layer(streams["fp"][s:s + B], **kw)
                prop = layer(streams[tool][s:s + B], **kw)
                acc += torch.stack([(loc.float() - ref).square().sum(), (prop.float() - ref).square().sum(),
                                    ref.square().sum()]).double()
                streams[tool][s:s + B] = prop
            a = acc.tolist()
            result[tool]["local"].append((a[0] / a[2]) ** 0.5)
            result[tool]["propagated"].append((a[1] / a[2]) ** 0.5)
            _load_weights(layer, fp_w, device)
        streams["fp"] = y_fp
        models.unload_layer(fp, i)
    return result


def _load_weights(layer, weights: dict, device):
    params = dict(layer.named_parameters())
    unknown = sorted(set(weights) - set(params))
    if unknown:
        raise KeyError(f"{len(unknown)} weight(s) with no parameter of that name in our layer, e.g. {unknown[:3]} "
                       f"(ours: e.g. {sorted(params)[:3]}); see LLMC_RENAMES in bench/e2e.py")
    for n, w in weights.items():
        params[n].data.copy_(w.to(device))


def ours_weights_fn(work: Path):
    from alphaquant.export.reader import load_quantized

    q = load_quantized(work / "ours_out", dtype="bfloat16")
    prefix = "model.layers.{}."

    def get(i):
        p = prefix.format(i)
        return {k[len(p):]: v for k, v in q.state_dict().items() if k.startswith(p)}
    return get


def llmc_weights_fn(weights: dict, family: str):
    """Layer i's llm-compressor weights under our parameter names (relative to the layer)."""
    def get(i):
        p = f"model.layers.{i}."
        return {llmc_to_ours(family, k[len(p):]) + ".weight": v for k, v in weights.items() if k.startswith(p)}
    return get


def stage_errors(args, work: Path, llmc_w=None) -> dict:
    t0 = time.perf_counter()
    others = {"ours": ours_weights_fn(work)}
    if llmc_w is not None:
        others["llmc"] = llmc_weights_fn(llmc_w, args.family)
    res = layer_errors(args, work, others)
    res["seconds"] = time.perf_counter() - t0
    return res


def stage_llmc_and_errors(args, work: Path) -> dict:
    out, weights = stage_llmc(args, work)
    # the error measurement runs layers with our local model code: not for the generic-path families (yet)
    out["errors"] = None if args.family in GENERIC or args.no_errors else stage_errors(args, work, weights)
    return out


# --------------------------------------------------------------------------------------------
# serve: does the reader our users have (transformers + compressed-tensors) get our model?
@torch.no_grad()
def stage_serve(args, work: Path) -> dict:
    """Our checkpoint loaded by transformers (compressed-tensors decompression), against our own reader
    (alphaquant.export.load_quantized): logits on calibration windows and a greedy continuation of a
    fixed prompt, both on the benchmark's device, in bfloat16; where transformers cannot run the checkpoint
    in bfloat16 the error is recorded and both readers are compared in float32."""
    import traceback

    import compressed_tensors
    import transformers
    from transformers import AutoModelForCausalLM

    from alphaquant.export.reader import load_quantized

    device = torch.device(args.device)
    out = work / our_out_name(args)
    windows = torch.load(work / "windows.pt")[:2, :512].to(device)        # 2 windows x 512 tokens
    prompt = windows[:1, :32]

    def transformers_side(dtype):
        t0 = time.perf_counter()
        hf = AutoModelForCausalLM.from_pretrained(out, dtype=dtype).to(device).eval()
        seconds = time.perf_counter() - t0
        dtypes = sorted({str(p.dtype) for p in hf.parameters() if p.is_floating_point()})
        logits = hf(windows).logits.float()
        # an explicit mask: random prompt tokens include the pad id, which generate() would otherwise mask out;
        # min_new_tokens: no early stop at a random eos
        gen = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=16, min_new_tokens=16,
                          do_sample=False)[0, 32:].tolist()
        return seconds, dtypes, logits, gen

    dtype, error = torch.bfloat16, None
    try:
        seconds, dtypes, hf_logits, hf_gen = transformers_side(dtype)
    except RuntimeError as e:
        error = str(e).splitlines()[0]
        (work / "serve_bf16_traceback.txt").write_text(traceback.format_exc())
        dtype = torch.float32
        seconds, dtypes, hf_logits, hf_gen = transformers_side(dtype)
    ours = load_quantized(out, dtype=str(dtype).removeprefix("torch.")).to(device).eval()
    our_logits = ours(windows)
    our_logits = (our_logits.logits if hasattr(our_logits, "logits") else our_logits).float()
    gen = getattr(ours, "generate", None)
    our_gen = gen(prompt, max_new_tokens=16)[0, 32:].tolist() if gen is not None else None
    diff = (hf_logits - our_logits).abs()
    span = (our_logits.amax() - our_logits.amin()).item()
    return {"transformers": transformers.__version__, "compressed_tensors": compressed_tensors.__version__,
            "dtype": str(dtype), "bf16_error": error, "seconds_load_transformers": seconds,
            "tokens": int(windows.numel()), "parameter_dtypes_after_load": dtypes,
            "logits_max_abs_diff": diff.max().item(), "logits_range": span,
            "logits_max_abs_diff_of_range": diff.max().item() / span,
            "argmax_agreement": (hf_logits.argmax(-1) == our_logits.argmax(-1)).float().mean().item(),
            "greedy_16_tokens_equal": our_gen == hf_gen if our_gen is not None else None,
            "greedy_transformers": hf_gen, "greedy_ours": our_gen}


# --------------------------------------------------------------------------------------------
# driver
STAGES = {"build": stage_build, "ours": stage_ours, "llmc": stage_llmc_and_errors, "errors": stage_errors,
          "serve": stage_serve}


def run_stage(args, stage: str, work: Path, extra: list[str] = (), launcher: list[str] = ()) -> dict:
    """Run one stage in a fresh process (its own peak memory); returns its JSON. `launcher`: a command
    that starts the script itself (e.g. torchrun ... for all DDP ranks at once)."""
    out = work / stage_result_name(args, stage)
    cmd = [*(launcher or [sys.executable]), str(Path(__file__).resolve()), "--stage", stage, "--workdir", str(work),
           *stage_argv(args), *extra]
    print(f"[e2e] {stage}: {' '.join(shlex.quote(c) for c in cmd[1:])}", flush=True)
    # E2E_PYTHONPATH_<STAGE>: extra import paths for one stage, e.g. a newer transformers for ours than the
    # one llm-compressor pins (llmcompressor 0.14: transformers <= 5.17)
    subprocess.run(cmd, check=True, env=stage_env(stage))
    return json.loads(out.read_text())


def stage_env(stage: str) -> dict:
    extra_path = os.environ.get(f"E2E_PYTHONPATH_{stage.upper()}")
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), extra_path, os.environ.get("PYTHONPATH")])))


def stage_argv(args) -> list[str]:
    argv = ["--family", args.family, "--device", args.device, "--devices", str(args.devices), "--samples", str(args.samples),
            "--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size), "--hessian", args.hessian,
            "--act-order", str(args.act_order), "--seed", str(args.seed), "--sweep", args.sweep,
            "--scale-search", args.scale_search, "--asymmetric", str(args.asymmetric),
            "--reuse-attention", str(args.reuse_attention),
            "--switch-interval", str(args.switch_interval), "--cache-device", args.cache_device,
            "--expert-chunk", args.expert_chunk, "--gpu-memory-gib", str(args.gpu_memory_gib)]
    if args.no_save:
        argv.append("--no-save")
    if args.quick:
        argv.append("--quick")
    if args.layers:
        argv += ["--layers", str(args.layers)]
    if args.profile:
        argv.append("--profile")
    if args.cprofile:
        argv.append("--cprofile")
    if args.trace:
        argv.append("--trace")
    return argv


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--family", default="olmoe", choices=sorted(SHAPES))
    p.add_argument("--layers", type=int, default=0, help="decoder layers (0 = the real model's count)")
    p.add_argument("--llmc-layers", type=int, default=0,
                   help="llm-compressor on a checkpoint of only the first N layers (0 = the same as ours)")
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=8, help="our calibration.batch_size (windows per forward)")
    p.add_argument("--hessian", default="routed_sq", choices=["routed", "routed_sq", "uniform", "all_experts"],
                   help="our calibration.hessian (default: the shipped default)")
    p.add_argument("--scale-search", default="mse", choices=["none", "mse", "mse_hdiag"],
                   help="our gptq.scale_search (default: the shipped default; none = group extremes, as llm-compressor)")
    p.add_argument("--act-order", type=int, default=1,
                   help="our gptq.act_order (1: static-group act order, what llm-compressor's W4A16 does by default)")
    p.add_argument("--asymmetric", type=int, default=0,
                   help="our gptq.asymmetric (1: GPTAQ, the solve targets the fp layer on fp inputs; off by default)")
    p.add_argument("--reuse-attention", type=int, default=1,
                   help="our calibration.reuse_attention (0: every pass recomputes attention: one calibration cache less)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--sweep", default="auto", choices=["auto", "torch"],
                   help="our gptq.sweep (auto: the fused Triton sweep on a GPU; torch: torch ops, as before)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-device", default="auto", choices=["auto", "gpu", "cpu"],
                   help="our calibration.cache_device (cpu: the cached layer inputs/outputs in pinned host memory, "
                        "one batch at a time on the GPU: less GPU memory, a copy per batch and pass)")
    p.add_argument("--expert-chunk", default="auto",
                   help="our gptq.expert_chunk: auto, 0 (all experts of a bucket in one solve) or N experts at a time")
    p.add_argument("--gpu-memory-gib", type=float, default=0.0,
                   help="our stage may use only this much GPU memory (torch.cuda.set_per_process_memory_fraction; "
                        "e.g. 24 emulates a 24 GB card on an H200); 0 = the whole GPU")
    p.add_argument("--no-save", action="store_true", help="our run writes no checkpoint and no resume state (diagnostics)")
    p.add_argument("--switch-interval", type=float, default=0.0,
                   help="sys.setswitchinterval in our run (0: Python's default); diagnostics of thread contention")
    p.add_argument("--devices", type=int, default=1, help="our run on N GPUs (Lightning DDP); see bench/ddp.py")
    p.add_argument("--quick", action="store_true", help="tiny shapes, 8 windows of 128 tokens")
    p.add_argument("--no-llmc", action="store_true", help="skip llm-compressor (also skipped when not importable)")
    p.add_argument("--reuse-build", action="store_true", help="keep the workdir's checkpoint from an earlier run")
    p.add_argument("--no-errors", action="store_true", help="skip the per-layer error stage (timing runs)")
    p.add_argument("--serve", action="store_true",
                   help="load our checkpoint with transformers too: logits and a greedy continuation vs ours")
    p.add_argument("--profile", action="store_true", help="torch.profiler over our run (workdir/profile*.txt)")
    p.add_argument("--trace", action="store_true", help="with --profile: also the timeline, workdir/trace.json.gz")
    p.add_argument("--cprofile", action="store_true", help="cProfile over our run (workdir/cprofile_*.txt)")
    p.add_argument("--workdir", default=None, help="scratch directory, kept (default: a temporary one, removed at the end)")
    p.add_argument("--keep", action="store_true", help="keep the temporary scratch directory")
    p.add_argument("--out", default=None, help="JSON path (a .md table is written beside it)")
    p.add_argument("--stage", default=None, choices=sorted(STAGES), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick and args.samples == 128:
        args.samples, args.seq_len, args.batch_size = 8, 128, 4
    if args.stage:                                   # a child process
        work = Path(args.workdir)
        res = STAGES[args.stage](args, work)
        if res is not None:                          # None: a DDP rank other than 0
            write_json(work / stage_result_name(args, args.stage), res)
        return res

    import shutil
    import tempfile
    work = Path(args.workdir or tempfile.mkdtemp(prefix="aq-e2e-"))
    work.mkdir(parents=True, exist_ok=True)
    # the scratch directory holds the built checkpoint and both tools' outputs (23 GB for OLMoE, 34 GB for
    # Qwen1.5-MoE): removed at the end and after a failed stage unless it was named (--workdir) or --keep
    keep = bool(args.workdir) or args.keep
    try:
        return _run_all(args, argv, work)
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
            print(f"[e2e] removed the scratch directory {work} (--keep or --workdir keeps it)", flush=True)


def _run_all(args, argv, work: Path) -> dict:
    command = "PYTHONPATH=. python bench/e2e.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    t0 = time.perf_counter()
    result = {"command": command, "family": args.family, "model": NAMES[args.family], "device": device_name(args),
              "torch": torch.__version__, "samples": args.samples, "seq_len": args.seq_len, "quick": args.quick}
    if args.reuse_build and (work / "build.json").is_file():      # same shapes and seed: same checkpoint
        result["build"] = json.loads((work / "build.json").read_text())
    else:
        result["build"] = run_stage(args, "build", work)
    result["ours"] = run_stage(args, "ours", work)
    want_llmc = not args.no_llmc
    if want_llmc and args.family not in ROUTER_IGNORE:
        print(f"[e2e] llm-compressor loads models through transformers, which has no {NAMES[args.family]} "
              f"architecture (it needs the checkpoint's remote code): our side only", flush=True)
        want_llmc = False
    if want_llmc and not llmc_available():
        print("[e2e] llm-compressor is not importable: our side only", flush=True)
        want_llmc = False
    result["llm_compressor"] = None
    if want_llmc and not args.llmc_layers:
        r = run_stage(args, "llmc", work)
        result["errors"] = r.pop("errors")
        result["llm_compressor"] = r
    else:
        if not args.no_errors and args.family not in GENERIC:
            result["errors"] = run_stage(args, "errors", work)
        if want_llmc:                               # llm-compressor on a cut of the first N layers
            cut = work / f"cut{args.llmc_layers}"
            cut_args = argparse.Namespace(**{**vars(args), "layers": args.llmc_layers, "profile": False})
            run_stage(cut_args, "build", cut)
            cut_ours = run_stage(cut_args, "ours", cut)
            r = run_stage(cut_args, "llmc", cut)
            result["cut"] = {"layers": args.llmc_layers, "ours": cut_ours, "errors": r.pop("errors")}
            result["llm_compressor"] = r
    if args.serve:
        result["serve"] = run_stage(args, "serve", work)
    result["summary"] = summarize(result)
    result["bench_seconds"] = time.perf_counter() - t0
    table = render(result)
    print(table)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        write_json(out, result)
        out.with_suffix(".md").write_text(table + "\n")
    return result


def device_name(args) -> str:
    if args.device == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return "cpu"


def per_layer_split(layers: list[dict]) -> dict:
    keys = ("load", "forward", "hessian", "solve", "propagate", "write", "other", "gc")
    n = max(1, len(layers))
    return {k: sum((r.get(k) or 0.0) for r in layers) / n for k in keys} | {
        "total": sum(r["seconds"] for r in layers) / n}


def summarize(r: dict) -> dict:
    ours, llmc = r["ours"], r["llm_compressor"]
    L = r["build"]["layers"]
    s = {"layers": L, "ours_seconds": ours["seconds_end_to_end"], "ours_per_layer": per_layer_split(ours["layers"])}
    real = SHAPES[r["family"]]["num_hidden_layers"]
    if L < real and not r.get("quick"):          # a cut of the real model: the whole model's time, extrapolated
        steady = [x["seconds"] for x in ours["layers"][1:]] or [ours["layers"][0]["seconds"]]
        outside = ours["seconds_end_to_end"] - sum(x["seconds"] for x in ours["layers"])
        s["ours_seconds_full_model"] = outside + ours["layers"][0]["seconds"] + _mean(steady) * (real - 1)
        s["ours_full_model_extrapolation"] = (f"{outside:.1f} s outside the layers + {ours['layers'][0]['seconds']:.1f} s "
                                              f"(layer 0) + {_mean(steady):.2f} s x {real - 1} layers")
    err = r.get("errors") or {"ours": {"local": [], "propagated": []}}     # --no-errors: timing only
    s["ours_error_local_mean"] = _mean(err["ours"]["local"])
    s["ours_error_propagated_last"] = err["ours"]["propagated"][-1] if err["ours"]["propagated"] else None
    if llmc:
        if "cut" in r:                                # llm-compressor ran on the first N layers only
            n = r["cut"]["layers"]
            cut_ours = r["cut"]["ours"]["seconds_end_to_end"]
            per = llmc["seconds_oneshot"] / n
            s["llmc_layers_run"] = n
            s["llmc_seconds_measured"] = llmc["seconds_end_to_end"]
            s["llmc_seconds"] = llmc["seconds_end_to_end"] + per * (L - n)     # extrapolated: + per-layer oneshot
            s["llmc_extrapolation"] = f"{llmc['seconds_end_to_end']:.1f} s for {n} layers + {per:.1f} s x {L - n} layers"
            s["speedup_same_cut"] = llmc["seconds_end_to_end"] / cut_ours
            cerr = r["cut"]["errors"] or {"ours": {"local": []}, "llmc": {"local": []}}   # None: not measured
            s["llmc_error_local_mean"] = _mean(cerr["llmc"]["local"])
            s["ours_error_local_mean_cut"] = _mean(cerr["ours"]["local"])
        else:
            s["llmc_seconds"] = llmc["seconds_end_to_end"]
            if "llmc" in err:
                s["llmc_error_local_mean"] = _mean(err["llmc"]["local"])
                s["llmc_error_propagated_last"] = err["llmc"]["propagated"][-1]
        s["speedup"] = s["llmc_seconds"] / s["ours_seconds"]
    return s


def _mean(xs):
    return sum(xs) / len(xs) if xs else None


def render(r: dict) -> str:
    s, ours, llmc = r["summary"], r["ours"], r["llm_compressor"]
    sp = s["ours_per_layer"]
    lines = [f"### End to end: {r['model']} shapes ({s['layers']} layers, random bf16 weights), "
             f"{r['samples']}x{r['seq_len']} calibration tokens, int4 g128 W4A16, {r['device']}", "",
             f"`{r['command']}`", "",
             "| | AlphaQuant | llm-compressor" + (f" (memory, checkpoint: the {s['llmc_layers_run']}-layer cut)"
                                                  if "llmc_layers_run" in s else "") + " |", "|---|---|---|"]
    lt = lambda k, fmt="{:.1f}": (fmt.format(llmc[k]) if llmc and llmc.get(k) is not None else "-")  # noqa: E731
    lines.append(f"| end to end (s) | {s['ours_seconds']:.1f} | "
                 + (f"{s['llmc_seconds']:.1f}" + (" (extrapolated)" if "llmc_layers_run" in s else "") if llmc else "-")
                 + " |")
    if llmc:
        lines.append(f"| speed-up | {s['speedup']:.1f}x | 1x |")
    lines.append(f"| per layer (s) | {sp['total']:.2f} | "
                 + (f"{llmc['seconds_oneshot'] / (s.get('llmc_layers_run') or s['layers']):.2f}" if llmc else "-")
                 + " |")
    lines.append("| per layer: load / forward / Hessian / solve / propagate / write / other (s) | "
                 + " / ".join(f"{sp[k]:.2f}" for k in ("load", "forward", "hessian", "solve", "propagate", "write",
                                                       "other"))
                 + " | not split (oneshot " + lt("seconds_oneshot") + " s, save " + lt("seconds_save") + " s) |")
    if ours.get("gc"):              # Python's cyclic collector during the walk (pipeline/gc_pause.py)
        c = ours["gc"]["collections"]
        lines.append(f"| Python garbage collection in the walk (s; collections gen0/1/2) | {ours['gc']['seconds']:.2f} "
                     f"({c['gen0']}/{c['gen1']}/{c['gen2']}) | - |")
    gm = lambda m: f"{m['gpu_peak_gib']:.1f}" if "gpu_peak_gib" in m else "-"  # noqa: E731
    lines.append(f"| peak GPU memory (GiB) | {gm(ours['memory'])} | {gm(llmc['memory']) if llmc else '-'} |")
    lines.append(f"| peak host memory (GiB) | {ours['memory']['host_peak_gib']:.1f} | "
                 + (f"{llmc['memory']['host_peak_gib']:.1f}" if llmc else "-") + " |")
    cut_ckpt = f" ({r['cut']['ours']['checkpoint_gib']:.2f} for the cut)" if "cut" in r else ""
    lines.append(f"| checkpoint (GiB) | {ours['checkpoint_gib']:.2f}{cut_ckpt} | {lt('checkpoint_gib', '{:.2f}')} |")
    le = lambda v: f"{v:.4f}" if v is not None else "-"  # noqa: E731
    if "cut" in r:
        lines.append(f"| mean layer output error, local (first {s['llmc_layers_run']} layers) | "
                     f"{le(s['ours_error_local_mean_cut'])} | {le(s.get('llmc_error_local_mean'))} |")
    else:
        lines.append(f"| mean layer output error, local | {le(s['ours_error_local_mean'])} | "
                     f"{le(s.get('llmc_error_local_mean'))} |")
        lines.append(f"| last layer output error, propagated | {le(s['ours_error_propagated_last'])} | "
                     f"{le(s.get('llmc_error_propagated_last'))} |")
    if "llmc_extrapolation" in s:
        lines += ["", f"llm-compressor ran on the first {s['llmc_layers_run']} layers (same shapes, same tokens): "
                  f"{s['llmc_extrapolation']}; on that cut AlphaQuant was {s['speedup_same_cut']:.1f}x faster end to end."]
    if "ours_seconds_full_model" in s:
        lines += ["", f"AlphaQuant ran {s['layers']} of the model's {SHAPES[r['family']]['num_hidden_layers']} layers; "
                  f"the whole model, extrapolated: {s['ours_seconds_full_model']:.0f} s "
                  f"({s['ours_full_model_extrapolation']}). Memory does not grow with the layer count "
                  f"(layers stream from disk)."]
    lines += ["", "forward: the collect passes minus Hessian updates and solve; write: waiting for the previous "
              "layer's background write (compression, shards, resume state); other: the rest of the layer; "
              "peak host memory is ru_maxrss of the stage's process."]
    if r.get("serve"):
        v = r["serve"]
        lines += ["", f"Serving check: our checkpoint loaded by transformers {v['transformers']} + compressed-tensors "
                  f"{v['compressed_tensors']} vs our reader, {v['tokens']} tokens, {v['dtype']}"
                  + (f" (in bfloat16 transformers' forward fails: '{v['bf16_error']}')" if v.get("bf16_error") else "")
                  + ": largest logit difference "
                  f"{v['logits_max_abs_diff']:.3g} ({v['logits_max_abs_diff_of_range']:.2e} of the logits' range), "
                  f"argmax agreement {100 * v['argmax_agreement']:.2f}%, greedy 16-token continuation "
                  + ("identical" if v["greedy_16_tokens_equal"] else "DIFFERS" if v["greedy_16_tokens_equal"] is False
                     else "not compared") + "."]
    err = (r["cut"]["errors"] if "cut" in r else r.get("errors")) or {"ours": {"local": [], "propagated": []}}
    lines += ["", "Per-layer relative output error ||Y_q - Y|| / ||Y|| on the calibration tokens "
              "(local: fp input; propagated: the quantized model's own input):", "",
              "| layer | ours local | llmc local | ours propagated | llmc propagated |", "|---|---|---|---|---|"]
    for i, v in enumerate(err["ours"]["local"]):
        g = lambda t, k: le(err[t][k][i]) if t in err and i < len(err[t][k]) else "-"  # noqa: E731
        lines.append(f"| {i} | {g('ours', 'local')} | {g('llmc', 'local')} | {g('ours', 'propagated')} | "
                     f"{g('llmc', 'propagated')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
