"""Phi-3, Phi-3.5 and Phi-4-mini (Phi3ForCausalLM): Llama-shaped blocks with fused projections.

q, k and v come as one `qkv_proj` and gate and up as one `gate_up_proj` (in GGUF `attn_qkv` and
`ffn_up`, twice the feed-forward rows): the name tables split them into the canonical tensors,
stacked along the rows in that order, since the kernels already run q/k/v and gate/up as one
job each. Rope is LongRoPE (short and long factor lists, an attention factor) on the longer
context variants, partial on Phi-4-mini (partial_rotary_factor 0.75). transformers' Phi3Config
renames the older rope types "su" and "yarn" to "longrope"; so does this family. llama.cpp
leaves phi3 q/k rows in HF order (it rotates them NeoX-style), so the GGUF needs no un-permuting.
Defaults below are transformers' class defaults, which config.json omits.
"""
from __future__ import annotations

from .base import GGUF_LAYER_NAMES, PLAIN_BLOCK_NAMES, Family, Variant, all_windowed

_PHI3 = dict(vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32, num_attention_heads=32,
             num_key_value_heads=None, head_dim=None, hidden_act="silu", max_position_embeddings=4096,
             original_max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1,
             eos_token_id=32000, pad_token_id=32000, sliding_window=None, attention_bias=False)

_LAYER_NAMES = {**PLAIN_BLOCK_NAMES, "self_attn.qkv_proj.weight": ("q", "k", "v"),
                "mlp.gate_up_proj.weight": ("gate", "up")}
_GGUF_LAYER_NAMES = {**GGUF_LAYER_NAMES, "attn_qkv.weight": ("q", "k", "v"), "ffn_up.weight": ("gate", "up")}

PHI3 = Family(
    name="phi3",
    variants={
        # a sliding_window, when set, applies to every layer (Phi-3-mini-4k: 2047)
        "Phi3ForCausalLM": Variant(_PHI3, _LAYER_NAMES, all_windowed,
                                   rope_type_aliases={"su": "longrope", "yarn": "longrope"},
                                   gguf_layer_names=_GGUF_LAYER_NAMES),
    },
    gguf_arches={"phi3": "Phi3ForCausalLM"},
)
