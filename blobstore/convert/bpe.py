"""Byte-level BPE vocabularies from GGUF files, rebuilt as a Hugging Face tokenizer.json.

llama.cpp writes a byte-level BPE tokenizer (`tokenizer.ggml.model = "gpt2"`: Llama 3.x, Qwen 2/2.5/3,
SmolLM, Mistral-Nemo) as arrays — tokens spelled in GPT-2's byte alphabet, merges, token types —
plus a name, `tokenizer.ggml.pre`, for the way text is cut into words before the merges run.
That name is all the file says about the splitting, so each supported name is one row of
PRE_TOKENIZERS below; a name without a row is refused rather than guessed.
"""
from __future__ import annotations

from dataclasses import dataclass

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from .problems import ConversionError
from .token_types import CONTROL, NORMAL, USER_DEFINED

# Word regexes, as the models' own tokenizer.json files write them (tokenizers' regex engine
# understands the Unicode classes and the case-insensitive group).
_GPT2_WORDS = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_WORDS = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_WORDS = _LLAMA3_WORDS.replace(r"\p{N}{1,3}", r"\p{N}")  # digits one at a time
_UPPER, _LOWER = r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]", r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]"
_TEKKEN_WORDS = (rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*"
                 r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_CONTRACTION = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
_GPT4O_WORDS = (rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+{_CONTRACTION}"
                rf"|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*{_CONTRACTION}"
                r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")


@dataclass(frozen=True)
class Splitting:
    """What one tokenizer.ggml.pre value means."""
    regexes: tuple  # applied in turn, each match (and each stretch between matches) a word of its own
    ignore_merges: bool  # a word that is itself a token stays whole (tiktoken-made vocabularies)
    add_bos: bool  # llama.cpp's default when the file has no tokenizer.ggml.add_bos_token


# The regexes are those of transformers' GGUF tokenizer loader where it has one for the name.
# It has none for "smollm", "gpt-2" and "default" (it then splits as GPT-2), nor any
# ignore_merges; those follow llama.cpp's llama-vocab.cpp, as do the add_bos defaults. For
# "smollm" that means digits one at a time, as SmolLM's own tokenizer.json does; for "default",
# llama.cpp's four-step fallback splitting.
_LLAMA3 = Splitting((_LLAMA3_WORDS,), ignore_merges=True, add_bos=True)
_QWEN2 = Splitting((_QWEN2_WORDS,), ignore_merges=False, add_bos=False)
_GPT4O = Splitting((_GPT4O_WORDS,), ignore_merges=False, add_bos=False)
PRE_TOKENIZERS = {
    "llama-bpe": _LLAMA3, "llama3": _LLAMA3, "llama-v3": _LLAMA3, "falcon3": _LLAMA3, "pixtral": _LLAMA3,
    "qwen2": _QWEN2, "deepseek-r1-qwen": _QWEN2,
    "gpt-4o": _GPT4O, "llama4": _GPT4O,
    "tekken": Splitting((_TEKKEN_WORDS,), ignore_merges=True, add_bos=True),
    "smollm": Splitting((r"\p{N}", _GPT2_WORDS), ignore_merges=False, add_bos=False),
    "gpt-2": Splitting((_GPT2_WORDS,), ignore_merges=False, add_bos=False),
    "default": Splitting((r"[\p{P}\$\+<=>\^~\|]+", _GPT2_WORDS, r"\p{N}+", r"[0-9][0-9][0-9]"),
                         ignore_merges=False, add_bos=False),
}


@dataclass(frozen=True)
class ByteLevelBPE:
    json: str  # the tokenizer.json text
    add_bos: bool


def from_gguf(metadata: dict) -> ByteLevelBPE:
    """The tokenizer.json of a GGUF byte-level BPE vocabulary, and whether it adds BOS.

    >>> bpe = from_gguf(GGUFFile("qwen2.5-0.5b-q4_0.gguf").metadata)  # doctest: +SKIP
    >>> Tokenizer.from_str(bpe.json).encode("Hello world").tokens  # doctest: +SKIP
    ['Hello', 'Ġworld']
    """
    splitting = _splitting(metadata.get("tokenizer.ggml.pre"))
    tokens = metadata["tokenizer.ggml.tokens"]
    types = metadata.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    if len(types) != len(tokens):
        raise ConversionError(f"GGUF tokenizer: {len(tokens)} tokens but {len(types)} token types")
    add_bos = bool(metadata.get("tokenizer.ggml.add_bos_token", splitting.add_bos))
    add_eos = bool(metadata.get("tokenizer.ggml.add_eos_token", False))
    tokenizer = Tokenizer(_model(tokens, types, _merges(metadata), splitting.ignore_merges))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(regex), behavior="isolated") for regex in splitting.regexes]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([_added(token, special=True) for token, kind in zip(tokens, types) if kind == CONTROL])
    tokenizer.add_tokens([_added(token, special=False) for token, kind in zip(tokens, types) if kind == USER_DEFINED])
    post = _post_processor(tokens, metadata.get("tokenizer.ggml.bos_token_id") if add_bos else None,
                           metadata.get("tokenizer.ggml.eos_token_id") if add_eos else None)
    if post is not None:
        tokenizer.post_processor = post
    return ByteLevelBPE(tokenizer.to_str(), add_bos)


def _splitting(pre) -> Splitting:
    known = ", ".join(sorted(PRE_TOKENIZERS))
    if pre is None:
        # llama.cpp falls back to "default" here and warns of degraded output: refuse instead.
        raise ConversionError(f"GGUF tokenizer: a byte-level BPE vocabulary without tokenizer.ggml.pre, so how it "
                              f"splits text is unknown (the file predates that key; convert the model again with "
                              f"a current llama.cpp). Known values: {known}")
    if pre not in PRE_TOKENIZERS:
        raise ConversionError(f"GGUF tokenizer: tokenizer.ggml.pre {pre!r} is not supported; known: {known}")
    return PRE_TOKENIZERS[pre]


def _model(tokens: list, types: list, merges: list, ignore_merges: bool) -> models.BPE:
    """The BPE model over every id. Added tokens (CONTROL, USER_DEFINED) keep the text llama.cpp
    wrote, so that all of them are matched whole in text, as llama.cpp does (transformers' GGUF
    loader spells those with characters outside the byte alphabet in it, and then cuts them into
    pieces); any other token outside the alphabet is spelled in it, as transformers does."""
    alphabet = _byte_alphabet()
    spelled = set(alphabet.values())
    vocab = {}
    for i, (token, kind) in enumerate(zip(tokens, types)):
        if kind not in (CONTROL, USER_DEFINED) and not set(token) <= spelled:
            token = "".join(alphabet[byte] for byte in token.encode("utf-8"))
        if token in vocab:
            raise ConversionError(f"GGUF tokenizer: tokens {vocab[token]} and {i} are both {token!r}")
        vocab[token] = i
    try:
        return models.BPE(vocab, merges, ignore_merges=ignore_merges, fuse_unk=False, byte_fallback=False)
    except Exception as error:  # tokenizers reports a merge of unknown tokens as a bare Exception
        raise ConversionError(f"GGUF tokenizer: the merges do not fit the tokens ({error})") from None


def _merges(metadata: dict) -> list:
    merges = metadata.get("tokenizer.ggml.merges")
    if not merges:
        raise ConversionError("GGUF tokenizer: a byte-level BPE vocabulary without tokenizer.ggml.merges")
    pairs = [tuple(merge.split(" ")) for merge in merges]
    bad = next((i for i, pair in enumerate(pairs) if len(pair) != 2), None)
    if bad is not None:
        raise ConversionError(f"GGUF tokenizer: merge {bad} is {merges[bad]!r}; expected two tokens and one space")
    return pairs


def _added(token: str, special: bool) -> AddedToken:
    # llama.cpp matches every added token as written: no normalizing, no stripping around it.
    return AddedToken(token, special=special, normalized=False, lstrip=False, rstrip=False, single_word=False)


def _post_processor(tokens: list, bos_id, eos_id):
    """BOS / EOS added around the text as the file asks, as Llama 3's tokenizer.json does."""
    ends = [i for i in (bos_id, eos_id) if i is not None]
    if not ends:
        return None
    head = [tokens[bos_id]] if bos_id is not None else []
    tail = [tokens[eos_id]] if eos_id is not None else []
    return processors.TemplateProcessing(
        single=head + ["$A"] + tail, pair=head + ["$A"] + tail + [f"{t}:1" for t in head] + ["$B:1"]
        + [f"{t}:1" for t in tail], special_tokens=[(tokens[i], i) for i in dict.fromkeys(ends)])


def _byte_alphabet() -> dict:
    """GPT-2's byte → character map: printable Latin-1 bytes stand for themselves, the rest
    (controls, space, soft hyphen) for the characters from U+0100 on, in byte order."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    moved = [byte for byte in range(256) if byte not in kept]
    return {**{byte: chr(byte) for byte in kept}, **{byte: chr(256 + n) for n, byte in enumerate(moved)}}
