/* base64.h — RFC 4648 base64 (the standard alphabet), for webhook secrets
 * and signatures. Pure functions on caller buffers. */
#ifndef IDEMGATE_CORE_BASE64_H
#define IDEMGATE_CORE_BASE64_H

#include <stddef.h>
#include <stdint.h>

/* Room base64_encode needs for n bytes (with its NUL). */
#define BASE64_ENCODED_LEN(n) ((((n) + 2) / 3) * 4 + 1)

/* Decodes s (len bytes, no NUL needed; '=' padding optional, no spaces)
 * into out (cap bytes): the decoded length, or -1 when s is not base64
 * (a byte outside the alphabet, padding inside, a length of 4k+1) or does
 * not fit. */
long base64_decode(const char *s, size_t len, uint8_t *out, size_t cap);

/* Encodes n bytes of in into out (BASE64_ENCODED_LEN(n) bytes, padded,
 * NUL-terminated); returns the length without the NUL. */
size_t base64_encode(const uint8_t *in, size_t n, char *out);

#endif
