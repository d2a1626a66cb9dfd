/* arm64 NEON path (the arm64 baseline); int8 products summed with widening multiplies. */
#if defined(__aarch64__) || defined(_M_ARM64)
#define NEON_TARGET
#define NEON_DOTPROD 0
#define NEON_OPS blob_ops_neon
#include "kernels_neon.inc"
#endif
