"""The compute kernels: the C kernels of csrc/ as wrapped by _kernels.pyx, under one name.

>>> from blobstore.runtime import kernels
>>> kernels.cpu_info()["isa"]            # doctest: +SKIP
'avx2'
"""
from ._kernels import (  # noqa: F401 - the public surface of the kernels
    DECODE_TILES_MAX_TOKENS, DecoderStack, Matrix, VisionStack, add, attention, available_isas, cpu_features,
    cpu_info, embed, gated_act, get_isa, get_threads, layer_norm, matmul, physical_cores, read_bandwidth_probe,
    rms_norm, rope, set_isa, set_threads, softcap, softmax, trace_work_split,
)
