"""Calibration and evaluation token windows (pure torch + a transformers tokenizer).

GPTQ conventions: calibration = `num_samples` windows of `seq_len` tokens at random start
offsets (seeded `torch.Generator`, so the same seed gives the same windows); evaluation = the
token stream cut into non-overlapping `seq_len` windows, the remainder dropped.

    tokens = load_tokens("data/corpus.txt", "train", tokenizer, vocab_size=50304)
    calib = calibration_windows(tokens, num_samples=128, seq_len=2048, seed=0)  # [128, 2048]
    test = eval_windows(load_tokens("data/corpus.txt", "test", tokenizer), 2048)  # [n, 2048]

Or everything a run needs from the config at once:

    windows = build_windows(cfg, tokenizer, vocab_size=50304, max_pos=4096)
    windows["calib"].shape, windows["eval"].shape
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from alphaquant.data_sources import (HUB_SPLITS, TOKEN_SUFFIXES, check_hub_split, load_text, load_token_file,
                                     parse_split, split_text, split_tokens)
from alphaquant.errors import ConfigError, DataError

__all__ = ["SELF", "build_windows", "calibration_windows", "check_calibration_memory", "check_seq_len", "check_sources",
           "check_tokenizer_dir",
           "check_vocab", "eval_windows", "needs_tokenizer",
           "load_text", "load_token_file", "load_tokens", "parse_split", "self_calibration_windows", "split_text",
           "split_tokens", "tokenize"]


def tokenize(text: str, tokenizer) -> torch.Tensor:
    """1-D LongTensor of `tokenizer(text)` ids (special tokens as the tokenizer adds them, as GPTQ)."""
    enc = tokenizer(text, return_attention_mask=False, verbose=False)
    return torch.as_tensor(enc["input_ids"], dtype=torch.long).reshape(-1)


def check_vocab(tokens: torch.Tensor, vocab_size: int | None, source: str) -> None:
    """DataError when a token id is negative or >= vocab_size (a file made by another tokenizer)."""
    if vocab_size is None or tokens.numel() == 0:
        return
    lo, hi = int(tokens.min()), int(tokens.max())
    if hi >= vocab_size or lo < 0:
        bad = hi if hi >= vocab_size else lo
        raise DataError(f"{source} holds token id {bad} but the model's vocab_size is {vocab_size} "
                        f"(ids must be in 0..{vocab_size - 1}); was it tokenized for another model?")


def check_seq_len(seq_len: int, max_pos: int | None, key: str = "calibration.seq_len") -> None:
    """ConfigError when windows are longer than the model's max_position_embeddings."""
    if max_pos is not None and seq_len > max_pos:
        raise ConfigError(f"{key} is {seq_len} but the model's max_position_embeddings is {max_pos}; "
                          f"set {key} to at most {max_pos}")


def load_tokens(source: str, split: str, tokenizer=None, *, text_field: str = "text",
                token_dtype: str = "uint16", vocab_size: int | None = None,
                key: str = "calibration.dataset") -> torch.Tensor:
    """1-D LongTensor of the token ids of `source`'s `split` (text is tokenized, token files read)."""
    if str(source).endswith(TOKEN_SUFFIXES):
        tokens = load_token_file(source, split, token_dtype, key=key)
    else:
        if tokenizer is None:
            raise ValueError(f"{key} {source!r} is text and needs a tokenizer")
        tokens = tokenize(load_text(source, split, text_field, key=key), tokenizer)
    where = f"{key} '{source}' (split {split!r})"
    if tokens.numel() == 0:
        raise DataError(f"{where} holds no tokens")
    check_vocab(tokens, vocab_size, where)
    return tokens


def _too_short(tokens: torch.Tensor, seq_len: int, source: str) -> DataError:
    return DataError(f"{source} has {tokens.numel()} tokens, fewer than one window of "
                     f"seq_len {seq_len}; use more text or a smaller seq_len")


def calibration_windows(tokens: torch.Tensor, num_samples: int, seq_len: int, seed: int = 0,
                        source: str = "the calibration data") -> torch.Tensor:
    """[num_samples, seq_len] windows at seeded random offsets in [0, len - seq_len].

    >>> calibration_windows(torch.arange(100), 3, 8, seed=0).shape
    torch.Size([3, 8])
    """
    n = tokens.numel()
    if n < seq_len:
        raise _too_short(tokens, seq_len, source)
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, n - seq_len + 1, (num_samples,), generator=g)     # (N,)
    return tokens.reshape(-1)[starts[:, None] + torch.arange(seq_len)]          # (N, T)


def eval_windows(tokens: torch.Tensor, seq_len: int, max_windows: int | None = None,
                 source: str = "the evaluation data") -> torch.Tensor:
    """[n, seq_len] consecutive non-overlapping windows; the last partial window is dropped.

    >>> eval_windows(torch.arange(10), 4).tolist()
    [[0, 1, 2, 3], [4, 5, 6, 7]]
    """
    n = tokens.numel() // seq_len
    if n == 0:
        raise _too_short(tokens, seq_len, source)
    if max_windows is not None:
        n = min(n, max_windows)
    return tokens.reshape(-1)[: n * seq_len].reshape(n, seq_len)


SELF = "self"    # calibration.dataset: windows the model generates itself (alphaquant/data_self.py)


def self_calibration_windows(cfg, tokenizer, model, vocab_size: int | None = None) -> torch.Tensor:
    """calibration.dataset self: [N, T] windows `model` writes from prompts (calibration.self_prompts' first
    tokens of seeded random windows, or the start token), balanced over experts (`data_self.self_windows`)."""
    from alphaquant.data_self import check_model, self_windows, start_token

    cal = cfg.calibration
    if model is None:
        raise ConfigError("calibration.dataset self needs the model to generate from; pass model= to build_windows")
    check_model(model)
    if cal.self_prompts:
        tokens = load_tokens(cal.self_prompts, cal.split, tokenizer, text_field=cal.text_field,
                             token_dtype=cal.token_dtype, vocab_size=vocab_size, key="calibration.self_prompts")
        prompts = calibration_windows(tokens, cal.num_samples, cal.self_prompt_len, cal.seed,
                                      source=f"calibration.self_prompts '{cal.self_prompts}' (split {cal.split!r})")
    else:
        prompts = torch.full((cal.num_samples, cal.self_prompt_len), start_token(tokenizer, model.config),
                             dtype=torch.long)
    return self_windows(model, cal.num_samples, cal.seq_len, prompts, seed=cal.seed,
                        temperature=cal.self_temperature, balance=cal.self_balance,
                        candidates=cal.self_candidates, batch_size=max(cal.batch_size, 16))


def build_windows(cfg, tokenizer, vocab_size: int | None = None,
                  max_pos: int | None = None, model=None) -> dict[str, torch.Tensor]:
    """{"calib": [N, T], "eval": [M, T'] (when cfg.eval.enabled)} from a `Config`.

    model: the unquantized model, needed (whole, in memory) when calibration.dataset is self."""
    cal, ev = cfg.calibration, cfg.eval
    check_seq_len(cal.seq_len, max_pos, "calibration.seq_len")
    if cal.dataset == SELF:
        out = {"calib": self_calibration_windows(cfg, tokenizer, model, vocab_size)}
    else:
        tokens = load_tokens(cal.dataset, cal.split, tokenizer, text_field=cal.text_field,
                             token_dtype=cal.token_dtype, vocab_size=vocab_size, key="calibration.dataset")
        out = {"calib": calibration_windows(tokens, cal.num_samples, cal.seq_len, cal.seed,
                                            source=f"calibration.dataset '{cal.dataset}' (split {cal.split!r})")}
    if ev.enabled:
        check_seq_len(ev.seq_len, max_pos, "eval.seq_len")
        tokens = load_tokens(ev.dataset, ev.split, tokenizer, text_field=ev.text_field,
                             token_dtype=ev.token_dtype, vocab_size=vocab_size, key="eval.dataset")
        out["eval"] = eval_windows(tokens, ev.seq_len, ev.max_windows,
                                   source=f"eval.dataset '{ev.dataset}' (split {ev.split!r})")
    return out


# Files one of which a tokenizer directory holds (fast, sentencepiece, BPE, WordPiece vocabularies).
TOKENIZER_VOCAB_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
                         "sentencepiece.bpe.model", "tiktoken.model")


def _streams(cfg):
    return [("calibration", cfg.calibration)] + ([("eval", cfg.eval)] if cfg.eval.enabled else [])


def _sources(cfg):
    """(key, source, split, text_field, token_dtype, seq_len) of every data file or hub set a run reads
    (calibration.dataset self reads none; its calibration.self_prompts, if set, is read for short prompts)."""
    out = []
    for name, s in _streams(cfg):
        if name == "calibration" and s.dataset == SELF:
            if s.self_prompts:
                out.append(("calibration.self_prompts", s.self_prompts, s.split, s.text_field, s.token_dtype,
                            s.self_prompt_len))
            continue
        out.append((f"{name}.dataset", s.dataset, s.split, s.text_field, s.token_dtype, s.seq_len))
    return out


def needs_tokenizer(cfg) -> bool:
    """True when a calibration/evaluation source is text (not a pre-tokenized file)."""
    return any(not str(src).endswith(TOKEN_SUFFIXES) for _, src, *_ in _sources(cfg))


def check_tokenizer_dir(path: str, key: str = "model.tokenizer") -> None:
    """DataError when `path` is a local directory without tokenizer files.

    (AutoTokenizer would otherwise build an empty tokenizer from config.json alone and the
    run would fail later with "2 tokens, fewer than one window".) Hub ids are not checked here.
    """
    p = Path(path).expanduser()
    if p.is_dir() and not any((p / f).is_file() for f in TOKENIZER_VOCAB_FILES):
        raise DataError(f"{key}: '{path}' holds no tokenizer (none of {', '.join(TOKENIZER_VOCAB_FILES[:4])}); "
                        f"set model.tokenizer to a directory or hub id with the model's tokenizer.json")


DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
TOKEN_WINDOW_BYTES = 16      # int64 per token, twice: the offset index and the gathered windows


def available_host_memory() -> int | None:
    """Bytes this process can still allocate: MemAvailable, or less when a cgroup (container) limit is lower."""
    avail = None
    try:
        with open("/proc/meminfo") as f:
            avail = next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, AttributeError):
            return None
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
        if limit != "max":
            avail = min(avail, int(limit) - used)
    except (OSError, ValueError):
        pass
    return avail


def _gib(n: float) -> str:
    return f"{n / 2**30:,.1f} GiB"


def check_calibration_memory(cfg, hidden_size: int, gpus: int = 0, gpu_free: int | None = None,
                             host_free: int | None = None) -> None:
    """ConfigError when calibration.num_samples x seq_len windows cannot fit, estimated before allocating.

    Windows are drawn with replacement, so no data size bounds them. The walk keeps every window's
    hidden states (num_samples x seq_len x hidden_size x dtype bytes) between the passes of a layer:
    on the accelerator when `gpus` > 0 (each GPU holds its share; `gpu_free` = free bytes of one),
    else in host RAM; the token windows are built in host RAM by every process. Model weights come
    on top, so passing this is necessary, not sufficient.

        check_calibration_memory(cfg, hidden_size=2048)   # 10**7 windows of 2048 tokens: ConfigError
    """
    cal, b = cfg.calibration, DTYPE_BYTES[cfg.model.dtype]
    procs = cfg.trainer.devices if isinstance(cfg.trainer.devices, int) else max(gpus, 1)
    act_window = cal.seq_len * hidden_size * b             # bytes of one window's cached hidden states
    ids_window = cal.seq_len * TOKEN_WINDOW_BYTES * procs   # bytes of one window's token ids, all processes
    acts, ids = cal.num_samples * act_window, cal.num_samples * ids_window
    what = (f"calibration.num_samples {cal.num_samples} x calibration.seq_len {cal.seq_len} windows need "
            f"{_gib(acts)} for their cached {cfg.model.dtype} activations ({cal.num_samples} x {cal.seq_len} x "
            f"hidden_size {hidden_size} x {b} bytes)")
    host_free = available_host_memory() if host_free is None else host_free
    host_window = ids_window + (0 if gpus else act_window)
    if host_free is not None and cal.num_samples * host_window > host_free:
        need = (f"{what} and {_gib(ids)} for their token ids, {_gib(cal.num_samples * host_window)} of host RAM "
                f"in all" if not gpus else f"{what.split(' need ')[0]} need {_gib(ids)} of host RAM for their "
                f"token ids ({procs} process(es) x {cal.num_samples} x {cal.seq_len} x {TOKEN_WINDOW_BYTES} bytes)")
        raise ConfigError(f"{need}, but only {_gib(host_free)} is available; lower "
                          f"calibration.num_samples (about {host_free // host_window:,} windows of this seq_len "
                          f"fit) or calibration.seq_len")
    if gpus and gpu_free is not None and acts / gpus > gpu_free:
        raise ConfigError(f"{what}, {_gib(acts / gpus)} on each of {gpus} GPU(s), but only {_gib(gpu_free)} "
                          f"of GPU memory is free; lower calibration.num_samples (about "
                          f"{gpu_free * gpus // act_window:,} windows of this seq_len fit) or "
                          f"calibration.seq_len, or use more GPUs")


def check_sources(cfg, vocab_size: int | None = None, max_pos: int | None = None) -> None:
    """The data checks that need no tokenizer pass and no weights, so they fail before a model loads:
    seq_len against max_position_embeddings, hub splits, local files present and of a known kind,
    text not empty, token files readable, in the vocabulary and at least one window long."""
    for name, s in _streams(cfg):
        check_seq_len(s.seq_len, max_pos, f"{name}.seq_len")
    for key, src, split, text_field, token_dtype, seq_len in _sources(cfg):
        if src in HUB_SPLITS:
            check_hub_split(src, parse_split(split, key=key.rsplit(".", 1)[0] + ".split"), key)
        elif str(src).endswith(TOKEN_SUFFIXES):
            tokens = load_tokens(src, split, token_dtype=token_dtype, vocab_size=vocab_size, key=key)
            if tokens.numel() < seq_len:
                raise _too_short(tokens, seq_len, f"{key} '{src}' (split {split!r})")
        else:
            load_text(src, split, text_field, key=key)
