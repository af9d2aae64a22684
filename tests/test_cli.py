"""train_quant.py as a user meets it: shipped configs dry-run, bad input exits 2 with one sentence."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

import tiny
from alphaquant.app import main
from pipeline_utils import write_config

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))
# Shapes the shipped recipes' group sizes divide (128 for int4, 32/64 for MX).
WIDE = dict(hidden_size=128, intermediate_size=128, moe_intermediate_size=64, shared_expert_intermediate_size=128)


def _family_of(config_path: Path) -> str | None:
    stem = config_path.stem
    return stem if stem in tiny.FAMILIES else None


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_every_shipped_config_dry_runs_against_a_tiny_model(config, tmp_path, capsys):
    family = _family_of(config)
    args = ["--config", str(config), "--dry-run"]
    if family is not None:   # hub configs: point them at a tiny checkpoint of the same family
        ckpt = tiny.make_checkpoint(family, tmp_path / family, **{k: v for k, v in WIDE.items()})
        args += ["--model.path", str(ckpt)]
    else:                    # generic-path configs (transformers' classes): a tiny model of the same type
        from test_generic_models import tiny_for_shipped_config
        ckpt = tiny_for_shipped_config(config.stem, tmp_path / config.stem)
        if ckpt is not None:
            args += ["--model.path", str(ckpt)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "modules per format" in out and "skip" in out
    assert not (tmp_path / "outputs").exists()


@pytest.fixture(scope="module")
def olmoe(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    return tiny.make_checkpoint("olmoe", root / "olmoe"), tiny.write_corpus(root)


def _bad(tmp_path, olmoe, mutate, extra_args=()):
    ckpt, corpus = olmoe
    path = write_config(tmp_path / "run.yaml", ckpt, corpus, output={"save": True, "dir": str(tmp_path / "out")})
    cfg = yaml.safe_load(path.read_text())
    mutate(cfg)
    path.write_text(yaml.safe_dump(cfg))
    return main(["--config", str(path), *extra_args])


BAD = {
    "unknown top-level key": (lambda c: c.update(modle={}), "modle"),
    "unknown nested key": (lambda c: c["calibration"].update(num_sample=3), "num_sample"),
    "wrong type": (lambda c: c["calibration"].update(num_samples="many"), "num_samples"),
    "unknown format": (lambda c: c["quant"]["default"].update(wq="int9"), "int9"),
    "group does not divide": (lambda c: c["quant"]["overrides"].append({"pattern": "*.q_proj", "group_size": 48}), "48"),
    "pattern matches nothing": (lambda c: c["quant"]["overrides"].append({"pattern": "*.nothing", "skip": True}),
                                "*.nothing"),
    "empty override": (lambda c: c["quant"]["overrides"].append({"pattern": "*.q_proj"}), "overrides[3]"),
    "missing model directory": (lambda c: c["model"].update(path="/nonexistent/model"), "/nonexistent/model"),
    "missing data file": (lambda c: c["calibration"].update(dataset="/nonexistent/corpus.txt"), "corpus.txt"),
    "sequence too long": (lambda c: c["calibration"].update(seq_len=100000), "seq_len"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_config_exits_2_with_one_sentence_and_writes_nothing(case, tmp_path, olmoe, capsys):
    mutate, needle = BAD[case]
    assert _bad(tmp_path, olmoe, mutate) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and needle in err and "Traceback" not in err
    assert len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_missing_config_file(tmp_path, capsys):
    assert main(["--config", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml" in capsys.readouterr().err
