/* CPU feature detection shared by every extension: one answer per process. */
#ifndef BLOBSTORE_CPU_H
#define BLOBSTORE_CPU_H

#include <stdint.h>

/* Bit flags returned by blob_cpu_features(); values are frozen. */
enum blob_cpu_feature {
    BLOB_CPU_SSE42      = 1u << 0,   /* x86: SSE4.2 (hardware CRC32C) */
    BLOB_CPU_AVX2       = 1u << 1,   /* x86: AVX2, usable (OS saves YMM state) */
    BLOB_CPU_FMA        = 1u << 2,
    BLOB_CPU_F16C       = 1u << 3,
    BLOB_CPU_AVX512F    = 1u << 4,   /* x86: AVX-512 F, usable (OS saves ZMM state) */
    BLOB_CPU_AVX512BW   = 1u << 5,
    BLOB_CPU_AVX512VNNI = 1u << 6,
    BLOB_CPU_AVXVNNI    = 1u << 7,
    BLOB_CPU_AVX512VL   = 1u << 8,   /* x86: AVX-512 forms on 256-bit registers (VNNI on ymm needs it) */
    BLOB_CPU_AVX512DQ   = 1u << 9,
    BLOB_CPU_AVX512BF16 = 1u << 10,  /* x86: VDPBF16PS (reported; no path needs it, see dispatch.c) */
    BLOB_CPU_NEON       = 1u << 16,  /* arm64: always present */
    BLOB_CPU_DOTPROD    = 1u << 17,  /* arm64: SDOT/UDOT */
    BLOB_CPU_ARMCRC32   = 1u << 18   /* arm64: CRC32C instructions */
};

/* Features of the CPU we run on (detected once, then cached). */
uint32_t blob_cpu_features(void);

/* Name of the running architecture: "x86_64", "arm64" or "other". */
const char *blob_cpu_arch(void);

#endif
