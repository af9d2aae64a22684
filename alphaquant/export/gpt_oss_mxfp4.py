"""GPT-OSS checkpoints in GPT-OSS's own MXFP4 layout, the one transformers (and the gpt-oss kernels) load.

    reason = native_reason("gpt_oss", specs)      # None: this recipe is written in the native layout
    layout = GptOssMxfp4.for_model(model, specs)  # None for any other model / recipe
    tensors = layout.fuse_layer(i, tensors)       # one layer's per-expert compressed tensors -> fused native ones

transformers keeps GPT-OSS's experts fused on disk and has no per-expert conversion for gpt_oss
(conversion_mapping.py has no gpt_oss entry), so a per-expert compressed-tensors checkpoint cannot be
loaded by it (and compressed-tensors only quantizes nn.Linear, which GptOssExperts is not). What it does
load is the layout of openai/gpt-oss-*: `quantization_config = {"quant_method": "mxfp4",
"modules_to_not_convert": [...]}` and, per decoder layer, (transformers/integrations/mxfp4.py,
quantizers/quantizer_mxfp4.py):

    mlp.experts.gate_up_proj_blocks  uint8 [E, 2I, H/32, 16]   rows interleaved: gate row j at 2j, up row j at 2j+1
    mlp.experts.gate_up_proj_scales  uint8 [E, 2I, H/32]       E8M0: 2**(s - 127)
    mlp.experts.gate_up_proj_bias    [E, 2I]                   (interleaved like the rows)
    mlp.experts.down_proj_blocks     uint8 [E, H, I/32, 16]
    mlp.experts.down_proj_scales     uint8 [E, H, I/32]
    mlp.experts.down_proj_bias       [E, H]

Row r of a `[out, in]` weight, block g: 16 bytes of 32 E2M1 codes, element 2k in the low nibble of byte k,
2k+1 in the high one (FP4_VALUES = +0, .5, 1, 1.5, 2, 3, 4, 6, then the same negated). That is exactly
AlphaQuant's mxfp4 storage (formats/mx.py: E2M1 bit patterns sign|exp|mantissa, `pack` low nibble first,
E8M0 codes s + 127), i.e. the mxfp4-pack-quantized tensors `weight_packed [R, C/2]` and `weight_scale [R, C/32]`
the writer makes for every expert, so the native tensors are those bytes regrouped: GPTQ's codes and scales,
nothing re-rounded. transformers dequantizes them on load when the gpt-oss Triton kernels are not there (on
CPU always, `Mxfp4Config(dequantize=True)` anywhere) to `lut[code] * 2**(s-127)` in the parameter dtype:
our weights exactly (E2M1 times a power of two is exact in fp32 and bf16).

The one quantization_config holds one method, so this layout is used only when the recipe is GPT-OSS's own:
every routed expert linear mxfp4 with blocks of 32, weights only, and nothing else quantized (attention,
router, embeddings, head kept as they are). Any other recipe keeps the per-expert compressed-tensors layout
(`alphaquant.export.load_quantized` reads it; compat.py warns that transformers cannot).
"""
from __future__ import annotations

import re

import torch

MODEL_TYPE = "gpt_oss"
LAYOUT = "gpt_oss-mxfp4"                 # quantization_config["alphaquant"]["layout"] of such a checkpoint
LAYOUT_VERSION = 1
BLOCK = 32
# what openai/gpt-oss-20b's config.json lists (transformers only converts GptOssMLP experts anyway)
MODULES_TO_NOT_CONVERT = ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]
PROJS = ("gate_proj", "up_proj", "down_proj")
_EXPERT = re.compile(r"^(?P<block>model\.layers\.(?P<layer>\d+)\..+\.experts)\.(?P<e>\d+)"
                     r"\.(?P<proj>gate_proj|up_proj|down_proj)$")
_UNQUANTIZED_ACT = ("bf16", "fp16", "none")


def _is_mxfp4_32(spec) -> bool:
    from alphaquant.formats import ALIASES
    return (spec.quantized and ALIASES.get(spec.wq, spec.wq) == "mxfp4" and spec.group_size == BLOCK
            and spec.aq in _UNQUANTIZED_ACT)


def native_reason(model_type, specs: dict) -> str | None:
    """None when a checkpoint of this recipe is written in GPT-OSS's MXFP4 layout; else why not (a phrase).

    specs: {linear module name: QuantSpec} as the pipeline resolves them (our module names, experts split:
    `model.layers.N.mlp.experts.E.gate_proj`)."""
    if model_type != MODEL_TYPE:
        return f"model type {model_type!r} is not {MODEL_TYPE}"
    experts = [n for n in specs if _EXPERT.match(n)]
    if not experts:
        return "the model has no routed expert linears"
    not_mx = [n for n in experts if not _is_mxfp4_32(specs[n])]
    if not_mx:
        s = specs[not_mx[0]]
        return f"routed expert {not_mx[0]} is {s.label}, not mxfp4/g32 weights-only"
    others = [n for n, s in specs.items() if s.quantized and not _EXPERT.match(n)]
    if others:
        return f"{others[0]} (not a routed expert) is quantized ({specs[others[0]].label})"
    return None


def quantization_config(specs: dict) -> dict:
    """config.json's quantization_config: transformers' Mxfp4Config fields plus our own block (which
    Mxfp4Config ignores: it takes **kwargs and writes back only its own two fields)."""
    experts = [n for n in specs if _EXPERT.match(n)]
    s = specs[experts[0]]
    return {
        "quant_method": "mxfp4",
        "modules_to_not_convert": list(MODULES_TO_NOT_CONVERT),
        "alphaquant": {"layout": LAYOUT, "layout_version": LAYOUT_VERSION, "standard": True,
                       "groups": {"experts": {"wq": "mxfp4", "group_size": BLOCK, "sym": True, "aq": s.aq,
                                              "act_order": False, "modules": len(experts)}}},
    }


def is_native(qcfg: dict | None) -> bool:
    """A config.json quantization_config written in this layout."""
    return bool(qcfg) and (qcfg.get("alphaquant") or {}).get("layout") == LAYOUT


class GptOssMxfp4:
    """Regroups one decoder layer's per-expert mxfp4-pack-quantized tensors into the native fused ones."""

    def __init__(self, specs: dict):
        self.specs = specs

    @classmethod
    def for_model(cls, model, specs: dict) -> "GptOssMxfp4 | None":
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        return cls(specs) if native_reason(model_type, specs) is None else None

    def quantization_config(self) -> dict:
        return quantization_config(self.specs)

    def fuse_layer(self, i: int, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Layer i's checkpoint tensors with every experts block's per-expert keys
        (`<block>.E.{gate,up,down}_proj.{weight_packed,weight_scale,bias}`) replaced by the native fused
        keys. A new dict; `tensors` is not changed (the resume state keeps the per-expert form)."""
        out: dict[str, torch.Tensor] = {}
        blocks: dict[str, dict[int, dict[str, dict[str, torch.Tensor]]]] = {}
        for key, t in tensors.items():
            owner, _, leaf = key.rpartition(".")
            m = _EXPERT.match(owner)
            if m is None or int(m["layer"]) != i:
                out[key] = t
                continue
            if leaf not in ("weight_packed", "weight_scale", "bias"):
                raise ValueError(f"{key}: GPT-OSS's MXFP4 layout holds no {leaf!r} (act-order groups are not "
                                 f"expressible in it; set gptq.static_groups: true or gptq.act_order: false)")
            blocks.setdefault(m["block"], {}).setdefault(int(m["e"]), {}).setdefault(m["proj"], {})[leaf] = t
        for block, experts in blocks.items():
            out.update(_fuse_block(block, experts))
        return out


def _fuse_block(block: str, experts: dict[int, dict[str, dict[str, torch.Tensor]]]) -> dict[str, torch.Tensor]:
    E = len(experts)
    if sorted(experts) != list(range(E)):
        raise ValueError(f"{block}: experts {sorted(experts)} are not 0..{E - 1}")
    for e, projs in experts.items():
        for p in PROJS:
            if p not in projs or "weight_packed" not in projs[p] or "weight_scale" not in projs[p]:
                raise ValueError(f"{block}.{e}.{p}: no mxfp4 weight_packed / weight_scale to write")

    def rows(e, proj, leaf):
        t = experts[e][proj][leaf]
        if leaf == "weight_packed":                              # [R, C/2] -> [R, C/32, 16]
            return t.reshape(t.shape[0], -1, BLOCK // 2)
        return t

    def interleave(gate, up):                                    # row j of gate -> 2j, of up -> 2j+1
        return torch.stack((gate, up), 1).flatten(0, 1)

    out = {}
    for leaf, name in (("weight_packed", "blocks"), ("weight_scale", "scales")):
        out[f"{block}.gate_up_proj_{name}"] = torch.stack(
            [interleave(rows(e, "gate_proj", leaf), rows(e, "up_proj", leaf)) for e in range(E)])
        out[f"{block}.down_proj_{name}"] = torch.stack([rows(e, "down_proj", leaf) for e in range(E)])
    has_bias = ["bias" in experts[e][p] for e in range(E) for p in PROJS]
    if any(has_bias) and not all(has_bias):
        raise ValueError(f"{block}: some expert linears have a bias and some do not")
    if all(has_bias):
        out[f"{block}.gate_up_proj_bias"] = torch.stack(
            [interleave(experts[e]["gate_proj"]["bias"], experts[e]["up_proj"]["bias"]) for e in range(E)])
        out[f"{block}.down_proj_bias"] = torch.stack([experts[e]["down_proj"]["bias"] for e in range(E)])
    for k, t in out.items():
        if t.dtype != torch.uint8 and not k.endswith("_bias"):
            raise ValueError(f"{k}: expected uint8 mxfp4 bytes / E8M0 scales, got {t.dtype}")
    return {k: t.contiguous() for k, t in out.items()}


class GptOssFusedDense:
    """For the dequantized writer: one layer's per-expert dense tensors fused back as transformers saves
    GPT-OSS (`mlp.experts.gate_up_proj [E, H, 2I]` interleaved, `down_proj [E, I, H]`, biases), the only
    dense layout transformers loads for gpt_oss."""

    def __init__(self, model):
        self.model = model

    @classmethod
    def for_model(cls, model) -> "GptOssFusedDense | None":
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        return cls(model) if model_type == MODEL_TYPE and getattr(model, "experts", None) else None

    def quantization_config(self) -> dict:
        return {}

    def fuse_layer(self, i: int, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = dict(tensors)
        for path, layout in self.model.experts[i].items():
            prefix = f"model.layers.{i}.{path}."
            split = {k[len(prefix):]: out.pop(k) for k in list(out)
                     if k.startswith(prefix) and k[len(prefix):].split(".", 1)[0].isdigit()}
            E = len({k.split(".", 1)[0] for k in split})
            out.update({prefix + name: t.contiguous() for name, t in layout.fuse(split, E).items()})
        return out


# --- reading back ---------------------------------------------------------------------------------
def expert_weights(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Native `[E, R, C/32, 16]` bytes + `[E, R, C/32]` E8M0 codes -> the weights [E, R, C] (float32), decoded
    with AlphaQuant's own mxfp4 format (not transformers' table)."""
    from alphaquant.formats.base import QTensor
    from alphaquant.formats.mx import MXFormat

    fmt = MXFormat("mxfp4", "e2m1", BLOCK)
    E, R, G, B = blocks.shape
    C = G * B * 2
    codes = fmt.unpack(blocks.reshape(-1), (E, R, C))
    p = MXFormat.params_from_e8m0(scales)
    return fmt.dequantize(QTensor(codes, p, (E, R, C), fmt.name))


def split_native(block_key: str, read, has_bias: bool, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """{`<E>.<proj>.weight|bias`: tensor in dtype} of one experts block from its native tensors; read(key)."""
    gu = expert_weights(read(f"{block_key}.gate_up_proj_blocks"), read(f"{block_key}.gate_up_proj_scales"))
    dn = expert_weights(read(f"{block_key}.down_proj_blocks"), read(f"{block_key}.down_proj_scales"))
    out = {}
    for e in range(gu.shape[0]):
        out[f"{e}.gate_proj.weight"], out[f"{e}.up_proj.weight"] = gu[e, 0::2], gu[e, 1::2]
        out[f"{e}.down_proj.weight"] = dn[e]
    if has_bias:
        gb, db = read(f"{block_key}.gate_up_proj_bias"), read(f"{block_key}.down_proj_bias")
        for e in range(gb.shape[0]):
            out[f"{e}.gate_proj.bias"], out[f"{e}.up_proj.bias"] = gb[e, 0::2], gb[e, 1::2]
            out[f"{e}.down_proj.bias"] = db[e]
    return {k: v.to(dtype).contiguous() for k, v in out.items()}


@torch.no_grad()
def decoded_tensors(model, reader, dtype: torch.dtype, skip_lm_head: bool = False):
    """(parameter name, tensor) for every parameter of `model` (models.hf_backend.HFCausalLM on meta) from a
    checkpoint in this layout: experts decoded from their native blocks and scales, the rest read as stored."""
    from alphaquant.models.hf_experts import LinearExperts

    expert_blocks = {n: m for n, m in model.named_modules() if isinstance(m, LinearExperts)}
    done: set[str] = set()
    for name, ex in expert_blocks.items():
        has_bias = ex.expert(0).down_proj.bias is not None
        for k, t in split_native(name, reader.read, has_bias, dtype).items():
            done.add(f"{name}.{k}")
            yield f"{name}.{k}", t
    for key, p in model.named_parameters(remove_duplicate=False):
        if key in done or (skip_lm_head and key == "lm_head.weight"):
            continue
        stored = reader.read(key)
        # what transformers keeps in fp32 (`_keep_in_fp32_modules`) stays as the model holds it
        yield key, stored.to(p.dtype if p.dtype.itemsize > dtype.itemsize and p.dtype.is_floating_point else dtype)


__all__ = ["LAYOUT", "MODULES_TO_NOT_CONVERT", "GptOssFusedDense", "GptOssMxfp4", "decoded_tensors", "expert_weights",
           "is_native", "native_reason", "quantization_config", "split_native"]
