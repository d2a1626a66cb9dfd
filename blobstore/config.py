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
ROPE_KINDS = ("default", "linear", "llama3", "longrope", "factors")


class ConfigError(ValueError):
    """A config field is missing, out of range, or asks for something the runtime cannot run."""


@dataclass(frozen=True)
class RopeParams:
    """Rotary embedding of one layer: base `theta`, the rotated dimensions and a frequency scaling.

    kind "linear" divides every frequency by `factor`; kind "llama3" divides only the low
    frequencies, blending smoothly between `low_freq_factor` and `high_freq_factor` wavelengths
    of `original_max_position_embeddings` (Llama 3.1+); kind "longrope" (Phi-3) divides
    frequency i by `short_factor[i]`, or by `long_factor[i]` for a forward call reaching past
    `original_max_position_embeddings`, and multiplies cos and sin by `attention_factor`;
    kind "factors" divides frequency i by `factors[i]` (llama.cpp's `rope_freqs` tensor, which
    bakes Llama 3.1 scaling into a GGUF). `rotary_dim` (None: the whole head) is how many of a
    head's leading dimensions rotate (partial rotary, e.g. Phi-4-mini's 0.75).
    """

    theta: float
    kind: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 1.0
    original_max_position_embeddings: int = 0
    rotary_dim: int | None = None
    short_factor: tuple[float, ...] = ()
    long_factor: tuple[float, ...] = ()
    attention_factor: float = 1.0
    factors: tuple[float, ...] = ()

    def __post_init__(self):
        for name in ("short_factor", "long_factor", "factors"):  # JSON gives lists; keep the record hashable
            object.__setattr__(self, name, tuple(float(v) for v in getattr(self, name)))

    def inv_freq(self, head_dim: int, long_context: bool = False) -> np.ndarray:
        """Inverse frequencies (rotary_dim // 2,) float32 for rotating pairs (i, i + rotary_dim/2),
        computed in float32 as transformers computes them (to within torch's pow, an ulp at most);
        `long_context` picks LongRoPE's long factors (see `uses_long_factors`).

        >>> RopeParams(10000.0).inv_freq(4)
        array([1.  , 0.01], dtype=float32)
        >>> RopeParams(10000.0, rotary_dim=2).inv_freq(4)
        array([1.], dtype=float32)
        """
        dim = self.rotated_dims(head_dim)
        exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
        # torch raises the (double) base to f32 exponents nearly correctly rounded; a double power
        # rounded to f32 agrees with it far more often than numpy's f32 power
        base = (np.float64(self.theta) ** exponents.astype(np.float64)).astype(np.float32)
        if self.kind == "longrope":
            divisors = np.asarray(self.long_factor if long_context else self.short_factor, np.float32)
            return (np.float32(1.0) / (divisors * base)).astype(np.float32)
        inv = (np.float32(1.0) / base).astype(np.float32)
        if self.kind == "linear":
            inv = inv / np.float32(self.factor)
        elif self.kind == "llama3":
            inv = self._llama3_scaled(inv)
        elif self.kind == "factors":
            inv = inv / np.asarray(self.factors, np.float32)
        return inv.astype(np.float32)

    def rotated_dims(self, head_dim: int) -> int:
        """How many leading dimensions of each head rotate.

        >>> RopeParams(10000.0, rotary_dim=96).rotated_dims(128)
        96
        """
        return head_dim if self.rotary_dim is None else self.rotary_dim

    def uses_long_factors(self, positions_end: int) -> bool:
        """Whether a forward call over positions below `positions_end` takes LongRoPE's long
        factors: transformers picks them per call when its largest position + 1 exceeds the
        original context.

        >>> RopeParams(1e4, "longrope", original_max_position_embeddings=32).uses_long_factors(33)
        True
        """
        return self.kind == "longrope" and positions_end > self.original_max_position_embeddings

    def _llama3_scaled(self, inv: np.ndarray) -> np.ndarray:
        context = self.original_max_position_embeddings
        wavelength = 2 * math.pi / inv
        scaled = np.where(wavelength > context / self.low_freq_factor, inv / self.factor, inv)  # long waves
        smooth = (context / wavelength - self.low_freq_factor) / (self.high_freq_factor - self.low_freq_factor)
        blended = (1 - smooth) * scaled / self.factor + smooth * scaled
        medium = (wavelength >= context / self.high_freq_factor) & (wavelength <= context / self.low_freq_factor)
        return np.where(medium, blended, scaled)

    def problems(self, head_dim: int) -> list[str]:
        """What makes these settings unusable with heads of `head_dim` (empty when fine)."""
        dim = self.rotated_dims(head_dim)
        if not (isinstance(dim, int) and 0 < dim <= head_dim and dim % 2 == 0):
            return [f"rotary_dim: expected an even number from 2 to head_dim ({head_dim}), found {dim!r}"]
        lists = {"longrope": ("short_factor", "long_factor"), "factors": ("factors",)}.get(self.kind, ())
        return [f"{name}: expected {dim // 2} values (one per rotated pair), found {len(getattr(self, name))}"
                for name in lists if len(getattr(self, name)) != dim // 2]


@dataclass(frozen=True)
class ModelConfig:
    """Everything the runtime needs to run the text model; see docs/CONVERT.md for each field.

    >>> cfg = ModelConfig.from_hf({"architectures": ["LlamaForCausalLM"], "vocab_size": 32,
    ...     "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4})
    >>> cfg.head_dim, cfg.num_kv_heads, cfg.layer_types
    (4, 4, ('full_attention', 'full_attention'))
    """

    arch: str                       # the source architecture, e.g. "Gemma3ForCausalLM"
    family: str                     # "gemma" | "llama" | "phi3" | "qwen": the name table used
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
    def from_gguf(cls, metadata: dict, has_output_head: bool = True, rope_tensors: dict | None = None) -> "ModelConfig":
        """Normalize GGUF metadata (key → value); a GGUF without `output.weight` has a tied head.
        `rope_tensors` maps the rope scaling tensors present (`rope_freqs.weight`, ...) to their values."""
        from .convert.families import family_for_gguf

        family = family_for_gguf(metadata)
        return family.normalize(family.hf_config_from_gguf(metadata, has_output_head, rope_tensors))

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
        problems = sorted({p for rope in self.rope for p in rope.problems(self.head_dim)})
        if problems:
            raise ConfigError(f"model config field rope: {'; '.join(problems)}")
        # the runtime switches every layer's LongRoPE factors at once (transformers has one rotary embedding)
        contexts = {r.original_max_position_embeddings for r in self.rope if r.kind == "longrope"}
        if len(contexts) > 1:
            raise ConfigError(f"model config field rope: longrope layers disagree on "
                              f"original_max_position_embeddings ({sorted(contexts)})")


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
