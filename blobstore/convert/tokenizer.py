"""Tokenizer bytes and settings for the blob file, checked against the model (reading no tensor).

A Hugging Face folder's tokenizer.model (and tokenizer.json) go in verbatim. A GGUF file only
carries its vocabulary as arrays. A SentencePiece one ("llama") is rebuilt here as a ModelProto,
undoing what llama.cpp's converter changed: it writes user-defined pieces with a space instead
of "▁", and retypes the special added tokens (including <unk>) as CONTROL, which sentencepiece
would then never match in text; everything else — pieces, scores, byte pieces — is as trained.
A byte-level BPE one ("gpt2") becomes a tokenizer.json (bpe.py).

Either way the tokenizer is then loaded with the library the runtime will use, and its ids are
checked against the model, so that a file that converts also loads and encodes.
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import sentencepiece
import tokenizers

from . import bpe
from .problems import ConversionError
from .token_types import BYTE, CONTROL, NORMAL, UNKNOWN, USER_DEFINED

FILES = {"sentencepiece": "tokenizer.model", "tokenizers": "tokenizer.json"}  # kind → blob name
SPACE_PIECE = "\u2581"  # sentencepiece's visible space, "▁"
BPE_MODEL = 2  # sentencepiece's TrainerSpec.model_type for BPE
GGUF_ROLES = ("unknown", "bos", "eos", "padding")  # tokenizer.ggml.<role>_token_id


@dataclass
class TokenizerData:
    files: dict     # blob name → bytes, stored verbatim
    settings: dict  # for metadata["tokenizer"]
    vocab_size: int  # ids the tokenizer can produce: 0 .. vocab_size - 1


# ---- Hugging Face folders ----

def from_folder(folder: Path, config) -> TokenizerData:
    """tokenizer.model / tokenizer.json bytes and the settings from tokenizer_config.json, checked.

    >>> from_folder(Path("gemma-3-270m"), config).vocab_size  # doctest: +SKIP
    262144
    """
    absent = missing_from_folder(folder)
    if absent:
        raise ConversionError(absent)
    files = {name: (folder / name).read_bytes() for name in FILES.values() if (folder / name).is_file()}
    tok_config = _json(folder / "tokenizer_config.json")
    template_file = folder / "chat_template.jinja"
    template = template_file.read_text(encoding="utf-8") if template_file.is_file() else _template(tok_config)
    kind = "sentencepiece" if "tokenizer.model" in files else "tokenizers"
    add_bos = tok_config.get("add_bos_token", _adds_bos(folder, files, tok_config))
    settings = _settings(kind, config, add_bos, bool(tok_config.get("add_eos_token", False)), template)
    return _checked(files, settings, config, str(folder / FILES[kind]))


def missing_from_folder(folder: Path) -> str | None:
    """Why `folder` holds no tokenizer file, or None when it holds one.

    >>> missing_from_folder(Path("weights-only"))  # doctest: +SKIP
    'weights-only: no tokenizer; expected tokenizer.model (SentencePiece) or tokenizer.json'
    """
    if any((folder / name).is_file() for name in FILES.values()):
        return None
    return f"{folder}: no tokenizer; expected tokenizer.model (SentencePiece) or tokenizer.json"


def missing_from_gguf(metadata: dict) -> str | None:
    """Why a GGUF file's metadata holds no vocabulary, or None when it holds one."""
    return None if metadata.get("tokenizer.ggml.tokens") else "GGUF tokenizer: no tokenizer.ggml.tokens"


def _json(path: Path) -> dict:
    if not path.is_file():
        return {}
    return _parse_json(path, path.read_bytes())


def _parse_json(path: Path, data: bytes) -> dict:
    try:
        return json.loads(data.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ConversionError(f"{path}: not valid JSON ({error})") from None


def _template(tok_config: dict) -> str | None:
    """The chat template: a string, or the "default" of a list of named templates."""
    template = tok_config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        return named.get("default") or next(iter(named.values()), None)
    return template


def _adds_bos(folder: Path, files: dict, tok_config: dict) -> bool:
    """Without add_bos_token, a tokenizer.json adds BOS when its post-processor names the BOS token."""
    if "tokenizer.json" not in files or "tokenizer.model" in files:
        return "tokenizer.model" in files  # sentencepiece tokenizers in transformers default to adding BOS
    bos = tok_config.get("bos_token")
    bos = bos.get("content") if isinstance(bos, dict) else bos
    post = _parse_json(folder / "tokenizer.json", files["tokenizer.json"]).get("post_processor") or {}
    return bool(bos) and bos in json.dumps(post)


def _settings(kind, config, add_bos, add_eos, template) -> dict:
    return {"kind": kind, "files": FILES[kind],
            "bos_id": config.bos_token_id, "eos_ids": list(config.eos_token_ids), "pad_id": config.pad_token_id,
            "add_bos": bool(add_bos), "add_eos": bool(add_eos), "chat_template": template}


# ---- the checks: what would make load() or the first encode() fail ----

def _checked(files: dict, settings: dict, config, where: str) -> TokenizerData:
    """The tokenizer, once the runtime's library has parsed it and its ids fit the model."""
    vocab_size, bos_id = _LOADERS[settings["kind"]](files[settings["files"]], settings, where)
    problems = []
    if vocab_size > config.vocab_size:
        problems.append(f"it has {vocab_size} ids but the model's embedding has only {config.vocab_size} rows "
                        f"(ids {config.vocab_size}..{vocab_size - 1} would index past it)")
    for role, token_id in [("BOS", settings["bos_id"])] + [("EOS", i) for i in settings["eos_ids"]]:
        if token_id is not None and not 0 <= token_id < vocab_size:
            problems.append(f"the {role} id {token_id} is outside its {vocab_size} ids")
    if settings["add_bos"] and bos_id is None:
        problems.append("it is set to add BOS to every prompt but has no BOS token")
    if problems:
        raise ConversionError(f"{where}: tokenizer problems:\n  " + "\n  ".join(problems))
    return TokenizerData(files, settings, vocab_size)


def _load_sentencepiece(data: bytes, settings: dict, where: str) -> tuple[int, int | None]:
    """(ids, the BOS id the runtime will add) of a SentencePiece model; its BOS is the model's own."""
    processor = sentencepiece.SentencePieceProcessor()
    try:
        processor.LoadFromSerializedProto(data)
    except (RuntimeError, OSError) as error:
        raise ConversionError(f"{where}: not a valid SentencePiece model ({error})") from None
    bos_id = processor.bos_id()
    return processor.GetPieceSize(), bos_id if bos_id >= 0 else None


def _load_json(data: bytes, settings: dict, where: str) -> tuple[int, int | None]:
    """(ids, the BOS id the runtime will add) of a tokenizer.json; its BOS is the settings' one."""
    try:
        tokenizer = tokenizers.Tokenizer.from_str(data.decode("utf-8"))
    except Exception as error:  # tokenizers reports every parse problem as a bare Exception
        raise ConversionError(f"{where}: the tokenizers library cannot load it ({error})") from None
    return max(tokenizer.get_vocab(with_added_tokens=True).values(), default=-1) + 1, settings["bos_id"]


_LOADERS = {"sentencepiece": _load_sentencepiece, "tokenizers": _load_json}


# ---- GGUF vocabularies ----

def from_gguf(metadata: dict, config) -> TokenizerData:
    """The tokenizer rebuilt from a GGUF vocabulary (tokenizer.ggml.*), checked.

    >>> from_gguf(GGUFFile("Llama-3.2-1B-Instruct-Q4_0.gguf").metadata, config).settings["kind"]  # doctest: +SKIP
    'tokenizers'
    """
    model = metadata.get("tokenizer.ggml.model")
    if model not in GGUF_VOCABULARIES:
        found = "no tokenizer.ggml.model" if model is None else f"tokenizer.ggml.model {model!r}"
        raise ConversionError(f"GGUF tokenizer: {found}; supported: "
                              + ", ".join(f"{name!r} ({kind})" for name, (kind, _) in GGUF_VOCABULARIES.items()))
    _gguf_ids(metadata)  # before a builder looks tokens up by these ids
    kind, build = GGUF_VOCABULARIES[model]
    data, add_bos = build(metadata)
    settings = _settings(kind, config, add_bos, metadata.get("tokenizer.ggml.add_eos_token", False),
                         metadata.get("tokenizer.chat_template"))
    return _checked({FILES[kind]: data}, settings, config, f"GGUF tokenizer ({FILES[kind]} rebuilt from it)")


def _gguf_ids(metadata: dict) -> dict:
    """The special token ids the file names (None when absent), each checked to be one of its tokens."""
    tokens = metadata.get("tokenizer.ggml.tokens")
    if not tokens:
        raise ConversionError(missing_from_gguf(metadata))
    ids = {role: metadata.get(f"tokenizer.ggml.{role}_token_id") for role in GGUF_ROLES}
    for role, token_id in ids.items():
        if token_id is not None and not 0 <= token_id < len(tokens):
            raise ConversionError(f"GGUF tokenizer: tokenizer.ggml.{role}_token_id is {token_id}, "
                                  f"outside its {len(tokens)} tokens")
    return ids


def _sentencepiece(metadata: dict) -> tuple[bytes, bool]:
    # llama.cpp adds BOS to a SentencePiece vocabulary unless the file says otherwise
    return sentencepiece_from_gguf(metadata), metadata.get("tokenizer.ggml.add_bos_token", True)


def _byte_level_bpe(metadata: dict) -> tuple[bytes, bool]:
    built = bpe.from_gguf(metadata)
    return built.json.encode("utf-8"), built.add_bos


# tokenizer.ggml.model → (the runtime's kind, the builder of its file's bytes and add_bos)
GGUF_VOCABULARIES = {"llama": ("sentencepiece", _sentencepiece), "gpt2": ("tokenizers", _byte_level_bpe)}


def sentencepiece_from_gguf(metadata: dict) -> bytes:
    """A serialized sentencepiece ModelProto (BPE) from tokenizer.ggml.* arrays.

    >>> proto = sentencepiece_from_gguf(GGUFFile("llama-2-7b.Q4_0.gguf").metadata)  # doctest: +SKIP
    >>> sentencepiece.SentencePieceProcessor(model_proto=proto).encode("Hello")  # doctest: +SKIP
    [15043]
    """
    ids = _gguf_ids(metadata)
    tokens = metadata["tokenizer.ggml.tokens"]
    scores = metadata.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
    types = metadata.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    if not len(tokens) == len(scores) == len(types):
        raise ConversionError(f"GGUF tokenizer: {len(tokens)} tokens but {len(scores)} scores and {len(types)} types")
    ids["unknown"] = _unknown_id(ids["unknown"], types)
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


def _unknown_id(given: int | None, types: list) -> int:
    """<unk>: the file's unknown_token_id, else the token typed UNKNOWN. llama.cpp's current
    converter writes only the type (it names no unknown id for a Llama-style vocabulary)."""
    if given is not None:
        return given
    typed = next((i for i, kind in enumerate(types) if kind == UNKNOWN), None)
    if typed is None:
        raise ConversionError("GGUF tokenizer: no <unk>: neither a tokenizer.ggml.unknown_token_id nor a token of "
                              "type UNKNOWN (2) in tokenizer.ggml.token_type; a SentencePiece vocabulary needs one")
    return typed


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
