"""Structured output: response_format (json_object / json_schema), or a required tool call,
becomes an llguidance grammar whose token mask is applied to the logits before every sampled
token, through the runtime's public `logits_processor` hook. Once the grammar is complete only EOS is allowed, so the
generation stops there and the text parses and validates (unless max_tokens cut it short)."""
from __future__ import annotations

import functools
import re
from typing import Optional, Sequence

import llguidance
import numpy as np

from .protocol import APIError

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece byte fallback
_SPACE_PIECE = "\u2581"                             # SentencePiece's word-start marker
# compact JSON: no free whitespace, which a small model could otherwise emit without end
_JSON_OPTIONS = {"whitespace_flexible": False}


class Grammars:
    """llguidance over one model's tokenizer (built once: a 262k vocabulary takes ~0.5 s).

    >>> processor = Grammars(model).processor({"type": "json_object"})   # doctest: +SKIP
    >>> model.generate(prompt, logits_processor=processor).text          # doctest: +SKIP
    '{"name":"Moses"}'
    """

    def __init__(self, model):
        tokenizer = self._tokenizer = model.tokenizer
        if tokenizer.eos_id is None:
            raise ValueError("structured output needs an EOS token to end on, and this tokenizer has none")
        if "tokenizer.json" in model.reader:  # llguidance reads Hugging Face tokenizers natively
            source = model.reader.file_bytes("tokenizer.json").decode("utf-8")
        else:
            source = llguidance.TokenizerWrapper(_SentencePieceVocabulary(tokenizer))
        self.tokenizer = llguidance.LLTokenizer(source, n_vocab=tokenizer.vocab_size, eos_token=tokenizer.eos_id)

    def processor(self, response_format: Optional[dict]) -> Optional["GrammarMask"]:
        """A fresh logits processor for one request's response_format (None for plain text)."""
        if response_format is None:
            return None
        schema = response_format.get("schema", {"type": "object"})
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=_JSON_OPTIONS)
            matcher = llguidance.LLMatcher(self.tokenizer, grammar, log_level=0)
        except (ValueError, TypeError, RuntimeError) as error:
            raise APIError(400, f"response_format: cannot use this JSON schema: {error}",
                           param="response_format") from None
        if matcher.is_error():
            raise APIError(400, f"response_format: cannot use this JSON schema: {matcher.get_error()}",
                           param="response_format")
        return GrammarMask(matcher)

    def tool_processor(self, calls_format, tools, parallel: bool = True) -> "GrammarMask":
        """A fresh logits processor that makes the answer a call of `tools` (one or more with
        `parallel`), written in `calls_format` (runtime/tool_calls.py) with arguments valid for
        each tool's parameters."""
        marker = self._tokenizer.token_to_id(calls_format.marker)
        try:
            grammar = llguidance.LLMatcher.grammar_from_lark(calls_format.lark(tools, marker, parallel))
            matcher = llguidance.LLMatcher(self.tokenizer, grammar, log_level=0)
        except (ValueError, TypeError, RuntimeError) as error:
            raise APIError(400, f"tools: cannot build a grammar from these parameters: {error}", param="tools") from None
        if matcher.is_error():
            raise APIError(400, f"tools: cannot build a grammar from these parameters: {matcher.get_error()}",
                           param="tools")
        return GrammarMask(matcher)


class GrammarMask:
    """The logits processor of one generation: feeds the matcher the tokens sampled since the last
    call, then leaves only the tokens the grammar allows next."""

    def __init__(self, matcher):
        self.matcher = matcher
        self.consumed = 0

    def __call__(self, generated: Sequence[int], logits: np.ndarray) -> np.ndarray:
        for token in generated[self.consumed:]:
            if not self.matcher.consume_token(token):
                raise RuntimeError(f"the grammar refused token {token}: {self.matcher.get_error()}")
        self.consumed = len(generated)
        bits = np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8)
        allowed = np.unpackbits(bits, bitorder="little")[:logits.size].astype(bool)
        return np.where(allowed, logits, -np.inf)


class _SentencePieceVocabulary:
    """What llguidance.TokenizerWrapper reads: each token's bytes, the special tokens, and an
    encoder. Pieces spell a space as U+2581 and single bytes as <0xHH>; control pieces (BOS, EOS,
    turn markers) decode to no text and are special, as is <unk>."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self.eos_token_id, self.bos_token_id = tokenizer.eos_id, tokenizer.bos_id
        self.tokens, self.special_token_ids = [], []
        for token_id in range(tokenizer.vocab_size):
            piece = tokenizer.id_to_token(token_id)
            byte = _BYTE_PIECE.fullmatch(piece)
            if byte:
                self.tokens.append(bytes([int(byte.group(1), 16)]))
                continue
            text = piece.replace(_SPACE_PIECE, " ")
            # a lone U+2581 also decodes to "" (a decode drops its leading space), but it is a space
            if (tokenizer.decode([token_id]) == "" and text.strip(" ")) or piece == "<unk>":
                self.special_token_ids.append(token_id)
            self.tokens.append(text.encode("utf-8"))

    def __call__(self, text: str) -> list[int]:
        """Ids whose bytes spell exactly `text`: llguidance forces them when the grammar fixes the
        next bytes. SentencePiece's own encoding, unless it adds its word-start space to the text
        (add_dummy_prefix models): then the longest pieces that match, left to right."""
        ids = self._tokenizer.encode(text, add_bos=False)
        wanted = text.encode("utf-8")
        if b"".join(self.tokens[i] for i in ids) == wanted:
            return ids
        return self._longest_pieces(wanted)

    @functools.cached_property
    def _ids_by_bytes(self) -> dict[bytes, int]:
        special = set(self.special_token_ids)
        ids = {}
        for token_id, spelled in enumerate(self.tokens):
            if token_id not in special and spelled:
                ids.setdefault(spelled, token_id)
        return ids

    def _longest_pieces(self, wanted: bytes) -> list[int]:
        longest = max(map(len, self._ids_by_bytes))
        ids, start = [], 0
        while start < len(wanted):
            for end in range(min(len(wanted), start + longest), start, -1):
                if wanted[start:end] in self._ids_by_bytes:
                    ids.append(self._ids_by_bytes[wanted[start:end]])
                    start = end
                    break
            else:
                raise ValueError(f"the vocabulary cannot spell byte {wanted[start]:#04x} (no byte-fallback pieces)")
        return ids
