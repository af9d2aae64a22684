"""The demo config end to end, reduced (fewer calibration and evaluation windows).

Runs exactly configs/demo.yaml (the shipped pretrained demo/olmoe-tiny, the shipped corpus,
W&B offline, CSV, plots, an exported checkpoint) with only sizes and output paths changed,
then checks what a user is told to look at: perplexities, the checkpoint read back two
ways (our reader; --eval-only), the W&B offline run directory and the CSV metrics.
"""
from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

import pytest
from alphaquant.app import main

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("demo")
    argv = ["--config", str(REPO / "configs/demo.yaml"),
            "--model.path", str(REPO / "demo/olmoe-tiny"),
            "--calibration.dataset", str(REPO / "demo/corpus/train.txt"),
            "--eval.dataset", str(REPO / "demo/corpus/test.txt"),
            "--calibration.num_samples", "16", "--eval.max_windows", "8",
            "--output.dir", str(tmp / "out"), "--logging.csv.dir", str(tmp / "logs"),
            "--logging.wandb.dir", str(tmp / "logs")]
    assert main(argv) == 0
    return tmp, argv


def test_demo_reports_all_perplexities(demo_run):
    tmp, _ = demo_run
    summary = json.loads((tmp / "out/alphaquant_summary.json").read_text())
    ppl = summary["perplexity"]
    assert set(ppl) == {"original", "rtn", "quantized", "gptq_uniform"}
    assert all(math.isfinite(v) for v in ppl.values())
    # a trained model (unigram perplexity of this corpus is ~765): quantization costs little
    assert ppl["original"] < 120
    for k in ("rtn", "quantized", "gptq_uniform"):
        assert ppl["original"] * 0.9 < ppl[k] < ppl["original"] * 1.5
    experts = summary["experts"]
    assert len(experts) == 4 and all(row["experts"] == 8 and row["min"] > 0 for row in experts)


def test_demo_checkpoint_reads_back(demo_run, capsys):
    tmp, argv = demo_run
    out = tmp / "out"
    config = json.loads((out / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors"
    assert {g["format"] for g in qc["config_groups"].values()} == {"pack-quantized", "mxfp4-pack-quantized"}
    # the routers stay unquantized (lm_head is tied to the embedding here, so it is no separate linear)
    assert [t for t in qc["ignore"] if re.match(t.removeprefix("re:"), "model.layers.3.mlp.gate")]
    assert (out / "tokenizer.json").is_file()
    assert {p.name for p in (out / "plots").iterdir()} == {"layer_error.png", "tokens_per_expert.png"}
    capsys.readouterr()
    # --eval-only on the saved checkpoint reproduces the run's own perplexity of the quantized model
    assert main(["--eval-only", str(out), *argv]) == 0
    stdout = capsys.readouterr().out
    result = json.loads(stdout[stdout.rindex("\n{\n") + 1:] if "\n{\n" in stdout else stdout)
    summary = json.loads((out / "alphaquant_summary.json").read_text())
    assert result["windows"] == 8
    assert result["perplexity"] == pytest.approx(summary["perplexity"]["quantized"], rel=1e-5)

def test_demo_logs(demo_run):
    tmp, _ = demo_run
    runs = list((tmp / "logs/wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].glob("*.wandb"))
    metrics = list((tmp / "logs/demo").glob("version_*/metrics.csv"))
    assert len(metrics) == 1
    rows = list(csv.DictReader(metrics[0].open()))
    assert any(r.get("ppl/quantized") for r in rows)
