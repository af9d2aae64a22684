"""The `quantization_config` block of config.json, built from the recipe, and its inverse.

One config group per distinct (wq, group_size, sym, aq, act-order) among quantized modules;
each group names its modules with `re:` regexes where a regex matches exactly that group's
modules (e.g. every expert's gate_proj of every layer) and with explicit names otherwise:

    quantization_config(specs)["config_groups"]["group_0"]["targets"]
    # ['re:model\\.layers\\.\\d+\\.mlp\\.experts\\.\\d+\\.(gate_proj)$', ...]

Regexes matter beyond size: transformers finds the MoE experts' scheme by a `re:` target that
mentions "experts" (integrations/compressed_tensors.get_experts_scheme). compressed-tensors
matches `re:` targets with re.match (anchored at the start only), hence the trailing `$`.
Unquantized linears (skip, bf16/fp16) go to `ignore`. Our own exact format of each group is
kept under the extra key "alphaquant" (compressed-tensors' QuantizationConfig ignores it).
"""
from __future__ import annotations

import re

from .compressed import AQ_PACKED, Layout, layout_of

LAYOUT_VERSION = 1
_NUM = re.compile(r"(?<=\.)\d+(?=\.|$)")


def _pattern(name: str, last_only: bool) -> str:
    """Regex for `name` with its numeric parts (layer/expert indices) generalised to \\d+."""
    parts = _NUM.split(name)
    nums = _NUM.findall(name)
    out = re.escape(parts[0])
    for i, (num, rest) in enumerate(zip(nums, parts[1:])):
        keep = last_only and i < len(nums) - 1
        out += (num if keep else r"\d+") + re.escape(rest)
    return out + "$"


_EXPERT = re.compile(r"(?P<block>.+)\.experts\.\d+\.(?P<proj>[^.]+)$")
# transformers 5 renames a few MoE blocks when it fuses their experts (conversion_mapping.py)
_FUSED_BLOCK = {"block_sparse_moe": "mlp"}


def _expert_pattern(block_pat: str, block: str, projs: list[str]) -> str:
    """One regex for the per-expert projections `projs` of every expert of the blocks `block_pat`
    matches, which ALSO matches the fused experts module transformers builds in their place
    (`model.layers.3.mlp.experts`, a 3D-parameter module): compressed-tensors warns about every
    target that matches no module of the model it is given ("Could not match ..."), and in
    transformers' model the per-expert linears do not exist. The fused module is not an nn.Linear,
    so compressed-tensors attaches nothing to it; transformers still finds the experts' scheme by
    the "experts" in the target."""
    leaf = block.rsplit(".", 1)[-1]
    head, _, _ = block_pat.rpartition(re.escape(leaf))
    proj = rf"\.\d+\.(?:{'|'.join(map(re.escape, projs))})"          # \.E\.(gate_proj|up_proj)
    fused = _FUSED_BLOCK.get(leaf)
    if fused is None:                                  # model\.layers\.\d+\.mlp\.experts(\.E\.proj)?$
        return rf"{block_pat}\.experts(?:{proj})?$"
    return rf"{head}(?:{re.escape(leaf)}\.experts{proj}|{re.escape(fused)}\.experts)$"


def _expert_targets(names: list[str], universe: list[str]) -> tuple[list[str], list[str]]:
    """(regexes, names they do not cover): per MoE block pattern, one regex for its experts' projections
    of this group, kept only where it matches exactly these names among the linears of `universe`."""
    chosen, covered, allowed = [], set(), set(names)
    for block_regex in (lambda b: _pattern(b, False)[:-1], re.escape):   # every layer's block, then one block
        by_block: dict[tuple, list[str]] = {}
        for n in names:
            m = _EXPERT.match(n)
            if m and n not in covered:
                projs = by_block.setdefault((block_regex(m["block"]), m["block"]), [])
                if m["proj"] not in projs:
                    projs.append(m["proj"])
        for (block_pat, block), projs in by_block.items():
            pat = _expert_pattern(block_pat, block, projs)
            hits = {u for u in universe if re.match(pat, u)}
            if hits and hits <= allowed and not hits & covered:
                chosen.append("re:" + pat)
                covered |= hits
    return chosen, [n for n in names if n not in covered]


def compress_targets(names: list[str], universe: list[str]) -> list[str]:
    """`re:` patterns matching exactly `names` within `universe`, plus explicit leftovers.

    Routed experts get one regex per MoE block pattern (see _expert_pattern), the rest one per
    module kind with its layer/expert indices generalised."""
    experts, remaining = _expert_targets(names, universe)
    chosen, allowed = list(experts), set(names)
    for last_only in (False, True):                      # all indices, then the expert index only
        for pat in dict.fromkeys(_pattern(n, last_only) for n in remaining):
            rx = re.compile(pat)
            hits = {u for u in universe if rx.match(u)}
            if hits and hits <= allowed and hits & set(remaining):
                chosen.append("re:" + pat)
                remaining = [n for n in remaining if n not in hits]
    return chosen + remaining


def group_key(spec, act_order: bool) -> tuple:
    is_int = spec.wq.startswith("int")
    return (spec.wq, spec.group_size, spec.sym if is_int else True, spec.aq,
            spec.scale_dtype if is_int else None, act_order)


def quantization_config(specs: dict, act_order_modules=()) -> dict:
    """The config.json `quantization_config` for {module name: QuantSpec}.

    act_order_modules: names whose weights are stored with a non-trivial weight_g_idx.
    """
    act = set(act_order_modules)
    universe = list(specs)
    groups: dict[tuple, list[str]] = {}
    for name, spec in specs.items():
        if spec.quantized:
            groups.setdefault(group_key(spec, name in act), []).append(name)
    config_groups, ours, formats = {}, {}, []
    for i, (key, names) in enumerate(groups.items()):
        spec = specs[names[0]]
        lay: Layout = layout_of(spec, act_order=key[-1])
        gname = f"group_{i}"
        config_groups[gname] = {"targets": compress_targets(names, universe), "weights": lay.weights,
                                "input_activations": None, "output_activations": None, "format": lay.format}
        ours[gname] = {"wq": spec.wq, "group_size": spec.group_size, "sym": spec.sym, "aq": spec.aq,
                       "act_order": key[-1], "modules": len(names)}
        if spec.wq.startswith("int"):
            ours[gname]["scale_dtype"] = spec.scale_dtype
        formats.append(lay.format)
    ignore = [n for n, s in specs.items() if not s.quantized]
    distinct = list(dict.fromkeys(formats))
    return {
        "quant_method": "compressed-tensors",
        "format": distinct[0] if len(distinct) == 1 else ("mixed-precision" if distinct else "dense"),
        "quantization_status": "compressed",
        "config_groups": config_groups,
        "ignore": compress_targets(ignore, universe),
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
        "alphaquant": {"layout_version": LAYOUT_VERSION, "groups": ours,
                       "standard": AQ_PACKED not in distinct},
    }


def module_groups(qcfg: dict, names: list[str]) -> dict[str, str]:
    """{module name: config group name} for the quantized modules among `names` (first match wins)."""
    out = {}
    ignore = qcfg.get("ignore") or []
    for gname, group in qcfg["config_groups"].items():
        for n in names:
            if n not in out and _matches(n, group["targets"]) and not _matches(n, ignore):
                out[n] = gname
    return out


def _matches(name: str, targets: list[str]) -> bool:
    return any(re.match(t[3:], name) if t.startswith("re:") else t == name for t in targets)
