"""Three small trained MoEs for bench/quality.py: OLMoE, Qwen2-MoE and Mixtral, built and trained with
transformers' own modeling classes on the shipped corpus, seeded, cached by a hash of everything that
decides their weights.

    PYTHONPATH=. python bench/quality_models.py --arch olmoe      # one model into the cache, minutes on 2 CPU cores
    from bench.quality_models import ensure_model
    path = ensure_model("mixtral", cache_dir)                                     # trains once, then reuses

Each model: 4 decoder layers, hidden 128, 8 experts top-2 (Qwen2-MoE: plus a shared expert), the demo's
byte-level BPE tokenizer (vocab 4096, demo/olmoe-tiny), tied embeddings. Trained as demo/train_tiny_olmoe.py
trains demo/olmoe-tiny (AdamW, warmup + cosine, random 256-token windows of demo/corpus/train.txt), with the
loss transformers computes itself for `labels=` and `output_router_logits=True` (next-token cross-entropy +
router_aux_loss_coef x its load-balancing loss). Saved in float32 with `save_pretrained` (transformers
writes the hub's per-expert keys), which our loader reads as a local family.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER_DIR = ROOT / "demo" / "olmoe-tiny"
CORPUS = ROOT / "demo" / "corpus"
FORMAT_VERSION = 1          # bump when the recipe below changes in a way the hash does not see

COMMON = dict(vocab_size=4096, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
              max_position_embeddings=512, rms_norm_eps=1e-5, rope_theta=10000.0, hidden_act="silu",
              tie_word_embeddings=True, initializer_range=0.02, router_aux_loss_coef=0.01,
              bos_token_id=0, eos_token_id=0, pad_token_id=0, use_cache=False)
ARCHS = {
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM",
              dict(num_key_value_heads=4, intermediate_size=256, num_experts=8, num_experts_per_tok=2,
                   norm_topk_prob=False, clip_qkv=None)),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  dict(num_key_value_heads=4, intermediate_size=512, moe_intermediate_size=256,
                       shared_expert_intermediate_size=256, num_experts=8, num_experts_per_tok=2,
                       norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[], use_sliding_window=False)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM",
                dict(num_key_value_heads=2, intermediate_size=256, num_local_experts=8, num_experts_per_tok=2,
                     sliding_window=None)),
}
TRAIN = {"seq_len": 128, "batch_size": 8, "steps": 250, "warmup_steps": 25, "lr": 3e-3, "min_lr_ratio": 0.1,
         "weight_decay": 0.1, "betas": (0.9, 0.95), "grad_clip": 1.0, "seed": 0, "device": "cpu"}
# On the GPU machine: --train-steps 3000 --train-batch 32 --train-device cuda (about a minute a model). The device
# is part of the hash: CUDA and CPU kernels round differently, so they train different weights.


def model_config(arch: str) -> dict:
    return {**COMMON, **ARCHS[arch][2]}


def cache_key(arch: str, train: dict) -> str:
    """Hash of everything that decides the weights: config, training settings, corpus and tokenizer bytes."""
    h = hashlib.sha256(json.dumps([FORMAT_VERSION, arch, model_config(arch), train], sort_keys=True).encode())
    for f in (CORPUS / "train.txt", TOKENIZER_DIR / "tokenizer.json"):
        h.update(hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()[:12]


def default_cache_dir() -> Path:
    return Path(os.environ.get("ALPHAQUANT_CACHE", Path.home() / ".cache" / "alphaquant")) / "quality-models"


def ensure_model(arch: str, cache_dir: Path, threads: int = 1, log=print, **train_overrides) -> Path:
    """The trained checkpoint's directory, training it first if the cache does not hold it.
    train_overrides: e.g. steps=2000, batch_size=16 (another cache entry: the settings are in the hash)."""
    train = {**TRAIN, **{k: v for k, v in train_overrides.items() if v is not None}}
    out = Path(cache_dir) / f"{arch}-{cache_key(arch, train)}"
    if (out / "training_log.json").is_file():
        log(f"[quality] reusing the trained {arch} model in {out}")
        return out
    log(f"[quality] training {arch} ({train['steps']} steps) into {out} ...")
    train_model(arch, out, train, threads)
    return out


def _lr(step: int, cfg: dict) -> float:
    if step < cfg["warmup_steps"]:
        return cfg["lr"] * (step + 1) / cfg["warmup_steps"]
    p = (step - cfg["warmup_steps"]) / max(1, cfg["steps"] - cfg["warmup_steps"])
    return cfg["lr"] * (cfg["min_lr_ratio"] + (1 - cfg["min_lr_ratio"]) * 0.5 * (1 + math.cos(math.pi * p)))


def encode(tokenizer, path: Path) -> torch.Tensor:
    """The whole file in one call, as alphaquant/data.py tokenizes a .txt file."""
    ids = tokenizer(path.read_text(encoding="utf-8"), return_attention_mask=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def train_model(arch: str, out: Path, train: dict, threads: int = 1) -> None:
    import transformers
    from transformers import AutoTokenizer

    torch.set_num_threads(threads)
    torch.manual_seed(train["seed"])
    cfg_name, cls_name, _ = ARCHS[arch]
    config = getattr(transformers, cfg_name)(**model_config(arch))
    device = torch.device(train["device"])
    model = getattr(transformers, cls_name)(config).float().to(device).train()
    tok = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    tokens = encode(tok, CORPUS / "train.txt")
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed_tokens" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed_tokens" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": train["weight_decay"]},
                             {"params": rest, "weight_decay": 0.0}], lr=train["lr"], betas=train["betas"])
    gen = torch.Generator().manual_seed(train["seed"])
    S, B = train["seq_len"], train["batch_size"]
    t0, curve, run = time.time(), [], []
    for step in range(train["steps"]):
        starts = torch.randint(0, tokens.numel() - S - 1, (B,), generator=gen)
        x = tokens[starts[:, None] + torch.arange(S)].to(device)           # (B, S)
        loss = model(input_ids=x, labels=x, output_router_logits=True).loss   # CE + coef * load balancing
        for g in opt.param_groups:
            g["lr"] = _lr(step, train)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), train["grad_clip"])
        opt.step()
        run.append(loss.item())
        if (step + 1) % 50 == 0 or step == train["steps"] - 1:
            curve.append({"step": step + 1, "loss": round(sum(run) / len(run), 4), "s": round(time.time() - t0, 1)})
            print(json.dumps(curve[-1]), flush=True)
            run = []
    model = model.cpu().eval()
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    log = {"arch": arch, "config": model_config(arch), "train": train, "curve": curve,
           "train_seconds": round(time.time() - t0, 1), "torch": torch.__version__,
           "transformers": transformers.__version__, "params": sum(p.numel() for p in model.parameters())}
    (tmp / "training_log.json").write_text(json.dumps(log, indent=1) + "\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", choices=sorted(ARCHS), required=True)
    ap.add_argument("--cache-dir", type=Path, default=default_cache_dir())
    ap.add_argument("--steps", type=int, default=None, help=f"training steps (default {TRAIN['steps']})")
    ap.add_argument("--batch-size", type=int, default=None, help=f"windows per step (default {TRAIN['batch_size']})")
    ap.add_argument("--device", default=None, help=f"training device (default {TRAIN['device']}; cuda on a GPU)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: on a shared 2-core machine two threads ran 10x slower per step)")
    args = ap.parse_args(argv)
    print(ensure_model(args.arch, args.cache_dir, args.threads, steps=args.steps, batch_size=args.batch_size,
                       device=args.device))
    return 0


if __name__ == "__main__":
    sys.exit(main())
