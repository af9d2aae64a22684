"""DDP on CPU (gloo, 2 processes) gives the same quantized checkpoint as one process.

Each rank sees a disjoint half of the calibration windows; Hessians and token counts are
summed across ranks (all_reduce), the expert solve is split across ranks and broadcast.
The sum order of the all_reduce differs from one process's running sum, so Hessians differ
in the last bits of fp32, which may move a handful of weights to the neighbouring grid
point: token counts must be identical, and the weights identical except for that handful.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import prewarmed
import tiny
from pipeline_utils import write_config

REPO = Path(__file__).resolve().parent.parent


def _run(tmp: Path, ckpt: Path, corpus: Path, name: str, devices: int, strategy: str, torchrun: bool = False) -> Path:
    cfg = write_config(tmp / f"{name}.yaml", ckpt, corpus,
                       trainer={"accelerator": "cpu", "devices": devices, "strategy": strategy},
                       calibration={"num_samples": 8, "batch_size": 1},
                       eval={"max_windows": 4, "batch_size": 1},
                       output={"save": True, "dir": str(tmp / name)})
    if devices == 1:          # one process: forked from one that has done the imports (tests/prewarmed.py)
        proc = prewarmed.run(["--config", cfg], cwd=tmp)
    else:
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={devices}"] \
            if torchrun else [sys.executable]
        proc = subprocess.run([*launcher, str(REPO / "train_quant.py"), "--config", str(cfg)],
                              cwd=tmp, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp / name


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    ckpt = tiny.make_checkpoint("olmoe", tmp / "olmoe")
    corpus = tiny.write_corpus(tmp)
    return _run(tmp, ckpt, corpus, "one", 1, "auto"), _run(tmp, ckpt, corpus, "two", 2, "ddp")


def test_ddp_token_counts_and_errors_equal_single_process(runs):
    one, two = (json.loads((d / "alphaquant_summary.json").read_text()) for d in runs)
    assert one["calibration_tokens"] == two["calibration_tokens"]
    assert [r["counts"] for r in one["experts"]] == [r["counts"] for r in two["experts"]]
    for name, m in one["modules"].items():
        assert two["modules"][name]["tokens"] == m["tokens"], name
        assert two["modules"][name]["rel_error"] == pytest.approx(m["rel_error"], rel=1e-3, abs=1e-6), name
    for k, v in one["perplexity"].items():
        assert two["perplexity"][k] == pytest.approx(v, rel=1e-4), k


def test_ddp_checkpoint_equals_single_process(runs):
    a, b = (load_file(str(d / "model.safetensors")) for d in runs)
    assert a.keys() == b.keys()
    differing = total = 0
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        if a[k].is_floating_point() and "scale" not in k:
            assert torch.allclose(a[k].float(), b[k].float(), rtol=1e-3, atol=1e-6), k
        elif "packed" in k:   # count codes that moved to a neighbouring grid point (bytes differ)
            differing += int((a[k].view(torch.uint8) != b[k].view(torch.uint8)).sum())
            total += a[k].numel() * a[k].element_size()
        else:
            assert torch.equal(a[k], b[k]) or torch.allclose(a[k].float(), b[k].float(), rtol=1e-2), k
    assert total > 0 and differing / total < 1e-3, f"{differing} of {total} packed bytes differ"


def test_ranks_started_by_torchrun_write_the_same_checkpoint(runs, tmp_path):
    """All ranks started at once (torchrun, Lightning's TorchElastic environment) instead of rank 0
    starting the others: the same checkpoint as the Lightning-launched DDP run, byte for byte."""
    one, two = runs
    cfg = json.loads((two / "alphaquant_recipe.json").read_text())["config"]
    three = _run(tmp_path, Path(cfg["model"]["path"]), Path(cfg["calibration"]["dataset"]), "torchrun", 2, "ddp",
                 torchrun=True)
    assert (three / "model.safetensors").read_bytes() == (two / "model.safetensors").read_bytes()


def test_ddp_killed_after_a_layer_resumes_to_the_same_checkpoint(runs, tmp_path):
    """Under DDP the last rank writes the resume state (rank 0 the checkpoint). SIGKILL that rank
    right after layer 0's state is on disk (torchrun then stops the other rank too), start the same
    command again: it resumes after layer 0 and writes the uninterrupted DDP run's checkpoint."""
    from test_resume import KILLER
    _, two = runs
    cfg = json.loads((two / "alphaquant_recipe.json").read_text())["config"]
    conf = write_config(tmp_path / "resumed.yaml", Path(cfg["model"]["path"]), Path(cfg["calibration"]["dataset"]),
                        trainer={"accelerator": "cpu", "devices": 2, "strategy": "ddp"},
                        calibration={"num_samples": 8, "batch_size": 1}, eval={"max_windows": 4, "batch_size": 1},
                        output={"save": True, "dir": str(tmp_path / "resumed")})
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "KILL_AT": "0"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    killed = subprocess.run([*torchrun, "--no-python", sys.executable, "-c", KILLER, "--config", str(conf)],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert killed.returncode != 0 and not (tmp_path / "resumed").exists()
    # torchrun's report names the process that saved layer 0's state and was killed: the last rank. It is the
    # "Root Cause" or, when rank 0's collective aborted within the same poll of torchrun (SIGABRT, seen on a 2-core
    # CI host), one of the "Failures" listed above it
    report = killed.stderr[killed.stderr.index("Failures:"):]
    assert re.search(r"rank\s*:\s*1 \(local_rank: 1\)\s*\n\s*exitcode\s*:\s*-9", report), report
    state = tmp_path / ".resumed.resume"
    assert (state / "layer_00000.safetensors").is_file(), killed.stderr[-2000:]
    again = subprocess.run([*torchrun, str(REPO / "train_quant.py"), "--config", str(conf)],
                           cwd=tmp_path, env={**env, "KILL_AT": ""}, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming: layers 0-0" in again.stdout + again.stderr
    assert (tmp_path / "resumed" / "model.safetensors").read_bytes() == (two / "model.safetensors").read_bytes()
    assert not state.exists()                              # removed by its writer once the checkpoint is complete
