"""Decoder layer, trunk and causal-LM wrapper shared by the four families.

Layer-by-layer use (what the calibration loop does)::

    hidden, kw = model.prepare_layer_inputs(input_ids, attention_mask)   # (B, S, H), dict
    for layer in model.model.layers:
        hidden = layer(hidden, **kw)                                     # (B, S, H), a plain tensor
    logits = model.head(hidden)                                          # final norm + lm_head: (B, S, V)
"""

from __future__ import annotations

import torch
from torch import nn

from .attention import Attention, causal_mask
from .config import MoEModelConfig
from .layers import RMSNorm, SwiGLUMLP, rotary_cos_sin
from .moe import SparseMoeBlock


class DecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then h + mlp(norm(h)); the MLP is MoE or dense per config."""

    def __init__(self, cfg: MoEModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.self_attn = Attention(cfg, layer_idx)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        # Mixtral names its MoE block 'block_sparse_moe'; a dense layer is always 'mlp'.
        self.mlp_attr = cfg.moe_attr if cfg.moe_layers[layer_idx] else "mlp"
        mlp = SparseMoeBlock(cfg) if cfg.moe_layers[layer_idx] else SwiGLUMLP(cfg.hidden_size, cfg.intermediate_size)
        setattr(self, self.mlp_attr, mlp)

    @property
    def mlp_block(self) -> nn.Module:
        return getattr(self, self.mlp_attr)

    def forward(self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
                attention_mask: torch.Tensor | None = None, resume: str | None = None,
                resume_input: torch.Tensor | None = None) -> torch.Tensor:
        """resume (calibration's attention reuse, alphaquant/pipeline/attention_reuse.py) starts part-way, from
        what an earlier forward of the same weights computed, with the same ops after that point:
        "o_proj": resume_input is self_attn.o_proj's input (B, S, heads x head_dim), hidden_states the layer input;
        "mlp": hidden_states is already h = x + attn(norm(x)), the input of post_attention_layernorm;
        "down": hidden_states is h and resume_input (act, route) what the MoE block's `expert_act` received (its
        routed experts' down_proj inputs and their ExpertRoute): the block continues from its down matmul."""
        if resume == "down":
            block = self.mlp_block
            out = block.from_down_inputs(*resume_input, lambda: self.post_attention_layernorm(hidden_states).reshape(
                -1, hidden_states.shape[-1]))
            return hidden_states + out.reshape(hidden_states.shape)
        if resume == "mlp":
            h = hidden_states
        elif resume == "o_proj":
            h = hidden_states + self.self_attn.o_proj(resume_input)
        elif resume is None:
            h = hidden_states + self.self_attn(self.input_layernorm(hidden_states), position_embeddings, attention_mask)
        else:
            raise ValueError(f"resume must be None, 'o_proj', 'mlp' or 'down', got {resume!r}")
        return h + self.mlp_block(self.post_attention_layernorm(h))


class DecoderModel(nn.Module):
    """The trunk: model.embed_tokens, model.layers, model.norm (checkpoint prefix 'model.')."""

    def __init__(self, cfg: MoEModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LMHead(nn.Module):
    """Final norm + lm_head: (B, S, H) -> logits (B, S, V)."""

    def __init__(self, norm: nn.Module, lm_head: nn.Linear) -> None:
        super().__init__()
        self.norm, self.lm_head = norm, lm_head

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(hidden_states))


class MoEForCausalLM(nn.Module):
    """Causal LM for any of the four families; `forward` returns the logits tensor (B, S, V)."""

    config_class: type[MoEModelConfig] = MoEModelConfig

    def __init__(self, config: MoEModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = DecoderModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.checkpoint = None  # a CheckpointReader once loaded from disk (lazy layers read from it)
        self.lazy = False  # True when loaded with lazy=True: decoder layers live on meta until load_layer

    @classmethod
    def from_pretrained(cls, path_or_id, torch_dtype=None, device_map=None, *, dtype=None, lazy: bool = False):
        """transformers-style loading: `OlmoeForCausalLM.from_pretrained("allenai/OLMoE-1B-7B-0924",
        torch_dtype=torch.bfloat16)`; the same as `models.from_pretrained(path, dtype=..., device=...)`.

        torch_dtype (or dtype): a torch dtype or 'bf16'/'fp16'/'fp32'; None = config.json's.
        device_map: None or "cpu" (host memory), "cuda", "cuda:N", a torch.device, or "auto" (the GPU if
        there is one); the whole model goes to that one device (no per-module maps). Called on a family
        class, the checkpoint must be of that family; MoEForCausalLM.from_pretrained takes any of the four.
        A quantized checkpoint is refused with the reader to use (alphaquant.export.load_quantized).
        """
        from alphaquant.models.loading import from_pretrained

        if torch_dtype is not None and dtype is not None and torch_dtype != dtype:
            raise ValueError("give torch_dtype or dtype, not both")
        if isinstance(device_map, dict):
            raise ValueError("device_map as a per-module mapping is not supported: the model is loaded onto one "
                             "device; pass 'cpu', 'cuda', 'cuda:N' or 'auto'")
        if device_map == "auto":
            device_map = "cuda" if torch.cuda.is_available() else "cpu"
        model = from_pretrained(path_or_id, dtype=torch_dtype if torch_dtype is not None else dtype,
                                device=device_map, lazy=lazy)
        if not isinstance(model, cls):
            raise ValueError(f"{str(path_or_id)!r} holds a {type(model).__name__} checkpoint (model_type "
                             f"{model.config.model_type!r}), not a {cls.__name__}; load it with "
                             f"{type(model).__name__}.from_pretrained or models.from_pretrained")
        return model

    @property
    def family(self) -> str:
        return self.config.family

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    def prepare_layer_inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        """Embed tokens and build what every decoder layer needs.

        input_ids (B, S) long; attention_mask (B, S) with 1 = real token, 0 = padding (any side).
        Returns (hidden_states (B, S, H), layer_kwargs) with layer(hidden_states, **layer_kwargs) -> (B, S, H).
        """
        hidden = self.model.embed_tokens(input_ids)
        return hidden, self.layer_kwargs(hidden, attention_mask)

    def layer_kwargs(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None) -> dict:
        """kwargs of every decoder layer for a (B, S, H) batch: rotary cos/sin (dtype and device of the hidden
        states) and the (B, 1, S, S) boolean causal+padding mask. Positions are 0..S-1 for every row, as
        transformers uses when no position_ids are given."""
        B, S, _ = hidden_states.shape
        cfg, device = self.config, hidden_states.device
        positions = torch.arange(S, device=device)[None]  # (1, S)
        cos, sin = rotary_cos_sin(positions, cfg.head_dim, cfg.rope_theta, cfg.rope_linear_factor,
                                  hidden_states.dtype)
        mask = causal_mask(None if attention_mask is None else attention_mask.to(device), B, S, device)
        return {"position_embeddings": (cos, sin), "attention_mask": mask}

    def head(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Final norm + lm_head: (B, S, H) -> logits (B, S, V)."""
        return self.lm_head(self.model.norm(hidden_states))

    def head_module(self) -> "LMHead":
        """The head as a module (shares this model's norm and lm_head), for pipelines that run modules."""
        return LMHead(self.model.norm, self.lm_head)

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 32, **kwargs) -> torch.Tensor:
        """Greedy (default) or sampled decoding with a KV cache: (B, S) prompt -> (B, S + n) ids.
        kwargs: do_sample, temperature, top_k, top_p, eos_token_id, generator (models/common/generate.py)."""
        from .generate import generate
        return generate(self, input_ids, max_new_tokens, **kwargs)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        hidden, kw = self.prepare_layer_inputs(input_ids, attention_mask)
        for layer in self.model.layers:
            hidden = layer(hidden, **kw)
        return self.head(hidden)
