"""Bad input, one case at a time: one sentence on stderr, exit code 2, no traceback, nothing written.

Every case runs `alphaquant.app.main(argv)` in-process against a tiny OLMoE checkpoint and
checks the same contract (`_assert_user_error`):

- the exit code is 2 and stderr is exactly one line, `error: ...`, without a traceback;
- the line names the bad key, file or value (the case's needles) and what is allowed;
- the output directory does not exist afterwards and no `.out.tmp-*` sibling is left
  (for "existing output dir", the existing directory is untouched).

Errors that can be found without weights are checked with `--dry-run` (they must come before
any weight is read); the rest run a real (tiny) calibration. Two cases go through a real
`python train_quant.py` subprocess to prove the exit code and the missing traceback end to end.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml

import tiny
from alphaquant.app import main
from pipeline_utils import write_config

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_inputs")
    return tiny.make_checkpoint("olmoe", root / "olmoe"), tiny.write_corpus(root)


@dataclass
class Env:
    """What a case needs: a scratch dir, the shared tiny model and corpus, monkeypatch."""

    tmp: Path
    ckpt: Path
    corpus: Path
    monkeypatch: pytest.MonkeyPatch

    @property
    def out(self) -> Path:
        return self.tmp / "out"

    def config(self, mutate=None, **sections) -> Path:
        """A small valid run config (eval off, writes a checkpoint to self.out), then `mutate(cfg)`."""
        path = write_config(self.tmp / "run.yaml", self.ckpt, self.corpus,
                            calibration={"num_samples": 4, "seq_len": 32, "batch_size": 2},
                            eval={"enabled": False},
                            output={"save": True, "dir": str(self.out)}, **sections)
        if mutate is not None:
            cfg = yaml.safe_load(path.read_text())
            mutate(cfg)
            path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        return path

    def model_copy(self) -> Path:
        """A private copy of the tiny checkpoint that a case may damage."""
        dst = self.tmp / "model"
        shutil.copytree(self.ckpt, dst)
        self.ckpt = dst
        return dst

    def tensor_file(self) -> Path:
        return self.ckpt / "model.safetensors"


def _set(section, **values):
    return lambda c: c.setdefault(section, {}).update(values)


def _assert_user_error(rc, err: str, needles, out: Path, out_may_exist=False):
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2, err
    assert "Traceback" not in err, err
    assert len(lines) == 1, err
    line = lines[0]
    assert line.startswith("error: "), line
    for needle in needles:
        assert needle in line, f"{needle!r} not in {line!r}"
    if not out_may_exist:
        assert not out.exists(), f"{out} was written"
    leftovers = sorted(p.name for p in out.parent.glob(f".{out.name}.tmp-*"))
    assert not leftovers, f"temporary output left behind: {leftovers}"


# --- the cases -----------------------------------------------------------------------------
# Each case: env -> (argv, needles). argv gets "--config <path>" from the case itself.

def missing_config_file(env):
    return ["--config", str(env.tmp / "nope.yaml"), "--dry-run"], ["nope.yaml", "does not exist"]


def yaml_syntax_error(env):
    path = env.tmp / "run.yaml"
    path.write_text("model:\n  path: x\n calibration: [1, 2\n")
    return ["--config", str(path), "--dry-run"], ["run.yaml", "not valid YAML", "line"]


def missing_required_key(env):
    path = env.config(lambda c: c.pop("model"))
    return ["--config", str(path), "--dry-run"], ["model.path is required"]


def unknown_top_level_key(env):
    path = env.config(lambda c: c.update(modle={"dtype": "float32"}))
    return ["--config", str(path), "--dry-run"], ["'modle'", "did you mean 'model'?"]


def unknown_nested_key(env):
    path = env.config(_set("calibration", num_sample=3))
    return ["--config", str(path), "--dry-run"], ["'calibration.num_sample'", "did you mean 'calibration.num_samples'?"]


def string_for_int(env):
    path = env.config(_set("calibration", num_samples="many"))
    return ["--config", str(path), "--dry-run"], ["calibration.num_samples must be an integer", "'many'"]


def list_for_dict(env):
    path = env.config(lambda c: c.update(calibration=[1, 2]))
    return ["--config", str(path), "--dry-run"], ["calibration must be a mapping", "num_samples"]


def bool_for_int(env):
    path = env.config(_set("calibration", seq_len=True))
    return ["--config", str(path), "--dry-run"], ["calibration.seq_len must be an integer", "True"]


def unknown_wq_format(env):
    path = env.config(lambda c: c["quant"]["default"].update(wq="int9"))
    return ["--config", str(path), "--dry-run"], ["quant.default.wq must be one of", "int4", "'int9'"]


def unknown_aq_format(env):
    path = env.config(lambda c: c["quant"]["overrides"].append({"pattern": "*.q_proj", "aq": "fp3"}))
    return ["--config", str(path), "--dry-run"], ["quant.overrides[3].aq must be one of", "'fp3'", "fp8_e4m3"]


def group_size_does_not_divide(env):
    path = env.config(lambda c: c["quant"]["overrides"].append({"pattern": "*.q_proj", "group_size": 48}))
    return ["--config", str(path), "--dry-run"], ["group_size 48", "quant.overrides[3]", "in_features 64",
                                                  "q_proj"]


def group_size_zero(env):
    path = env.config(lambda c: c["quant"]["default"].update(group_size=0))
    return ["--config", str(path), "--dry-run"], ["quant.default.group_size must be -1", "got 0"]


def override_sets_no_field(env):
    path = env.config(lambda c: c["quant"]["overrides"].append({"pattern": "*.q_proj"}))
    return ["--config", str(path), "--dry-run"], ["quant.overrides[3]", "sets no field", "wq"]


def override_empty_pattern(env):
    path = env.config(lambda c: c["quant"]["overrides"].append({"pattern": "", "wq": "int8"}))
    return ["--config", str(path), "--dry-run"], ["quant.overrides[3].pattern is required"]


def override_skip_and_format(env):
    path = env.config(lambda c: c["quant"]["overrides"].append({"pattern": "*.q_proj", "skip": True, "wq": "int8"}))
    return ["--config", str(path), "--dry-run"], ["quant.overrides[3]", "skip: true and also wq"]


def override_wq_group_conflict(env):
    path = env.config(lambda c: c["quant"]["overrides"].append(
        {"pattern": "*.q_proj", "wq": "mxfp4/32", "group_size": 16}))
    return ["--config", str(path), "--dry-run"], ["quant.overrides[3].wq 'mxfp4/32'", "group_size is 16"]


def override_repeated_pattern(env):
    path = env.config(lambda c: c["quant"]["overrides"].append({"pattern": "*.gate", "wq": "int8"}))
    return ["--config", str(path), "--dry-run"], ["quant.overrides[3] repeats the pattern '*.gate'",
                                                  "quant.overrides[1]"]


def pattern_matches_nothing(env):
    path = env.config(lambda c: c["quant"]["overrides"].append({"pattern": "*.nothing", "skip": True}))
    return ["--config", str(path), "--dry-run"], ["quant.overrides[3].pattern '*.nothing' matches no module"]


def cli_unknown_dotted_key(env):
    return (["--config", str(env.config()), "--dry-run", "--calibration.num_sample", "3"],
            ["--calibration.num_sample", "did you mean '--calibration.num_samples'?"])


def cli_bad_syntax(env):
    return (["--config", str(env.config()), "--dry-run", "calibration.num_samples"],
            ["'calibration.num_samples'", "--section.key value"])


def cli_missing_value(env):
    return (["--config", str(env.config()), "--dry-run", "--calibration.seq_len"],
            ["--calibration.seq_len needs a value"])


def cli_wrong_type(env):
    return (["--config", str(env.config()), "--dry-run", "--calibration.seq_len", "long"],
            ["calibration.seq_len must be an integer", "--calibration.seq_len"])


def missing_model_directory(env):
    path = env.config(_set("model", path=str(env.tmp / "no-such-model")))
    return ["--config", str(path), "--dry-run"], ["no-such-model", "does not exist"]


def model_dir_without_config_json(env):
    (env.model_copy() / "config.json").unlink()
    path = env.config()
    return ["--config", str(path), "--dry-run"], ["config.json", str(env.ckpt)]


def config_json_not_json(env):
    (env.model_copy() / "config.json").write_text('{"model_type": "olmoe",')
    return ["--config", str(env.config()), "--dry-run"], ["config.json", "not valid JSON"]


def unsupported_family(env):
    cfg_path = env.model_copy() / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["model_type"] = "llama_v9"      # neither a local family nor an architecture transformers builds
    cfg_path.write_text(json.dumps(cfg))
    return ["--config", str(env.config()), "--dry-run"], ["'llama_v9' is not supported", "olmoe", "mixtral",
                                                          "qwen2_moe", "deepseek"]


def truncated_safetensors(env):
    f = env.model_copy() / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    return ["--config", str(env.config()), "--dry-run"], ["model.safetensors", "truncated or corrupt"]


def corrupt_safetensors_header(env):
    f = env.model_copy() / "model.safetensors"
    data = bytearray(f.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    data[8:8 + n] = b"#" * n                      # the JSON header is garbage, the size is intact
    f.write_bytes(bytes(data))
    return ["--config", str(env.config()), "--dry-run"], ["model.safetensors", "truncated or corrupt"]


def safetensors_missing_tensor(env):
    from safetensors.torch import load_file, save_file
    f = env.model_copy() / "model.safetensors"
    tensors = load_file(f)
    del tensors["model.layers.1.mlp.experts.3.up_proj.weight"]
    save_file(tensors, f, metadata={"format": "pt"})
    path = env.config(_set("model", lazy=True))
    return ["--config", str(path)], ["model.layers.1.mlp.experts.3.up_proj.weight", "missing", str(env.ckpt)]


def tokenizer_missing(env):
    model = env.model_copy()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (model / name).unlink(missing_ok=True)
    return ["--config", str(env.config())], ["model.tokenizer", str(env.ckpt)]


def token_ids_out_of_vocab(env):
    tokens = env.tmp / "tokens.pt"
    torch.save(torch.arange(0, 4000) % 400, tokens)      # the tiny vocab is 320
    path = env.config(_set("calibration", dataset=str(tokens), split="all"))
    return ["--config", str(path)], ["tokens.pt", "vocab_size is 320", "0..319"]


def empty_calibration_text(env):
    empty = env.tmp / "empty.txt"
    empty.write_text("")
    path = env.config(_set("calibration", dataset=str(empty)))
    return ["--config", str(path)], ["calibration.dataset", "empty.txt", "holds no text"]


def calibration_file_missing(env):
    path = env.config(_set("calibration", dataset=str(env.tmp / "gone.txt")))
    return ["--config", str(path)], ["calibration.dataset", "gone.txt", "does not exist"]


def calibration_source_kind(env):
    path = env.config(_set("calibration", dataset=str(env.tmp / "corpus.csv")))
    return ["--config", str(path)], ["calibration.dataset must be wikitext2, c4, or a local", "corpus.csv"]


def calibration_too_short(env):
    short = env.tmp / "short.txt"
    short.write_text("def f():\n    return 1\n" * 2)
    path = env.config(_set("calibration", dataset=str(short), split="all"))
    return ["--config", str(path)], ["short.txt", "fewer than one window of seq_len 32"]


def seq_len_above_max_positions(env):
    path = env.config(_set("calibration", seq_len=1024))
    return ["--config", str(path)], ["calibration.seq_len is 1024", "max_position_embeddings is 256"]


def eval_seq_len_above_max_positions(env):
    path = env.config(_set("eval", enabled=True, seq_len=512, dataset=str(env.corpus)))
    return ["--config", str(path)], ["eval.seq_len is 512", "max_position_embeddings is 256"]


def num_samples_zero(env):
    path = env.config(_set("calibration", num_samples=0))
    return ["--config", str(path), "--dry-run"], ["calibration.num_samples must be > 0; got 0"]


def num_samples_negative(env):
    return (["--config", str(env.config()), "--dry-run", "--calibration.num_samples", "-3"],
            ["calibration.num_samples must be > 0; got -3", "--calibration.num_samples"])


def bad_split(env):
    path = env.config(_set("calibration", split="0.9:0.1"))
    return ["--config", str(path), "--dry-run"], ["calibration.split must be one of train", "'0.9:0.1'"]


def damp_out_of_range(env):
    path = env.config(_set("gptq", damp=5))
    return ["--config", str(path), "--dry-run"], ["gptq.damp must be between 0 and 1", "got 5"]


def _edit_tensor(env, key, fn):
    from safetensors.torch import load_file, save_file
    f = env.model_copy() / "model.safetensors"
    tensors = load_file(f)
    fn(tensors[key])
    save_file(tensors, f, metadata={"format": "pt"})


def nan_in_weights(env):
    key = "model.layers.1.mlp.experts.2.down_proj.weight"
    _edit_tensor(env, key, lambda t: t.view(-1)[5:7].fill_(float("nan")))
    return ["--config", str(env.config(_set("model", lazy=True)))], [key, "NaN or Inf"]


def inf_in_weights_eager(env):
    key = "model.layers.0.self_attn.k_proj.weight"
    _edit_tensor(env, key, lambda t: t.view(-1)[0:1].fill_(float("inf")))
    return ["--config", str(env.config())], [key, "NaN or Inf"]


def non_finite_activations(env):
    # A finite but huge norm weight: the layer's activations overflow to Inf in the forward.
    _edit_tensor(env, "model.layers.1.input_layernorm.weight", lambda t: t.fill_(3e38))
    return ["--config", str(env.config())], ["model.layers.1.", "NaN or Inf", "activations"]


def existing_output_dir(env):
    env.out.mkdir()
    (env.out / "keep.txt").write_text("mine")
    return ["--config", str(env.config()), "--dry-run"], ["output.dir", "already exists", "--overwrite"]


def output_dir_under_a_file(env):
    blocker = env.tmp / "blocker"
    blocker.write_text("a file, not a directory")
    path = env.config(_set("output", dir=str(blocker / "out")))
    return ["--config", str(path), "--dry-run"], ["output.dir", "blocker", "not a directory"]


def output_dir_not_writable_simulated(env):
    import alphaquant.export.atomic as atomic
    real = os.access
    env.monkeypatch.setattr(atomic.os, "access", lambda p, mode: False if Path(p) == env.tmp else real(p, mode))
    return ["--config", str(env.config())], ["output.dir", "is not writable", str(env.tmp)]


def disk_full_simulated(env):
    # safetensors reports a full disk as SafetensorError("... (os error 28)") (seen on a full tmpfs)
    import alphaquant.models.common.checkpoint as ckpt_mod
    from safetensors import SafetensorError

    def full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 16)      # a partial shard, as a real full disk leaves
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    env.monkeypatch.setattr(ckpt_mod, "save_file", full)
    return ["--config", str(env.config())], ["disk is full", "shard-00000.tmp", f"output.dir '{env.out}'"]


def disk_full_writing_json(env):
    from alphaquant.export.writer import QuantizedCheckpointWriter

    def full(self, fname, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.out / fname))

    env.monkeypatch.setattr(QuantizedCheckpointWriter, "_write_json", full)
    return ["--config", str(env.config())], ["disk is full", "config.json", f"output.dir '{env.out}'"]


def read_only_file_system(env):
    import alphaquant.export.atomic as atomic

    def read_only(prefix=None, dir=None, **_):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(Path(dir) / f"{prefix}xyz"))

    env.monkeypatch.setattr(atomic.tempfile, "mkdtemp", read_only)
    return ["--config", str(env.config())], ["file system is read-only", str(env.tmp), "output.dir"]


def devices_more_than_cpus(env):
    path = env.config(_set("trainer", accelerator="cpu", devices=(os.cpu_count() or 1) + 64))
    return ["--config", str(path)], ["trainer.devices", f"{os.cpu_count()} CPU"]


def gpu_without_gpu(env):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    path = env.config(_set("trainer", accelerator="gpu", devices=1))
    return ["--config", str(path)], ["trainer.accelerator", "no CUDA GPU", "cpu"]


def wandb_mode(env):
    path = env.config(lambda c: c["logging"]["wandb"].update(mode="sometimes"))
    return ["--config", str(path), "--dry-run"], ["logging.wandb.mode must be one of", "'offline'", "'online'",
                                                  "'disabled'", "'sometimes'"]


def bad_model_dtype(env):
    path = env.config(_set("model", dtype="float8"))
    return ["--config", str(path), "--dry-run"], ["model.dtype must be one of", "'bfloat16'", "'float8'"]


CASES = [missing_config_file, yaml_syntax_error, missing_required_key, unknown_top_level_key, unknown_nested_key,
         string_for_int, list_for_dict, bool_for_int, unknown_wq_format, unknown_aq_format,
         group_size_does_not_divide, group_size_zero, override_sets_no_field, override_empty_pattern,
         override_skip_and_format, override_wq_group_conflict, override_repeated_pattern, pattern_matches_nothing,
         cli_unknown_dotted_key, cli_bad_syntax, cli_missing_value, cli_wrong_type, missing_model_directory,
         model_dir_without_config_json, config_json_not_json, unsupported_family, truncated_safetensors,
         corrupt_safetensors_header, safetensors_missing_tensor, tokenizer_missing, token_ids_out_of_vocab,
         empty_calibration_text, calibration_file_missing, calibration_source_kind, calibration_too_short,
         seq_len_above_max_positions, eval_seq_len_above_max_positions, num_samples_zero, num_samples_negative,
         bad_split, damp_out_of_range, nan_in_weights, inf_in_weights_eager, non_finite_activations,
         existing_output_dir, output_dir_under_a_file, output_dir_not_writable_simulated, disk_full_simulated,
         disk_full_writing_json, read_only_file_system,
         devices_more_than_cpus, gpu_without_gpu, wandb_mode, bad_model_dtype]


# Found only while or after weights are read (tokenizing the data, loading, solving, writing);
# every other case must fail before the first weight is read.
AFTER_LOAD = {calibration_too_short, nan_in_weights, inf_in_weights_eager, non_finite_activations,
              disk_full_simulated, disk_full_writing_json, read_only_file_system}


@pytest.mark.parametrize("case", CASES, ids=[c.__name__ for c in CASES])
def test_bad_input_is_one_sentence_exit_2_nothing_written(case, base, tmp_path, monkeypatch, capsys):
    env = Env(tmp_path, *base, monkeypatch)
    monkeypatch.chdir(tmp_path)                 # anything written by mistake lands here
    argv, needles = case(env)
    if case not in AFTER_LOAD:
        from alphaquant.models import loading as models_loading

        def no_weights(model, prefix, *a, **k):
            raise AssertionError(f"weights under {prefix!r} were read before the bad input was reported")
        monkeypatch.setattr(models_loading, "_materialize", no_weights)
    before = sorted(p.name for p in tmp_path.iterdir())
    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err
    _assert_user_error(rc, err, needles, env.out, out_may_exist=case is existing_output_dir)
    if case is existing_output_dir:
        assert sorted(p.name for p in env.out.iterdir()) == ["keep.txt"]
        assert (env.out / "keep.txt").read_text() == "mine"
    # logs may be written; after a layer was solved, the crash-resume state `.out.resume` is kept
    # by design (a fixed rerun resumes; it is fingerprinted against the model, data and recipe)
    allowed = {"logs"} | ({f".{env.out.name}.resume"} if case in AFTER_LOAD else set())
    after = sorted(p.name for p in tmp_path.iterdir() if p.name not in allowed)
    assert not set(after) - set(before), f"new files: {set(after) - set(before)}"


def test_distinct_cases():
    assert len(CASES) == len(set(CASES)) >= 30


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_output_dir(base, tmp_path, monkeypatch, capsys):
    env = Env(tmp_path, *base, monkeypatch)
    parent = tmp_path / "ro"
    parent.mkdir()
    path = env.config(_set("output", dir=str(parent / "out")))
    parent.chmod(0o500)
    try:
        rc = main(["--config", str(path), "--dry-run"])
        _assert_user_error(rc, capsys.readouterr().err, ["output.dir", "is not writable"], parent / "out")
    finally:
        parent.chmod(0o700)


# --- end to end: a real process ---------------------------------------------------------------
def _subprocess(argv, cwd):
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, str(REPO / "train_quant.py"), *argv], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def test_subprocess_unknown_key_exit_2_no_traceback(base, tmp_path, monkeypatch):
    env = Env(tmp_path, *base, monkeypatch)
    argv, needles = unknown_nested_key(env)
    p = _subprocess(argv, tmp_path)
    _assert_user_error(p.returncode, p.stderr, needles, env.out)


def test_subprocess_truncated_safetensors_exit_2_no_traceback(base, tmp_path, monkeypatch):
    env = Env(tmp_path, *base, monkeypatch)
    argv, needles = truncated_safetensors(env)
    p = _subprocess([a for a in argv if a != "--dry-run"], tmp_path)
    _assert_user_error(p.returncode, p.stderr, needles, env.out)
