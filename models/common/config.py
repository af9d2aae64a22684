"""One typed config shared by the four families.

Each family maps its own config.json keys onto `MoEModelConfig` (see models/<family>/configuration.py),
so the modeling code in models/common reads one vocabulary. The original dict is kept in `raw` so that
`save_pretrained` writes back the config.json the user gave us, untouched.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, ClassVar


class UnsupportedModelError(ValueError):
    """config.json names a model_type we have no model code for."""


class ModelConfigError(ValueError):
    """config.json is missing a key we need or holds a value we cannot honour."""


@dataclass
class MoEModelConfig:
    model_type: ClassVar[str] = ""  # the config.json model_type this class reads
    family: ClassVar[str] = ""  # our family name ('olmoe', 'mixtral', 'qwen2_moe', 'deepseek_moe')

    # --- trunk ---
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int  # per-head width; hidden_size // num_attention_heads unless the config says otherwise
    rms_norm_eps: float
    rope_theta: float
    rope_linear_factor: float = 1.0  # "linear" rope scaling divides positions by this factor
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"  # all four families use SwiGLU; anything else is rejected
    pad_token_id: int | None = None

    # --- attention options ---
    qkv_bias: bool = False  # bias on q/k/v projections (Qwen2-MoE: True)
    o_bias: bool = False  # bias on o_proj (OLMoE/DeepSeek attention_bias)
    qk_norm: bool = False  # RMSNorm over the full q and k projections before the head split (OLMoE)
    clip_qkv: float | None = None  # clamp q/k/v after projection (+norm) to [-c, c] (OLMoE option)
    sliding_windows: list[int | None] = field(default_factory=list)  # per layer; None = full attention

    # --- MoE ---
    moe_attr: str = "mlp"  # attribute (= checkpoint key segment) of the MoE block: 'mlp' or 'block_sparse_moe'
    proj_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")  # expert (gate, up, down) names
    num_experts: int = 0  # routed experts per MoE block
    top_k: int = 1  # experts per token
    moe_intermediate_size: int = 0  # width of one routed expert
    norm_topk_prob: bool = False  # renormalise the k selected softmax probabilities to sum to 1
    norm_eps: float = 0.0  # added to the renormalisation denominator (DeepSeek: 1e-20)
    weights_in_input_dtype: bool = True  # cast routing weights to the hidden dtype before use (Mixtral: keeps fp32)
    intermediate_size: int = 0  # width of a dense MLP layer (layers that are not MoE)
    moe_layers: list[bool] = field(default_factory=list)  # per layer: MoE block (True) or dense MLP (False)
    shared_attr: str | None = None  # 'shared_expert' (Qwen2-MoE) / 'shared_experts' (DeepSeek) / None
    shared_intermediate_size: int = 0  # width of the shared expert MLP
    shared_gate: bool = False  # Qwen2-MoE: sigmoid(shared_expert_gate(x)) scales the shared expert output

    raw: dict[str, Any] = field(default_factory=dict, repr=False)  # the config.json dict as read

    def __post_init__(self) -> None:
        if self.hidden_act != "silu":
            raise ModelConfigError(f"hidden_act={self.hidden_act!r} is not supported; only 'silu' (SwiGLU) is.")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ModelConfigError("num_attention_heads must be a multiple of num_key_value_heads.")
        n = self.num_hidden_layers
        if not self.sliding_windows:
            self.sliding_windows = [None] * n
        if not self.moe_layers:
            self.moe_layers = [True] * n
        if len(self.sliding_windows) != n or len(self.moe_layers) != n:
            raise ModelConfigError("per-layer settings must have num_hidden_layers entries.")
        if any(self.moe_layers) and not 1 <= self.top_k <= self.num_experts:
            raise ModelConfigError(f"num_experts_per_tok={self.top_k} must lie in [1, {self.num_experts}].")

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> "MoEModelConfig":
        """Build from a config.json dict (each family overrides `_fields_from_hf`)."""
        check_types(d)
        try:
            kw = cls._fields_from_hf(d)
        except KeyError as e:
            raise ModelConfigError(f"config.json lacks the required key {e.args[0]!r} "
                                   f"(the {cls.family} family needs it).") from None
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in kw.items() if k in names}, raw=dict(d))

    @classmethod
    def _fields_from_hf(cls, d: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def to_hf(self) -> dict[str, Any]:
        """The config.json dict to write next to the weights."""
        return dict(self.raw)


# config.json key -> (what it must be, test, null allowed); checked before any family reads the dict,
# so `"rms_norm_eps": "1e-5"` or `"vocab_size": null` is one sentence naming the key, not a TypeError
# deep in the model code (or a model silently built from a string).
def _int(lo: int):
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= lo


def _num(lo: float):
    return lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v >= lo and v == v and v != float("inf")


def _bool(v) -> bool:
    return isinstance(v, bool) or (type(v) is int and v in (0, 1))


_POS, _NONNEG = ("an integer > 0", _int(1)), ("an integer >= 0", _int(0))
CONFIG_KEY_TYPES: dict[str, tuple[str, Any, bool]] = {
    **{k: (*_POS, False) for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                                   "max_position_embeddings", "num_experts_per_tok", "decoder_sparse_step",
                                   "moe_layer_freq")},
    **{k: (*_POS, True) for k in ("num_key_value_heads", "head_dim")},
    **{k: (*_NONNEG, False) for k in ("intermediate_size", "moe_intermediate_size",
                                      "shared_expert_intermediate_size", "num_experts", "num_local_experts",
                                      "first_k_dense_replace", "max_window_layers")},
    **{k: (*_NONNEG, True) for k in ("n_routed_experts", "n_shared_experts", "sliding_window")},
    "pad_token_id": ("an integer", _int(-2**63), True),         # some hub configs say -1
    "rms_norm_eps": ("a number >= 0 (e.g. 1e-5)", _num(0.0), False),
    "rope_theta": ("a number > 0", lambda v: _num(0.0)(v) and v > 0, False),
    "clip_qkv": ("a number > 0", lambda v: _num(0.0)(v) and v > 0, True),
    **{k: ("true or false", _bool, False) for k in ("tie_word_embeddings", "norm_topk_prob", "attention_bias",
                                                    "qkv_bias", "use_sliding_window")},
    **{k: ("a string", lambda v: isinstance(v, str), False) for k in ("hidden_act", "scoring_func")},
    "mlp_only_layers": ("a list of layer indices", lambda v: isinstance(v, list) and all(_int(0)(i) for i in v), True),
    "layer_types": ("a list of strings", lambda v: isinstance(v, list) and all(isinstance(t, str) for t in v), True),
    **{k: ("an object", lambda v: isinstance(v, dict), True) for k in ("rope_scaling", "rope_parameters")},
}


def _shown(v: Any) -> str:
    """The value as config.json spells it, and its JSON kind: '"1e-5" (a string)', 'null'."""
    kind = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "an object"}.get(type(v))
    return json.dumps(v)[:60] + (f" ({kind})" if kind else "")


def check_types(d: dict[str, Any]) -> None:
    """ModelConfigError naming the first config.json key whose value has the wrong type or range.

    >>> check_types({"vocab_size": None})      # doctest: +IGNORE_EXCEPTION_DETAIL
    Traceback (most recent call last):
    ModelConfigError: config.json key 'vocab_size' must be an integer > 0; got null ...
    """
    for key, (what, ok, nullable) in CONFIG_KEY_TYPES.items():
        if key not in d or (d[key] is None and nullable):
            continue
        v = d[key]
        if not ok(v):
            raise ModelConfigError(f"config.json key {key!r} must be {what}{' or null' if nullable else ''}; "
                                   f"got {_shown(v)}; fix config.json or download the "
                                   f"model's own config.json again.")
    for key in ("rope_scaling", "rope_parameters"):
        sub = d.get(key) or {}
        for k in ("factor", "rope_theta"):
            if k in sub and not (_num(0.0)(sub[k]) and sub[k] > 0):
                raise ModelConfigError(f"config.json key '{key}.{k}' must be a number > 0; got {_shown(sub[k])}.")


def trunk_fields(d: dict[str, Any], *, eps: float, theta: float) -> dict[str, Any]:
    """Keys that mean the same thing in all four config.json flavours (defaults = transformers' defaults)."""
    try:
        hidden, heads, layers, vocab = (d["hidden_size"], d["num_attention_heads"],
                                        d["num_hidden_layers"], d["vocab_size"])
    except KeyError as e:
        raise ModelConfigError(f"config.json lacks the required key {e.args[0]!r}.") from None
    theta, factor = _rope(d, theta)
    return dict(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=d.get("num_key_value_heads") or heads,
        head_dim=d.get("head_dim") or hidden // heads,
        rms_norm_eps=d.get("rms_norm_eps", eps),
        rope_theta=theta,
        rope_linear_factor=factor,
        max_position_embeddings=d.get("max_position_embeddings", 4096),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        hidden_act=d.get("hidden_act", "silu"),
        pad_token_id=d.get("pad_token_id"),
    )


def _rope(d: dict[str, Any], default_theta: float) -> tuple[float, float]:
    # transformers 5 writes `rope_parameters`; hub configs from the 4.x era write rope_theta + rope_scaling.
    params = d.get("rope_parameters") or {}
    scaling = d.get("rope_scaling") or {}
    theta = params.get("rope_theta", d.get("rope_theta", default_theta))
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if kind == "default":
        return float(theta), 1.0
    if kind == "linear":
        return float(theta), float(params.get("factor") or scaling["factor"])
    raise ModelConfigError(f"rope type {kind!r} is not supported; supported: 'default', 'linear'.")
