"""Train demo/olmoe-tiny: a 4-layer, 8-expert OLMoE on the stdlib corpus (CPU, plain torch, fixed seeds).

    python demo/build_corpus.py        # demo/corpus/{train,test}.txt
    python demo/train_tiny_olmoe.py    # demo/olmoe-tiny/ (tokenizer + model + training_log.json)

Steps: (1) a byte-level BPE tokenizer (vocab 4096) trained with `tokenizers` on train.txt and saved as a
transformers PreTrainedTokenizerFast; (2) the model built with our own OLMoE code (`models.from_config`) and
trained with AdamW + warmup/cosine LR on random 256-token windows of train.txt, loss = next-token cross-entropy
+ OLMoE's load-balancing loss (0.01) + router z-loss (0.001) so every expert is used; (3) the train/test
perplexity curve and the final numbers go to training_log.json; (4) the weights are saved in bfloat16 with
`models.save_pretrained` and reloaded with both `models.from_pretrained` and transformers' OlmoeForCausalLM,
whose logits must agree.

Everything is seeded; the run is a fixed number of steps (not a time budget), so it reproduces up to the last
bits of floating point, which change with the CPU and the thread count (--threads).
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

DEMO_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(DEMO_DIR.parent))  # run as a script from anywhere: `models` lives at the repo root

from alphaquant import models  # noqa: E402

EOT = "<|endoftext|>"
SEED = 0
MODEL_CONFIG = {  # an OLMoE config.json (allenai/OLMoE-1B-7B-0924 keys), scaled down
    "architectures": ["OlmoeForCausalLM"],
    "model_type": "olmoe",
    "vocab_size": 4096,
    "hidden_size": 128,
    "intermediate_size": 256,  # per expert
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "num_experts": 8,
    "num_experts_per_tok": 2,
    "norm_topk_prob": False,  # as OLMoE-1B-7B
    "max_position_embeddings": 512,
    "rope_theta": 10000.0,
    "rms_norm_eps": 1e-5,
    "hidden_act": "silu",
    "attention_bias": False,
    "attention_dropout": 0.0,
    "clip_qkv": None,
    "tie_word_embeddings": True,  # keeps the checkpoint small: the 4096 x 128 embedding is stored once
    "initializer_range": 0.02,
    "router_aux_loss_coef": 0.01,
    "output_router_logits": False,
    "use_cache": True,
    "bos_token_id": 0,
    "eos_token_id": 0,
    "pad_token_id": 0,
}
TRAIN = {  # the run recorded in demo/README.md
    "seq_len": 256, "batch_size": 16, "steps": 1500, "warmup_steps": 100,
    "lr": 3e-3, "min_lr_ratio": 0.1, "weight_decay": 0.1, "betas": (0.9, 0.95), "grad_clip": 1.0,
    "lb_coef": 0.01, "z_coef": 0.001, "eval_every": 100, "eval_windows": 64,
}


# ----------------------------------------------------------------------------------------------- tokenizer
def train_tokenizer(train_txt: Path, out_dir: Path, vocab_size: int):
    """Byte-level BPE (GPT-2 style pre-tokenization) trained on train.txt; <|endoftext|> = bos/eos/unk/pad."""
    from tokenizers import Tokenizer, decoders, models as tok_models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(tok_models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    # <|endoftext|> separates modules in train.txt; train on the modules so it is not split into BPE merges.
    tok.train_from_iterator(train_txt.read_text(encoding="utf-8").split(EOT), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOT, eos_token=EOT, unk_token=EOT,
                                   pad_token=EOT, model_max_length=MODEL_CONFIG["max_position_embeddings"])
    fast.save_pretrained(out_dir)
    return fast


def encode(tokenizer, path: Path) -> torch.Tensor:
    """The whole file in one call, exactly as alphaquant/data.py tokenizes it: 1-D long tensor."""
    ids = tokenizer(path.read_text(encoding="utf-8"), return_attention_mask=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


# ----------------------------------------------------------------------------------------------- losses
class RouterLogits:
    """Forward hooks on every `mlp.gate` (router linear): keeps this step's router logits [T, E] per layer."""

    def __init__(self, model):
        self.logits: list[torch.Tensor] = []
        self.handles = [layer.mlp.gate.register_forward_hook(lambda m, i, o: self.logits.append(o))
                        for layer in model.model.layers]

    def pop(self) -> list[torch.Tensor]:
        out, self.logits = self.logits, []
        return out

    def remove(self):
        for h in self.handles:
            h.remove()


def router_losses(logits_per_layer: list[torch.Tensor], top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Switch/OLMoE load balancing E * sum_e f_e * P_e and the router z-loss, averaged over layers.

    f_e = fraction of (token, slot) assignments that go to expert e; P_e = mean router probability of e.
    Balanced routing gives lb = 1 exactly.
    """
    lb, z = 0.0, 0.0
    for logits in logits_per_layer:  # (T, E)
        num_experts = logits.shape[-1]
        probs = logits.float().softmax(-1)  # (T, E)
        topk_ids = probs.topk(top_k, dim=-1).indices  # (T, k)
        f = F.one_hot(topk_ids, num_experts).float().mean(dim=(0, 1))  # (E,), sums to 1
        lb = lb + num_experts * (f * probs.mean(0)).sum()
        z = z + torch.logsumexp(logits.float(), dim=-1).pow(2).mean()
    n = len(logits_per_layer)
    return lb / n, z / n


# ----------------------------------------------------------------------------------------------- eval
@torch.no_grad()
def perplexity(model, windows: torch.Tensor, batch_size: int = 16) -> float:
    """exp(mean next-token NLL) over [N, S] windows (each window scored on its S - 1 predictions)."""
    nll, count = 0.0, 0
    for i in range(0, windows.shape[0], batch_size):
        x = windows[i:i + batch_size]
        logits = model(x)[:, :-1].float()  # (B, S-1, V)
        nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum").item()
        count += x[:, 1:].numel()
    return math.exp(nll / count)


def eval_windows(tokens: torch.Tensor, seq_len: int, max_windows: int | None = None) -> torch.Tensor:
    """Consecutive non-overlapping [n, seq_len] windows (the demo's evaluation convention)."""
    n = tokens.numel() // seq_len if max_windows is None else min(tokens.numel() // seq_len, max_windows)
    return tokens[: n * seq_len].reshape(n, seq_len)


def unigram_perplexity(train: torch.Tensor, test: torch.Tensor, vocab_size: int) -> float:
    """Baseline: add-one smoothed unigram distribution of the train tokens, scored on the test tokens."""
    counts = torch.bincount(train, minlength=vocab_size).double() + 1.0
    logp = (counts / counts.sum()).log()
    return math.exp(-logp[test].mean().item())


def expert_usage(model, windows: torch.Tensor) -> list[list[float]]:
    """Per layer, the fraction of top-k assignments each expert receives on `windows`."""
    usage = [torch.zeros(model.config.num_experts) for _ in model.model.layers]

    def counter(u):
        def hook(module, inputs, output):  # returns None: a forward hook's return value would replace the output
            u.add_(torch.bincount(output[0].reshape(-1), minlength=u.numel()).float())
        return hook

    hooks = [layer.mlp.router.register_forward_hook(counter(u)) for layer, u in zip(model.model.layers, usage)]
    with torch.no_grad():
        model(windows)
    for h in hooks:
        h.remove()
    return [[round(x, 4) for x in (u / u.sum()).tolist()] for u in usage]


# ----------------------------------------------------------------------------------------------- training
def lr_at(step: int, cfg: dict) -> float:
    """Linear warmup, then cosine from lr down to lr * min_lr_ratio at the last step."""
    if step < cfg["warmup_steps"]:
        return cfg["lr"] * (step + 1) / cfg["warmup_steps"]
    progress = (step - cfg["warmup_steps"]) / max(1, cfg["steps"] - cfg["warmup_steps"])
    return cfg["lr"] * (cfg["min_lr_ratio"] + (1 - cfg["min_lr_ratio"]) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(model, cfg: dict) -> torch.optim.Optimizer:
    """AdamW; weight decay on 2-D matrices except the (tied) embedding, none on norms."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.ndim == 2 and "embed_tokens" not in name else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg["lr"], betas=cfg["betas"], fused=False)


def train(model, train_tokens: torch.Tensor, test_eval: torch.Tensor, train_eval: torch.Tensor, cfg: dict,
          log: dict) -> None:
    """The training loop; appends {step, lr, loss, lb, z} and eval points to log["curve"]."""
    gen = torch.Generator().manual_seed(SEED)
    opt = make_optimizer(model, cfg)
    routers = RouterLogits(model)
    S, B, top_k = cfg["seq_len"], cfg["batch_size"], model.config.top_k
    t0, running = time.time(), []
    for step in range(cfg["steps"]):
        model.train()
        starts = torch.randint(0, train_tokens.numel() - S - 1, (B,), generator=gen)  # (B,)
        batch = train_tokens[(starts[:, None] + torch.arange(S + 1)).to(train_tokens.device)]  # (B, S+1)
        x, y = batch[:, :-1], batch[:, 1:]
        logits = model(x)  # (B, S, V)
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        lb, z = router_losses(routers.pop(), top_k)
        loss = ce + cfg["lb_coef"] * lb + cfg["z_coef"] * z
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
        opt.step()
        running.append((ce.item(), lb.item(), z.item()))
        last = step == cfg["steps"] - 1
        if (step + 1) % cfg["eval_every"] == 0 or last:
            model.eval()
            routers.pop()
            ce_m, lb_m, z_m = (sum(v) / len(v) for v in zip(*running))
            point = {"step": step + 1, "lr": round(lr_at(step, cfg), 6), "train_loss": round(ce_m, 4),
                     "train_ppl_running": round(math.exp(ce_m), 2), "lb_loss": round(lb_m, 4),
                     "z_loss": round(z_m, 3), "train_ppl": round(perplexity(model, train_eval), 2),
                     "test_ppl": round(perplexity(model, test_eval), 2), "elapsed_s": round(time.time() - t0, 1)}
            routers.pop()
            log["curve"].append(point)
            print(json.dumps(point), flush=True)
            running = []
    routers.remove()
    log["train_time_s"] = round(time.time() - t0, 1)


# ----------------------------------------------------------------------------------------------- checks
@torch.no_grad()
def check_reload(out_dir: Path, x: torch.Tensor) -> dict:
    """Reload the saved checkpoint with models.from_pretrained and with transformers; compare logits."""
    ours = models.from_pretrained(out_dir, dtype="fp32")
    ref = ours(x)
    result = {"ours_fp32_logits_finite": bool(torch.isfinite(ref).all())}
    try:
        from transformers import AutoTokenizer, OlmoeForCausalLM

        hf = OlmoeForCausalLM.from_pretrained(out_dir, dtype=torch.float32).eval()
        theirs = hf(x).logits
        result["transformers_max_abs_diff"] = float((theirs - ref).abs().max())
        result["transformers_argmax_agree"] = float((theirs.argmax(-1) == ref.argmax(-1)).float().mean())
        tok = AutoTokenizer.from_pretrained(out_dir)
        result["autotokenizer"] = type(tok).__name__
        torch.testing.assert_close(theirs, ref, rtol=1e-4, atol=1e-4)
    except ImportError as e:  # transformers without OLMoE: our loader alone is checked
        result["transformers"] = f"skipped ({e})"
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", type=Path, default=DEMO_DIR / "corpus")
    ap.add_argument("--out", type=Path, default=DEMO_DIR / "olmoe-tiny")
    ap.add_argument("--steps", type=int, default=TRAIN["steps"])
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (results vary in the last bits)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (the shipped model was trained on one H100)")
    args = ap.parse_args(argv)
    for name in ("train.txt", "test.txt"):
        if not (args.corpus / name).is_file():
            print(f"{args.corpus / name} not found; run python demo/build_corpus.py first.", file=sys.stderr)
            return 2
    torch.set_num_threads(args.threads)
    torch.manual_seed(SEED)
    cfg = dict(TRAIN, steps=args.steps)
    staging = args.out.parent / f".{args.out.name}.tokenizer"
    tokenizer = train_tokenizer(args.corpus / "train.txt", staging, MODEL_CONFIG["vocab_size"])
    assert tokenizer.convert_tokens_to_ids(EOT) == MODEL_CONFIG["eos_token_id"]
    train_tokens, test_tokens = encode(tokenizer, args.corpus / "train.txt"), encode(tokenizer, args.corpus / "test.txt")
    S = cfg["seq_len"]
    test_all = eval_windows(test_tokens, S)
    train_eval = eval_windows(train_tokens, S)[torch.randperm(train_tokens.numel() // S,
                                                               generator=torch.Generator().manual_seed(SEED))
                                               [: cfg["eval_windows"]]]
    test_eval = test_all[: cfg["eval_windows"]]
    log = {"python": platform.python_version(), "torch": torch.__version__, "threads": args.threads,
           "seed": SEED, "config": MODEL_CONFIG, "train": {k: v for k, v in cfg.items()},
           "tokens": {"train": train_tokens.numel(), "test": test_tokens.numel(),
                      "train_bytes_per_token": round(
                          len((args.corpus / "train.txt").read_bytes()) / train_tokens.numel(), 3)},
           "unigram_test_ppl": round(unigram_perplexity(train_tokens, test_tokens, MODEL_CONFIG["vocab_size"]), 1),
           "curve": []}
    print(f"tokens: train {train_tokens.numel()}, test {test_tokens.numel()}; "
          f"unigram test ppl {log['unigram_test_ppl']}", flush=True)

    model = models.from_config(MODEL_CONFIG, dtype="fp32", seed=SEED).requires_grad_(True)  # loaded frozen
    model.to(args.device)
    train_tokens, test_all = train_tokens.to(args.device), test_all.to(args.device)
    train_eval, test_eval = train_eval.to(args.device), test_eval.to(args.device)
    log["device"] = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    log["params"] = sum(p.numel() for p in model.parameters())
    train(model, train_tokens, test_eval, train_eval, cfg, log)

    model.eval().to("cpu")  # the final numbers and the saved weights come from the CPU, as the demo runs
    test_all, test_eval, train_eval = test_all.cpu(), test_eval.cpu(), train_eval.cpu()
    log["final"] = {"test_windows": test_all.shape[0], "test_ppl_fp32": round(perplexity(model, test_all), 3),
                    "train_ppl_fp32": round(perplexity(model, train_eval), 3)}
    model.to(torch.bfloat16)
    log["final"]["test_ppl_bf16"] = round(perplexity(model, test_all), 3)
    log["final"]["expert_usage_test"] = expert_usage(model.float(), test_eval)
    model.to(torch.bfloat16)
    models.save_pretrained(model, args.out, overwrite=True)
    for f in staging.iterdir():  # tokenizer files next to the weights
        f.replace(args.out / f.name)
    staging.rmdir()
    (args.out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0}, indent=2) + "\n")
    log["reload"] = check_reload(args.out, test_all[:2])
    reloaded = models.from_pretrained(args.out)  # bf16, as the demo loads it
    log["final"]["test_ppl_reloaded_bf16"] = round(perplexity(reloaded, test_all), 3)
    (args.out / "training_log.json").write_text(json.dumps(log, indent=1) + "\n")
    print(json.dumps({"final": log["final"], "reload": log["reload"], "train_time_s": log["train_time_s"]}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
