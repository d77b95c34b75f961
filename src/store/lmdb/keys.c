/* keys.c — the LMDB store's decisions on one key, each inside one write
 * transaction (so atomic across threads and processes): acquire (the
 * same table as the memory store and the Redis script) and the fenced
 * complete, release and renew of a lock its token owns.
 *
 * Owns the answers it fills in (an acquire's copy of a record, freed by
 * whoever runs it: ops.c). Does not own the transaction, the bookkeeping
 * or eviction (txn.c). */
#include "internal.h"

#include <string.h>

/* An acquire's answer on a live entry: another fingerprint's, in
 * progress, or completed (the record copied: the map may change). */
static void lm_acquire_found(struct lm_acq_args *a, const struct lm_entry *en)
{
    if (memcmp(en->h.fp, a->fp, STORE_FP_LEN) != 0) {
        a->reply.state = STORE_ACQ_MISMATCH;
    } else if (!en->h.completed) {
        a->reply.state = STORE_ACQ_IN_PROGRESS;
    } else {
        size_t off = sizeof(struct lm_hdr) + en->h.skey_len;
        size_t n = en->val_len - off;
        a->record = lm_alloc(n);
        memcpy(a->record, en->val + off, n);
        a->reply.state = STORE_ACQ_COMPLETED;
        a->reply.record = a->record;
        a->reply.record_len = n;
    }
}

int lm_acquire_txn(struct lm_txn *x, void *arg)
{
    struct lm_acq_args *a = arg;
    free(a->record); /* a run after a full map starts over */
    a->record = NULL;
    memset(&a->reply, 0, sizeof(a->reply));
    a->reply.state = STORE_ACQ_ERROR;
    struct lm_entry en;
    int f = lm_entry_find(x, a->skey, a->skey_len, &en);
    if (f < 0) return x->err;
    if (f == 0) {
        size_t slen = lm_scope_len(a->skey, a->skey_len);
        uint64_t cost = lm_entry_cost(en.key_len, a->skey_len, 0, false, slen);
        if (lm_make_room(x, a->skey, slen, cost) < 0) return 0;
        memset(&en.h, 0, sizeof(en.h));
        en.h.version = LM_VERSION;
        en.h.skey_len = (uint32_t)a->skey_len;
        en.h.expires_ms = x->now + a->lock_ms;
        en.h.created_ms = x->now;
        memcpy(en.h.fp, a->fp, STORE_FP_LEN);
        memcpy(en.h.token, a->token, STORE_TOKEN_LEN);
        if (lm_entry_put(x, &en, a->skey, NULL, 0)) return x->err;
        lm_charge(x, a->skey, slen, (int64_t)cost, 0, 1, 0);
        a->reply.state = STORE_ACQ_LOCKED;
    } else {
        lm_acquire_found(a, &en);
    }
    return 0;
}

int lm_acquire_peek(struct store_lmdb_env *e, MDB_txn *t, struct lm_acq_args *a)
{
    struct lm_txn x;
    memset(&x, 0, sizeof(x));
    x.e = e;
    x.t = t;
    struct lm_entry en;
    char key[LM_KEY_MAX + 1];
    size_t klen = lm_entry_key(a->skey, a->skey_len, key);
    if (lm_entry_raw(&x, key, klen, &en) <= 0) return 0;
    const char *stored = (const char *)en.val + sizeof(struct lm_hdr);
    if (en.h.skey_len != a->skey_len || memcmp(stored, a->skey, a->skey_len) != 0 ||
        en.h.expires_ms <= clock_wall_ms())
        return 0;
    free(a->record);
    a->record = NULL;
    memset(&a->reply, 0, sizeof(a->reply));
    lm_acquire_found(a, &en);
    return 1;
}

/* The lock becomes a completed record: -1 when there is no room for it
 * (the lock then stays until it expires, as with the memory store). */
static int lm_complete(struct lm_txn *x, struct lm_owned_args *a, struct lm_entry *en)
{
    size_t slen = lm_scope_len(a->skey, a->skey_len);
    uint64_t lock = lm_entry_cost(en->key_len, a->skey_len, 0, false, slen);
    uint64_t done = lm_entry_cost(en->key_len, a->skey_len, a->record_len, true, slen);
    if (lm_make_room(x, a->skey, slen, done - lock) < 0) return -1;
    lm_expiry_del(x, en->h.expires_ms, 'E', en->key, en->key_len);
    en->h.completed = 1;
    en->h.seq = ++x->tot.seq;
    en->h.expires_ms = x->now + a->after_ms;
    en->h.created_ms = x->now;
    if (lm_entry_put(x, en, a->skey, a->record, a->record_len)) return -1;
    lm_done_put(x, a->skey, slen, en->h.seq, en->key, en->key_len);
    lm_charge(x, a->skey, slen, (int64_t)(done - lock), (int64_t)done, 0, 1);
    return 1;
}

int lm_owned_txn(struct lm_txn *x, void *arg)
{
    struct lm_owned_args *a = arg;
    a->status = -1;
    struct lm_entry en;
    int f = lm_entry_find(x, a->skey, a->skey_len, &en);
    if (f < 0) return x->err;
    a->status = 0;
    if (f == 0 || en.h.completed || memcmp(en.h.token, a->token, STORE_TOKEN_LEN) != 0) return 0;
    switch (a->action) {
    case LM_COMPLETE:
        a->status = lm_complete(x, a, &en);
        break;
    case LM_RELEASE:
        lm_drop(x, &en, a->skey);
        a->status = 1;
        break;
    case LM_RENEW:
        lm_expiry_del(x, en.h.expires_ms, 'E', en.key, en.key_len);
        en.h.expires_ms = x->now + a->after_ms;
        a->status = lm_entry_put(x, &en, a->skey, NULL, 0) ? -1 : 1;
        break;
    }
    return x->err;
}
