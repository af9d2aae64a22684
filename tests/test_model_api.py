"""The specification's model API: transformers' module/class names, from_pretrained, detect_moe_architecture."""
from __future__ import annotations

import importlib
import json
import shutil

import pytest
import torch

from alphaquant import models
import tiny

NAMES = {  # family dir -> (model class, config class) as transformers / the hub code name them
    "olmoe": ("OlmoeForCausalLM", "OlmoeConfig"),
    "qwen2_moe": ("Qwen2MoeForCausalLM", "Qwen2MoeConfig"),
    "mixtral": ("MixtralForCausalLM", "MixtralConfig"),
    "deepseek_moe": ("DeepseekForCausalLM", "DeepseekConfig"),
}
LABELS = {"olmoe": "olmoe", "qwen2_moe": "qwen", "mixtral": "mixtral", "deepseek_moe": "deepseek"}


@pytest.mark.parametrize("family", list(NAMES))
def test_modeling_and_configuration_modules_have_transformers_names(family):
    model_cls, config_cls = NAMES[family]
    modeling = importlib.import_module(f"models.{family}.modeling_{family}")
    configuration = importlib.import_module(f"models.{family}.configuration_{family}")
    cls = getattr(modeling, model_cls)
    assert issubclass(cls, models.MoEForCausalLM) and cls.config_class is getattr(configuration, config_cls)
    assert cls.config_class.family == family


@pytest.fixture(scope="module")
def olmoe_dir(tmp_path_factory):
    return tiny.make_checkpoint("olmoe", tmp_path_factory.mktemp("model_api") / "olmoe")


def test_from_pretrained_classmethod(olmoe_dir):
    from alphaquant.models.mixtral.modeling_mixtral import MixtralForCausalLM
    from alphaquant.models.olmoe.modeling_olmoe import OlmoeForCausalLM

    m = OlmoeForCausalLM.from_pretrained(olmoe_dir, torch_dtype=torch.bfloat16, device_map=None)
    ref = models.from_pretrained(olmoe_dir, dtype="bf16")
    assert type(m) is OlmoeForCausalLM and m.dtype == torch.bfloat16
    for (k, a), (_, b) in zip(m.state_dict().items(), ref.state_dict().items()):
        assert torch.equal(a, b), k
    assert models.MoEForCausalLM.from_pretrained(olmoe_dir, device_map="cpu").dtype == torch.float32
    with pytest.raises(ValueError, match="OlmoeForCausalLM.from_pretrained"):
        MixtralForCausalLM.from_pretrained(olmoe_dir)
    with pytest.raises(ValueError, match="one device"):
        OlmoeForCausalLM.from_pretrained(olmoe_dir, device_map={"": 0})


def test_from_pretrained_on_a_quantized_checkpoint_names_load_quantized(olmoe_dir, tmp_path):
    q = tmp_path / "q"
    shutil.copytree(olmoe_dir, q)
    cfg = json.loads((q / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "compressed-tensors", "alphaquant": {"groups": {}}}
    (q / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(models.CheckpointError, match=r"alphaquant\.export\.load_quantized"):
        models.from_pretrained(q)
    cfg["quantization_config"] = {"quant_method": "gptq"}
    (q / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(models.CheckpointError, match="'gptq'"):
        models.from_pretrained(q)


def test_relative_model_paths_say_which_directory_was_tried(tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.chdir(tmp_path)

    def offline(*a, **k):
        raise ConnectionError("offline")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(FileNotFoundError) as e:
        models.from_pretrained("demo/olmoe-tiny")          # looks like a hub id: both are named
    assert str(tmp_path / "demo/olmoe-tiny") in str(e.value) and "current directory" in str(e.value)
    with pytest.raises(FileNotFoundError) as e:
        models.from_pretrained("some/local/dir")
    assert str(tmp_path / "some/local/dir") in str(e.value)


@pytest.mark.parametrize("family", list(NAMES))
def test_detect_moe_architecture_on_our_models_configs_and_directories(family, tmp_path):
    import alphaquant
    from alphaquant.gptq import detect_moe_architecture

    assert detect_moe_architecture is alphaquant.detect_moe_architecture
    cfg = {**tiny.BASE, **tiny.FAMILIES[family], "num_hidden_layers": 1}
    model = models.from_config(cfg, seed=0)
    assert detect_moe_architecture(model) == LABELS[family]
    assert detect_moe_architecture(model.config) == LABELS[family]
    assert detect_moe_architecture(cfg) == LABELS[family]
    models.save_pretrained(model, tmp_path / "m")
    assert detect_moe_architecture(tmp_path / "m") == LABELS[family]
    assert detect_moe_architecture(str(tmp_path / "m")) == LABELS[family]


def test_detect_moe_architecture_on_transformers_models():
    import transformers

    from alphaquant import detect_moe_architecture

    small = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                 num_key_value_heads=2)
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(**small))
    assert detect_moe_architecture(llama) == "standard"
    olmoe = transformers.OlmoeForCausalLM(transformers.OlmoeConfig(**small, num_experts=4, num_experts_per_tok=2))
    assert detect_moe_architecture(olmoe) == "olmoe" and detect_moe_architecture(olmoe.config) == "olmoe"
    qwen3 = transformers.Qwen3MoeConfig(**small, moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2)
    assert detect_moe_architecture(transformers.Qwen3MoeForCausalLM(qwen3)) == "generic_moe"
    assert set(importlib.import_module("alphaquant.api.detect").LABELS.values()) == {
        "olmoe", "qwen", "mixtral", "deepseek", "generic_moe", "standard"}


def test_relative_data_paths_say_which_file_was_tried(tmp_path, monkeypatch):
    from alphaquant.data_sources import load_text
    from alphaquant.errors import DataError

    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError) as e:
        load_text("demo/corpus/train.txt", key="calibration.dataset")
    assert str(tmp_path / "demo/corpus/train.txt") in str(e.value) and "current directory" in str(e.value)


# --- generate ---------------------------------------------------------------------------------------------------
def _greedy_without_cache(model, ids, n):
    for _ in range(n):                  # the whole sequence again for every token: the plain reference
        ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


GEN_CASES = {**{f: {} for f in tiny.FAMILIES}, "mixtral_sliding": {"sliding_window": 5}}


@pytest.mark.parametrize("case", list(GEN_CASES))
def test_greedy_generate_with_kv_cache_equals_recomputing_everything(case):
    family = case.split("_sliding")[0]
    cfg = {**tiny.BASE, **tiny.FAMILIES[family], **GEN_CASES[case], "initializer_range": 0.3}
    model = models.from_config(cfg, seed=3)
    ids = torch.randint(1, 320, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = _greedy_without_cache(model, ids, 9)
    got = model.generate(ids, max_new_tokens=9)
    assert torch.equal(got, expected)
    assert len(set(got[0, 7:].tolist())) > 1        # not a degenerate constant continuation


def test_greedy_generate_matches_transformers(tmp_path):
    import transformers

    config = transformers.OlmoeConfig(vocab_size=128, hidden_size=32, intermediate_size=16, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, num_experts=4,
                                      num_experts_per_tok=2, initializer_range=0.3, pad_token_id=0, eos_token_id=None)
    torch.manual_seed(0)
    ref = transformers.OlmoeForCausalLM(config).eval()
    ref.save_pretrained(tmp_path)
    ours = models.from_pretrained(tmp_path, dtype="fp32")
    ids = torch.randint(1, 128, (1, 6), generator=torch.Generator().manual_seed(2))
    expected = ref.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(ours.generate(ids, max_new_tokens=8), expected)


def test_sampled_generate_is_seeded_and_honours_eos_and_top_k():
    cfg = {**tiny.BASE, **tiny.FAMILIES["olmoe"], "initializer_range": 0.3}
    model = models.from_config(cfg, seed=0)
    ids = torch.randint(1, 320, (3, 4), generator=torch.Generator().manual_seed(1))
    a = model.generate(ids, 12, do_sample=True, temperature=0.9, top_p=0.9, generator=torch.Generator().manual_seed(5))
    b = model.generate(ids, 12, do_sample=True, temperature=0.9, top_p=0.9, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and a.shape == (3, 16) and torch.equal(a[:, :4], ids)
    # top_k=1 sampling is greedy
    assert torch.equal(model.generate(ids, 6, do_sample=True, top_k=1, generator=torch.Generator().manual_seed(0)),
                       model.generate(ids, 6))
    greedy = model.generate(ids, 6)
    eos = int(greedy[0, 5])                      # row 0 emits this as its second new token
    out = model.generate(ids, 6, eos_token_id=eos)
    first = (out[0, 4:] == eos).nonzero()[0, 0]
    assert (out[0, 4 + first:] == eos).all() and torch.equal(out[0, :4 + first], greedy[0, :4 + first])
