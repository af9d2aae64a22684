"""The generic adapter: any decoder-only causal LM transformers builds (`generic_moe` | `standard`).

The model is `models.hf_backend.HFCausalLM`: transformers' own classes, built on the meta device, one
decoder layer's weights read at a time through transformers' own checkpoint key conversion, and every
experts-interface module split into per-expert linears with a `route` hook point
(`models.hf_experts.LinearExperts`, whose docstring says why). So this adapter only has to answer the
structural questions, and answers them from the layer itself, with no per-family code:

* MoE blocks: each `LinearExperts` is one (its input is exactly what the experts receive, its `route`
  hook sees the routing exactly as applied). In the module that holds it: a direct `nn.Linear` child (or a
  child holding one) with `num_experts` outputs is the router linear, a `nn.Linear` child with one output
  is a shared-expert gate (its sigmoid weights the shared expert, as in Qwen2-MoE / Qwen3-Next), any
  other child with linears is a shared expert (ordinary linears, unweighted unless there is such a gate).
  Routers as transformers writes most of them (`*TopKRouter` with a bare `weight` parameter) are no
  `nn.Linear` at all, so they are never quantized.
* True-sequential groups: the layer is run once on a two-token input (on the meta device when its weights
  are not loaded) under a `TorchFunctionMode` that gives every tensor a depth: the largest depth of the
  tensors it is computed from, plus one after each `nn.Linear`. A linear's level is the depth of its input,
  and the groups are the levels in order -- `[[q, k, v], [o], [gate/up of every expert and shared expert,
  dense gate/up], [every down]]` for Llama / Qwen3-MoE, `[[q_a, kv_a], [q_b, kv_b], [o], ...]` for
  DeepSeek-V3's MLA -- each group depending only on earlier ones. (Experts run densely in that trace.)
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakTensorKeyDictionary

from alphaquant.models.common.config import UnsupportedModelError
from alphaquant.models.hf_experts import LinearExperts

from .base import ArchAdapter, MoEBlockInfo


class GenericAdapter(ArchAdapter):
    family = "generic"           # the instance says generic_moe or standard
    model_types = ()

    def __init__(self, model):
        self.model = model
        self.family = model.family
        self._groups: dict[tuple, list[list[str]]] = {}

    @classmethod
    def matches(cls, model_type) -> bool:
        return False             # chosen by get_adapter for HFCausalLM models, never by model_type

    # --- weights -----------------------------------------------------------------------------
    def read_layer(self, model, i: int, pin_memory: bool = False):
        if any(p.is_meta for p in model.model.layers[i].parameters()):
            return model.read_layer(i, pin_memory=pin_memory)
        return None

    def place_layer(self, model, tensors, device):
        """transformers' layers are placed by install_layer itself (the host tensors are returned as they are)."""
        return tensors

    def install_layer(self, model, i: int, tensors, device=None):
        if tensors is None:
            layer = model.model.layers[i]
            return layer.to(device) if device is not None else layer
        return model.install_layer(i, tensors, device)

    def unload_layer(self, model, i: int) -> None:
        if getattr(model, "lazy", False):
            model.unload_layer(i)

    # --- structure ---------------------------------------------------------------------------
    def moe_blocks(self, layer: nn.Module) -> list[MoEBlockInfo]:
        blocks = []
        top_k = int(getattr(self.model.config, "num_experts_per_tok", 0) or 0)
        for path, ex in layer.named_modules():
            if not isinstance(ex, LinearExperts):
                continue
            owner_name, _, leaf = path.rpartition(".")
            owner = layer.get_submodule(owner_name) if owner_name else layer
            join = (lambda n: f"{owner_name}.{n}") if owner_name else (lambda n: n)
            E = ex.num_experts
            router = shared = gate = None
            for name, child in owner.named_children():
                if name == leaf:
                    continue
                lins = [(n, m) for n, m in child.named_modules() if isinstance(m, nn.Linear)]
                if isinstance(child, nn.Linear) and child.out_features == 1:
                    gate = join(name)
                elif lins and len(lins) == 1 and lins[0][1].out_features == E:
                    router = join(name if not lins[0][0] else f"{name}.{lins[0][0]}")
                elif lins and shared is None:
                    shared = join(name)
            g = "gate_proj" if hasattr(ex.expert(0), "gate_proj") else "up_proj"
            blocks.append(MoEBlockInfo(
                name=path, gate_name=router or "", router_name=f"{path}.route", num_experts=E, top_k=top_k,
                expert_prefixes={e: f"{path}.{e}" for e in range(E)}, proj_names=(g, "up_proj", "down_proj"),
                shared_expert=shared, shared_gate=gate, shared_gate_act_name=None))
        return blocks

    def skip_modules(self, model) -> list[str]:
        names = ["lm_head"]
        for i, layer in enumerate(self.decoder_layers(model)):
            for b in self.moe_blocks(layer):
                names += [f"model.layers.{i}.{n}" for n in (b.gate_name, b.shared_gate) if n]
        return names

    def sequential_groups(self, layer: nn.Module) -> list[list[str]]:
        linears = [n for n, m in layer.named_modules() if isinstance(m, nn.Linear)]
        key = (type(layer).__qualname__, tuple(linears))
        if key not in self._groups:
            self._groups[key] = self._trace_groups(layer)
        return [list(g) for g in self._groups[key]]

    def _trace_groups(self, layer: nn.Module) -> list[list[str]]:
        kept = set()
        for b in self.moe_blocks(layer):
            kept.update(n for n in (b.gate_name, b.shared_gate) if n)
        levels = trace_levels(layer, self._trace_inputs(layer))
        by_level: dict[int, list[str]] = {}
        order = [n for n, m in layer.named_modules() if isinstance(m, nn.Linear)]   # registration order
        for name in order:
            if name in levels and name not in kept:
                by_level.setdefault(levels[name], []).append(name)
        missing = [n for n in order if n not in levels and n not in kept]
        if missing:
            raise UnsupportedModelError(f"{missing[0]} is never called in a forward of its decoder layer; "
                                        f"AlphaQuant cannot place it in a calibration group.")
        return [by_level[k] for k in sorted(by_level)]

    def _trace_inputs(self, layer: nn.Module):
        """(hidden (1, 2, H), kwargs) on the layer's device (meta when its weights are not loaded)."""
        p = next(layer.parameters())
        H = self.model.config.hidden_size
        hidden = torch.zeros(1, 2, H, dtype=p.dtype, device="cpu" if p.is_meta else p.device)
        kw = self.model.layer_kwargs(hidden)
        if p.is_meta:
            hidden = hidden.to("meta")
            kw = _to_device(kw, torch.device("meta"))
        return hidden, kw


def _to_device(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_device(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    return obj


class _DepthMode(TorchFunctionMode):
    """Every tensor a torch function returns gets the largest depth among its tensor inputs."""

    def __init__(self, depth: WeakTensorKeyDictionary):
        super().__init__()
        self.depth = depth

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        d = max((self.depth.get(t, 0) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)), default=0)
        if d:
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    self.depth[t] = max(self.depth.get(t, 0), d)
        return out


@torch.no_grad()
def trace_levels(layer: nn.Module, inputs) -> dict[str, int]:
    """Linear name -> level (the number of linears on the longest path from the layer input to it)."""
    hidden, kwargs = inputs
    depth = WeakTensorKeyDictionary()
    levels: dict[str, int] = {}
    handles = []
    experts = [m for m in layer.modules() if isinstance(m, LinearExperts)]

    def pre(name: str) -> Callable:
        def hook(_m, args):
            levels.setdefault(name, max((depth.get(a, 0) for a in args if isinstance(a, torch.Tensor)), default=0))
        return hook

    def post(name: str) -> Callable:
        def hook(_m, _args, out):
            for t in tree_leaves(out):          # a router subclassing nn.Linear may return (weights, ids)
                if isinstance(t, torch.Tensor):
                    depth[t] = levels[name] + 1
        return hook

    for name, m in layer.named_modules():
        if isinstance(m, nn.Linear):
            handles += [m.register_forward_pre_hook(pre(name)), m.register_forward_hook(post(name))]
    for ex in experts:
        ex.trace_dense = True
    try:
        with _DepthMode(depth):
            layer(hidden, **kwargs)
    except Exception as e:      # noqa: BLE001 - a layer that cannot run on a dummy input
        raise UnsupportedModelError(f"AlphaQuant could not trace the structure of {type(layer).__name__} "
                                    f"({type(e).__name__}: {str(e).splitlines()[0][:160]}).") from None
    finally:
        for ex in experts:
            ex.trace_dense = False
        for h in handles:
            h.remove()
    return levels
