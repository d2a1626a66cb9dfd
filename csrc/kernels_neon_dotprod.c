/* The NEON path with int8 products summed by SDOT (the dotprod extension), chosen within the
 * "neon" path when the CPU reports it (HWCAP_ASIMDDP). */
#if defined(__aarch64__) || defined(_M_ARM64)
#if defined(__clang__)
#define NEON_TARGET __attribute__((target("dotprod")))
#elif defined(__GNUC__)
#define NEON_TARGET __attribute__((target("arch=armv8.2-a+dotprod")))
#else
#define NEON_TARGET /* MSVC emits any intrinsic without a target attribute */
#endif
#define NEON_DOTPROD 1
#define NEON_OPS blob_ops_neon_dotprod
#include "kernels_neon.inc"
#endif
