"""Text <-> token ids, from the tokenizer bytes packed into the blob file.

Two backends behind one interface: SentencePiece (Gemma, Llama 2, Mistral), loaded straight
from the serialized model proto, and the `tokenizers` package for checkpoints that ship only
tokenizer.json (Llama 3, Qwen, SmolLM). Streaming text goes through IncrementalDecoder, which
both backends share.
"""
from __future__ import annotations

import abc
import functools
import re
from typing import Callable, Iterable, Optional, Sequence, Union

import sentencepiece
import tokenizers

_REPLACEMENT_CHAR = "\ufffd"  # what a decoder yields for the bytes of an unfinished UTF-8 character


class Tokenizer(abc.ABC):
    """Common interface: `encode`, `decode`, `decoder`, `bos_id`, `eos_id`, `vocab_size`.
    Build one with `Tokenizer.from_sentencepiece(...)` or `Tokenizer.from_json(...)`."""

    bos_id: Optional[int]
    eos_id: Optional[int]
    vocab_size: int
    add_bos: bool  # whether encode() prepends BOS when not told otherwise

    @staticmethod
    def from_sentencepiece(model_proto: bytes, *, add_bos: Optional[bool] = None) -> "SentencePieceTokenizer":
        """A tokenizer from a serialized SentencePiece model (the bytes of tokenizer.model).

        >>> tok = Tokenizer.from_sentencepiece(reader.file_bytes("tokenizer.model"))  # doctest: +SKIP
        >>> tok.decode(tok.encode("Hello")) == "Hello"  # doctest: +SKIP
        True
        """
        return SentencePieceTokenizer(model_proto, add_bos=add_bos)

    @staticmethod
    def from_json(tokenizer_json: Union[str, bytes], *, bos_token: Union[str, int, None] = None,
                  eos_token: Union[str, int, None] = None, add_bos: Optional[bool] = None) -> "JsonTokenizer":
        """A tokenizer from the text of a Hugging Face tokenizer.json.
        `bos_token`/`eos_token` are the strings from tokenizer_config.json, or their ids.

        >>> tok = Tokenizer.from_json(reader.file_bytes("tokenizer.json"), eos_token="<|im_end|>")  # doctest: +SKIP
        """
        return JsonTokenizer(tokenizer_json, bos_token=bos_token, eos_token=eos_token, add_bos=add_bos)

    def encode(self, text: str, add_bos: Optional[bool] = None) -> list[int]:
        """Token ids of `text`. Special-token strings in the text (such as a chat template's
        "<bos>") become their ids. `add_bos=None` follows the model's own setting; BOS is not
        added to text that already starts with it (a rendered chat template), because a model
        reads a doubled BOS differently (Gemma 3 answers otherwise).

        >>> tok.encode("Hi there", add_bos=True)[0] == tok.bos_id  # doctest: +SKIP
        True
        >>> tok.encode("<bos>Hi there", add_bos=True) == tok.encode("Hi there", add_bos=True)  # doctest: +SKIP
        True
        """
        ids = self._encode(text)
        if self.add_bos if add_bos is None else add_bos:
            if self.bos_id is None:
                raise ValueError("add_bos=True but this tokenizer has no BOS token")
            if ids[:1] != [self.bos_id]:
                ids.insert(0, self.bos_id)
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """The text of `ids`; control tokens (BOS, EOS, padding) produce no text.

        >>> tok.decode(tok.encode("Hi there"))  # doctest: +SKIP
        'Hi there'
        """
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary (0..{self.vocab_size - 1})")
        return self._decode(ids)

    def decoder(self, context_ids: Sequence[int] = ()) -> "IncrementalDecoder":
        """An incremental decoder for generated tokens; `context_ids` (the prompt's ids, or its
        last few, ending on a whole character) only set how the first generated token is
        spelled, e.g. its leading space.

        >>> d = tok.decoder()  # doctest: +SKIP
        >>> "".join(d.add(i) for i in ids) + d.flush() == tok.decode(ids)  # doctest: +SKIP
        True
        """
        return IncrementalDecoder(self.decode, context_ids)

    @abc.abstractmethod
    def token_to_id(self, token: str) -> Optional[int]:
        """The id of a token string, or None when the vocabulary lacks it.

        >>> tok.token_to_id("<end_of_turn>")  # doctest: +SKIP
        106
        """

    @abc.abstractmethod
    def id_to_token(self, token_id: int) -> str:
        """The token string of an id (e.g. "<bos>"), as chat templates write it."""

    @abc.abstractmethod
    def _encode(self, text: str) -> list[int]:
        """Token ids of `text`, without BOS."""

    @abc.abstractmethod
    def _decode(self, ids: list[int]) -> str:
        """Text of in-range `ids`."""


class SentencePieceTokenizer(Tokenizer):
    """SentencePiece backend. SentencePiece itself never turns the text of a control piece
    ("<bos>", "</s>") into its id, so encode splits those out first, as transformers does."""

    def __init__(self, model_proto: bytes, *, add_bos: Optional[bool] = None):
        self._sp = sentencepiece.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(bytes(model_proto))
        except (RuntimeError, OSError) as error:
            raise ValueError(f"tokenizer.model: not a valid SentencePiece model ({error})") from None
        self.vocab_size = self._sp.GetPieceSize()
        self.bos_id = _optional_id(self._sp.bos_id())
        self.eos_id = _optional_id(self._sp.eos_id())
        self.add_bos = self.bos_id is not None if add_bos is None else add_bos

    @functools.cached_property
    def _control_ids(self) -> dict[str, int]:
        """Control piece → id. Built on first encode, not at load: scanning a 262k-piece
        vocabulary takes a tenth of a second, more than the rest of loading a model."""
        controls = [self._sp.IdToPiece(i) for i in range(self.vocab_size) if self._sp.IsControl(i)]
        return {piece: self._sp.PieceToId(piece) for piece in controls if piece}

    @functools.cached_property
    def _control_pattern(self) -> Optional[re.Pattern]:
        longest_first = sorted(self._control_ids, key=len, reverse=True)
        return re.compile("|".join(map(re.escape, longest_first))) if longest_first else None

    def token_to_id(self, token: str) -> Optional[int]:
        token_id = self._sp.PieceToId(token)
        return token_id if self._sp.IdToPiece(token_id) == token else None

    def id_to_token(self, token_id: int) -> str:
        return self._sp.IdToPiece(token_id)

    def _encode(self, text: str) -> list[int]:
        if self._control_pattern is None:
            return self._sp.EncodeAsIds(text)
        ids, start = [], 0
        for match in self._control_pattern.finditer(text):
            ids += self._sp.EncodeAsIds(text[start:match.start()]) + [self._control_ids[match.group()]]
            start = match.end()
        return ids + self._sp.EncodeAsIds(text[start:])

    def _decode(self, ids: list[int]) -> str:
        return self._sp.DecodeIds(ids)


class JsonTokenizer(Tokenizer):
    """`tokenizers` backend for tokenizer.json. BOS is added here rather than by the file's
    post-processor so that `add_bos` means the same for both backends; by default it is added
    exactly when the post-processor would have added it."""

    def __init__(self, tokenizer_json: Union[str, bytes], *, bos_token: Union[str, int, None] = None,
                 eos_token: Union[str, int, None] = None, add_bos: Optional[bool] = None):
        text = tokenizer_json.decode("utf-8") if isinstance(tokenizer_json, bytes) else tokenizer_json
        try:
            self._tok = tokenizers.Tokenizer.from_str(text)
        except Exception as error:  # tokenizers reports every parse problem as a bare Exception
            raise ValueError(f"tokenizer.json: cannot be loaded ({error})") from None
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.bos_id = self._named_id("bos_token", bos_token)
        self.eos_id = self._named_id("eos_token", eos_token)
        self.add_bos = self._post_processor_adds_bos() if add_bos is None else add_bos

    def token_to_id(self, token: str) -> Optional[int]:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str:
        return self._tok.id_to_token(token_id)

    def _named_id(self, field: str, token: Union[str, int, None]) -> Optional[int]:
        if token is None:
            return None
        if isinstance(token, int):
            if not 0 <= token < self.vocab_size:
                raise ValueError(f"tokenizer.json: {field} id {token} is outside the vocabulary")
            return token
        token_id = self.token_to_id(token)
        if token_id is None:
            raise ValueError(f"tokenizer.json: {field} {token!r} is not in the vocabulary")
        return token_id

    def _post_processor_adds_bos(self) -> bool:
        ids = self._tok.encode("a", add_special_tokens=True).ids
        return self.bos_id is not None and ids[:1] == [self.bos_id]

    def _encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)


class IncrementalDecoder:
    """Turns generated token ids into text pieces as they arrive.

    Each step decodes a short window: the ids of the previous piece plus the new ones, and
    emits the text beyond what that previous piece decodes to. Decoding with context keeps
    leading spaces right; holding back text that ends in U+FFFD keeps a character whose
    UTF-8 bytes span several byte-fallback tokens from being emitted half-way. The pieces
    concatenated equal `decode(context_ids + ids)` minus the text of `context_ids`.

    >>> d = IncrementalDecoder(tok.decode)  # doctest: +SKIP
    >>> [d.add(tok.token_to_id(f"<0x{b:02X}>")) for b in "€".encode()]  # doctest: +SKIP
    ['', '', '€']
    """

    def __init__(self, decode: Callable[[list[int]], str], context_ids: Sequence[int] = ()):
        self._decode = decode
        self._ids = [int(i) for i in context_ids]
        self._window_start = 0             # ids before this no longer affect new text
        self._emitted_end = len(self._ids)  # ids before this are already emitted (or context)

    def add(self, token_id: int) -> str:
        """Feed one token id; returns the newly completed text (possibly "")."""
        self._ids.append(int(token_id))
        text = self._pending_text()
        if text.endswith(_REPLACEMENT_CHAR):
            return ""
        self._mark_emitted()
        return text

    def flush(self) -> str:
        """End of stream: returns whatever is held back, unfinished characters included."""
        text = self._pending_text()
        self._mark_emitted()
        return text

    def _pending_text(self) -> str:
        emitted = self._decode(self._ids[self._window_start:self._emitted_end])
        return self._decode(self._ids[self._window_start:])[len(emitted):]

    def _mark_emitted(self) -> None:
        # The next window may open at the ids just emitted only if they make text on their own:
        # a decode drops the leading space of its first text, so a window opening with
        # text-less ids (padding, a lone "▁") would lose a space the full decode keeps.
        if self._decode(self._ids[self._emitted_end:]):
            self._window_start = self._emitted_end
        self._emitted_end = len(self._ids)


def _optional_id(token_id: int) -> Optional[int]:
    return token_id if token_id >= 0 else None
