"""Prompts holding images (Gemma 3): each image marker becomes the token run transformers'
Gemma3Processor writes, `\\n\\n<start_of_image>` + one image soft token per projected image
vector + `<end_of_image>\\n\\n`, and the soft tokens' positions form an ImageSpan: its embeddings
replace their token embeddings, and attention among them is bidirectional (csrc/forward.c's
blob_span). With pan-and-scan an image becomes the processor's "Here is the original image …
and here are some crops to help you see better …" text with one run per picture.

The token ids come from the blob: the "projector" component's config holds
boi_token_index, eoi_token_index, image_token_index and mm_tokens_per_image, as the converter
copied them from the checkpoint's config.json.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

from ..errors import FormatError
from .images import preprocess

MARKER = "<start_of_image>"   # Gemma 3's image marker (its boi token): what a prompt writes per image
_PLACEHOLDER = "\x00image\x00"   # stands for one image's soft tokens while the text is tokenized


@dataclass(frozen=True)
class ImageSpan:
    """One picture's soft tokens in a sequence: positions begin .. end-1, their input vectors
    `embeds` (end - begin, hidden) float32, and `key`, a digest of those embeddings (the same
    picture gives the same ones, whatever form it came in), which tells the KV cache's prefix
    reuse one picture from another (runtime/kv_cache.py).

    >>> ImageSpan(5, 9, "ab12", np.zeros((4, 64), np.float32)).end
    9
    """

    begin: int
    end: int
    key: str
    embeds: np.ndarray | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class ImageTokens:
    """The ids of a vision blob's image markers and the soft tokens per picture."""

    boi: int
    eoi: int
    image: int
    per_image: int

    @classmethod
    def of(cls, reader) -> "ImageTokens":
        """From the blob's "projector" component config; FormatError naming the file when the blob
        has no vision component or the config lacks a field.

        >>> ImageTokens.of(reader).per_image     # doctest: +SKIP
        256
        """
        components = reader.metadata.get("components") or {}
        if "vision" not in components or "projector" not in components:
            raise FormatError(f"{reader.path}: this model has no vision component (no vision tower and projector "
                              f"in the file), so it cannot take images; convert a Gemma3ForConditionalGeneration "
                              f"checkpoint without --text-only")
        config = components["projector"].get("config") or {}
        names = ("boi_token_index", "eoi_token_index", "image_token_index", "mm_tokens_per_image")
        missing = [name for name in names if not isinstance(config.get(name), int)]
        if missing:
            raise FormatError(f"{reader.path}: components.projector.config lacks the integer field(s) "
                              f"{', '.join(missing)}; found {sorted(config)}")
        return cls(*(config[name] for name in names))


def picture_key(values: np.ndarray) -> str:
    """A digest of one picture's pixel values or features (float32)."""
    data = np.ascontiguousarray(values, np.float32)
    return hashlib.sha256(repr(data.shape).encode() + data.tobytes()).hexdigest()[:32]


def expand_text(tokenizer, text: str, tokens: ImageTokens, crops: Sequence[int], add_bos=None) -> tuple[list[int], list[int]]:
    """(ids, first position of each picture's soft tokens) of `text` whose image markers are
    replaced as Gemma3Processor replaces them: marker i by one run, or with crops[i] > 0
    pan-and-scan crops by the original's run and one per crop. The text between runs is
    tokenized piece by piece, as transformers' tokenizer splits at its special tokens.

    >>> ids, begins = expand_text(tokenizer, "Look: <start_of_image>", tokens, [0])   # doctest: +SKIP
    >>> ids[begins[0] - 1:begins[0] + 2], ids[begins[0] + 256]                      # doctest: +SKIP
    ([255999, 262144, 262144], 256000)
    """
    boi, eoi = tokenizer.id_to_token(tokens.boi), tokenizer.id_to_token(tokens.eoi)   # boi is the marker
    pieces = text.split(boi)
    if len(pieces) - 1 != len(crops):
        raise ValueError(f"the prompt has {len(pieces) - 1} image marker(s) ({boi}) but {len(crops)} image(s) "
                         f"were given; write one marker per image")
    run = f"\n\n{boi}{_PLACEHOLDER}{eoi}\n\n"
    expanded = pieces[0] + "".join(_replacement(run, count) + piece for count, piece in zip(crops, pieces[1:]))
    ids, begins = [], []
    for i, piece in enumerate(expanded.split(_PLACEHOLDER)):
        if i:
            begins.append(len(ids))
            ids += [tokens.image] * tokens.per_image
        ids += tokenizer.encode(piece, add_bos=add_bos if i == 0 else False) if piece or i == 0 else []
    return ids, begins


def _replacement(run: str, crops: int) -> str:
    if not crops:
        return run
    return f"Here is the original image {run} and here are some crops to help you see better " + " ".join([run] * crops)


def runs_in_ids(ids: Sequence[int], tokens: ImageTokens) -> list[int]:
    """First positions of the runs of image soft tokens in ids written as the processor writes
    them; ValueError when a run is not exactly `per_image` long.

    >>> runs_in_ids([2, 7, 9, 9, 9, 9, 8], ImageTokens(7, 8, 9, 4))
    [2]
    """
    begins, i = [], 0
    while i < len(ids):
        if ids[i] != tokens.image:
            i += 1
            continue
        end = i
        while end < len(ids) and ids[end] == tokens.image:
            end += 1
        if end - i != tokens.per_image:
            raise ValueError(f"the prompt's ids hold a run of {end - i} image tokens ({tokens.image}) at position {i}; "
                             f"each picture takes exactly {tokens.per_image}")
        begins.append(i)
        i = end
    return begins


def spans(begins: Sequence[int], features: Sequence[np.ndarray], tokens: ImageTokens, hidden: int) -> list[ImageSpan]:
    """One ImageSpan per picture: features[i] (per_image, hidden) at begins[i]."""
    if len(begins) != len(features):
        raise ValueError(f"the prompt holds {len(begins)} picture(s) (image token runs) but {len(features)} "
                         f"were given")
    made = []
    for i, (begin, embeds) in enumerate(zip(begins, features)):
        embeds = np.ascontiguousarray(embeds, np.float32)
        if embeds.shape != (tokens.per_image, hidden):
            raise ValueError(f"image features {i}: expected shape ({tokens.per_image}, {hidden}), found {embeds.shape}")
        made.append(ImageSpan(begin, begin + tokens.per_image, picture_key(embeds), embeds))
    return made


class ImageEncoder:
    """Pictures into projected image features with the blob's vision tower, which is built on
    first use (a text-only run never pays for it). The features of the last MEMO pictures are
    kept by key, so a conversation's next turn does not encode its pictures again.

    >>> encoder = ImageEncoder(reader)                                   # doctest: +SKIP
    >>> pixels = encoder.pictures(["cat.png"], pan_and_scan=None)        # doctest: +SKIP
    >>> features = encoder.features(np.concatenate(pixels))             # doctest: +SKIP
    """

    MEMO = 16

    def __init__(self, reader):
        self.reader = reader
        self._tower = None
        self._memo: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()   # one encode at a time; the memo is shared by sessions

    def tower(self):
        """The VisionTower of the blob's "vision" and "projector" components."""
        if self._tower is None:
            from .vision import VisionTower
            self._tower = VisionTower.from_reader(self.reader)
        return self._tower

    def pictures(self, images: Sequence, pan_and_scan) -> list[np.ndarray]:
        """Per image, its pixel values (1 + crops, 3, S, S), S the tower's image_size."""
        size = self.tower().image_size
        return [preprocess(image, size, pan_and_scan) for image in images]

    def features(self, pixels: np.ndarray) -> list[np.ndarray]:
        """The projected features (mm_tokens_per_image, text hidden) of each picture of `pixels`
        (n, 3, S, S); only pictures not in the memo (by pixel digest) are encoded, in one call."""
        keys = [picture_key(picture) for picture in pixels]
        with self._lock:
            missing = [i for i, key in enumerate(keys) if key not in self._memo]
            if missing:
                for i, encoded in zip(missing, self.tower().encode(np.ascontiguousarray(pixels[missing]))):
                    self._memo[keys[i]] = np.ascontiguousarray(encoded, np.float32)
            found = []
            for key in keys:
                self._memo.move_to_end(key)
                found.append(self._memo[key])
            while len(self._memo) > self.MEMO:
                self._memo.popitem(last=False)
        return found


def images_in_messages(messages: Sequence[Mapping]) -> tuple[list[dict], list]:
    """(messages with every image part as {"type": "image"}, the images in order of appearance).
    An image part is transformers' {"type": "image", "image" | "path" | "url": …} or OpenAI's
    {"type": "image_url", "image_url": {"url": …}}; a URL must be a base64 `data:` URL.

    >>> images_in_messages([{"role": "user", "content": [{"type": "image", "image": "cat.png"}]}])[1]
    ['cat.png']
    """
    shown, images = [], []
    for message in messages:
        content = message.get("content") if isinstance(message, Mapping) else None
        if not isinstance(content, list):
            shown.append(message)
            continue
        parts = []
        for part in content:
            image = _image_of_part(part)
            if image is None:
                parts.append(part)
            else:
                images.append(image)
                parts.append({"type": "image"})
        shown.append({**message, "content": parts})
    return shown, images


def _image_of_part(part):
    if not isinstance(part, Mapping) or part.get("type") not in ("image", "image_url"):
        return None
    if part["type"] == "image_url":
        url = part.get("image_url")
        return data_url_bytes(url.get("url") if isinstance(url, Mapping) else url)
    for key in ("image", "path"):
        if part.get(key) is not None:
            return part[key]
    if part.get("url") is not None:
        return data_url_bytes(part["url"])
    raise ValueError(f"an image content part needs 'image', 'path' or 'url', found keys {sorted(part)}")


def data_url_bytes(url) -> bytes:
    """The bytes of a base64 `data:` URL (`data:image/png;base64,…`); other URLs are refused,
    since the runtime fetches nothing from the network.

    >>> data_url_bytes("data:image/png;base64,iVBO")
    b'\\x89PN'
    """
    if not isinstance(url, str) or not url.startswith("data:"):
        shown = url[:40] + "…" if isinstance(url, str) and len(url) > 40 else url
        raise ValueError(f"an image URL must be a base64 data: URL (data:image/png;base64,...), found {shown!r}; "
                         f"the runtime does not download images")
    header, _, payload = url.partition(",")
    if not header.endswith(";base64"):
        raise ValueError(f"an image data: URL must be base64-encoded ({header[:40]!r}...;base64,...)")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as error:
        raise ValueError(f"an image data: URL holds invalid base64 ({error})") from None
