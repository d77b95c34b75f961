/* fingerprint.c — request fingerprint (XXH3-128 over length-prefixed
 * parts), credential scope (HMAC-SHA256 / SHA-256, hex) and Idempotency-Key
 * validation (see fingerprint.h). Does not decide what to do with them. */
#include "idemgate/idem/fingerprint.h"

#include "idemgate/core/hmac.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <xxhash.h>

struct fp_state {
    XXH3_state_t *xxh;
};

/* One hash state per thread, kept between requests: fp_begin/fp_end run
 * for every covered request and the state is ~600 bytes, 64-aligned. */
static pthread_key_t fp_key;
static pthread_once_t fp_once = PTHREAD_ONCE_INIT;

static void fp_state_free(void *p)
{
    struct fp_state *st = p;
    XXH3_freeState(st->xxh);
    free(st);
}

static void fp_key_init(void)
{
    if (pthread_key_create(&fp_key, fp_state_free) != 0) abort();
}

struct fp_state *fp_begin(void)
{
    pthread_once(&fp_once, fp_key_init);
    struct fp_state *st = pthread_getspecific(fp_key);
    if (st) {
        pthread_setspecific(fp_key, NULL);
    } else {
        st = malloc(sizeof(*st));
        if (!st) abort();
        st->xxh = XXH3_createState();
        if (!st->xxh) abort();
    }
    XXH3_128bits_reset(st->xxh);
    return st;
}

void fp_part(struct fp_state *st, const void *p, size_t n)
{
    uint8_t len[8];
    for (int i = 0; i < 8; i++)
        len[i] = (uint8_t)((uint64_t)n >> (8 * (7 - i)));
    XXH3_128bits_update(st->xxh, len, sizeof(len));
    if (n > 0) XXH3_128bits_update(st->xxh, p, n);
}

void fp_flag(struct fp_state *st, bool present)
{
    uint8_t b = present ? 1 : 0;
    XXH3_128bits_update(st->xxh, &b, 1);
}

void fp_end(struct fp_state *st, uint8_t out[FP_LEN])
{
    XXH128_hash_t h = XXH3_128bits_digest(st->xxh);
    for (int i = 0; i < 8; i++) {
        out[i] = (uint8_t)(h.high64 >> (8 * (7 - i)));
        out[8 + i] = (uint8_t)(h.low64 >> (8 * (7 - i)));
    }
    if (!pthread_getspecific(fp_key))
        pthread_setspecific(fp_key, st);
    else
        fp_state_free(st);
}

void fp_compute(const struct fp_input *in, uint8_t out[FP_LEN])
{
    struct fp_state *st = fp_begin();
    fp_part(st, in->method, in->method_len);
    fp_part(st, in->target, in->target_len);
    for (size_t i = 0; i < in->n_headers; i++) {
        bool present = in->present[i];
        fp_flag(st, present);
        fp_part(st, present ? in->header_values[i] : NULL, present ? in->header_lens[i] : 0);
    }
    fp_part(st, in->body, in->body_len);
    fp_end(st, out);
}

void scope_hash(const char *secret, size_t secret_len, const char *cred, size_t cred_len,
                char out[SCOPE_HEX_LEN + 1])
{
    static const char hex[] = "0123456789abcdef";
    uint8_t md[HMAC_SHA256_LEN];
    unsigned int md_len = HMAC_SHA256_LEN;
    if (!cred) cred = "";
    const struct hmac_part part = {cred, cred_len};
    bool ok =
        secret_len > 0 ? hmac_sha256(secret, secret_len, &part, 1, md) : sha256(cred, cred_len, md);
    /* Without a scope the store would mix credentials: never go on. */
    if (!ok || md_len != SCOPE_HEX_LEN / 2) abort();
    for (unsigned int i = 0; i < md_len; i++) {
        out[2 * i] = hex[md[i] >> 4];
        out[2 * i + 1] = hex[md[i] & 15];
    }
    out[SCOPE_HEX_LEN] = '\0';
}

/* Unquotes an RFC 8941 sf-string in[0..n) (the quotes included) into out,
 * *len its length. Returns 0 or -1. */
static int key_unquote(const char *in, size_t n, char *out, size_t *len)
{
    if (n < 2 || in[n - 1] != '"') return -1;
    size_t o = 0;
    for (size_t i = 1; i < n - 1; i++) {
        unsigned char c = (unsigned char)in[i];
        if (c == '\\') {
            if (i + 1 >= n - 1) return -1;
            c = (unsigned char)in[++i];
            if (c != '"' && c != '\\') return -1;
        } else if (c == '"' || c < 0x20 || c > 0x7E) {
            return -1;
        }
        out[o++] = (char)c;
    }
    *len = o;
    return 0;
}

static bool key_valid(const char *k, size_t len, size_t max_len)
{
    if (len == 0 || len > max_len) return false;
    for (size_t i = 0; i < len; i++) {
        unsigned char c = (unsigned char)k[i];
        if (c < 0x21 || c > 0x7E) return false;
    }
    return true;
}

int idem_key_parse(const char *in, size_t n, size_t max_len, char *out, size_t *out_len)
{
    size_t len = n;
    *out_len = 0;
    if (n > 0 && in[0] == '"') {
        if (key_unquote(in, n, out, &len) < 0) len = 0;
    } else if (n > 0) {
        memcpy(out, in, n);
    }
    if (!key_valid(out, len, max_len)) {
        out[0] = '\0';
        return -1;
    }
    out[len] = '\0';
    *out_len = len;
    return 0;
}
