/* store.c — the thin wrappers over a store's ops table (store.h). Owns
 * nothing: each backend lives in its own file (store_redis.c,
 * store_memory.c). */
#include "idemgate/store/store.h"

#include <stdlib.h>

void store_acquire(struct store *s, const char *skey, size_t skey_len,
                   const uint8_t fp[STORE_FP_LEN], const char token[STORE_TOKEN_LEN],
                   uint32_t lock_ms, store_acquire_cb cb, void *arg)
{
    s->ops->acquire(s, skey, skey_len, fp, token, lock_ms, cb, arg);
}

void store_complete(struct store *s, const char *skey, size_t skey_len,
                    const char token[STORE_TOKEN_LEN], const uint8_t *record, size_t record_len,
                    uint32_t ttl_seconds, store_done_cb cb, void *arg)
{
    s->ops->complete(s, skey, skey_len, token, record, record_len, ttl_seconds, cb, arg);
}

void store_release(struct store *s, const char *skey, size_t skey_len,
                   const char token[STORE_TOKEN_LEN], store_done_cb cb, void *arg)
{
    s->ops->release(s, skey, skey_len, token, cb, arg);
}

void store_renew(struct store *s, const char *skey, size_t skey_len,
                 const char token[STORE_TOKEN_LEN], uint32_t lock_ms, store_done_cb cb, void *arg)
{
    s->ops->renew(s, skey, skey_len, token, lock_ms, cb, arg);
}

void store_ping(struct store *s, store_done_cb cb, void *arg)
{
    s->ops->ping(s, cb, arg);
}

void store_limit(struct store *s, const char *scope, size_t scope_len,
                 const char token[STORE_TOKEN_LEN], const struct store_limit_args *a,
                 store_limit_cb cb, void *arg)
{
    s->ops->limit(s, scope, scope_len, token, a, cb, arg);
}

void store_limit_release(struct store *s, const char *scope, size_t scope_len,
                         const char token[STORE_TOKEN_LEN], store_done_cb cb, void *arg)
{
    s->ops->limit_release(s, scope, scope_len, token, cb, arg);
}

void store_limit_renew(struct store *s, const char *scope, size_t scope_len,
                       const char token[STORE_TOKEN_LEN], uint32_t lease_ms, store_done_cb cb,
                       void *arg)
{
    s->ops->limit_renew(s, scope, scope_len, token, lease_ms, cb, arg);
}

void store_free(struct store *s)
{
    if (s) s->ops->free(s);
}

void store_key_info_free(struct store_key_info *k)
{
    free(k->record);
    free(k->skey);
    k->record = NULL;
    k->skey = NULL;
}
