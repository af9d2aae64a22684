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
trunk is run on the hidden states (`_LayerKwargs`).
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .common.checkpoint import CheckpointError, CheckpointReader
from .common.config import UnsupportedModelError
from .common.decoder import LMHead
from .hf_experts import LinearExperts, is_experts_module
from .hf_keys import LayerKeyPlan, assemble, layer_plan
from .loading import resolve_checkpoint_dir, resolve_dtype


def hf_config(source: str | os.PathLike | dict):
    """A transformers config from a directory or a config.json dict; UnsupportedModelError when
    transformers cannot build it offline (unknown model_type, custom code)."""
    from transformers import AutoConfig

    try:
        if isinstance(source, dict):
            d = dict(source)
            mt = d.pop("model_type", None)
            return AutoConfig.for_model(mt, **d)
        return AutoConfig.from_pretrained(str(source), trust_remote_code=False)
    except (ValueError, KeyError, OSError) as e:
        mt = source.get("model_type") if isinstance(source, dict) else _model_type_of(source)
        raise UnsupportedModelError(
            f"model_type {mt!r} is not supported: transformers cannot build it offline "
            f"({str(e).splitlines()[0][:160]}) and it is not one of AlphaQuant's local families "
            f"(olmoe, qwen2_moe, mixtral, deepseek_moe / deepseek).") from None


def _model_type_of(directory) -> Any:
    import json
    try:
        return json.loads((Path(directory) / "config.json").read_text()).get("model_type")
    except (OSError, ValueError):
        return None


def check_causal_lm(config) -> None:
    """UnsupportedModelError unless `config` is a decoder-only causal LM that transformers can build."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    mt = config.model_type
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedModelError(f"model_type {mt!r} is an encoder-decoder model; AlphaQuant quantizes "
                                    f"decoder-only causal LMs.")
    if mt not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise UnsupportedModelError(f"model_type {mt!r} is not a causal language model in transformers "
                                    f"(no AutoModelForCausalLM class); AlphaQuant quantizes decoder-only causal LMs.")


def build_meta(config, dtype: torch.dtype) -> nn.Module:
    """transformers' own model class for `config`, parameters on the meta device (no storage)."""
    from transformers import AutoModelForCausalLM

    check_causal_lm(config)
    check_head(config)
    qc = getattr(config, "quantization_config", None)
    if qc:
        method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", qc)
        raise UnsupportedModelError(f"model_type {config.model_type!r}: this checkpoint is already quantized "
                                    f"({method}); AlphaQuant quantizes full-precision (bf16/fp16/fp32) weights, "
                                    f"so point model.path at a full-precision copy.")
    try:
        with torch.device("meta"):
            hf = AutoModelForCausalLM.from_config(config, dtype=dtype)
    except Exception as e:             # noqa: BLE001 - any construction failure is "cannot build"
        raise UnsupportedModelError(f"transformers cannot build model_type {config.model_type!r} from its "
                                    f"config ({type(e).__name__}: {str(e).splitlines()[0][:160]}).") from None
    base = getattr(hf, "model", None)
    if base is None or not isinstance(getattr(base, "layers", None), nn.ModuleList) or \
            not isinstance(getattr(hf, "lm_head", None), nn.Linear) or not hasattr(base, "embed_tokens"):
        raise UnsupportedModelError(f"model_type {config.model_type!r}: AlphaQuant's generic path needs the "
                                    f"'model.layers' / 'model.embed_tokens' / 'lm_head' layout most causal LMs "
                                    f"in transformers use; this one has another (AlphaQuant's local families: "
                                    f"olmoe, qwen2_moe, mixtral, deepseek_moe).")
    return hf.eval()


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
        self._kwargs = _LayerKwargs(self)
        for i, layer in enumerate(self.model.layers):
            self._split_experts(i, layer)
            _buffers_to_params(layer)
            layer.register_forward_pre_hook(_select_kwargs(i), with_kwargs=True)
            layer.register_forward_hook(_plain_output)
        _buffers_to_params(self.model, skip=("layers",))
        _rebuild_meta_buffers(hf)

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


def _select_kwargs(i: int):
    def pre(_mod, args, kwargs):
        per_layer = kwargs.pop("aq_per_layer", None)
        if per_layer is None:
            return None
        args = (args[0], *per_layer[i][0]) if args else args
        return args, {**per_layer[i][1], **kwargs}
    return pre


def _plain_output(_mod, _args, out):
    return out[0] if isinstance(out, tuple) else out


def _buffers_to_params(module: nn.Module, skip: tuple[str, ...] = ()) -> None:
    """Persistent buffers as frozen parameters (read and written with the parameters)."""
    for name, mod in module.named_modules():
        if any(name == s or name.startswith(s + ".") for s in skip):
            continue
        for leaf in list(mod._buffers):
            if leaf in mod._non_persistent_buffers_set or mod._buffers[leaf] is None:
                continue
            b = mod._buffers.pop(leaf)
            mod._parameters[leaf] = nn.Parameter(b, requires_grad=False)


def _rebuild_meta_buffers(hf: nn.Module) -> None:
    """Non-persistent buffers (rotary inv_freq, Gemma's embedding scale) are computed at construction, which
    happened on meta. Modules that take the config are constructed again on the host; the others outside the
    decoder layers are taken from the trunk built again on the host with no decoder layers (weights left
    uninitialised: only the buffers are used). A computed buffer inside a decoder layer is refused."""
    left = []
    for name, mod in list(hf.named_modules()):
        if not any(b is not None and b.is_meta for b in mod._buffers.values()):
            continue
        cfg = getattr(mod, "config", None)
        if cfg is not None:
            owner, _, leaf = name.rpartition(".")
            (hf.get_submodule(owner) if owner else hf)._modules[leaf] = type(mod)(config=cfg)
        else:
            left.append(name)
    if not left:
        return
    inside = [n for n in left if n.startswith("model.layers.")]
    if inside:
        raise UnsupportedModelError(f"{inside[0]} has computed buffers AlphaQuant cannot rebuild off the meta "
                                    f"device ({type(hf.get_submodule(inside[0])).__name__}).")
    from transformers.initialization import no_init_weights

    cfg0 = copy.deepcopy(hf.model.config)
    cfg0.num_hidden_layers = 0
    with no_init_weights(), torch.device("cpu"):
        host = type(hf.model)(cfg0)
    for name in left:
        mod = hf.get_submodule(name)
        fresh = host.get_submodule(name.removeprefix("model."))
        for leaf, buf in mod._buffers.items():
            if buf is not None and buf.is_meta:
                mod._buffers[leaf] = fresh._buffers[leaf].to(buf.dtype)


def check_head(config) -> None:
    """UnsupportedModelError for causal LMs whose forward scales the embeddings before the first layer or the
    logits after lm_head in code of its own (the generic path runs embed_tokens, the layers, norm + lm_head)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for key, neutral in (("final_logit_softcapping", None), ("logits_scaling", 1.0), ("logit_scale", 1.0),
                         ("output_multiplier_scale", 1.0), ("embedding_multiplier", 1.0)):
        v = getattr(text, key, neutral)
        if v is not None and v != neutral:
            raise UnsupportedModelError(f"model_type {config.model_type!r} scales its embeddings or logits outside "
                                        f"its modules ({key}={v}), which AlphaQuant's generic path does not do yet.")


class _Recorder(nn.Module):
    def __init__(self, i: int, seen: list):
        super().__init__()
        self.i, self.seen = i, seen

    def forward(self, *args, **kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        self.seen[self.i] = (tuple(args[1:]), kwargs, hidden)
        return hidden


class _LayerKwargs:
    """Per-layer kwargs from the model's own trunk forward (decoder layers replaced by recorders on a
    shallow copy, so the real model is never touched); cached per (B, S, device, dtype)."""

    def __init__(self, owner: HFCausalLM):
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
