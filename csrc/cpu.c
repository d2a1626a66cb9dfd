/* CPU feature detection: CPUID + XGETBV on x86-64 (gcc, clang, MSVC), HWCAP on Linux arm64. */
#include "cpu.h"

#if defined(__x86_64__) || defined(_M_X64)
#define BLOB_X86 1
#if defined(_MSC_VER)
#include <intrin.h>
static void cpuid(int leaf, int sub, unsigned r[4]) {
    int regs[4];
    __cpuidex(regs, leaf, sub);
    for (int i = 0; i < 4; i++) r[i] = (unsigned)regs[i];
}
static uint64_t xgetbv0(void) { return _xgetbv(0); }
#else
#include <cpuid.h>
static void cpuid(int leaf, int sub, unsigned r[4]) {
    __cpuid_count(leaf, sub, r[0], r[1], r[2], r[3]);
}
static uint64_t xgetbv0(void) {
    unsigned lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    return ((uint64_t)hi << 32) | lo;
}
#endif
#elif defined(__aarch64__) || defined(_M_ARM64)
#define BLOB_ARM64 1
#if defined(__linux__)
#include <sys/auxv.h>
#ifndef HWCAP_CRC32
#define HWCAP_CRC32 (1 << 7)
#endif
#ifndef HWCAP_ASIMDDP
#define HWCAP_ASIMDDP (1 << 20)
#endif
#endif
#endif

static uint32_t detect(void) {
    uint32_t f = 0;
#if defined(BLOB_X86)
    unsigned r[4];
    cpuid(0, 0, r);
    unsigned max_leaf = r[0];
    cpuid(1, 0, r);
    if (r[2] & (1u << 20)) f |= BLOB_CPU_SSE42;
    int osxsave = (r[2] >> 27) & 1;
    uint64_t xcr0 = osxsave ? xgetbv0() : 0;
    int ymm_ok = (xcr0 & 0x6) == 0x6;            /* XMM and YMM state saved by the OS */
    int zmm_ok = ymm_ok && (xcr0 & 0xe0) == 0xe0; /* opmask and ZMM state too */
    if (ymm_ok) {
        if (r[2] & (1u << 12)) f |= BLOB_CPU_FMA;
        if (r[2] & (1u << 29)) f |= BLOB_CPU_F16C;
    }
    if (max_leaf >= 7) {
        cpuid(7, 0, r);
        if (ymm_ok && (r[1] & (1u << 5))) f |= BLOB_CPU_AVX2;
        if (zmm_ok && (r[1] & (1u << 16))) f |= BLOB_CPU_AVX512F;
        if (zmm_ok && (r[1] & (1u << 30))) f |= BLOB_CPU_AVX512BW;
        if (zmm_ok && (r[2] & (1u << 11))) f |= BLOB_CPU_AVX512VNNI;
        if (zmm_ok && (r[1] & (1u << 31))) f |= BLOB_CPU_AVX512VL;
        if (zmm_ok && (r[1] & (1u << 17))) f |= BLOB_CPU_AVX512DQ;
        cpuid(7, 1, r);
        if (ymm_ok && (r[0] & (1u << 4))) f |= BLOB_CPU_AVXVNNI;
        if (zmm_ok && (r[0] & (1u << 5))) f |= BLOB_CPU_AVX512BF16;
    }
#elif defined(BLOB_ARM64)
    f |= BLOB_CPU_NEON;
#if defined(__APPLE__)
    f |= BLOB_CPU_DOTPROD | BLOB_CPU_ARMCRC32;  /* every Apple Silicon core has both */
#elif defined(__linux__)
    unsigned long hw = getauxval(AT_HWCAP);
    if (hw & HWCAP_CRC32) f |= BLOB_CPU_ARMCRC32;
    if (hw & HWCAP_ASIMDDP) f |= BLOB_CPU_DOTPROD;
#endif
#endif
    return f;
}

uint32_t blob_cpu_features(void) {
    /* Detection is idempotent, so a benign race between threads only repeats it. */
    static volatile int done = 0;
    static volatile uint32_t cached = 0;
    if (!done) {
        cached = detect();
        done = 1;
    }
    return cached;
}

const char *blob_cpu_arch(void) {
#if defined(BLOB_X86)
    return "x86_64";
#elif defined(BLOB_ARM64)
    return "arm64";
#else
    return "other";
#endif
}
