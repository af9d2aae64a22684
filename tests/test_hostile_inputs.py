"""Hostile input (issue 17, point 5), one case at a time: one sentence on stderr, exit code 2, no traceback,
nothing written, the input model untouched.

The same contract as tests/test_bad_inputs.py (its `_assert_user_error`), plus a checksum of every
file of the input model directory (and, for --eval-only, of the checkpoint) before and after the case.
Every case runs `alphaquant.app.main(argv)` in-process against a tiny OLMoE checkpoint. Cases that
must fail before any weight is read run with `models.loading._materialize` replaced by a tripwire;
the rest (non-finite evaluation outputs) run a real tiny calibration.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import socket
from pathlib import Path

import pytest
import torch
import yaml

import tiny
from alphaquant.app import main
from test_bad_inputs import Env, _assert_user_error, _set

INT64_MAX = 2**63 - 1


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile_inputs")
    return tiny.make_checkpoint("olmoe", root / "olmoe"), tiny.write_corpus(root)


def _checksums(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def _no_wandb_credentials(env: Env) -> None:
    """An environment in which wandb would find no API key and no netrc entry."""
    for var in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_MODE", "WANDB_BASE_URL"):
        env.monkeypatch.delenv(var, raising=False)
    home = env.tmp / "home"
    home.mkdir(exist_ok=True)
    env.monkeypatch.setenv("HOME", str(home))
    env.monkeypatch.setenv("NETRC", str(home / ".netrc"))
    env.monkeypatch.setenv("WANDB_CONFIG_DIR", str(home / ".config" / "wandb"))


def _closed_port() -> int:
    """A local TCP port nothing listens on (bound, then released): a connect is refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _edit_config_json(env: Env, **values) -> None:
    path = env.model_copy() / "config.json"
    cfg = json.loads(path.read_text())
    cfg.update(values)
    path.write_text(json.dumps(cfg))


def _edit_tensors(directory: Path, fn) -> None:
    from safetensors.torch import load_file, save_file
    f = directory / "model.safetensors"
    tensors = load_file(f)
    fn(tensors)
    save_file(tensors, f, metadata={"format": "pt"})


# --- the cases -----------------------------------------------------------------------------
# Each case: env -> (argv, needles).

def config_not_utf8(env):
    path = env.config()
    path.write_bytes(b"# r\xe9glage latin-1\n" + path.read_bytes())
    return ["--config", str(path), "--dry-run"], ["run.yaml", "is not UTF-8", "0xe9", "line 1"]


def duplicate_top_level_key(env):
    path = env.config()
    path.write_text(path.read_text() + "seed: 3\nseed: 4\n")
    text = path.read_text().splitlines()
    first = text.index("seed: 3") + 1
    return ["--config", str(path), "--dry-run"], ["run.yaml", "'seed' twice", f"line {first} and line {first + 1}"]


def duplicate_nested_key(env):
    path = env.config()
    lines = path.read_text().splitlines()
    at = lines.index("calibration:") + 1
    lines.insert(at, "  seq_len: 16")            # calibration.seq_len: 32 follows further down
    path.write_text("\n".join(lines) + "\n")
    second = next(i for i, ln in enumerate(lines) if ln.strip() == "seq_len: 32") + 1
    return ["--config", str(path), "--dry-run"], ["'calibration.seq_len' twice", f"line {at + 1} and line {second}"]


def duplicate_key_in_list_item(env):
    path = env.config()
    lines = path.read_text().splitlines()
    at = next(i for i, ln in enumerate(lines) if "pattern: '*.experts.*'" in ln)
    lines.insert(at + 1, "    wq: int8")        # the override's wq: mxfp4/32 follows on the next line
    path.write_text("\n".join(lines) + "\n")
    return ["--config", str(path), "--dry-run"], ["'quant.overrides[0].wq' twice", f"line {at + 2} and line {at + 3}"]


def seed_above_int64(env):
    return (["--config", str(env.config()), "--dry-run", "--seed", str(INT64_MAX + 1)],
            ["seed must fit in an int64", str(INT64_MAX), f"got {INT64_MAX + 1}", "--seed"])


def calibration_seed_above_int64(env):
    path = env.config(_set("calibration", seed=2**64))
    return ["--config", str(path), "--dry-run"], ["calibration.seed must fit in an int64", f"got {2**64}", "run.yaml"]


def seed_below_int64(env):
    return (["--config", str(env.config()), "--dry-run", "--calibration.seed", str(-2**63 - 1)],
            ["calibration.seed must fit in an int64", str(-2**63), "--calibration.seed"])


def eval_seq_len_one(env):
    path = env.config(_set("eval", enabled=True, seq_len=1))
    return ["--config", str(path), "--dry-run"], ["eval.seq_len must be >= 2", "got 1"]


def config_json_eps_string(env):
    _edit_config_json(env, rms_norm_eps="1e-5")
    return ["--config", str(env.config()), "--dry-run"], ["config.json key 'rms_norm_eps'", "a number",
                                                          '"1e-5" (a string)']


def config_json_vocab_null(env):
    _edit_config_json(env, vocab_size=None)
    return ["--config", str(env.config()), "--dry-run"], ["config.json key 'vocab_size'", "an integer > 0", "null"]


def config_json_heads_zero(env):
    _edit_config_json(env, num_attention_heads=0)
    return ["--config", str(env.config()), "--dry-run"], ["'num_attention_heads'", "an integer > 0", "got 0"]


def config_json_bool_string(env):
    _edit_config_json(env, tie_word_embeddings="false")
    return ["--config", str(env.config()), "--dry-run"], ["'tie_word_embeddings'", "true or false", '"false"']


def config_json_rope_factor_string(env):
    _edit_config_json(env, rope_scaling={"type": "linear", "factor": "2"})
    return ["--config", str(env.config()), "--dry-run"], ["'rope_scaling.factor'", "a number > 0"]


def config_json_missing_family_key(env):
    path = env.model_copy() / "config.json"
    cfg = json.loads(path.read_text())
    del cfg["intermediate_size"]
    path.write_text(json.dumps(cfg))
    return ["--config", str(env.config()), "--dry-run"], ["config.json lacks the required key 'intermediate_size'"]


def integer_expert_tensor(env):
    key = "model.layers.1.mlp.experts.5.down_proj.weight"
    _edit_tensors(env.model_copy(), lambda t: t.update({key: (t[key] * 100).to(torch.int8)}))
    return ["--config", str(env.config())], [key, "stored as I8", "floating point", "already quantized"]


def jsonl_not_utf8(env):
    data = env.tmp / "calib.jsonl"
    rows = [json.dumps({"text": line}) for line in tiny.corpus_text(20_000).splitlines() if line.strip()]
    data.write_bytes("\n".join(rows[:50]).encode() + b'\n{"text": "caf\xe9"}\n')
    path = env.config(_set("calibration", dataset=str(data), split="all"))
    return ["--config", str(path)], ["calibration.dataset", "calib.jsonl", "is not UTF-8", "0xe9", "line 51"]


def txt_not_utf8(env):
    # the choice for both text kinds: refused, not read with replacement characters
    data = env.tmp / "eval.txt"
    data.write_bytes(tiny.corpus_text(20_000).encode() + b"\nna\xefve\n")
    path = env.config(_set("eval", enabled=True, dataset=str(data), split="all"))
    return ["--config", str(path)], ["eval.dataset", "eval.txt", "is not UTF-8", "0xef"]


def num_samples_beyond_memory(env):
    n = 10**9                                    # x 32 tokens x hidden 64 x 4 bytes = 7.5 TiB of activations
    path = env.config(_set("calibration", num_samples=n))
    return ["--config", str(path)], [f"calibration.num_samples {n} x calibration.seq_len 32",
                                     "7,629.4 GiB for their cached float32 activations", "hidden_size 64",
                                     "is available", "lower calibration.num_samples"]


def wandb_online_without_credentials(env):
    _no_wandb_credentials(env)
    path = env.config(lambda c: c["logging"]["wandb"].update(mode="online"))
    return ["--config", str(path)], ["logging.wandb.mode is 'online'", "no W&B credentials", "WANDB_API_KEY",
                                     "api.wandb.ai", "offline"]


def wandb_online_server_unreachable(env):
    _no_wandb_credentials(env)
    port = _closed_port()
    env.monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{port}")
    # credentials from a .netrc entry, as `wandb login` writes them: the server is what is missing
    (env.tmp / "home" / ".netrc").write_text(f"machine 127.0.0.1:{port}\n  login user\n  password {'k' * 40}\n")
    path = env.config(lambda c: c["logging"]["wandb"].update(mode="online"))
    return ["--config", str(path)], ["logging.wandb.mode is 'online'", f"127.0.0.1:{port} cannot be reached",
                                     "WANDB_BASE_URL", "offline"]


def nan_logits_in_head(env):
    # a finite weight (the load's NaN/Inf check passes) that overflows the logits; calibration never
    # runs the head, so only the evaluation sees it
    _edit_tensors(env.model_copy(), lambda t: t["lm_head.weight"].fill_(3e38))
    path = env.config(_set("eval", enabled=True, seq_len=32, max_windows=2))
    return ["--config", str(path)], ["logits", "head (final norm + lm_head", "NaN or Inf", "eval.dataset",
                                     "perplexity is undefined"]


def nan_outputs_of_a_layer_in_eval(env):
    # the original model's layer 1 overflows: its evaluation pass runs before the layer's calibration
    _edit_tensors(env.model_copy(), lambda t: t["model.layers.1.post_attention_layernorm.weight"].fill_(3e38))
    path = env.config(_set("eval", enabled=True, seq_len=32, max_windows=2))
    return ["--config", str(path)], ["the original model's outputs of decoder layer 1 (counting from 0)",
                                     "NaN or Inf", "perplexity is undefined"]


CASES = [config_not_utf8, duplicate_top_level_key, duplicate_nested_key, duplicate_key_in_list_item,
         seed_above_int64, calibration_seed_above_int64, seed_below_int64, eval_seq_len_one,
         config_json_eps_string, config_json_vocab_null, config_json_heads_zero, config_json_bool_string,
         config_json_rope_factor_string, config_json_missing_family_key, integer_expert_tensor,
         jsonl_not_utf8, txt_not_utf8, num_samples_beyond_memory, wandb_online_without_credentials,
         wandb_online_server_unreachable, nan_logits_in_head, nan_outputs_of_a_layer_in_eval]

# found while the model is walked; every other case must fail before the first weight is read
AFTER_LOAD = {nan_logits_in_head, nan_outputs_of_a_layer_in_eval}


def _forbid_weight_reads(monkeypatch):
    from alphaquant.models import loading as models_loading

    def no_weights(model, prefix, *a, **k):
        raise AssertionError(f"weights under {prefix!r} were read before the bad input was reported")
    monkeypatch.setattr(models_loading, "_materialize", no_weights)


@pytest.mark.parametrize("case", CASES, ids=[c.__name__ for c in CASES])
def test_hostile_input_is_one_sentence_exit_2_nothing_written(case, base, tmp_path, monkeypatch, capsys):
    env = Env(tmp_path, *base, monkeypatch)
    monkeypatch.chdir(tmp_path)                 # anything written by mistake lands here
    argv, needles = case(env)
    if case not in AFTER_LOAD:
        _forbid_weight_reads(monkeypatch)
    model_before = _checksums(env.ckpt)
    before = sorted(p.name for p in tmp_path.iterdir())
    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err
    _assert_user_error(rc, err, needles, env.out)
    assert _checksums(env.ckpt) == model_before, f"the input model {env.ckpt} was modified"
    allowed = {"logs"}          # a user error clears the crash-resume state (a rerun would fail the same way)
    after = sorted(p.name for p in tmp_path.iterdir() if p.name not in allowed)
    assert not set(after) - set(before), f"new files: {set(after) - set(before)}"


def test_distinct_cases():
    assert len(CASES) == len(set(CASES)) >= 20


# --- the limits are where they say (the cases above are not refused for another reason) --------------
def test_accepted_edges(base, tmp_path, monkeypatch, capsys):
    env = Env(tmp_path, *base, monkeypatch)
    path = env.config(lambda c: c.update(seed=-2**63) or c["calibration"].update(seed=INT64_MAX))
    path.write_text(path.read_text() + "# caf\u00e9, UTF-8\n", encoding="utf-8")
    assert main(["--config", str(path), "--dry-run", "--eval.seq_len", "2"]) == 0, capsys.readouterr().err
    assert not env.out.exists()


def test_yaml_merge_key_may_be_overridden(tmp_path):
    # `<<: *base` then an explicit key is YAML's way to override a merged value, not a duplicate
    from alphaquant.config.schema import yaml_load
    text = "base: &b {seq_len: 16, num_samples: 4}\ncalibration:\n  <<: *b\n  seq_len: 32\n"
    assert yaml_load(text, "run.yaml")["calibration"] == {"seq_len": 32, "num_samples": 4}


def test_memory_estimate_on_gpus_names_the_share():
    """The GPU branch (no GPU here): activations live on the GPUs, each holding its share."""
    from alphaquant.config.run import load_config
    from alphaquant.data import check_calibration_memory
    from alphaquant.errors import ConfigError

    cfg = load_config(None, ["--model.path", "x", "--calibration.num_samples", "4096",
                             "--calibration.seq_len", "2048", "--model.dtype", "bfloat16", "--trainer.devices", "2"])
    check_calibration_memory(cfg, 4096, gpus=2, gpu_free=40 * 2**30, host_free=2**40)    # 32 GiB each: fits
    with pytest.raises(ConfigError) as e:
        check_calibration_memory(cfg, 4096, gpus=2, gpu_free=20 * 2**30, host_free=2**40)
    msg = str(e.value)
    for needle in ("64.0 GiB for their cached bfloat16 activations", "32.0 GiB on each of 2 GPU(s)",
                   "only 20.0 GiB of GPU memory is free", "about 2,560 windows"):
        assert needle in msg, (needle, msg)
    with pytest.raises(ConfigError, match=r"need 0\.2 GiB of host RAM for their token ids"):
        check_calibration_memory(cfg, 4096, gpus=2, gpu_free=2**40, host_free=2**20)


# --- --eval-only on a damaged checkpoint ----------------------------------------------------------
@pytest.fixture(scope="module")
def quantized(base, tmp_path_factory):
    """A real AlphaQuant checkpoint of the tiny model, written once for the module."""
    root = tmp_path_factory.mktemp("hostile_eval_only")
    env = Env(root, *base, pytest.MonkeyPatch())
    rc = main(["--config", str(env.config())])
    assert rc == 0 and (env.out / "alphaquant_recipe.json").is_file()
    return env.out


def _eval_copy(env: Env, quantized: Path) -> Path:
    dst = env.tmp / "ckpt"
    shutil.copytree(quantized, dst)
    return dst


def eval_shapes_disagree(env, ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["intermediate_size"] //= 2                # the stored experts are twice as wide as config.json says
    (ckpt / "config.json").write_text(json.dumps(cfg))
    return ["has shape (32, 64) in the checkpoint", "config.json builds (16, 64)", "do not match"]


def eval_more_layers_than_config(env, ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["num_hidden_layers"] = 1                  # layer 1's tensors are stored but would never run
    (ckpt / "config.json").write_text(json.dumps(cfg))
    return ["'model.layers.1.", "belongs to no module", "config.json"]


def eval_tokenizer_missing(env, ckpt):
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (ckpt / name).unlink(missing_ok=True)
    return ["model.tokenizer", str(ckpt), "holds no tokenizer"]


def eval_recipe_truncated(env, ckpt):
    recipe = ckpt / "alphaquant_recipe.json"
    recipe.write_bytes(recipe.read_bytes()[:200])
    return ["alphaquant_recipe.json", "is not valid JSON", "truncated"]


def eval_recipe_not_a_recipe(env, ckpt):
    (ckpt / "alphaquant_recipe.json").write_text(json.dumps({"config": {}}))
    return ["alphaquant_recipe.json", "is not an AlphaQuant recipe", "'modules'"]


def eval_nan_logits_in_head(env, ckpt):
    _edit_tensors(ckpt, lambda t: t["lm_head.weight"].fill_(3e38))      # lm_head is kept in full precision
    return ["logits hold NaN or Inf", "the head (model.norm + lm_head)", "perplexity is undefined"]


def eval_nan_in_a_layer(env, ckpt):
    _edit_tensors(ckpt, lambda t: t["model.layers.1.post_attention_layernorm.weight"].fill_(3e38))
    return ["logits hold NaN or Inf", "non-finite in model.layers.1", "perplexity is undefined"]


EVAL_CASES = [eval_shapes_disagree, eval_more_layers_than_config, eval_tokenizer_missing, eval_recipe_truncated,
              eval_recipe_not_a_recipe, eval_nan_logits_in_head, eval_nan_in_a_layer]


@pytest.mark.parametrize("case", EVAL_CASES, ids=[c.__name__ for c in EVAL_CASES])
def test_eval_only_damaged_checkpoint(case, base, quantized, tmp_path, monkeypatch, capsys):
    env = Env(tmp_path, *base, monkeypatch)
    monkeypatch.chdir(tmp_path)
    ckpt = _eval_copy(env, quantized)
    needles = case(env, ckpt)
    path = env.config(_set("eval", enabled=True, seq_len=32, max_windows=2))
    sums = _checksums(ckpt)
    before = sorted(p.name for p in tmp_path.iterdir())
    capsys.readouterr()
    rc = main(["--config", str(path), "--eval-only", str(ckpt)])
    out, err = capsys.readouterr()
    _assert_user_error(rc, err, needles, env.out)
    assert "perplexity" not in out, out           # no number was printed
    assert _checksums(ckpt) == sums, "--eval-only modified the checkpoint"
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_eval_only_intact_checkpoint_prints_a_finite_perplexity(base, quantized, tmp_path, monkeypatch, capsys):
    """The control for the cases above: the same command on the undamaged copy succeeds."""
    env = Env(tmp_path, *base, monkeypatch)
    ckpt = _eval_copy(env, quantized)
    path = env.config(_set("eval", enabled=True, seq_len=32, max_windows=2))
    capsys.readouterr()
    assert main(["--config", str(path), "--eval-only", str(ckpt)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert 1.0 < result["perplexity"] < 320 * 2 and result["windows"] == 2
