"""ModelConfig normalization: transformers-4 and -5 style configs, defaults, and serialization."""
from __future__ import annotations

import numpy as np
import pytest

from blobstore.config import ConfigError, ModelConfig, RopeParams

GEMMA3_V4 = {  # the shape of a released Gemma 3 config.json (transformers 4): sparse, legacy rope keys
    "architectures": ["Gemma3ForConditionalGeneration"], "torch_dtype": "bfloat16",
    "text_config": {"hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text",
                    "num_hidden_layers": 34, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
                    "sliding_window": 1024},
    "vision_config": {"hidden_size": 1152}, "eos_token_id": [1, 106], "mm_tokens_per_image": 256,
}
GEMMA3_V5 = {
    "architectures": ["Gemma3ForConditionalGeneration"], "dtype": "bfloat16",
    "text_config": {"hidden_size": 2560, "intermediate_size": 10240, "num_hidden_layers": 34, "sliding_window": 1024,
                    "_sliding_window_pattern": 6,
                    "layer_types": ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(34)],
                    "rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                                        "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}},
    "vision_config": {"hidden_size": 1152},
}


def test_transformers_4_and_5_styles_normalize_identically():
    v4, v5 = ModelConfig.from_hf(GEMMA3_V4), ModelConfig.from_hf(GEMMA3_V5)
    assert v4 == v5
    assert v4.num_heads == 8 and v4.head_dim == 256 and v4.vocab_size == 262208  # class defaults
    assert v4.rope[5] == RopeParams(1e6, "linear", factor=8.0) and v4.rope[0] == RopeParams(1e4)
    assert v4.sliding_window[:6] == (1024,) * 5 + (0,)
    assert v4.embedding_scale == 50.5  # sqrt(2560) = 50.596 rounded to bfloat16, as transformers computes it


def test_layer_types_win_over_a_stale_pattern():
    config = {**GEMMA3_V5, "text_config": {**GEMMA3_V5["text_config"], "num_hidden_layers": 4,
                                           "sliding_window_pattern": 6, "_sliding_window_pattern": 6,
                                           "layer_types": ["sliding_attention", "full_attention"] * 2}}
    assert ModelConfig.from_hf(config).layer_types == ("sliding_attention", "full_attention") * 2


def test_generation_config_eos_ids_join_the_config_ones():
    cfg = ModelConfig.from_hf({**GEMMA3_V5, "text_config": {**GEMMA3_V5["text_config"], "eos_token_id": 1}},
                              {"eos_token_id": [1, 106], "bos_token_id": 2})
    assert cfg.eos_token_ids == (1, 106) and cfg.bos_token_id == 2


def test_llama3_rope_matches_transformers():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    hf = transformers.LlamaConfig(hidden_size=2048, num_attention_heads=32, max_position_embeddings=131072,
                                  rope_parameters=rope)
    inv_freq, _ = ROPE_INIT_FUNCTIONS["llama3"](hf, torch.device("cpu"))
    cfg = ModelConfig.from_hf({"architectures": ["LlamaForCausalLM"], "hidden_size": 2048, "num_attention_heads": 32,
                               "max_position_embeddings": 131072, "rope_scaling": rope, "rope_theta": 500000.0})
    np.testing.assert_allclose(cfg.rope[0].inv_freq(cfg.head_dim), inv_freq.numpy(), rtol=2e-6)


def test_to_dict_from_dict_round_trip_and_unknown_keys():
    cfg = ModelConfig.from_hf(GEMMA3_V4)
    data = {**cfg.to_dict(), "a_field_from_a_newer_writer": 1}
    assert ModelConfig.from_dict(data) == cfg
    data.pop("rms_norm_eps")
    with pytest.raises(ConfigError, match="missing field.*rms_norm_eps"):
        ModelConfig.from_dict(data)


def test_expected_tensors_follow_the_config():
    cfg = ModelConfig.from_hf({"architectures": ["Qwen2ForCausalLM"], "hidden_size": 64, "num_attention_heads": 4,
                               "num_key_value_heads": 2, "num_hidden_layers": 1, "intermediate_size": 96,
                               "vocab_size": 10})
    shapes = cfg.expected_tensors()
    assert shapes["layers.0.k"] == (32, 64) and shapes["layers.0.k_bias"] == (32,)
    assert "layers.0.o_bias" not in shapes and "layers.0.q_norm" not in shapes
    assert shapes["layers.0.down"] == (64, 96) and shapes["lm_head"] == (10, 64)


@pytest.mark.parametrize("field, value, message", [
    ("hidden_act", "relu", "hidden_act: 'relu' is not supported"),
    ("num_hidden_layers", "2", "num_hidden_layers: expected an integer"),
    ("layer_types", ["full_attention"], "layer_types: expected 2 entries"),
    ("mlp_bias", True, "mlp_bias: true is not supported"),
    ("num_key_value_heads", 3, "not a multiple of num_kv_heads"),
])
def test_bad_fields_are_named(field, value, message):
    config = {"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "num_attention_heads": 4,
              "num_hidden_layers": 2, field: value}
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_hf(config)


def test_legacy_rope_scaling_spelled_with_type():
    cfg = ModelConfig.from_hf({"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "num_attention_heads": 4,
                               "num_hidden_layers": 1, "rope_theta": 1e4,
                               "rope_scaling": {"type": "linear", "factor": 2.0}})
    assert cfg.rope == (RopeParams(1e4, "linear", factor=2.0),)
    np.testing.assert_allclose(cfg.rope[0].inv_freq(16), RopeParams(1e4).inv_freq(16) / 2, rtol=1e-7)


def test_mistral_window_applies_to_every_layer_unless_null():
    base = {"architectures": ["MistralForCausalLM"], "hidden_size": 64, "num_attention_heads": 4,
            "num_key_value_heads": 2, "num_hidden_layers": 2}
    assert ModelConfig.from_hf(base).sliding_window == (4096, 4096)  # the class default
    assert ModelConfig.from_hf({**base, "sliding_window": None}).layer_types == ("full_attention",) * 2


def test_qwen_window_starts_at_max_window_layers():
    cfg = ModelConfig.from_hf({"architectures": ["Qwen2ForCausalLM"], "hidden_size": 64, "num_attention_heads": 4,
                               "num_key_value_heads": 4, "num_hidden_layers": 4, "use_sliding_window": True, "sliding_window": 32,
                               "max_window_layers": 2})
    assert cfg.sliding_window == (0, 0, 32, 32) and cfg.qkv_bias and not cfg.o_bias
