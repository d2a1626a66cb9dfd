"""Checkpoint sources, read lazily one tensor at a time.

A Hugging Face folder is read through an own validated safetensors parser: each tensor's bytes
are read on demand (bf16 as its raw 16 bits, so neither torch nor a numpy bfloat16 is needed),
which keeps the peak memory to about one tensor — a whole-file mapping would keep every page
it touched resident. Pickled checkpoints are refused, never loaded. GGUF files go through the
`gguf` package, tensor by tensor: dequantized, or their block bytes copied when kept.
"""
from __future__ import annotations

import functools
import hashlib
import json
import math
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import hub
from .families import GGUF_ROPE_TENSORS, family_for_gguf
from .problems import ConversionError

# The float dtypes converted (label, numpy type of the stored bits); bf16 is read as raw uint16.
FLOAT_DTYPES = {"F32": ("f32", "<f4"), "F16": ("f16", "<f2"), "BF16": ("bf16", "<u2")}
# Element sizes of every safetensors dtype, so any header can be validated (other types are reported, not read).
DTYPE_SIZES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
               "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
MAX_HEADER = 100 << 20
PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "consolidated.00.pth")


@dataclass(frozen=True)
class TensorRef:
    name: str
    shape: tuple[int, ...]
    dtype: str        # "f32" | "f16" | "bf16", or the source's own name of another type ("I8", "Q4_K", ...)
    nbytes: int       # bytes in the source


def open_source(path, *, revision: str | None = None, offline: bool = False,
                gguf_file: str | None = None) -> "SafetensorsFolder | GGUFFile":
    """The source at `path`: a Hugging Face model folder, a .gguf file, or — when no such local
    path exists — a Hub id ("org/name") resolved through the local Hugging Face cache (hub.py).

    >>> open_source("gemma-3-270m/").kind                   # doctest: +SKIP
    'safetensors'
    """
    local = Path(path)
    if not local.exists() and hub.is_repo_id(str(path)):
        resolved, info = hub.resolve(str(path), revision=revision, offline=offline, gguf_file=gguf_file)
        source = _open_local(resolved)
        source.hub = info
        return source
    for option, value in (("--revision", revision), ("--gguf-file", gguf_file)):
        if value is not None:
            raise ConversionError(f"{option} applies to Hub ids (org/name), not to the local {path}")
    return _open_local(local)


def _open_local(path: Path) -> "SafetensorsFolder | GGUFFile":
    if path.is_dir():
        return SafetensorsFolder(path)
    if path.is_file():
        with open(path, "rb") as f:
            if f.read(4) == b"GGUF":
                return GGUFFile(path)
        raise ConversionError(f"{path}: not a GGUF file (no GGUF magic) and not a model folder")
    raise ConversionError(f"{path}: no such file or folder")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def provenance(paths) -> list[dict]:
    """Name, size and sha256 of every source file, for the manifest."""
    return [{"name": p.name, "size": p.stat().st_size, "sha256": sha256_of(p)} for p in paths]


def read_json(path: Path) -> dict | None:
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ConversionError(f"{path}: not valid JSON ({error})") from None


# ---- Hugging Face folders ----

class SafetensorsFolder:
    """config.json plus model.safetensors, or shards listed by model.safetensors.index.json."""

    kind = "safetensors"
    hub = None  # {"repo_id", "revision", "commit"} when resolved from a Hub id

    def __init__(self, folder: Path):
        self.path = folder
        self.config = read_json(folder / "config.json")
        if self.config is None:
            raise ConversionError(f"{folder}: no config.json (a Hugging Face model folder needs one)")
        self.generation_config = read_json(folder / "generation_config.json")
        self.weight_files = self._weight_files()
        self.tensors: dict[str, TensorRef] = {}
        self._where: dict[str, tuple[Path, int, str]] = {}  # name → (file, absolute offset, safetensors dtype)
        for file in self.weight_files:
            self._index_file(file)
        self._check_index()

    def provenance_files(self) -> list[Path]:
        names = ["config.json", "generation_config.json", "model.safetensors.index.json"]
        extra = [self.path / n for n in names if (self.path / n).exists()]
        return extra + self.weight_files

    def read(self, name: str) -> tuple[np.ndarray, str]:
        """The tensor's values as stored: (array, "f32" | "f16" | "bf16"); bf16 comes as uint16 bits."""
        ref = self.tensors[name]
        file, offset, source_dtype = self._where[name]
        if source_dtype not in FLOAT_DTYPES:
            raise ConversionError(f"{file.name}: tensor {name!r} has dtype {source_dtype}; expected F32, F16 or BF16")
        label, bits = FLOAT_DTYPES[source_dtype]
        array = np.fromfile(file, dtype=bits, count=math.prod(ref.shape), offset=offset)
        if array.size != math.prod(ref.shape):
            raise ConversionError(f"{file.name}: tensor {name!r} is truncated (file shorter than its header says)")
        return array.reshape(ref.shape), label

    def _weight_files(self) -> list[Path]:
        index = read_json(self.path / "model.safetensors.index.json")
        if index is not None:
            weight_map = index.get("weight_map")
            if not isinstance(weight_map, dict):
                raise ConversionError(f"{self.path / 'model.safetensors.index.json'}: no weight_map object")
            self._index = weight_map
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if not (self.path / f).is_file()]
            if missing:
                raise ConversionError(f"{self.path}: shard(s) listed in model.safetensors.index.json are missing: "
                                      f"{', '.join(missing)}")
            return [self.path / f for f in files]
        self._index = None
        if (self.path / "model.safetensors").is_file():
            return [self.path / "model.safetensors"]
        found = sorted(self.path.glob("*.safetensors"))
        if len(found) == 1:
            return found
        pickles = [n for n in PICKLE_FILES if (self.path / n).exists()] + [p.name for p in self.path.glob("*.bin")]
        if pickles and not found:
            raise ConversionError(
                f"{self.path}: only pickled weights ({', '.join(sorted(set(pickles)))}); blob-pack never unpickles "
                f"(loading a pickle can run arbitrary code). Convert them to safetensors first, e.g. "
                f"AutoModelForCausalLM.from_pretrained(folder).save_pretrained(out, safe_serialization=True)")
        if found:
            raise ConversionError(f"{self.path}: several .safetensors files ({', '.join(p.name for p in found)}) "
                                  f"but no model.safetensors.index.json saying which hold the model")
        raise ConversionError(f"{self.path}: no model.safetensors, no model.safetensors.index.json")

    def _index_file(self, file: Path):
        size = file.stat().st_size
        with open(file, "rb") as f:
            head = f.read(8)
            if head.startswith(b"version "):
                raise ConversionError(f"{file}: a git-lfs pointer, not the weights (run `git lfs pull`)")
            if len(head) < 8:
                raise ConversionError(f"{file}: {size} bytes is too short for a safetensors file")
            header_len = int.from_bytes(head, "little")
            if header_len > min(MAX_HEADER, size - 8):
                raise ConversionError(f"{file}: header length {header_len} exceeds the file ({size} bytes) or "
                                      f"the {MAX_HEADER}-byte limit: truncated or not a safetensors file")
            try:
                header = json.loads(f.read(header_len))
            except (json.JSONDecodeError, UnicodeDecodeError) as error:
                raise ConversionError(f"{file}: safetensors header is not valid JSON ({error})") from None
        if not isinstance(header, dict):
            raise ConversionError(f"{file}: safetensors header is not a JSON object")
        data_start, spans = 8 + header_len, []
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            ref, begin = self._tensor_entry(file, name, entry, size - data_start)
            if name in self.tensors:
                raise ConversionError(f"{file}: tensor {name!r} also appears in {self._where[name][0].name}")
            self.tensors[name] = ref
            self._where[name] = (file, data_start + begin, entry["dtype"])
            spans.append((begin, begin + ref.nbytes, name))
        spans.sort()
        for (_, end, first), (begin, _, second) in zip(spans, spans[1:]):
            if begin < end:
                raise ConversionError(f"{file}: tensors {first!r} and {second!r} overlap")

    @staticmethod
    def _tensor_entry(file: Path, name: str, entry, data_size: int) -> tuple[TensorRef, int]:
        def bad(what):
            return ConversionError(f"{file}: tensor {name!r}: {what}")
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
            raise bad("header entry needs dtype, shape and data_offsets")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        itemsize = DTYPE_SIZES.get(dtype)
        if itemsize is None:
            raise bad(f"unknown dtype {dtype!r}")
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise bad(f"shape must be a list of non-negative integers, found {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise bad(f"data_offsets must be [begin, end], found {offsets!r}")
        begin, end = offsets
        expected = math.prod(shape) * itemsize
        if end - begin != expected:
            raise bad(f"data_offsets span {end - begin} bytes; shape {shape} of {dtype} needs {expected}")
        if not 0 <= begin <= end <= data_size:
            raise bad(f"data_offsets {offsets} lie outside the {data_size}-byte data section (truncated file?)")
        label = FLOAT_DTYPES[dtype][0] if dtype in FLOAT_DTYPES else dtype
        return TensorRef(name, tuple(shape), label, expected), begin

    def _check_index(self):
        if self._index is None:
            return
        absent = sorted(set(self._index) - set(self.tensors))
        if absent:
            raise ConversionError(f"{self.path}: model.safetensors.index.json lists tensor(s) its shards do not "
                                  f"hold: {', '.join(absent[:10])}{' …' if len(absent) > 10 else ''}")


# ---- GGUF files ----

# GGUF metadata value types → struct format of one scalar (8 = string, 9 = array, handled apart).
GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
GGUF_STRING, GGUF_ARRAY = 8, 9


class GGUFFile:
    """A GGUF file: its header parsed here (fast, validated), tensors read one at a time, dequantized
    (`read`) or as their ggml block bytes (`read_raw`, for a type the blob stores as it is).

    Dequantization uses the `gguf` package (optional extra `blobstore-runtime[gguf]`).
    """

    kind = "gguf"
    hub = None  # as SafetensorsFolder.hub

    def __init__(self, path: Path):
        try:
            import gguf
        except ImportError:
            raise ConversionError(f"{path}: reading GGUF needs the gguf package: "
                                  f"pip install 'blobstore-runtime[gguf]'") from None
        self._gguf = gguf
        self.path = path
        self.metadata, infos, data_start = _GGUFHeader(path).parse()
        self.tensors, self._where = {}, {}
        size = path.stat().st_size
        for name, shape, type_id, offset in infos:
            ref, qtype = self._tensor_ref(name, shape, type_id)
            if not data_start + offset + ref.nbytes <= size:
                raise ConversionError(f"{path}: tensor {name!r} lies beyond the end of the file (truncated?)")
            self.tensors[name] = ref
            self._where[name] = (data_start + offset, qtype)
        self.generation_config = None

    @functools.cached_property
    def config(self) -> dict:
        """An HF-style config.json built from the metadata (and the few values of the rope scaling
        tensors): from here on both sources look alike. Built on first use, so that an unsupported
        architecture is a ConfigError of the config check (reported with the tokenizer's
        problems), not of opening the file."""
        rope = {n: self.read(n)[0].astype(np.float32) for n in GGUF_ROPE_TENSORS if n in self.tensors}
        family = family_for_gguf(self.metadata)
        return family.hf_config_from_gguf(self.metadata, "output.weight" in self.tensors, rope)

    def provenance_files(self) -> list[Path]:
        return [self.path]

    def read(self, name: str) -> tuple[np.ndarray, str]:
        """The tensor in numpy order: f32 and f16 as stored, every other type dequantized to f32."""
        ref, (offset, qtype) = self.tensors[name], self._where[name]
        raw = np.fromfile(self.path, dtype=np.uint8, count=ref.nbytes, offset=offset)
        types = self._gguf.GGMLQuantizationType
        if qtype in (types.F32, types.F16):
            return raw.view("<f4" if qtype == types.F32 else "<f2").reshape(ref.shape), qtype.name.lower()
        rows = raw.reshape(math.prod(ref.shape[:-1]), -1)
        try:
            values = self._gguf.quants.dequantize(rows, qtype)
        except NotImplementedError:
            raise ConversionError(f"{self.path}: tensor {name!r} has GGML type {ref.dtype}, which the gguf "
                                  f"package cannot dequantize") from None
        return values.astype(np.float32, copy=False).reshape(ref.shape), "f32"

    def read_raw(self, name: str) -> np.ndarray:
        """The tensor's bytes as the GGUF stores them, one row (of whole ggml blocks) per row of the
        numpy-order shape: uint8 (rows, row bytes). Nothing is dequantized."""
        ref, (offset, _) = self.tensors[name], self._where[name]
        raw = np.fromfile(self.path, dtype=np.uint8, count=ref.nbytes, offset=offset)
        return raw.reshape(math.prod(ref.shape[:-1]), -1)

    def scalar_metadata(self) -> dict:
        """The metadata without the long vocabulary arrays, for the manifest."""
        return {k: v for k, v in self.metadata.items() if not (k.startswith("tokenizer.ggml.") and isinstance(v, list))}

    def _tensor_ref(self, name: str, dims: list[int], type_id: int):
        try:
            qtype = self._gguf.GGMLQuantizationType(type_id)
            block, block_bytes = self._gguf.GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise ConversionError(f"{self.path}: tensor {name!r} has unknown GGML type {type_id}") from None
        shape = tuple(reversed(dims))  # GGUF lists the fastest-varying dimension first
        if shape and shape[-1] % block:
            raise ConversionError(f"{self.path}: tensor {name!r}: row length {shape[-1]} is not a multiple of "
                                  f"the {qtype.name} block size {block}")
        return TensorRef(name, shape, qtype.name, math.prod(shape) // block * block_bytes), qtype


class _GGUFHeader:
    """Parses a GGUF header: metadata key/values and tensor infos (name, dims, type, offset)."""

    def __init__(self, path: Path):
        self.path = path
        self.pos = 0

    def parse(self):
        """(metadata, tensor infos, absolute offset of the tensor data); only the header's pages are touched."""
        with open(self.path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as self.data:
            return self._parse()

    def _parse(self):
        magic, version, tensor_count, kv_count = self._unpack("<4sIQQ")
        if magic != b"GGUF" or version not in (2, 3):
            raise ConversionError(f"{self.path}: GGUF version {version} is not supported (2 and 3 are)")
        limit = len(self.data)
        if tensor_count > limit or kv_count > limit:
            raise ConversionError(f"{self.path}: GGUF header claims {tensor_count} tensors and {kv_count} keys: "
                                  f"corrupt file")
        metadata = {}
        for _ in range(kv_count):
            key = self._string()
            metadata[key] = self._value(self._unpack("<I")[0], key)
        infos = []
        for _ in range(tensor_count):
            name = self._string()
            (ndims,) = self._unpack("<I")
            if ndims > 8:
                raise ConversionError(f"{self.path}: tensor {name!r} has {ndims} dimensions")
            dims = list(self._unpack(f"<{ndims}Q"))
            type_id, offset = self._unpack("<IQ")
            infos.append((name, dims, type_id, offset))
        alignment = metadata.get("general.alignment", 32)
        return metadata, infos, -(-self.pos // alignment) * alignment

    def _unpack(self, fmt: str):
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.data):
            raise ConversionError(f"{self.path}: GGUF header ends early at byte {self.pos} (truncated file?)")
        values = struct.unpack_from(fmt, self.data, self.pos)
        self.pos += size
        return values

    def _string(self) -> str:
        (length,) = self._unpack("<Q")
        raw = self._unpack(f"<{length}s")[0]
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ConversionError(f"{self.path}: GGUF string at byte {self.pos - length} is not UTF-8") from None

    def _value(self, type_id: int, key: str):
        if type_id == GGUF_STRING:
            return self._string()
        if type_id == GGUF_ARRAY:
            item_type, count = self._unpack("<IQ")
            if item_type in GGUF_SCALARS:  # numbers in one go
                fmt = GGUF_SCALARS[item_type]
                return list(self._unpack(f"<{count}{fmt[1]}"))
            return [self._value(item_type, key) for _ in range(count)]
        if type_id not in GGUF_SCALARS:
            raise ConversionError(f"{self.path}: GGUF key {key!r} has unknown value type {type_id}")
        return self._unpack(GGUF_SCALARS[type_id])[0]
