/* x86-64 AVX2 + FMA + F16C path; int8 products summed with VPMADDUBSW + VPMADDWD. */
#if defined(__x86_64__) || defined(_M_X64)
#define X86_TARGET "avx2,fma,f16c"
#define X86_VNNI 0
#define X86_OPS blob_ops_avx2
#include "kernels_x86.inc"
#endif
