"""Which readers get a written checkpoint right: one warning line per known problem, for the run's end.

    for line in serving_warnings(json.load(open("out/config.json"))):
        print("warning:", line)

Every layout we label compressed-tensors decompresses with the compressed-tensors package to our
weights bit for bit (tests/test_export_layouts.py); that is the arithmetic vLLM uses too. The
problems below are transformers' (its MoE integration decompresses fused experts with a reduced
module, integrations/compressed_tensors.py: CompressedTensorsDequantize) and compressed-tensors'
(its meta-device compress leaves asymmetric zero points unpacked; FP4/FP6/MXFP8 decompress to
bfloat16). They were found with TESTED below and are checked, one by one, by
tests/test_export_transformers.py, which fails when a new version fixes one (then drop it here).
GPT-OSS: only its own MXFP4 layout loads in transformers (export/gpt_oss_mxfp4.py, tests/test_generic_gpt_oss_serving.py).
"""
from __future__ import annotations

import re

TESTED = "transformers 5.24.0 + compressed-tensors 0.20.1"
READERS_OK = ("compressed-tensors' own decompression (the arithmetic vLLM uses) and alphaquant.export.load_quantized "
              "read it correctly")

_FP_BF16 = ("mxfp4-pack-quantized", "mxfp6-pack-quantized", "nvfp4-pack-quantized", "mxfp8-quantized")
_NO_HF_CLASS = {"deepseek": "DeepSeek-MoE (v1, model_type 'deepseek')"}


def covers_routed_experts(targets: list[str]) -> bool:
    """A group's targets name routed experts (`...experts.E.proj`, not shared experts): the groups
    transformers' get_experts_scheme chooses from."""
    return any(re.search(r"(?:^|[.:]|\\\.)experts(?:\\\.|\.|\(|$)", t) for t in targets)


def _label(group: dict, ours: dict) -> str:
    g = ours.get("group_size")
    block = "per row" if g == -1 else f"g{g}"
    asym = "" if ours.get("sym", True) or not str(ours.get("wq", "")).startswith("int") else " asym"
    return f"{ours.get('wq', '?')}/{block}{asym} ({group.get('format')})"


GPT_OSS_PER_EXPERT = (f"GPT-OSS experts written per expert in the compressed-tensors layout: {TESTED} cannot load that "
                      f"for gpt_oss (transformers has no per-expert conversion for gpt_oss and compressed-tensors no "
                      f"scheme for its fused 3D experts: from_pretrained reports mlp.experts.gate_up_proj/down_proj "
                      f"missing and leaves them random); quantize only the routed experts, to mxfp4/32 (everything "
                      f"else unquantized), for GPT-OSS's own MXFP4 layout, which transformers loads; "
                      f"alphaquant.export.load_quantized reads this one exactly")


def plan_warnings(model_type, specs: dict, output_format: str = "compressed-tensors") -> list[str]:
    """Warning lines for a planned run (--dry-run: no checkpoint yet), from the model type and the resolved
    {module: QuantSpec}; today only the GPT-OSS layout line, with the reason its native layout does not apply."""
    from .gpt_oss_mxfp4 import MODEL_TYPE, native_reason
    if model_type != MODEL_TYPE or output_format != "compressed-tensors" or not any(
            s.quantized for s in specs.values()):
        return []
    why = native_reason(model_type, specs)
    return [] if why is None else [f"{GPT_OSS_PER_EXPERT} (not GPT-OSS's layout here: {why})"]


def serving_warnings(config: dict) -> list[str]:
    """Warning lines (no prefix, one sentence each) for a checkpoint's config.json dict; [] when
    transformers, vLLM and our reader all read it as written."""
    qcfg = config.get("quantization_config") or {}
    groups = qcfg.get("config_groups") or {}
    ours = (qcfg.get("alphaquant") or {}).get("groups", {})
    out: list[str] = []
    model_type = config.get("model_type")
    if model_type == "gpt_oss" and qcfg.get("quant_method") == "compressed-tensors" and groups:
        # transformers does not load it at all, so its per-format problems below do not apply
        packed = [n for n, g in groups.items() if g.get("format") == "alphaquant-packed"]
        return [GPT_OSS_PER_EXPERT] + [f"{_label(groups[n], ours.get(n, {}))}: written in the alphaquant-packed "
                                       f"layout, which vLLM refuses too" for n in packed]
    if model_type in _NO_HF_CLASS:
        out.append(f"{_NO_HF_CLASS[model_type]} has no transformers class ({TESTED}): "
                   f"AutoModelForCausalLM cannot build it; {READERS_OK}")
    experts = [n for n, g in groups.items() if covers_routed_experts(g.get("targets", []))]
    dtype = str(config.get("dtype") or config.get("torch_dtype") or "")
    for name, g in groups.items():
        fmt, w = g.get("format"), g.get("weights") or {}
        label = _label(g, ours.get(name, {}))
        if fmt == "alphaquant-packed":
            out.append(f"{label}: written in the alphaquant-packed layout, which transformers and vLLM refuse; "
                       f"only alphaquant.export.load_quantized reads it")
            continue
        is_experts = name in experts
        dense = any(not covers_routed_experts([t]) for t in g.get("targets", []))
        if is_experts and fmt == "nvfp4-pack-quantized":
            out.append(f"{label} experts: {TESTED} load them WRONG without an error (its fused-experts "
                       f"decompression drops weight_global_scale, so every expert weight comes out multiplied "
                       f"by it); {READERS_OK}")
        if is_experts and fmt == "mxfp8-quantized":
            out.append(f"{label} experts: {TESTED} fail to load them (the fused-experts path reads the E8M0 "
                       f"scales as FP8 multipliers); {READERS_OK}")
        if fmt == "pack-quantized" and w.get("symmetric") is False:
            out.append(f"{label}: {TESTED} fail to load asymmetric int (zero points of experts are dropped, "
                       f"dense ones allocated unpacked); {READERS_OK}")
        sd = ours.get(name, {}).get("scale_dtype", "float16")
        if is_experts and fmt == "pack-quantized" and {dtype, sd} == {"bfloat16", "float16"}:
            out.append(f"{label} experts: {TESTED} decompress fused experts with {sd} scales in a {dtype} model to "
                       f"float32, and on CUDA their batched experts forward then fails ('expected scalar type Float "
                       f"but found BFloat16', measured on an H200); set quant.int_scale_dtype: {dtype} (the auto "
                       f"default does), or load in float32; {READERS_OK}")
        lossy = (dtype == "bfloat16" and sd != "bfloat16") or (dtype == "float16" and sd == "float32")
        if dense and fmt == "pack-quantized" and lossy:
            out.append(f"{label} dense linears: transformers allocates their scales in the model dtype ({dtype}) and "
                       f"rounds our {sd} scales to it, so its weights differ from ours (up to 2^-9 relative per "
                       f"group); set quant.int_scale_dtype: {dtype} to be read exactly; {READERS_OK}")
        if is_experts and fmt in _FP_BF16 and dtype != "bfloat16":
            out.append(f"{label} experts: {TESTED} decompress fused FP experts to bfloat16 in a {dtype} model, and on "
                       f"CUDA their batched experts forward then fails with a dtype error (its CPU grouped_mm path "
                       f"runs); load with dtype=torch.bfloat16; {READERS_OK}")
        if dense and fmt in _FP_BF16 and dtype != "bfloat16":
            out.append(f"{label} dense linears: {TESTED} decompress them to bfloat16 and the {dtype} model's "
                       f"forward fails with a dtype error; load with dtype=torch.bfloat16; {READERS_OK}")
    if len(experts) > 1:
        out.append(f"routed experts in {len(experts)} formats ({', '.join(_label(groups[n], ours.get(n, {})) for n in experts)}): "
                   f"{TESTED} decompress all experts with the first group's scheme (fails or loads wrong); "
                   f"{READERS_OK}")
    routers = [t for g in groups.values() for t in g.get("targets", [])
               if re.search(r"(?:\\\.|\.)gate\$?$", t) and "gate_proj" not in t]
    if routers:
        out.append(f"quantized router(s) {', '.join(routers[:2])}: transformers builds routers that compressed-tensors "
                   f"does not decompress (their weights come out missing, re-initialized); keep routers unquantized "
                   f"(skip: true) for transformers; alphaquant.export.load_quantized reads them")
    return out
