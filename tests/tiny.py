"""Tiny checkpoints of the four families, a byte-level tokenizer and a text corpus, built offline.

Pipeline tests quantize these end to end; hidden sizes are multiples of 32 so the recipes'
group sizes (16/32) divide every in_features.
"""
from __future__ import annotations

from pathlib import Path

from alphaquant import models

# Real text shipped in the repo: the demo corpus (CPython standard-library source, PSF licence).
CORPUS = Path(__file__).resolve().parents[1] / "demo" / "corpus" / "train.txt"

BASE = dict(vocab_size=320, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=256, rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False,
            initializer_range=0.05, bos_token_id=None, eos_token_id=0, pad_token_id=None)

FAMILIES = {
    "olmoe": dict(model_type="olmoe", intermediate_size=32, num_experts=8, num_experts_per_tok=2,
                  norm_topk_prob=False),
    "mixtral": dict(model_type="mixtral", intermediate_size=64, num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(model_type="qwen2_moe", intermediate_size=96, moe_intermediate_size=32,
                      shared_expert_intermediate_size=64, num_experts=8, num_experts_per_tok=2,
                      norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[]),
    "deepseek_moe": dict(model_type="deepseek", intermediate_size=96, moe_intermediate_size=32, n_routed_experts=8,
                         num_experts_per_tok=2, n_shared_experts=2, first_k_dense_replace=1, moe_layer_freq=1,
                         norm_topk_prob=False, scoring_func="softmax"),
}


def corpus_text(chars: int = 120_000) -> str:
    return CORPUS.read_text(encoding="utf-8")[:chars]


def write_tokenizer(directory: Path, text: str, vocab_size: int = 320) -> None:
    from tokenizers import Tokenizer, decoders, models as tm, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(tm.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([text], trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(directory)


def make_checkpoint(family: str, directory: Path, seed: int = 0, **overrides) -> Path:
    """A random tiny checkpoint of `family` with a tokenizer, saved in the hub layout."""
    directory = Path(directory)
    cfg = {**BASE, **FAMILIES[family], **overrides}
    model = models.from_config(cfg, seed=seed)
    models.save_pretrained(model, directory)
    write_tokenizer(directory, corpus_text(40_000), cfg["vocab_size"])
    return directory


def write_corpus(directory: Path) -> Path:
    path = Path(directory) / "corpus.txt"
    path.write_text(corpus_text())
    return path


def family_checkpoints(root: Path) -> tuple[Path, Path, dict[str, Path]]:
    """(root, corpus file, {family: checkpoint dir}) for every family in FAMILIES, under root."""
    corpus = write_corpus(root)
    return root, corpus, {f: make_checkpoint(f, root / f) for f in FAMILIES}
