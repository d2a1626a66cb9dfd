"""GGUF in: a tiny checkpoint written as llama.cpp would write it, converted back and compared.

The GGUF files are written here with the gguf package, applying llama.cpp's conventions the
converter must undo: Llama q/k rows permuted for interleaved rope, Gemma norms stored as 1 + w,
and a vocabulary whose user-defined pieces use spaces and whose special tokens are CONTROL.
"""
from __future__ import annotations

import numpy as np
import pytest

import blobstore
from blobstore.config import ModelConfig, RopeParams
from blobstore.convert import ConversionError, convert
from blobstore.convert.token_types import CONTROL, UNKNOWN
from blobstore.convert.tokenizer import sentencepiece_from_gguf
from blobstore.runtime import load

gguf = pytest.importorskip("gguf")
spm = pytest.importorskip("sentencepiece")
st = pytest.importorskip("safetensors.torch")

T = gguf.GGMLQuantizationType
HF_TO_GGUF = {
    "input_layernorm.weight": "attn_norm.weight", "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight", "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight", "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight", "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight",
}
LLAMA_NORMS = {"post_attention_layernorm.weight": "ffn_norm.weight"}
GEMMA_NORMS = {"post_attention_layernorm.weight": "post_attention_norm.weight",
               "pre_feedforward_layernorm.weight": "ffn_norm.weight",
               "post_feedforward_layernorm.weight": "post_ffw_norm.weight"}
SPECIAL = {"<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"}
SAMPLES = ["Hello  there,  world!", "<start_of_turn>user\nHi<end_of_turn>\n", "日本語 🙂 naïve", "x  =  1\n\n\tdone"]


def gguf_name(hf: str, norms: dict) -> str:
    if hf.endswith("embed_tokens.weight"):
        return "token_embd.weight"
    if hf.endswith("model.norm.weight"):
        return "output_norm.weight"
    if hf == "lm_head.weight":
        return "output.weight"
    _, _, index, rest = hf.split(".", 3)
    return f"blk.{index}.{({**HF_TO_GGUF, **norms})[rest]}"


def permute_like_llama_cpp(w: np.ndarray, heads: int) -> np.ndarray:
    """Rows of each head reordered from (i, i + hd/2) pairs to interleaved (2i, 2i + 1) pairs."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama_cpp_vocabulary(sp) -> tuple[list[str], list[float], list[int]]:
    """The vocabulary as llama.cpp's converter writes it (see the module docstring)."""
    tokens, scores, types = [], [], []
    for i in range(sp.get_piece_size()):
        piece = sp.id_to_piece(i)
        kind = 6 if sp.is_byte(i) else 3 if sp.is_control(i) or sp.is_unknown(i) else 1
        if piece in SPECIAL:
            kind = 3
        elif piece.startswith("▁▁") and kind == 1 and i < 10:  # the user-defined whitespace piece
            kind, piece = 4, piece.replace("▁", " ")
        tokens.append(piece)
        scores.append(sp.get_score(i))
        types.append(kind)
    return tokens, scores, types


def write_gguf(path, arch: str, hf_config, tensors: dict, spm_model: bytes, extra_keys=(), extra_tensors=None,
               vocabulary=None):
    """`vocabulary(writer)` writes the tokenizer keys; by default those of `spm_model` (sentencepiece_vocabulary)."""
    writer = gguf.GGUFWriter(str(path), arch)
    c = hf_config
    writer.add_uint32(f"{arch}.context_length", c["max_position_embeddings"])
    writer.add_uint32(f"{arch}.embedding_length", c["hidden_size"])
    writer.add_uint32(f"{arch}.block_count", c["num_hidden_layers"])
    writer.add_uint32(f"{arch}.feed_forward_length", c["intermediate_size"])
    writer.add_uint32(f"{arch}.attention.head_count", c["num_attention_heads"])
    writer.add_uint32(f"{arch}.attention.head_count_kv", c["num_key_value_heads"])
    writer.add_uint32(f"{arch}.attention.key_length", c["head_dim"])
    writer.add_uint32(f"{arch}.rope.dimension_count", c["head_dim"])
    writer.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", c["rms_norm_eps"])
    for key, value in extra_keys:
        (writer.add_float32 if isinstance(value, float) else writer.add_string if isinstance(value, str)
         else writer.add_uint32)(f"{arch}.{key}", value)
    (vocabulary or sentencepiece_vocabulary(spm_model))(writer)
    for name, (array, qtype) in {**tensors, **(extra_tensors or {})}.items():
        data = gguf.quants.quantize(array, qtype) if qtype not in (T.F32, T.F16) else array.astype(
            np.float32 if qtype == T.F32 else np.float16)
        writer.add_tensor(name, data, raw_dtype=qtype if qtype not in (T.F32, T.F16) else None)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def sentencepiece_vocabulary(spm_model: bytes, current_converter: bool = False, unknown: bool = True):
    """A function writing `spm_model` into a GGUFWriter as llama.cpp's converter does. The older one
    typed <unk> CONTROL and named it in tokenizer.ggml.unknown_token_id; the current one types it
    UNKNOWN and names no unknown id. `unknown=False` leaves <unk> findable by neither."""
    def write(writer):
        sp = spm.SentencePieceProcessor(model_proto=spm_model)
        tokens, scores, types = llama_cpp_vocabulary(sp)
        if current_converter:
            types[sp.unk_id()] = UNKNOWN if unknown else CONTROL
        writer.add_tokenizer_model("llama")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        writer.add_bos_token_id(2)
        writer.add_eos_token_id(1)
        if not current_converter:
            writer.add_unk_token_id(3)
        writer.add_pad_token_id(0)
        writer.add_add_space_prefix(False)
        writer.add_string("tokenizer.chat_template", "{{ messages }}")
    return write


def ggml_type_for(name: str, array: np.ndarray):
    """Norms F32, attention F16, the rest Q8_0: a mix like a real quantized file."""
    if array.ndim == 1:
        return T.F32
    return T.F16 if ".attn_" in name else T.Q8_0


def gguf_from_checkpoint(folder, path, arch, norms, transform, spm_model, extra_keys=(), extra_tensors=None,
                         vocabulary=None):
    import json

    hf = json.loads((folder / "config.json").read_text())
    source = {k: v.float().numpy() for k, v in st.load_file(folder / "model.safetensors").items()}
    tensors = {}
    for hf_name, array in source.items():
        name = gguf_name(hf_name, norms)
        stored = transform(name, array, hf)
        tensors[name] = (stored, ggml_type_for(name, stored))
    write_gguf(path, arch, hf, tensors, spm_model, extra_keys, extra_tensors, vocabulary)
    return source, tensors, hf


def expected_after_roundtrip(name, tensors):
    """What the GGUF holds for `name`, dequantized by the gguf package (the converter's reference)."""
    array, qtype = tensors[name]
    if qtype == T.F32:
        return array
    if qtype == T.F16:
        return array.astype(np.float16).astype(np.float32)
    return gguf.quants.dequantize(gguf.quants.quantize(array, qtype), qtype)


def llama_transform(name, array, hf):
    if name.endswith("attn_q.weight"):
        return permute_like_llama_cpp(array, hf["num_attention_heads"])
    if name.endswith("attn_k.weight"):
        return permute_like_llama_cpp(array, hf["num_key_value_heads"])
    return array


def gemma_transform(name, array, hf):
    return array + 1 if name.endswith("norm.weight") else array


def test_llama_gguf_round_trip(checkpoints, tmp_path, spm_model):
    path = tmp_path / "llama.gguf"
    source, tensors, _ = gguf_from_checkpoint(checkpoints("llama"), path, "llama", LLAMA_NORMS, llama_transform,
                                              spm_model, extra_keys=[("rope.freq_base", 500000.0)])
    out = tmp_path / "llama.blob"
    convert(path, out, dtype="f32", quiet=True)
    with blobstore.open(out) as blob:
        cfg = ModelConfig.from_dict(blob.metadata["model"])
        assert cfg.family == "llama" and cfg.tie_word_embeddings is False
        assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.rope[0].theta) == (4, 2, 16, 500000.0)
        for name in cfg.expected_tensors():
            held = expected_after_roundtrip(blob.info(name).source, tensors)
            stored = blob.float32(name)
            if name.endswith((".q", ".k")):  # llama.cpp's permutation is undone: redoing it gives the GGUF rows
                stored = permute_like_llama_cpp(stored, cfg.num_heads if name.endswith(".q") else cfg.num_kv_heads)
            np.testing.assert_array_equal(stored, held, err_msg=name)
        q_source = source["model.layers.1.self_attn.q_proj.weight"]
        np.testing.assert_allclose(blob.float32("layers.1.q"), q_source, atol=2e-3)  # f16 in the GGUF


def test_gemma3_gguf_round_trip(checkpoints, tmp_path, spm_model):
    path = tmp_path / "gemma3.gguf"
    keys = [("rope.freq_base", 1e6), ("attention.sliding_window", 8), ("attention.sliding_window_pattern", 3),
            ("rope.scaling.type", "linear"), ("rope.scaling.factor", 8.0)]
    source, tensors, hf = gguf_from_checkpoint(checkpoints("gemma3"), path, "gemma3", GEMMA_NORMS, gemma_transform,
                                               spm_model, extra_keys=keys)
    out = tmp_path / "gemma3.blob"
    convert(path, out, dtype="f32", quiet=True)
    with blobstore.open(out) as blob:
        cfg = ModelConfig.from_dict(blob.metadata["model"])
        hf_cfg = ModelConfig.from_hf(hf)
        for field in ("layer_types", "sliding_window", "rope", "norm_offset", "sandwich_norms", "qk_norm",
                      "tie_word_embeddings", "num_kv_heads", "head_dim", "activation"):
            assert getattr(cfg, field) == getattr(hf_cfg, field), field
        assert cfg.attn_scale == 16 ** -0.5  # llama.cpp's rule: 1/sqrt(head_dim) below 27B
        assert blob.info("lm_head").tie == "embed"
        for name in cfg.expected_tensors():
            if name == "lm_head":
                continue
            held = expected_after_roundtrip(blob.info(name).source, tensors)
            if name.endswith("norm"):  # stored by llama.cpp as 1 + w
                held = held - np.float32(1)
                hf_name = next(k for k in source if gguf_name(k, GEMMA_NORMS) == blob.info(name).source)
                np.testing.assert_allclose(blob.float32(name), source[hf_name], atol=1e-6)
            np.testing.assert_array_equal(blob.float32(name), held, err_msg=name)
        sp = spm.SentencePieceProcessor(model_proto=blob.file_bytes("tokenizer.model"))
        original = spm.SentencePieceProcessor(model_proto=spm_model)
        for text in SAMPLES:
            assert sp.encode(text) == original.encode(text), text
        tokenizer = blob.metadata["tokenizer"]
        assert (tokenizer["bos_id"], tokenizer["eos_ids"], tokenizer["chat_template"]) == (2, [1], "{{ messages }}")


def test_rebuilt_vocabulary_matches_the_original_sentencepiece_model(spm_model):
    original = spm.SentencePieceProcessor(model_proto=spm_model)
    tokens, scores, types = llama_cpp_vocabulary(original)
    metadata = {"tokenizer.ggml.tokens": tokens, "tokenizer.ggml.scores": scores, "tokenizer.ggml.token_type": types,
                "tokenizer.ggml.unknown_token_id": 3, "tokenizer.ggml.bos_token_id": 2,
                "tokenizer.ggml.eos_token_id": 1, "tokenizer.ggml.padding_token_id": 0,
                "tokenizer.ggml.add_space_prefix": False}
    rebuilt = spm.SentencePieceProcessor(model_proto=sentencepiece_from_gguf(metadata))
    assert rebuilt.get_piece_size() == original.get_piece_size()
    for i in range(original.get_piece_size()):
        assert rebuilt.id_to_piece(i) == original.id_to_piece(i)
        assert rebuilt.get_score(i) == original.get_score(i)
        assert (rebuilt.is_control(i), rebuilt.is_unknown(i), rebuilt.is_byte(i)) == (
            original.is_control(i), original.is_unknown(i), original.is_byte(i)), i
    for text in SAMPLES:
        assert rebuilt.encode(text) == original.encode(text)
        assert rebuilt.decode(rebuilt.encode(text)) == text


def test_sentencepiece_vocabulary_naming_unk_only_by_its_type_converts_and_runs(checkpoints, tmp_path, spm_model):
    path = tmp_path / "llama.gguf"  # as llama.cpp's current converter writes a Llama-style vocabulary
    gguf_from_checkpoint(checkpoints("llama"), path, "llama", LLAMA_NORMS, llama_transform, spm_model,
                         vocabulary=sentencepiece_vocabulary(spm_model, current_converter=True))
    out = tmp_path / "llama.blob"
    convert(path, out, quiet=True)
    model = load(out)
    original = spm.SentencePieceProcessor(model_proto=spm_model)
    rebuilt = spm.SentencePieceProcessor(model_proto=model.reader.file_bytes("tokenizer.model"))
    assert rebuilt.unk_id() == original.unk_id() == 3 and rebuilt.id_to_piece(3) == "<unk>"
    for text in SAMPLES:
        assert model.tokenizer.encode(text, add_bos=False) == original.encode(text), text
    result = model.generate("Hello there", max_new_tokens=4, temperature=0, ignore_eos=True)
    assert len(result.token_ids) == 4 and result.text == model.tokenizer.decode(result.token_ids)


def test_sentencepiece_vocabulary_without_any_unk_is_refused(checkpoints, tmp_path, spm_model):
    path = tmp_path / "llama.gguf"
    gguf_from_checkpoint(checkpoints("llama"), path, "llama", LLAMA_NORMS, llama_transform, spm_model,
                         vocabulary=sentencepiece_vocabulary(spm_model, current_converter=True, unknown=False))
    with pytest.raises(ConversionError, match=r"no <unk>: neither a tokenizer.ggml.unknown_token_id nor a token of "
                                              r"type UNKNOWN \(2\) in tokenizer.ggml.token_type"):
        convert(path, tmp_path / "llama.blob", quiet=True)
    assert not (tmp_path / "llama.blob").exists()


def test_duplicate_pieces_are_reported(spm_model):
    metadata = {"tokenizer.ggml.tokens": ["<unk>", "a", "a"], "tokenizer.ggml.unknown_token_id": 0}
    with pytest.raises(ConversionError, match="tokens 1 and 2 are both 'a'"):
        sentencepiece_from_gguf(metadata)


def test_llama3_rope_factor_tensor_goes_into_the_rope_config(checkpoints, tmp_path, spm_model):
    path = tmp_path / "llama.gguf"
    divisors = np.linspace(1.0, 8.0, 8, dtype=np.float32)
    gguf_from_checkpoint(checkpoints("llama"), path, "llama", LLAMA_NORMS, llama_transform, spm_model,
                         extra_tensors={"rope_freqs.weight": (divisors, T.F32)})
    lines = []
    convert(path, tmp_path / "dry.blob", dry_run=True, quiet=True, log=lines.append)
    assert "rope_freqs.weight -> read into the rope config" in lines
    convert(path, tmp_path / "out.blob", dtype="f32", quiet=True)
    with blobstore.open(tmp_path / "out.blob") as blob:
        cfg = ModelConfig.from_dict(blob.metadata["model"])
        assert not any("rope_freqs" in name for name in blob.keys())
    assert all(r.kind == "factors" and r.factors == tuple(divisors.tolist()) for r in cfg.rope)
    plain = RopeParams(cfg.rope[0].theta).inv_freq(cfg.head_dim)
    np.testing.assert_array_equal(cfg.rope[0].inv_freq(cfg.head_dim), plain / divisors)


def test_truncated_gguf_is_named(checkpoints, tmp_path, spm_model):
    path = tmp_path / "llama.gguf"
    gguf_from_checkpoint(checkpoints("llama"), path, "llama", LLAMA_NORMS, llama_transform, spm_model)
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    with pytest.raises(ConversionError, match="lies beyond the end of the file"):
        convert(path, tmp_path / "out.blob", quiet=True)
    path.write_bytes(data[:200])
    with pytest.raises(ConversionError, match="GGUF header ends early"):
        convert(path, tmp_path / "out.blob", quiet=True)
