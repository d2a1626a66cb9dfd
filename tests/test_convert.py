"""blob-pack convert on tiny checkpoints of every family, made with transformers' own classes.

Every stored tensor is compared with its source (read independently through the safetensors
package and torch): bit-exact for f32 and for bf16 → bf16, within the block bound for q8_0 and
q4_0. The normalized config is checked against the transformers model's own attributes.
"""
from __future__ import annotations

import numpy as np
import pytest

import blobstore
from blobstore.config import ModelConfig
from blobstore.convert import convert

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")
transformers = pytest.importorskip("transformers")

FAMILIES = ["gemma", "gemma2", "gemma3", "llama", "mistral", "qwen2", "qwen3"]

# The test's own statement of where each canonical tensor comes from (HF per-layer suffixes).
PLAIN = {"attn_norm": "input_layernorm.weight", "ffn_norm": "post_attention_layernorm.weight"}
SANDWICH = {"attn_norm": "input_layernorm.weight", "post_attn_norm": "post_attention_layernorm.weight",
            "ffn_norm": "pre_feedforward_layernorm.weight", "post_ffn_norm": "post_feedforward_layernorm.weight"}
PROJECTIONS = {"q": "self_attn.q_proj.weight", "k": "self_attn.k_proj.weight", "v": "self_attn.v_proj.weight",
               "o": "self_attn.o_proj.weight", "q_bias": "self_attn.q_proj.bias", "k_bias": "self_attn.k_proj.bias",
               "v_bias": "self_attn.v_proj.bias", "q_norm": "self_attn.q_norm.weight",
               "k_norm": "self_attn.k_norm.weight", "gate": "mlp.gate_proj.weight", "up": "mlp.up_proj.weight",
               "down": "mlp.down_proj.weight"}


def hf_source_name(name: str, prefix: str, sandwich: bool) -> str:
    if name == "embed":
        return f"{prefix}embed_tokens.weight"
    if name == "final_norm":
        return f"{prefix}norm.weight"
    if name == "lm_head":
        return "lm_head.weight"
    _, index, part = name.split(".")
    return f"{prefix}layers.{index}.{({**PROJECTIONS, **(SANDWICH if sandwich else PLAIN)})[part]}"


def source_tensors(folder) -> dict[str, np.ndarray]:
    """Every tensor of model.safetensors as float32 numpy, read through torch."""
    return {k: v.float().numpy() for k, v in safetensors_torch.load_file(folder / "model.safetensors").items()}


def load_model(folder):
    config = transformers.AutoConfig.from_pretrained(folder)
    model_cls = getattr(transformers, config.architectures[0])
    return model_cls.from_pretrained(folder, dtype=torch.float32), config


@pytest.mark.parametrize("family", FAMILIES)
def test_f32_conversion_is_bit_exact(family, checkpoints, tmp_path):
    folder = checkpoints(family)
    out = tmp_path / "model.blob"
    convert(folder, out, dtype="f32", quiet=True)
    source = source_tensors(folder)
    with blobstore.open(out, verify="full") as blob:
        cfg = ModelConfig.from_dict(blob.metadata["model"])
        assert set(cfg.expected_tensors()) == {n for n in blob.keys() if blob.info(n).component == "text"}
        sandwich = family in ("gemma2", "gemma3")
        for name, shape in cfg.expected_tensors().items():
            info = blob.info(name)
            assert info.shape == shape, name
            if name == "lm_head" and cfg.tie_word_embeddings:
                assert info.tie == "embed"
                continue
            expected = source[hf_source_name(name, "model.", sandwich)]
            np.testing.assert_array_equal(blob.float32(name), expected, err_msg=name)
            assert info.dtype.label == "f32"


@pytest.mark.parametrize("family", FAMILIES)
def test_config_matches_the_transformers_model(family, checkpoints):
    folder = checkpoints(family)
    model, hf_config = load_model(folder)
    from blobstore.convert.sources import open_source

    source = open_source(folder)
    cfg = ModelConfig.from_hf(source.config, source.generation_config)
    assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads) == (
        hf_config.hidden_size, hf_config.num_hidden_layers, hf_config.num_attention_heads,
        hf_config.num_key_value_heads)
    assert cfg.head_dim == model.model.layers[0].self_attn.head_dim
    rotary = model.model.rotary_emb
    for i, layer in enumerate(model.model.layers):
        attention = layer.self_attn
        assert cfg.attn_scale == pytest.approx(attention.scaling, rel=1e-12)
        window = getattr(attention, "sliding_window", None) or 0
        if family == "mistral":
            window = hf_config.sliding_window
        assert cfg.sliding_window[i] == window
        layer_type = cfg.layer_types[i]
        inv_freq = getattr(rotary, f"{layer_type}_inv_freq", None)
        inv_freq = rotary.inv_freq if inv_freq is None else inv_freq
        np.testing.assert_allclose(cfg.rope[i].inv_freq(cfg.head_dim), inv_freq.numpy(), rtol=2e-6)
    scale = getattr(model.model.embed_tokens, "embed_scale", None)
    checkpoint_dtype = getattr(torch, cfg.source_dtype)
    assert cfg.embedding_scale == (1.0 if scale is None else scale.to(checkpoint_dtype).item())
    assert cfg.norm_offset == (1.0 if family.startswith("gemma") else 0.0)
    assert cfg.qk_norm == hasattr(model.model.layers[0].self_attn, "q_norm")
    assert cfg.qkv_bias == (model.model.layers[0].self_attn.q_proj.bias is not None)
    assert cfg.o_bias == (model.model.layers[0].self_attn.o_proj.bias is not None)
    assert cfg.sandwich_norms == hasattr(model.model.layers[0], "post_feedforward_layernorm")
    assert cfg.attn_logit_softcap == getattr(hf_config, "attn_logit_softcapping", None)
    assert cfg.final_logit_softcap == getattr(hf_config, "final_logit_softcapping", None)
    assert cfg.tie_word_embeddings == bool(hf_config.tie_word_embeddings)
    assert cfg.activation == {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh"}[
        getattr(hf_config, "hidden_activation", None) or hf_config.hidden_act]


def test_bf16_source_stored_as_bf16_keeps_the_raw_bits(checkpoints, tmp_path):
    folder = checkpoints("llama")  # saved in bfloat16
    out = tmp_path / "model.blob"
    convert(folder, out, dtype="bf16", quiet=True)
    raw = {k: v.view(torch.int16).numpy().view(np.uint16)
           for k, v in safetensors_torch.load_file(folder / "model.safetensors").items()}
    with blobstore.open(out) as blob:
        for name in ("layers.0.q", "layers.1.down", "embed", "lm_head"):
            assert blob.info(name).dtype.label == "bf16"
            np.testing.assert_array_equal(blob[name], raw[hf_source_name(name, "model.", False)])
        assert blob.info("layers.0.attn_norm").dtype.label == "f32"  # norms stay f32


def block_bound(blob, name, dtype):
    """Per-element error bound of a quantized tensor: half a step for q8_0, a whole one for q4_0."""
    scales = np.abs(blob[name].planar()[-1].astype(np.float32))
    per_element = np.repeat(scales, 32, axis=1)[:, :blob.info(name).shape[-1]]
    return per_element * (0.5 if dtype == "q8_0" else 1.0) * (1 + 1e-3) + 1e-7


@pytest.mark.parametrize("dtype", ["q8_0", "q4_0"])
def test_quantized_matrices_within_the_block_bound(dtype, checkpoints, tmp_path):
    folder = checkpoints("qwen3")
    out = tmp_path / "model.blob"
    convert(folder, out, dtype=dtype, embed_dtype="f16", keep_f32=["layers.1.down"], quiet=True)
    source = source_tensors(folder)
    with blobstore.open(out) as blob:
        for name in ("layers.0.q", "layers.0.k", "layers.1.gate", "lm_head"):
            assert blob.info(name).dtype.label == (dtype if name != "lm_head" else "f16")
            expected = source[hf_source_name(name, "model.", False)]
            error = np.abs(blob.float32(name) - expected)
            if name == "lm_head":
                np.testing.assert_allclose(blob.float32(name), expected, rtol=1e-3, atol=1e-4)
            else:
                assert (error <= block_bound(blob, name, dtype)).all(), name
        assert blob.info("layers.1.down").dtype.label == "f32"
        np.testing.assert_array_equal(blob.float32("layers.1.down"), source["model.layers.1.mlp.down_proj.weight"])
        assert blob.info("layers.0.q_norm").dtype.label == "f32"


@pytest.mark.parametrize("dtype, embed_dtype, stored", [
    ("q4_0", None, "q8_0"),     # 4-bit weights: the embedding / head stay at 8 bits by default
    ("q4_0", "q4_0", "q4_0"),   # unless asked for explicitly
    ("q4_0", "f16", "f16"),
    ("q8_0", None, "q8_0"),     # other dtypes: the embedding follows --dtype
    ("bf16", None, "bf16"),
])
def test_embedding_dtype_policy(dtype, embed_dtype, stored, checkpoints, tmp_path):
    out = tmp_path / "model.blob"
    convert(checkpoints("llama"), out, dtype=dtype, embed_dtype=embed_dtype, quiet=True)  # an untied head
    with blobstore.open(out) as blob:
        assert blob.info("embed").dtype.label == blob.info("lm_head").dtype.label == stored
        assert blob.info("layers.0.q").dtype.label == dtype
        assert blob.metadata["conversion"]["embed_dtype"] == stored


def test_manifest_records_config_tokenizer_and_provenance(checkpoints, tmp_path, spm_model):
    folder = checkpoints("gemma3")
    out = tmp_path / "model.blob"
    convert(folder, out, quiet=True)
    with blobstore.open(out) as blob:
        meta = blob.metadata
        assert blob.file_bytes("tokenizer.model") == spm_model
        assert meta["tokenizer"]["kind"] == "sentencepiece"
        assert meta["tokenizer"]["add_bos"] is True
        assert meta["tokenizer"]["bos_id"] == 2 and 1 in meta["tokenizer"]["eos_ids"]
        assert "<start_of_turn>" in meta["tokenizer"]["chat_template"]
        assert meta["source"]["config"]["architectures"] == ["Gemma3ForCausalLM"]
        assert meta["source"]["generation_config"] is not None
        files = {f["name"]: f for f in meta["source"]["files"]}
        assert files["model.safetensors"]["size"] == (folder / "model.safetensors").stat().st_size
        import hashlib
        assert files["model.safetensors"]["sha256"] == hashlib.sha256(
            (folder / "model.safetensors").read_bytes()).hexdigest()
        assert meta["source"]["packer"].startswith("blob-pack ")
        cfg = ModelConfig.from_dict(meta["model"])
        assert cfg.embedding_scale == 8.0  # sqrt(64), exact in bf16
        assert [r.kind for r in cfg.rope] == ["default", "default", "linear"]


def test_sharded_checkpoint(checkpoints, tmp_path):
    model, _ = load_model(checkpoints("llama"))
    folder = tmp_path / "sharded"
    model.save_pretrained(folder, safe_serialization=True, max_shard_size="100KB")
    assert (folder / "model.safetensors.index.json").exists()
    (folder / "tokenizer.model").write_bytes((checkpoints("llama") / "tokenizer.model").read_bytes())
    out = tmp_path / "model.blob"
    summary = convert(folder, out, dtype="f32", quiet=True)
    assert summary.tensors == len(ModelConfig.from_dict(blobstore.open(out).metadata["model"]).expected_tensors())
    with blobstore.open(out) as blob:
        np.testing.assert_array_equal(blob.float32("layers.1.v"),
                                      model.model.layers[1].self_attn.v_proj.weight.detach().numpy())


def test_gemma3_multimodal_keeps_vision_and_projector_components(checkpoints, tmp_path):
    folder = checkpoints("gemma3_mm")
    out = tmp_path / "model.blob"
    summary = convert(folder, out, dtype="f32", quiet=True)
    source = source_tensors(folder)
    vision = [k for k in source if k.startswith("vision_tower.")]
    projector = [k for k in source if k.startswith("multi_modal_projector.")]
    assert summary.components == {"text": 28, "vision": len(vision), "projector": len(projector)}
    with blobstore.open(out) as blob:
        for name in vision + projector:
            stored = name.replace("vision_tower.", "vision.").replace("multi_modal_projector.", "projector.")
            expected = source[name]
            if stored == "projector.mm_input_projection_weight":   # x @ W in transformers: stored as W.T
                stored, expected = "projector.mm_input_projection.weight", expected.T
            if stored.endswith("patch_embedding.weight"):   # the convolution as a matrix over unfolded patches
                expected = expected.reshape(expected.shape[0], -1)
            assert blob.info(stored).component == stored.split(".")[0]
            np.testing.assert_array_equal(blob.float32(stored), expected)
        np.testing.assert_array_equal(blob.float32("layers.1.post_ffn_norm"),
                                      source["language_model.model.layers.1.post_feedforward_layernorm.weight"])
        vision_config = blob.metadata["components"]["vision"]["config"]
        assert vision_config["patch_size"] == 14
        assert vision_config["layer_norm_eps"] == 1e-6 and vision_config["num_channels"] == 3  # class defaults
        assert blob.metadata["components"]["projector"]["config"] == {
            "mm_tokens_per_image": 4, "boi_token_index": 255_999, "eoi_token_index": 256_000,
            "image_token_index": 262_144}


def test_text_only_leaves_out_vision_and_says_so(checkpoints, tmp_path):
    out = tmp_path / "model.blob"
    summary = convert(checkpoints("gemma3_mm"), out, text_only=True, quiet=True)
    assert summary.components == {"text": 28}
    assert summary.dropped == {"vision": 32, "projector": 2}
    assert "left out by --text-only: 32 vision" in summary.format()
    with blobstore.open(out) as blob:
        assert not [n for n in blob.keys() if n.startswith(("vision.", "projector."))]


def test_dry_run_prints_the_plan_and_writes_nothing(checkpoints, tmp_path):
    out = tmp_path / "model.blob"
    lines = []
    summary = convert(checkpoints("gemma2"), out, dry_run=True, log=lines.append)
    assert not out.exists() and not list(tmp_path.iterdir())
    assert "model.layers.0.self_attn.q_proj.weight -> layers.0.q [text] q8_0 64x64" in lines
    assert "lm_head -> tie to embed (tie_word_embeddings in the config)" in lines
    assert summary.format().startswith("would write")


def test_existing_output_needs_force(checkpoints, tmp_path):
    out = tmp_path / "model.blob"
    out.write_bytes(b"keep me")
    with pytest.raises(ValueError, match="already exists; pass --force"):
        convert(checkpoints("qwen2"), out, quiet=True)
    assert out.read_bytes() == b"keep me"
    convert(checkpoints("qwen2"), out, force=True, quiet=True)
    assert blobstore.open(out).metadata["model"]["family"] == "qwen"


def test_interrupt_leaves_nothing_behind(checkpoints, tmp_path, monkeypatch):
    from blobstore.convert import sources

    calls = []
    real_read = sources.SafetensorsFolder.read

    def interrupted_read(self, name):
        calls.append(name)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real_read(self, name)

    monkeypatch.setattr(sources.SafetensorsFolder, "read", interrupted_read)
    with pytest.raises(KeyboardInterrupt):
        convert(checkpoints("llama"), tmp_path / "model.blob", quiet=True)
    assert list(tmp_path.iterdir()) == []


def test_tokenizer_json_only_folder(checkpoint_copy, tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    folder = checkpoint_copy("qwen2")
    (folder / "tokenizer.model").unlink()
    bpe = tokenizers.Tokenizer(tokenizers.models.BPE(vocab={"a": 0, "b": 1, "ab": 2, "<|im_end|>": 3},
                                                     merges=[("a", "b")]))
    bpe.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text('{"chat_template": "old", "bos_token": null}')
    (folder / "chat_template.jinja").write_text("{{ messages[0]['content'] }}<|im_end|>")
    out = tmp_path / "model.blob"
    convert(folder, out, quiet=True)
    with blobstore.open(out) as blob:
        settings = blob.metadata["tokenizer"]
        assert settings["kind"] == "tokenizers" and settings["files"] == "tokenizer.json"
        assert settings["add_bos"] is False
        assert settings["chat_template"] == "{{ messages[0]['content'] }}<|im_end|>"  # the .jinja file wins
        assert blob.file_bytes("tokenizer.json") == (folder / "tokenizer.json").read_bytes()
        assert "tokenizer.model" not in blob
