/* fingerprint.h — request fingerprint, credential scope, and the
 * Idempotency-Key value (docs/requests.md).
 *
 * No I/O; the only memory is the per-thread hash state below. */
#ifndef IDEMGATE_FINGERPRINT_H
#define IDEMGATE_FINGERPRINT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* Ownership: inputs are borrowed for the call, outputs are written into
 * the caller's arrays. fp_begin lends the caller a hash state (the
 * thread's cached one, or a new one) until fp_end, which takes it back. */
#define FP_LEN 16
#define SCOPE_HEX_LEN 64 /* hex of a SHA-256 / HMAC-SHA256 */

/* One request as fingerprinted. header_values[i] is the value of the i-th
 * configured fingerprint header, or {NULL, 0} with present[i] false when
 * the request lacks it (absent and empty differ). */
struct fp_input {
    const char *method;
    size_t method_len;
    const char *target;
    size_t target_len;
    size_t n_headers;
    const char *const *header_values;
    const size_t *header_lens;
    const bool *present;
    const uint8_t *body;
    size_t body_len;
};

/* XXH3-128 over the method, target, each header (presence flag + value) and
 * body, each part prefixed with its 8-byte length, so no two different
 * inputs share an encoding. out gets 16 bytes (big-endian high64, low64). */
void fp_compute(const struct fp_input *in, uint8_t out[FP_LEN]);

/* Incremental form of the same digest (same result as fp_compute). */
struct fp_state;
struct fp_state *fp_begin(void);
void fp_part(struct fp_state *st, const void *p, size_t n); /* one length-prefixed part */
void fp_flag(struct fp_state *st, bool present);            /* one presence byte */
void fp_end(struct fp_state *st, uint8_t out[FP_LEN]);      /* takes st back */

/* The scope of requests without a credential (idempotency.anonymous
 * "shared"). */
#define SCOPE_ANONYMOUS "anonymous"

/* Scope of a credential: hex(HMAC-SHA256(secret, credential)) when secret
 * is non-empty, hex(SHA-256(credential)) otherwise. out gets 64 hex chars
 * and a NUL. */
void scope_hash(const char *secret, size_t secret_len, const char *cred, size_t cred_len,
                char out[SCOPE_HEX_LEN + 1]);

/* Validates an Idempotency-Key value and writes the key to use into out
 * (capacity >= n + 1, NUL-terminated), *out_len its length. A value that is
 * an RFC 8941 sf-string ("...") is unquoted first (\" and \\ unescaped; any
 * other backslash escape, or a missing closing quote, is invalid). The key
 * is then invalid when empty, longer than max_len, or holding a byte outside
 * 0x21..0x7E. Returns 0 when valid, -1 when not. */
int idem_key_parse(const char *in, size_t n, size_t max_len, char *out, size_t *out_len);

#endif
