"""What every family shares: the Family record, HF name parsing, and config normalization.

A family module supplies only data — the variants' transformers defaults and traits, its
per-layer name table, its GGUF quirks — and this module turns a config dict plus that data
into a ModelConfig. Config dicts may be transformers-4 style (rope_theta, rope_scaling,
sliding_window_pattern, torch_dtype) or transformers-5 style (rope_parameters, possibly nested
per attention type; layer_types; dtype).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ...config import (
    FULL_ATTENTION, LAYER_TYPES, SLIDING_ATTENTION, ConfigError, ModelConfig, RopeParams, round_to_dtype,
)

# Text-model key prefixes seen in practice: transformers 4/5 CausalLM, bare, and the two
# multimodal wrappings (transformers >= 4.52 and the original Gemma 3 release).
TEXT_PREFIX = r"(?:model\.language_model\.|language_model\.model\.|model\.)?"
LAYER_NAME = re.compile(rf"^{TEXT_PREFIX}layers\.(\d+)\.(.+)$")
GLOBAL_NAMES = {"embed_tokens.weight": "embed", "norm.weight": "final_norm"}
GLOBAL_NAME = re.compile(rf"^{TEXT_PREFIX}(embed_tokens\.weight|norm\.weight)$")
HEAD_NAME = re.compile(r"^(?:language_model\.)?lm_head(?:\.weight)?$")

# Per-layer names every family shares (HF suffix after "layers.N." → canonical part). A family's
# table may map a fused tensor to a tuple of parts, stacked along its rows in that order.
COMMON_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm",
    "self_attn.q_proj.weight": "q", "self_attn.k_proj.weight": "k",
    "self_attn.v_proj.weight": "v", "self_attn.o_proj.weight": "o",
    "self_attn.q_proj.bias": "q_bias", "self_attn.k_proj.bias": "k_bias",
    "self_attn.v_proj.bias": "v_bias", "self_attn.o_proj.bias": "o_bias",
    "self_attn.q_norm.weight": "q_norm", "self_attn.k_norm.weight": "k_norm",
    "mlp.gate_proj.weight": "gate", "mlp.up_proj.weight": "up", "mlp.down_proj.weight": "down",
}
# HF calls the pre-MLP norm "post_attention_layernorm" in Llama-style blocks...
PLAIN_BLOCK_NAMES = {**COMMON_LAYER_NAMES, "post_attention_layernorm.weight": "ffn_norm"}
# ...while Gemma 2/3 blocks norm before and after both attention and MLP.
SANDWICH_BLOCK_NAMES = {
    **COMMON_LAYER_NAMES,
    "post_attention_layernorm.weight": "post_attn_norm",
    "pre_feedforward_layernorm.weight": "ffn_norm",
    "post_feedforward_layernorm.weight": "post_ffn_norm",
}

# GGUF (llama.cpp) names; its semantics match the canonical ones, so one table serves every family.
GGUF_LAYER_NAME = re.compile(r"^blk\.(\d+)\.(.+)$")
GGUF_LAYER_NAMES = {
    "attn_norm.weight": "attn_norm", "attn_q.weight": "q", "attn_k.weight": "k", "attn_v.weight": "v",
    "attn_output.weight": "o", "attn_q.bias": "q_bias", "attn_k.bias": "k_bias", "attn_v.bias": "v_bias",
    "attn_output.bias": "o_bias", "attn_q_norm.weight": "q_norm", "attn_k_norm.weight": "k_norm",
    "post_attention_norm.weight": "post_attn_norm", "ffn_norm.weight": "ffn_norm",
    "post_ffw_norm.weight": "post_ffn_norm", "ffn_gate.weight": "gate", "ffn_up.weight": "up",
    "ffn_down.weight": "down",
}
# Tensors that hold rope scaling, read into the config rather than stored.
GGUF_ROPE_TENSORS = ("rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight")
GGUF_GLOBAL_NAMES = {"token_embd.weight": "embed", "output_norm.weight": "final_norm", "output.weight": "lm_head"}
# Multimodal components and where their tensors live in HF checkpoints.
# The hub's checkpoints nest the tower one level deeper (vision_tower.vision_model.…) than
# transformers 5 saves it (model.vision_tower.…); both store as vision.….
COMPONENT_NAMES = {
    "vision": re.compile(r"^(?:model\.)?vision_tower\.(?:vision_model\.)?(.+)$"),
    "projector": re.compile(r"^(?:model\.)?multi_modal_projector\.(.+)$"),
}
# Component weights stored in the (out, in) form the kernels multiply rather than the source's:
# source-derived name → (name stored under, form). "transpose": transformers multiplies Gemma 3's
# projection as x @ W with W (in, out); stored as W.T (a quantized row then holds one output's
# weights) under an nn.Linear-style name, so that no reader mistakes the orientation. "flatten":
# SigLIP's patch embedding is a convolution with stride = kernel, a matrix over unfolded patches;
# stored (out, channels * kh * kw), whose rows the file's padding of each row of a 4-D tensor's last
# axis would otherwise break up (its ndim tells the two forms apart).
COMPONENT_MATRIX_FORMS = {
    "projector.mm_input_projection_weight": ("projector.mm_input_projection.weight", "transpose"),
    "vision.embeddings.patch_embedding.weight": ("vision.embeddings.patch_embedding.weight", "flatten"),
}
STORED_FORMS = {stored: form for stored, form in COMPONENT_MATRIX_FORMS.values()}   # stored name → form

ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}
DTYPES = {"float32": "float32", "float16": "float16", "bfloat16": "bfloat16", "half": "float16", "float": "float32"}


@dataclass(frozen=True)
class Variant:
    """One architecture's traits and the transformers class defaults its config.json may omit."""

    defaults: dict
    layer_names: dict                     # HF suffix after "layers.N." → canonical part
    layer_pattern: Callable[[dict, int], list[str]]  # layer types when the config lists none
    norm_offset: float = 0.0
    scale_embeddings: bool = False
    sandwich_norms: bool = False
    qk_norm: bool = False
    qkv_bias: bool | None = None          # None: from the config's attention_bias
    uses_query_pre_attn_scalar: bool = False
    default_theta: dict = field(default_factory=lambda: {FULL_ATTENTION: 10000.0, SLIDING_ATTENTION: 10000.0})
    local_theta_key: str | None = None    # transformers-4 key of the sliding layers' rope base
    legacy_scaled_types: tuple = LAYER_TYPES  # layer types a transformers-4 rope_scaling applies to
    legacy_activation: dict = field(default_factory=dict)  # extra activation spellings of this family
    rope_type_aliases: dict = field(default_factory=dict)  # older rope type names this family's class renames
    gguf_layer_names: dict = field(default_factory=lambda: GGUF_LAYER_NAMES)  # GGUF suffix after "blk.N." → part(s)
    multimodal: bool = False              # text config nested under text_config; vision tower expected
    # multimodal: the class defaults config.json may omit, of the vision config and of the top-level
    # projector keys; the converter stores them filled in as the components' configs
    vision_defaults: dict = field(default_factory=dict)
    projector_defaults: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Family:
    """A family: its architectures and GGUF quirks."""

    name: str
    variants: dict                        # HF architecture name → Variant
    gguf_arches: dict                     # GGUF general.architecture → HF architecture name
    gguf_config: Callable[[dict, str, dict], dict] = lambda meta, arch, cfg: cfg  # family GGUF keys
    # GGUF fix-ups by stored name. A matrix whose GGUF type is stored as it is arrives as its ggml block
    # bytes, uint8 (rows, row bytes): a fix-up may only move or slice whole rows of it (llama's q/k unpermute).
    gguf_sanitize: Callable[[str, np.ndarray, ModelConfig], np.ndarray] = lambda name, x, cfg: x

    def normalize(self, config: dict, generation_config: dict | None = None) -> ModelConfig:
        arch = architecture_of(config)
        return normalize(config, arch, self.name, self.variants[arch], generation_config or {})

    def variant(self, config: dict) -> Variant:
        return self.variants[architecture_of(config)]

    def hf_config_from_gguf(self, meta: dict, has_output_head: bool, rope_tensors: dict | None = None) -> dict:
        """An HF-style config dict; `rope_tensors` maps the file's GGUF_ROPE_TENSORS to their values."""
        hf_arch = self.gguf_arches[meta["general.architecture"]]
        return self.gguf_config(meta, hf_arch, gguf_common_config(meta, hf_arch, has_output_head, rope_tensors or {}))


def map_text_name(name: str, layer_names: dict) -> str | tuple[str, ...] | None:
    """Canonical name of an HF text tensor name — a tuple of names for a fused tensor — or None:
    exact, anchored matches only.

    >>> map_text_name("model.layers.3.mlp.up_proj.weight", PLAIN_BLOCK_NAMES)
    'layers.3.up'
    """
    match = LAYER_NAME.match(name)
    if match:
        return _layer_names(int(match.group(1)), layer_names.get(match.group(2)))
    match = GLOBAL_NAME.match(name)
    if match:
        return GLOBAL_NAMES[match.group(1)]
    return "lm_head" if HEAD_NAME.match(name) else None


def map_gguf_name(name: str, layer_names: dict = GGUF_LAYER_NAMES) -> str | tuple[str, ...] | None:
    """Canonical name of a GGUF tensor name (a tuple of names for a fused tensor), or None.

    >>> map_gguf_name("blk.2.attn_output.weight")
    'layers.2.o'
    """
    match = GGUF_LAYER_NAME.match(name)
    if match:
        return _layer_names(int(match.group(1)), layer_names.get(match.group(2)))
    return GGUF_GLOBAL_NAMES.get(name)


def _layer_names(index: int, part) -> str | tuple[str, ...] | None:
    if isinstance(part, tuple):
        return tuple(f"layers.{index}.{p}" for p in part)
    return f"layers.{index}.{part}" if part else None


def map_component_name(name: str) -> tuple[str, str] | None:
    """(component, stored name) of a multimodal tensor: `vision.…` / `projector.…`, suffixes kept as
    they are but for COMPONENT_MATRIX_FORMS.

    >>> map_component_name("vision_tower.vision_model.post_layernorm.weight")
    ('vision', 'vision.post_layernorm.weight')
    """
    for component, pattern in COMPONENT_NAMES.items():
        match = pattern.match(name)
        if match:
            stored = f"{component}.{match.group(1)}"
            return component, COMPONENT_MATRIX_FORMS.get(stored, (stored,))[0]
    return None


def architecture_of(config: dict) -> str:
    archs = config.get("architectures") or []
    if len(archs) != 1 or not isinstance(archs[0], str):
        raise ConfigError(f"config.json field architectures: expected one architecture name, found {archs!r}")
    return archs[0]


# ---- config normalization ----

def text_section(config: dict, variant: Variant) -> dict:
    """The text model's config with the architecture's defaults filled in.

    transformers writes only non-default values to config.json, so defaults are part of the format.
    """
    section = (config.get("text_config") or {}) if variant.multimodal else config
    merged = {**variant.defaults, **section}
    for key in ("dtype", "torch_dtype"):  # multimodal configs keep the dtype at the top level
        merged.setdefault(key, config.get(key))
    return merged


def normalize(config: dict, arch: str, family: str, variant: Variant, generation_config: dict) -> ModelConfig:
    cfg = text_section(config, variant)
    hidden, heads = _int(cfg, "hidden_size"), _int(cfg, "num_attention_heads")
    head_dim = _int(cfg, "head_dim") if cfg.get("head_dim") else hidden // heads
    num_layers = _int(cfg, "num_hidden_layers")
    layer_types = _layer_types(cfg, num_layers, variant)
    window = cfg.get("sliding_window") or 0
    source_dtype = _source_dtype(cfg)
    qkv_bias = bool(cfg.get("attention_bias")) if variant.qkv_bias is None else variant.qkv_bias
    if cfg.get("mlp_bias"):
        raise ConfigError("config.json field mlp_bias: true is not supported (MLP projections without biases only)")
    return ModelConfig(
        arch=arch, family=family,
        vocab_size=_int(cfg, "vocab_size"), hidden_size=hidden, intermediate_size=_int(cfg, "intermediate_size"),
        num_layers=num_layers, num_heads=heads, num_kv_heads=_int(cfg, "num_key_value_heads", heads),
        head_dim=head_dim, rms_norm_eps=float(cfg["rms_norm_eps"]), norm_offset=variant.norm_offset,
        embedding_scale=round_to_dtype(math.sqrt(hidden), source_dtype) if variant.scale_embeddings else 1.0,
        activation=_activation(cfg, variant),
        layer_types=tuple(layer_types),
        sliding_window=tuple(int(window) if t == SLIDING_ATTENTION else 0 for t in layer_types),
        rope=_rope_per_layer(cfg, layer_types, variant, head_dim),
        attn_scale=float(cfg["query_pre_attn_scalar"] if variant.uses_query_pre_attn_scalar else head_dim) ** -0.5,
        attn_logit_softcap=_optional_float(cfg.get("attn_logit_softcapping")),
        final_logit_softcap=_optional_float(cfg.get("final_logit_softcapping")),
        qk_norm=variant.qk_norm, qkv_bias=qkv_bias,
        o_bias=bool(cfg.get("attention_bias")) and variant.qkv_bias is None,
        sandwich_norms=variant.sandwich_norms,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", config.get("tie_word_embeddings", False))),
        bos_token_id=_token_id(generation_config.get("bos_token_id", cfg.get("bos_token_id"))),
        eos_token_ids=_eos_ids(cfg.get("eos_token_id"), generation_config.get("eos_token_id")),
        pad_token_id=_token_id(generation_config.get("pad_token_id", cfg.get("pad_token_id"))),
        max_position_embeddings=_int(cfg, "max_position_embeddings"),
        source_dtype=source_dtype,
    )


def _int(cfg: dict, key: str, default=None) -> int:
    value = cfg.get(key, default)
    if value is None:
        value = default
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(f"config.json field {key}: expected an integer, found {value!r}")
    return value


def _optional_float(value) -> float | None:
    return None if value is None else float(value)


def _token_id(value) -> int | None:
    if isinstance(value, list):  # some configs give a list; the first is the canonical one
        value = value[0] if value else None
    return value


def _eos_ids(*values) -> tuple[int, ...]:
    """Every end-of-sequence id from config.json and generation_config.json, in first-seen order."""
    ids = []
    for value in values:
        for token in value if isinstance(value, list) else [value]:
            if isinstance(token, int) and token not in ids:
                ids.append(token)
    return tuple(ids)


def _source_dtype(cfg: dict) -> str:
    name = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
    if name not in DTYPES:
        raise ConfigError(f"config.json field dtype: expected one of {sorted(DTYPES)}, found {name!r}")
    return DTYPES[name]


def _activation(cfg: dict, variant: Variant) -> str:
    name = cfg.get("hidden_activation") or cfg.get("hidden_act")
    known = {**ACTIVATIONS, **variant.legacy_activation}
    if name not in known:
        raise ConfigError(f"config.json field hidden_act: {name!r} is not supported; supported: {sorted(known)}")
    return known[name]


def _layer_types(cfg: dict, num_layers: int, variant: Variant) -> list[str]:
    """`layer_types` when present (it wins over stale pattern fields), else the family's pattern."""
    types = cfg.get("layer_types")
    if types is None:
        types = variant.layer_pattern(cfg, num_layers)
    if len(types) != num_layers or not set(types) <= set(LAYER_TYPES):
        raise ConfigError(f"config.json field layer_types: expected {num_layers} entries of {LAYER_TYPES}, "
                          f"found {types!r}")
    return list(types)


def _rope_per_layer(cfg: dict, layer_types: list[str], variant: Variant, head_dim: int) -> tuple[RopeParams, ...]:
    params = cfg.get("rope_parameters")
    if params and set(params) & set(LAYER_TYPES):  # transformers 5, one dict per attention type
        found = {t: (params.get(t) or {}, f"rope_parameters.{t}") for t in set(layer_types)}
    elif params:  # transformers 5, one dict for all layers
        found = {t: (params, "rope_parameters") for t in set(layer_types)}
    else:  # transformers 4: rope_theta (+ a local base) and rope_scaling
        found = {t: _legacy_rope(cfg, t, variant) for t in set(layer_types)}
    by_type = {t: _rope(p, variant.default_theta[t], cfg, where, variant, head_dim) for t, (p, where) in found.items()}
    return tuple(by_type[t] for t in layer_types)


def _legacy_rope(cfg: dict, layer_type: str, variant: Variant) -> tuple[dict, str]:
    theta = cfg.get("rope_theta")
    if layer_type == SLIDING_ATTENTION and variant.local_theta_key:
        theta = cfg.get(variant.local_theta_key)
    scaling = cfg.get("rope_scaling") if layer_type in variant.legacy_scaled_types else None
    return {**(scaling or {}), "rope_theta": theta if theta is not None else variant.default_theta[layer_type]}, \
        "rope_scaling"


def _rope(params: dict, default_theta: float, cfg: dict, where: str, variant: Variant, head_dim: int) -> RopeParams:
    kind = params.get("rope_type") or params.get("type") or "default"
    kind = variant.rope_type_aliases.get(kind, kind)
    theta = float(params.get("rope_theta") or default_theta)
    rotary_dim = _rotary_dim(params, cfg, head_dim)
    if kind == "default":
        return RopeParams(theta, rotary_dim=rotary_dim)
    if kind == "linear":
        return RopeParams(theta, "linear", factor=float(params["factor"]), rotary_dim=rotary_dim)
    if kind == "llama3":
        return RopeParams(theta, "llama3", factor=float(params["factor"]),
                          low_freq_factor=float(params["low_freq_factor"]),
                          high_freq_factor=float(params["high_freq_factor"]),
                          original_max_position_embeddings=_original_context(params, cfg), rotary_dim=rotary_dim)
    if kind == "longrope":
        return _longrope(params, cfg, theta, rotary_dim)
    if kind == "factors":  # only from a GGUF's rope_freqs tensor (see gguf_common_config)
        return RopeParams(theta, "factors", factors=params["factors"], rotary_dim=rotary_dim)
    raise ConfigError(f"config.json field {where}: rope type {kind!r} is not supported; "
                      f"supported: default, linear, llama3, longrope")


def _rotary_dim(params: dict, cfg: dict, head_dim: int) -> int | None:
    """The rotated dimensions of a head as transformers takes them (int(head_dim * partial_rotary_factor)),
    or an explicit count (a GGUF's rope.dimension_count); None when the whole head rotates."""
    if cfg.get("rotary_dim") is not None:
        dims = _int(cfg, "rotary_dim")
    else:
        dims = int(head_dim * float(params.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))))
    return None if dims == head_dim else dims


def _original_context(params: dict, cfg: dict) -> int:
    """The pre-training context of a scaled rope: a top-level config field wins (Phi-3 keeps it
    there), as in transformers' standardize_rope_params, then the rope dict's, then the context."""
    return int(cfg.get("original_max_position_embeddings") or params.get("original_max_position_embeddings")
               or cfg["max_position_embeddings"])


def _longrope(params: dict, cfg: dict, theta: float, rotary_dim: int | None) -> RopeParams:
    """LongRoPE as transformers' _compute_longrope_parameters reads it: the attention factor
    defaults to sqrt(1 + ln(factor) / ln(original context)), factor = context / original context."""
    original = _original_context(params, cfg)
    factor = params.get("factor") or cfg["max_position_embeddings"] / original
    attention = params.get("attention_factor")
    if attention is None:
        attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    return RopeParams(theta, "longrope", original_max_position_embeddings=original, rotary_dim=rotary_dim,
                      short_factor=params["short_factor"], long_factor=params["long_factor"],
                      attention_factor=float(attention))


# ---- layer patterns (used when a config has no layer_types) ----

def all_full(cfg: dict, num_layers: int) -> list[str]:
    return [FULL_ATTENTION] * num_layers


def all_windowed(cfg: dict, num_layers: int) -> list[str]:
    """The sliding window, when the config sets one, applies to every layer (Mistral, Phi-3)."""
    return [SLIDING_ATTENTION] * num_layers if cfg.get("sliding_window") else all_full(cfg, num_layers)


def every_nth_full(pattern_key: str, default_every: int):
    """Layers are sliding except every `every`-th (Gemma 2: 2, Gemma 3: 6)."""
    def pattern(cfg: dict, num_layers: int) -> list[str]:
        every = cfg.get(pattern_key) or default_every
        return [FULL_ATTENTION if (i + 1) % every == 0 else SLIDING_ATTENTION for i in range(num_layers)]
    return pattern


# ---- GGUF metadata → an HF-style config dict ----

def gguf_common_config(meta: dict, hf_arch: str, has_output_head: bool, rope_tensors: dict) -> dict:
    """The GGUF keys every architecture shares, under their config.json names (absent keys left out);
    `rope_tensors` holds the file's GGUF_ROPE_TENSORS, which carry rope scaling as data."""
    arch = meta["general.architecture"]
    key = lambda k: meta.get(f"{arch}.{k}")  # noqa: E731
    head_count_kv = key("attention.head_count_kv")
    if isinstance(head_count_kv, list):
        raise ConfigError(f"GGUF field {arch}.attention.head_count_kv: per-layer KV head counts are not supported")
    tokens = meta.get("tokenizer.ggml.tokens")
    config = {
        "architectures": [hf_arch],
        "vocab_size": key("vocab_size") or (len(tokens) if tokens else None),
        "hidden_size": key("embedding_length"), "intermediate_size": key("feed_forward_length"),
        "num_hidden_layers": key("block_count"), "num_attention_heads": key("attention.head_count"),
        "num_key_value_heads": head_count_kv, "head_dim": key("attention.key_length"),
        "rotary_dim": key("rope.dimension_count"),
        "rms_norm_eps": key("attention.layer_norm_rms_epsilon"), "max_position_embeddings": key("context_length"),
        "original_max_position_embeddings": key("rope.scaling.original_context_length"),
        "rope_theta": key("rope.freq_base"), "sliding_window": key("attention.sliding_window"),
        "attn_logit_softcapping": key("attn_logit_softcapping"),
        "final_logit_softcapping": key("final_logit_softcapping"),
        "tie_word_embeddings": not has_output_head,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"), "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
        "dtype": "float32",  # GGUF weights are dequantized to float32
        "rope_scaling": _gguf_rope_scaling(arch, key, rope_tensors),
    }
    return {k: v for k, v in config.items() if v is not None}


def _gguf_rope_scaling(arch: str, key, rope_tensors: dict) -> dict | None:
    """rope_scaling from llama.cpp's keys and tensors: LongRoPE factor pairs (Phi-3), per-frequency
    divisors (rope_freqs: Llama 3.1 scaling baked in by llama.cpp's converter) or linear scaling."""
    scaling = key("rope.scaling.type") or "none"
    if scaling not in ("none", "linear"):
        raise ConfigError(f"GGUF field {arch}.rope.scaling.type: {scaling!r} is not supported; "
                          f"supported: none, linear (and the rope factor tensors {', '.join(GGUF_ROPE_TENSORS)})")
    long, short = rope_tensors.get("rope_factors_long.weight"), rope_tensors.get("rope_factors_short.weight")
    freqs = rope_tensors.get("rope_freqs.weight")
    given = [what for what, present in (("rope_factors_long/short tensors", long is not None or short is not None),
                                         ("a rope_freqs tensor", freqs is not None),
                                         ("rope.scaling.type linear", scaling == "linear")) if present]
    if len(given) > 1:
        raise ConfigError(f"GGUF {arch}: two rope scalings at once ({' and '.join(given)})")
    if (long is None) != (short is None):
        raise ConfigError(f"GGUF {arch}: rope_factors_long.weight and rope_factors_short.weight come together; "
                          f"found only one")
    if long is not None:
        attention = key("rope.scaling.attn_factor")
        return {"rope_type": "longrope", "long_factor": long.tolist(), "short_factor": short.tolist(),
                "attention_factor": 1.0 if attention is None else attention}  # llama.cpp's default when absent
    if freqs is not None:
        return {"rope_type": "factors", "factors": freqs.tolist()}
    if scaling == "linear":
        return {"rope_type": "linear", "factor": key("rope.scaling.factor")}
    return None
