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


# --- JSON recipes ---------------------------------------------------------------------------------------------
RECIPES = {  # recipe file -> (family, {module: (wq, group_size) or "skip"})
    "gptq_olmoe_mixed.json": ("olmoe", {"model.layers.0.self_attn.q_proj": ("int4", 128),
                                        "model.layers.1.mlp.experts.7.down_proj": ("mxfp4", 32),
                                        "model.layers.0.mlp.gate": "skip"}),
    "gptq_qwen2_moe_mixed.json": ("qwen2_moe", {"model.layers.0.self_attn.o_proj": ("int4", 128),
                                                "model.layers.0.mlp.experts.3.up_proj": ("mxfp4", 32),
                                                "model.layers.1.mlp.shared_expert.down_proj": ("mxfp6", 64),
                                                "model.layers.0.mlp.gate": "skip",
                                                "model.layers.1.mlp.shared_expert_gate": "skip"}),
    "gptq_mixtral_mixed.json": ("mixtral", {"model.layers.0.self_attn.k_proj": ("int4", 128),
                                            "model.layers.0.block_sparse_moe.experts.1.w1": ("mxfp4", 32),
                                            "model.layers.1.block_sparse_moe.experts.2.w3": ("mxfp4", 32),
                                            "model.layers.1.block_sparse_moe.experts.0.w2": ("int4", 128),
                                            "model.layers.0.block_sparse_moe.gate": "skip"}),
}
REPO = Path(__file__).resolve().parents[1]


def test_every_shipped_recipe_is_tested():
    assert {p.name for p in (REPO / "configs").glob("gptq_*.json")} == set(RECIPES)


@pytest.mark.parametrize("name", list(RECIPES))
def test_shipped_json_recipe_resolves_against_its_family(name, tmp_path):
    import json

    from alphaquant.arch import load_model
    from alphaquant.config.run import Config, load_config
    from alphaquant.config.recipe import check_formats, resolve_recipe

    family, expect = RECIPES[name]
    recipe = REPO / "configs" / name
    assert json.loads(recipe.read_text())["default"]           # plain JSON, the form the issue gives
    ckpt = tiny.make_checkpoint(family, tmp_path / family, **WIDE)
    cfg = load_config(None, ["--model.path", str(ckpt), "--quant", str(recipe)])
    model, adapter = load_model(cfg.model, skeleton_only=True)
    specs = resolve_recipe(cfg.quant, adapter.linear_modules(model))
    check_formats(specs)
    for module, want in expect.items():
        s = specs[module]
        assert (s.skip if want == "skip" else (not s.skip and (s.wq, s.group_size) == want)), (module, s)
    # `quant: FILE` in a YAML config is the same recipe
    run = tmp_path / "run.yaml"
    run.write_text(f"model: {{path: {ckpt}}}\nquant: {recipe}\n")
    assert load_config(run).quant == cfg.quant
    assert Config.from_dict(load_config(run).to_dict()) == load_config(run)


def test_recipe_flag_dry_runs_and_quant_flags_refine_it(tmp_path, capsys):
    ckpt = tiny.make_checkpoint("mixtral", tmp_path / "mixtral", **WIDE)
    recipe = REPO / "configs/gptq_mixtral_mixed.json"
    assert main(["--config", str(REPO / "configs/mixtral.yaml"), "--model.path", str(ckpt), "--recipe", str(recipe),
                 "--quant.overrides[2].group_size", "64", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "mxfp4/g32: 16, int4/g128: 8, int4/g64: 8, skip: 3" in out, out[-400:]   # w1/w3, attention, w2


@pytest.mark.parametrize("text,words", [
    ('{"default": {"wq": "int4"}, "overrides": [{"pattern": "*.q_proj", "wq": "int9"}]}',
     ["quant.overrides[0].wq", "int9", "the recipe file"]),
    ('{"default": {"wq": "int4"},\n "default": {"wq": "int8"}}', ["'default' twice"]),
    ('{"default": {"wq": "int4"', ["not valid JSON", "line 1"]),
    ('{"model": {"path": "x"}, "default": {}}', ["run-config", "--config"]),
    ('[1, 2]', ["must be a mapping"]),
])
def test_bad_recipe_files_are_one_sentence(tmp_path, capsys, text, words):
    bad = tmp_path / "bad.json"
    bad.write_text(text)
    assert main(["--model.path", str(tmp_path), "--recipe", str(bad), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1, err
    for w in words:
        assert w in err, (w, err)


def test_missing_recipe_names_the_path_tried(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["--model.path", "m", "--recipe", "recipes/mix.json"]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "recipes/mix.json") in err and "current directory" in err


# --- the command line -----------------------------------------------------------------------------------------
def test_help_lists_every_config_key_with_type_default_and_meaning(capsys):
    from alphaquant.config.cli_help import config_keys

    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    keys = config_keys()
    assert len(keys) > 60
    for k in keys:
        assert k.meaning, f"{k.flag} has no comment in its dataclass: --help cannot say what it means"
        assert f"    {k.flag} {k.type}\n" in out, k.flag
        assert f"(default: {k.default})" in out
    for flag in ("--recipe", "--dry-run", "--print-config", "--eval-only", "--overwrite"):
        assert flag in out
    # generated from the dataclasses: a field's comment is its meaning, its default the dataclass default
    by_flag = {k.flag: k for k in keys}
    assert by_flag["--calibration.num_samples"].default == "128"
    assert "random windows" in by_flag["--calibration.num_samples"].meaning
    assert by_flag["--gptq.sweep"].type == "auto|torch"
    assert by_flag["--quant.overrides[N].pattern"].meaning


def test_print_config_is_the_resolved_yaml(tmp_path, capsys):
    demo = REPO / "configs/demo.yaml"
    assert main(["--config", str(demo), "--calibration.num_samples", "77", "--print-config"]) == 0
    from alphaquant.config.run import Config, load_config
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["calibration"]["num_samples"] == 77 and printed["output"]["dir"]
    assert Config.from_dict(printed) == load_config(demo, ["--calibration.num_samples", "77"])


@pytest.mark.parametrize("argv,suggestion", [
    (["--calibraton.num_samples", "4"], "--calibration.num_samples"),
    (["--dryrun"], "--dry-run"),
    (["--overwite"], "--overwrite"),
    (["--quant.overrides.0.wqq", "int4"], "--quant.overrides[0].wq"),
    (["--eval.max_window=3"], "--eval.max_windows"),
])
def test_a_typo_in_a_flag_suggests_the_right_one(argv, suggestion, capsys):
    assert main(["--config", str(REPO / "configs/demo.yaml"), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unknown option") and f"did you mean '{suggestion}'?" in err, err
    assert len(err.splitlines()) == 1


def test_console_script_is_train_quant():
    import importlib
    import tomllib

    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, attr = scripts["alphaquant"].partition(":")
    from alphaquant.app import console_main
    assert getattr(importlib.import_module(module), attr) is console_main
    assert "console_main()" in (REPO / "train_quant.py").read_text()


def test_output_into_a_closed_pipe_has_no_traceback():
    import subprocess
    import sys

    # `| head` that has already exited: the reader is gone before the first byte is written (the
    # interpreter takes far longer to start than the close). --help is argparse's (it ignores the
    # error itself); --print-config is our print, which raises BrokenPipeError.
    for flag in ("--print-config", "--help"):
        p = subprocess.Popen([sys.executable, str(REPO / "train_quant.py"), "--config", str(REPO / "configs/demo.yaml"),
                              flag], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        p.stdout.close()
        err = p.stderr.read().decode()
        code = p.wait(timeout=120)
        assert "Traceback" not in err and "BrokenPipe" not in err and "Exception ignored" not in err, err
        assert code == (141 if flag == "--print-config" else 0), (flag, code, err)


def test_layer_progress_without_a_terminal_prints_one_flushed_line_per_layer():
    import io

    from alphaquant.pipeline.progress import LayerProgress
    from alphaquant.pipeline.walker import LayerStats

    buf = io.StringIO()          # not a TTY, as a scheduler's log file
    with LayerProgress(3, label="compare: uniform Hessians, not saved", stream=buf) as p:
        p.group_done(0, 0)
        p.layer_done(0, LayerStats(0, 2.0), mean_error=0.125)
        p.layer_done(1, LayerStats(1, 1.0, restored=True))
        p.stream_done("quantized", 58.2)
    lines = buf.getvalue().splitlines()
    assert len(lines) == 3
    assert lines[0].startswith("[compare: uniform Hessians, not saved] layer 1/3 done in 2.0s, mean rel. error 0.1250, ETA")
    assert "layer 2/3 replayed from the resume state" in lines[1]
    assert lines[2] == "[compare: uniform Hessians, not saved] perplexity quantized: 58.200"
    quiet = io.StringIO()
    with LayerProgress(1, enabled=False, stream=quiet) as p:   # ranks other than 0
        p.layer_done(0, LayerStats(0, 1.0))
    assert quiet.getvalue() == ""


def test_window_progress_without_a_terminal_prints_about_ten_lines_and_the_last():
    import io

    from alphaquant.pipeline.progress import WindowProgress

    buf = io.StringIO()
    with WindowProgress(25, stream=buf) as p:
        for done in range(2, 26, 2):        # batches of 2, the last one of 1
            p.update(min(done, 25))
        p.update(25)
    lines = buf.getvalue().splitlines()
    assert lines[0].startswith("[eval-only] windows 2/25, ") and "ETA" in lines[0]
    assert lines[-1].startswith("[eval-only] windows 25/25, ")
    assert 8 <= len(lines) <= 13
