"""The --dtype mixes q4_k_m / q5_k_m on the demo model (real trained weights, tests/fixtures/demo-gemma3):
their KL divergence to the f32 model's next-token distributions on held-out text, against q4_0 and
q6_k, and a real conversion's per-tensor types.

Weights only: every matrix goes through its stored type and back to f32 (tests/quant_quality.py)
and the runtime's f32 forward pass reads them, so these bars hold whether or not the kernels
multiply the new types yet. docs/CONVERT.md has the table for every type.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import blobstore
from blobstore.config import ModelConfig
from blobstore.convert import convert
from blobstore.runtime import load
from quant_quality import converter_choice, divergence, weights_through
from test_demo_model import HELD_OUT  # Revelation 21-22: text training never saw

pytest.importorskip("sentencepiece")
FIXTURE = Path(__file__).parent / "fixtures" / "demo-gemma3"


@pytest.fixture(scope="module")
def f32_blob(tmp_path_factory):
    path = tmp_path_factory.mktemp("mixes") / "f32.blob"
    convert(FIXTURE, path, dtype="f32", quiet=True)
    return path


@pytest.fixture(scope="module")
def measured(f32_blob, tmp_path_factory):
    """--dtype → (mean KLD, top-1 agreement) with the f32 model, over the held-out text."""
    with load(f32_blob) as model:
        ids = model.tokenizer.encode(HELD_OUT)
        reference = model.forward(ids)
    results = {}
    for dtype in ("q4_0", "q4_k_m", "q5_k_m", "q6_k"):
        out = tmp_path_factory.mktemp("mixes") / f"{dtype}.blob"
        weights_through(f32_blob, out, converter_choice(dtype))
        with load(out) as model:
            results[dtype] = divergence(reference, model.forward(ids))
        print(f"{dtype}: mean KLD {results[dtype][0]:.5f}, top-1 {results[dtype][1]:.1%}")
    return results


def test_q4_k_m_halves_the_kl_divergence_of_q4_0(measured):
    assert measured["q4_k_m"][0] <= 0.5 * measured["q4_0"][0]
    assert measured["q4_k_m"][1] >= measured["q4_0"][1]


def test_q5_k_m_lies_between_q4_k_m_and_q6_k(measured):
    assert measured["q6_k"][0] < measured["q5_k_m"][0] < measured["q4_k_m"][0]
    assert measured["q5_k_m"][1] >= measured["q4_k_m"][1]


def test_q6_k_is_close_to_f32(measured):
    # 97 %, not the 99 % q8_0 reaches: on this 256-wide model a 6-bit grid's error (3.5x q8_0's
    # RMSE) flips about one near-tie in 40 tokens (docs/CONVERT.md)
    kld, top1 = measured["q6_k"]
    assert kld < 0.002 and top1 >= 0.97


def test_a_q4_k_m_conversion_stores_the_mix(f32_blob, tmp_path):
    out = tmp_path / "q4_k_m.blob"
    convert(FIXTURE, out, dtype="q4_k_m", quiet=True)
    with blobstore.open(out, verify="full") as blob, blobstore.open(f32_blob) as f32:
        config = ModelConfig.from_dict(blob.metadata["model"])
        assert config.num_layers == 4 and blob.info("lm_head").tie == "embed"
        six_bit = {"embed", *(f"layers.{i}.{kind}" for i in range(4) for kind in ("v", "down"))}
        for name in config.expected_tensors():
            info = blob.info(name)
            if len(info.shape) == 2 and name != "lm_head":
                assert info.dtype.label == ("q6_k" if name in six_bit else "q4_k"), name
                values = f32.float32(name)
                assert np.abs(blob.float32(name) - values).max() <= 0.25 * np.abs(values).max(), name
        assert blob.metadata["conversion"]["dtype"] == "q4_k_m"
        assert blob.metadata["conversion"]["embed_dtype"] == "q6_k"


@pytest.mark.parametrize("dtype, name, cols, expected", [
    ("q4_k_m", "layers.3.q", 256, "q4_k"),
    ("q4_k_m", "layers.3.q", 640, "q5_0"),     # Gemma 3 270M's rows: llama.cpp's fallback
    ("q4_k_m", "layers.3.down", 640, "q8_0"),  # q6_k → q8_0
    ("q5_k_m", "layers.0.up", 640, "q5_1"),
    ("q5_k_m", "embed", 640, "q8_0"),
    ("q4_k", "layers.0.q", 48, "q8_0"),        # not even whole 32-blocks: q5_0 → q8_0, which pads
    ("q5_1", "layers.0.q", 64, "q5_1"),
])
def test_rows_that_are_not_whole_blocks_fall_back(dtype, name, cols, expected):
    from blobstore.convert.plan import Options, target_dtype
    assert target_dtype(name, (8, cols), Options(dtype=dtype), "f32") == expected
