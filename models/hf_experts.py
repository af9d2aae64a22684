"""Per-expert `nn.Linear`s in place of a transformers experts-interface module (the generic path).

transformers 5 holds an MoE block's routed experts in one class decorated with
`transformers.integrations.moe.use_experts_implementation`: 3D parameters `gate_up_proj` (or `up_proj`
when `has_gate` is False) and `down_proj`, layout flags `is_concatenated` / `is_transposed` / `has_bias`,
and `forward(hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k])`.

`LinearExperts.from_experts(m)` replaces such a module `m` with children `"0" .. "E-1"`, each an
`ExpertMLP` with `gate_proj` / `up_proj` / `down_proj` linears (bias where `has_bias`), plus `route`, a
parameter-free hook point called as `ids, weights = self.route(top_k_index, top_k_weights)`: a forward
hook on it sees the routing exactly as the experts apply it, whatever the family computes it from
(softmax, sigmoid + correction bias, group-limited top-k, renormalisation, scaling). The math is the eager
experts forward of transformers: per expert, `gate_up = x W_gu^T (+ b)`, the module's own `_apply_gate`
(SwiGLU by default; GPT-OSS's clamped, interleaved one is called as the original class defines it), then
`down`, times the routing weight, summed per token in increasing expert order. Expert e receives its tokens in
increasing token order (the contract `alphaquant.arch.base` documents for the local families).

Why split instead of hooking the 3D parameters: every part of the pipeline downstream (routing-weighted
Hessian hooks, the batched solve over all experts of a layer, activation quantization, RTN copies, the
checkpoint writer, resume) already works on per-expert linears named `<block>.experts.E.{gate,up,down}_proj`,
which are also the names transformers writes on `save_pretrained` for the qwen2_moe-style conversion
(qwen3_moe, deepseek_v2/v3, glm4_moe, dots1, olmoe, ...). The split happens per layer when its weights are
installed (the rest of the model stays on the meta device), so it costs one layer's copy at a time, and the
solver still gets all experts of a layer stacked `[E, R, C]`.

>>> from models.hf_experts import LinearExperts, is_experts_module     # doctest: +SKIP
>>> layer.mlp.experts = LinearExperts.from_experts(layer.mlp.experts)  # doctest: +SKIP
"""

from __future__ import annotations

import types

import torch
from torch import nn

from .common.moe import ExpertRoute


def is_experts_module(m: nn.Module) -> bool:
    """A module built by transformers' `use_experts_implementation` (3D expert parameters)."""
    if not all(hasattr(m, a) for a in ("has_gate", "is_transposed", "has_bias", "is_concatenated")):
        return False
    down = getattr(m, "down_proj", None)
    return isinstance(down, nn.Parameter) and down.dim() == 3


class RouteHook(nn.Module):
    """Parameter-free hook point: returns (top_k_index, top_k_weights) unchanged."""

    def forward(self, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        return top_k_index, top_k_weights


class BiasAfterLinear(nn.Linear):
    """`x W^T`, rounded, then `+ b`: the order transformers' experts use (`x @ W + b`, `_batched_linear`'s
    `out.add_(bias)`); nn.Linear's fused addmm rounds once, which in bf16 moves GPT-OSS's logits visibly."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = nn.functional.linear(x, self.weight)
        return y + self.bias if self.bias is not None else y


def _linear(cols: int, rows: int, bias: bool, dtype, device) -> nn.Linear:
    """An nn.Linear with uninitialised weights (read from the checkpoint later): nn.Linear's own init costs
    ~0.3 ms even on meta, 5 s for Qwen3-30B-A3B's 18k expert linears."""
    cls = BiasAfterLinear if bias else nn.Linear
    lin = cls.__new__(cls)
    nn.Module.__init__(lin)
    lin.in_features, lin.out_features = cols, rows
    lin.weight = nn.Parameter(torch.empty(rows, cols, dtype=dtype, device=device), requires_grad=False)
    lin.bias = nn.Parameter(torch.empty(rows, dtype=dtype, device=device), requires_grad=False) if bias else None
    return lin


class ExpertMLP(nn.Module):
    """One expert: gate_proj / up_proj (gate_proj absent when the family has no gate) and down_proj."""

    def __init__(self, hidden: int, inter: int, has_gate: bool, bias: bool, apply_gate, act_fn,
                 interleaved: bool, dtype=None, device=None):
        super().__init__()
        kw = dict(bias=bias, dtype=dtype, device=device)
        if has_gate:
            self.gate_proj = _linear(hidden, inter, **kw)
        self.up_proj = _linear(hidden, inter, **kw)
        self.down_proj = _linear(inter, hidden, **kw)
        self.__dict__["_apply_gate"] = apply_gate     # the original class's gating (not a submodule)
        self.__dict__["_act_fn"] = act_fn
        self.has_gate, self.interleaved = has_gate, interleaved

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.has_gate:
            return self.down_proj(self._act_fn(self.up_proj(x)))
        gate = self.gate_proj(x)            # gate first: the calibration hooks key an expert's input on it
        up = self.up_proj(x)
        # the layout `_apply_gate` expects: [gate | up] (concatenated) or gate0, up0, gate1, ... (interleaved)
        gate_up = torch.stack((gate, up), dim=-1).flatten(-2) if self.interleaved else torch.cat((gate, up), -1)
        return self.down_proj(self._apply_gate(gate_up))


class LinearExperts(nn.Module):
    """Experts as per-expert linears (children "0".."E-1") + the `route` hook point; see the module doc."""

    def __init__(self, experts: list[ExpertMLP], post_expert_norm: nn.Module | None = None):
        super().__init__()
        self.num_experts = len(experts)
        for e, mlp in enumerate(experts):
            self.add_module(str(e), mlp)
        self.route = RouteHook()
        if post_expert_norm is not None:
            self.post_expert_norm = post_expert_norm
        self.trace_dense = False     # structure tracing on meta: every expert on every token, no host syncs

    def expert(self, e: int) -> ExpertMLP:
        return self._modules[str(e)]

    @classmethod
    def from_experts(cls, m: nn.Module) -> "LinearExperts":
        """Built on the device of m's parameters (meta for a skeleton); weights are not copied
        (use `split_expert_tensors` for that)."""
        up = m.gate_up_proj if m.has_gate else m.up_proj
        down = m.down_proj
        E = down.shape[0]
        hidden, inter = (down.shape[2], down.shape[1]) if m.is_transposed else (down.shape[1], down.shape[2])
        apply_gate = types.MethodType(type(m)._apply_gate, m) if m.has_gate else None
        experts = [ExpertMLP(hidden, inter, m.has_gate, m.has_bias, apply_gate, getattr(m, "act_fn", None),
                             interleaved=not m.is_concatenated, dtype=up.dtype, device=up.device)
                   for _ in range(E)]
        norm = getattr(m, "post_expert_norm", None) if getattr(m, "has_post_expert_norm", False) else None
        out = cls(experts, norm)
        out.__dict__["source_layout"] = ExpertsLayout.of(m)
        return out

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        ids, weights = self.route(top_k_index, top_k_weights)          # (T, k), (T, k)
        x = hidden_states
        if self.trace_dense:
            out = torch.zeros_like(x)
            for e in range(self.num_experts):
                out = out + self._expert_out(e, x) * weights[:, :1].to(x.dtype)
            return out
        route = ExpertRoute(ids, weights, self.num_experts)
        contrib = x.new_zeros(ids.numel(), x.shape[-1])                 # (T*k, H) rows sorted by expert
        for e in range(self.num_experts):
            if not route.counts[e]:
                continue
            rows = route.rows(e)
            y = self._expert_out(e, x[route.token_idx[rows]])           # (n_e, H)
            contrib[rows] = (y * route.weights[rows][:, None]).to(x.dtype)
        return route.combine(contrib)

    def _expert_out(self, e: int, x: torch.Tensor) -> torch.Tensor:
        y = self.expert(e)(x)
        norm = self._modules.get("post_expert_norm")
        return norm(y) if norm is not None else y


class ExpertsLayout:
    """How an experts module's 3D parameters map onto per-expert linear weights [out, in]."""

    def __init__(self, has_gate: bool, has_bias: bool, transposed: bool, concatenated: bool):
        self.has_gate, self.has_bias = has_gate, has_bias
        self.transposed, self.concatenated = transposed, concatenated

    @classmethod
    def of(cls, m: nn.Module) -> "ExpertsLayout":
        return cls(m.has_gate, m.has_bias, m.is_transposed, m.is_concatenated)

    def fused_names(self) -> list[str]:
        """The experts module's parameter names (as transformers names them)."""
        up = "gate_up_proj" if self.has_gate else "up_proj"
        names = [up, "down_proj"]
        return names + [f"{up}_bias", "down_proj_bias"] if self.has_bias else names

    def split(self, fused: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """{fused name: [E, ...]} -> {"e.gate_proj.weight": [I, H], ...} (views where possible)."""
        up = "gate_up_proj" if self.has_gate else "up_proj"
        out = {}
        W, D = fused[up], fused["down_proj"]
        if self.transposed:                       # [E, in, out] -> [E, out, in]
            W, D = W.transpose(1, 2), D.transpose(1, 2)
        for e in range(W.shape[0]):
            out.update(self._pair(e, "weight", W[e]))
            out[f"{e}.down_proj.weight"] = D[e]
            if self.has_bias:
                out.update(self._pair(e, "bias", fused[f"{up}_bias"][e]))
                out[f"{e}.down_proj.bias"] = fused["down_proj_bias"][e]
        return out

    def _pair(self, e: int, leaf: str, t: torch.Tensor) -> dict[str, torch.Tensor]:
        if not self.has_gate:
            return {f"{e}.up_proj.{leaf}": t}
        gate, up = (t[0::2], t[1::2]) if not self.concatenated else t.chunk(2, dim=0)
        return {f"{e}.gate_proj.{leaf}": gate, f"{e}.up_proj.{leaf}": up}

    def fuse(self, split: dict[str, torch.Tensor], E: int) -> dict[str, torch.Tensor]:
        """Inverse of `split` (used to write the fused layout and in tests)."""
        up = "gate_up_proj" if self.has_gate else "up_proj"

        def pair(e, leaf):
            if not self.has_gate:
                return split[f"{e}.up_proj.{leaf}"]
            g, u = split[f"{e}.gate_proj.{leaf}"], split[f"{e}.up_proj.{leaf}"]
            return torch.stack((g, u), 1).flatten(0, 1) if not self.concatenated else torch.cat((g, u), 0)
        W = torch.stack([pair(e, "weight") for e in range(E)])
        D = torch.stack([split[f"{e}.down_proj.weight"] for e in range(E)])
        if self.transposed:
            W, D = W.transpose(1, 2).contiguous(), D.transpose(1, 2).contiguous()
        out = {up: W, "down_proj": D}
        if self.has_bias:
            out[f"{up}_bias"] = torch.stack([pair(e, "bias") for e in range(E)])
            out["down_proj_bias"] = torch.stack([split[f"{e}.down_proj.bias"] for e in range(E)])
        return out
