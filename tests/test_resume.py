"""Resume after SIGKILL, and determinism.

A run killed with SIGKILL right after a decoder layer's state was saved, then started again
with the same command, must write a checkpoint bit-identical to an uninterrupted run; the
same config and seed must give bit-identical output twice on the same machine.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import prewarmed
import tiny
from pipeline_utils import write_config

REPO = Path(__file__).resolve().parent.parent
LAYERS = 4

# train_quant.py with ResumeState.save_layer patched to SIGKILL the process once layer KILL_AT's state is on disk
# (the kill is real: no cleanup handlers, no finally blocks run).
KILLER = """
import os, signal, sys
from alphaquant.pipeline import resume
kill_at = int(os.environ["KILL_AT"])
save = resume.ResumeState.save_layer
def save_then_die(self, i, *args, **kwargs):
    save(self, i, *args, **kwargs)
    if i == kill_at:
        self.wait()                      # layer kill_at's state is on disk (it is written in the background)
        os.kill(os.getpid(), signal.SIGKILL)
resume.ResumeState.save_layer = save_then_die
from alphaquant.app import main
sys.exit(main(sys.argv[1:]))
"""


# train_quant.py killed (SIGKILL) as it finishes the checkpoint, after the last layer: the last shard, config and JSON
KILLED_IN_FINISH = """
import os, signal, sys
from alphaquant.export import writer
def finish_then_die(self, *args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)
writer.QuantizedCheckpointWriter.finish = finish_then_die
from alphaquant.app import main
sys.exit(main(sys.argv[1:]))
"""


def _cmd(cfg: Path, *, kill_at: int | None = None):
    """`python train_quant.py --config cfg` (or the KILLER script) in its own process, forked from one that has
    done the imports (tests/prewarmed.py: OMP_NUM_THREADS=1, the repository on PYTHONPATH)."""
    if kill_at is None:
        return prewarmed.run(["--config", cfg], cwd=cfg.parent)
    return prewarmed.run(["--config", cfg], cwd=cfg.parent, script=KILLER, env_extra={"KILL_AT": kill_at})


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resume")
    ckpt = tiny.make_checkpoint("olmoe", tmp / "olmoe", num_hidden_layers=LAYERS)
    corpus = tiny.write_corpus(tmp)

    def config(name: str) -> Path:
        return write_config(tmp / f"{name}.yaml", ckpt, corpus,
                            eval={"rtn": True, "max_windows": 4},
                            output={"save": True, "dir": str(tmp / name)})

    ref = config("uninterrupted")
    proc = _cmd(ref)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp, config


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in d.iterdir() if p.suffix in (".safetensors", ".json")
            and p.name != "alphaquant_summary.json" and p.name != "alphaquant_recipe.json"}


@pytest.mark.parametrize("kill_at", [0, 2])
def test_sigkill_then_rerun_is_bit_identical(setup, kill_at):
    tmp, config = setup
    name = f"killed_at_{kill_at}"
    cfg = config(name)
    proc = _cmd(cfg, kill_at=kill_at)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    state_dir = tmp / f".{name}.resume"
    assert json.loads((state_dir / "state.json").read_text())["layers_done"] == kill_at + 1
    assert not (tmp / name).exists()                     # no checkpoint under the requested name
    assert list(tmp.glob(f".{name}.tmp-*"))              # SIGKILL left the partial checkpoint behind

    proc = _cmd(cfg)                                     # the same command again
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resuming: layers 0-{kill_at}" in proc.stdout
    assert not state_dir.exists()                        # removed once the checkpoint is complete
    assert not list(tmp.glob(f".{name}.tmp-*"))          # ... and the killed run's partial checkpoint too
    ref, got = _files(tmp / "uninterrupted"), _files(tmp / name)
    assert ref.keys() == got.keys() and "model.safetensors" in ref
    for k in ref:
        assert ref[k] == got[k], f"{k} differs from the uninterrupted run"
    a, b = (json.loads((d / "alphaquant_summary.json").read_text()) for d in (tmp / "uninterrupted", tmp / name))
    assert a["perplexity"] == b["perplexity"]           # the eval streams were replayed exactly
    assert {n: (m["tokens"], m["rel_error"]) for n, m in a["modules"].items()} == \
        {n: (m["tokens"], m["rel_error"]) for n, m in b["modules"].items()}
    assert [r["restored"] for r in b["layers"]] == [i <= kill_at for i in range(LAYERS)]


def test_killed_after_the_last_layer_resumes_the_layers_before_it(setup):
    """The last layer's resume state is not written (the complete checkpoint would remove it at once): a run killed
    while it finishes the checkpoint leaves layers 0 to n-2, and the rerun solves the last one again, bit for bit."""
    tmp, config = setup
    cfg = config("killed_in_finish")
    proc = prewarmed.run(["--config", cfg], cwd=cfg.parent, script=KILLED_IN_FINISH)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    state_dir = tmp / ".killed_in_finish.resume"
    assert json.loads((state_dir / "state.json").read_text())["layers_done"] == LAYERS - 1
    assert not (state_dir / f"layer_{LAYERS - 1:05d}.safetensors").exists()
    proc = _cmd(cfg)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resuming: layers 0-{LAYERS - 2}" in proc.stdout
    assert not state_dir.exists() and not list(tmp.glob(".killed_in_finish.tmp-*"))
    ref, got = _files(tmp / "uninterrupted"), _files(tmp / "killed_in_finish")
    assert ref.keys() == got.keys() and all(ref[k] == got[k] for k in ref)


def test_resume_state_of_another_recipe_is_discarded(setup):
    tmp, config = setup
    cfg = config("changed")
    assert _cmd(cfg, kill_at=0).returncode == -signal.SIGKILL
    text = cfg.read_text().replace("wq: int4", "wq: int8")
    assert text != cfg.read_text()
    cfg.write_text(text)
    proc = _cmd(cfg)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "discarding" in proc.stdout and "resuming" not in proc.stdout
    summary = json.loads((tmp / "changed" / "alphaquant_summary.json").read_text())
    assert not any(r["restored"] for r in summary["layers"])


def test_same_config_and_seed_are_bit_identical(setup):
    tmp, config = setup
    cfg = config("again")
    proc = _cmd(cfg)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _files(tmp / "uninterrupted") == _files(tmp / "again")
    a, b = (json.loads((tmp / d / "alphaquant_summary.json").read_text()) for d in ("uninterrupted", "again"))
    assert a["perplexity"] == b["perplexity"] and a["experts"] == b["experts"]


def test_a_failed_background_write_is_raised_at_the_next_layer(tmp_path, monkeypatch):
    """The state is written by a background thread; its error (here a full disk) must not vanish."""
    import errno

    import torch

    from alphaquant.pipeline import resume

    def full_disk(tensors, path):
        raise OSError(errno.ENOSPC, "No space left on device", path)

    monkeypatch.setattr(resume, "save_file", full_disk)
    state = resume.ResumeState(tmp_path / "out", {"config": "fp"})
    state.save_layer(0, {"w": torch.ones(2)}, {})            # returns: the write runs behind
    with pytest.raises(resume.ResumeWriteError) as info:     # a UserError: one sentence, exit 2
        state.save_layer(1, {"w": torch.ones(2)}, {})
    assert os.strerror(errno.ENOSPC) in str(info.value) and "output.resume: false" in str(info.value)
    assert state.layers_done == 0 and not (state.dir / "state.json").exists()
    state.clear()
    assert not state.dir.exists()


def test_only_dead_local_writers_temps_are_removed(tmp_path):
    """A killed run's partial checkpoint goes; a live writer's, or another host's, stays."""
    import socket

    from alphaquant.export.atomic import remove_stale_temps

    host = socket.gethostname().replace("-", "_")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "out"
    names = {"dead": f".out.tmp-{host}.{dead.pid}-abc", "alive": f".out.tmp-{host}.{os.getpid()}-def",
             "init": f".out.tmp-{host}.1-ghi", "other_host": f".out.tmp-elsewhere.{dead.pid}-jkl",
             "other_out": f".out2.tmp-{host}.{dead.pid}-mno"}
    for n in names.values():
        (tmp_path / n).mkdir()
    removed = remove_stale_temps(out)
    assert [p.name for p in removed] == [names["dead"]]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(n for k, n in names.items() if k != "dead")
