/* store.c — the wrappers over a store's ops table (store.h), and the one
 * thing they add: an acquire with limits is the backend's lock and limit
 * operations sent together and answered as one (struct store_acq_join,
 * owned from the call to its callback). Each backend lives in its own
 * folder (memory/, redis/). */
#include "idemgate/store/store.h"

#include <stdlib.h>
#include <string.h>

#include "idemgate/core/buf.h"

/* An acquire with limits: both answers, whichever comes first. */
struct store_acq_join {
    store_acquire_cb cb;
    void *arg;
    int pending;
    struct store_limit_reply limit;
    enum store_acquire_state state; /* the lock's answer when it came first */
    struct buf record;              /* ... and its record, copied */
};

static void join_done(struct store_acq_join *j, const struct store_acquire_reply *lock)
{
    struct store_acquire_reply r = *lock;
    r.limit = j->limit;
    j->cb(j->arg, &r);
    buf_free(&j->record);
    free(j);
}

static void join_acquired(void *arg, const struct store_acquire_reply *r)
{
    struct store_acq_join *j = arg;
    if (--j->pending == 0) {
        join_done(j, r);
        return;
    }
    j->state = r->state;
    if (r->state == STORE_ACQ_COMPLETED) buf_append(&j->record, r->record, r->record_len);
}

static void join_limited(void *arg, const struct store_limit_reply *l)
{
    struct store_acq_join *j = arg;
    j->limit = *l;
    if (--j->pending > 0) return;
    struct store_acquire_reply r = {
        j->state, (const uint8_t *)buf_data(&j->record), buf_size(&j->record), {0}};
    join_done(j, &r);
}

void store_acquire(struct store *s, const struct store_acquire_req *req, store_acquire_cb cb,
                   void *arg)
{
    if (!req->limits) {
        s->ops->acquire(s, req, cb, arg);
        return;
    }
    struct store_acq_join *j = calloc(1, sizeof(*j));
    if (!j) abort();
    j->cb = cb;
    j->arg = arg;
    j->pending = 2;
    buf_init(&j->record);
    /* the limit first: on one connection its answer comes first, and the
     * lock's record need not be copied */
    s->ops->limit(s, req->scope, req->scope_len, req->token, req->limits, join_limited, j);
    s->ops->acquire(s, req, join_acquired, j);
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
