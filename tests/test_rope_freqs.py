"""Rope scaling carried as data: Llama 3.1's `rope_freqs` GGUF tensor, and the kinds refused by name.

llama.cpp's converter bakes Llama 3.1/3.2 "llama3" scaling into a GGUF as one divisor per
frequency (`rope_freqs.weight`) and writes no rope scaling keys; the converter reads the divisors
into the stored rope config, and the model must then match transformers running the HF checkpoint.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from blobstore.config import ConfigError, ModelConfig
from blobstore.convert import convert
from blobstore.runtime import load

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")
st = pytest.importorskip("safetensors.torch")

from test_convert_gguf import LLAMA_NORMS, gguf_name, llama_transform, write_gguf  # noqa: E402

T = gguf.GGMLQuantizationType


def llama_cpp_rope_freqs(hf: dict) -> np.ndarray:
    """The divisors llama.cpp's convert_hf_to_gguf writes for llama3 scaling: 1 for wavelengths
    under original / high_freq_factor, `factor` above original / low_freq_factor, and between them
    the reciprocal of the smooth blend (1 - s) / factor + s."""
    rope = hf["rope_parameters"]
    dim = hf["head_dim"]
    base = 1.0 / rope["rope_theta"] ** (np.arange(0, dim, 2, dtype=np.float32) / dim)
    original, low, high, factor = (rope["original_max_position_embeddings"], rope["low_freq_factor"],
                                   rope["high_freq_factor"], rope["factor"])
    wavelength = 2 * math.pi / base.astype(np.float64)
    smooth = (original / wavelength - low) / (high - low)
    divisors = np.where(wavelength < original / high, 1.0,
                        np.where(wavelength > original / low, factor, 1 / ((1 - smooth) / factor + smooth)))
    return divisors.astype(np.float32)


def test_llama31_gguf_with_rope_freqs_matches_transformers(checkpoints, tmp_path, spm_model):
    folder = checkpoints("llama")  # llama3 rope scaling, original context 64
    hf = json.loads((folder / "config.json").read_text())
    tensors = {}
    for hf_name, tensor in st.load_file(folder / "model.safetensors").items():
        name = gguf_name(hf_name, LLAMA_NORMS)
        tensors[name] = (llama_transform(name, tensor.float().numpy(), hf), T.F32)
    divisors = llama_cpp_rope_freqs(hf)
    assert 1.0 < divisors.max() and divisors.min() == 1.0  # the fixture scales some frequencies, not all
    path = tmp_path / "llama31.gguf"
    write_gguf(path, "llama", hf, tensors, spm_model,
               extra_keys=[("rope.freq_base", hf["rope_parameters"]["rope_theta"])],
               extra_tensors={"rope_freqs.weight": (divisors, T.F32)})
    convert(path, tmp_path / "llama31.blob", dtype="f32", quiet=True)
    model = load(tmp_path / "llama31.blob")
    assert model.config.rope[0].kind == "factors"
    reference = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                                  attn_implementation="eager").eval()
    ids = [2] + np.random.default_rng(0).integers(4, 400, 69).tolist()
    with torch.no_grad():
        theirs = reference(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(model.forward(ids) - theirs).max() <= 1e-3


TINY = {"architectures": ["LlamaForCausalLM"], "vocab_size": 32, "hidden_size": 16, "intermediate_size": 32,
        "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": 128}


@pytest.mark.parametrize("kind", ["yarn", "dynamic"])
def test_yarn_and_dynamic_are_refused_by_name(kind):
    scaling = {"rope_type": kind, "factor": 4.0, "original_max_position_embeddings": 32}
    with pytest.raises(ConfigError, match=rf"rope type '{kind}' is not supported; "
                                          r"supported: default, linear, llama3, longrope"):
        ModelConfig.from_hf({**TINY, "rope_scaling": scaling})
    with pytest.raises(ConfigError, match=rf"rope_parameters: rope type '{kind}' is not supported"):
        ModelConfig.from_hf({**TINY, "rope_parameters": {**scaling, "rope_theta": 1e4}})
    meta = {"general.architecture": "llama", "llama.embedding_length": 16, "llama.rope.scaling.type": kind}
    with pytest.raises(ConfigError, match=rf"GGUF field llama.rope.scaling.type: '{kind}' is not supported; "
                                          r"supported: none, linear"):
        ModelConfig.from_gguf(meta)


def test_rope_factor_lists_must_fit_the_rotated_dimensions():
    scaling = {"rope_type": "longrope", "short_factor": [1.0] * 3, "long_factor": [2.0] * 4,
               "original_max_position_embeddings": 32}
    with pytest.raises(ConfigError, match=r"short_factor: expected 4 values \(one per rotated pair\), found 3"):
        ModelConfig.from_hf({**TINY, "rope_scaling": scaling})
    meta = {"general.architecture": "llama", "llama.embedding_length": 16, "llama.block_count": 1,
            "llama.feed_forward_length": 32, "llama.attention.head_count": 2, "llama.vocab_size": 32,
            "llama.attention.layer_norm_rms_epsilon": 1e-5, "llama.context_length": 128}
    with pytest.raises(ConfigError, match=r"factors: expected 4 values \(one per rotated pair\), found 8"):
        ModelConfig.from_gguf(meta, rope_tensors={"rope_freqs.weight": np.ones(8, np.float32)})
    with pytest.raises(ConfigError, match="two rope scalings at once"):
        ModelConfig.from_gguf({**meta, "llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 2.0},
                              rope_tensors={"rope_freqs.weight": np.ones(4, np.float32)})


def test_longrope_inv_freq_and_attention_factor_match_transformers():
    from transformers import Phi3Config
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rng = np.random.default_rng(3)
    short, long = (1 + rng.random(12)).tolist(), (1 + 9 * rng.random(12)).tolist()
    hf = dict(hidden_size=128, num_attention_heads=4, max_position_embeddings=4096,
              original_max_position_embeddings=256, partial_rotary_factor=0.75, rope_theta=250000.0,
              rope_scaling={"type": "longrope", "short_factor": short, "long_factor": long})
    rope = ModelConfig.from_hf({**hf, "architectures": ["Phi3ForCausalLM"], "vocab_size": 32,
                                "intermediate_size": 64, "num_hidden_layers": 1}).rope[0]
    config = Phi3Config(**hf)
    for long_context, seq_len in ((False, None), (True, 257)):
        want, attention = ROPE_INIT_FUNCTIONS["longrope"](config, "cpu", seq_len=seq_len)
        np.testing.assert_allclose(rope.inv_freq(32, long_context), want.numpy(), rtol=1.2e-7)  # torch's pow: an ulp
        assert rope.attention_factor == attention
    assert (rope.uses_long_factors(256), rope.uses_long_factors(257)) == (False, True)
