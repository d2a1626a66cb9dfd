/* The AVX2 path with int8 products summed by VPDPBUSD (AVX512-VNNI, 256-bit registers), chosen
 * within the "avx2" path when the CPU has AVX512-VNNI. */
#if defined(__x86_64__) || defined(_M_X64)
#define X86_TARGET "avx2,fma,f16c,avx512vnni,avx512vl"
#define X86_VNNI 1
#define X86_OPS blob_ops_avx2_vnni
#include "kernels_x86.inc"
#endif
