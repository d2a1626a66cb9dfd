/* Run-time choice of the instruction-set path: the best one the CPU supports, unless the
 * caller (BLOBSTORE_ISA, read by the Python layer, or a test) selects another. */
#include "cpu.h"
#include "kernels_impl.h"

static const char *const isa_names[BLOB_NUM_ISAS] = {"scalar", "avx2", "neon", "avx512"};

/* Features each path needs; scalar needs none. */
static uint32_t isa_requirements(int isa) {
    switch (isa) {
    case BLOB_ISA_AVX2: return BLOB_CPU_AVX2 | BLOB_CPU_FMA | BLOB_CPU_F16C;
    /* VNNI for the integer dot products; not AVX512-BF16, which no kernel uses: its VDPBF16PS
     * would round the activations to bf16 as well, and with them split in two bf16 parts it was
     * slower than FMA (kernels_avx512.c), so Ice / Tiger Lake run it */
    case BLOB_ISA_AVX512:
        return BLOB_CPU_AVX2 | BLOB_CPU_FMA | BLOB_CPU_F16C | BLOB_CPU_AVX512F | BLOB_CPU_AVX512BW |
               BLOB_CPU_AVX512VL | BLOB_CPU_AVX512DQ | BLOB_CPU_AVX512VNNI;
    case BLOB_ISA_NEON: return BLOB_CPU_NEON;
    default: return 0;
    }
}

static int compiled_in(int isa) {
    switch (isa) {
    case BLOB_ISA_SCALAR: return 1;
#if defined(BLOB_HAVE_X86)
    case BLOB_ISA_AVX2: return 1;
    case BLOB_ISA_AVX512: return 1;
#endif
#if defined(BLOB_HAVE_ARM64)
    case BLOB_ISA_NEON: return 1;
#endif
    default: return 0;
    }
}

int blob_isa_supported(int isa) {
    if (isa < 0 || isa >= BLOB_NUM_ISAS || !compiled_in(isa)) return 0;
    uint32_t need = isa_requirements(isa);
    return (blob_cpu_features() & need) == need;
}

/* avx512 runs avx2's VNNI tiles (EVEX-encoded) but for bf16, whose 512-bit tiles were faster on
 * Zen 4 (kernels_avx512.c): never slower, so it comes first. */
int blob_isa_best(void) {
    if (blob_isa_supported(BLOB_ISA_AVX512)) return BLOB_ISA_AVX512;
    if (blob_isa_supported(BLOB_ISA_AVX2)) return BLOB_ISA_AVX2;
    if (blob_isa_supported(BLOB_ISA_NEON)) return BLOB_ISA_NEON;
    return BLOB_ISA_SCALAR;
}

const char *blob_isa_name(int isa) {
    return (isa >= 0 && isa < BLOB_NUM_ISAS) ? isa_names[isa] : "unknown";
}

/* Within a path, a dedicated int8 dot instruction is used when present (VNNI, SDOT). */
static const blob_isa_ops *table_for(int isa) {
    uint32_t f = blob_cpu_features();
    (void)f;
    switch (isa) {
#if defined(BLOB_HAVE_X86)
    case BLOB_ISA_AVX2:
        /* the VNNI kernels use the EVEX vpdpbusd on ymm registers, which needs AVX512VL */
        if ((f & BLOB_CPU_AVX512VNNI) && (f & BLOB_CPU_AVX512VL)) return &blob_ops_avx2_vnni;
        return &blob_ops_avx2;
    case BLOB_ISA_AVX512: return &blob_ops_avx512;
#endif
#if defined(BLOB_HAVE_ARM64)
    case BLOB_ISA_NEON:
        return (f & BLOB_CPU_DOTPROD) ? &blob_ops_neon_dotprod : &blob_ops_neon;
#endif
    default: return &blob_ops_scalar;
    }
}

/* Written at import (and by tests switching paths). A kernel call reads the table once at
 * its start, so a switch never changes the path under a running call. */
static volatile int current_isa = -1;
static const blob_isa_ops *volatile current_ops = 0;

int blob_isa_select(int isa) {
    if (!blob_isa_supported(isa)) return BLOB_EINVAL;
    current_ops = table_for(isa);
    current_isa = isa;
    return BLOB_OK;
}

int blob_isa_current(void) {
    if (current_isa < 0) blob_isa_select(blob_isa_best());
    return current_isa;
}

const blob_isa_ops *blob_ops(void) {
    if (!current_ops) blob_isa_select(blob_isa_best());
    return current_ops;
}

int blob_isa_int8_dot(void) {
    const blob_isa_ops *ops = blob_ops();
#if defined(BLOB_HAVE_X86)
    if (ops == &blob_ops_avx2_vnni || ops == &blob_ops_avx512) return 1;
#endif
#if defined(BLOB_HAVE_ARM64)
    if (ops == &blob_ops_neon_dotprod) return 1;
#endif
    (void)ops;
    return 0;
}
