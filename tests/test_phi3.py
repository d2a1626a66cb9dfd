"""Phi-3 (Phi3ForCausalLM): fused projections split at conversion, LongRoPE, partial rotary, GGUF.

Two tiny checkpoints made by transformers' own classes, both with LongRoPE over an original
context of 32 positions (so prompts of 20 and 48 tokens take the short and the long factors):
"longrope" untied with one KV head per query head, and "partial" tied, grouped-query, rotating
0.75 of each head, with its config.json rewritten to the older spelling (rope_scaling type "su",
top-level rope_theta and partial_rotary_factor) that transformers still reads. Their GGUFs are
written as llama.cpp's converter writes phi3: fused attn_qkv and ffn_up, rope factor tensors,
its attention factor and context keys, q/k rows left in HF order.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

import blobstore
from blobstore.config import ModelConfig
from blobstore.convert import ConversionError, convert
from blobstore.runtime import load
from conftest import randomize

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")
st = pytest.importorskip("safetensors.torch")

from test_convert_gguf import sentencepiece_vocabulary  # noqa: E402  (tests/ is on sys.path under pytest)

ORIGINAL_CONTEXT = 32
SHORT_PROMPT, LONG_PROMPT = 20, 48
VARIANTS = {
    "longrope": dict(num_key_value_heads=4, tie_word_embeddings=False, partial_rotary_factor=1.0, legacy=False),
    "partial": dict(num_key_value_heads=2, tie_word_embeddings=True, partial_rotary_factor=0.75, legacy=True),
}


def build_phi3(folder, spm_model: bytes, *, legacy: bool, partial_rotary_factor: float, **overrides):
    pairs = int(16 * partial_rotary_factor) // 2
    rng = np.random.default_rng(7)
    short, long = (1 + rng.random(pairs)).round(3).tolist(), (1 + 6 * rng.random(pairs)).round(3).tolist()
    config = transformers.Phi3Config(
        vocab_size=400, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=128, original_max_position_embeddings=ORIGINAL_CONTEXT, bos_token_id=2,
        eos_token_id=1, pad_token_id=0, rope_parameters={
            "rope_type": "longrope", "rope_theta": 10000.0, "short_factor": short, "long_factor": long,
            "partial_rotary_factor": partial_rotary_factor}, **overrides)
    torch.manual_seed(0)
    model = transformers.Phi3ForCausalLM(config)
    randomize(model, torch)
    model.save_pretrained(folder, safe_serialization=True)
    if legacy:
        path = folder / "config.json"
        saved = json.loads(path.read_text())
        rope = saved.pop("rope_parameters")
        saved.update(rope_theta=rope["rope_theta"], partial_rotary_factor=rope["partial_rotary_factor"],
                     rope_scaling={"type": "su", "short_factor": short, "long_factor": long})
        path.write_text(json.dumps(saved))
    (folder / "tokenizer.model").write_bytes(spm_model)
    (folder / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": True, "bos_token": "<bos>"}))
    return folder


def write_phi3_gguf(folder, path, spm_model: bytes):
    """The checkpoint as llama.cpp's convert_hf_to_gguf writes a phi3 GGUF (all tensors F32)."""
    model = reference_model(folder)
    c, rope = model.config, model.config.rope_parameters
    rope_dims = int(rope["partial_rotary_factor"] * c.hidden_size) // c.num_attention_heads
    scale = c.max_position_embeddings / c.original_max_position_embeddings
    writer = gguf.GGUFWriter(str(path), "phi3")
    for key, value in (("context_length", c.max_position_embeddings),
                       ("rope.scaling.original_context_length", c.original_max_position_embeddings),
                       ("embedding_length", c.hidden_size), ("feed_forward_length", c.intermediate_size),
                       ("block_count", c.num_hidden_layers), ("attention.head_count", c.num_attention_heads),
                       ("attention.head_count_kv", c.num_key_value_heads), ("rope.dimension_count", rope_dims),
                       ("attention.sliding_window", 0)):
        writer.add_uint32(f"phi3.{key}", value)
    writer.add_float32("phi3.attention.layer_norm_rms_epsilon", c.rms_norm_eps)
    writer.add_float32("phi3.rope.freq_base", rope["rope_theta"])
    writer.add_float32("phi3.rope.scaling.attn_factor", math.sqrt(1 + math.log(scale) / math.log(ORIGINAL_CONTEXT)))
    sentencepiece_vocabulary(spm_model)(writer)
    for name, array in gguf_tensors(model, rope).items():
        writer.add_tensor(name, np.ascontiguousarray(array, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def gguf_tensors(model, rope) -> dict:
    """GGUF name → array: fused q/k/v and gate/up as they are in HF (llama.cpp does not permute phi3)."""
    weights = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    tensors = {"token_embd.weight": weights["model.embed_tokens.weight"],
               "output_norm.weight": weights["model.norm.weight"],
               "rope_factors_long.weight": np.array(rope["long_factor"], np.float32),
               "rope_factors_short.weight": np.array(rope["short_factor"], np.float32)}
    if not model.config.tie_word_embeddings:
        tensors["output.weight"] = weights["lm_head.weight"]
    layer = {"input_layernorm.weight": "attn_norm", "self_attn.qkv_proj.weight": "attn_qkv",
             "self_attn.o_proj.weight": "attn_output", "post_attention_layernorm.weight": "ffn_norm",
             "mlp.gate_up_proj.weight": "ffn_up", "mlp.down_proj.weight": "ffn_down"}
    for i in range(model.config.num_hidden_layers):
        tensors.update({f"blk.{i}.{g}.weight": weights[f"model.layers.{i}.{h}"] for h, g in layer.items()})
    return tensors


@pytest.fixture(scope="module")
def phi3(tmp_path_factory, spm_model):
    """(variant, route) → (blob path, HF folder); route "hf" converts the folder, "gguf" its GGUF."""
    root = tmp_path_factory.mktemp("phi3")
    done = {}

    def get(variant: str, route: str = "hf"):
        if (variant, route) not in done:
            folder = root / variant
            if not folder.exists():
                folder.mkdir()
                build_phi3(folder, spm_model, **VARIANTS[variant])
            source = folder
            if route == "gguf":
                source = root / f"{variant}.gguf"
                write_phi3_gguf(folder, source, spm_model)
            out = root / f"{variant}-{route}.blob"
            convert(source, out, dtype="f32", quiet=True)
            done[variant, route] = out, folder
        return done[variant, route]
    return get


def reference_model(folder):
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
    return model.eval()


def prompt(n: int, seed: int = 0) -> list[int]:
    return [2] + np.random.default_rng(seed).integers(4, 400, n - 1).tolist()


ROUTES = [(variant, route) for variant in VARIANTS for route in ("hf", "gguf")]


@pytest.mark.parametrize("variant, route", ROUTES)
@pytest.mark.parametrize("length", [SHORT_PROMPT, LONG_PROMPT])
def test_logits_match_transformers_at_every_position(phi3, variant, route, length):
    path, folder = phi3(variant, route)
    ids = prompt(length)
    with torch.no_grad():
        theirs = reference_model(folder)(torch.tensor([ids])).logits[0].numpy()
    ours = load(path).forward(ids)
    assert np.abs(ours - theirs).max() <= 1e-3, f"max |logit difference| {np.abs(ours - theirs).max()}"


@pytest.mark.parametrize("variant, route", ROUTES)
@pytest.mark.parametrize("length", [SHORT_PROMPT, LONG_PROMPT])
def test_32_greedy_tokens_match_transformers_generate(phi3, variant, route, length):
    """transformers' generate runs one forward per token, each choosing short or long factors by its
    own last position; a short prompt crosses the original context during decoding."""
    path, folder = phi3(variant, route)
    ids = prompt(length, seed=1)
    reference = reference_model(folder)
    reference.generation_config.eos_token_id = None  # generate all 32, as ignore_eos does
    with torch.no_grad():
        theirs = reference.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False)[0, len(ids):].tolist()
    ours = load(path).generate(ids, max_new_tokens=32, temperature=0, ignore_eos=True).token_ids
    assert ours == theirs


def test_crossing_the_original_context_recomputes_the_cache_with_the_long_factors(phi3):
    """After a short prefill, the step that passes the original context re-runs the sequence:
    its logits and every later step's equal those of one full forward with the long factors."""
    model = load(phi3("longrope")[0])
    ids = prompt(40, seed=2)
    full = model.forward(ids)
    cache = model.cache
    cache.truncate(0)
    model.transformer.run(ids[:20], cache, start=0)
    cache.token_ids.extend(ids[:20])
    for position in range(20, len(ids)):
        logits = model.transformer.run([ids[position]], cache, start=position)
        cache.token_ids.append(ids[position])
        if position >= ORIGINAL_CONTEXT:
            assert np.abs(logits[0] - full[position]).max() < 1e-4, position
    cache.truncate(30)  # keys of positions 0..29 now carry the long factors; a short call needs them redone
    short = model.transformer.run(ids[30:32], cache, start=30, all_logits=True)
    assert np.abs(short - model.forward(ids[:32])[30:]).max() < 1e-4


def test_a_switch_without_the_cached_token_ids_is_refused(phi3):
    model = load(phi3("longrope")[0])
    cache = model.cache
    cache.truncate(0)
    model.transformer.run(prompt(20), cache, start=0)  # the caller did not record the ids
    with pytest.raises(ValueError, match="the cache lists 0 token ids, not the 20 before position 20"):
        model.transformer.run(prompt(20)[:15], cache, start=20)


def test_the_stored_config(phi3):
    for variant, settings in VARIANTS.items():
        blobs = [blobstore.open(phi3(variant, route)[0]) for route in ("hf", "gguf")]
        configs = [ModelConfig.from_dict(blob.metadata["model"]) for blob in blobs]
        hf, from_gguf = configs
        rope = hf.rope[0]
        assert (hf.family, rope.kind, rope.original_max_position_embeddings) == ("phi3", "longrope", ORIGINAL_CONTEXT)
        assert rope.rotated_dims(16) == int(16 * settings["partial_rotary_factor"])
        assert rope.attention_factor == pytest.approx(math.sqrt(1 + math.log(4) / math.log(32)))
        assert hf.tie_word_embeddings == settings["tie_word_embeddings"] == from_gguf.tie_word_embeddings
        head_tie = "embed" if settings["tie_word_embeddings"] else None
        assert [blob.info("lm_head").tie for blob in blobs] == [head_tie, head_tie]
        for field in ("rope", "num_kv_heads", "head_dim", "layer_types", "sliding_window"):
            if field == "rope":  # the GGUF's attention factor is an f32 key
                assert from_gguf.rope[0].attention_factor == pytest.approx(rope.attention_factor, rel=1e-7)
                assert from_gguf.rope[0].short_factor == pytest.approx(rope.short_factor, rel=1e-7)
                continue
            assert getattr(from_gguf, field) == getattr(hf, field), field
        assert ModelConfig.from_dict(json.loads(json.dumps(hf.to_dict()))) == hf  # tuples survive JSON as lists
        for blob in blobs:
            blob.close()


def test_fused_tensors_split_into_the_canonical_ones(phi3):
    path, folder = phi3("partial")
    weights = st.load_file(folder / "model.safetensors")
    qkv = weights["model.layers.1.self_attn.qkv_proj.weight"].numpy()
    gate_up = weights["model.layers.1.mlp.gate_up_proj.weight"].numpy()
    with blobstore.open(path) as blob:
        np.testing.assert_array_equal(np.concatenate([blob.float32(f"layers.1.{p}") for p in "qkv"]), qkv)
        np.testing.assert_array_equal(np.concatenate([blob.float32("layers.1.gate"), blob.float32("layers.1.up")]),
                                      gate_up)
        assert blob.info("layers.1.k").source == "model.layers.1.self_attn.qkv_proj.weight[64:96]"


def test_dry_run_shows_the_split_and_each_fused_tensor_is_read_once(phi3, tmp_path, monkeypatch):
    from blobstore.convert.sources import SafetensorsFolder

    folder = phi3("partial")[1]
    lines = []
    convert(folder, tmp_path / "dry.blob", dry_run=True, quiet=True, log=lines.append)
    qkv = "model.layers.0.self_attn.qkv_proj.weight"
    assert f"{qkv}[0:64] -> layers.0.q [text] q8_0 64x64" in lines
    assert f"{qkv}[64:96] -> layers.0.k [text] q8_0 32x64" in lines
    assert f"{qkv}[96:128] -> layers.0.v [text] q8_0 32x64" in lines
    assert "model.layers.0.mlp.gate_up_proj.weight[96:192] -> layers.0.up [text] q8_0 96x64" in lines
    reads = []
    original = SafetensorsFolder.read
    monkeypatch.setattr(SafetensorsFolder, "read", lambda self, name: reads.append(name) or original(self, name))
    summary = convert(folder, tmp_path / "out.blob", dtype="f32", quiet=True)
    assert sorted(reads) == sorted(set(reads)) and qkv in reads
    assert summary.bytes_in == sum(v.numel() * 4 for v in st.load_file(folder / "model.safetensors").values())


def test_a_fused_tensor_of_the_wrong_size_is_named(phi3, tmp_path):
    import shutil

    folder = shutil.copytree(phi3("longrope")[1], tmp_path / "bad")
    config = json.loads((folder / "config.json").read_text())
    config["num_key_value_heads"] = 2  # the saved qkv_proj holds 4 KV heads
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConversionError, match=r"layers\.0\.q \+ layers\.0\.k \+ layers\.0\.v: expected \(128, 64\) "
                                              r"from the config, found \(192, 64\) in model\.layers\.0\.self_attn"):
        convert(folder, tmp_path / "out.blob", quiet=True)


def test_builtin_chat_template():
    from blobstore.runtime.chat import builtin_template, end_of_turn_tokens, render

    template = builtin_template("phi3")
    text = render(template, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    assert text == "<|system|>\nBe brief.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\n"
    assert end_of_turn_tokens(template) == ("<|end|>",)
