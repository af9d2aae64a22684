"""Which Hessian each linear of a calibration group feeds, and with which token weights.

A "Hessian key" is shared by linears that read the same input tensor (q/k/v; an expert's
gate/up), so their Hessian is accumulated once and they are solved stacked along rows.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class Source:
    """Where a linear's token weights come from.

    kind: "plain" (every token weight 1), "expert" (routing weight of `expert` in
    MoE block `block`), or "shared" (sigmoid of the block's shared-expert gate).
    """

    kind: str
    block: str | None = None
    expert: int | None = None


def parent_of(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else ""


def hessian_keys(group: list[str], layer: nn.Module) -> dict[str, str]:
    """Map each linear name to its Hessian key: the first linear of the same parent
    module with the same in_features (siblings that read the same input)."""
    keys: dict[str, str] = {}
    first: dict[tuple[str, int], str] = {}
    for name in group:
        cols = layer.get_submodule(name).in_features
        keys[name] = first.setdefault((parent_of(name), cols), name)
    return keys


def weight_sources(group: list[str], blocks) -> dict[str, Source]:
    """Token-weight source of every linear in the group, from the adapter's MoE blocks."""
    sources = {}
    for name in group:
        src = Source("plain")
        for b in blocks:
            for e, prefix in b.expert_prefixes.items():
                if name.startswith(prefix + "."):
                    src = Source("expert", b.name, e)
            if b.shared_expert and name.startswith(b.shared_expert + "."):
                # weighted by its sigmoid gate where the family has one (Qwen2-MoE); DeepSeek's
                # shared experts are added unweighted, so every token counts fully
                src = Source("shared", b.name) if b.shared_gate else Source("plain")
        sources[name] = src
    return sources


def linear_input(module: nn.Module, linear: str, x):
    """The input that `module.<linear>` receives when `module` runs on x (e.g. an expert's
    down_proj input act(gate(x)) * up(x)), captured with a one-off hook."""
    seen = []
    handle = module.get_submodule(linear).register_forward_pre_hook(lambda _m, a: seen.append(a[0]))
    try:
        module(x)
    finally:
        handle.remove()
    return seen[0].reshape(-1, seen[0].shape[-1])
