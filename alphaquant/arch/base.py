"""The per-family adapter interface the calibration pipeline walks models through.

Contract (documented here because callbacks/pipeline are written against it):

* ``decoder_layers(model)`` -> the ``nn.ModuleList`` ``model.model.layers``. Layer i runs as
  ``hidden = layer(hidden, **layer_kwargs)`` with ``hidden, layer_kwargs = model.prepare_layer_inputs(ids, mask)``
  and returns a plain (B, S, H) tensor; ``model.head(hidden)`` gives logits.
* ``sequential_groups(layer)`` -> true-sequential groups of linear module names relative to the layer:
  ``[[q, k, v], [o], [every gate/up: routed experts, shared expert, dense mlp], [every down]]``. Router gates
  (``mlp.gate``) and ``mlp.shared_expert_gate`` are never listed (see ``skip_modules``).
* ``moe_blocks(layer)`` -> one ``MoEBlockInfo`` per MoE block (empty for a dense layer).
* Router hook: a forward hook on ``<block>.router`` (``MoEBlockInfo.router_name``) receives
  ``(router_logits [T, E],)`` and returns ``(topk_ids [T, k] long, topk_weights [T, k])`` - the weights exactly
  as multiplied into the expert outputs. T = B*S tokens flattened row-major. Expert e sees the tokens t with
  ``(topk_ids == e).any(-1)`` in increasing order; its weight is ``topk_weights[t, slot]``
  (``models.expert_token_weights`` recomputes these rows). If ``block.route_all_tokens`` is set, every expert
  sees all T tokens instead.
* Shared-expert gate (Qwen2-MoE): hook ``MoEBlockInfo.shared_gate_act_name`` (parameter-free sigmoid); its
  output [T, 1] is the factor on the shared expert's output. DeepSeek's shared experts are unweighted (1.0).
* The generic adapter (``generic.GenericAdapter``, transformers' classes) keeps the same contract with
  ``MoEBlockInfo.name`` = the experts module itself (``mlp.experts``: its input is the [T, H] the experts
  receive) and ``router_name`` = ``mlp.experts.route``, whose input *and* output are
  ``(top_k_index, top_k_weights)`` as transformers' MoE block calls its experts with them.

>>> from alphaquant.arch import get_adapter
>>> adapter = get_adapter(model)                                # doctest: +SKIP
>>> layer = adapter.decoder_layers(model)[1]                    # doctest: +SKIP
>>> adapter.sequential_groups(layer)[0]                         # doctest: +SKIP
['self_attn.q_proj', 'self_attn.k_proj', 'self_attn.v_proj']
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch
from torch import nn

from alphaquant import models


@dataclass(frozen=True)
class MoEBlockInfo:
    """Names are relative to the decoder layer (e.g. 'mlp', 'mlp.router')."""

    name: str  # the MoE block: 'mlp' / 'block_sparse_moe'
    gate_name: str  # the router linear [E, H] ('mlp.gate'); skipped by quantization by default
    router_name: str  # parameter-free hook point returning (topk_ids, topk_weights)
    num_experts: int
    top_k: int
    expert_prefixes: dict[int, str] = field(default_factory=dict)  # e -> 'mlp.experts.e'
    proj_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")  # (gate, up, down) leaf names
    shared_expert: str | None = None  # 'mlp.shared_expert' (Qwen2-MoE) / 'mlp.shared_experts' (DeepSeek)
    shared_gate: str | None = None  # 'mlp.shared_expert_gate' linear [1, H] (Qwen2-MoE)
    shared_gate_act_name: str | None = None  # 'mlp.shared_gate_act': hook point, output = sigmoid(gate(x))

    def expert_linear_names(self, e: int) -> list[str]:
        return [f"{self.expert_prefixes[e]}.{p}" for p in self.proj_names]


class ArchAdapter:
    """Model knowledge for one family. Subclasses only set the class attributes below."""

    family: ClassVar[str] = ""
    model_types: ClassVar[tuple[str, ...]] = ()  # config.json model_type values of this family
    moe_attr: ClassVar[str] = "mlp"
    proj_names: ClassVar[tuple[str, str, str]] = ("gate_proj", "up_proj", "down_proj")  # routed experts
    shared_attr: ClassVar[str | None] = None
    has_shared_gate: ClassVar[bool] = False
    attn_groups: ClassVar[list[list[str]]] = [
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"]]

    @classmethod
    def matches(cls, model_type: Any) -> bool:
        return model_type in cls.model_types

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return model.model.layers

    # --- the layer walk (what alphaquant.pipeline calls) ---
    def num_layers(self, model: nn.Module) -> int:
        return len(model.model.layers)

    def layer_prefix(self, i: int) -> str:
        """Full-name prefix of layer i's modules: names from sequential_groups are relative to it."""
        return f"model.layers.{i}."

    def embed_fn(self, model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
        """input_ids (B, S) long -> hidden (B, S, H)."""
        return model.model.embed_tokens

    def layer_kwargs_fn(self, model: nn.Module) -> Callable[[torch.Tensor], dict]:
        """hidden (B, S, H) -> kwargs of layer(hidden, **kwargs) for unpadded windows."""
        return model.layer_kwargs

    def head_module(self, model: nn.Module) -> nn.Module:
        """Module mapping hidden (B, S, H) -> logits (B, S, V) (final norm + lm_head)."""
        return model.head_module()

    def load_layer(self, model: nn.Module, i: int) -> nn.Module:
        """Layer i with weights present: read from the checkpoint if the model is lazy, else as is."""
        return self.install_layer(model, i, self.read_layer(model, i))

    def read_layer(self, model: nn.Module, i: int, pin_memory: bool = False) -> dict | None:
        """Layer i's tensors in host memory when it must come from the checkpoint (lazy), else None.
        Touches no module, so a prefetch thread may call it while another layer runs."""
        if any(p.is_meta for p in model.model.layers[i].parameters()):
            return models.read_layer(model, i, pin_memory=pin_memory)
        return None

    def place_layer(self, model: nn.Module, tensors: dict | None, device):
        """`read_layer`'s tensors copied to `device` and checked ahead of `install_layer` (the prefetch thread does
        it for the next layer on its own CUDA stream); None stays None."""
        return None if tensors is None else models.loading.place_layer(model, tensors, device)

    def install_layer(self, model: nn.Module, i: int, tensors: dict | None, device=None) -> nn.Module:
        """Layer i on `device` (default: where the embeddings are), from `read_layer`'s tensors."""
        if tensors is None:
            layer = model.model.layers[i]
            return layer.to(device) if device is not None else layer
        return models.install_layer(model, i, tensors, device)

    def attention_reuse(self, layer: nn.Module):
        """Where layer's forward can resume part-way (calibration's attention reuse), or None: the local families'
        DecoderLayer (models/common/decoder.py, `resume=`); transformers' layers cannot."""
        from alphaquant.models.common.decoder import DecoderLayer
        from alphaquant.pipeline.attention_reuse import ReusePoints

        if type(layer).forward is not DecoderLayer.forward:
            return None
        attn = [f"self_attn.{n}" for n, m in layer.self_attn.named_children() if isinstance(m, nn.Linear)]
        act, deps, token_bytes = None, frozenset(), 0
        blocks = self.moe_blocks(layer)
        if len(blocks) == 1 and hasattr(layer.mlp_block, "from_down_inputs"):    # the routed down inputs too
            b = blocks[0]
            g, u, _ = b.proj_names
            act = f"{b.name}.expert_act"
            deps = frozenset([b.gate_name, *(f"{p}.{n}" for p in b.expert_prefixes.values() for n in (g, u))])
            gate = layer.get_submodule(b.expert_linear_names(0)[0])
            token_bytes = b.top_k * gate.out_features * gate.weight.element_size()
        return ReusePoints(qkv=frozenset(n for n in attn if n != "self_attn.o_proj"), o="self_attn.o_proj",
                           h="post_attention_layernorm", act=act, act_deps=deps, act_token_bytes=token_bytes)

    def unload_layer(self, model: nn.Module, i: int) -> None:
        """Free layer i's weights if the model was loaded lazily (an eager model keeps them)."""
        if getattr(model, "lazy", False):
            models.unload_layer(model, i)

    def moe_blocks(self, layer: nn.Module) -> list[MoEBlockInfo]:
        block = getattr(layer, self.moe_attr, None)
        if block is None or not hasattr(block, "router"):
            return []  # a dense layer
        a = self.moe_attr
        shared = f"{a}.{self.shared_attr}" if self.shared_attr and hasattr(block, self.shared_attr) else None
        gate = f"{a}.shared_expert_gate" if self.has_shared_gate and hasattr(block, "shared_expert_gate") else None
        return [MoEBlockInfo(
            name=a, gate_name=f"{a}.gate", router_name=f"{a}.router",
            num_experts=block.num_experts, top_k=block.top_k,
            expert_prefixes={e: f"{a}.experts.{e}" for e in range(block.num_experts)},
            proj_names=self.proj_names, shared_expert=shared, shared_gate=gate,
            shared_gate_act_name=f"{a}.shared_gate_act" if gate else None)]

    def sequential_groups(self, layer: nn.Module) -> list[list[str]]:
        blocks = self.moe_blocks(layer)
        if not blocks:  # dense SwiGLU layer
            return [*map(list, self.attn_groups), ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]
        gate_up, down = [], []
        for b in blocks:
            g, u, d = b.proj_names
            for e in range(b.num_experts):
                p = b.expert_prefixes[e]
                gate_up += [f"{p}.{g}", f"{p}.{u}"]
                down.append(f"{p}.{d}")
            if b.shared_expert:
                gate_up += [f"{b.shared_expert}.gate_proj", f"{b.shared_expert}.up_proj"]
                down.append(f"{b.shared_expert}.down_proj")
        return [*map(list, self.attn_groups), gate_up, down]

    def skip_modules(self, model: nn.Module) -> list[str]:
        """Full names of linears not quantized by default: router gates, shared-expert gates, lm_head."""
        names = ["lm_head"]
        for i, layer in enumerate(self.decoder_layers(model)):
            for b in self.moe_blocks(layer):
                names.append(f"model.layers.{i}.{b.gate_name}")
                if b.shared_gate:
                    names.append(f"model.layers.{i}.{b.shared_gate}")
        return names

    def linear_modules(self, model: nn.Module) -> list[tuple[str, int, int]]:
        """(full name, in_features, out_features) of every nn.Linear, for recipe validation.

        Works on lazily loaded (meta) models: shapes only, no weights read.
        """
        return [(n, m.in_features, m.out_features) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
