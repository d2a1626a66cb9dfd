/* CRC32C (Castagnoli), the checksum of every header, manifest and blob in a blob file. */
#ifndef BLOBSTORE_CRC32C_H
#define BLOBSTORE_CRC32C_H

#include <stddef.h>
#include <stdint.h>

/* Continue a CRC32C over data[0, len); start with crc = 0. Hardware path where the CPU has one. */
uint32_t blob_crc32c(uint32_t crc, const void *data, size_t len);

/* The same, portable table path only (the reference the hardware path is tested against). */
uint32_t blob_crc32c_portable(uint32_t crc, const void *data, size_t len);

/* "sse4.2", "armv8-crc" or "table": which path blob_crc32c takes on this CPU. */
const char *blob_crc32c_path(void);

#endif
