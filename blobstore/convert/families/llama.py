"""Llama 2/3 (incl. llama3 rope scaling) and Mistral: plain pre-norm blocks with SiLU-gated MLPs.

Defaults below are transformers' class defaults, which config.json omits.
"""
from __future__ import annotations

import numpy as np

from .base import PLAIN_BLOCK_NAMES, Family, Variant, all_full, all_windowed

_LLAMA = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
              num_attention_heads=32, num_key_value_heads=None, head_dim=None, hidden_act="silu",
              max_position_embeddings=2048, rms_norm_eps=1e-6, pad_token_id=None, bos_token_id=1, eos_token_id=2,
              tie_word_embeddings=False, attention_bias=False, mlp_bias=False)
_MISTRAL = dict(_LLAMA, intermediate_size=14336, num_key_value_heads=8, max_position_embeddings=131072,
                sliding_window=4096)


def unpermute_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row order for Llama GGUFs.

    llama.cpp rotates interleaved pairs (2i, 2i+1) where transformers rotates (i, i + head_dim/2),
    so its converter reorders each head's rows as [0, hd/2, 1, hd/2+1, ...]; this restores them.
    """
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_sanitize(name: str, array: np.ndarray, cfg) -> np.ndarray:
    part = name.rsplit(".", 1)[-1]
    if part in ("q", "q_bias"):
        return unpermute_rows(array, cfg.num_heads)
    if part in ("k", "k_bias"):
        return unpermute_rows(array, cfg.num_kv_heads)
    return array


LLAMA = Family(
    name="llama",
    variants={
        "LlamaForCausalLM": Variant(_LLAMA, PLAIN_BLOCK_NAMES, all_full),
        "MistralForCausalLM": Variant(_MISTRAL, PLAIN_BLOCK_NAMES, all_windowed),
    },
    gguf_arches={"llama": "LlamaForCausalLM"},
    gguf_sanitize=_gguf_sanitize,
)
