/* webhook.c — a delivery's signature and key (see webhook.h). */
#include "idemgate/webhook/webhook.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>
#include <openssl/crypto.h>

#include "idemgate/config/config.h"
#include "idemgate/core/base64.h"
#include "idemgate/core/clock.h"
#include "idemgate/core/hmac.h"
#include "idemgate/http/http1.h"

#define MAC_LEN HMAC_SHA256_LEN
/* At most this many secrets are tried (rotation needs two or three). */
#define MAX_SECRETS 16

/* ------------------------------------------------------------ HMAC */

/* Whether sig (MAC_LEN bytes) equals any of the macs: every one is
 * compared, in constant time. */
static bool any_equal(const uint8_t *sig, uint8_t macs[][MAC_LEN], size_t n)
{
    int found = 0;
    for (size_t i = 0; i < n; i++)
        found |= CRYPTO_memcmp(sig, macs[i], MAC_LEN) == 0;
    return found != 0;
}

static size_t secrets_macs(const struct cfg_webhook *w, const struct hmac_part *parts,
                           size_t n_parts, uint8_t macs[][MAC_LEN])
{
    size_t n = 0;
    for (size_t i = 0; i < w->n_keys && n < MAX_SECRETS; i++)
        if (hmac_sha256(w->keys[i].v, w->keys[i].n, parts, n_parts, macs[n])) n++;
    return n;
}

/* ------------------------------------------------- the two schemes */

static const struct http1_header *one_header(const struct http1_head *h, const char *name)
{
    size_t count = 0;
    const struct http1_header *f = http1_find_header(h, name, &count);
    return count == 1 ? f : NULL;
}

/* webhook-timestamp: decimal seconds, within tolerance of now. */
static bool timestamp_fresh(const struct http1_slice *v, int tolerance)
{
    if (v->n == 0 || v->n > 18) return false;
    int64_t ts = 0;
    for (size_t i = 0; i < v->n; i++) {
        if (v->p[i] < '0' || v->p[i] > '9') return false;
        ts = ts * 10 + (v->p[i] - '0');
    }
    int64_t d = clock_wall_s() - ts;
    return d <= tolerance && d >= -(int64_t)tolerance;
}

static bool verify_standard(const struct cfg_webhook *w, const struct http1_head *h,
                            const char *body, size_t body_len)
{
    const struct http1_header *id = one_header(h, "webhook-id");
    const struct http1_header *ts = one_header(h, "webhook-timestamp");
    const struct http1_header *sig = one_header(h, "webhook-signature");
    if (!id || !ts || !sig || !timestamp_fresh(&ts->value, w->tolerance_seconds)) return false;
    const struct hmac_part parts[] = {{id->value.p, id->value.n},
                                      {".", 1},
                                      {ts->value.p, ts->value.n},
                                      {".", 1},
                                      {body, body_len}};
    uint8_t macs[MAX_SECRETS][MAC_LEN];
    size_t n = secrets_macs(w, parts, sizeof(parts) / sizeof(parts[0]), macs);
    /* Space-separated "<version>,<base64>": only v1 is ours to check. */
    bool ok = false;
    const char *p = sig->value.p, *end = p + sig->value.n;
    while (p < end) {
        while (p < end && *p == ' ')
            p++;
        const char *q = p;
        while (q < end && *q != ' ')
            q++;
        if (q - p > 3 && memcmp(p, "v1,", 3) == 0) {
            uint8_t got[MAC_LEN + 3];
            if (base64_decode(p + 3, (size_t)(q - p - 3), got, sizeof(got)) == MAC_LEN)
                ok |= any_equal(got, macs, n);
        }
        p = q;
    }
    return ok;
}

static int hex_value(char c)
{
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

static bool decode_mac(enum cfg_wh_enc enc, const char *s, size_t n, uint8_t out[MAC_LEN])
{
    if (enc == CFG_WH_BASE64) {
        uint8_t tmp[MAC_LEN + 3];
        if (base64_decode(s, n, tmp, sizeof(tmp)) != MAC_LEN) return false;
        memcpy(out, tmp, MAC_LEN);
        return true;
    }
    if (n != 2 * MAC_LEN) return false;
    for (size_t i = 0; i < MAC_LEN; i++) {
        int hi = hex_value(s[2 * i]), lo = hex_value(s[2 * i + 1]);
        if (hi < 0 || lo < 0) return false;
        out[i] = (uint8_t)(hi << 4 | lo);
    }
    return true;
}

static bool verify_hmac(const struct cfg_webhook *w, const struct http1_head *h, const char *body,
                        size_t body_len)
{
    const struct http1_header *f = one_header(h, w->header);
    if (!f) return false;
    size_t plen = w->prefix ? strlen(w->prefix) : 0;
    if (f->value.n < plen || memcmp(f->value.p, w->prefix ? w->prefix : "", plen) != 0)
        return false;
    uint8_t got[MAC_LEN];
    if (!decode_mac(w->encoding, f->value.p + plen, f->value.n - plen, got)) return false;
    const struct hmac_part part = {body, body_len};
    uint8_t macs[MAX_SECRETS][MAC_LEN];
    size_t n = secrets_macs(w, &part, 1, macs);
    return any_equal(got, macs, n);
}

bool webhook_verify(const struct cfg_webhook *w, const struct http1_head *h, const char *body,
                    size_t body_len)
{
    switch (w->signature) {
    case CFG_WH_STANDARD:
        return verify_standard(w, h, body, body_len);
    case CFG_WH_HMAC_SHA256:
        return verify_hmac(w, h, body, body_len);
    case CFG_WH_NONE:
        return true;
    }
    return false;
}

/* ------------------------------------------------------------- the key */

/* RFC 6901: the next reference token of ptr (after its '/') unescaped
 * into tok; NULL when it is malformed (a '~' not followed by 0 or 1). */
static const char *next_token(const char *ptr, char *tok, size_t cap)
{
    size_t n = 0;
    for (ptr++; *ptr && *ptr != '/'; ptr++) {
        char c = *ptr;
        if (c == '~') {
            if (ptr[1] == '0')
                c = '~';
            else if (ptr[1] == '1')
                c = '/';
            else
                return NULL;
            ptr++;
        }
        if (n + 1 >= cap) return NULL;
        tok[n++] = c;
    }
    tok[n] = '\0';
    return ptr;
}

/* An array index: "0", or digits without a leading zero. */
static int array_index(const char *tok)
{
    size_t n = strlen(tok);
    if (n == 0 || n > 9 || strspn(tok, "0123456789") != n || (n > 1 && tok[0] == '0')) return -1;
    return atoi(tok);
}

static const cJSON *json_pointer(const cJSON *v, const char *ptr)
{
    char tok[256];
    while (v && *ptr) {
        ptr = next_token(ptr, tok, sizeof(tok));
        if (!ptr) return NULL;
        if (cJSON_IsObject(v)) {
            v = cJSON_GetObjectItemCaseSensitive(v, tok);
        } else if (cJSON_IsArray(v)) {
            int i = array_index(tok);
            v = i < 0 ? NULL : cJSON_GetArrayItem(v, i);
        } else {
            return NULL;
        }
    }
    return v;
}

enum webhook_key_status webhook_key(const struct cfg_webhook *w, const struct http1_head *h,
                                    const char *body, size_t body_len,
                                    char buf[WEBHOOK_KEY_MAX + 1], const char **key,
                                    size_t *key_len)
{
    if (!w->key_json) {
        size_t count = 0;
        const struct http1_header *f = http1_find_header(h, w->key_source, &count);
        if (!f) return WEBHOOK_KEY_ABSENT;
        if (count > 1) return WEBHOOK_KEY_INVALID;
        *key = f->value.p;
        *key_len = f->value.n;
        return WEBHOOK_KEY_OK;
    }
    cJSON *root = cJSON_ParseWithLength(body, body_len);
    const cJSON *v = root ? json_pointer(root, w->key_source) : NULL;
    enum webhook_key_status st = WEBHOOK_KEY_INVALID;
    int n = -1;
    if (cJSON_IsString(v)) {
        n = snprintf(buf, WEBHOOK_KEY_MAX + 1, "%s", v->valuestring);
    } else if (cJSON_IsNumber(v) && v->valuedouble < 9007199254740992.0 &&
               v->valuedouble > -9007199254740992.0) {
        /* In range first: converting a double beyond long long is undefined. */
        long long i = (long long)v->valuedouble;
        if ((double)i == v->valuedouble) n = snprintf(buf, WEBHOOK_KEY_MAX + 1, "%lld", i);
    }
    if (n >= 0 && n <= WEBHOOK_KEY_MAX) {
        *key = buf;
        *key_len = (size_t)n;
        st = WEBHOOK_KEY_OK;
    }
    cJSON_Delete(root);
    return st;
}
