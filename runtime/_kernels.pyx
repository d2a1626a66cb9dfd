# cython: language_level=3, boundscheck=False, wraparound=True
"""Python bindings of the C kernels in csrc/ (see csrc/kernels.h for the exact semantics).

Every call validates its arguments (clear ValueError / TypeError / IndexError naming the
argument, the expected and the found shape or dtype), then runs the kernel with the GIL
released. Weights are bound once as a `Matrix` straight over the reader's read-only views;
nothing is copied.

The instruction-set path is chosen at import: the best one the CPU supports, or the one named
by the environment variable BLOBSTORE_ISA (scalar, avx2, avx512 or neon; `available_isas()` lists
the ones of this build).

One extension module (one thread pool, one ISA choice), written as one file per job:
_c_api.pxi (the C declarations), _cpu.pxi (features, ISA, threads), _matrix.pxi (Matrix and
matmul), _ops.pxi (attention and the small ops, one call each), _stack.pxi (DecoderStack),
_vision.pxi (VisionStack: the vision encoder and projector).
"""
import os
import threading

import numpy as np

from blobstore.format import INTERLEAVE8, INTERLEAVED, DType, layout, plane_shapes
from blobstore.runtime.cores import physical_cores

from libc.stdint cimport int8_t, int64_t, uint8_t, uint16_t, uint32_t, uintptr_t
from libc.stdlib cimport calloc, free


include "_c_api.pxi"
include "_cpu.pxi"
include "_matrix.pxi"
include "_ops.pxi"
include "_stack.pxi"
include "_vision.pxi"
