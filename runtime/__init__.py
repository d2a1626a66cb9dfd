"""blobstore.runtime: run blob files on the CPU.

>>> from blobstore.runtime import load
>>> model = load("gemma-3-270m.blob")                                  # doctest: +SKIP
>>> print(model.generate("The sky is", max_new_tokens=16).text)        # doctest: +SKIP
"""
from .api import Model, VocabularyMismatch, load
from .batch import BatchEngine, TokenStream
from .chat import ChatTemplateError
from .generate import GenerationChunk, GenerationResult, GenerationStats
from .kernels import cpu_info
from .kv_cache import ContextFull
from .sampling import SamplingParams
from .session import Session, SessionMismatch
from .tokenizer import IncrementalDecoder, Tokenizer

__all__ = ["load", "Model", "BatchEngine", "TokenStream", "GenerationResult", "GenerationChunk", "GenerationStats", "SamplingParams",
           "Session", "SessionMismatch", "Tokenizer", "IncrementalDecoder", "ChatTemplateError", "ContextFull", "cpu_info",
           "VocabularyMismatch"]
