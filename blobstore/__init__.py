"""blobstore: an aligned, memory-mapped, validated weight file for running LLMs on a CPU.

>>> import blobstore
>>> r = blobstore.open("model.blob")        # doctest: +SKIP
"""
from .config import ConfigError, ModelConfig
from .errors import (
    ChecksumMismatch, CorruptHeader, CorruptManifest, FormatError, InvalidTensor, InvalidTie, MissingTensor,
    NotABlobFile, TruncatedFile, UnsupportedFeature, UnsupportedVersion,
)
from .format import DType
from .reader import BlobReader, QuantizedTensor, TensorInfo, open
from .writer import BlobWriter

__version__ = "0.1.0"

__all__ = [
    "open", "BlobReader", "BlobWriter", "DType", "TensorInfo", "QuantizedTensor", "ModelConfig", "ConfigError",
    "FormatError", "NotABlobFile", "TruncatedFile", "CorruptHeader", "ChecksumMismatch", "UnsupportedVersion",
    "UnsupportedFeature", "CorruptManifest", "InvalidTensor", "InvalidTie", "MissingTensor",
]
