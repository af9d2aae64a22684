"""The quantization recipe: the `quant` config resolved to one `QuantSpec` per linear module.

Rules apply in order: `quant.default` first, then each `quant.overrides[i]` whose `pattern`
(an `fnmatch` glob on the FULL module name) matches; a later rule wins, field by field: an
override changes only the fields it names. Checked here, before any weight is loaded:
every pattern matches some module, every group size divides its module's in_features.

    specs = resolve_recipe(cfg.quant, [("model.layers.0.mlp.experts.0.up_proj", 2048, 1024),
                                       ("model.layers.0.mlp.gate", 2048, 64), ("lm_head", 2048, 50304)])
    specs["model.layers.0.mlp.gate"].skip        # True with a {pattern: "*.mlp.gate", skip: true} rule
    format_counts(specs)                          # {"mxfp4/g32": 1, "skip": 2}
    for row in plan_table(specs): print(row)      # layer/expert indices collapsed to '*'

Block sizes: a rule naming MX / NVFP4 / fp8_e4m3 without a group size gets the format's own block
(32 / 16 / per row, quant_config.STANDARD_BLOCK); integer formats keep the module's group size. A
non-standard block for one of those formats is refused unless `quant.nonstandard_blocks: true`.

Glob notes: `*.mlp.gate` matches `model.layers.3.mlp.gate` but not `...mlp.gate_proj`;
`*` also crosses dots, so `*.experts.*` matches every expert projection of every layer.
"""
from __future__ import annotations

import difflib
import math
import re
from collections import Counter
from dataclasses import dataclass
from fnmatch import fnmatchcase

from alphaquant.errors import ConfigError
from alphaquant.config.quant import (INT_DEFAULT_GROUP, RULE_FIELDS, STANDARD_BLOCK, QuantConfig, QuantOverride,
                                     QuantRule, check_group_size, split_wq)

IDENTITY_FORMATS = ("bf16", "fp16")        # weights kept as they are: no groups, no GPTQ


@dataclass(frozen=True)
class QuantSpec:
    """What one linear module becomes."""

    wq: str                                # weight format name ("int4", "mxfp4", ...)
    group_size: int                        # elements per scale along in_features; -1 = per row
    sym: bool
    aq: str                                # activation format ("bf16" / "none" = unquantized)
    skip: bool                             # keep the original weights
    rule: str = "quant.default"            # the last rule that changed a field of this module
    shape: tuple[int, int] = (0, 0)        # (out_features, in_features) of the weight
    scale_dtype: str = "float16"           # integer formats: dtype their scales are rounded to

    @property
    def quantized(self) -> bool:
        return not self.skip and self.wq not in IDENTITY_FORMATS

    @property
    def label(self) -> str:
        """Short name for counts and tables: "skip", "bf16", "int4/g128", "int4/g128-asym"."""
        if self.skip:
            return "skip"
        if self.wq in IDENTITY_FORMATS:
            return self.wq
        out = f"{self.wq}/g{self.group_size}" if self.group_size != -1 else f"{self.wq}/row"
        if not self.sym and self.wq.startswith("int"):
            out += "-asym"
        return out if self.aq in ("bf16", "fp16", "none") else f"{out}+a{self.aq}"


def _default_fields(rule: QuantRule) -> dict:
    wq, g = split_wq(rule.wq, rule.group_size, "quant.default")   # accepts rules built in code
    g = STANDARD_BLOCK.get(wq, INT_DEFAULT_GROUP) if g is None else g
    check_group_size("quant.default", g)
    return {"wq": wq, "aq": rule.aq, "group_size": g, "sym": rule.sym, "skip": rule.skip}


def _override_fields(o: QuantOverride, path: str) -> dict:
    if not o.pattern:
        raise ConfigError(f"{path}.pattern is required: a glob on module names such as '*.mlp.experts.*'")
    o = QuantOverride(**{k: getattr(o, k) for k in ("pattern",) + RULE_FIELDS})
    o.check(path)                                                   # empty / conflicting rules
    fields = o.fields_set()
    if "wq" in fields and "group_size" not in fields and fields["wq"] in STANDARD_BLOCK:
        fields["group_size"] = STANDARD_BLOCK[fields["wq"]]        # the format's block, never inherited
    return fields


def resolve_recipe(quant_cfg: QuantConfig, modules: list[tuple[str, int, int]]) -> dict[str, QuantSpec]:
    """{module name: QuantSpec} for `modules` = [(name, in_features, out_features), ...]."""
    names = [m[0] for m in modules]
    base = _default_fields(quant_cfg.default)
    fields = {n: dict(base) for n in names}
    set_by = {n: dict.fromkeys(RULE_FIELDS, "quant.default") for n in names}
    last = dict.fromkeys(names, "quant.default")
    for i, o in enumerate(quant_cfg.overrides):
        path = f"quant.overrides[{i}]"
        changes = _override_fields(o, path)
        hits = [n for n in names if fnmatchcase(n, o.pattern)]
        if not hits:
            near = difflib.get_close_matches(o.pattern, names, n=2, cutoff=0.0)
            raise ConfigError(f"{path}.pattern {o.pattern!r} matches no module; names look like "
                              f"{', '.join(map(repr, near))} (globs match the full name)")
        label = f"{path} ({o.pattern!r})"
        for n in hits:
            fields[n].update(changes)
            set_by[n].update(dict.fromkeys(changes, label))
            last[n] = label
    specs = {}
    for name, in_f, out_f in modules:
        spec = QuantSpec(**fields[name], rule=last[name], shape=(out_f, in_f),
                         scale_dtype=_int_scale_dtype(quant_cfg))
        g = spec.group_size
        if spec.quantized and g != -1 and in_f % g:
            src = set_by[name]["group_size"]
            raise ConfigError(f"group_size {g} (set by {src}) does not divide in_features {in_f} of "
                              f"module {name!r}; use a divisor of {in_f} or -1 (one group per row)")
        if spec.quantized and not getattr(quant_cfg, "nonstandard_blocks", False):
            _check_standard_block(spec, name, set_by[name])
        specs[name] = spec
    check_formats(specs)
    if getattr(quant_cfg, "budget_bits", None) is not None:
        check_budget_specs(quant_cfg, specs)
    return specs


def _block_text(g: int) -> str:
    return "one scale per row (group_size -1)" if g == -1 else f"blocks of {g}"


def _check_standard_block(spec: QuantSpec, name: str, set_by: dict) -> None:
    """A fixed-block format with another block size has no compressed-tensors layout: refuse it."""
    std = STANDARD_BLOCK.get(spec.wq)
    if std is None or spec.group_size == std:
        return
    raise ConfigError(
        f"{spec.wq} with group_size {spec.group_size} (set by {set_by['group_size']}) for module {name!r} is not "
        f"a block size that compressed-tensors readers (transformers, vLLM) support: {spec.wq} uses "
        f"{_block_text(std)}. Use wq: {spec.wq}"
        f"{'' if std == -1 else f'/{std}'} (or leave group_size out), or set quant.nonstandard_blocks: true to write "
        f"such modules in the alphaquant-packed layout, which only alphaquant.export.load_quantized reads")


def build_format(spec: QuantSpec):
    """The `alphaquant.formats` Format of `spec`, or None for a skipped/bf16/fp16 module."""
    if not spec.quantized:
        return None
    from alphaquant.formats import get_format        # lazy: formats is a heavier layer
    if spec.wq.startswith("int"):                     # only integer formats have a zero point
        return get_format(spec.wq, group_size=spec.group_size, sym=spec.sym, scale_dtype=spec.scale_dtype)
    return get_format(spec.wq, group_size=spec.group_size)


def check_formats(specs: dict[str, QuantSpec]) -> None:
    """Build each distinct format once so a bad option fails now, naming the rule that set it."""
    try:
        from alphaquant.formats.base import FormatError
        import alphaquant.formats as formats
        formats.get_format                            # noqa: B018 - absent while formats is being written
    except (ImportError, AttributeError):
        return                                        # TODO(lead): drop once alphaquant.formats exists
    seen = set()
    for name, spec in specs.items():
        key = (spec.wq, spec.group_size, spec.sym, spec.scale_dtype)
        if not spec.quantized or key in seen:
            continue
        seen.add(key)
        try:
            build_format(spec)
        except (FormatError, ValueError) as e:
            raise ConfigError(f"module {name!r} (rule {spec.rule}): {e}") from None


# --- plan printout and size estimates ----------------------------------------------------
_INDEX = re.compile(r"(?<=\.)\d+(?=\.|$)")


def _elem_bits(wq: str) -> int:
    if wq in IDENTITY_FORMATS:
        return 16
    m = re.match(r"int(\d)$", wq)
    if m:
        return int(m.group(1))
    return 4 if "fp4" in wq else 6 if "fp6" in wq else 8


def _scale_bits(wq: str) -> int:
    # int: fp16 scale; MX: E8M0 exponent; NVFP4: FP8 block scale; fp8_e4m3: fp32 scale
    return 16 if wq.startswith("int") else 8 if wq.startswith(("mx", "nv")) else 32


def weight_bits(spec: QuantSpec, orig_bits: int = 16) -> int:
    """Bits of the stored weight of one module: elements x bits + per-group scales (+ zeros)."""
    out_f, in_f = spec.shape
    n = out_f * in_f
    if not spec.quantized:
        return n * (orig_bits if spec.skip else 16)
    groups = out_f * (1 if spec.group_size == -1 else in_f // spec.group_size)
    e = _elem_bits(spec.wq)
    per_group = _scale_bits(spec.wq) + (e if spec.wq.startswith("int") and not spec.sym else 0)
    tensor = 32 if spec.wq == "nvfp4" else 0              # NVFP4's fp32 per-tensor scale
    return n * e + groups * per_group + tensor


def weight_bytes(spec: QuantSpec, orig_bits: int = 16) -> int:
    """Bytes of the stored weight of one module: elements x bits + per-group scales (+ zeros)."""
    return math.ceil(weight_bits(spec, orig_bits) / 8)


def bits_per_weight(spec: QuantSpec) -> float:
    """Average stored bits per element of a module, scale/zero overhead included: int3/g64 3.25,
    int4/g128 4.125, mxfp4 4.25, nvfp4 4.5 (+ the per-tensor scale), fp8_e4m3 per row 8 + 32/in."""
    n = spec.shape[0] * spec.shape[1]
    return weight_bits(spec) / n if n else 0.0


def average_bits(specs: dict[str, QuantSpec]) -> float:
    """Average bits per weight over the quantized modules of `specs` (the unit of quant.budget_bits)."""
    q = [s for s in specs.values() if s.quantized]
    n = sum(s.shape[0] * s.shape[1] for s in q)
    return sum(weight_bits(s) for s in q) / n if n else 0.0


def candidate_specs(spec: QuantSpec, candidates, nonstandard_blocks: bool = False,
                    name: str = "") -> list[QuantSpec]:
    """The specs quant.budget_candidates offer a module whose rule gives `spec`: "int3" keeps the
    module's group size (and sym), "mxfp4" its standard block, "int3/64" that group size."""
    from dataclasses import replace
    out = []
    for i, c in enumerate(candidates):
        wq, g = split_wq(c, None, f"quant.budget_candidates[{i}]")
        if g is None:
            g = STANDARD_BLOCK.get(wq, spec.group_size)
        cand = replace(spec, wq=wq, group_size=g, rule=BUDGET_RULE)
        in_f = spec.shape[1]
        if g != -1 and in_f and in_f % g:
            raise ConfigError(f"quant.budget_candidates[{i}] {c!r}: group size {g} does not divide in_features "
                              f"{in_f} of module {name!r}; give that candidate a divisor, e.g. '{wq}/32'")
        if not nonstandard_blocks:
            _check_standard_block(cand, name, {"group_size": f"quant.budget_candidates[{i}]"})
        out.append(cand)
    return out


BUDGET_RULE = "quant.budget_bits"


def check_budget_specs(quant_cfg: QuantConfig, specs: dict[str, QuantSpec]) -> None:
    """quant.budget_bits is reachable: every quantized module has candidates (checked) and the budget is at
    least the cheapest candidate of the module where that is dearest (so every layer can meet it)."""
    budget = getattr(quant_cfg, "budget_bits", None)
    if budget is None:
        return
    worst, where = 0.0, ""
    for name, spec in specs.items():
        if not spec.quantized:
            continue
        cands = candidate_specs(spec, quant_cfg.budget_candidates, quant_cfg.nonstandard_blocks, name)
        cheapest = min(bits_per_weight(c) for c in cands)
        if cheapest > worst:
            worst, where = cheapest, name
    if budget < worst - 1e-9:
        raise ConfigError(f"quant.budget_bits {budget} is below {worst:.4g} bits per weight, the cheapest of "
                          f"quant.budget_candidates for module {where!r} (scales included); raise the budget or "
                          f"add a cheaper candidate")


def estimate_memory(specs: dict[str, QuantSpec], orig_bits: int = 16) -> dict:
    """{"quantized_bytes", "original_bytes", "ratio", "by_label": {label: bytes}}."""
    by_label: Counter = Counter()
    for s in specs.values():
        by_label[s.label] += weight_bytes(s, orig_bits)
    orig = sum(math.ceil(s.shape[0] * s.shape[1] * orig_bits / 8) for s in specs.values())
    total = sum(by_label.values())
    return {"quantized_bytes": total, "original_bytes": orig,
            "ratio": total / orig if orig else 1.0, "by_label": dict(by_label)}


def format_counts(specs: dict[str, QuantSpec]) -> dict[str, int]:
    """{label: number of modules}, most common first."""
    return dict(Counter(s.label for s in specs.values()).most_common())


def plan_table(specs: dict[str, QuantSpec]) -> list[dict]:
    """One row per (name with layer/expert indices as '*', spec), in first-seen order."""
    rows: dict[tuple, dict] = {}
    for name, s in specs.items():
        key = (_INDEX.sub("*", name), s.label, s.aq, s.rule, s.shape)
        row = rows.get(key)
        if row is None:
            row = rows[key] = {"modules": key[0], "count": 0, "format": s.label, "aq": s.aq,
                               "shape": s.shape, "rule": s.rule, "bytes": 0}
        row["count"] += 1
        row["bytes"] += weight_bytes(s)
    return list(rows.values())


def render_plan(rows: list[dict]) -> str:
    """Plain-text table of `plan_table` rows for --dry-run."""
    head = ("modules", "count", "format", "aq", "shape", "MiB", "rule")
    body = [(r["modules"], str(r["count"]), r["format"], r["aq"], "x".join(map(str, r["shape"])),
             f"{r['bytes'] / 2**20:.2f}", r["rule"]) for r in rows]
    widths = [max(len(c) for c in col) for col in zip(head, *body)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in (head, *body))


def _int_scale_dtype(quant_cfg) -> str:
    """quant.int_scale_dtype; "auto" is resolved against model.dtype by Config.check, and means float16
    for a QuantConfig used on its own."""
    sd = getattr(quant_cfg, "int_scale_dtype", "float16")
    return "float16" if sd == "auto" else sd
