"""Token streams and windows: GPTQ conventions, disjoint splits, token files, clear errors."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from alphaquant import data_sources
from alphaquant.config.run import load_config
from alphaquant.data import (build_windows, calibration_windows, check_seq_len, eval_windows, load_text,
                             load_token_file, load_tokens, parse_split, tokenize)
from alphaquant.errors import ConfigError, DataError, UserError

# Real text that ships with the repo (the demo corpus: CPython standard-library source, PSF licence).
REAL_TEXT = Path(__file__).resolve().parents[1] / "demo" / "corpus" / "test.txt"
SENTENCES = ["the cat sat on the mat", "a dog ran to the park", "first citizen : before we proceed"]


@pytest.fixture(scope="module")
def tokenizer():
    """A word-level tokenizer trained here, offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.train_from_iterator(SENTENCES, trainers.WordLevelTrainer(special_tokens=["[UNK]"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


@pytest.fixture
def corpus(tmp_path) -> Path:
    p = tmp_path / "corpus.txt"
    p.write_text("\n".join(f"line {i} " + SENTENCES[i % 3] for i in range(1000)) + "\n")
    return p


# --- windows ---------------------------------------------------------------------------------
def test_calibration_windows_are_seeded_random_slices():
    tokens = torch.arange(10_000)
    a = calibration_windows(tokens, 16, 128, seed=0)
    assert a.shape == (16, 128) and a.dtype == torch.long
    assert torch.equal(a, calibration_windows(tokens, 16, 128, seed=0))          # deterministic
    assert not torch.equal(a, calibration_windows(tokens, 16, 128, seed=1))
    assert torch.equal(a - a[:, :1], torch.arange(128).expand(16, 128))          # contiguous slices
    assert int(a.min()) >= 0 and int(a.max()) < 10_000
    assert len(set(a[:, 0].tolist())) > 1                                        # random offsets


def test_calibration_windows_cover_the_last_start():
    tokens = torch.arange(10)
    starts = calibration_windows(tokens, 500, 8, seed=0)[:, 0]
    assert set(starts.tolist()) == {0, 1, 2}                                     # 0..len-seq_len


def test_eval_windows_non_overlapping_remainder_dropped():
    w = eval_windows(torch.arange(1030), 100)
    assert w.shape == (10, 100)
    assert torch.equal(w.reshape(-1), torch.arange(1000))                       # in order, no overlap
    assert eval_windows(torch.arange(1030), 100, max_windows=3).shape == (3, 100)
    assert eval_windows(torch.arange(1030), 100, max_windows=50).shape == (10, 100)


def test_too_few_tokens_name_source_and_numbers():
    with pytest.raises(DataError, match=r"my.txt has 50 tokens, fewer than one window of seq_len 64"):
        calibration_windows(torch.arange(50), 4, 64, source="my.txt")
    with pytest.raises(DataError, match=r"50 tokens.*seq_len 64"):
        eval_windows(torch.arange(50), 64)


def test_check_seq_len():
    check_seq_len(2048, 4096)
    check_seq_len(2048, None)
    with pytest.raises(ConfigError, match=r"eval.seq_len is 8192 but .*max_position_embeddings is 4096"):
        check_seq_len(8192, 4096, key="eval.seq_len")


# --- splits of one local corpus ----------------------------------------------------------------
def test_parse_split():
    assert parse_split("train")[1:] == (0.0, 0.9) and parse_split("test")[1:] == (0.9, 1.0)
    assert parse_split("0.25:0.5")[1:] == (0.25, 0.5) and parse_split(":0.5")[1:] == (0.0, 0.5)
    for bad in ("dev", "0.5:0.5", "0:2", "a:b", "0.5"):
        with pytest.raises(ConfigError, match="calibration.split"):
            parse_split(bad, key="calibration.split")


def test_train_and_test_are_disjoint_and_cover_the_text():
    text = REAL_TEXT.read_text(encoding="utf-8")
    train, test = load_text(str(REAL_TEXT), "train"), load_text(str(REAL_TEXT), "test")
    assert train + test == text                          # one cut point, nothing shared or lost
    assert 0.89 < len(train) / len(text) < 0.91
    assert test.startswith("\n")                         # cut at a line boundary
    assert load_text(str(REAL_TEXT), "all") == text


def test_fraction_ranges_tile_the_text(corpus):
    parts = [load_text(str(corpus), s) for s in ("0:0.3", "0.3:0.7", "0.7:1")]
    assert "".join(parts) == corpus.read_text()


def test_train_test_tokens_disjoint(corpus, tokenizer):
    train = load_tokens(str(corpus), "train", tokenizer, vocab_size=len(tokenizer))
    test = load_tokens(str(corpus), "test", tokenizer, vocab_size=len(tokenizer))
    full = load_tokens(str(corpus), "all", tokenizer)
    assert torch.equal(torch.cat([train, test]), full)   # word-level: the cut falls between words


def test_jsonl(tmp_path):
    p = tmp_path / "docs.jsonl"
    p.write_text('{"content": "doc one"}\n\n{"content": "doc two"}\n')
    assert load_text(str(p), "all", text_field="content") == "doc one\n\ndoc two"
    with pytest.raises(DataError, match=r"line 1 has no string field 'text'"):
        load_text(str(p), "all")


# --- token files -------------------------------------------------------------------------------
def test_token_files(tmp_path):
    ids = torch.arange(1000) * 7 % 50_000
    torch.save(ids.to(torch.int32), tmp_path / "t.pt")
    np.save(tmp_path / "t.npy", ids.numpy().astype(np.uint16))
    ids.numpy().astype(np.uint16).tofile(tmp_path / "t16.bin")
    (ids + 70_000).numpy().astype(np.uint32).tofile(tmp_path / "t32.bin")
    for name, dtype, want in [("t.pt", "uint16", ids), ("t.npy", "uint16", ids),
                              ("t16.bin", "uint16", ids), ("t32.bin", "uint32", ids + 70_000)]:
        got = load_token_file(str(tmp_path / name), "all", dtype)
        assert got.dtype == torch.long and torch.equal(got, want), name
    assert torch.equal(load_token_file(str(tmp_path / "t.pt"), "train"), ids[:900])
    assert torch.equal(load_token_file(str(tmp_path / "t.pt"), "test"), ids[900:])
    # load_tokens needs no tokenizer for a token file
    assert torch.equal(load_tokens(str(tmp_path / "t16.bin"), "all", vocab_size=50_000), ids)


def test_bad_token_files(tmp_path):
    (tmp_path / "odd.bin").write_bytes(b"\x00\x01\x02")
    with pytest.raises(DataError, match="3 bytes"):
        load_token_file(str(tmp_path / "odd.bin"), "all", "uint16")
    torch.save(torch.rand(10), tmp_path / "f.pt")
    with pytest.raises(DataError, match="integer tensor"):
        load_token_file(str(tmp_path / "f.pt"))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(DataError, match="could not read the token file"):
        load_token_file(str(tmp_path / "junk.pt"))


def test_out_of_vocab_tokens(tmp_path):
    torch.save(torch.tensor([1, 2, 50_304, 3]), tmp_path / "t.pt")
    with pytest.raises(DataError, match=r"token id 50304 but the model's vocab_size is 50304"):
        load_tokens(str(tmp_path / "t.pt"), "all", vocab_size=50_304, key="calibration.dataset")


# --- empty / missing / hub -----------------------------------------------------------------------
def test_empty_sources(tmp_path, tokenizer):
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(DataError, match=r"empty.txt' split 'all' holds no text"):
        load_tokens(str(tmp_path / "empty.txt"), "all", tokenizer)
    (tmp_path / "empty.bin").write_bytes(b"")
    with pytest.raises(DataError, match="holds no tokens"):
        load_tokens(str(tmp_path / "empty.bin"), "all")


def test_missing_and_unknown_sources(tmp_path):
    with pytest.raises(DataError, match=r"eval.dataset: the file '.*nope.txt' does not exist"):
        load_text(str(tmp_path / "nope.txt"), "test", key="eval.dataset")
    with pytest.raises(DataError, match=r"must be wikitext2, c4, or a local"):
        load_text("pile", "train")


def test_hub_offline_suggests_a_local_file(monkeypatch):
    def offline(*a, **k):
        raise ConnectionError("Couldn't reach 'wikitext' on the Hub")
    monkeypatch.setattr(data_sources, "_hub_load", offline)
    with pytest.raises(UserError, match=r"calibration.dataset: could not load the hub dataset 'wikitext2'.*local .txt"):
        load_text("wikitext2", "train", key="calibration.dataset")
    with pytest.raises(ConfigError, match=r"c4 has the splits train, validation"):
        load_text("c4", "test", key="eval.dataset")
    with pytest.raises(ConfigError, match=r"fraction ranges apply to local files"):
        load_text("wikitext2", "0:0.5")


def test_hub_wikitext_joined_as_gptq(monkeypatch):
    calls = []

    def fake(path, name, split, data_files=None):
        calls.append((path, name, split))
        return {"text": [" = Title = \n", " body \n"]}
    monkeypatch.setattr(data_sources, "_hub_load", fake)
    assert load_text("wikitext2", "test") == " = Title = \n\n\n body \n"
    assert calls == [("Salesforce/wikitext", "wikitext-2-raw-v1", "test")]


# --- tokenizer and the config entry point ---------------------------------------------------------
def test_tokenize(tokenizer):
    ids = tokenize("the cat sat\nthe zebra", tokenizer)
    assert ids.dtype == torch.long and ids.dim() == 1 and ids.numel() == 5
    assert ids[-1] == tokenizer.convert_tokens_to_ids("[UNK]")


def test_build_windows_from_config(tmp_path, corpus, tokenizer):
    p = tmp_path / "run.yaml"
    p.write_text(f"model: {{path: x}}\ncalibration: {{dataset: {corpus}, num_samples: 8, seq_len: 32}}\n"
                 f"eval: {{dataset: {corpus}, seq_len: 64, max_windows: 5}}\n")
    cfg = load_config(p)
    w = build_windows(cfg, tokenizer, vocab_size=len(tokenizer), max_pos=128)
    assert w["calib"].shape == (8, 32) and w["eval"].shape == (5, 64)
    assert torch.equal(w["calib"], build_windows(cfg, tokenizer)["calib"])
    with pytest.raises(ConfigError, match="calibration.seq_len is 32"):
        build_windows(cfg, tokenizer, max_pos=16)
    cfg.eval.enabled = False
    assert set(build_windows(cfg, tokenizer)) == {"calib"}
