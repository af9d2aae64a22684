"""A run never destroys user data (issue 17, points 1-4).

* output.dir: what --overwrite may replace, and what is refused before any weight is read;
* the resume state: weights, data and layer files are verified before a state is reused;
* signals: SIGTERM / SIGINT stop the run, keep the resume state, leave no partial checkpoint;
  a SIGKILL inside an overwrite is repaired by the next run;
* files others can read, and a summary that names the final paths.

Every refusal is checked for: exit code 2, one line on stderr naming the directory, the input model
directory byte-identical before and after, and nothing created.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import stat
from pathlib import Path

import pytest

import prewarmed
import tiny
from pipeline_utils import write_config

REPO = Path(__file__).resolve().parent.parent
LAYERS = 3


def tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file under root, by relative path (a directory's fingerprint)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("safety")
    ckpt = tiny.make_checkpoint("olmoe", tmp / "model", num_hidden_layers=LAYERS)
    corpus = tiny.write_corpus(tmp)

    def config(name: str, **output) -> Path:
        return write_config(tmp / f"{name}.yaml", ckpt, corpus, eval={"enabled": False},
                            output={"save": True, "dir": str(tmp / name), **output})
    return tmp, ckpt, corpus, config


def main(argv, capsys):
    from alphaquant.app import main as app_main
    code = app_main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# -- 1. what output.dir may be ------------------------------------------------------------------
REFUSED = {
    # name: (output.dir relative to the fixture's tmp dir or a special value, words in the message)
    "the_model": ("model", ["is model.path"]),
    "inside_the_model": ("model/sub", ["lies inside model.path"]),
    "parent_of_the_model": (".", ["contains model.path"]),
    "the_data_file": ("corpus.txt", ["is calibration.dataset"]),
    "root": ("/", ["root directory"]),
    "home": ("~/", ["home directory"]),   # (a bare ~ is YAML for null: the default output.dir)
    "cwd": ("@cwd", ["current directory"]),
    "above_cwd": ("@cwd/..", ["contains the current directory"]),
    "empty": ("", ["output.dir is empty"]),
    "symlink_loop": ("loop/x", ["symlink loop"]),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
@pytest.mark.parametrize("overwrite", [False, True])
def test_dangerous_output_dirs_are_refused_before_any_weight_is_read(env, capsys, monkeypatch, case, overwrite):
    tmp, ckpt, corpus, config = env
    where, words = REFUSED[case]
    if where.startswith("@cwd"):
        monkeypatch.chdir(tmp / "model")
        where = str(tmp / "model") + where[4:]
    elif where not in ("", "/", "~/"):
        where = str(tmp / where)
    if case == "symlink_loop" and not (tmp / "loop").is_symlink():
        os.symlink(tmp / "loop2", tmp / "loop")
        os.symlink(tmp / "loop", tmp / "loop2")
    cfg = config("refused")
    before, listing = tree_digest(ckpt), sorted(p.name for p in tmp.iterdir())
    argv = ["--config", cfg, "--output.dir", where] + (["--overwrite"] if overwrite else [])
    code, out, err = main(argv, capsys)
    assert code == 2, (out, err)
    assert err.count("\n") == 1 and "Traceback" not in err and all(w in err for w in words), err
    assert tree_digest(ckpt) == before
    assert sorted(p.name for p in tmp.iterdir()) == listing        # nothing created beside it


def test_tilde_is_expanded_in_path_keys(tmp_path, monkeypatch):
    from alphaquant.config.run import load_config
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = load_config(None, ["--model.path", "~/m", "--output.dir", "~/out", "--calibration.dataset", "~/c.txt",
                             "--model.tokenizer", "~/tok"])
    assert (cfg.model.path, cfg.output.dir, cfg.calibration.dataset, cfg.model.tokenizer) == (
        f"{tmp_path}/m", f"{tmp_path}/out", f"{tmp_path}/c.txt", f"{tmp_path}/tok")


@pytest.mark.parametrize("name", ["", ".", "..", "a/b"])
def test_run_names_that_are_not_one_directory_name_are_refused(name):
    from alphaquant.config.run import load_config
    from alphaquant.errors import ConfigError
    with pytest.raises(ConfigError, match="name must be a run name"):
        load_config(None, ["--model.path", "x", "--name", name])


def test_overwrite_refuses_a_directory_of_user_files(env, capsys):
    tmp, ckpt, corpus, config = env
    user = tmp / "users_files"
    (user / ".git").mkdir(parents=True)
    (user / "notes.txt").write_text("mine")
    (user / "alphaquant_recipe.json").write_text("{}")      # even with our marker: a .git is not ours
    before = tree_digest(user)
    code, out, err = main(["--config", config("u"), "--output.dir", user, "--overwrite"], capsys)
    assert code == 2 and "not an AlphaQuant checkpoint" in err and "'.git'" in err, err
    assert tree_digest(user) == before


def test_a_parent_that_is_a_file_is_found_before_the_run(env, capsys):
    tmp, ckpt, corpus, config = env
    (tmp / "a_file").write_text("x")
    code, out, err = main(["--config", config("p"), "--output.dir", tmp / "a_file" / "out"], capsys)
    assert code == 2 and "is a file, not a directory" in err, err
    assert (tmp / "a_file").read_text() == "x"


def _cmd(cfg: Path, *extra, script: str | None = None, env_extra=None, timeout=600):
    """`python train_quant.py --config cfg *extra` (or `python -c script ...`) in its own process, forked from
    one that has done the imports (tests/prewarmed.py: OMP_NUM_THREADS=1, the repository on PYTHONPATH)."""
    return prewarmed.run(["--config", cfg, *extra], cwd=cfg.parent, script=script, env_extra=env_extra,
                         timeout=timeout)


def _weights(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in d.iterdir() if p.suffix == ".safetensors" or p.name == "config.json"}


@pytest.fixture(scope="module")
def reference(env):
    """One uninterrupted run: the checkpoint every interrupted-then-resumed run must equal."""
    tmp, ckpt, corpus, config = env
    proc = _cmd(config("reference"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp / "reference"


def test_overwrite_replaces_an_earlier_checkpoint_and_says_so_with_readable_files(env, reference):
    tmp, ckpt, corpus, config = env
    proc = _cmd(config("reference"), "--overwrite")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "replaced an earlier AlphaQuant checkpoint" in proc.stdout and str(reference) in proc.stdout
    umask = os.umask(0)
    os.umask(umask)
    for p in [reference, *reference.rglob("*")]:
        mode = stat.S_IMODE(p.stat().st_mode)
        assert mode == (0o777 if p.is_dir() else 0o666) & ~umask, (p, oct(mode))
    summary = json.loads((reference / "alphaquant_summary.json").read_text())
    assert summary["plots"] and all(Path(v).is_file() and Path(v).parent.parent == reference
                                    for v in summary["plots"].values())


# -- 2. a resume state that can be trusted ------------------------------------------------------------
# train_quant.py that stops itself once layer STOP_AT's resume state is on disk: with SIGKILL (no
# cleanup at all), or with SIGTERM / SIGINT as a scheduler or Ctrl+C would send it.
STOPPER = """
import os, signal, sys
from alphaquant.pipeline import resume
stop_at, sig = int(os.environ["STOP_AT"]), getattr(signal, os.environ["STOP_SIGNAL"])
save = resume.ResumeState.save_layer
def save_then_stop(self, i, *args, **kwargs):
    save(self, i, *args, **kwargs)
    if i == stop_at:
        self.wait()
        os.kill(os.getpid(), sig)
resume.ResumeState.save_layer = save_then_stop
from alphaquant.app import main
sys.exit(main(sys.argv[1:]))
"""


def _stopped(cfg: Path, stop_at: int, sig: str = "SIGKILL", env_extra=None):
    return _cmd(cfg, script=STOPPER, env_extra={"STOP_AT": str(stop_at), "STOP_SIGNAL": sig, **(env_extra or {})})


def _damage_layer_file(state: Path):
    p = state / "layer_00000.safetensors"
    data = bytearray(p.read_bytes())
    data[-3] ^= 0xFF                                  # a flipped byte inside a tensor: still loads
    p.write_bytes(bytes(data))


def _truncate_state_json(state: Path):
    p = state / "state.json"
    p.write_text(p.read_text()[:20])


DAMAGE = {
    "flipped_bytes_in_a_layer_file": (_damage_layer_file, "layer 0's file layer_00000.safetensors is damaged"),
    "truncated_state_json": (_truncate_state_json, "state.json is damaged"),
}


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_a_damaged_resume_state_is_discarded_and_the_result_is_still_exact(env, reference, case):
    tmp, ckpt, corpus, config = env
    cfg = config(case)
    assert _stopped(cfg, 1).returncode == -signal.SIGKILL
    damage, words = DAMAGE[case]
    damage(tmp / f".{case}.resume")
    proc = _cmd(cfg)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert words in proc.stdout and "resuming" not in proc.stdout, proc.stdout
    assert _weights(tmp / case) == _weights(reference)


def test_a_damaged_later_layer_keeps_the_good_layers_before_it(env, reference):
    tmp, ckpt, corpus, config = env
    cfg = config("later")
    assert _stopped(cfg, 1).returncode == -signal.SIGKILL
    p = tmp / ".later.resume" / "layer_00001.json"
    p.write_text(p.read_text().replace('"tokens": ', '"tokens": 1', 1))
    proc = _cmd(cfg)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "layer 1's file layer_00001.json is damaged" in proc.stdout and "resuming: layers 0-0" in proc.stdout
    assert _weights(tmp / "later") == _weights(reference)


def test_changed_weights_discard_the_state(env, tmp_path):
    from safetensors.torch import load_file, save_file
    tmp, ckpt, corpus, config = env
    model = tmp_path / "model"
    model.mkdir()
    for p in ckpt.iterdir():
        (model / p.name).write_bytes(p.read_bytes())
    cfg = write_config(tmp_path / "w.yaml", model, corpus, eval={"enabled": False},
                       output={"save": True, "dir": str(tmp_path / "w")})
    assert _stopped(cfg, 0).returncode == -signal.SIGKILL
    weights = load_file(str(model / "model.safetensors"))
    key = next(k for k in weights if "experts.0.up_proj" in k)
    weights[key] = weights[key] * 2                     # same names, shapes and file size: other weights
    save_file(weights, str(model / "model.safetensors"), metadata={"format": "pt"})
    proc = _cmd(cfg)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "the model's weight files changed" in proc.stdout and "resuming" not in proc.stdout, proc.stdout


def test_changed_data_behind_a_tilde_path_discards_the_state(env, tmp_path):
    tmp, ckpt, corpus, config = env
    home = tmp_path / "home"
    home.mkdir()
    (home / "c.txt").write_text(corpus.read_text())
    cfg = write_config(tmp_path / "d.yaml", ckpt, "~/c.txt", eval={"enabled": False},
                       output={"save": True, "dir": str(tmp_path / "d")})
    assert _stopped(cfg, 0, env_extra={"HOME": str(home)}).returncode == -signal.SIGKILL
    (home / "c.txt").write_text(corpus.read_text()[::-1])
    proc = _cmd(cfg, env_extra={"HOME": str(home)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "the calibration data file changed" in proc.stdout, proc.stdout


def test_a_file_in_place_of_the_resume_state_is_one_sentence(env, capsys):
    tmp, ckpt, corpus, config = env
    (tmp / ".blocked.resume").write_text("not a directory")
    code, out, err = main(["--config", config("blocked")], capsys)
    assert code == 2 and "resume state" in err and "is not a directory" in err and err.count("\n") == 1, err
    assert not (tmp / "blocked").exists()


# -- 3. signals -------------------------------------------------------------------------------------
@pytest.mark.parametrize("sig,code", [("SIGTERM", 143), ("SIGINT", 130)])
def test_a_signal_stops_the_run_keeps_the_state_and_the_rerun_is_exact(env, reference, sig, code):
    tmp, ckpt, corpus, config = env
    name = f"stopped_{sig}"
    cfg = config(name)
    proc = _stopped(cfg, 0, sig)
    assert proc.returncode == code, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert f"interrupted by {sig}" in last and "run the same command again to resume from layer 1" in last, last
    assert "Traceback" not in proc.stderr
    assert not (tmp / name).exists() and not list(tmp.glob(f".{name}.tmp-*"))   # no partial checkpoint
    assert json.loads((tmp / f".{name}.resume" / "state.json").read_text())["layers_done"] == 1
    proc = _cmd(cfg)
    assert proc.returncode == 0 and "resuming: layers 0-0" in proc.stdout, proc.stderr[-3000:]
    assert _weights(tmp / name) == _weights(reference)


INTERRUPT_EARLY = """
import os, signal, sys
import alphaquant.data as data
build = data.build_windows
def build_then_stop(*a, **k):
    os.kill(os.getpid(), signal.SIGINT)
    return build(*a, **k)
data.build_windows = build_then_stop
from alphaquant.app import main
sys.exit(main(sys.argv[1:]))
"""


def test_sigint_before_the_walk_is_one_line(env):
    tmp, ckpt, corpus, config = env
    proc = _cmd(config("early"), script=INTERRUPT_EARLY)
    assert proc.returncode == 130, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "interrupted by SIGINT" in proc.stderr
    assert not (tmp / "early").exists() and not list(tmp.glob(".early.tmp-*"))


KILL_INSIDE_OVERWRITE = """
import os, signal, sys
from alphaquant.export import atomic
real = os.replace
def replace_then_die(src, dst):
    real(src, dst)
    if ".old-" in str(dst):            # the old checkpoint is renamed away, the new one not yet in place
        os.kill(os.getpid(), signal.SIGKILL)
atomic.os.replace = replace_then_die
from alphaquant.app import main
sys.exit(main(sys.argv[1:]))
"""


def test_sigkill_between_the_two_renames_of_an_overwrite_is_repaired(env, reference):
    tmp, ckpt, corpus, config = env
    cfg = config("swapped")
    assert _cmd(cfg).returncode == 0
    before = tree_digest(tmp / "swapped")
    proc = _cmd(cfg, "--overwrite", script=KILL_INSIDE_OVERWRITE)
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp / "swapped").exists() and list(tmp.glob(".swapped.old-*"))
    proc = _cmd(cfg, "--dry-run")                     # any next run puts the old checkpoint back first
    assert proc.returncode == 2 and "already exists" in proc.stderr, proc.stderr   # (and it is there again)
    assert "restored" in proc.stdout
    assert tree_digest(tmp / "swapped") == before and not list(tmp.glob(".swapped.old-*"))
    proc = _cmd(cfg, "--overwrite")                   # ... and the overwrite then completes
    assert proc.returncode == 0 and not list(tmp.glob(".swapped.*")), proc.stderr[-3000:]


def test_remove_tree_removes_files_and_folders_but_never_follows_a_link(tmp_path):
    """The threaded removal (resume state, a replaced checkpoint) removes what rmtree removes: files at the top
    in parallel, folders below, and a symlink as a link (the user's file it points to stays)."""
    from alphaquant.export.atomic import remove_tree

    outside = tmp_path / "users_file.txt"
    outside.write_text("keep me")
    (tmp_path / "outside_dir").mkdir()
    (tmp_path / "outside_dir" / "inner.txt").write_text("keep me too")
    d = tmp_path / "state"
    (d / "plots").mkdir(parents=True)
    for i in range(12):
        (d / f"layer_{i:05d}.safetensors").write_bytes(os.urandom(1000))
    (d / "plots" / "a.png").write_bytes(b"png")
    (d / "link_to_file").symlink_to(outside)
    (d / "link_to_dir").symlink_to(tmp_path / "outside_dir")
    remove_tree(d)
    assert not d.exists()
    assert outside.read_text() == "keep me"
    assert (tmp_path / "outside_dir" / "inner.txt").read_text() == "keep me too"
    remove_tree(d)            # gone already: nothing raised, as rmtree(ignore_errors=True)
