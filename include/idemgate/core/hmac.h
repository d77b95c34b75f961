/* hmac.h — HMAC-SHA256 (RFC 2104) over several parts, for scope hashes
 * and webhook signatures: SHA-256 from OpenSSL, fetched once per thread
 * with one reused digest context, so a call allocates nothing (OpenSSL's
 * HMAC() and EVP_MAC fetch and allocate on every call). */
#ifndef IDEMGATE_CORE_HMAC_H
#define IDEMGATE_CORE_HMAC_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define HMAC_SHA256_LEN 32

struct hmac_part {
    const void *p;
    size_t n;
};

/* out = HMAC-SHA256(key, parts[0] || parts[1] || ...); false when
 * OpenSSL failed (out is then undefined). Any thread. */
bool hmac_sha256(const void *key, size_t key_len, const struct hmac_part *parts, size_t n_parts,
                 uint8_t out[HMAC_SHA256_LEN]);

/* out = SHA-256(data); false when OpenSSL failed. Any thread. */
bool sha256(const void *data, size_t len, uint8_t out[HMAC_SHA256_LEN]);

#endif
