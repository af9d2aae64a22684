"""Decoder-layer kwargs for the generic path, produced by the model's own forward.

`LayerKwargs(model)(hidden)` runs the model's trunk on `hidden` (as `inputs_embeds`) with its decoder layers
swapped for recorders, on a shallow copy of the trunk (the real model is never touched, so the prefetch
and write threads may use it meanwhile): the recorders keep what each layer is called with -- rotary
position embeddings, the causal or sliding-window mask of that layer's type, position ids. Each decoder
layer gets a pre-hook (`select_kwargs`) that picks its own entry, so `layer(hidden, **kw)` works for all.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .common.config import UnsupportedModelError


def select_kwargs(i: int):
    def pre(_mod, args, kwargs):
        per_layer = kwargs.pop("aq_per_layer", None)
        if per_layer is None:
            return None
        args = (args[0], *per_layer[i][0]) if args else args
        return args, {**per_layer[i][1], **kwargs}
    return pre


def plain_output(_mod, _args, out):
    return out[0] if isinstance(out, tuple) else out


class _Recorder(nn.Module):
    def __init__(self, i: int, seen: list):
        super().__init__()
        self.i, self.seen = i, seen

    def forward(self, *args, **kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        self.seen[self.i] = (tuple(args[1:]), kwargs, hidden)
        return hidden


class LayerKwargs:
    """Per-layer kwargs from the model's own trunk forward (decoder layers replaced by recorders on a
    shallow copy, so the real model is never touched); cached per (B, S, device, dtype)."""

    def __init__(self, owner):
        self.owner = owner
        self.cache: dict = {}
        self.rotary: dict = {}

    def _trunk(self, device: torch.device, seen: list) -> nn.Module:
        base = self.owner.model
        shadow = copy.copy(base)
        shadow.__dict__ = dict(base.__dict__)
        shadow._modules = dict(base._modules)
        shadow._parameters = {}
        shadow._modules["layers"] = nn.ModuleList(_Recorder(i, seen) for i in range(len(base.layers)))
        shadow._modules["norm"] = nn.Identity()
        shadow._modules["embed_tokens"] = nn.Identity()
        for name, mod in base._modules.items():
            if name not in ("layers", "norm", "embed_tokens") and mod is not None:
                key = (name, device)
                if key not in self.rotary:
                    self.rotary[key] = copy.deepcopy(mod).to(device)
                shadow._modules[name] = self.rotary[key]
        return shadow

    def __call__(self, hidden: torch.Tensor, attention_mask=None) -> list:
        key = (tuple(hidden.shape[:2]), hidden.device, hidden.dtype, attention_mask is None)
        if attention_mask is None and key in self.cache:
            return self.cache[key]
        n = len(self.owner.model.layers)
        seen: list = [None] * n
        with torch.no_grad():
            self._trunk(hidden.device, seen)(inputs_embeds=hidden, attention_mask=attention_mask, use_cache=False)
        if seen[0] is not None and seen[0][2] is not hidden:
            raise UnsupportedModelError(f"{self.owner.config.model_type}: the model transforms its embeddings "
                                        f"before the first decoder layer; AlphaQuant's generic path does not "
                                        f"support that yet.")
        out = [(s[0], s[1]) for s in seen]
        if attention_mask is None:
            self.cache = {key: out}           # one shape at a time (calibration and eval windows alternate)
        return out
