/* CRC32C: slicing-by-8 tables everywhere, the crc32 instruction where the CPU has it. */
#include "crc32c.h"

#include <string.h>

#include "cpu.h"

#define CRC32C_POLY_REFLECTED 0x82F63B78u

static uint32_t table[8][256];
static volatile int table_ready = 0;

static void build_table(void) {
    for (uint32_t n = 0; n < 256; n++) {
        uint32_t c = n;
        for (int k = 0; k < 8; k++) c = (c & 1) ? (c >> 1) ^ CRC32C_POLY_REFLECTED : c >> 1;
        table[0][n] = c;
    }
    for (uint32_t n = 0; n < 256; n++)
        for (int t = 1; t < 8; t++) table[t][n] = (table[t - 1][n] >> 8) ^ table[0][table[t - 1][n] & 0xff];
    table_ready = 1;
}

uint32_t blob_crc32c_portable(uint32_t crc, const void *data, size_t len) {
    if (!table_ready) build_table(); /* idempotent: a race only rebuilds identical tables */
    const unsigned char *p = (const unsigned char *)data;
    crc = ~crc;
    while (len >= 8) {
        uint32_t lo, hi;
        memcpy(&lo, p, 4); /* little-endian hosts only: every platform we ship wheels for */
        memcpy(&hi, p + 4, 4);
        lo ^= crc;
        crc = table[7][lo & 0xff] ^ table[6][(lo >> 8) & 0xff] ^ table[5][(lo >> 16) & 0xff] ^
              table[4][lo >> 24] ^ table[3][hi & 0xff] ^ table[2][(hi >> 8) & 0xff] ^
              table[1][(hi >> 16) & 0xff] ^ table[0][hi >> 24];
        p += 8;
        len -= 8;
    }
    while (len--) crc = (crc >> 8) ^ table[0][(crc ^ *p++) & 0xff];
    return ~crc;
}

#if defined(__x86_64__) || defined(_M_X64)
#include <nmmintrin.h>
#if defined(__GNUC__) || defined(__clang__)
__attribute__((target("sse4.2")))
#endif
static uint32_t crc32c_hw(uint32_t crc, const void *data, size_t len) {
    const unsigned char *p = (const unsigned char *)data;
    uint64_t c = ~crc;
    while (len >= 8) {
        uint64_t word;
        memcpy(&word, p, 8);
        c = _mm_crc32_u64(c, word);
        p += 8;
        len -= 8;
    }
    uint32_t c32 = (uint32_t)c;
    while (len--) c32 = _mm_crc32_u8(c32, *p++);
    return ~c32;
}
#define HW_FEATURE BLOB_CPU_SSE42
#define HW_NAME "sse4.2"
#elif (defined(__aarch64__) || defined(_M_ARM64)) && (defined(__GNUC__) || defined(__clang__))
#include <arm_acle.h>
__attribute__((target("+crc")))
static uint32_t crc32c_hw(uint32_t crc, const void *data, size_t len) {
    const unsigned char *p = (const unsigned char *)data;
    uint32_t c = ~crc;
    while (len >= 8) {
        uint64_t word;
        memcpy(&word, p, 8);
        c = __crc32cd(c, word);
        p += 8;
        len -= 8;
    }
    while (len--) c = __crc32cb(c, *p++);
    return ~c;
}
#define HW_FEATURE BLOB_CPU_ARMCRC32
#define HW_NAME "armv8-crc"
#endif

uint32_t blob_crc32c(uint32_t crc, const void *data, size_t len) {
#ifdef HW_FEATURE
    if (blob_cpu_features() & HW_FEATURE) return crc32c_hw(crc, data, len);
#endif
    return blob_crc32c_portable(crc, data, len);
}

const char *blob_crc32c_path(void) {
#ifdef HW_FEATURE
    if (blob_cpu_features() & HW_FEATURE) return HW_NAME;
#endif
    return "table";
}
