"""Which checkpoint tensors make up each parameter of a transformers model, learned from transformers itself.

transformers 5 loads checkpoints through a conversion mapping (`transformers.conversion_mapping`): renamings
(Mixtral's `block_sparse_moe` -> `mlp`) and converters that merge per-expert keys
(`mlp.experts.E.gate_proj.weight`, `...up_proj.weight`) into one fused `mlp.experts.gate_up_proj` [E, 2I, H].
Its inverse, `core_model_loading.revert_weight_conversion`, is what `save_pretrained` runs. Running that inverse
on *tagged* tensors -- `[E, R, 1]` float64 whose values are the flat row numbers of the fused parameter --
tells, for every checkpoint key, which rows of which fused parameter it holds. Reading one decoder layer is
then: read its checkpoint keys, scatter their rows into the fused parameters, split those per expert.
Other parameters are only renamed (their meta tensor passes through the inverse unchanged, so its new key is
found by identity). A converter that transposes or reshapes within rows is refused, not guessed.

    plan = layer_plan(hf_model, {"model.layers.3.mlp.experts.gate_up_proj": meta, ...})
    plan.plain["model.layers.3.self_attn.q_proj.weight"]      # -> checkpoint key
    plan.fused["model.layers.3.mlp.experts.gate_up_proj"]     # -> [(checkpoint key, rows [n] long), ...]
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .common.config import UnsupportedModelError


@dataclass
class LayerKeyPlan:
    plain: dict[str, str] = field(default_factory=dict)               # model key -> checkpoint key
    fused: dict[str, list[tuple[str, torch.Tensor]]] = field(default_factory=dict)  # model key -> [(ckpt key, rows)]
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # model key -> shape


def _rows(shape: tuple[int, ...]) -> int:
    """Rows of a tagged tensor: all dims but the last of a 3D weight, every element of a 2D bias."""
    n = 1
    for d in (shape[:-1] if len(shape) == 3 else shape):
        n *= d
    return n


def layer_plan(hf_model, tensors: dict[str, torch.Tensor], fused_keys: set[str]) -> LayerKeyPlan:
    """Checkpoint sources of `tensors` (model key -> meta tensor, as transformers' own model names them).

    fused_keys: keys of 3D expert parameters (and their 2D biases), whose rows may come from several keys.
    Each fused parameter's tag starts where the previous one's ends, so a row number names its owner."""
    from transformers.core_model_loading import revert_weight_conversion

    plan = LayerKeyPlan()
    sd, ident, ranges = {}, {}, {}
    base = 0
    for k, t in tensors.items():
        plan.shapes[k] = tuple(t.shape)
        if k in fused_keys:
            n = _rows(tuple(t.shape))
            shape = (*t.shape[:-1], 1) if t.dim() == 3 else (*t.shape, 1)
            sd[k] = torch.arange(base, base + n, dtype=torch.float64).reshape(shape)
            ranges[k] = (base, base + n)
            base += n
        else:
            sd[k] = torch.empty(t.shape, dtype=t.dtype, device="meta")
            ident[id(sd[k])] = k
    if base >= 2 ** 53:
        raise UnsupportedModelError("a decoder layer's experts have more rows than AlphaQuant's key plan can tag.")
    rows_of: dict[str, list] = {k: [] for k in ranges}
    tagged = {id(sd[k]): k for k in ranges}
    for ckpt_key, t in revert_weight_conversion(hf_model, sd).items():
        if id(t) in ident:
            plan.plain[ident.pop(id(t))] = ckpt_key
            continue
        if id(t) in tagged:                    # a fused parameter stored fused (renamed at most)
            rows_of[tagged[id(t)]].append((ckpt_key, None))
            continue
        if t.dtype != torch.float64 or t.is_meta or t.shape[-1] != 1:
            raise UnsupportedModelError(f"transformers' conversion of {ckpt_key!r} changes it in a way AlphaQuant "
                                        f"cannot read one layer at a time (not a row split of a fused tensor).")
        v = t.reshape(-1).long()
        owner = [k for k, (lo, hi) in ranges.items() if lo <= int(v.min()) and int(v.max()) < hi]
        if len(owner) != 1:
            raise UnsupportedModelError(f"transformers' conversion builds {ckpt_key!r} from several fused "
                                        f"parameters; AlphaQuant cannot read it one layer at a time.")
        rows_of[owner[0]].append((ckpt_key, v - ranges[owner[0]][0]))
    if ident:
        raise UnsupportedModelError(f"transformers' conversion mapping gives no checkpoint key for "
                                    f"{next(iter(ident.values()))!r}.")
    plan.fused = rows_of
    return plan


def assemble(plan: LayerKeyPlan, key: str, read) -> torch.Tensor:
    """Model tensor `key` (a fused expert parameter) from its checkpoint keys; `read(ckpt_key)` -> tensor."""
    shape = plan.shapes[key]
    sources = plan.fused[key]
    if len(sources) == 1 and sources[0][1] is None:
        t = read(sources[0][0])
        if tuple(t.shape) != shape:
            raise UnsupportedModelError(f"{sources[0][0]}: shape {tuple(t.shape)} != {shape} the model needs.")
        return t
    width = shape[-1] if len(shape) == 3 else 1
    rows_total = _rows(shape)
    out = None
    seen = 0
    for ckpt_key, rows in sources:
        t = read(ckpt_key)
        if out is None:
            out = torch.empty((rows_total, width), dtype=t.dtype)
        out[rows] = t.reshape(rows.numel(), width)
        seen += rows.numel()
    if seen != out.shape[0]:
        raise UnsupportedModelError(f"the checkpoint keys for {key!r} cover {seen} of its {out.shape[0]} rows.")
    return out.reshape(shape)
