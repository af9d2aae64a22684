"""Which Hessian each linear of a calibration group feeds, and with which token weights.

A "Hessian key" is shared by linears that read the same input tensor (q/k/v; an expert's
gate/up), so their Hessian is accumulated once and they are solved stacked along rows. Routed
experts are keyed from the adapter's MoE blocks (their gate/up may not even be hooked); every
other linear from the tensors its forward pre-hook sees on the first batch of a pass, never from
names or widths (with `gptq.true_sequential: false`, o_proj has q_proj's width but not its input).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
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


def expert_keys(group: list[str], blocks) -> dict[str, str]:
    """Hessian keys of the routed-expert linears of the group, from the adapter's MoE blocks: an
    expert's gate and up both read the expert's input (the block-input rows routed to it), so they
    share the key of the first of them in the group; its down reads act(gate)·up and is its own key.

    >>> from alphaquant.arch.base import MoEBlockInfo
    >>> b = MoEBlockInfo("mlp", "mlp.gate", "mlp.router", 1, 1, {0: "mlp.experts.0"})
    >>> expert_keys(["mlp.experts.0.gate_proj", "mlp.experts.0.up_proj", "mlp.experts.0.down_proj"], [b])
    {'mlp.experts.0.gate_proj': 'mlp.experts.0.gate_proj', 'mlp.experts.0.up_proj': 'mlp.experts.0.gate_proj', \
'mlp.experts.0.down_proj': 'mlp.experts.0.down_proj'}
    """
    members = set(group)
    keys: dict[str, str] = {}
    for b in blocks:
        g, u, d = b.proj_names
        for prefix in b.expert_prefixes.values():
            gate_up = [f"{prefix}.{leaf}" for leaf in (g, u) if f"{prefix}.{leaf}" in members]
            for name in gate_up:
                keys[name] = gate_up[0]
            if f"{prefix}.{d}" in members:
                keys[f"{prefix}.{d}"] = f"{prefix}.{d}"
    return {n: keys[n] for n in group if n in keys}


def input_identity(x: torch.Tensor) -> tuple | None:
    """What makes two linears' inputs the same tensor: storage address, shape, strides and dtype
    (host-side metadata, no device sync). None for an empty input, whose address means nothing.
    Only meaningful while the tensors compared are alive (the collector holds them until its flush),
    so a freed input's address cannot be handed to another linear's input in between."""
    if x.numel() == 0:
        return None
    return (x.data_ptr(), tuple(x.shape), tuple(x.stride()), x.dtype, x.device)


def shared_input_keys(names: list[str], seen: list[tuple[str, torch.Tensor]]) -> dict[str, str]:
    """Hessian key of each linear in `names` from the inputs one layer forward gave them: linears whose
    forward pre-hooks saw the same tensor (q/k/v reading one normed hidden state, a dense MLP's gate/up)
    share the key of the first of them in `names`; a linear that saw no input keeps its own key.

    `seen` is (linear name, input) in call order; names not in `names` are ignored.

    >>> x, y = torch.ones(4, 8), torch.ones(4, 8)
    >>> shared_input_keys(["q", "k", "o"], [("q", x), ("k", x), ("o", y)])
    {'q': 'q', 'k': 'q', 'o': 'o'}
    """
    wanted = set(names)
    first: dict[str, tuple | None] = {}
    for name, x in seen:
        if name in wanted and name not in first:
            first[name] = input_identity(x)
    keys: dict[str, str] = {}
    owner: dict[tuple, str] = {}
    for name in names:
        ident = first.get(name)
        keys[name] = name if ident is None else owner.setdefault(ident, name)
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
