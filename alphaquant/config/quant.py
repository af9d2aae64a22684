"""The `quant` and `gptq` sections of the config: what each module becomes, and solver knobs.

    quant:
      default: {wq: int4, group_size: 128, sym: true, aq: bf16}
      overrides:                                   # applied in order: a later rule wins,
        - {pattern: "*.mlp.experts.*", wq: mxfp4/32}   # field by field (it sets only what it names)
        - {pattern: "*.mlp.experts.*.down_proj", group_size: 64}
        - {pattern: "*.mlp.gate", skip: true}
    gptq: {block_size: 128, damp: 0.01, act_order: true, scale_search: mse}

`wq: NAME/G` is shorthand for `wq: NAME, group_size: G`. `group_size: -1` means one scale per
output row (per channel). Patterns are `fnmatch` globs on full module names; `alphaquant.config.recipe`
resolves them against the model's modules.

Block sizes: a rule that names a format with a block size fixed by its spec and no group size
gets that block (MX formats 32, NVFP4 16, fp8_e4m3 one scale per row: STANDARD_BLOCK); integer
formats keep the group size the module has (128 from quant.default unless a rule changed it).
Any other block for those formats has no compressed-tensors layout: it is refused unless
`quant.nonstandard_blocks: true`, which writes those modules in the alphaquant-packed layout
(only alphaquant.export.load_quantized reads it).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from alphaquant.errors import ConfigError
from alphaquant.config.schema import closest

# TODO(lead): alphaquant.formats exports FORMAT_NAMES; this copy is used only until it does.
_WQ_FALLBACK = ("int2", "int3", "int4", "int5", "int6", "int7", "int8",
                "mxfp4", "mxfp6", "mxfp6_e2m3", "mxfp6_e3m2", "mxfp8", "mxfp8_e4m3", "mxfp8_e5m2",
                "mxint8", "nvfp4", "fp8_e4m3", "bf16", "fp16")

# activation formats: bf16/fp16/none = activations are not quantized; the rest per token
AQ_NAMES = ("bf16", "fp16", "none", "fp8_e4m3", "mxfp8", "mxfp6", "mxfp4", "int8")
AqName = Literal["bf16", "fp16", "none", "fp8_e4m3", "mxfp8", "mxfp6", "mxfp4", "int8"]
RULE_FIELDS = ("wq", "aq", "group_size", "sym", "skip")

# The block every reader of compressed-tensors checkpoints knows for these formats (OCP MX v1.0:
# 32; NVFP4: 16; FP8 E4M3: per channel). Formats not listed (int*) take any group size.
STANDARD_BLOCK = {"mxfp4": 32, "mxfp6": 32, "mxfp6_e2m3": 32, "mxfp6_e3m2": 32, "mxfp8": 32, "mxfp8_e4m3": 32,
                  "mxfp8_e5m2": 32, "mxint8": 32, "nvfp4": 16, "fp8_e4m3": -1}
INT_DEFAULT_GROUP = 128


def weight_format_names() -> tuple[str, ...]:
    """The weight format names `alphaquant.formats.get_format` accepts."""
    try:
        from alphaquant.formats import FORMAT_NAMES
    except ImportError:
        return _WQ_FALLBACK
    return tuple(FORMAT_NAMES)


def split_wq(wq: str, group_size: int | None, path: str) -> tuple[str, int | None]:
    """"mxfp4/32" -> ("mxfp4", 32); checks the name and a clash with an explicit group_size."""
    name, sep, group = wq.partition("/")
    names = weight_format_names()
    if name not in names:
        raise ConfigError(f"{path}.wq must be one of {', '.join(names)} (optionally NAME/GROUP, "
                          f"e.g. 'mxfp4/32'); got {wq!r}{closest(name, names)}")
    if not sep:
        return name, group_size
    try:
        g = int(group)
    except ValueError:
        raise ConfigError(f"{path}.wq {wq!r}: the part after '/' must be a group size such as 32") from None
    if group_size is not None and group_size != g:
        raise ConfigError(f"{path}.wq {wq!r} says group size {g} but {path}.group_size is {group_size}; "
                          f"give one of them")
    return name, g


def check_group_size(path: str, group_size: int | None) -> None:
    if group_size is not None and not (group_size == -1 or group_size > 0):
        raise ConfigError(f"{path}.group_size must be -1 (one group per row) or > 0; got {group_size}")


@dataclass
class QuantRule:
    """`quant.default`: the spec of every module no override touches."""

    wq: str = "int4"               # weight format (see weight_format_names) or NAME/GROUP
    aq: AqName = "bf16"            # activation format
    group_size: int | None = None  # elements per scale; -1 = per row; null = the format's block (128 for int)
    sym: bool = True               # symmetric (no zero point); only integer formats have a choice
    skip: bool = False             # keep the module's original weights

    def check(self, path: str) -> None:
        self.wq, g = split_wq(self.wq, self.group_size, path)
        self.group_size = STANDARD_BLOCK.get(self.wq, INT_DEFAULT_GROUP) if g is None else g
        check_group_size(path, self.group_size)


@dataclass
class QuantOverride:
    """One entry of `quant.overrides`: a glob and the fields it sets (null = inherit)."""

    pattern: str = ""              # fnmatch glob on full module names, e.g. "*.mlp.experts.*"; required
    wq: str | None = None          # weight format or NAME/GROUP; null = inherit
    aq: AqName | None = None       # activation format; null = inherit
    group_size: int | None = None  # elements per scale, -1 = per row; null = inherit (or the format's block)
    sym: bool | None = None        # symmetric integer grid; null = inherit
    skip: bool | None = None       # true: keep the module's original weights; null = inherit

    def fields_set(self) -> dict:
        """The rule fields this override names: {"wq": "mxfp4", "group_size": 32}."""
        return {k: getattr(self, k) for k in RULE_FIELDS if getattr(self, k) is not None}

    def check(self, path: str) -> None:
        if not self.pattern:
            raise ConfigError(f"{path}.pattern is required: a glob on module names such as '*.mlp.experts.*'")
        if self.wq is not None:
            self.wq, self.group_size = split_wq(self.wq, self.group_size, path)
        check_group_size(path, self.group_size)
        set_ = self.fields_set()
        if not set_:
            raise ConfigError(f"{path} (pattern {self.pattern!r}) sets no field; give at least one of "
                              f"{', '.join(RULE_FIELDS)}")
        if self.skip and len(set_) > 1:
            others = ", ".join(k for k in set_ if k != "skip")
            raise ConfigError(f"{path} (pattern {self.pattern!r}) sets skip: true and also {others}; "
                              f"a skipped module keeps its original weights, so drop {others}")


@dataclass
class QuantConfig:
    default: QuantRule = field(default_factory=QuantRule)
    overrides: list[QuantOverride] = field(default_factory=list)   # in order; later rules win
    # true: accept MX blocks other than 32, NVFP4 other than 16, grouped fp8_e4m3; such modules are
    # written alphaquant-packed (no compressed-tensors layout exists: transformers and vLLM refuse them)
    nonstandard_blocks: bool = False
    # dtype integer formats round their scales to. auto: bfloat16 in a bfloat16 model (what llm-compressor
    # writes; transformers allocates dense scales in the model dtype and decompresses fused experts to the
    # scales' dtype, so float16 scales there are rounded for dense linears and give float32 experts, whose
    # CUDA forward fails in a bfloat16 model), else float16 (GPTQ checkpoints' choice, lossless for them)
    int_scale_dtype: Literal["auto", "float16", "bfloat16", "float32"] = "auto"
    # average bits per weight (scales/zeros included) over the modules the recipe quantizes; set: GPTQ
    # solves every module with each of budget_candidates and keeps, per module (each expert linear), the
    # choice of least total routing-weighted output error within the budget, per decoder layer
    # (alphaquant/gptq/budget.py); null = every module gets its rule's format
    budget_bits: float | None = None
    # formats budget_bits chooses from: NAME (the module's group size; MX/NVFP4 their block) or NAME/GROUP
    budget_candidates: list[str] = field(default_factory=lambda: ["int2", "int3", "int4", "int8"])

    def __post_init__(self):
        if self.default.group_size is None:          # built in code, not from YAML
            self.default.check("quant.default")

    def check(self, path: str) -> None:
        if self.budget_bits is not None:
            check_budget(self, path)
        seen: dict[str, int] = {}
        for i, o in enumerate(self.overrides):
            if o.pattern in seen:
                raise ConfigError(f"{path}.overrides[{i}] repeats the pattern {o.pattern!r} of "
                                  f"{path}.overrides[{seen[o.pattern]}]; merge the two rules")
            seen[o.pattern] = i


def check_budget(q: "QuantConfig", path: str) -> None:
    """quant.budget_bits / budget_candidates: a positive budget, at least two distinct known formats."""
    b = q.budget_bits
    if isinstance(b, bool) or not isinstance(b, (int, float)) or not 0 < b <= 32:
        raise ConfigError(f"{path}.budget_bits must be average bits per weight between 0 and 32 (e.g. 3.5), "
                          f"or null; got {b!r}")
    if not isinstance(q.budget_candidates, list) or len(q.budget_candidates) < 2:
        raise ConfigError(f"{path}.budget_candidates must list two or more weight formats (e.g. [int2, int3, "
                          f"int4, int8]); got {q.budget_candidates!r}")
    seen = set()
    for i, c in enumerate(q.budget_candidates):
        if not isinstance(c, str):
            raise ConfigError(f"{path}.budget_candidates[{i}] must be a format name such as 'int3' or 'int4/64'; got {c!r}")
        name, g = split_wq(c, None, f"{path}.budget_candidates[{i}]")
        if name in ("bf16", "fp16"):
            raise ConfigError(f"{path}.budget_candidates[{i}] {c!r} is not a quantized format; list only "
                              f"quantized ones (a module to keep unquantized takes a skip rule)")
        check_group_size(f"{path}.budget_candidates[{i}]", g)
        if (name, g) in seen:
            raise ConfigError(f"{path}.budget_candidates[{i}] repeats {c!r}")
        seen.add((name, g))


@dataclass
class GptqConfig:
    block_size: int = 128          # columns per lazy-batch block
    damp: float = 0.01             # H += damp * mean(diag H) * I
    # act_order + scale_search mse are the defaults because bench/quality.py measured them best on average
    # (README "Quality"): with static groups act_order costs nothing at inference
    act_order: bool = True         # columns in descending diag(H) order
    static_groups: bool = True     # with act_order: group scales fixed from the original W
    true_sequential: bool = True   # q/k/v, then o, then gate/up, then down, each on quantized inputs
    sweep: Literal["auto", "torch"] = "auto"   # column sweep: auto = fused Triton kernel where it applies
    # group params: none = from each group's extremes; mse = range shrunk to the least rounding error
    # (gptq/scale_search.py); mse_hdiag = that error weighted per column by diag(H)
    scale_search: Literal["none", "mse", "mse_hdiag"] = "mse"
    # GPTAQ: solve toward the fp layer's outputs on the fp model's inputs (alphaquant/gptq/gptaq.py) instead of
    # on the quantized model's own inputs; keeps a second calibration cache (fp inputs: 2x that memory) and an
    # fp copy of the layer being calibrated; not with calibration.hessian all_experts. It lowered the perplexity gap
    # in every bench/quality.py format (W3 g64: 0.43x -> 0.17x llm-compressor's) but doubled the end-to-end time and
    # added 4.5 GiB on OLMoE-1B-7B shapes on one H200 (README "Quality"): off by default for that cost
    asymmetric: bool = False
    # experts of a bucket (stacks of one shape and format) per GPTQ solve call: the solve's Hessian-sized
    # temporaries scale with it (callbacks/solve.py). 0 = all at once (fastest); N = N at a time (less GPU
    # memory, e.g. 1 or 2 for Mixtral-8x7B's down_proj on a 24 GB GPU); auto = all at once unless the GPU's
    # free memory at the solve is short, then the largest chunk that fits (all on CPU). The same weights bit for
    # bit on CPU; on a GPU up to float32 rounding (batched kernels may pick others for another batch size)
    expert_chunk: int | Literal["auto"] = "auto"

    def check(self, path: str) -> None:
        if isinstance(self.expert_chunk, int) and self.expert_chunk < 0:
            raise ConfigError(f"{path}.expert_chunk must be auto, 0 (all experts of a bucket in one solve) or a "
                              f"positive number of experts per solve; got {self.expert_chunk}")
        if self.block_size <= 0:
            raise ConfigError(f"{path}.block_size must be > 0; got {self.block_size}")
        if not 0.0 <= self.damp <= 1.0:
            raise ConfigError(f"{path}.damp must be between 0 and 1 (0.01 is usual); got {self.damp}")
