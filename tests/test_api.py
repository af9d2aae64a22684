"""alphaquant.quantize: the same checkpoint as the CLI, byte for byte; objects it takes and refuses.

Runs are tiny (a 2-layer OLMoE, 4 windows of 32 tokens) so the file stays fast on 2 CPU cores.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

import alphaquant
import tiny
from alphaquant.app import main
from alphaquant.config.run import load_config
from alphaquant.errors import ConfigError, UserError
from pipeline_utils import write_config

REPO = Path(__file__).resolve().parents[1]
SMALL = dict(calibration={"num_samples": 4, "seq_len": 32, "batch_size": 2, "min_tokens_warn": 0},
             eval={"seq_len": 32, "max_windows": 2, "before": False})


@pytest.fixture(scope="module")
def olmoe(tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    return root, tiny.make_checkpoint("olmoe", root / "olmoe"), tiny.write_corpus(root)


def _yaml_config(root: Path, ckpt: Path, corpus: Path, out: Path, **sections) -> Path:
    merged = {k: {**SMALL.get(k, {}), **sections.get(k, {})} for k in {*SMALL, *sections}}
    return write_config(root / "run.yaml", ckpt, corpus, output={"save": True, "dir": str(out)}, **merged)


def _files(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _without_times(summary: dict) -> dict:
    drop = {"seconds_total", "seconds_walk", "solve_seconds", "stage_seconds", "memory", "layers", "gc"}
    return {k: v for k, v in summary.items() if k not in drop}


@pytest.fixture(scope="module")
def cli_and_api(olmoe):
    """One checkpoint written by the CLI, one by quantize(...) with the YAML's sections as keywords."""
    root, ckpt, corpus = olmoe
    out = root / "out"
    path = _yaml_config(root, ckpt, corpus, out)
    assert main(["--config", str(path)]) == 0
    cli = root / "out_cli"
    out.rename(cli)                              # same output.dir for both runs: the saved recipe names it
    sections = yaml.safe_load(path.read_text())
    result = alphaquant.quantize(model=sections.pop("model"), recipe=sections.pop("quant"),
                                 calibration=sections.pop("calibration"), **sections)
    return cli, out, result


def test_python_api_and_cli_write_byte_identical_checkpoints(cli_and_api):
    cli, api, _ = cli_and_api
    a, b = _files(cli), _files(api)
    assert sorted(a) == sorted(b)
    assert any(n.endswith(".safetensors") for n in a)
    for name in a:
        if name == "alphaquant_summary.json":       # holds the run's timings and memory
            sa, sb = json.loads(a[name]), json.loads(b[name])
            assert _without_times(sa) == _without_times(sb)
        elif not name.endswith(".png"):              # plots hold matplotlib's timestamp
            assert a[name] == b[name], name


def test_result_object(cli_and_api, olmoe):
    _, out, r = cli_and_api
    assert r.output_dir == out and (out / "config.json").is_file()
    assert set(r.perplexity) == {"quantized"} and r.perplexity["quantized"] > 1
    solved = {n for n, s in r.specs.items() if not s.skip}
    assert set(r.records) == solved == set(r.modules)
    expert = "model.layers.0.mlp.experts.0.up_proj"
    assert r.modules[expert]["format"].startswith("mxfp4") and r.modules[expert]["tokens"] > 0
    assert 0 < r.modules[expert]["rel_error"] < 1
    summary = json.loads((out / "alphaquant_summary.json").read_text())
    assert r.perplexity["quantized"] == summary["perplexity"]["quantized"]
    model = r.model                                   # read back from the checkpoint, once
    assert model is r.model
    from alphaquant import models
    original = models.from_pretrained(olmoe[1], dtype="float32").get_submodule(expert).weight
    w = model.get_submodule(expert).weight
    assert w.shape == original.shape and not torch.equal(w.float(), original.float())   # the quantized weights
    assert (w.float() - original.float()).norm() < 0.5 * original.float().norm()


def test_eval_only_without_config_reads_the_checkpoint(cli_and_api, olmoe, capsys):
    cli, _, r = cli_and_api
    _, _, corpus = olmoe
    capsys.readouterr()
    assert main(["--eval-only", str(cli), "--eval.dataset", str(corpus), "--eval.seq_len", "32",
                 "--eval.max_windows", "2", "--trainer.accelerator", "cpu", "--model.dtype", "float32"]) == 0
    captured = capsys.readouterr()
    out = captured.out
    result = json.loads(out)
    assert "[eval-only] windows 2/2, " in captured.err         # progress without a terminal; stdout is the JSON
    assert result["perplexity"] == pytest.approx(r.perplexity["quantized"], rel=1e-5)


def test_loaded_model_and_token_tensor_match_the_cli_on_a_token_file(olmoe, capsys):
    """quantize(model=<loaded model>, calibration=<token ids>) is the CLI run on the same weights and a
    .pt token file; the CLI run also compares uniform Hessians, so its log shows both run labels."""
    from alphaquant import models

    root, ckpt, corpus = olmoe
    tokens = torch.randint(0, 320, (4000,), generator=torch.Generator().manual_seed(0))
    torch.save(tokens, root / "tokens.pt")
    out = root / "out_t"
    path = _yaml_config(root, ckpt, corpus, out, calibration={"dataset": str(root / "tokens.pt"), "split": "all"},
                        eval={"enabled": False})
    capsys.readouterr()
    assert main(["--config", str(path), "--eval.enabled", "true", "--eval.compare_hessians", "[uniform]"]) == 0
    log = capsys.readouterr().out
    assert "[compare: uniform Hessians, not saved] layer 2/2 done in" in log
    assert "[quantize: routed_sq Hessians] layer 1/2 done in" in log and "mean rel. error" in log and "ETA" in log
    assert "[quantize: routed_sq Hessians] perplexity quantized:" in log
    cli = root / "out_t_cli"
    out.rename(cli)
    cfg = yaml.safe_load(path.read_text())
    loaded = models.from_pretrained(ckpt, dtype="float32")
    r = alphaquant.quantize(model=loaded, recipe=cfg["quant"],
                            calibration={**cfg["calibration"], "dataset": tokens.reshape(40, 100)},
                            eval=False, trainer=cfg["trainer"], logging=cfg["logging"], output=cfg["output"])
    a, b = _files(cli), _files(out)
    assert sorted(a) == sorted(b)
    for name in a:
        if name.endswith((".safetensors", ".json")) and not name.startswith("alphaquant_"):
            assert a[name] == b[name], name
    ra, rb = (json.loads(x["alphaquant_recipe.json"]) for x in (a, b))
    assert ra["modules"] == rb["modules"] and r.config.name == ckpt.name


def test_recipe_file_and_dry_run(olmoe, capsys):
    ckpt = tiny.make_checkpoint("olmoe", olmoe[0] / "wide", hidden_size=128)   # int4 g128 divides it
    r = alphaquant.quantize(model=str(ckpt), recipe=REPO / "configs/gptq_olmoe_mixed.json", dry_run=True)
    assert r.dry_run and r.output_dir is None
    assert r.specs["model.layers.1.mlp.experts.3.down_proj"].wq == "mxfp4"
    assert r.specs["model.layers.1.mlp.gate"].skip
    assert "modules per format" in capsys.readouterr().out
    with pytest.raises(UserError, match="dry run"):
        r.model


BAD_ARGS = {
    "a number as model": (dict(model=3), ["model=", "an int"]),
    "a torch module we cannot take": (dict(model=torch.nn.Sequential(*[torch.nn.Linear(64, 64)] * 50)),
                                      ["model=", "a Sequential"]),
    "a number as calibration": (dict(calibration=2.5), ["calibration=", "a float"]),
    "a float tensor as tokens": (dict(calibration=torch.rand(10)), ["calibration=", "integer token ids"]),
    "an object inside a section": (dict(output={"dir": object()}), ["output['dir']", "an object"]),
    "a bad key in a section": (dict(calibration={"num_sample": 4}), ["calibration.num_sample",
                                                                      "alphaquant.quantize(calibration=...)"]),
    "a bad value in the recipe": (dict(recipe={"default": {"wq": "int9"}}), ["quant.default.wq", "recipe="]),
    "a run config as recipe file": (dict(recipe=REPO / "configs/demo.yaml"), ["run-config", "--config"]),
    "a missing recipe file": (dict(recipe="nope/recipe.json"), ["nope/recipe.json", "current directory"]),
}


@pytest.mark.parametrize("case", list(BAD_ARGS))
def test_bad_arguments_are_one_sentence_naming_the_argument(case, olmoe):
    kwargs, words = BAD_ARGS[case]
    kwargs = {"model": str(olmoe[1]), **kwargs}
    with pytest.raises(ConfigError) as e:
        alphaquant.quantize(**kwargs, dry_run=True)
    msg = str(e.value)
    assert "\n" not in msg and len(msg) < 400, msg           # never the repr of a whole model
    for w in words:
        assert w in msg, (w, msg)


def test_config_and_keywords_merge_key_by_key(olmoe, tmp_path):
    root, ckpt, corpus = olmoe
    path = _yaml_config(tmp_path, ckpt, corpus, tmp_path / "o")
    r = alphaquant.quantize(config=path, calibration={"num_samples": 2, "batch_size": 1}, dry_run=True)
    assert (r.config.calibration.num_samples, r.config.calibration.seq_len) == (2, 32)   # the rest from the file
    assert r.config == load_config(path, ["--calibration.num_samples", "2", "--calibration.batch_size", "1"])


def test_import_alphaquant_is_light():
    import subprocess
    import sys
    code = "import alphaquant, sys; assert callable(alphaquant.quantize); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "False"


def test_a_loaded_model_without_tokenizer_and_text_data_says_what_to_pass(olmoe):
    from alphaquant import models
    _, ckpt, corpus = olmoe
    cfg = {**tiny.BASE, **tiny.FAMILIES["olmoe"]}
    bare = models.from_config(cfg, seed=1)              # built in memory: no directory, no tokenizer
    with pytest.raises(ConfigError, match="pass tokenizer=") as e:
        alphaquant.quantize(model=bare, calibration=str(corpus), eval=False, dry_run=True)
    assert "an OlmoeForCausalLM" in str(e.value) and "\n" not in str(e.value)
    r = alphaquant.quantize(model=bare, tokenizer=str(ckpt), recipe={"default": {"wq": "int4", "group_size": 32}},
                            calibration=str(corpus), eval=False, dry_run=True)
    assert r.config.name == "olmoe" and r.specs["model.layers.0.self_attn.q_proj"].wq == "int4"


def test_texts_and_datasets_become_the_jsonl_a_user_would_write(tmp_path):
    import datasets

    from alphaquant.api.inputs import data_section
    from alphaquant.data_sources import load_text

    texts = ["first document", "zweites Dokument \u00e4", "third"]
    ds = datasets.Dataset.from_dict({"body": texts, "n": [1, 2, 3]})
    for i, value in enumerate([texts, {"dataset": ds, "text_field": "body", "num_samples": 3}]):
        d = tmp_path / str(i)
        d.mkdir()
        section = data_section(value, "calibration", d)
        assert section["split"] == "all" and section["text_field"] == "text"
        assert load_text(section["dataset"], section["split"], section["text_field"]) == "\n\n".join(texts)
    assert data_section({"dataset": ds, "text_field": "body", "num_samples": 3}, "calibration", d)["num_samples"] == 3
    with pytest.raises(ConfigError, match="no column 'text'"):
        data_section(ds, "calibration", tmp_path)
    tokens = data_section(torch.arange(12).reshape(3, 4), "eval", tmp_path)
    assert torch.equal(torch.load(tokens["dataset"]), torch.arange(12)) and tokens["split"] == "all"
    assert data_section(False, "eval", tmp_path) == {"enabled": False}


def test_a_transformers_model_is_taken_as_loaded(capsys):
    import transformers

    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2)
    llama = transformers.LlamaForCausalLM(config).eval()
    r = alphaquant.quantize(model=llama, recipe={"default": {"wq": "int4", "group_size": 32}},
                            calibration=torch.randint(0, 64, (512,)), eval=False, dry_run=True)
    assert r.config.name == "llama" and r.config.model.lazy is False and r.config.model.dtype == "float32"
    assert r.specs["model.layers.0.mlp.down_proj"].wq == "int4" and not r.specs["model.layers.0.mlp.down_proj"].skip
    assert "modules per format" in capsys.readouterr().out
