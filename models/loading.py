"""from_pretrained / from_config / load_layer / unload_layer / save_pretrained.

Memory: the model is built on the meta device (no storage) and each parameter is then read from the
safetensors files, cast and placed on its own, so peak host memory is one model (plus one tensor), never two.
With lazy=True the decoder layers stay on meta; `load_layer(model, i)` materialises one layer from
`model.checkpoint` and `unload_layer(model, i)` frees it again, so a calibration loop can walk models larger
than host RAM layer by layer.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .common.checkpoint import CheckpointError, CheckpointReader, ShardWriter
from .common.config import ModelConfigError
from .common.decoder import MoEForCausalLM
from .registry import config_from_dict, model_class_for

_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
           "half": torch.float16, "fp32": torch.float32, "float32": torch.float32, "float": torch.float32}


def resolve_dtype(dtype: str | torch.dtype | None, config_dict: dict[str, Any] | None = None) -> torch.dtype:
    """None -> the dtype config.json records ('dtype' / 'torch_dtype'), else float32."""
    if dtype is None and config_dict:
        dtype = config_dict.get("dtype") or config_dict.get("torch_dtype")
        if dtype not in _DTYPES:
            dtype = None
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise ValueError(f"dtype={dtype} is not supported; use bfloat16, float16 or float32.")
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported; use one of {', '.join(_DTYPES)}.")
    return _DTYPES[dtype]


def _looks_like_hub_id(path_or_id: str | os.PathLike) -> bool:
    text, path = str(path_or_id), Path(path_or_id)
    return text.count("/") == 1 and not text.startswith((".", "/", "~")) and not path.exists()


def _hub_failure(e: Exception) -> str:
    """Why a hub id could not be fetched, in one clause (huggingface_hub's own messages run to several lines)."""
    from huggingface_hub import errors

    if isinstance(e, errors.GatedRepoError):
        return "it is a gated repository: accept its licence on the Hub and log in with `hf auth login`"
    if isinstance(e, errors.RepositoryNotFoundError):
        return "the Hub has no such repository, or it is private"
    if isinstance(e, errors.RevisionNotFoundError):
        return "the Hub has no such revision of it"
    if isinstance(e, errors.LocalEntryNotFoundError):
        return "the Hub cannot be reached and its files are not in the local cache"
    first = (str(e).strip().splitlines() or [""])[0].rstrip(".")
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def resolve_checkpoint_dir(path_or_id: str | os.PathLike, weights: bool = True) -> Path:
    """A local directory as is; otherwise a hub id fetched via huggingface_hub: its *.json files (config.json,
    model.safetensors.index.json, tokenizer and generation configs) and, with `weights`, its *.safetensors.

    weights=False (a dry run): nothing but the small json files is downloaded; the tensors' names, shapes and
    dtypes then come from the safetensors headers (`HubHeaders`, HTTP range requests)."""
    path = Path(path_or_id)
    if path.is_dir():
        return path
    text = str(path_or_id)
    if not _looks_like_hub_id(path_or_id):
        tried = "" if path.is_absolute() else f" (tried '{Path.cwd() / path}': a relative path is resolved against " \
                                               f"the current directory)"
        raise FileNotFoundError(f"model directory {text!r} does not exist{tried}.")
    patterns = ["*.json", "*.safetensors"] if weights else ["*.json"]
    try:
        import huggingface_hub

        return Path(huggingface_hub.snapshot_download(text, allow_patterns=patterns))
    except Exception as e:  # offline, unknown repo, gated repo...
        # relative paths are resolved against the current directory: say which directory was looked for
        raise FileNotFoundError(
            f"{text!r} is not a local directory (there is no '{Path.cwd() / path}'; a relative path is resolved "
            f"against the current directory) and could not be fetched from the Hugging Face Hub "
            f"({_hub_failure(e)}).") from e


class HubHeaders(CheckpointReader):
    """The tensor index of a hub checkpoint from its safetensors headers alone: names, shapes and dtypes read
    with `huggingface_hub.get_safetensors_metadata` (the index json plus an HTTP range request per shard
    header), so a dry run checks the weights without downloading them. `read` refuses: there is no data."""

    def __init__(self, repo_id: str, revision: str | None = None) -> None:
        import huggingface_hub

        from .common.checkpoint import check_float_weight

        self.directory = f"'{repo_id}' (Hugging Face Hub)"
        self._handles, self._checked = {}, set()
        try:
            meta = huggingface_hub.get_safetensors_metadata(repo_id, revision=revision)
        except Exception as e:
            from huggingface_hub import errors
            if isinstance(e, errors.NotASafetensorsRepoError):
                raise CheckpointError(f"the hub model {repo_id!r} has no safetensors weights; AlphaQuant reads "
                                      f"safetensors checkpoints only: convert it, or point model.path at a "
                                      f"directory holding *.safetensors") from None
            if isinstance(e, errors.SafetensorsParsingError):
                raise CheckpointError(f"a safetensors header of the hub model {repo_id!r} is corrupt "
                                      f"({(str(e).splitlines() or [''])[0]}); it cannot be quantized") from None
            raise FileNotFoundError(f"the safetensors headers of {repo_id!r} could not be read from the Hugging "
                                    f"Face Hub ({_hub_failure(e)}).") from e
        self.key_to_file = dict(meta.weight_map)
        self._info = {}
        for file, fmeta in meta.files_metadata.items():
            for key, info in fmeta.tensors.items():
                self._info[key] = info
                check_float_weight(key, info.dtype, f"'{file}' of {repo_id!r}")

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._info[key].shape)

    def dtype(self, key: str) -> str:
        """The stored dtype of `key` as safetensors names it ('BF16', 'F32', ...)."""
        return self._info[key].dtype

    def fork(self) -> "HubHeaders":
        return self

    def read(self, key: str) -> torch.Tensor:
        raise RuntimeError(f"{key!r}: a checkpoint read from its headers alone ({self.directory}) has no tensor "
                           f"data; load the model with from_pretrained to read weights")


def checkpoint_headers(path_or_id: str | os.PathLike) -> CheckpointReader:
    """The checkpoint's tensor index with no tensor data read: a local directory's safetensors headers
    (`CheckpointReader` parses them; dtypes checked), or a hub id's (`HubHeaders`, nothing downloaded)."""
    if Path(path_or_id).is_dir():
        return CheckpointReader(path_or_id)
    return HubHeaders(str(path_or_id))


def check_against_headers(model: nn.Module, path_or_id: str | os.PathLike, directory: Path) -> None:
    """A dry run's weight checks on a meta skeleton, from the headers only (`checkpoint_headers`): every
    tensor the model needs is there, stored as floats, in the shape config.json implies. Sets
    model.checkpoint to the header index (it reads no data)."""
    model.checkpoint = checkpoint_headers(path_or_id)
    if hasattr(model, "check_keys"):      # the generic path's model (hf_backend) knows its own key plan
        model.check_keys()
        return
    refuse_quantized(Path(directory), read_config_dict(Path(directory)))
    _check_keys(model)
    for key, meta in _checkpoint_keys(model):
        if key in model.checkpoint.key_to_file:       # a fused expert tensor is sliced: checked on read
            shape = model.checkpoint.shape(key)
            if shape != tuple(meta.shape):
                raise CheckpointError(f"{key}: checkpoint shape {shape} != model shape {tuple(meta.shape)} "
                                      f"(does config.json match the weights?).")


def read_config_dict(directory: Path) -> dict[str, Any]:
    cfg_path = directory / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path} not found: a model directory needs a config.json.")
    try:
        data = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise ModelConfigError(f"{cfg_path} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); "
                               f"a model directory needs the config.json its checkpoint was saved with.") from None
    if not isinstance(data, dict):
        raise ModelConfigError(f"{cfg_path} must hold a JSON object with the model's settings; "
                               f"got {type(data).__name__}.")
    return data


class _NoInitOnMeta(TorchFunctionMode):
    """torch.nn.init on a meta tensor returns it untouched: a meta tensor holds no values, yet each init ran
    torch's Python decompositions and meta-tensor construction (~0.55 s of the ~0.9 s that building an
    OLMoE-1B-7B skeleton's 3153 linears took, all of it holding the GIL beside the GPU warm-up thread). A mode is
    per thread, so nothing else in the process is affected; real tensors are initialised as always."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__module__", None) == "torch.nn.init":
            t = args[0] if args else kwargs.get("tensor")     # nn.init passes it as `tensor=` to the mode
            if isinstance(t, torch.Tensor) and t.is_meta:
                return t
        return func(*args, **kwargs)


def _build_on_meta(config_dict: dict[str, Any], dtype: torch.dtype) -> MoEForCausalLM:
    cls = model_class_for(config_dict.get("model_type"))
    config = config_from_dict(config_dict)
    with torch.device("meta"), _NoInitOnMeta():
        model = cls(config)
    return model.to(dtype)


def skeleton(path: str | os.PathLike, dtype: str | torch.dtype | None = None) -> MoEForCausalLM:
    """The model of a LOCAL checkpoint directory built on the meta device from its config.json alone:
    module names and shapes, no weight read (validating a recipe costs no model load)."""
    config_dict = read_config_dict(Path(path))
    return _build_on_meta(config_dict, resolve_dtype(dtype, config_dict))


def _set_param(model: nn.Module, key: str, tensor: torch.Tensor) -> None:
    owner, _, leaf = key.rpartition(".")
    model.get_submodule(owner)._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)


def _retie(model: MoEForCausalLM) -> None:
    if model.config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight


def _checkpoint_keys(model: MoEForCausalLM, prefix: str = "") -> list[tuple[str, nn.Parameter]]:
    """(checkpoint key, parameter) pairs under `prefix` (a module path ending in "." or ""); the tied
    lm_head is skipped (it is not in tied checkpoints). Only that module is walked: filtering the
    whole model's parameters by prefix cost ~30 ms per layer of an MoE (thousands of modules), on
    the prefetch thread, every layer."""
    tied = model.config.tie_word_embeddings
    if prefix:
        if not prefix.endswith("."):
            raise ValueError(f"prefix must be a module path ending in '.', got {prefix!r}")
        items = model.get_submodule(prefix[:-1]).named_parameters(prefix=prefix[:-1], remove_duplicate=False)
    else:
        items = model.named_parameters(remove_duplicate=False)
    return [(k, p) for k, p in items if not (tied and k == "lm_head.weight")]


def _check_keys(model: MoEForCausalLM) -> None:
    """CheckpointError naming the tensors the model needs that the checkpoint lacks (headers only, no data)."""
    missing = [k for k, _ in _checkpoint_keys(model) if k not in model.checkpoint]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise CheckpointError(f"the checkpoint at {model.checkpoint.directory} is missing the tensor(s) "
                              f"{', '.join(map(repr, missing[:3]))}{more} that its config.json "
                              f"({model.config.model_type}) needs; the files are incomplete or from another model.")


def _check_finite(model: MoEForCausalLM, key: str, t: torch.Tensor) -> None:
    """CheckpointError when a loaded weight holds NaN/Inf (one fused max-norm pass, no copy); only then
    is the stored tensor read again, to say whether the file or the cast to the model dtype is at fault."""
    if not t.is_floating_point() or t.numel() == 0:
        return
    if bool(torch.isfinite(torch.linalg.vector_norm(t, float("inf")))):
        return
    raw, directory = model.checkpoint.read(key), model.checkpoint.directory
    raw_finite = raw.is_floating_point() and bool(torch.isfinite(torch.linalg.vector_norm(raw, float("inf"))))
    if raw_finite:
        raise CheckpointError(f"the weight {key!r} in {directory} overflows to Inf in {t.dtype} "
                              f"(stored as {raw.dtype}); set model.dtype to bfloat16 or float32.")
    raise CheckpointError(f"the weight {key!r} in {directory} holds NaN or Inf values; the checkpoint "
                          f"is corrupt or was saved from a diverged model, so it cannot be quantized.")


def _read_tensor(reader: CheckpointReader, model: MoEForCausalLM, key: str, meta: torch.Tensor,
                 dtype: torch.dtype | None, pin_memory: bool = False) -> torch.Tensor:
    """One checkpoint tensor copied into fresh host memory (never a view of the mmap'd file: those keep
    file pages resident, and their odd alignment changes CPU BLAS summation order between load paths)."""
    if key not in reader:
        _check_keys(model)
    raw = reader.read(key)
    if raw.shape != meta.shape:
        raise CheckpointError(f"{key}: checkpoint shape {tuple(raw.shape)} != model shape {tuple(meta.shape)} "
                              f"(does config.json match the weights?).")
    return torch.empty(raw.shape, dtype=dtype or meta.dtype, pin_memory=pin_memory).copy_(raw)


def _materialize(model: MoEForCausalLM, prefix: str, device, dtype: torch.dtype | None) -> None:
    for key, meta in _checkpoint_keys(model, prefix):
        host = _read_tensor(model.checkpoint, model, key, meta, dtype)
        t = host.to(device)
        _check_finite(model, key, t)
        _set_param(model, key, t)
    _retie(model)


def _layer_prefix(i: int) -> str:
    return f"model.layers.{i}."


def from_pretrained(path_or_id: str | os.PathLike, dtype: str | torch.dtype | None = None,
                    device: str | torch.device | None = None, lazy: bool = False) -> MoEForCausalLM:
    """Load a local checkpoint directory or hub id of a supported family; returns the model in eval mode.

    dtype: 'bf16'/'fp16'/'fp32' or a torch dtype; None = the dtype in config.json (float32 if absent).
    lazy: keep decoder layers on the meta device (use load_layer / unload_layer); embeddings, final norm and
    lm_head are loaded eagerly.
    """
    directory = resolve_checkpoint_dir(path_or_id)
    config_dict = read_config_dict(directory)
    refuse_quantized(directory, config_dict)
    dtype = resolve_dtype(dtype, config_dict)
    model = _build_on_meta(config_dict, dtype)
    model.checkpoint = CheckpointReader(directory)
    _check_keys(model)                     # every tensor is there (read from the headers, no data yet)
    device = torch.device(device or "cpu")
    model.lazy = lazy
    if lazy:
        for prefix in ("model.embed_tokens.", "model.norm.", "lm_head."):
            _materialize(model, prefix, device, dtype)
    else:
        _materialize(model, "", device, dtype)
    return model.eval()


def refuse_quantized(directory: Path, config_dict: dict[str, Any]) -> None:
    """CheckpointError for a quantized checkpoint: its packed codes are no full-precision weights to load."""
    qc = config_dict.get("quantization_config")
    if qc is None:
        return
    if isinstance(qc, dict) and "alphaquant" in qc:
        raise CheckpointError(f"'{directory}' is an AlphaQuant quantized checkpoint (quantization_config in its "
                              f"config.json); read it with alphaquant.export.load_quantized('{directory}'), "
                              f"which decodes its weights")
    method = qc.get("quant_method", "unknown") if isinstance(qc, dict) else "unknown"
    raise CheckpointError(f"'{directory}' is a quantized checkpoint (quant_method {method!r} in its config.json); "
                          f"models.from_pretrained reads full-precision checkpoints only")


def from_config(config_dict: dict[str, Any], dtype: str | torch.dtype | None = None,
                device: str | torch.device | None = None, seed: int | None = None) -> MoEForCausalLM:
    """A randomly initialised model from a config.json-style dict (tiny models for tests).

    Linear/embedding weights ~ N(0, initializer_range), biases 0, norms 1 (as transformers initialises).
    """
    dtype = resolve_dtype(dtype, config_dict)
    std = config_dict.get("initializer_range", 0.02)
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    model = _build_on_meta(config_dict, torch.float32)
    for key, meta in _checkpoint_keys(model):
        if key.endswith("norm.weight") or key.endswith("layernorm.weight"):
            t = torch.ones(meta.shape)
        elif key.endswith(".bias"):
            t = torch.zeros(meta.shape)
        else:
            t = torch.randn(meta.shape, generator=gen) * std
        _set_param(model, key, t.to(device=device, dtype=dtype))
    _retie(model)
    return model.eval()


def read_layer(model: MoEForCausalLM, i: int, dtype: str | torch.dtype | None = None,
               pin_memory: bool = False) -> dict[str, torch.Tensor]:
    """Decoder layer i's tensors read from model.checkpoint into host memory, cast to the model dtype.

    The disk-bound half of `load_layer`, safe to run in a background thread while the accelerator
    works on another layer: it uses its own file handles and touches no module. With pin_memory
    the tensors land in page-locked memory, so `install_layer` can copy them asynchronously.
    """
    if model.checkpoint is None:
        raise ValueError("load_layer needs a model loaded with models.from_pretrained (it has no checkpoint).")
    dtype = resolve_dtype(dtype) if dtype is not None else None
    reader = model.checkpoint.fork()
    try:
        return {key: _read_tensor(reader, model, key, meta, dtype, pin_memory)
                for key, meta in _checkpoint_keys(model, _layer_prefix(i))}
    finally:
        # Unmap the shards: safetensors reads through mmap, and every page read stays mapped (and counted
        # in the process's resident memory) while the file is open, so streaming a 90 GB checkpoint layer
        # by layer would otherwise end with the whole checkpoint resident. Reopening costs a header parse.
        reader.close()


class PlacedLayer(dict):
    """`place_layer`'s tensors: already on the accelerator and checked finite (install_layer only sets them)."""


def place_layer(model: MoEForCausalLM, tensors: dict[str, torch.Tensor],
                device: str | torch.device) -> PlacedLayer:
    """`read_layer`'s tensors copied to `device` (asynchronous from pinned memory, on the current stream) and
    checked for NaN/Inf with one host sync for the whole layer (CheckpointError naming the weight). A prefetch
    thread may call it for the next layer on its own CUDA stream while another layer computes: the sync then
    waits for that stream's copies only."""
    placed = PlacedLayer({k: t.to(device, non_blocking=True) for k, t in tensors.items()})
    floats = [t for t in placed.values() if t.is_floating_point() and t.numel()]
    if floats:
        norms = torch.stack([torch.linalg.vector_norm(t, float("inf")).float() for t in floats])
        if not bool(torch.isfinite(norms).all()):           # one host sync per layer
            for key, t in placed.items():                   # rare: find and name the culprit
                _check_finite(model, key, t)
            model.checkpoint.close()
    return placed


def install_layer(model: MoEForCausalLM, i: int, tensors: dict[str, torch.Tensor],
                  device: str | torch.device | None = None) -> nn.Module:
    """Put `read_layer`'s tensors into layer i on `device` (asynchronous copies from pinned memory);
    NaN/Inf weights are found with one check for the whole layer. Returns the layer. `place_layer`'s tensors
    (copied and checked ahead, maybe on another stream) are only set; the current stream is recorded on
    them, so their memory is not reused while its kernels may still read them."""
    device = torch.device(device) if device is not None else model.model.embed_tokens.weight.device
    if isinstance(tensors, PlacedLayer) and all(t.device == device for t in tensors.values()):
        placed = tensors
        if device.type == "cuda":
            stream = torch.cuda.current_stream(device)
            for t in placed.values():
                t.record_stream(stream)
    else:
        placed = place_layer(model, tensors, device)
    for key, t in placed.items():
        _set_param(model, key, t)
    _retie(model)
    return model.model.layers[i]


def load_layer(model: MoEForCausalLM, i: int, device: str | torch.device | None = None,
               dtype: str | torch.dtype | None = None) -> nn.Module:
    """Read decoder layer i's weights from model.checkpoint; returns the layer.

    device: default = where the embeddings live; dtype: default = the dtype the model was loaded in.
    """
    device = torch.device(device) if device is not None else model.model.embed_tokens.weight.device
    return install_layer(model, i, read_layer(model, i, dtype), device)


def unload_layer(model: MoEForCausalLM, i: int) -> None:
    """Free decoder layer i's weights (back to the meta device); load_layer reads them again."""
    for key, p in _checkpoint_keys(model, _layer_prefix(i)):
        _set_param(model, key, torch.empty(p.shape, dtype=p.dtype, device="meta"))


def iter_checkpoint_tensors(model: MoEForCausalLM) -> Iterator[tuple[str, torch.Tensor]]:
    """(key, tensor) in hub layout, in module order; layers still on meta are streamed from model.checkpoint."""
    for key, p in _checkpoint_keys(model):
        yield key, (model.checkpoint.read(key).to(p.dtype) if p.is_meta else p.detach())


def save_pretrained(model: MoEForCausalLM, out_dir: str | os.PathLike, max_shard_size: int | str = "5GB",
                    overwrite: bool = False) -> Path:
    """Write config.json + safetensors (sharded with an index json above max_shard_size) in the hub layout.

    Written to a temporary sibling directory and renamed into place, so a failure leaves nothing behind.
    """
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; pass overwrite=True to replace it.")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        config = model.config.to_hf()
        config["dtype"] = str(model.model.embed_tokens.weight.dtype).removeprefix("torch.")
        config.pop("torch_dtype", None)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        with ShardWriter(tmp, max_shard_size) as writer:
            for key, tensor in iter_checkpoint_tensors(model):
                writer.add(key, tensor)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
