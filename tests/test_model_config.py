"""LlamaConfig: HF config.json in both rope formats, validation, presets vs transformers counts."""

from __future__ import annotations

import json

import jax
import pytest
import torch
import transformers
from flax import nnx

from basque_jax import Llama, LlamaConfig
from basque_jax.model.config import PRESETS, ConfigError, RopeScaling


def test_reads_classic_and_transformers5_rope_keys(tmp_path):
    classic = LlamaConfig.preset("llama3.1-8b").to_hf_dict()
    assert classic["rope_scaling"]["factor"] == 8.0 and classic["rope_theta"] == 500000.0
    modern = transformers.LlamaConfig(**{k: v for k, v in classic.items()
                                         if k not in ("architectures", "torch_dtype")})
    modern_dict = modern.to_dict()
    assert "rope_parameters" in modern_dict
    path = tmp_path / "config.json"
    path.write_text(json.dumps(modern_dict))
    assert LlamaConfig.from_hf_file(tmp_path) == LlamaConfig.preset("llama3.1-8b")
    assert LlamaConfig.from_hf_dict(classic) == LlamaConfig.preset("llama3.1-8b")


def test_legacy_type_key_and_linear_scaling():
    d = LlamaConfig.preset("tiny").to_hf_dict()
    d["rope_scaling"] = {"type": "linear", "factor": 2.0}
    assert LlamaConfig.from_hf_dict(d).rope_scaling == RopeScaling("linear", 2.0)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "unknown rope_type 'dynamic'"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "lacks low_freq_factor"),
        ({"hidden_size": 65, "head_dim": None}, "not divisible by num_attention_heads"),
        ({"num_key_value_heads": 3}, "not a multiple of num_key_value_heads"),
        ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
        ({"attention_bias": True}, "attention_bias"),
        ({"model_type": "mistral"}, "model_type 'mistral'"),
        ({"vocab_size": 0}, "vocab_size must be a positive integer"),
    ],
)
def test_invalid_hf_configs_give_clear_errors(change, message):
    d = LlamaConfig.preset("tiny").to_hf_dict()
    d.update(change)
    with pytest.raises(ConfigError, match=rf"my/config\.json: .*{message}"):
        LlamaConfig.from_hf_dict(d, source="my/config.json")


def test_missing_key_named():
    d = LlamaConfig.preset("tiny").to_hf_dict()
    del d["intermediate_size"]
    with pytest.raises(ConfigError, match="missing key.*intermediate_size"):
        LlamaConfig.from_hf_dict(d)


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown model preset 'llama9'"):
        LlamaConfig.preset("llama9")


def _transformers_count(cfg: LlamaConfig) -> int:
    hf_cfg = transformers.LlamaConfig(**{k: v for k, v in cfg.to_hf_dict().items()
                                         if k not in ("architectures", "torch_dtype")})
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(hf_cfg)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_parameter_counts_equal_transformers(name):
    cfg = LlamaConfig.preset(name)
    assert cfg.num_parameters == _transformers_count(cfg)
    abstract = nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0)))
    ours = sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
    assert ours == cfg.num_parameters


def test_published_counts():
    assert LlamaConfig.preset("llama3.1-8b").num_parameters == 8_030_261_248
    assert LlamaConfig.preset("llama3.1-70b").num_parameters == 70_553_706_496
