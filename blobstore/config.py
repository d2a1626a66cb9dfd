"""ModelConfig: the one runtime description of a decoder-only transformer, shared by all families.

The converter normalizes a checkpoint's config.json (transformers 4 or 5 style) or a GGUF file's
metadata into a ModelConfig and stores `to_dict()` as the manifest's `metadata["model"]`; the
runtime reads it back with `from_dict()` and builds ONE transformer block varied by these fields.
Per-layer fields are tuples with one entry per layer, so no reader has to re-derive a pattern.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from .quant import bf16_to_f32, f32_to_bf16

FULL_ATTENTION = "full_attention"
SLIDING_ATTENTION = "sliding_attention"
LAYER_TYPES = (FULL_ATTENTION, SLIDING_ATTENTION)
ACTIVATIONS = ("silu", "gelu_tanh")
ROPE_KINDS = ("default", "linear", "llama3")


class ConfigError(ValueError):
    """A config field is missing, out of range, or asks for something the runtime cannot run."""


@dataclass(frozen=True)
class RopeParams:
    """Rotary embedding of one layer: base `theta` and an optional frequency scaling.

    kind "linear" divides every frequency by `factor`; kind "llama3" divides only the low
    frequencies, blending smoothly between `low_freq_factor` and `high_freq_factor` wavelengths
    of `original_max_position_embeddings` (Llama 3.1+).
    """

    theta: float
    kind: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 1.0
    original_max_position_embeddings: int = 0

    def inv_freq(self, head_dim: int) -> np.ndarray:
        """Inverse frequencies (head_dim // 2,) float32 for rotating pairs (i, i + head_dim/2),
        computed in float32 exactly as transformers computes them.

        >>> RopeParams(10000.0).inv_freq(4)
        array([1.  , 0.01], dtype=float32)
        """
        exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
        inv = (np.float32(1.0) / (np.float32(self.theta) ** exponents)).astype(np.float32)
        if self.kind == "linear":
            inv = inv / np.float32(self.factor)
        elif self.kind == "llama3":
            inv = self._llama3_scaled(inv)
        return inv.astype(np.float32)

    def _llama3_scaled(self, inv: np.ndarray) -> np.ndarray:
        context = self.original_max_position_embeddings
        wavelength = 2 * math.pi / inv
        scaled = np.where(wavelength > context / self.low_freq_factor, inv / self.factor, inv)  # long waves
        smooth = (context / wavelength - self.low_freq_factor) / (self.high_freq_factor - self.low_freq_factor)
        blended = (1 - smooth) * scaled / self.factor + smooth * scaled
        medium = (wavelength >= context / self.high_freq_factor) & (wavelength <= context / self.low_freq_factor)
        return np.where(medium, blended, scaled)


@dataclass(frozen=True)
class ModelConfig:
    """Everything the runtime needs to run the text model; see docs/CONVERT.md for each field.

    >>> cfg = ModelConfig.from_hf({"architectures": ["LlamaForCausalLM"], "vocab_size": 32,
    ...     "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4})
    >>> cfg.head_dim, cfg.num_kv_heads, cfg.layer_types
    (4, 4, ('full_attention', 'full_attention'))
    """

    arch: str                       # the source architecture, e.g. "Gemma3ForCausalLM"
    family: str                     # "gemma" | "llama" | "qwen": the name table used
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    norm_offset: float              # RMSNorm multiplies by (norm_offset + w): 1.0 for Gemma, else 0.0
    embedding_scale: float          # embeddings are multiplied by this (Gemma: sqrt(hidden) in the checkpoint dtype)
    activation: str                 # gated-MLP activation: "silu" | "gelu_tanh"
    layer_types: tuple[str, ...]    # per layer: "full_attention" | "sliding_attention"
    sliding_window: tuple[int, ...]  # per layer: attention window in tokens, 0 = unlimited
    rope: tuple[RopeParams, ...]    # per layer
    attn_scale: float               # multiplies q·k: query_pre_attn_scalar ** -0.5 (Gemma 2/3) or head_dim ** -0.5
    attn_logit_softcap: float | None  # scores = cap * tanh(scores / cap) when set (Gemma 2)
    final_logit_softcap: float | None  # the same on the output logits
    qk_norm: bool                   # RMSNorm over each head of q and k (Gemma 3, Qwen3)
    qkv_bias: bool                  # q, k and v projections carry biases (Qwen2, Llama attention_bias)
    o_bias: bool                    # the output projection carries a bias (Llama/Qwen3 attention_bias)
    sandwich_norms: bool            # extra norms after attention and after the MLP (Gemma 2/3)
    tie_word_embeddings: bool       # the output head is the embedding matrix
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    pad_token_id: int | None
    max_position_embeddings: int
    source_dtype: str               # "float32" | "float16" | "bfloat16": the checkpoint's compute dtype

    def __post_init__(self):
        self._validate()

    # ---- tensors ----

    def expected_tensors(self) -> dict[str, tuple[int, ...]]:
        """Canonical name → shape of every text tensor this config requires (HF orientation: out, in).

        `lm_head` is listed even when tied: the file then holds it as a tie to `embed`.

        >>> cfg = ModelConfig.from_hf({"architectures": ["LlamaForCausalLM"], "vocab_size": 32,
        ...     "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4})
        >>> cfg.expected_tensors()["layers.0.q"]
        (16, 16)
        """
        d, q_out, kv_out = self.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        per_layer = {"attn_norm": (d,), "q": (q_out, d), "k": (kv_out, d), "v": (kv_out, d), "o": (d, q_out),
                     "ffn_norm": (d,), "gate": (self.intermediate_size, d), "up": (self.intermediate_size, d),
                     "down": (d, self.intermediate_size)}
        if self.qkv_bias:
            per_layer.update(q_bias=(q_out,), k_bias=(kv_out,), v_bias=(kv_out,))
        if self.o_bias:
            per_layer["o_bias"] = (d,)
        if self.qk_norm:
            per_layer.update(q_norm=(self.head_dim,), k_norm=(self.head_dim,))
        if self.sandwich_norms:
            per_layer.update(post_attn_norm=(d,), post_ffn_norm=(d,))
        shapes = {"embed": (self.vocab_size, d)}
        for i in range(self.num_layers):
            shapes.update({f"layers.{i}.{part}": shape for part, shape in per_layer.items()})
        shapes.update(final_norm=(d,), lm_head=(self.vocab_size, d))
        return shapes

    # ---- serialization ----

    def to_dict(self) -> dict:
        """A JSON-able dict (tuples become lists); `from_dict` reverses it."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        """Rebuild from `to_dict()` output. Unknown keys (a newer writer) are ignored; missing ones are errors."""
        names = {f.name for f in dataclasses.fields(cls)}
        missing = sorted(names - data.keys())
        if missing:
            raise ConfigError(f"model config is missing field(s) {', '.join(missing)}")
        values = {k: v for k, v in data.items() if k in names}
        values["rope"] = tuple(RopeParams(**r) if isinstance(r, dict) else r for r in values["rope"])
        for key in ("layer_types", "sliding_window", "eos_token_ids"):
            values[key] = tuple(values[key])
        return cls(**values)

    @classmethod
    def from_hf(cls, config: dict, generation_config: dict | None = None) -> "ModelConfig":
        """Normalize a Hugging Face config.json dict (transformers 4 or 5 style).

        End-of-sequence ids from generation_config.json, when given, join those of config.json.
        """
        from .convert.families import family_for_hf  # the families depend on this module, not the reverse

        return family_for_hf(config).normalize(config, generation_config)

    @classmethod
    def from_gguf(cls, metadata: dict, has_output_head: bool = True) -> "ModelConfig":
        """Normalize GGUF metadata (key → value); a GGUF without `output.weight` has a tied head."""
        from .convert.families import family_for_gguf

        family = family_for_gguf(metadata)
        return family.normalize(family.hf_config_from_gguf(metadata, has_output_head))

    # ---- validation ----

    def _validate(self):
        positive = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                    "head_dim", "max_position_embeddings")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"model config field {name}: expected a positive integer, found {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"model config: num_heads ({self.num_heads}) is not a multiple of "
                              f"num_kv_heads ({self.num_kv_heads})")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"model config field activation: expected one of {ACTIVATIONS}, found {self.activation!r}")
        for name in ("layer_types", "sliding_window", "rope"):
            if len(getattr(self, name)) != self.num_layers:
                raise ConfigError(f"model config field {name}: expected {self.num_layers} entries (one per layer), "
                                  f"found {len(getattr(self, name))}")
        bad_types = sorted(set(self.layer_types) - set(LAYER_TYPES))
        if bad_types:
            raise ConfigError(f"model config field layer_types: expected entries of {LAYER_TYPES}, found {bad_types}")
        bad_rope = sorted({r.kind for r in self.rope} - set(ROPE_KINDS))
        if bad_rope:
            raise ConfigError(f"rope type {bad_rope[0]!r} is not supported; supported: {', '.join(ROPE_KINDS)}")


def round_to_dtype(value: float, dtype: str) -> float:
    """`value` as transformers holds it in a tensor of `dtype` (a float32 scalar cast to that dtype).

    >>> round_to_dtype(640 ** 0.5, "bfloat16")
    25.25
    """
    single = np.array([value], np.float32)
    if dtype == "bfloat16":
        return float(bf16_to_f32(f32_to_bf16(single))[0])
    if dtype == "float16":
        return float(single.astype(np.float16)[0])
    return float(single[0])
