"""Tokenizer bytes and settings for the blob file.

A Hugging Face folder's tokenizer.model (and tokenizer.json) go in verbatim. A GGUF file only
carries its vocabulary as arrays, so a sentencepiece ModelProto is rebuilt from them, undoing
what llama.cpp's converter changed: it writes user-defined pieces with a space instead of "▁",
and retypes the special added tokens (including <unk>) as CONTROL, which sentencepiece would
then never match in text. Everything else — pieces, scores, byte pieces — is as trained.
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

from .problems import ConversionError

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json")
SPACE_PIECE = "\u2581"  # sentencepiece's visible space, "▁"

# sentencepiece piece types; GGUF's tokenizer.ggml.token_type uses the same numbers.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
BPE_MODEL = 2


@dataclass
class TokenizerData:
    files: dict = field(default_factory=dict)    # blob name → bytes, stored verbatim
    settings: dict = field(default_factory=dict)  # for metadata["tokenizer"]


# ---- Hugging Face folders ----

def from_folder(folder: Path, config) -> TokenizerData:
    """tokenizer.model / tokenizer.json bytes and the settings from tokenizer_config.json."""
    files = {name: (folder / name).read_bytes() for name in TOKENIZER_FILES if (folder / name).is_file()}
    tok_config = _json(folder / "tokenizer_config.json")
    template_file = folder / "chat_template.jinja"
    template = template_file.read_text(encoding="utf-8") if template_file.is_file() else _template(tok_config)
    kind = "sentencepiece" if "tokenizer.model" in files else "tokenizers" if files else None
    return TokenizerData(files, _settings(kind, config, tok_config.get("add_bos_token", _adds_bos(files, tok_config)),
                                          bool(tok_config.get("add_eos_token", False)), template))


def _json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ConversionError(f"{path}: not valid JSON ({error})") from None


def _template(tok_config: dict) -> str | None:
    """The chat template: a string, or the "default" of a list of named templates."""
    template = tok_config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        return named.get("default") or next(iter(named.values()), None)
    return template


def _adds_bos(files: dict, tok_config: dict) -> bool:
    """Without add_bos_token, a tokenizer.json adds BOS when its post-processor names the BOS token."""
    if "tokenizer.json" not in files or "tokenizer.model" in files:
        return "tokenizer.model" in files  # sentencepiece tokenizers in transformers default to adding BOS
    bos = tok_config.get("bos_token")
    bos = bos.get("content") if isinstance(bos, dict) else bos
    post = json.loads(files["tokenizer.json"]).get("post_processor") or {}
    return bool(bos) and bos in json.dumps(post)


def _settings(kind, config, add_bos, add_eos, template) -> dict:
    return {"kind": kind, "files": {"sentencepiece": "tokenizer.model", "tokenizers": "tokenizer.json"}.get(kind),
            "bos_id": config.bos_token_id, "eos_ids": list(config.eos_token_ids), "pad_id": config.pad_token_id,
            "add_bos": bool(add_bos), "add_eos": bool(add_eos), "chat_template": template}


# ---- GGUF vocabularies ----

def from_gguf(metadata: dict, config) -> TokenizerData:
    """A sentencepiece model rebuilt from a GGUF vocabulary (llama.cpp's "llama" tokenizer model)."""
    model = metadata.get("tokenizer.ggml.model")
    add_bos = metadata.get("tokenizer.ggml.add_bos_token", True)
    add_eos = metadata.get("tokenizer.ggml.add_eos_token", False)
    template = metadata.get("tokenizer.chat_template")
    if model != "llama":
        # BPE ("gpt2") vocabularies have no sentencepiece form; the settings are still useful.
        return TokenizerData({}, _settings(None, config, add_bos, add_eos, template))
    proto = sentencepiece_from_gguf(metadata)
    return TokenizerData({"tokenizer.model": proto}, _settings("sentencepiece", config, add_bos, add_eos, template))


def sentencepiece_from_gguf(metadata: dict) -> bytes:
    """A serialized sentencepiece ModelProto (BPE) from tokenizer.ggml.* arrays."""
    tokens = metadata["tokenizer.ggml.tokens"]
    scores = metadata.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
    types = metadata.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    if not len(tokens) == len(scores) == len(types):
        raise ConversionError(f"GGUF tokenizer: {len(tokens)} tokens but {len(scores)} scores and {len(types)} types")
    ids = {role: metadata.get(f"tokenizer.ggml.{role}_token_id") for role in ("unknown", "bos", "eos", "padding")}
    if ids["unknown"] is None:
        raise ConversionError("GGUF tokenizer: no tokenizer.ggml.unknown_token_id (sentencepiece needs an <unk>)")
    pieces = [_restore(i, piece, kind, ids) for i, (piece, kind) in enumerate(zip(tokens, types))]
    seen = {}
    for i, (piece, _) in enumerate(pieces):
        if piece in seen:
            raise ConversionError(f"GGUF tokenizer: tokens {seen[piece]} and {i} are both {piece!r}")
        seen[piece] = i
    body = b"".join(_message(1, _piece(piece, score, kind)) for (piece, kind), score in zip(pieces, scores))
    return body + _message(2, _trainer_spec(len(tokens), ids, tokens, BYTE in types)) + _message(3, _normalizer_spec(
        add_dummy_prefix=metadata.get("tokenizer.ggml.add_space_prefix", True),
        remove_extra_whitespaces=metadata.get("tokenizer.ggml.remove_extra_whitespaces", False)))


def _restore(i: int, piece: str, kind: int, ids: dict) -> tuple[str, int]:
    """The piece and type as sentencepiece had them before llama.cpp's converter."""
    if i == ids["unknown"]:
        return piece, UNKNOWN
    if kind == CONTROL and i not in (ids["bos"], ids["eos"], ids["padding"]):
        kind = USER_DEFINED  # a special added token: sentencepiece matches these in text, as transformers does
    if kind == USER_DEFINED:
        piece = piece.replace(" ", SPACE_PIECE)
    return piece, kind


def _trainer_spec(vocab_size: int, ids: dict, tokens, byte_fallback: bool) -> bytes:
    spec = _varint_field(3, BPE_MODEL) + _varint_field(4, vocab_size) + _varint_field(35, int(byte_fallback))
    for number, role in ((40, "unknown"), (41, "bos"), (42, "eos"), (43, "padding")):
        spec += _varint_field(number, -1 if ids[role] is None else ids[role])
    for number, role in ((45, "unknown"), (46, "bos"), (47, "eos"), (48, "padding")):
        if ids[role] is not None:
            spec += _bytes_field(number, tokens[ids[role]].encode("utf-8"))
    return spec


def _normalizer_spec(add_dummy_prefix: bool, remove_extra_whitespaces: bool) -> bytes:
    return (_bytes_field(1, b"identity") + _varint_field(3, int(add_dummy_prefix))
            + _varint_field(4, int(remove_extra_whitespaces)) + _varint_field(5, 1))


def _piece(piece: str, score: float, kind: int) -> bytes:
    return _bytes_field(1, piece.encode("utf-8")) + _tag(2, 5) + struct.pack("<f", score) + _varint_field(3, kind)


# ---- the few protobuf wire-format pieces a ModelProto needs ----

def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative int32 values are sent as ten-byte two's complement
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _tag(number: int, wire_type: int) -> bytes:
    return _varint(number << 3 | wire_type)


def _varint_field(number: int, value: int) -> bytes:
    return _tag(number, 0) + _varint(value)


def _bytes_field(number: int, data: bytes) -> bytes:
    return _tag(number, 2) + _varint(len(data)) + data


_message = _bytes_field  # an embedded message is a length-delimited field
