"""bench/e2e.py's error stage compares llm-compressor's weights with ours module by module: the names of
llm-compressor 0.14's linearised MoE model (transformers 5 fuses the experts, load_quantizable_moe splits them
again into mlp.experts.N.{gate,up,down}_proj) mapped onto our model's parameter names, for every family."""
import argparse
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import e2e  # noqa: E402

# What llm-compressor 0.14 (transformers 5.17) names the quantizable linears of a decoder layer, read from
# load_quantizable_moe's model of bench/e2e.py --quick checkpoints (expert 0 stands for every expert), and our
# parameter each one must land on.
LLMC_TO_OURS = {
    "mixtral": {"self_attn.q_proj": "self_attn.q_proj", "self_attn.k_proj": "self_attn.k_proj",
                "self_attn.v_proj": "self_attn.v_proj", "self_attn.o_proj": "self_attn.o_proj",
                "mlp.experts.0.gate_proj": "block_sparse_moe.experts.0.w1",
                "mlp.experts.0.up_proj": "block_sparse_moe.experts.0.w3",
                "mlp.experts.0.down_proj": "block_sparse_moe.experts.0.w2",
                "mlp.experts.11.down_proj": "block_sparse_moe.experts.11.w2",
                "mlp.gate": "block_sparse_moe.gate"},
    "olmoe": {n: n for n in ("self_attn.q_proj", "self_attn.o_proj", "mlp.experts.0.gate_proj",
                             "mlp.experts.0.up_proj", "mlp.experts.7.down_proj", "mlp.gate")},
    "qwen2_moe": {n: n for n in ("self_attn.q_proj", "mlp.experts.0.gate_proj", "mlp.experts.0.up_proj",
                                 "mlp.experts.0.down_proj", "mlp.shared_expert.gate_proj",
                                 "mlp.shared_expert.up_proj", "mlp.shared_expert.down_proj",
                                 "mlp.shared_expert_gate")},
    "deepseek": {n: n for n in ("self_attn.q_proj", "mlp.gate_proj", "mlp.down_proj", "mlp.experts.0.gate_proj",
                                "mlp.experts.0.up_proj", "mlp.experts.0.down_proj",
                                "mlp.shared_experts.up_proj")},
    "qwen3_moe": {n: n for n in ("self_attn.q_proj", "mlp.experts.0.gate_proj", "mlp.experts.0.up_proj",
                                 "mlp.experts.0.down_proj")},
}


@pytest.mark.parametrize("family", sorted(LLMC_TO_OURS))
def test_llmc_names_map_to_ours(family):
    for theirs, ours in LLMC_TO_OURS[family].items():
        assert e2e.llmc_to_ours(family, theirs) == ours
        assert e2e.llmc_to_ours(family, theirs + ".weight") == ours + ".weight"


def _build(tmp_path, family, layers):
    args = argparse.Namespace(family=family, quick=True, layers=layers, device="cpu", seed=0, samples=2, seq_len=16)
    e2e.stage_build(args, tmp_path)
    return tmp_path / "model"


@pytest.mark.parametrize("family", ["mixtral", "olmoe", "qwen2_moe", "deepseek"])
def test_llmc_weights_fn_lands_on_our_parameters(tmp_path, family):
    """Every name the error stage loads exists in our layer (the layer with experts: deepseek's 0 is dense)."""
    from alphaquant import models

    layers = 2 if family == "deepseek" else 1
    fp = models.from_pretrained(_build(tmp_path, family, layers), dtype="bfloat16", lazy=True)
    i = layers - 1
    layer = models.load_layer(fp, i, device="cpu")
    params = dict(layer.named_parameters())
    theirs = {f"model.layers.{i}.{n}": torch.zeros(1) for n in LLMC_TO_OURS[family] if ".11." not in n
              and (family != "deepseek" or n not in ("mlp.gate_proj", "mlp.down_proj"))}
    got = e2e.llmc_weights_fn(theirs, family)(i)
    assert got and set(got) <= set(params), sorted(set(got) - set(params))
    with pytest.raises(KeyError, match="LLMC_RENAMES"):       # a name our layer lacks: a clear error
        e2e._load_weights(layer, {"mlp.experts.0.nope.weight": torch.zeros(1)}, "cpu")


@pytest.mark.skipif(importlib.util.find_spec("llmcompressor") is None, reason="llmcompressor not importable")
@pytest.mark.parametrize("family", ["mixtral", "olmoe", "qwen2_moe"])
def test_llmc_linearised_model_matches_ours(tmp_path, family):
    """llm-compressor's own linearised model: each of its linears of layer 0 maps onto one of our parameters and
    holds the same (unquantized) weight, so w1/w3 (gate/up) are not swapped."""
    from llmcompressor.modeling.moe.linearize import load_quantizable_moe
    from transformers import AutoModelForCausalLM

    from alphaquant import models

    ckpt = _build(tmp_path, family, 1)
    e2e._drop_unimportable_transformers_aliases()
    with load_quantizable_moe():
        hf = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16)
    theirs = {n: m.weight.detach() for n, m in hf.named_modules()
              if isinstance(m, torch.nn.Linear) and n.startswith("model.layers.0.")}
    ours = dict(models.load_layer(models.from_pretrained(ckpt, dtype="bfloat16", lazy=True), 0,
                                  device="cpu").named_parameters())
    mapped = e2e.llmc_weights_fn(theirs, family)(0)
    assert len(mapped) == len(theirs) > 4
    for name, w in mapped.items():
        assert name in ours, name
        torch.testing.assert_close(w, ours[name].detach(), rtol=0, atol=0, msg=name)
