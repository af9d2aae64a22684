"""Resume on the generic path: a Qwen3-MoE run (transformers' classes) SIGKILLed after layer 0's state is saved,
then started again, writes the uninterrupted run's checkpoint byte for byte."""
from __future__ import annotations

import json
import signal

import tiny
from pipeline_utils import write_config
from test_generic_models import make_hf_checkpoint
from test_resume import _cmd, _files

QUANT = {"default": {"wq": "int4", "group_size": 32},
         "overrides": [{"pattern": "*.experts.*", "wq": "mxfp4/32"}, {"pattern": "lm_head", "skip": True}]}


def test_generic_sigkill_then_rerun_is_bit_identical(tmp_path):
    ckpt = make_hf_checkpoint("qwen3_moe", tmp_path / "qwen3_moe", num_hidden_layers=2)
    corpus = tiny.write_corpus(tmp_path)

    def config(name):
        return write_config(tmp_path / f"{name}.yaml", ckpt, corpus, quant=QUANT,
                            model={"path": str(ckpt), "dtype": "float32", "lazy": True},
                            eval={"max_windows": 4}, output={"save": True, "dir": str(tmp_path / name)})

    proc = _cmd(config("uninterrupted"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    cfg = config("killed")
    proc = _cmd(cfg, kill_at=0)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert json.loads((tmp_path / ".killed.resume" / "state.json").read_text())["layers_done"] == 1
    proc = _cmd(cfg)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming: layers 0-0" in proc.stdout
    ref, got = _files(tmp_path / "uninterrupted"), _files(tmp_path / "killed")
    assert ref.keys() == got.keys() and "model.safetensors" in ref
    for k in ref:
        assert ref[k] == got[k], f"{k} differs from the uninterrupted run"
