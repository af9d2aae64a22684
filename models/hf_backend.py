"""Any decoder-only causal LM transformers >= 5 can build, through transformers' own modeling classes.

    model = models.hf_backend.from_pretrained(dir, dtype="bf16", lazy=True)  # meta skeleton + embeddings/head
    layer = model.install_layer(i, model.read_layer(i), device)              # one decoder layer's weights
    hidden = layer(hidden, **model.layer_kwargs(hidden))                     # (B, S, H)
    model.unload_layer(i)                                                    # back to meta

`HFCausalLM` wraps the transformers model built on the meta device from config.json and presents the
interface the pipeline walks (the same as `models.MoEForCausalLM`): `model.embed_tokens`, `model.layers`,
`model.norm`, `lm_head`, `config` (with `to_hf()`), `checkpoint`, `lazy`, `layer_kwargs`, `head_module`.
Its experts-interface modules are replaced by per-expert linears (`models.hf_experts.LinearExperts`), so
parameter names are `model.layers.N.<block>.experts.E.{gate,up,down}_proj.weight`. Persistent buffers
(DeepSeek-V3's `e_score_correction_bias`) become frozen parameters so that they are read and written with
the layer. Layer kwargs (rotary position embeddings, causal mask per layer type, position ids) come from the
model's own forward: its decoder layers are swapped for recorders on a shallow copy of the trunk, and the
trunk is run on the hidden states (`hf_layer_kwargs.LayerKwargs`). Building and refusing: `hf_build`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .common.checkpoint import CheckpointError, CheckpointReader
from .common.decoder import LMHead
from .hf_build import build_meta, buffers_to_params, check_causal_lm, check_head, hf_config, rebuild_meta_buffers
from .hf_experts import LinearExperts, is_experts_module
from .hf_keys import LayerKeyPlan, assemble, layer_plan
from .hf_layer_kwargs import LayerKwargs, plain_output, select_kwargs
from .loading import resolve_checkpoint_dir, resolve_dtype

__all__ = ["HFCausalLM", "ConfigView", "build_meta", "check_causal_lm", "check_head", "experts_paths", "from_pretrained",
           "hf_config", "skeleton"]


def experts_paths(module: nn.Module) -> list[str]:
    """Names (relative to `module`) of its transformers experts-interface modules."""
    return [n for n, m in module.named_modules() if is_experts_module(m)]


class ConfigView:
    """The transformers config with what the pipeline reads of a model config (`to_hf()`, attributes)."""

    family = "generic"

    def __init__(self, config):
        self.__dict__["hf"] = config
        self.__dict__["text"] = config.get_text_config() if hasattr(config, "get_text_config") else config

    def __getattr__(self, name):
        text = self.__dict__["text"]
        return getattr(text, name) if hasattr(text, name) else getattr(self.__dict__["hf"], name)

    def to_hf(self) -> dict:
        d = self.hf.to_dict()
        return {k: v for k, v in d.items() if not k.startswith("_")}


class HFCausalLM(nn.Module):
    """A transformers causal LM as the pipeline walks it (see the module doc)."""

    def __init__(self, hf: nn.Module):
        super().__init__()
        self.model = hf.model
        self.lm_head = hf.lm_head
        self.__dict__["hf"] = hf
        self.__dict__["config"] = ConfigView(hf.config)
        self.checkpoint: CheckpointReader | None = None
        self.lazy = False
        self.experts: dict[int, dict[str, Any]] = {}       # layer -> {path in layer: ExpertsLayout}
        self._plans: dict[int, LayerKeyPlan] = {}
        self._structures: dict[int, tuple] = {}
        self._renumbers: dict[tuple, bool] = {}     # structure -> its plans follow by renumbering
        self._non_layer: LayerKeyPlan | None = None
        self._kwargs = LayerKwargs(self)
        for i, layer in enumerate(self.model.layers):
            self._split_experts(i, layer)
            buffers_to_params(layer)
            layer.register_forward_pre_hook(select_kwargs(i), with_kwargs=True)
            layer.register_forward_hook(plain_output)
        buffers_to_params(self.model, skip=("layers",))
        rebuild_meta_buffers(hf)

    @property
    def family(self) -> str:
        return "generic_moe" if any(self.experts.values()) else "standard"

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    @property
    def tied(self) -> bool:
        return bool(getattr(self.config, "tie_word_embeddings", False))

    def _split_experts(self, i: int, layer: nn.Module) -> None:
        self.experts[i] = {}
        for path in experts_paths(layer):
            owner, _, leaf = path.rpartition(".")
            new = LinearExperts.from_experts(layer.get_submodule(path))
            (layer.get_submodule(owner) if owner else layer)._modules[leaf] = new
            self.experts[i][path] = new.source_layout

    # --- layer kwargs, head, forward ---------------------------------------------------------------
    def layer_kwargs(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None) -> dict:
        """kwargs for every decoder layer i: `layer(hidden, **kw)` (each layer picks its own entry)."""
        return {"aq_per_layer": self._kwargs(hidden_states, attention_mask)}

    def head_module(self) -> LMHead:
        return LMHead(self.model.norm, self.lm_head)

    def head(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.model.norm(hidden_states))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits (B, S, V) by the layer walk (layers must be loaded)."""
        hidden = self.model.embed_tokens(input_ids)
        kw = self.layer_kwargs(hidden)
        for layer in self.model.layers:
            hidden = layer(hidden, **kw)
        return self.head(hidden)

    # --- checkpoint keys ----------------------------------------------------------------------------
    def _hf_tensors(self, prefix: str, layer: int | None) -> tuple[dict[str, torch.Tensor], set[str], dict]:
        """The tensors transformers' own model has under `prefix` (fused experts as transformers names them),
        as meta tensors; the fused keys; fused key -> (experts path in layer, ExpertsLayout)."""
        out, fused, owners = {}, set(), {}
        mod = self.model.layers[layer] if layer is not None else None
        if mod is None:
            for k, p in self.named_parameters(remove_duplicate=False):
                if not k.startswith("model.layers.") and not (self.tied and k == "lm_head.weight"):
                    out[k] = p
            return out, fused, owners
        ex = self.experts[layer]
        for k, p in mod.named_parameters(remove_duplicate=False):
            # per-expert linears come from the fused tensors; anything else in an experts module (a post-expert
            # norm) is an ordinary tensor under the same name as in transformers' model
            if not any(k.startswith(path + ".") and k[len(path) + 1:].split(".", 1)[0].isdigit() for path in ex):
                out[prefix + k] = p
        for path, layout in ex.items():
            for name, shape in _layout_shapes(layout, mod.get_submodule(path)).items():
                key = f"{prefix}{path}.{name}"
                out[key] = torch.empty(shape, device="meta")
                fused.add(key)
                owners[key] = (path, layout)
        return out, fused, owners

    def key_plan(self, i: int | None) -> LayerKeyPlan:
        """Checkpoint sources of layer i's tensors (None: the tensors outside the layers).

        transformers' inverse conversion costs ~0.8 s for a 128-expert layer, so it runs for the first two
        layers of each structure; when the second one's plan is the first one's with the layer index
        substituted, later layers of that structure get theirs by substitution too."""
        if i is None:
            if self._non_layer is None:
                tensors, fused, _ = self._hf_tensors("", None)
                self._non_layer = layer_plan(self.hf, tensors, fused)
            return self._non_layer
        if i in self._plans:
            return self._plans[i]
        shape = self._structure(i)
        seen = [j for j in sorted(self._plans) if self._structure(j) == shape]
        if len(seen) >= 2 and shape not in self._renumbers:
            self._renumbers[shape] = self._substitutes(seen[0], seen[1])
        if len(seen) >= 2 and self._renumbers[shape]:
            plan = _renumber(self._plans[seen[0]], seen[0], i)
        else:
            tensors, fused, _ = self._hf_tensors(f"model.layers.{i}.", i)
            plan = layer_plan(self.hf, tensors, fused)
        self._plans[i] = plan
        return plan

    def _structure(self, i: int) -> tuple:
        if i not in self._structures:
            layer = self.model.layers[i]
            self._structures[i] = (type(layer).__qualname__,) + tuple(
                (k, tuple(p.shape)) for k, p in layer.named_parameters())
        return self._structures[i]

    def _substitutes(self, a: int, b: int) -> bool:
        pa, pb = _renumber(self._plans[a], a, b), self._plans[b]
        same = lambda x, y: [(k, c, None if r is None else r.tolist()) for k, v in x.fused.items()  # noqa: E731
                             for c, r in v] == [(k, c, None if r is None else r.tolist())
                                                for k, v in y.fused.items() for c, r in v]
        return pa.plain == pb.plain and pa.shapes == pb.shapes and same(pa, pb)

    def check_keys(self) -> None:
        """CheckpointError naming tensors the model needs that the checkpoint lacks (headers only)."""
        missing = []
        for i in [None, *range(len(self.model.layers))]:
            plan = self.key_plan(i)
            missing += [c for c in plan.plain.values() if c not in self.checkpoint.key_to_file]
            missing += [c for srcs in plan.fused.values() for c, _ in srcs if c not in self.checkpoint.key_to_file]
            if missing:
                break
        if missing:
            more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
            raise CheckpointError(f"the checkpoint at {self.checkpoint.directory} is missing the tensor(s) "
                                  f"{', '.join(map(repr, missing[:3]))}{more} that its config.json "
                                  f"({self.config.model_type}) needs; the files are incomplete or from another model.")

    # --- reading and installing ----------------------------------------------------------------------
    def read_tensors(self, i: int | None, dtype: torch.dtype | None = None,
                     pin_memory: bool = False) -> dict[str, torch.Tensor]:
        """{our key: host tensor} of layer i (None: outside the layers), fused experts split per expert."""
        dtype = dtype or self.dtype
        prefix = f"model.layers.{i}." if i is not None else ""
        plan = self.key_plan(i)
        _, _, owners = self._hf_tensors(prefix, i)
        reader = self.checkpoint.fork()
        try:
            def read(ckpt_key):
                if ckpt_key not in reader.key_to_file:
                    self.check_keys()
                return reader.read(ckpt_key)
            out = {}
            for k, ck in plan.plain.items():
                raw = read(ck)
                if tuple(raw.shape) != plan.shapes[k]:
                    raise CheckpointError(f"{ck}: checkpoint shape {tuple(raw.shape)} != model shape "
                                          f"{plan.shapes[k]} (does config.json match the weights?).")
                out[k] = _host(raw, self._dtype_of(k, dtype), pin_memory)
            by_path: dict[str, dict[str, torch.Tensor]] = {}
            for k in plan.fused:
                path, layout = owners[k]
                by_path.setdefault(path, {})[k.rsplit(".", 1)[1]] = assemble(plan, k, read)
            for path, fused in by_path.items():
                layout = owners[f"{prefix}{path}.{next(iter(fused))}"][1]
                for name, t in layout.split(fused).items():
                    key = f"{prefix}{path}.{name}"
                    out[key] = _host(t, self._dtype_of(key, dtype), pin_memory)
            return out
        finally:
            reader.close()

    def _dtype_of(self, key: str, default: torch.dtype) -> torch.dtype:
        """The dtype transformers gives that parameter: the model dtype, except what the class keeps in fp32
        (`_keep_in_fp32_modules(_strict)`: DeepSeek-V3's router weight and correction bias)."""
        p = self.get_parameter(key)
        return p.dtype if p.dtype != self.dtype else default

    def read_layer(self, i: int, pin_memory: bool = False) -> dict[str, torch.Tensor]:
        return self.read_tensors(i, pin_memory=pin_memory)

    def install(self, tensors: dict[str, torch.Tensor], device) -> None:
        placed = {k: t.to(device, non_blocking=True) for k, t in tensors.items()}
        floats = [t for t in placed.values() if t.is_floating_point() and t.numel()]
        if floats:
            norms = torch.stack([torch.linalg.vector_norm(t, float("inf")).float() for t in floats])
            if not bool(torch.isfinite(norms).all()):
                bad = next(k for k, t in placed.items() if t.is_floating_point() and not bool(torch.isfinite(t).all()))
                where = self.checkpoint.directory if self.checkpoint is not None else "the checkpoint"
                raise CheckpointError(f"the weight {bad!r} in {where} holds NaN or Inf values "
                                      f"(in {self.dtype}); the checkpoint is corrupt or overflows this dtype.")
        for k, t in placed.items():
            owner, _, leaf = k.rpartition(".")
            self.get_submodule(owner)._parameters[leaf] = nn.Parameter(t, requires_grad=False)
        if self.tied:
            self.lm_head.weight = self.model.embed_tokens.weight

    def install_layer(self, i: int, tensors: dict[str, torch.Tensor], device=None) -> nn.Module:
        device = torch.device(device) if device is not None else self.model.embed_tokens.weight.device
        self.install(tensors, device)
        return self.model.layers[i]

    def unload_layer(self, i: int) -> None:
        for _, mod in self.model.layers[i].named_modules():
            for leaf, p in list(mod._parameters.items()):
                if p is not None:
                    mod._parameters[leaf] = nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="meta"),
                                                         requires_grad=False)


def _renumber(plan: LayerKeyPlan, a: int, b: int) -> LayerKeyPlan:
    """Layer a's plan with 'layers.{a}.' replaced by 'layers.{b}.' in model and checkpoint keys."""
    f = lambda k: k.replace(f"layers.{a}.", f"layers.{b}.")  # noqa: E731
    return LayerKeyPlan(plain={f(k): f(v) for k, v in plan.plain.items()},
                        fused={f(k): [(f(c), r) for c, r in v] for k, v in plan.fused.items()},
                        shapes={f(k): v for k, v in plan.shapes.items()})


def _layout_shapes(layout, ex: LinearExperts) -> dict[str, tuple[int, ...]]:
    E = ex.num_experts
    e0 = ex.expert(0)
    I, H = e0.up_proj.weight.shape
    rows = 2 * I if layout.has_gate else I
    up = "gate_up_proj" if layout.has_gate else "up_proj"
    out = {up: (E, H, rows) if layout.transposed else (E, rows, H),
           "down_proj": (E, I, H) if layout.transposed else (E, H, I)}
    if layout.has_bias:
        out[f"{up}_bias"] = (E, rows)
        out["down_proj_bias"] = (E, H)
    return out


def _host(t: torch.Tensor, dtype: torch.dtype, pin: bool) -> torch.Tensor:
    """A fresh host copy (never a view of the mmap'd file), cast to the model dtype."""
    dtype = dtype if t.is_floating_point() else t.dtype
    return torch.empty(t.shape, dtype=dtype, pin_memory=pin).copy_(t)


def from_pretrained(path_or_id: str | os.PathLike, dtype: str | torch.dtype | None = None,
                    device: str | torch.device | None = None, lazy: bool = True) -> HFCausalLM:
    """The model of a checkpoint directory (or hub id): decoder layers on meta when lazy, else all loaded."""
    directory = resolve_checkpoint_dir(path_or_id)
    model = skeleton(directory, dtype)
    model.checkpoint = CheckpointReader(directory)
    model.check_keys()
    device = torch.device(device or "cpu")
    model.lazy = lazy
    model.install(model.read_tensors(None), device)
    if not lazy:
        for i in range(len(model.model.layers)):
            model.install(model.read_layer(i), device)
    return model.eval()


def skeleton(path: str | os.PathLike, dtype: str | torch.dtype | None = None) -> HFCausalLM:
    """Built on meta from config.json alone: names and shapes, no weight read."""
    from .loading import read_config_dict

    directory = Path(path)
    cfg_dict = read_config_dict(directory)
    config = hf_config(directory)
    return HFCausalLM(build_meta(config, resolve_dtype(dtype, cfg_dict)))
