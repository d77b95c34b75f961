/* store_memory.c — the in-process backend of the store (store.h).
 *
 * Owns one process-wide hash table (struct store_memory_shared, guarded by
 * a mutex because every worker thread touches it) and, per worker, a small
 * struct that answers on that worker's event_base. Each operation runs to
 * completion under the mutex (the same atomicity the Redis scripts give),
 * copies its answer, and hands it to the caller later through a zero-delay
 * event, so callbacks never fire from inside the call that started them.
 *
 * Memory is bounded by max_bytes, counted honestly: every entry is charged
 * its struct, its key, its record and the allocator's per-chunk overhead,
 * and the bucket arrays are charged too. When an insert or a completion
 * would go over, completed records are evicted oldest completion first
 * (a FIFO list, O(1) per eviction); in-progress locks are never evicted,
 * and when only locks are left the operation fails (STORE_ACQ_ERROR / -1).
 *
 * No operation ever does work proportional to the table: expiry is lazy on
 * lookup, plus a bounded sweep of a few buckets per operation and a bounded
 * slice on each store's periodic timer; the table grows and shrinks by
 * incremental rehashing (as Redis's dict does), a few buckets per step. */
#include "idemgate/store.h"

#include "idemgate/log.h"

#include <event2/event.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <xxhash.h>

#define MEM_INITIAL_BUCKETS 64
/* Bounded work per operation. */
#define MEM_OP_SWEEP 4  /* buckets swept for expired entries */
#define MEM_OP_REHASH 4 /* buckets moved by an ongoing rehash */
#define MEM_OP_POP 4    /* expired records taken off the oldest end */
/* Bounded work per timer tick of each worker's store. */
#define MEM_TICK_MS 100
#define MEM_TICK_SWEEP 1024
#define MEM_TICK_REHASH 256
#define MEM_TICK_POP 256
/* Extra buckets swept before refusing an insert when only locks are left:
 * some of them may be dead. */
#define MEM_FULL_SWEEP 64
/* glibc malloc's chunk header and rounding, charged per entry. */
#define MEM_MALLOC_OVERHEAD 16
#define MEM_WARN_EVERY_MS 10000

/* One (scope, key): in progress {token, fp} or completed {fp, record}. */
struct mem_entry {
    struct mem_entry *next;          /* bucket chain */
    struct mem_entry **pprev;        /* the pointer to this entry in its chain */
    struct mem_entry *older, *newer; /* completed only: the eviction FIFO */
    uint64_t hash;
    uint64_t expires_ms; /* monotonic */
    size_t key_len;
    size_t record_len;
    bool completed;
    char token[STORE_TOKEN_LEN];
    uint8_t fp[STORE_FP_LEN];
    char data[]; /* the key "<prefix>{<skey>}", then the record */
};

struct mem_table {
    struct mem_entry **b;
    size_t size; /* a power of two, or 0 when unused */
};

struct store_memory_shared {
    pthread_mutex_t mu;
    char *prefix;
    size_t prefix_len;
    uint64_t max_bytes; /* 0: no limit */
    /* ht[1] is used only while rehashing: buckets of ht[0] below
     * rehash_idx have been moved there, and new entries go there. */
    struct mem_table ht[2];
    bool rehashing;
    size_t rehash_idx;
    size_t sweep_pos;
    struct mem_entry *oldest, *newest; /* completed entries by completion */
    size_t count, n_completed;
    uint64_t entry_bytes;
    uint64_t evictions, expired, refused;
    uint64_t evict_logged_ms, refuse_logged_ms; /* 0: never */
    char *kbuf; /* the full key of the operation in hand (under mu) */
    size_t kbuf_cap;
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
    struct event *tick; /* the periodic bounded reclaim */
    struct mem_op *ops; /* pending callbacks */
    /* Finished ops kept with their event for the next operations: no
     * malloc and no event_new per operation. */
    struct mem_op *free_ops;
    unsigned n_free_ops;
    int firing; /* callbacks running: store_free then waits for them */
    bool dead;  /* store_free was called from inside a callback */
};

#define MEM_OP_CACHE 64

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

/* ---- accounting (callers hold sh->mu) ---- */

static uint64_t mem_entry_cost(size_t key_len, size_t record_len)
{
    return sizeof(struct mem_entry) + key_len + record_len + MEM_MALLOC_OVERHEAD;
}

static uint64_t mem_table_bytes(const struct store_memory_shared *sh)
{
    return (uint64_t)(sh->ht[0].size + sh->ht[1].size) * sizeof(struct mem_entry *);
}

static uint64_t mem_total_bytes(const struct store_memory_shared *sh)
{
    return sh->entry_bytes + mem_table_bytes(sh);
}

/* ---- chains and the eviction FIFO ---- */

static void mem_chain_push(struct mem_entry **head, struct mem_entry *e)
{
    e->next = *head;
    if (*head) (*head)->pprev = &e->next;
    *head = e;
    e->pprev = head;
}

static void mem_chain_unlink(struct mem_entry *e)
{
    *e->pprev = e->next;
    if (e->next) e->next->pprev = e->pprev;
    e->next = NULL;
    e->pprev = NULL;
}

static void mem_fifo_push(struct store_memory_shared *sh, struct mem_entry *e)
{
    e->older = sh->newest;
    e->newer = NULL;
    if (sh->newest)
        sh->newest->newer = e;
    else
        sh->oldest = e;
    sh->newest = e;
}

static void mem_fifo_unlink(struct store_memory_shared *sh, struct mem_entry *e)
{
    if (e->older)
        e->older->newer = e->newer;
    else
        sh->oldest = e->newer;
    if (e->newer)
        e->newer->older = e->older;
    else
        sh->newest = e->older;
    e->older = e->newer = NULL;
}

/* Removes e from the table (and the FIFO) and frees it. */
static void mem_drop(struct store_memory_shared *sh, struct mem_entry *e)
{
    mem_chain_unlink(e);
    if (e->completed) {
        mem_fifo_unlink(sh, e);
        sh->n_completed--;
    }
    sh->count--;
    sh->entry_bytes -= mem_entry_cost(e->key_len, e->record_len);
    free(e);
}

static void mem_expire(struct store_memory_shared *sh, struct mem_entry *e)
{
    mem_drop(sh, e);
    sh->expired++;
}

/* ---- incremental rehash and expiry (callers hold sh->mu) ---- */

static struct mem_table *mem_live(struct store_memory_shared *sh)
{
    return sh->rehashing ? &sh->ht[1] : &sh->ht[0];
}

static void mem_purge_chain(struct store_memory_shared *sh, struct mem_entry **head, uint64_t now)
{
    struct mem_entry *e = *head;
    while (e) {
        struct mem_entry *next = e->next;
        if (e->expires_ms <= now) mem_expire(sh, e);
        e = next;
    }
}

/* Moves one bucket of ht[0] into ht[1], dropping the dead on the way. */
static void mem_move_bucket(struct store_memory_shared *sh, struct mem_entry **head, uint64_t now)
{
    struct mem_table *to = &sh->ht[1];
    struct mem_entry *e = *head;
    while (e) {
        struct mem_entry *next = e->next;
        if (e->expires_ms <= now) {
            mem_expire(sh, e);
        } else {
            mem_chain_unlink(e);
            mem_chain_push(&to->b[e->hash & (to->size - 1)], e);
        }
        e = next;
    }
}

static void mem_rehash_finish(struct store_memory_shared *sh)
{
    free(sh->ht[0].b);
    sh->ht[0] = sh->ht[1];
    sh->ht[1].b = NULL;
    sh->ht[1].size = 0;
    sh->rehashing = false;
    sh->sweep_pos = 0;
}

/* Moves up to n non-empty buckets, visiting at most 10 n empty ones. */
static void mem_rehash_step(struct store_memory_shared *sh, size_t n, uint64_t now)
{
    if (!sh->rehashing) return;
    size_t empty_left = n * 10;
    struct mem_table *from = &sh->ht[0];
    while (n > 0 && sh->rehash_idx < from->size) {
        struct mem_entry **head = &from->b[sh->rehash_idx++];
        if (*head) {
            mem_move_bucket(sh, head, now);
            n--;
        } else if (--empty_left == 0) {
            break;
        }
    }
    if (sh->rehash_idx >= from->size) mem_rehash_finish(sh);
}

static void mem_rehash_start(struct store_memory_shared *sh, size_t size)
{
    sh->ht[1].b = mem_alloc(size * sizeof(struct mem_entry *));
    sh->ht[1].size = size;
    sh->rehashing = true;
    sh->rehash_idx = 0;
}

static void mem_sweep(struct store_memory_shared *sh, size_t n, uint64_t now);

static void mem_warn(uint64_t *last_ms, uint64_t now, const char *msg, uint64_t max_bytes)
{
    if (*last_ms && now - *last_ms < MEM_WARN_EVERY_MS) return;
    *last_ms = now;
    log_msg(LOG_WARN, "memory store: %s (memory.max_bytes %llu)", msg,
            (unsigned long long)max_bytes);
}

/* True when need more bytes fit under max_bytes, after evicting completed
 * records (oldest completion first; never a lock) and, if that was not
 * enough, sweeping a few more buckets for dead locks. */
static bool mem_evict_for(struct store_memory_shared *sh, uint64_t need, uint64_t now)
{
    if (!sh->max_bytes) return true;
    bool evicted = false;
    while (mem_total_bytes(sh) + need > sh->max_bytes && sh->oldest) {
        struct mem_entry *e = sh->oldest;
        if (e->expires_ms <= now) {
            mem_expire(sh, e);
        } else {
            mem_drop(sh, e);
            sh->evictions++;
            evicted = true;
        }
    }
    if (evicted)
        mem_warn(&sh->evict_logged_ms, now, "full, evicting the oldest completed records",
                 sh->max_bytes);
    if (mem_total_bytes(sh) + need <= sh->max_bytes) return true;
    mem_sweep(sh, MEM_FULL_SWEEP, now);
    return mem_total_bytes(sh) + need <= sh->max_bytes;
}

/* Grows past 3/4 full; shrinks below 1/8 full (to at most 1/2 full), so
 * that churn never leaves a huge, mostly empty table behind. The new
 * bucket array is charged like everything else: when only locks are left
 * and it does not fit, the table stays as it is (longer chains, still
 * correct) rather than going over max_bytes. */
static void mem_maybe_resize(struct store_memory_shared *sh, uint64_t now)
{
    if (sh->rehashing) return;
    size_t size = sh->ht[0].size;
    if (sh->count > size - size / 4) {
        if (mem_evict_for(sh, (uint64_t)size * 2 * sizeof(struct mem_entry *), now))
            mem_rehash_start(sh, size * 2);
    } else if (size > MEM_INITIAL_BUCKETS && sh->count < size / 8) {
        size_t target = MEM_INITIAL_BUCKETS;
        while (target < sh->count * 2)
            target *= 2;
        if (target < size) mem_rehash_start(sh, target);
    }
}

static void mem_sweep(struct store_memory_shared *sh, size_t n, uint64_t now)
{
    struct mem_table *t = mem_live(sh);
    for (size_t k = 0; k < n && k < t->size; k++) {
        sh->sweep_pos &= t->size - 1;
        mem_purge_chain(sh, &t->b[sh->sweep_pos], now);
        sh->sweep_pos++;
    }
}

/* Expired records at the oldest end of the FIFO: with one TTL for all
 * routes, completion order is expiry order and this finds them all. */
static void mem_pop_expired(struct store_memory_shared *sh, size_t n, uint64_t now)
{
    while (n-- > 0 && sh->oldest && sh->oldest->expires_ms <= now)
        mem_expire(sh, sh->oldest);
}

static void mem_maintain(struct store_memory_shared *sh, uint64_t now, size_t rehash, size_t sweep,
                         size_t pop)
{
    mem_rehash_step(sh, rehash, now);
    mem_sweep(sh, sweep, now);
    mem_pop_expired(sh, pop, now);
    mem_maybe_resize(sh, now);
}

/* ---- lookups and room (callers hold sh->mu) ---- */

/* Builds "<prefix>{<skey>}" into a fresh buffer; caller frees. */
static char *mem_key(struct store_memory_shared *sh, const char *skey, size_t skey_len,
                     size_t *out_len)
{
    size_t n = sh->prefix_len + skey_len + 2;
    /* One scratch per table, used only under the mutex: no malloc per op. */
    if (n > sh->kbuf_cap) {
        free(sh->kbuf);
        sh->kbuf_cap = n < 512 ? 512 : n;
        sh->kbuf = mem_alloc(sh->kbuf_cap);
    }
    char *k = sh->kbuf;
    memcpy(k, sh->prefix, sh->prefix_len);
    k[sh->prefix_len] = '{';
    memcpy(k + sh->prefix_len + 1, skey, skey_len);
    k[n - 1] = '}';
    *out_len = n;
    return k;
}

/* The live entry for key, or NULL (an expired one is dropped first). */
static struct mem_entry *mem_find(struct store_memory_shared *sh, const char *key, size_t len,
                                  uint64_t h, uint64_t now)
{
    for (int t = 0; t < (sh->rehashing ? 2 : 1); t++) {
        struct mem_table *tab = &sh->ht[t];
        for (struct mem_entry *e = tab->b[h & (tab->size - 1)]; e; e = e->next) {
            if (e->hash != h || e->key_len != len || memcmp(e->data, key, len) != 0) continue;
            if (e->expires_ms > now) return e;
            mem_expire(sh, e);
            return NULL;
        }
    }
    return NULL;
}

/* Makes room for need more bytes: evicts completed records, oldest
 * completion first; never a lock. -1 when only locks are left. */
static int mem_make_room(struct store_memory_shared *sh, uint64_t need, uint64_t now)
{
    if (mem_evict_for(sh, need, now)) return 0;
    sh->refused++;
    mem_warn(&sh->refuse_logged_ms, now, "full of in-progress locks, refusing new keys",
             sh->max_bytes);
    return -1;
}

/* A new lock for key; NULL when there is no room for it. */
static struct mem_entry *mem_insert(struct store_memory_shared *sh, const char *key, size_t len,
                                    uint64_t h, uint64_t now)
{
    uint64_t cost = mem_entry_cost(len, 0);
    if (mem_make_room(sh, cost, now) < 0) return NULL;
    struct mem_entry *e = mem_alloc(sizeof(*e) + len);
    e->hash = h;
    e->key_len = len;
    memcpy(e->data, key, len);
    struct mem_table *t = mem_live(sh);
    mem_chain_push(&t->b[h & (t->size - 1)], e);
    sh->count++;
    sh->entry_bytes += cost;
    return e;
}

/* Turns the lock e into a completed record; the entry is reallocated to
 * hold the record after its key, at the same place in its chain. Returns
 * 0, or -1 when there is no room (e is then left as it was: a lock). */
static int mem_store_record(struct store_memory_shared *sh, struct mem_entry *e,
                            const uint8_t *record, size_t record_len, uint64_t expires_ms,
                            uint64_t now)
{
    /* e is a live lock: neither eviction (completed only) nor the sweep
     * (expired only) can take it while room is made. */
    if (mem_make_room(sh, record_len, now) < 0) return -1;
    struct mem_entry **pprev = e->pprev;
    size_t key_len = e->key_len;
    mem_chain_unlink(e);
    struct mem_entry *n = realloc(e, sizeof(*n) + key_len + record_len);
    if (!n) abort();
    mem_chain_push(pprev, n);
    if (record_len) memcpy(n->data + key_len, record, record_len);
    n->record_len = record_len;
    n->completed = true;
    memset(n->token, 0, sizeof(n->token));
    n->expires_ms = expires_ms;
    mem_fifo_push(sh, n);
    sh->n_completed++;
    sh->entry_bytes += record_len;
    return 0;
}

struct store_memory_shared *store_memory_shared_new(const char *key_prefix, uint64_t max_bytes)
{
    struct store_memory_shared *sh = mem_alloc(sizeof(*sh));
    if (pthread_mutex_init(&sh->mu, NULL) != 0) abort();
    const char *p = key_prefix ? key_prefix : "";
    sh->prefix_len = strlen(p);
    sh->prefix = mem_alloc(sh->prefix_len + 1);
    memcpy(sh->prefix, p, sh->prefix_len);
    sh->max_bytes = max_bytes;
    sh->ht[0].size = MEM_INITIAL_BUCKETS;
    sh->ht[0].b = mem_alloc(MEM_INITIAL_BUCKETS * sizeof(struct mem_entry *));
    return sh;
}

void store_memory_shared_free(struct store_memory_shared *sh)
{
    if (!sh) return;
    free(sh->kbuf);
    for (int t = 0; t < 2; t++) {
        for (size_t i = 0; i < sh->ht[t].size; i++) {
            struct mem_entry *e = sh->ht[t].b[i];
            while (e) {
                struct mem_entry *next = e->next;
                free(e);
                e = next;
            }
        }
        free(sh->ht[t].b);
    }
    free(sh->prefix);
    pthread_mutex_destroy(&sh->mu);
    free(sh);
}

void store_memory_shared_stats(struct store_memory_shared *sh, struct store_memory_stats *out)
{
    pthread_mutex_lock(&sh->mu);
    out->max_bytes = sh->max_bytes;
    out->bytes = mem_total_bytes(sh);
    out->entry_bytes = sh->entry_bytes;
    out->entries = sh->count;
    out->completed = sh->n_completed;
    out->locks = sh->count - sh->n_completed;
    out->buckets = sh->ht[0].size + sh->ht[1].size;
    out->evictions = sh->evictions;
    out->expired = sh->expired;
    out->refused = sh->refused;
    pthread_mutex_unlock(&sh->mu);
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

/* Back to the cache (its event stays assigned to this op), or freed. */
static void mem_op_recycle(struct mem_op *op)
{
    struct store_memory *s = op->s;
    if (s->n_free_ops >= MEM_OP_CACHE) {
        mem_op_free(op);
        return;
    }
    free(op->record);
    struct event *ev = op->ev;
    memset(op, 0, sizeof(*op));
    op->s = s;
    op->ev = ev;
    op->next = s->free_ops;
    s->free_ops = op;
    s->n_free_ops++;
}

static void mem_store_destroy(struct store_memory *s)
{
    while (s->free_ops) {
        struct mem_op *op = s->free_ops;
        s->free_ops = op->next;
        mem_op_free(op);
    }
    event_free(s->tick);
    free(s);
}

static void mem_op_fire(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    struct mem_op *op = arg;
    /* Unlinked first, so that a store_free from inside the callback does
     * not see (and free) the op that is running. */
    mem_op_unlink(op);
    struct store_memory *s = op->s;
    s->firing++;
    if (op->is_acquire)
        op->acq_cb(op->arg, &op->reply);
    else
        op->done_cb(op->arg, op->status);
    s->firing--;
    if (s->dead) {
        mem_op_free(op);
        if (s->firing == 0) mem_store_destroy(s);
        return;
    }
    mem_op_recycle(op);
}

static struct mem_op *mem_op_new(struct store_memory *s)
{
    struct mem_op *op = s->free_ops;
    if (op) {
        s->free_ops = op->next;
        s->n_free_ops--;
        op->next = NULL;
        return op;
    }
    op = mem_alloc(sizeof(*op));
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
    mem_maintain(sh, now, MEM_OP_REHASH, MEM_OP_SWEEP, MEM_OP_POP);
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
        e = mem_insert(sh, key, key_len, h, now);
        if (!e) {
            op->reply.state = STORE_ACQ_ERROR;
        } else {
            memcpy(e->token, token, STORE_TOKEN_LEN);
            memcpy(e->fp, fp, STORE_FP_LEN);
            e->expires_ms = now + lock_ms;
            op->reply.state = STORE_ACQ_LOCKED;
        }
    } else if (memcmp(e->fp, fp, STORE_FP_LEN) != 0) {
        op->reply.state = STORE_ACQ_MISMATCH;
    } else if (!e->completed) {
        op->reply.state = STORE_ACQ_IN_PROGRESS;
    } else {
        op->reply.state = STORE_ACQ_COMPLETED;
        op->record = mem_alloc(e->record_len);
        memcpy(op->record, e->data + e->key_len, e->record_len);
        op->reply.record = op->record;
        op->reply.record_len = e->record_len;
    }
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
 * the token owns; returns 1 when it acted, 0 otherwise, -1 when a record
 * does not fit (the lock is then kept until it expires, as when Redis
 * fails to store one). */
static int mem_owned_locked(struct store_memory_shared *sh, enum mem_owned_action action,
                            const char *skey, size_t skey_len, const char *token,
                            const uint8_t *record, size_t record_len, uint64_t expire_after_ms)
{
    uint64_t now = mem_now_ms(), h;
    char *key;
    size_t key_len;
    struct mem_entry *e = mem_lookup_locked(sh, skey, skey_len, &key, &key_len, &h, now);
    if (!e || e->completed || memcmp(e->token, token, STORE_TOKEN_LEN) != 0) return 0;
    switch (action) {
    case MEM_COMPLETE:
        if (mem_store_record(sh, e, record, record_len, now + expire_after_ms, now) < 0) return -1;
        break;
    case MEM_RELEASE:
        mem_drop(sh, e);
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
    s->ops = NULL;
    if (s->firing > 0) {
        s->dead = true; /* freed when the running callback returns */
        return;
    }
    mem_store_destroy(s);
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

/* Reclaims a bounded slice even when no request comes, so that an idle
 * instance gives back the memory of its expired records. */
static void mem_tick(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    struct store_memory_shared *sh = ((struct store_memory *)arg)->sh;
    pthread_mutex_lock(&sh->mu);
    mem_maintain(sh, mem_now_ms(), MEM_TICK_REHASH, MEM_TICK_SWEEP, MEM_TICK_POP);
    pthread_mutex_unlock(&sh->mu);
}

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
    s->tick = event_new(base, -1, EV_PERSIST, mem_tick, s);
    if (!s->tick) abort();
    struct timeval tv = {0, MEM_TICK_MS * 1000};
    event_add(s->tick, &tv);
    return &s->base;
}
