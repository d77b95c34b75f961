/* hmac.c — HMAC-SHA256 on a per-thread SHA-256 context (see hmac.h):
 * H((K ^ opad) || H((K ^ ipad) || message)), a key longer than the block
 * hashed first. */
#include "idemgate/core/hmac.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/crypto.h>
#include <openssl/evp.h>

#define BLOCK 64 /* SHA-256's block size */

/* The thread's digest and context, freed when the thread ends (the key's
 * destructor gets the context; the digest goes with it). */
static __thread EVP_MD *md;
static __thread EVP_MD_CTX *ctx;
static pthread_key_t ctx_key;
static pthread_once_t ctx_once = PTHREAD_ONCE_INIT;

static void thread_end(void *arg)
{
    EVP_MD_CTX_free(arg);
    EVP_MD_free(md);
    md = NULL;
    ctx = NULL;
}

static void make_key(void)
{
    if (pthread_key_create(&ctx_key, thread_end) != 0) abort();
}

static bool ready(void)
{
    if (ctx) return true;
    pthread_once(&ctx_once, make_key);
    md = EVP_MD_fetch(NULL, "SHA256", NULL);
    ctx = md ? EVP_MD_CTX_new() : NULL;
    if (!ctx) {
        EVP_MD_free(md);
        md = NULL;
        return false;
    }
    pthread_setspecific(ctx_key, ctx);
    return true;
}

static bool digest(const struct hmac_part *parts, size_t n, uint8_t out[HMAC_SHA256_LEN])
{
    unsigned int len = 0;
    if (EVP_DigestInit_ex(ctx, md, NULL) != 1) return false;
    for (size_t i = 0; i < n; i++)
        if (parts[i].n && EVP_DigestUpdate(ctx, parts[i].p, parts[i].n) != 1) return false;
    return EVP_DigestFinal_ex(ctx, out, &len) == 1 && len == HMAC_SHA256_LEN;
}

bool sha256(const void *data, size_t len, uint8_t out[HMAC_SHA256_LEN])
{
    const struct hmac_part part = {data, len};
    return ready() && digest(&part, 1, out);
}

bool hmac_sha256(const void *key, size_t key_len, const struct hmac_part *parts, size_t n_parts,
                 uint8_t out[HMAC_SHA256_LEN])
{
    if (!ready()) return false;
    uint8_t k[BLOCK] = {0}, pad[BLOCK], inner[HMAC_SHA256_LEN];
    if (key_len > BLOCK) {
        if (!sha256(key, key_len, k)) return false;
    } else if (key_len) {
        memcpy(k, key, key_len);
    }
    for (int i = 0; i < BLOCK; i++)
        pad[i] = k[i] ^ 0x36;
    bool ok = EVP_DigestInit_ex(ctx, md, NULL) == 1 && EVP_DigestUpdate(ctx, pad, BLOCK) == 1;
    for (size_t i = 0; ok && i < n_parts; i++)
        ok = !parts[i].n || EVP_DigestUpdate(ctx, parts[i].p, parts[i].n) == 1;
    unsigned int len = 0;
    ok = ok && EVP_DigestFinal_ex(ctx, inner, &len) == 1 && len == HMAC_SHA256_LEN;
    for (int i = 0; i < BLOCK; i++)
        pad[i] = k[i] ^ 0x5c;
    const struct hmac_part outer[] = {{pad, BLOCK}, {inner, HMAC_SHA256_LEN}};
    ok = ok && digest(outer, 2, out);
    OPENSSL_cleanse(k, sizeof(k));
    OPENSSL_cleanse(pad, sizeof(pad));
    return ok;
}
