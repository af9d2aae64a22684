"""The run configuration: one typed dataclass per concern, loaded from YAML + command line.

    cfg = load_config("configs/olmoe.yaml", ["--calibration.num_samples", "16", "--eval.enabled=false"])
    cfg.calibration.num_samples   # 16: the command line wins over the file
    cfg.to_dict()                 # the resolved config, for logging and saving

A minimal YAML (everything else has the defaults below):

    model: {path: allenai/OLMoE-1B-7B-0924}
    quant:
      default: {wq: int4, group_size: 128}
      overrides:                      # in order; a later rule wins for the fields it names
        - {pattern: "*.mlp.experts.*", wq: mxfp4/32}    # "name/G" = wq name + group_size G
        - {pattern: "*.mlp.gate", skip: true}
        - {pattern: lm_head, skip: true}

Every error is a `ConfigError` (a `UserError`) naming the key, e.g.
"quant.overrides[2].group_size must be -1 (one group per row) or > 0; got 0 (in run.yaml)".
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from alphaquant.errors import ConfigError
from alphaquant.config.recipe_file import load_recipe_file
from alphaquant.config.quant import AQ_NAMES, GptqConfig, QuantConfig, QuantOverride, QuantRule, weight_format_names
from alphaquant.config.schema import build, check_key_path, yaml_load

__all__ = ["AQ_NAMES", "CalibrationConfig", "Config", "EvalConfig", "GptqConfig", "LoggingConfig",
           "ModelConfig", "OutputConfig", "QuantConfig", "QuantOverride", "QuantRule", "TrainerConfig",
           "load_config", "parse_overrides", "read_config_file", "weight_format_names"]


def _positive(path: str, **values) -> None:
    for key, v in values.items():
        if v is not None and v <= 0:
            raise ConfigError(f"{path}.{key} must be > 0; got {v}")


INT64 = (-2**63, 2**63 - 1)      # what torch.manual_seed / torch.Generator.manual_seed take without wrapping


def _check_seed(key: str, seed: int) -> None:
    if not INT64[0] <= seed <= INT64[1]:
        raise ConfigError(f"{key} must fit in an int64 ({INT64[0]} .. {INT64[1]}; e.g. 0 or 1234), "
                          f"which is what torch seeds take; got {seed}")


def _check_split(path: str, split: str) -> None:
    from alphaquant.data_sources import parse_split   # lazy: it imports torch
    parse_split(split, key=f"{path}.split")


@dataclass
class ModelConfig:
    path: str = ""                                   # hub id (org/name) or a local directory; required
    dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"   # dtype the unquantized layers run in
    lazy: bool = True                                # stream decoder layers from safetensors one at a time
    tokenizer: str | None = None                     # tokenizer hub id / dir; default: model.path
    # local: AlphaQuant's own code for olmoe / qwen2_moe / mixtral / deepseek_moe; transformers: the generic
    # path over transformers' modeling classes (every other model always takes it; see alphaquant/arch)
    implementation: Literal["local", "transformers"] = "local"

    def check(self, path: str) -> None:
        if not self.path:
            raise ConfigError(f"{path}.path is required: a hub id like 'allenai/OLMoE-1B-7B-0924' "
                              f"or a local model directory")

    @property
    def local_dir(self) -> Path | None:
        """`path` as a local directory, or None for a hub id (whose files are not here before a load)."""
        p = Path(self.path).expanduser()
        return p if p.is_dir() else None


@dataclass
class CalibrationConfig:
    # wikitext2 | c4 | a local .txt / .jsonl file | a token file (.pt / .npy / .bin) | self = windows the model
    # writes itself, steered towards a balanced expert load (MoEQuant's EBSS; alphaquant/data_self.py): needs the
    # whole model in memory (model.lazy: false) and the local code of the four families
    dataset: str = "wikitext2"
    split: str = "train"           # train | validation | test | all | "a:b" fractions ("0:0.9")
    text_field: str = "text"       # the field holding the text in a .jsonl file
    token_dtype: Literal["uint16", "uint32"] = "uint16"   # element type of a raw .bin token file
    num_samples: int = 128         # random windows (GPTQ convention: random start offsets)
    seq_len: int = 2048            # tokens per window
    seed: int = 0                  # seeds the window offsets (torch.Generator)
    batch_size: int = 1            # windows per forward pass
    # routed: a token's input to an expert is weighted by its gate score (MoEQuant AGQ); routed_sq: by its square
    # (the score multiplies the expert's output, so the output error scales with it squared);
    # uniform: every token routed to the expert counts 1; all_experts: every token through every expert
    # default routed_sq: bench/quality.py measured it best on average with act_order + mse (README "Quality")
    hessian: Literal["routed", "routed_sq", "uniform", "all_experts"] = "routed_sq"
    min_tokens_warn: int = 256     # experts that saw fewer calibration tokens are listed in the log
    # where the cached layer inputs/outputs of every sample live between layers (num_samples x seq_len x hidden
    # per stream: 1 GiB for 128 x 2048 OLMoE windows, 2 GiB at Mixtral width): auto | gpu = on the accelerator
    # (fastest); cpu = in pinned host memory, one batch at a time copied to the accelerator and its outputs
    # back (less accelerator memory, a host<->device copy per batch and pass; identical results)
    cache_device: Literal["auto", "gpu", "cpu"] = "auto"
    # true-sequential passes of a layer after its attention linears are solved start from the attention half's
    # output cached by an earlier pass instead of recomputing it (local families; same bits): one calibration
    # cache more, where cache_device says; false = recompute (less memory)
    reuse_attention: bool = True
    # dataset self: where the windows' first tokens come from (same kinds of source as dataset, its split and
    # text_field; seeded random windows); null = every window starts from the BOS token (else EOS)
    self_prompts: str | None = None
    self_prompt_len: int = 1       # dataset self: prompt tokens per window (kept as its first tokens)
    self_temperature: float = 1.0  # dataset self: sampling temperature of the next-token distribution
    # dataset self: weight of the expert-load penalty in a candidate's score (log p + Gumbel noise - balance x
    # overload of its experts); 0 = plain seeded sampling
    self_balance: float = 10.0
    self_candidates: int = 8       # dataset self: candidate next tokens scored per step (Gumbel-top-k draws)

    def check(self, path: str) -> None:
        _positive(path, num_samples=self.num_samples, seq_len=self.seq_len, batch_size=self.batch_size,
                  self_prompt_len=self.self_prompt_len, self_candidates=self.self_candidates)
        if not self.self_temperature > 0:
            raise ConfigError(f"{path}.self_temperature must be > 0; got {self.self_temperature}")
        if not self.self_balance >= 0:
            raise ConfigError(f"{path}.self_balance must be >= 0; got {self.self_balance}")
        if self.dataset == "self" and self.self_prompt_len >= self.seq_len:
            raise ConfigError(f"{path}.self_prompt_len ({self.self_prompt_len}) must be smaller than "
                              f"{path}.seq_len ({self.seq_len})")
        _check_seed(f"{path}.seed", self.seed)
        if self.min_tokens_warn < 0:
            raise ConfigError(f"{path}.min_tokens_warn must be >= 0; got {self.min_tokens_warn}")
        if self.batch_size > self.num_samples:
            raise ConfigError(f"{path}.batch_size ({self.batch_size}) must be <= "
                              f"{path}.num_samples ({self.num_samples})")
        _check_split(path, self.split)


@dataclass
class EvalConfig:
    enabled: bool = True           # perplexity of the quantized model
    before: bool = True            # also the perplexity of the unquantized model, for comparison
    rtn: bool = False              # also round-to-nearest with the same recipe (a baseline for GPTQ)
    # also run GPTQ with these other calibration.hessian modes (not saved) and report their perplexity,
    # e.g. [uniform] to measure what routing-weighted Hessians buy
    compare_hessians: list[Literal["routed", "routed_sq", "uniform", "all_experts"]] = field(default_factory=list)
    dataset: str = "wikitext2"     # same kinds of source as calibration.dataset
    split: str = "test"            # as calibration.split (test = the last 10% of a local file)
    text_field: str = "text"       # the field holding the text in a .jsonl file
    token_dtype: Literal["uint16", "uint32"] = "uint16"   # element type of a raw .bin token file
    seq_len: int = 2048            # non-overlapping windows, remainder dropped (GPTQ convention)
    max_windows: int | None = None  # null = all windows
    batch_size: int = 1            # windows per forward pass

    def check(self, path: str) -> None:
        _positive(path, seq_len=self.seq_len, max_windows=self.max_windows, batch_size=self.batch_size)
        if self.seq_len < 2:      # token t predicts token t+1: a 1-token window has nothing to predict
            raise ConfigError(f"{path}.seq_len must be >= 2 (a window of one token predicts nothing); "
                              f"got {self.seq_len}")
        _check_split(path, self.split)


@dataclass
class TrainerConfig:
    accelerator: Literal["auto", "cpu", "gpu", "cuda"] = "auto"   # Lightning accelerator; auto = a GPU if any
    devices: int | Literal["auto"] = "auto"        # devices per node (DDP when > 1 with strategy ddp)
    strategy: Literal["auto", "ddp", "ddp_spawn", "ddp_fork"] = "auto"   # Lightning strategy
    num_nodes: int = 1                             # machines running the same Trainer

    def check(self, path: str) -> None:
        _positive(path, num_nodes=self.num_nodes,
                  devices=self.devices if isinstance(self.devices, int) else None)


@dataclass
class WandbConfig:
    mode: Literal["offline", "online", "disabled"] = "offline"   # online needs `wandb login`
    project: str = "alphaquant"    # W&B project
    entity: str | None = None      # W&B team or user; null = your default entity
    name: str | None = None        # default: the run name
    dir: str = "logs"              # W&B writes under <dir>/wandb


@dataclass
class CsvConfig:
    enabled: bool = True           # write metrics.csv through Lightning's CSVLogger
    dir: str = "logs"              # metrics.csv under <dir>/<run name>/


@dataclass
class LoggingConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)
    csv: CsvConfig = field(default_factory=CsvConfig)
    log_every_n_steps: int = 1     # Lightning's logging interval (steps of a predict pass)

    def check(self, path: str) -> None:
        _positive(path, log_every_n_steps=self.log_every_n_steps)


@dataclass
class OutputConfig:
    dir: str | None = None         # default: outputs/<run name>; written atomically
    overwrite: bool = False        # replace an existing output dir (else it is an error)
    save: bool = True              # write the quantized checkpoint
    # compressed-tensors: servable (vLLM, transformers); dequantized: plain safetensors of the rounded weights
    format: Literal["compressed-tensors", "dequantized"] = "compressed-tensors"
    # keep each finished layer's solved weights in .<dir name>.resume beside dir; rerunning the same
    # command after a crash continues after the last finished layer (bit-identical result)
    resume: bool = True

    def check(self, path: str) -> None:
        if self.dir is not None and self.dir.strip() == "":
            raise ConfigError(f"{path}.dir is empty; set it to the directory the checkpoint should be written "
                              f"to, or leave it out for outputs/<name>")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    gptq: GptqConfig = field(default_factory=GptqConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    name: str | None = None        # run name; default: last part of model.path
    seed: int = 0                  # global seed (torch, python)

    def check(self, path: str) -> None:
        self.model.check("model")                    # model.path is required even if `model:` is absent
        _check_seed("seed", self.seed)
        self.expand_user_paths()
        if self.name is None:
            self.name = Path(self.model.path.rstrip("/")).name or "run"
        if self.name in ("", ".", "..") or "/" in self.name or "\\" in self.name or "\0" in self.name:
            # the name becomes a directory (outputs/<name>, logs/<name>): "" would be outputs/ itself
            raise ConfigError(f"name must be a run name without '/' (it names outputs/<name> and logs/<name>); "
                              f"got {self.name!r}")
        if self.gptq.asymmetric and self.calibration.hessian == "all_experts":
            raise ConfigError("gptq.asymmetric pairs each expert's fp and quantized inputs over its routed tokens; "
                              "calibration.hessian all_experts has none: use routed, routed_sq or uniform")
        if self.calibration.dataset == "self" and self.model.lazy:
            raise ConfigError("calibration.dataset self generates with the whole model in memory; set model.lazy: false")
        if self.output.dir is None:
            self.output.dir = os.path.join("outputs", self.name)
        if self.quant.int_scale_dtype == "auto":      # int scales in the model's dtype where it is bfloat16
            self.quant.int_scale_dtype = "bfloat16" if self.model.dtype == "bfloat16" else "float16"

    def expand_user_paths(self) -> None:
        """`~` and `~user` in every path key, as a shell would (`model.path: ~/x` is the home's x)."""
        for section, key in PATH_KEYS:
            obj = getattr(self, section) if section else self
            for part in key.split(".")[:-1]:
                obj = getattr(obj, part)
            leaf = key.split(".")[-1]
            value = getattr(obj, leaf)
            if isinstance(value, str) and value.startswith("~"):
                setattr(obj, leaf, os.path.expanduser(value))

    def to_dict(self) -> dict:
        """The resolved config as plain dicts/lists (YAML/JSON serialisable)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict, source: str = "the given dict") -> "Config":
        return build(cls, data, source)


# (section, key) of every config value that is a file or directory path
PATH_KEYS = (("model", "path"), ("model", "tokenizer"), ("calibration", "dataset"), ("calibration", "self_prompts"),
             ("eval", "dataset"),
             ("logging", "wandb.dir"), ("logging", "csv.dir"), ("output", "dir"))


def parse_overrides(argv: list[str]) -> list[tuple[str, str]]:
    """Command-line tokens -> (dotted key, raw value) pairs.

    Accepts `--a.b value`, `--a.b=value` and `a.b=value`; a bool key given alone
    (`--output.overwrite`) means true.

        parse_overrides(["--calibration.num_samples", "16", "--output.overwrite"])
        # [("calibration.num_samples", "16"), ("output.overwrite", "true")]
    """
    pairs, i = [], 0
    while i < len(argv):
        tok = argv[i]
        body = tok[2:] if tok.startswith("--") else tok
        if "=" in body:
            key, value = body.split("=", 1)
            i += 1
        elif tok.startswith("--"):
            key = body
            has_value = i + 1 < len(argv) and not argv[i + 1].startswith("--")
            if has_value:
                value, i = argv[i + 1], i + 2
            elif check_key_path(Config, _split_key(key), tok) is bool:
                value, i = "true", i + 1
            else:
                raise ConfigError(f"option {tok} needs a value, e.g. {tok} VALUE")
        else:
            raise ConfigError(f"unexpected command-line argument {tok!r}; options look like --section.key value")
        pairs.append((key, value))
    return pairs


def _split_key(key: str) -> list[str]:
    # quant.overrides[1].wq and quant.overrides.1.wq are the same key
    return key.replace("[", ".").replace("]", "").split(".")


def _set(data: dict, keys: list[str], value, flag: str) -> None:
    node = data
    for i, key in enumerate(keys):
        last = i == len(keys) - 1
        if isinstance(node, list):
            idx = int(key)
            if idx >= len(node):
                raise ConfigError(f"{flag}: index {idx} is out of range; '{'.'.join(keys[:i])}' has {len(node)} entries")
            key = idx
        elif not isinstance(node, dict):
            raise ConfigError(f"{flag}: '{'.'.join(keys[:i])}' is not a section")
        if last:
            node[key] = value
        else:
            if not isinstance(node, list) and node.get(key) is None:
                if keys[i + 1].isdigit():
                    raise ConfigError(f"{flag}: index {keys[i + 1]} is out of range; "
                                      f"'{'.'.join(keys[:i + 1])}' has no entries")
                node[key] = {}
            node = node[key]


def load_config(path: str | os.PathLike | None, overrides: list[str] = ()) -> Config:
    """Read `path` (YAML), apply command-line `overrides`, validate; raises ConfigError.

    Values on the command line are parsed as YAML (`16` is an int, `null` is None,
    `'[{pattern: lm_head, skip: true}]'` a list); the command line wins over the file.
    Errors say whether the bad value came from the file or from the command line.
    """
    data, label = read_config_file(path) if path is not None else ({}, "the defaults")
    recipes: dict[str, str] = {}                # "quant" -> where the recipe file came from
    if isinstance(data, dict) and isinstance(data.get("quant"), str):     # `quant: FILE`: a recipe file
        recipes["quant"] = f"the recipe file '{data['quant']}' (quant in {label})"
        data["quant"] = load_recipe_file(data["quant"], f"quant in {label}")
    cli: dict[str, str] = {}                    # key path as in messages -> flag
    for key, raw in parse_overrides(list(overrides)):
        flag = f"--{key}"
        keys = _split_key(key)
        check_key_path(Config, keys, flag)
        value = raw if raw == "" else yaml_load(raw, f"the value of {flag}")
        if keys == ["quant"] and isinstance(value, str):     # --quant FILE (what --recipe FILE becomes)
            recipes["quant"] = f"the recipe file '{value}' (the command line)"
            cli.pop("quant", None)
            value = load_recipe_file(value, flag if flag != "--quant" else "--recipe")
        else:
            cli[_message_path(keys)] = flag
        _set(data, keys, value, flag)

    def source(p: str) -> str:
        for k, flag in cli.items():
            if p == k or p.startswith((k + ".", k + "[")):
                return f"the command line, {flag}"
        if "quant" in recipes and (p == "quant" or p.startswith("quant.")):
            return recipes["quant"]
        if any(k.startswith((p + ".", p + "[")) for k in cli):
            return f"{label} + the command line"
        return label

    return build(Config, data, source)


def read_config_file(path: str | os.PathLike) -> tuple[dict, str]:
    """(the YAML mapping in `path`, its label for messages); ConfigError when it is missing or not YAML."""
    p, label = Path(path), str(path)
    if not p.is_file():
        raise ConfigError(f"config file '{path}' does not exist" if not p.exists()
                          else f"config path '{path}' is not a file")
    data = yaml_load(_read_utf8(p, label), label)
    return ({} if data is None else data), label


def _read_utf8(p: Path, label: str) -> str:
    """The config file's text; ConfigError naming the first byte that is not UTF-8 (and its line)."""
    raw = p.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise ConfigError(f"config file '{label}' is not UTF-8 text: byte 0x{raw[e.start]:02x} at line {line} "
                          f"(offset {e.start}) is not valid UTF-8; save the file as UTF-8") from None


def _message_path(keys: list[str]) -> str:
    out = ""
    for k in keys:
        out = f"{out}[{k}]" if k.isdigit() else (f"{out}.{k}" if out else k)
    return out
