"""Hessian collection for one true-sequential group of a decoder layer.

on_predict_start attaches hooks (linear inputs, router outputs, shared-expert gates, MoE
block inputs); every layer forward ends with one flush that turns the buffered inputs into
Hessian updates, because only then are all token weights known (Qwen2-MoE computes its
shared-expert gate after the shared expert). on_predict_end removes every hook and sums the
Hessians and token counts across DDP ranks: one all_reduce per Hessian in a fixed order on
every rank, never inside a per-batch hook (ranks can have uneven batch counts).

Routed experts without per-expert hooks: an expert's gate/up read the block input at its routed tokens, so
their Hessians come from the block input and the routing without hooking (or, with early stop, even running)
the experts; its down_proj reads act(gate)·up, which a local family's block (models/common/moe.py) hands out for
all experts at once through the parameter-free hook point `<block>.expert_act` on its grouped experts path, rows
sorted by expert as RoutePlan sorts them. Either way the Hessians are those the per-expert hooks would give
(bit for bit on CPU), and no expert linear carries a collector hook, so the block can run its experts as
grouped matmuls. Per-expert pre-hooks remain where that does not hold (activation-quantization hooks on an
expert linear, the generic path's experts, a block whose grouped path is blocked, all_experts).

Linears that read the same tensor share one Hessian ("key", see callbacks/hooks.py): routed
experts' gate/up by the adapter's MoE blocks, every other linear by the tensor its pre-hook saw
on the first batch of the first pass with its group (compared on every later batch).

Modes (config `calibration.hessian`):
  routed       H_e = Σ_t c_t x_t x_tᵀ over the tokens routed to expert e, c = routing weight
               (MoEQuant AGQ); the Qwen2-MoE shared expert weighted by sigmoid(shared gate).
  routed_sq    the same with c_t²: c_t multiplies the expert's output, so the output error the
               expert's quantization causes on token t, and with it the layer loss, scales with c_t².
  uniform      the routed tokens, each with weight 1 (plain GPTQ on an MoE).
  all_experts  every token through every expert, weight 1 (llm-compressor's default);
               outputs stay routed, only the Hessians see all tokens.

gptq.asymmetric (GPTAQ, alphaquant/gptq/gptaq.py): beside each Hessian H = Σ c x̃ x̃ᵀ of the quantized
model's inputs x̃, the cross sum P = Σ c (x − x̃) x̃ᵀ with x the input the same linear sees in the fp model
for the same token: the runner runs the layer's unquantized copy (plan.fp_block) on the fp model's layer
inputs (plan.fp_stream) just before the layer, and hooks on it keep the inputs of the group's non-expert
linears and of each MoE block. Routed experts: both x and x̃ over the tokens the QUANTIZED model routes to
the expert, with its routing weights (the tokens and weights of H); an expert's fp gate/up input is the fp
block input at those tokens, its fp down input the fp expert's act(gate)·up there. Shared experts: every
token, weighted by the quantized model's shared gate. Not with all_experts (no routed tokens to pair).
"""
from __future__ import annotations

import time

import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback

from alphaquant.gptq import HessianState
from alphaquant.gptq.gptaq import accumulate_cross, accumulate_cross_segments, asymmetric_target
from alphaquant.gptq.hessian import accumulate_hessian_fast, accumulate_segments
from alphaquant.routing import RoutePlan, expert_token_weights
from alphaquant.callbacks.hooks import Source, expert_keys, input_identity, linear_input, shared_input_keys, weight_sources

MODES = ("routed", "routed_sq", "uniform", "all_experts")
WEIGHT_POWER = {"routed": 1, "routed_sq": 2}      # modes that weight tokens: the power of the routing weight


class StopForward(Exception):
    """Raised by a collect-pass hook once the layer forward has produced every input the group needs."""


class HessianCollector(Callback):
    def __init__(self, adapter, mode: str = "routed", asymmetric: bool = False):
        if mode not in MODES:
            raise ValueError(f"calibration.hessian must be one of {MODES}, got {mode!r}")
        if asymmetric and mode == "all_experts":      # refused for users by Config.check, before any weight
            raise ValueError("asymmetric needs routed tokens to pair; mode all_experts has none")
        self.adapter, self.mode, self.asymmetric = adapter, mode, asymmetric
        self.cross: dict[str, torch.Tensor] = {}   # gptq.asymmetric: Hessian key -> raw Σ c (x_fp − x̃) x̃ᵀ
        self._cross_big: dict[tuple, torch.Tensor] = {}   # (block, leaf) -> [E, C, C], rows are cross's views
        self._fp_in: dict[str, torch.Tensor] = {}  # this batch's fp-layer inputs: linear / MoE block -> [T, C]
        self._fp_layer = None
        self.states: dict[str, HessianState] = {}
        self.keys: dict[str, str] = {}
        self.routed_tokens: dict[str, torch.Tensor] = {}   # block -> [num_experts] tokens this group
        self._handles, self._inputs, self._routing, self._gates, self._block_in = [], [], {}, {}, {}
        self._acts: dict[str, torch.Tensor] = {}     # block -> this forward's expert_act rows [T*k, I]
        self.layer_seconds: dict[int, float] = {}   # layer index -> Hessian-update seconds (the walker pops them)
        self._timer = None
        self.early_stop = True       # stop each collect forward once the group's inputs exist
        # (layer class, group) -> the group input a forward makes last: learned on the first batch of
        # the first layer that has the group, then reused (the same modules run in the same order), so
        # later layers never run a whole forward just to learn where to stop
        self._stop_names: dict[tuple, str] = {}
        # (layer class, group) -> Hessian keys of its non-expert linears, from the tensors their pre-hooks
        # saw on the first batch of the first pass with that group (see _resolve_keys); reused likewise
        self._input_keys: dict[tuple, dict[str, str]] = {}
        self._pending: list[str] = []    # linears whose keys the first flush of this pass decides
        self._learning = False           # this pass decides keys (no earlier pass had its group)

    # -- lifecycle ------------------------------------------------------------------------
    def on_predict_start(self, trainer, runner):
        if runner.plan.phase != "collect":
            return
        layer, group = runner.block, runner.plan.group
        self._layer, self._group, self._device = layer, list(group), runner.device
        self._stop_key = (type(layer).__qualname__, tuple(group))
        self.blocks = self.adapter.moe_blocks(layer)
        self.sources = weight_sources(group, self.blocks)
        self.keys = expert_keys(group, self.blocks)                 # routed experts: the adapter says
        self._plain = [n for n in group if n not in self.keys]      # the rest: the hooked inputs say
        learned = self._input_keys.get(self._stop_key)
        self._pending = [] if learned is not None else list(self._plain)
        self._learning = bool(self._pending)
        self._fp_layer = runner.plan.fp_block if self.asymmetric else None
        if self.asymmetric and self._fp_layer is None:
            raise RuntimeError("gptq.asymmetric: the collect pass has no fp copy of the layer (plan.fp_block)")
        self._plan_batched(layer, group, runner.device)
        self._set_keys(learned or {})
        if self._fp_layer is not None:
            self._hook_fp(self._fp_layer)
        self.routed_tokens = {b.name: torch.zeros(b.num_experts, dtype=torch.long, device=runner.device)
                              for b in self.blocks}
        for name in group:
            if name not in self._from_block_input and name not in self._from_expert_act:
                self._hook_input(layer, name)
        for b in self.blocks:
            self._hook_routing(layer, b)
        self._handles.append(layer.register_forward_hook(lambda *_: self._timed_flush(layer)))
        self._timer = FlushTimer(runner.device)
        # early stop: a group of plain linears stops at the pre-hook of the last one the forward calls
        # (learned on the first batch); a group fed only from MoE block inputs stops at the router
        plain = all(self.sources[n].kind == "plain" and not self._is_expert(n) for n in group)
        self._stop_name = self._stop_names.get(self._stop_key) if self.early_stop and plain else None
        self._learn_stop = self.early_stop and plain and self._stop_name is None
        self._stop_at_router = (self.early_stop and len(group) > 0
                                and all(n in self._from_block_input for n in group))
        # a group of routed experts' down_proj (fed from the blocks' expert_act): stop once every such block has
        # handed out its activations, before the down matmul, the combine and anything after the block
        self._stop_at_act = (self.early_stop and len(group) > 0 and bool(self._from_expert_act)
                             and all(n in self._from_expert_act or n in self._from_block_input for n in group))
        if self._stop_name is not None or self._learn_stop or self._stop_at_router or self._stop_at_act:
            self._wrap_forward(layer)

    def on_predict_end(self, trainer, runner):
        if runner.plan.phase != "collect":
            return
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self._learning:
            self._agree_keys()
        for blk in (runner.block, self._fp_layer):
            if blk is not None and "forward" in vars(blk):
                del blk.forward
        i = runner.plan.layer_index
        self.layer_seconds[i] = self.layer_seconds.get(i, 0.0) + self._timer.seconds()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            for key in sorted(self.states):
                st = self.states[key]
                for t in (st.H, st.n_tokens, st.weight_sum):
                    dist.all_reduce(t)
            for key in sorted(self.cross):
                dist.all_reduce(self.cross[key])
            for name in sorted(self.routed_tokens):
                dist.all_reduce(self.routed_tokens[name])

    # -- which linears share a Hessian ------------------------------------------------------------
    def _set_keys(self, plain_keys: dict[str, str]) -> None:
        """Add decided keys (in group order, which the solver stacks by) and allocate their states."""
        keys = {**self.keys, **plain_keys}
        self.keys = {n: keys[n] for n in self._group if n in keys}
        self._pending = [n for n in self._pending if n not in plain_keys]
        for k in dict.fromkeys(self.keys.values()):
            if k not in self.states:
                self.states[k] = HessianState.zeros(self._layer.get_submodule(k).in_features, device=self._device)
                if self.asymmetric:
                    self.cross[k] = torch.zeros_like(self.states[k].H)

    def _resolve_keys(self, inputs) -> None:
        """First flush of a pass: linears whose pre-hooks saw the same tensor share a Hessian."""
        self._set_keys(shared_input_keys(self._pending, inputs))

    def _agree_keys(self) -> None:
        """End of a pass that decided keys: under DDP a rank that got no batch takes the others'
        (one all_gather_object, only in the first pass of each (layer class, group)); then remember
        them for later layers. With no batch anywhere every linear keeps its own (zero) Hessian."""
        mine = None if self._pending else {n: self.keys[n] for n in self._plain}
        known = [mine] if mine is not None else []
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            everyone = [None] * dist.get_world_size()
            dist.all_gather_object(everyone, mine)
            known = [k for k in everyone if k is not None]
            if any(k != known[0] for k in known):
                raise RuntimeError(f"ranks disagree on which linears of {self._group} share an input: {known}")
        if known:
            self._set_keys(known[0])
            self._input_keys[self._stop_key] = known[0]
        else:
            self._set_keys({n: n for n in self._pending})

    def _wrap_forward(self, layer):
        """The layer's forward, returning its input when a hook stops it (collect output is unused);
        forward hooks (the flush) still run. Removed again in on_predict_end."""
        fwd = layer.forward

        def forward(*args, **kwargs):
            try:
                return fwd(*args, **kwargs)
            except StopForward:
                return args[0] if args else next(iter(kwargs.values()))
        layer.forward = forward

    # -- experts batched per block ------------------------------------------------------------
    def _is_expert(self, name):
        return any(name.startswith(p + ".") for b in self.blocks for p in b.expert_prefixes.values())

    def _plan_batched(self, layer, group, device):
        """One [E, C, C] state per (MoE block, Hessian key leaf), its rows the experts' states (views),
        updated for all experts at once from rows sorted by expert (RoutePlan). Gate/up of routed experts
        whose linears carry no other input hooks (activation quantization) are fed straight from the
        block input and the routing, without hooking (or, with early stop, even running) the experts."""
        self.states, self.batched, self._from_block_input = {}, {}, set()
        self.cross, self._cross_big = {}, {}
        for b in self.blocks:
            g, u, _d = b.proj_names
            leaves: dict[str, dict[int, str]] = {}
            for name, key in self.keys.items():
                src = self.sources[name]
                if src.kind == "expert" and src.block == b.name:
                    leaves.setdefault(key[len(b.expert_prefixes[src.expert]) + 1:], {})[src.expert] = key
            for leaf, experts in leaves.items():
                C = layer.get_submodule(next(iter(experts.values()))).in_features
                big = HessianState.zeros(C, experts=b.num_experts, device=device)
                for e, key in experts.items():
                    self.states[key] = HessianState(big.H[e], big.n_tokens[e], big.weight_sum[e])
                if self.asymmetric:
                    self._cross_big[(b.name, leaf)] = torch.zeros_like(big.H)
                    for e, key in experts.items():
                        self.cross[key] = self._cross_big[(b.name, leaf)][e]
                members = [n for n in self.keys if self.sources[n].kind == "expert" and self.sources[n].block == b.name
                           and self.keys[n] in experts.values()]
                bare = all(not layer.get_submodule(n)._forward_pre_hooks for n in members)
                from_input = leaf == g and bare and all(n.rsplit(".", 1)[1] in (g, u) for n in members)
                self.batched[(b.name, leaf)] = (big, experts, from_input)
                if from_input:
                    self._from_block_input.update(members)
        self._via_act, self._from_expert_act = set(), set()
        if self.mode == "all_experts":
            return
        for (block, leaf), (_big, experts, _from_input) in self.batched.items():
            b = next(bl for bl in self.blocks if bl.name == block)
            members = [n for n in self.keys if self.sources[n].kind == "expert" and self.sources[n].block == block
                       and self.keys[n] in experts.values()]
            # every other expert linear of this block in the group is fed from the block input (no hook), and the
            # block will take its grouped path (nothing hooks or wraps its experts): its expert_act gives the rows
            others = [n for n in self.keys if self.sources[n].kind == "expert" and self.sources[n].block == block
                      and n not in members]
            if (leaf == b.proj_names[2] and all(n.rsplit(".", 1)[1] == leaf for n in members)
                    and all(n in self._from_block_input for n in others) and self._act_point(layer, b) is not None):
                self._via_act.add((block, leaf))
                self._from_expert_act.update(members)

    @staticmethod
    def _act_point(layer, b):
        """The block's `expert_act` hook point if its grouped experts path will run (else None: hook per expert)."""
        from alphaquant.models.common.moe import ExpertActivations

        blk = layer.get_submodule(b.name)
        act = getattr(blk, "expert_act", None)
        if not isinstance(act, ExpertActivations) or getattr(blk, "experts_impl", "loop") == "loop":
            return None
        gate = layer.get_submodule(f"{b.expert_prefixes[min(b.expert_prefixes)]}.{b.proj_names[0]}")
        probe = torch.empty(1, gate.in_features, dtype=gate.weight.dtype, device=gate.weight.device)
        with torch.no_grad():                   # the collect forward records no graph
            return act if blk.grouped_blocker(probe) is None else None

    # -- gptq.asymmetric -----------------------------------------------------------------------
    def _hook_fp(self, fp):
        """Pre-hooks on the fp copy of the layer: the inputs of the group's non-expert linears and of every
        MoE block (routed experts' fp inputs are taken from it at the quantized routing's tokens).

        With early stop the fp forward ends at the pre-hook that completes what the group needs (its non-expert
        linears' inputs, and the MoE block inputs when it has routed experts): the fp layer's experts never run
        for a group of attention linears or of routed experts (their fp down inputs are computed from the block
        input, `_fp_down_rows`), which is most of an MoE layer's forward."""
        need = {n for n in self._group if not self._is_expert(n)}
        if any(self._is_expert(n) for n in self._group):
            need |= {b.name for b in self.blocks}
        seen: set[str] = set()

        def keep(name):
            def pre(_mod, args):
                self._fp_in[name] = args[0].reshape(-1, args[0].shape[-1])
                if self.early_stop and name in need:
                    seen.add(name)
                    if seen >= need:
                        raise StopForward
            return pre
        self._handles.append(fp.register_forward_pre_hook(lambda *_: seen.clear()))   # each batch from scratch
        for n in self._group:
            if not self._is_expert(n):
                self._handles.append(fp.get_submodule(n).register_forward_pre_hook(keep(n)))
        for b in self.blocks:
            self._handles.append(fp.get_submodule(b.name).register_forward_pre_hook(keep(b.name)))
        if self.early_stop and need:
            self._wrap_forward(fp)

    def _fp_rows(self, name: str, x: torch.Tensor) -> torch.Tensor:
        fp = self._fp_in.get(name)
        if fp is None or fp.shape != x.shape:
            raise RuntimeError(f"gptq.asymmetric: the fp layer gave {name} "
                               f"{'no input' if fp is None else tuple(fp.shape)}, the layer {tuple(x.shape)}")
        return fp

    def _fp_expert_rows(self, block: str, leaf: str, e: int, plan: RoutePlan) -> torch.Tensor:
        """The fp model's input of expert e's `leaf` at the tokens the quantized model routes to e."""
        b = next(bl for bl in self.blocks if bl.name == block)
        x = self._fp_in[block].index_select(0, plan.token_idx[plan.rows(e)])
        if leaf in b.proj_names[:2]:                  # gate/up read the expert input itself
            return x
        return linear_input(self._fp_layer.get_submodule(b.expert_prefixes[e]), leaf, x)

    def asymmetric_target(self, W: torch.Tensor, H: torch.Tensor, keys: list[str], damp: float) -> torch.Tensor:
        """W̃ [E, R, C] of the stacks with these Hessian keys (gptq/gptaq.py), H [E, C, C] as finalised
        (2/N Σ c x̃ x̃ᵀ), P normalised the same way."""
        P = torch.stack([self.cross[k] * (2.0 / self.states[k].n_tokens.clamp(min=1).to(torch.float32)) for k in keys])
        return asymmetric_target(W, H, P, damp)

    # -- hooks ------------------------------------------------------------------------------
    def _hook_input(self, layer, name):
        def pre(_mod, args):
            self._inputs.append((name, args[0]))     # kept as given: its identity decides sharing
            if name == self._stop_name:
                raise StopForward
        self._handles.append(layer.get_submodule(name).register_forward_pre_hook(pre))

    def _hook_routing(self, layer, b):
        def routed(_mod, _args, out):
            self._routing[b.name] = (out[0].reshape(-1, out[0].shape[-1]), out[1].reshape(-1, out[1].shape[-1]))
            if self._stop_at_router and all(bl.name in self._routing for bl in self.blocks):
                raise StopForward
        self._handles.append(layer.get_submodule(b.router_name).register_forward_hook(routed))
        if b.shared_gate:
            def gate(_mod, _args, out):
                self._gates[b.name] = torch.sigmoid(out.float()).reshape(-1)
            self._handles.append(layer.get_submodule(b.shared_gate).register_forward_hook(gate))
        if any(k[0] == b.name for k in self._via_act):
            def acts(_mod, _args, out):
                self._acts[b.name] = out
                if self._stop_at_act and all(k[0] in self._acts for k in self._via_act) \
                        and all(bl.name in self._routing for bl in self.blocks):
                    raise StopForward
            self._handles.append(layer.get_submodule(b.name).expert_act.register_forward_hook(acts))
        if self.mode == "all_experts" or any(k[0] == b.name and v[2] for k, v in self.batched.items()):
            def block_in(_mod, args):
                self._block_in[b.name] = args[0].reshape(-1, args[0].shape[-1])
            self._handles.append(layer.get_submodule(b.name).register_forward_pre_hook(block_in))

    # -- accumulation -----------------------------------------------------------------------
    def _timed_flush(self, layer):
        self._timer.start()
        self._flush(layer)
        self._timer.stop()

    def _flush(self, layer):
        """Turn the buffered inputs of one layer forward into Hessian updates."""
        inputs, self._inputs = self._inputs, []
        if self._pending and inputs:
            self._resolve_keys(inputs)
        if self._learn_stop and inputs:
            self._stop_name, self._learn_stop = inputs[-1][0], False    # the last group input the forward makes
            self._stop_names[self._stop_key] = self._stop_name
        plans = {}
        for b in self.blocks:
            ids = self._routing.get(b.name)
            if ids is None:
                continue
            if any(k[0] == b.name for k in self.batched):
                plans[b.name] = RoutePlan(ids[0], ids[1], b.num_experts)
                self.routed_tokens[b.name] += plans[b.name].count_tensor
            else:
                self.routed_tokens[b.name] += torch.bincount(ids[0].reshape(-1), minlength=b.num_experts)
        seen: dict[str, tuple | None] = {}
        expert_rows: dict[tuple, dict[int, torch.Tensor]] = {}
        for name, x in inputs:
            key, src = self.keys[name], self.sources[name]
            if self.mode == "all_experts" and src.kind == "expert":
                continue          # fed below from the block input, all tokens
            ident = input_identity(x)
            if key in seen:
                if seen[key] != ident:
                    raise RuntimeError(f"{name} and {key} were taken to share an input (the same tensor on the "
                                       f"pass's first batch, or an expert's gate and up) but read different ones in this forward")
                continue
            seen[key] = ident
            x = x.reshape(-1, x.shape[-1])                                   # [T, C]
            if src.kind == "expert":
                leaf = key[len(self._prefix(src)) + 1:]
                expert_rows.setdefault((src.block, leaf), {})[src.expert] = x
                continue
            c = self._token_weights(name, src, x.shape[0])
            self.states[key].add(x, c)
            if self.asymmetric:
                accumulate_cross(self.cross[key], self._fp_rows(name, x), x, c)
        for (block, leaf), xs in expert_rows.items():
            self._add_routed(block, leaf, xs, plans[block])
        if self.mode != "all_experts":
            for block, leaf in self._via_act:
                if block in plans:
                    self._add_from_act(block, leaf, plans[block])
            for (block, leaf), (big, experts, from_input) in self.batched.items():
                if from_input:
                    plan = plans[block]
                    X, counts, w, ex = self._select(plan, experts, big.H.shape[0], self._block_in[block])
                    accumulate_segments(big, X, counts, self._power(w), ex)
                    if self.asymmetric:
                        X_fp = self._select(plan, experts, big.H.shape[0], self._fp_in[block])[0]
                        accumulate_cross_segments(self._cross_big[(block, leaf)], X_fp, X, counts, self._power(w))
        else:
            self._flush_all_experts(layer)
            self._inputs.clear()      # the expert re-runs above re-fired the routed input hooks
        self._routing.clear(), self._gates.clear(), self._block_in.clear(), self._fp_in.clear(), self._acts.clear()

    def _prefix(self, src: Source) -> str:
        return next(b for b in self.blocks if b.name == src.block).expert_prefixes[src.expert]

    @staticmethod
    def _select(plan: RoutePlan, experts: dict, E: int, x: torch.Tensor | None = None):
        """Rows of the plan for the experts in `experts` (all, usually): (x rows or None, counts, weights, experts)."""
        counts = [plan.counts[e] if e in experts else 0 for e in range(E)]
        if len(experts) == E:
            tok, w, ex = plan.token_idx, plan.weights, plan.experts
        else:
            parts = [plan.rows(e) for e in sorted(experts) if plan.counts[e]]
            cat = lambda t: torch.cat([t[r] for r in parts]) if parts else t[:0]  # noqa: E731
            tok, w, ex = cat(plan.token_idx), cat(plan.weights), cat(plan.experts)
        return (x.index_select(0, tok) if x is not None else None), counts, w, ex

    def _add_routed(self, block, leaf, xs: dict, plan: RoutePlan):
        """Hooked per-expert inputs (rows in the plan's order) into the block's batched state."""
        big, experts, _ = self.batched[(block, leaf)]
        E = big.H.shape[0]
        for e, x in xs.items():
            if x.shape[0] != plan.counts[e]:
                raise RuntimeError(f"{experts[e]} saw {x.shape[0]} tokens but its router sent {plan.counts[e]}")
        _, counts, w, ex = self._select(plan, experts, E)
        missing = [experts[e] for e in experts if counts[e] and e not in xs]
        if missing:
            raise RuntimeError(f"{missing[0]} was routed tokens but its input was not seen")
        X = torch.cat([xs[e] for e in sorted(xs)]) if xs else None
        if X is not None:
            accumulate_segments(big, X, counts, self._power(w), ex)
            if self.asymmetric:
                X_fp = torch.cat([self._fp_expert_rows(block, leaf, e, plan) for e in sorted(xs)])
                accumulate_cross_segments(self._cross_big[(block, leaf)], X_fp, X, counts, self._power(w))

    def _add_from_act(self, block, leaf, plan: RoutePlan):
        """The block's expert_act rows (all experts' down inputs, the plan's row order) into the batched state."""
        big, experts, _ = self.batched[(block, leaf)]
        E = big.H.shape[0]
        act = self._acts.get(block)
        if act is None:
            raise RuntimeError(f"{block}.expert_act did not run although {block} routed tokens: the block took its "
                               f"per-expert loop, so the down_proj inputs of its experts were not seen")
        if act.shape[0] != plan.order.numel():
            raise RuntimeError(f"{block}.expert_act gave {act.shape[0]} rows but its router sent {plan.order.numel()}")
        _, counts, w, ex = self._select(plan, experts, E)
        if len(experts) == E:
            X = act
        else:
            parts = [act[plan.rows(e)] for e in sorted(experts) if plan.counts[e]]
            X = torch.cat(parts) if parts else act[:0]
        accumulate_segments(big, X, counts, self._power(w), ex)
        if self.asymmetric and X.shape[0]:
            X_fp = self._fp_down_rows(block, leaf, experts, plan)
            accumulate_cross_segments(self._cross_big[(block, leaf)], X_fp, X, counts, self._power(w))

    def _fp_down_rows(self, block: str, leaf: str, experts: dict, plan: RoutePlan) -> torch.Tensor:
        """The fp layer's down_proj inputs of `experts` at the quantized routing's rows (plan order): one grouped
        pass of the fp block over all experts where it can run one (the same rows as per expert, bit for bit on
        CPU), else expert by expert."""
        fp_block, x = self._fp_layer.get_submodule(block), self._fp_in[block]
        if len(experts) == len(plan.counts) and hasattr(fp_block, "down_inputs") and fp_block.grouped_blocker(x) is None:
            return fp_block.down_inputs(x, plan)
        return torch.cat([self._fp_expert_rows(block, leaf, e, plan) for e in sorted(experts) if plan.counts[e]])

    def _power(self, w: torch.Tensor | None) -> torch.Tensor | None:
        """Routing weights as this mode weights the tokens (None: each token counts 1)."""
        p = WEIGHT_POWER.get(self.mode)
        if p is None or w is None:
            return None
        return w if p == 1 else w.pow(p)

    def _token_weights(self, name, src: Source, rows: int):
        if self.mode not in WEIGHT_POWER or src.kind == "plain":
            return None
        if src.kind == "shared":
            return self._power(self._gates[src.block])
        ids, w = self._routing[src.block]
        tokens, c = expert_token_weights(ids, w, src.expert)
        if tokens.numel() != rows:
            raise RuntimeError(f"{name} saw {rows} tokens but its router sent {tokens.numel()}")
        return self._power(c)

    def _flush_all_experts(self, layer):
        """Every token through every expert of the group (Hessians only; outputs unused)."""
        for b in self.blocks:
            x = self._block_in.get(b.name)                               # [T, H]
            if x is None:          # the forward stopped before this block: the group has none of its experts
                continue
            for (block, leaf), (big, experts, from_input) in self.batched.items():
                if block == b.name and from_input:                       # gate/up: the block input itself
                    G = accumulate_hessian_fast(torch.zeros_like(big.H[0]), x)
                    for e in experts:
                        big.H[e].add_(G)
                        big.n_tokens[e] += x.shape[0]
                        big.weight_sum[e] += x.shape[0]
            for e, prefix in b.expert_prefixes.items():
                names = [n for n in self.keys if n.startswith(prefix + ".") and n not in self._from_block_input]
                if not names:
                    continue
                for key in dict.fromkeys(self.keys[n] for n in names):
                    self.states[key].add(linear_input(layer.get_submodule(prefix), key[len(prefix) + 1:], x))


class FlushTimer:
    """Time spent in Hessian updates over one pass, without a host sync per batch.

    On CUDA each flush is bracketed by two events and the elapsed times are summed once at the
    end of the pass (GPU time of the update kernels); elsewhere the host clock is used.
    """

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"
        self.events, self.host, self._t = [], 0.0, 0.0

    def start(self):
        if self.cuda:
            self.events.append([torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)])
            self.events[-1][0].record()
        else:
            self._t = time.perf_counter()

    def stop(self):
        if self.cuda:
            self.events[-1][1].record()
        else:
            self.host += time.perf_counter() - self._t

    def seconds(self) -> float:
        if self.cuda and self.events:
            self.events[-1][1].synchronize()
            self.host += sum(a.elapsed_time(b) for a, b in self.events) / 1000.0
            self.events = []
        return self.host
