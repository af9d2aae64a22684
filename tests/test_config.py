"""Config loading: every shipped YAML parses, the command line wins, bad input names its key."""
from __future__ import annotations

from pathlib import Path

import pytest

from alphaquant.config.run import Config, load_config, parse_overrides
from alphaquant.errors import ConfigError, UserError

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
MINIMAL = "model: {path: org/model}\n"


def write(tmp_path, text: str) -> Path:
    p = tmp_path / "run.yaml"
    p.write_text(text)
    return p


def test_configs_folder_is_not_empty():
    assert len(CONFIGS) >= 4


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_parses(path):
    cfg = load_config(path)
    assert cfg.model.path
    assert cfg.quant.default.wq and cfg.quant.default.group_size
    # the resolved dict is itself a valid config and round-trips unchanged
    assert Config.from_dict(cfg.to_dict()) == cfg


def test_defaults_and_derived_names(tmp_path):
    cfg = load_config(write(tmp_path, "model: {path: allenai/OLMoE-1B-7B-0924}\n"))
    assert cfg.name == "OLMoE-1B-7B-0924"
    assert cfg.output.dir == str(Path("outputs") / "OLMoE-1B-7B-0924")
    assert (cfg.calibration.num_samples, cfg.calibration.seq_len, cfg.calibration.seed) == (128, 2048, 0)
    assert cfg.calibration.hessian == "routed_sq"
    assert (cfg.gptq.block_size, cfg.gptq.damp, cfg.gptq.act_order, cfg.gptq.sweep) == (128, 0.01, True, "auto")
    assert cfg.gptq.scale_search == "mse"
    assert (cfg.quant.default.wq, cfg.quant.default.group_size, cfg.quant.default.aq) == ("int4", 128, "bf16")
    assert cfg.eval.max_windows is None and cfg.trainer.devices == "auto"


def test_gptq_section_reaches_the_solver(tmp_path):
    import inspect

    from alphaquant.gptq import gptq_quantize
    from alphaquant.pipeline.calibrate import solver_options
    auto = solver_options(load_config(write(tmp_path, MINIMAL)).gptq)
    torch_sweep = solver_options(load_config(write(tmp_path, MINIMAL + "gptq: {sweep: torch, act_order: true}\n")).gptq)
    assert auto["fused"] is None and torch_sweep["fused"] is False and torch_sweep["act_order"] is True
    assert set(auto) <= set(inspect.signature(gptq_quantize).parameters)     # every option is one gptq_quantize takes


def test_command_line_wins_over_file(tmp_path):
    p = write(tmp_path, MINIMAL + "calibration: {num_samples: 64, seq_len: 512}\n"
                       "quant: {overrides: [{pattern: '*.experts.*', wq: mxfp4/32}]}\n")
    cfg = load_config(p, ["--calibration.num_samples", "16", "--eval.enabled=false", "calibration.seed=7",
                          "--output.overwrite", "--quant.overrides[0].wq", "mxfp6/64",
                          "--trainer.devices", "2", "--eval.max_windows", "null"])
    assert cfg.calibration.num_samples == 16
    assert cfg.calibration.seq_len == 512                       # untouched keys keep the file's value
    assert cfg.calibration.seed == 7
    assert cfg.eval.enabled is False and cfg.output.overwrite is True
    assert (cfg.quant.overrides[0].wq, cfg.quant.overrides[0].group_size) == ("mxfp6", 64)
    assert cfg.trainer.devices == 2 and cfg.eval.max_windows is None


def test_command_line_can_replace_a_list(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL), ["--quant.overrides", "[{pattern: lm_head, skip: true}]"])
    assert [(o.pattern, o.skip) for o in cfg.quant.overrides] == [("lm_head", True)]


def test_yaml_12_scalars(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL + "gptq: {damp: 1e-2}\ncalibration: {split: 0:0.9}\nname: no\n"))
    assert cfg.gptq.damp == 0.01                               # PyYAML 1.1 would give the string '1e-2'
    assert cfg.calibration.split == "0:0.9"                    # ... and 0.9 (base 60) here
    assert cfg.name == "no"                                    # ... and False here


def test_wq_shorthand(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL + "quant: {default: {wq: mxfp4/32}}\n"))
    assert (cfg.quant.default.wq, cfg.quant.default.group_size) == ("mxfp4", 32)


def test_parse_overrides_forms():
    assert parse_overrides(["--a.b", "1", "--c=x", "d.e=2", "--output.overwrite"]) == [
        ("a.b", "1"), ("c", "x"), ("d.e", "2"), ("output.overwrite", "true")]


BAD = [  # (yaml, argv, words the message must contain)
    ("modle: {path: x}\n", [], ["'modle'", "did you mean 'model'"]),
    (MINIMAL + "calibration: {num_sample: 4}\n", [], ["'calibration.num_sample'", "calibration.num_samples"]),
    (MINIMAL + "logging: {wandb: {mdoe: offline}}\n", [], ["'logging.wandb.mdoe'", "logging.wandb.mode"]),
    (MINIMAL + "quant: {overrides: [{pattern: a, grup_size: 32}]}\n", [], ["'quant.overrides[0].grup_size'"]),
    (MINIMAL, ["--calibration.num_sample", "4"], ["--calibration.num_sample", "--calibration.num_samples"]),
    (MINIMAL + "calibration: {num_samples: many}\n", [], ["calibration.num_samples", "an integer", "'many'"]),
    (MINIMAL + "calibration: {num_samples: true}\n", [], ["calibration.num_samples", "an integer"]),
    (MINIMAL + "output: {overwrite: 1}\n", [], ["output.overwrite", "true or false"]),
    (MINIMAL, ["--calibration.seq_len", "long"], ["calibration.seq_len", "the command line"]),
    (MINIMAL + "calibration: {hessian: route}\n", [], ["calibration.hessian", "'routed'"]),
    ("model: {path: x, dtype: fp32}\n", [], ["model.dtype", "float32"]),
    (MINIMAL + "trainer: {devices: two}\n", [], ["trainer.devices", "'auto'"]),
    (MINIMAL + "quant: {default: {wq: int9}}\n", [], ["quant.default.wq", "int9", "int8"]),
    (MINIMAL + "quant: {overrides: [{pattern: a, wq: mxfp5}]}\n", [], ["quant.overrides[0].wq", "mxfp5"]),
    (MINIMAL + "quant: {overrides: [{pattern: a, aq: fp4}]}\n", [], ["quant.overrides[0].aq", "'fp8_e4m3'"]),
    (MINIMAL + "quant: {overrides: [{pattern: a, skip: true}, {pattern: b, group_size: 0}]}\n", [],
     ["quant.overrides[1].group_size", "-1"]),
    (MINIMAL + "quant: {default: {wq: mxfp4/32, group_size: 64}}\n", [], ["quant.default", "32", "64"]),
    (MINIMAL + "quant: {overrides: [{pattern: '*.gate'}]}\n", [], ["quant.overrides[0]", "sets no field"]),
    (MINIMAL + "quant: {overrides: [{wq: int4}]}\n", [], ["quant.overrides[0].pattern", "required"]),
    (MINIMAL + "quant: {overrides: [{pattern: a, skip: true, wq: int4}]}\n", [], ["quant.overrides[0]", "skip"]),
    (MINIMAL + "quant: {overrides: [{pattern: a, wq: int4}, {pattern: a, wq: int8}]}\n", [],
     ["quant.overrides[1]", "quant.overrides[0]"]),
    (MINIMAL + "quant: {overrides: {pattern: a}}\n", [], ["quant.overrides", "a list"]),
    (MINIMAL + "gptq: {damp: 2}\n", [], ["gptq.damp"]),
    (MINIMAL + "gptq: {sweep: triton}\n", [], ["gptq.sweep", "'auto'", "'torch'"]),
    (MINIMAL + "calibration: {split: '0.9:0.1'}\n", [], ["calibration.split", "0.9:0.1"]),
    (MINIMAL + "calibration: {num_samples: 0}\n", [], ["calibration.num_samples", "> 0"]),
    ("calibration: {num_samples: 4}\n", [], ["model.path", "required"]),
    (MINIMAL, ["--quant.overrides.3.wq", "int4"], ["--quant.overrides.3.wq", "out of range"]),
    (MINIMAL, ["--calibration.seed"], ["--calibration.seed", "needs a value"]),
    (MINIMAL, ["stray"], ["'stray'"]),
]


@pytest.mark.parametrize("text,argv,words", BAD, ids=range(len(BAD)))
def test_bad_config_names_the_key(tmp_path, text, argv, words):
    with pytest.raises(UserError) as e:
        load_config(write(tmp_path, text), argv)
    msg = str(e.value)
    assert isinstance(e.value, ConfigError)
    assert "\n" not in msg and "Traceback" not in msg
    for w in words:
        assert w in msg, (w, msg)


def test_error_says_where_the_value_came_from(tmp_path):
    p = write(tmp_path, MINIMAL + "calibration: {seq_len: 10}\n")
    with pytest.raises(ConfigError, match=r"command line, --calibration.seq_len"):
        load_config(p, ["--calibration.seq_len", "x"])
    with pytest.raises(ConfigError, match="run.yaml"):
        load_config(write(tmp_path, MINIMAL + "calibration: {seq_len: x}\n"), [])


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml' does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_bad_yaml_names_file_and_line(tmp_path):
    p = write(tmp_path, MINIMAL + "calibration:\n  num_samples: [1, 2\n  seq_len: 3\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert "run.yaml is not valid YAML at line" in str(e.value)


def test_top_level_must_be_a_mapping(tmp_path):
    with pytest.raises(ConfigError, match="mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))


@pytest.mark.parametrize("dtype,explicit,want", [("bfloat16", None, "bfloat16"), ("float32", None, "float16"),
                                                 ("float16", None, "float16"), ("bfloat16", "float16", "float16")])
def test_int_scale_dtype_auto_follows_the_model_dtype(dtype, explicit, want):
    """auto: bfloat16 scales in a bfloat16 model (transformers then reads dense int linears exactly and its
    fused int experts stay bfloat16, which its CUDA forward needs), float16 otherwise; an explicit value wins."""
    argv = ["--model.path", "x", "--model.dtype", dtype] + (["--quant.int_scale_dtype", explicit] if explicit else [])
    assert load_config(None, argv).quant.int_scale_dtype == want
