/* store_memory.c — the in-process backend of the store (store.h).
 *
 * Owns one process-wide hash table (struct store_memory_shared, guarded by
 * a mutex because every worker thread touches it) and, per worker, a small
 * struct that answers on that worker's event_base. Each operation runs to
 * completion under the mutex (the same atomicity the Redis scripts give),
 * copies its answer, and hands it to the caller later through a zero-delay
 * event, so callbacks never fire from inside the call that started them.
 *
 * Expiry uses the monotonic clock: an expired entry is purged when it is
 * looked up, and each operation also sweeps a few buckets so that keys
 * never looked up again do not pile up. */
#include "idemgate/store.h"

#include <event2/event.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <xxhash.h>

#define MEM_INITIAL_BUCKETS 64
#define MEM_SWEEP_BUCKETS 4

/* One (scope, key): in progress {token, fp} or completed {fp, record}. */
struct mem_entry {
    struct mem_entry *next; /* bucket chain */
    uint64_t hash;
    uint64_t expires_ms; /* monotonic */
    bool completed;
    char token[STORE_TOKEN_LEN];
    uint8_t fp[STORE_FP_LEN];
    uint8_t *record; /* owned; completed only */
    size_t record_len;
    size_t key_len;
    char key[]; /* "<prefix>{<skey>}" */
};

struct store_memory_shared {
    pthread_mutex_t mu;
    char *prefix;
    size_t prefix_len;
    struct mem_entry **buckets;
    size_t nbuckets; /* a power of two */
    size_t count;
    size_t sweep_pos;
};

/* One operation waiting for its deferred callback. */
struct mem_op {
    struct mem_op *prev, *next;
    struct store_memory *s;
    struct event *ev;
    bool is_acquire;
    store_acquire_cb acq_cb;
    store_done_cb done_cb;
    void *arg;
    struct store_acquire_reply reply;
    uint8_t *record; /* owned copy behind reply.record */
    int status;
};

struct store_memory {
    struct store base; /* first: a struct store * is a struct store_memory * */
    struct event_base *evb;
    struct store_memory_shared *sh;
    int timeout_ms;
    struct mem_op *ops; /* pending callbacks */
};

static void *mem_alloc(size_t n)
{
    void *p = calloc(1, n ? n : 1);
    if (!p) abort();
    return p;
}

static uint64_t mem_now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

/* ---- the shared table (callers hold sh->mu) ---- */

static void mem_entry_free(struct mem_entry *e)
{
    free(e->record);
    free(e);
}

/* Builds "<prefix>{<skey>}" into a fresh buffer; caller frees. */
static char *mem_key(const struct store_memory_shared *sh, const char *skey, size_t skey_len,
                     size_t *out_len)
{
    size_t n = sh->prefix_len + skey_len + 2;
    char *k = mem_alloc(n);
    memcpy(k, sh->prefix, sh->prefix_len);
    k[sh->prefix_len] = '{';
    memcpy(k + sh->prefix_len + 1, skey, skey_len);
    k[n - 1] = '}';
    *out_len = n;
    return k;
}

static void mem_grow(struct store_memory_shared *sh)
{
    size_t n = sh->nbuckets * 2;
    struct mem_entry **nb = mem_alloc(n * sizeof(*nb));
    for (size_t i = 0; i < sh->nbuckets; i++) {
        struct mem_entry *e = sh->buckets[i];
        while (e) {
            struct mem_entry *next = e->next;
            size_t j = (size_t)e->hash & (n - 1);
            e->next = nb[j];
            nb[j] = e;
            e = next;
        }
    }
    free(sh->buckets);
    sh->buckets = nb;
    sh->nbuckets = n;
    sh->sweep_pos = 0;
}

/* Removes the expired entries of one bucket. */
static void mem_purge_bucket(struct store_memory_shared *sh, size_t i, uint64_t now)
{
    struct mem_entry **pp = &sh->buckets[i];
    while (*pp) {
        struct mem_entry *e = *pp;
        if (e->expires_ms <= now) {
            *pp = e->next;
            mem_entry_free(e);
            sh->count--;
        } else {
            pp = &e->next;
        }
    }
}

static void mem_sweep(struct store_memory_shared *sh, uint64_t now)
{
    for (int k = 0; k < MEM_SWEEP_BUCKETS; k++) {
        mem_purge_bucket(sh, sh->sweep_pos, now);
        sh->sweep_pos = (sh->sweep_pos + 1) & (sh->nbuckets - 1);
    }
}

/* The live entry for key, or NULL (an expired one is purged first). */
static struct mem_entry *mem_find(struct store_memory_shared *sh, const char *key, size_t len,
                                  uint64_t h, uint64_t now)
{
    size_t i = (size_t)h & (sh->nbuckets - 1);
    mem_purge_bucket(sh, i, now);
    for (struct mem_entry *e = sh->buckets[i]; e; e = e->next)
        if (e->hash == h && e->key_len == len && memcmp(e->key, key, len) == 0) return e;
    return NULL;
}

static void mem_remove(struct store_memory_shared *sh, struct mem_entry *victim)
{
    struct mem_entry **pp = &sh->buckets[(size_t)victim->hash & (sh->nbuckets - 1)];
    while (*pp != victim)
        pp = &(*pp)->next;
    *pp = victim->next;
    mem_entry_free(victim);
    sh->count--;
}

static struct mem_entry *mem_insert(struct store_memory_shared *sh, const char *key, size_t len,
                                    uint64_t h)
{
    if (sh->count + 1 > sh->nbuckets - sh->nbuckets / 4) mem_grow(sh);
    struct mem_entry *e = mem_alloc(sizeof(*e) + len);
    e->hash = h;
    e->key_len = len;
    memcpy(e->key, key, len);
    size_t i = (size_t)h & (sh->nbuckets - 1);
    e->next = sh->buckets[i];
    sh->buckets[i] = e;
    sh->count++;
    return e;
}

struct store_memory_shared *store_memory_shared_new(const char *key_prefix)
{
    struct store_memory_shared *sh = mem_alloc(sizeof(*sh));
    if (pthread_mutex_init(&sh->mu, NULL) != 0) abort();
    const char *p = key_prefix ? key_prefix : "";
    sh->prefix_len = strlen(p);
    sh->prefix = mem_alloc(sh->prefix_len + 1);
    memcpy(sh->prefix, p, sh->prefix_len);
    sh->nbuckets = MEM_INITIAL_BUCKETS;
    sh->buckets = mem_alloc(sh->nbuckets * sizeof(*sh->buckets));
    return sh;
}

void store_memory_shared_free(struct store_memory_shared *sh)
{
    if (!sh) return;
    for (size_t i = 0; i < sh->nbuckets; i++) {
        struct mem_entry *e = sh->buckets[i];
        while (e) {
            struct mem_entry *next = e->next;
            mem_entry_free(e);
            e = next;
        }
    }
    free(sh->buckets);
    free(sh->prefix);
    pthread_mutex_destroy(&sh->mu);
    free(sh);
}

/* ---- deferred callbacks ---- */

static void mem_op_unlink(struct mem_op *op)
{
    struct store_memory *s = op->s;
    if (op->prev)
        op->prev->next = op->next;
    else
        s->ops = op->next;
    if (op->next) op->next->prev = op->prev;
    op->prev = op->next = NULL;
}

static void mem_op_free(struct mem_op *op)
{
    if (op->ev) event_free(op->ev);
    free(op->record);
    free(op);
}

static void mem_op_fire(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    struct mem_op *op = arg;
    /* Unlinked first, so that a store_free from inside the callback does
     * not see (and free) the op that is running. */
    mem_op_unlink(op);
    if (op->is_acquire)
        op->acq_cb(op->arg, &op->reply);
    else
        op->done_cb(op->arg, op->status);
    mem_op_free(op);
}

static struct mem_op *mem_op_new(struct store_memory *s)
{
    struct mem_op *op = mem_alloc(sizeof(*op));
    op->s = s;
    op->ev = event_new(s->evb, -1, 0, mem_op_fire, op);
    if (!op->ev) abort();
    return op;
}

/* Queues op's callback for the next turn of the loop. */
static void mem_op_defer(struct mem_op *op)
{
    struct store_memory *s = op->s;
    op->next = s->ops;
    if (s->ops) s->ops->prev = op;
    s->ops = op;
    event_active(op->ev, EV_TIMEOUT, 1);
}

/* ---- operations ---- */

static struct mem_entry *mem_lookup_locked(struct store_memory_shared *sh, const char *skey,
                                           size_t skey_len, char **key, size_t *key_len,
                                           uint64_t *h, uint64_t now)
{
    *key = mem_key(sh, skey, skey_len, key_len);
    *h = XXH3_64bits(*key, *key_len);
    mem_sweep(sh, now);
    return mem_find(sh, *key, *key_len, *h, now);
}

/* The acquire decision, the same table as the Redis script. */
static void mem_acquire_locked(struct store_memory_shared *sh, struct mem_op *op, const char *skey,
                               size_t skey_len, const uint8_t *fp, const char *token,
                               uint32_t lock_ms)
{
    uint64_t now = mem_now_ms(), h;
    char *key;
    size_t key_len;
    struct mem_entry *e = mem_lookup_locked(sh, skey, skey_len, &key, &key_len, &h, now);
    if (!e) {
        e = mem_insert(sh, key, key_len, h);
        memcpy(e->token, token, STORE_TOKEN_LEN);
        memcpy(e->fp, fp, STORE_FP_LEN);
        e->expires_ms = now + lock_ms;
        op->reply.state = STORE_ACQ_LOCKED;
    } else if (memcmp(e->fp, fp, STORE_FP_LEN) != 0) {
        op->reply.state = STORE_ACQ_MISMATCH;
    } else if (!e->completed) {
        op->reply.state = STORE_ACQ_IN_PROGRESS;
    } else {
        op->reply.state = STORE_ACQ_COMPLETED;
        op->record = mem_alloc(e->record_len);
        memcpy(op->record, e->record, e->record_len);
        op->reply.record = op->record;
        op->reply.record_len = e->record_len;
    }
    free(key);
}

static void mem_acquire(struct store *base, const char *skey, size_t skey_len,
                        const uint8_t fp[STORE_FP_LEN], const char token[STORE_TOKEN_LEN],
                        uint32_t lock_ms, store_acquire_cb cb, void *arg)
{
    struct store_memory *s = (struct store_memory *)base;
    struct mem_op *op = mem_op_new(s);
    op->is_acquire = true;
    op->acq_cb = cb;
    op->arg = arg;
    pthread_mutex_lock(&s->sh->mu);
    mem_acquire_locked(s->sh, op, skey, skey_len, fp, token, lock_ms);
    pthread_mutex_unlock(&s->sh->mu);
    mem_op_defer(op);
}

enum mem_owned_action { MEM_COMPLETE, MEM_RELEASE, MEM_RENEW };

/* complete / release / renew: each acts only on an in-progress entry that
 * the token owns; returns 1 when it acted, 0 otherwise. */
static int mem_owned_locked(struct store_memory_shared *sh, enum mem_owned_action action,
                            const char *skey, size_t skey_len, const char *token,
                            const uint8_t *record, size_t record_len, uint64_t expire_after_ms)
{
    uint64_t now = mem_now_ms(), h;
    char *key;
    size_t key_len;
    struct mem_entry *e = mem_lookup_locked(sh, skey, skey_len, &key, &key_len, &h, now);
    free(key);
    if (!e || e->completed || memcmp(e->token, token, STORE_TOKEN_LEN) != 0) return 0;
    switch (action) {
    case MEM_COMPLETE:
        e->completed = true;
        memset(e->token, 0, sizeof(e->token));
        e->record = mem_alloc(record_len);
        if (record_len) memcpy(e->record, record, record_len);
        e->record_len = record_len;
        e->expires_ms = now + expire_after_ms;
        break;
    case MEM_RELEASE:
        mem_remove(sh, e);
        break;
    case MEM_RENEW:
        e->expires_ms = now + expire_after_ms;
        break;
    }
    return 1;
}

static void mem_owned(struct store_memory *s, enum mem_owned_action action, const char *skey,
                      size_t skey_len, const char *token, const uint8_t *record, size_t record_len,
                      uint64_t expire_after_ms, store_done_cb cb, void *arg)
{
    struct mem_op *op = mem_op_new(s);
    op->done_cb = cb;
    op->arg = arg;
    pthread_mutex_lock(&s->sh->mu);
    op->status =
        mem_owned_locked(s->sh, action, skey, skey_len, token, record, record_len, expire_after_ms);
    pthread_mutex_unlock(&s->sh->mu);
    mem_op_defer(op);
}

static void mem_complete(struct store *base, const char *skey, size_t skey_len,
                         const char token[STORE_TOKEN_LEN], const uint8_t *record,
                         size_t record_len, uint32_t ttl_seconds, store_done_cb cb, void *arg)
{
    mem_owned((struct store_memory *)base, MEM_COMPLETE, skey, skey_len, token, record, record_len,
              (uint64_t)ttl_seconds * 1000u, cb, arg);
}

static void mem_release(struct store *base, const char *skey, size_t skey_len,
                        const char token[STORE_TOKEN_LEN], store_done_cb cb, void *arg)
{
    mem_owned((struct store_memory *)base, MEM_RELEASE, skey, skey_len, token, NULL, 0, 0, cb, arg);
}

static void mem_renew(struct store *base, const char *skey, size_t skey_len,
                      const char token[STORE_TOKEN_LEN], uint32_t lock_ms, store_done_cb cb,
                      void *arg)
{
    mem_owned((struct store_memory *)base, MEM_RENEW, skey, skey_len, token, NULL, 0, lock_ms, cb,
              arg);
}

static void mem_ping(struct store *base, store_done_cb cb, void *arg)
{
    struct store_memory *s = (struct store_memory *)base;
    struct mem_op *op = mem_op_new(s);
    op->done_cb = cb;
    op->arg = arg;
    op->status = 1;
    mem_op_defer(op);
}

/* Pending callbacks are dropped; one that is running right now (store_free
 * called from inside it) is no longer listed and mem_op_fire frees it. */
static void mem_free(struct store *base)
{
    struct store_memory *s = (struct store_memory *)base;
    struct mem_op *op = s->ops;
    while (op) {
        struct mem_op *next = op->next;
        mem_op_free(op);
        op = next;
    }
    free(s);
}

static const struct store_ops mem_ops = {
    .name = "memory",
    .acquire = mem_acquire,
    .complete = mem_complete,
    .release = mem_release,
    .renew = mem_renew,
    .ping = mem_ping,
    .free = mem_free,
};

struct store *store_memory_new(struct event_base *base, struct store_memory_shared *sh,
                               int timeout_ms)
{
    struct store_memory *s = mem_alloc(sizeof(*s));
    s->base.ops = &mem_ops;
    s->evb = base;
    s->sh = sh;
    /* Kept for parity with the Redis backend: every answer here is
     * immediate, so the deadline can never be reached. */
    s->timeout_ms = timeout_ms;
    return &s->base;
}
