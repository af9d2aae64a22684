"""Hessian collection for one true-sequential group of a decoder layer.

on_predict_start attaches hooks (linear inputs, router outputs, shared-expert gates, MoE
block inputs); every layer forward ends with one flush that turns the buffered inputs into
Hessian updates, because only then are all token weights known (Qwen2-MoE computes its
shared-expert gate after the shared expert). on_predict_end removes every hook and sums the
Hessians and token counts across DDP ranks: one all_reduce per Hessian in a fixed order on
every rank, never inside a per-batch hook (ranks can have uneven batch counts).

Modes (config `calibration.hessian`):
  routed       H_e = Σ_t c_t x_t x_tᵀ over the tokens routed to expert e, c = routing weight
               (MoEQuant AGQ); the Qwen2-MoE shared expert weighted by sigmoid(shared gate).
  uniform      the routed tokens, each with weight 1 (plain GPTQ on an MoE).
  all_experts  every token through every expert, weight 1 (llm-compressor's default);
               outputs stay routed, only the Hessians see all tokens.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback

from alphaquant.gptq import HessianState
from alphaquant.routing import expert_token_weights
from callbacks.hooks import Source, hessian_keys, linear_input, weight_sources

MODES = ("routed", "uniform", "all_experts")


class HessianCollector(Callback):
    def __init__(self, adapter, mode: str = "routed"):
        if mode not in MODES:
            raise ValueError(f"calibration.hessian must be one of {MODES}, got {mode!r}")
        self.adapter, self.mode = adapter, mode
        self.states: dict[str, HessianState] = {}
        self.keys: dict[str, str] = {}
        self.routed_tokens: dict[str, torch.Tensor] = {}   # block -> [num_experts] tokens this group
        self._handles, self._inputs, self._routing, self._gates, self._block_in = [], [], {}, {}, {}

    # -- lifecycle ------------------------------------------------------------------------
    def on_predict_start(self, trainer, runner):
        if runner.plan.phase != "collect":
            return
        layer, group = runner.block, runner.plan.group
        self.blocks = self.adapter.moe_blocks(layer)
        self.keys = hessian_keys(group, layer)
        self.sources = weight_sources(group, self.blocks)
        self.states = {k: HessianState.zeros(layer.get_submodule(k).in_features, device=runner.device)
                       for k in dict.fromkeys(self.keys.values())}
        self.routed_tokens = {b.name: torch.zeros(b.num_experts, dtype=torch.long, device=runner.device)
                              for b in self.blocks}
        for name in group:
            self._hook_input(layer, name)
        for b in self.blocks:
            self._hook_routing(layer, b)
        self._handles.append(layer.register_forward_hook(lambda *_: self._flush(layer)))

    def on_predict_end(self, trainer, runner):
        if runner.plan.phase != "collect":
            return
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            for key in sorted(self.states):
                st = self.states[key]
                for t in (st.H, st.n_tokens, st.weight_sum):
                    dist.all_reduce(t)
            for name in sorted(self.routed_tokens):
                dist.all_reduce(self.routed_tokens[name])

    # -- hooks ------------------------------------------------------------------------------
    def _hook_input(self, layer, name):
        def pre(_mod, args):
            x = args[0]
            self._inputs.append((name, x.reshape(-1, x.shape[-1])))
        self._handles.append(layer.get_submodule(name).register_forward_pre_hook(pre))

    def _hook_routing(self, layer, b):
        def routed(_mod, _args, out):
            self._routing[b.name] = (out[0].reshape(-1, out[0].shape[-1]), out[1].reshape(-1, out[1].shape[-1]))
        self._handles.append(layer.get_submodule(b.router_name).register_forward_hook(routed))
        if b.shared_gate:
            def gate(_mod, _args, out):
                self._gates[b.name] = torch.sigmoid(out.float()).reshape(-1)
            self._handles.append(layer.get_submodule(b.shared_gate).register_forward_hook(gate))
        if self.mode == "all_experts":
            def block_in(_mod, args):
                self._block_in[b.name] = args[0].reshape(-1, args[0].shape[-1])
            self._handles.append(layer.get_submodule(b.name).register_forward_pre_hook(block_in))

    # -- accumulation -----------------------------------------------------------------------
    def _flush(self, layer):
        """Turn the buffered inputs of one layer forward into Hessian updates."""
        inputs, self._inputs = self._inputs, []
        for b in self.blocks:
            ids = self._routing.get(b.name)
            if ids is not None:
                self.routed_tokens[b.name] += torch.bincount(ids[0].reshape(-1), minlength=b.num_experts)
        seen: dict[str, int] = {}
        for name, x in inputs:
            key, src = self.keys[name], self.sources[name]
            if self.mode == "all_experts" and src.kind == "expert":
                continue          # fed below from the block input, all tokens
            ptr = x.data_ptr()
            if key in seen:
                if seen[key] != ptr:
                    raise RuntimeError(f"{name} and {key} were assumed to share an input but did not")
                continue
            seen[key] = ptr
            self.states[key].add(x, self._token_weights(name, src, x.shape[0]))
        if self.mode == "all_experts":
            self._flush_all_experts(layer)
            self._inputs.clear()      # the expert re-runs above re-fired the routed input hooks
        self._routing.clear(), self._gates.clear(), self._block_in.clear()

    def _token_weights(self, name, src: Source, rows: int):
        if self.mode != "routed" or src.kind == "plain":
            return None
        if src.kind == "shared":
            return self._gates[src.block]
        ids, w = self._routing[src.block]
        tokens, c = expert_token_weights(ids, w, src.expert)
        if tokens.numel() != rows:
            raise RuntimeError(f"{name} saw {rows} tokens but its router sent {tokens.numel()}")
        return c

    def _flush_all_experts(self, layer):
        """Every token through every expert of the group (Hessians only; outputs unused)."""
        for b in self.blocks:
            x = self._block_in[b.name]                                   # [T, H]
            for e, prefix in b.expert_prefixes.items():
                names = [n for n in self.keys if n.startswith(prefix + ".")]
                if not names:
                    continue
                for key in dict.fromkeys(self.keys[n] for n in names):
                    self.states[key].add(linear_input(layer.get_submodule(prefix), key[len(prefix) + 1:], x))
