/* store_memory.c — the in-process backend of the store (store.h).
 *
 * Owns one process-wide table (struct store_memory_shared, guarded by a
 * mutex because every worker thread touches it) and, per worker, a small
 * struct that answers on that worker's event_base. Each operation runs to
 * completion under the mutex (the same atomicity the Redis scripts give),
 * copies its answer, and hands it to the caller later through a zero-delay
 * event, so callbacks never fire from inside the call that started them.
 *
 *   store_memory_shared
 *     keys:   dict  "<prefix>{<scope>:<key>}" -> mem_entry (lock or record)
 *     scopes: dict  "<scope>" -> mem_scope, which every entry points to:
 *             the bytes charged to that scope and its completed records,
 *             oldest completion first (a FIFO)
 *     heap:   the scopes holding a completed record, by bytes (max-heap;
 *             each scope knows its index)
 *     oldest/newest: every completed record, by completion (for expiry)
 *
 * Memory is bounded and counted honestly: every entry is charged its
 * struct, its key, its record and the allocator's per-chunk overhead, to
 * the store and to its scope; a scope's own struct is charged to it; the
 * bucket arrays and the heap are charged to the store. Room is made, for a
 * new lock or a record, in this order: past max_scope_bytes a scope loses
 * its own oldest completed records; past max_bytes the scope at the top of
 * the heap (the most bytes) loses its oldest completed record, again and
 * again. Locks are never evicted: when the locks alone leave no room, the
 * operation fails (STORE_ACQ_ERROR / -1) and nothing is evicted for it. A
 * scope holding nothing is freed at once, so invented credentials leave no
 * bookkeeping behind.
 *
 * Both dicts hash with SipHash-1-3 under a random key drawn at creation,
 * so a client cannot choose keys (or credentials) that share a bucket and
 * hold the mutex for long chains.
 *
 * No operation ever does work proportional to the table: expiry is lazy on
 * lookup, plus a bounded sweep of a few buckets per operation and a bounded
 * slice on each store's periodic timer; the dicts grow and shrink by
 * incremental rehashing (as Redis's dict does), a few buckets per step; the
 * heap grows by fixed chunks and each eviction costs O(log scopes). */
#include "idemgate/store/store.h"

#include "idemgate/core/clock.h"

#include "idemgate/core/log.h"
#include "idemgate/core/metrics.h"
#include "idemgate/core/siphash.h"

#include <event2/event.h>
#include <openssl/rand.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

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
/* glibc malloc's chunk header and rounding, charged per allocation. */
#define MEM_MALLOC_OVERHEAD 16
#define MEM_WARN_EVERY_MS 10000
/* The heap of scopes lives in chunks of this many slots (4 KiB), so that
 * it grows without ever copying itself. */
#define MEM_HEAP_SHIFT 9
#define MEM_HEAP_CHUNK ((size_t)1 << MEM_HEAP_SHIFT)
#define MEM_HEAP_DIR_MIN 8
#define MEM_NOT_IN_HEAP ((size_t)-1)

/* A link in a chain of either dict. */
struct mem_node {
    struct mem_node *next;
    struct mem_node **pprev; /* the pointer to this node in its chain */
    uint64_t hash;
};

struct mem_table {
    struct mem_node **b;
    size_t size; /* a power of two, or 0 when unused */
};

/* A hash table of mem_nodes, resized by incremental rehashing: ht[1] is
 * used only while rehashing; buckets of ht[0] below rehash_idx have been
 * moved there, and new nodes go there. */
struct mem_dict {
    struct mem_table ht[2];
    bool rehashing;
    size_t rehash_idx;
    size_t count;
};

struct mem_scope;

/* One (scope, key): in progress {token, fp} or completed {fp, record}. */
struct mem_entry {
    struct mem_node node;    /* first: in sh->keys */
    struct mem_scope *scope; /* charged for it; never NULL */
    uint64_t expires_ms;     /* monotonic */
    size_t key_len;
    size_t record_len;
    uint8_t fp[STORE_FP_LEN];
    union {
        char token[STORE_TOKEN_LEN]; /* in progress: the owner */
        struct {
            struct mem_entry *older, *newer;     /* all completed records */
            struct mem_entry *s_older, *s_newer; /* its scope's */
        } q;                                     /* completed: the FIFOs */
    } u;
    bool completed;
    char data[]; /* the key "<prefix>{<skey>}", then the record */
};

/* One scope (the part of an skey before its first ':'), while it holds an
 * entry. */
struct mem_scope {
    struct mem_node node;              /* first: in sh->scopes */
    uint64_t bytes;                    /* charged: its entries and this struct */
    uint64_t done_bytes;               /* of which its completed entries */
    struct mem_entry *oldest, *newest; /* its completed records, by completion */
    size_t entries;                    /* locks + completed */
    size_t heap_idx;                   /* in sh->heap, or MEM_NOT_IN_HEAP */
    size_t name_len;
    char name[];
};

/* Max-heap of the scopes that hold a completed record, by bytes. */
struct mem_heap {
    struct mem_scope ***chunks; /* n_chunks of MEM_HEAP_CHUNK slots */
    size_t n_chunks, dir_cap;
    size_t len;
};

struct store_memory_shared {
    pthread_mutex_t mu;
    char *prefix;
    size_t prefix_len;
    uint64_t max_bytes;       /* 0: no limit */
    uint64_t max_scope_bytes; /* 0: no limit of its own */
    uint8_t seed[SIPHASH_KEY_LEN];
    struct mem_dict keys, scopes;
    struct mem_heap heap; /* slots for every scope in `scopes` */
    size_t sweep_pos;
    struct mem_entry *oldest, *newest; /* completed entries by completion */
    struct mem_scope *pinned;          /* kept even when empty (operation in hand) */
    size_t n_completed;
    uint64_t entry_bytes, scope_bytes;
    uint64_t done_bytes; /* entries of completed records: what eviction can free */
    uint64_t evictions, expired, refused;
    uint64_t evict_logged_ms, scope_evict_logged_ms, refuse_logged_ms; /* 0: never */
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
    return clock_now_ms();
}

/* ---- accounting (callers hold sh->mu) ---- */

static uint64_t mem_entry_cost(size_t key_len, size_t record_len)
{
    return sizeof(struct mem_entry) + key_len + record_len + MEM_MALLOC_OVERHEAD;
}

static uint64_t mem_scope_cost(size_t name_len)
{
    return sizeof(struct mem_scope) + name_len + MEM_MALLOC_OVERHEAD;
}

static uint64_t mem_dict_bytes(const struct mem_dict *d)
{
    return (uint64_t)(d->ht[0].size + d->ht[1].size) * sizeof(struct mem_node *);
}

static uint64_t mem_heap_bytes(const struct mem_heap *h)
{
    return (uint64_t)h->n_chunks *
               (MEM_HEAP_CHUNK * sizeof(struct mem_scope *) + MEM_MALLOC_OVERHEAD) +
           (uint64_t)h->dir_cap * sizeof(struct mem_scope **);
}

static uint64_t mem_total_bytes(const struct store_memory_shared *sh)
{
    return sh->entry_bytes + sh->scope_bytes + mem_dict_bytes(&sh->keys) +
           mem_dict_bytes(&sh->scopes) + mem_heap_bytes(&sh->heap);
}

/* ---- chains and dicts ---- */

static void mem_chain_push(struct mem_node **head, struct mem_node *n)
{
    n->next = *head;
    if (*head) (*head)->pprev = &n->next;
    *head = n;
    n->pprev = head;
}

static void mem_chain_unlink(struct mem_node *n)
{
    *n->pprev = n->next;
    if (n->next) n->next->pprev = n->pprev;
    n->next = NULL;
    n->pprev = NULL;
}

static struct mem_table *mem_dict_live(struct mem_dict *d)
{
    return d->rehashing ? &d->ht[1] : &d->ht[0];
}

/* The first node of the chain of table t that may hold hash h. */
static struct mem_node *mem_dict_chain(struct mem_dict *d, int t, uint64_t h)
{
    struct mem_table *tab = &d->ht[t];
    return tab->b[h & (tab->size - 1)];
}

static int mem_dict_tables(const struct mem_dict *d)
{
    return d->rehashing ? 2 : 1;
}

static void mem_dict_add(struct mem_dict *d, struct mem_node *n)
{
    struct mem_table *t = mem_dict_live(d);
    mem_chain_push(&t->b[n->hash & (t->size - 1)], n);
    d->count++;
}

static void mem_dict_del(struct mem_dict *d, struct mem_node *n)
{
    mem_chain_unlink(n);
    d->count--;
}

static void mem_dict_init(struct mem_dict *d)
{
    d->ht[0].size = MEM_INITIAL_BUCKETS;
    d->ht[0].b = mem_alloc(MEM_INITIAL_BUCKETS * sizeof(struct mem_node *));
}

/* ---- the heap of scopes, by bytes (callers hold sh->mu) ---- */

static struct mem_scope **mem_heap_slot(struct mem_heap *h, size_t i)
{
    return &h->chunks[i >> MEM_HEAP_SHIFT][i & (MEM_HEAP_CHUNK - 1)];
}

static void mem_heap_put(struct mem_heap *h, size_t i, struct mem_scope *sc)
{
    *mem_heap_slot(h, i) = sc;
    sc->heap_idx = i;
}

static void mem_heap_up(struct mem_heap *h, size_t i)
{
    struct mem_scope *sc = *mem_heap_slot(h, i);
    while (i > 0) {
        size_t parent = (i - 1) / 2;
        struct mem_scope *p = *mem_heap_slot(h, parent);
        if (p->bytes >= sc->bytes) break;
        mem_heap_put(h, i, p);
        i = parent;
    }
    mem_heap_put(h, i, sc);
}

static void mem_heap_down(struct mem_heap *h, size_t i)
{
    struct mem_scope *sc = *mem_heap_slot(h, i);
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= h->len) break;
        if (c + 1 < h->len && (*mem_heap_slot(h, c + 1))->bytes > (*mem_heap_slot(h, c))->bytes)
            c++;
        struct mem_scope *child = *mem_heap_slot(h, c);
        if (child->bytes <= sc->bytes) break;
        mem_heap_put(h, i, child);
        i = c;
    }
    mem_heap_put(h, i, sc);
}

/* A slot is reserved for every scope (mem_heap_reserve), so this never
 * allocates. */
static void mem_heap_push(struct mem_heap *h, struct mem_scope *sc)
{
    mem_heap_put(h, h->len++, sc);
    mem_heap_up(h, sc->heap_idx);
}

static void mem_heap_remove(struct mem_heap *h, struct mem_scope *sc)
{
    size_t i = sc->heap_idx;
    struct mem_scope *last = *mem_heap_slot(h, --h->len);
    sc->heap_idx = MEM_NOT_IN_HEAP;
    if (last == sc) return;
    mem_heap_put(h, i, last);
    mem_heap_up(h, i);
    mem_heap_down(h, last->heap_idx);
}

/* Bytes that reserving one more slot would add to the heap. */
static uint64_t mem_heap_growth(const struct mem_heap *h, size_t scopes)
{
    if (scopes < h->n_chunks * MEM_HEAP_CHUNK) return 0;
    uint64_t n = MEM_HEAP_CHUNK * sizeof(struct mem_scope *) + MEM_MALLOC_OVERHEAD;
    if (h->n_chunks == h->dir_cap)
        n += (uint64_t)(h->dir_cap ? h->dir_cap : MEM_HEAP_DIR_MIN) * sizeof(struct mem_scope **);
    return n;
}

/* Makes sure there is a slot for scopes + 1 scopes. */
static void mem_heap_reserve(struct mem_heap *h, size_t scopes)
{
    if (scopes < h->n_chunks * MEM_HEAP_CHUNK) return;
    if (h->n_chunks == h->dir_cap) {
        size_t cap = h->dir_cap ? h->dir_cap * 2 : MEM_HEAP_DIR_MIN;
        struct mem_scope ***d = realloc(h->chunks, cap * sizeof(*d));
        if (!d) abort();
        h->chunks = d;
        h->dir_cap = cap;
    }
    h->chunks[h->n_chunks++] = mem_alloc(MEM_HEAP_CHUNK * sizeof(struct mem_scope *));
}

/* Gives back the last chunk once two chunks' worth of slots are unused
 * (the first chunk is kept). */
static void mem_heap_trim(struct mem_heap *h, size_t scopes)
{
    if (h->n_chunks > 1 && scopes + 2 * MEM_HEAP_CHUNK <= h->n_chunks * MEM_HEAP_CHUNK)
        free(h->chunks[--h->n_chunks]);
}

/* ---- scopes (callers hold sh->mu) ---- */

/* The scope of an skey: the part before its first ':' (all of it without). */
static size_t mem_scope_name_len(const char *skey, size_t skey_len)
{
    const char *colon = memchr(skey, ':', skey_len);
    return colon ? (size_t)(colon - skey) : skey_len;
}

static struct mem_scope *mem_scope_find(struct store_memory_shared *sh, const char *name,
                                        size_t len, uint64_t h)
{
    for (int t = 0; t < mem_dict_tables(&sh->scopes); t++) {
        for (struct mem_node *n = mem_dict_chain(&sh->scopes, t, h); n; n = n->next) {
            struct mem_scope *sc = (struct mem_scope *)n;
            if (n->hash == h && sc->name_len == len && memcmp(sc->name, name, len) == 0) return sc;
        }
    }
    return NULL;
}

/* A new, empty scope (room for it was made by the caller). */
static struct mem_scope *mem_scope_new(struct store_memory_shared *sh, const char *name, size_t len,
                                       uint64_t h)
{
    mem_heap_reserve(&sh->heap, sh->scopes.count);
    struct mem_scope *sc = mem_alloc(sizeof(*sc) + len);
    sc->node.hash = h;
    sc->name_len = len;
    memcpy(sc->name, name, len);
    sc->heap_idx = MEM_NOT_IN_HEAP;
    sc->bytes = mem_scope_cost(len);
    sh->scope_bytes += sc->bytes;
    mem_dict_add(&sh->scopes, &sc->node);
    return sc;
}

/* Frees sc once it holds nothing, unless the operation in hand uses it. */
static void mem_scope_maybe_free(struct store_memory_shared *sh, struct mem_scope *sc)
{
    if (sc->entries > 0 || sc == sh->pinned) return;
    mem_dict_del(&sh->scopes, &sc->node);
    sh->scope_bytes -= mem_scope_cost(sc->name_len);
    free(sc);
    mem_heap_trim(&sh->heap, sh->scopes.count);
}

static void mem_charge(struct store_memory_shared *sh, struct mem_scope *sc, uint64_t n)
{
    sc->bytes += n;
    if (sc->heap_idx != MEM_NOT_IN_HEAP) mem_heap_up(&sh->heap, sc->heap_idx);
}

static void mem_uncharge(struct store_memory_shared *sh, struct mem_scope *sc, uint64_t n)
{
    sc->bytes -= n;
    if (sc->heap_idx != MEM_NOT_IN_HEAP) mem_heap_down(&sh->heap, sc->heap_idx);
}

/* ---- the FIFOs of completed records ---- */

static void mem_fifo_push(struct store_memory_shared *sh, struct mem_entry *e)
{
    e->u.q.older = sh->newest;
    e->u.q.newer = NULL;
    if (sh->newest)
        sh->newest->u.q.newer = e;
    else
        sh->oldest = e;
    sh->newest = e;
}

static void mem_fifo_unlink(struct store_memory_shared *sh, struct mem_entry *e)
{
    if (e->u.q.older)
        e->u.q.older->u.q.newer = e->u.q.newer;
    else
        sh->oldest = e->u.q.newer;
    if (e->u.q.newer)
        e->u.q.newer->u.q.older = e->u.q.older;
    else
        sh->newest = e->u.q.older;
}

/* Its scope's FIFO; a scope's first completed record puts it in the heap
 * (charge the record before). */
static void mem_scope_fifo_push(struct store_memory_shared *sh, struct mem_entry *e)
{
    struct mem_scope *sc = e->scope;
    e->u.q.s_older = sc->newest;
    e->u.q.s_newer = NULL;
    if (sc->newest)
        sc->newest->u.q.s_newer = e;
    else
        sc->oldest = e;
    sc->newest = e;
    if (sc->heap_idx == MEM_NOT_IN_HEAP) mem_heap_push(&sh->heap, sc);
}

static void mem_scope_fifo_unlink(struct store_memory_shared *sh, struct mem_entry *e)
{
    struct mem_scope *sc = e->scope;
    if (e->u.q.s_older)
        e->u.q.s_older->u.q.s_newer = e->u.q.s_newer;
    else
        sc->oldest = e->u.q.s_newer;
    if (e->u.q.s_newer)
        e->u.q.s_newer->u.q.s_older = e->u.q.s_older;
    else
        sc->newest = e->u.q.s_older;
    if (!sc->oldest) mem_heap_remove(&sh->heap, sc);
}

/* Removes e from the table, the FIFOs and its scope, and frees it (and
 * the scope, when that was its last entry). */
static void mem_drop(struct store_memory_shared *sh, struct mem_entry *e)
{
    struct mem_scope *sc = e->scope;
    uint64_t cost = mem_entry_cost(e->key_len, e->record_len);
    mem_dict_del(&sh->keys, &e->node);
    if (e->completed) {
        mem_fifo_unlink(sh, e);
        mem_scope_fifo_unlink(sh, e);
        sh->n_completed--;
        sh->done_bytes -= cost;
        sc->done_bytes -= cost;
    }
    sh->entry_bytes -= cost;
    sc->entries--;
    mem_uncharge(sh, sc, cost);
    free(e);
    mem_scope_maybe_free(sh, sc);
}

static void mem_expire(struct store_memory_shared *sh, struct mem_entry *e)
{
    mem_drop(sh, e);
    sh->expired++;
}

/* Takes the oldest completed record of sc: reclaimed when it has expired,
 * evicted (and counted) otherwise. True when it was evicted. */
static bool mem_evict_oldest(struct store_memory_shared *sh, struct mem_scope *sc, uint64_t now)
{
    struct mem_entry *e = sc->oldest;
    if (e->expires_ms <= now) {
        mem_expire(sh, e);
        return false;
    }
    mem_drop(sh, e);
    sh->evictions++;
    metrics_inc(M_STORE_EVICTIONS);
    return true;
}

/* ---- incremental rehash and expiry (callers hold sh->mu) ---- */

static void mem_purge_chain(struct store_memory_shared *sh, struct mem_node **head, uint64_t now)
{
    struct mem_node *n = *head;
    while (n) {
        struct mem_node *next = n->next;
        struct mem_entry *e = (struct mem_entry *)n;
        if (e->expires_ms <= now) mem_expire(sh, e);
        n = next;
    }
}

/* Moves one bucket of d's ht[0] into its ht[1], dropping dead entries on
 * the way (scopes never expire: they go when empty). */
static void mem_move_bucket(struct store_memory_shared *sh, struct mem_dict *d,
                            struct mem_node **head, uint64_t now)
{
    struct mem_table *to = &d->ht[1];
    struct mem_node *n = *head;
    while (n) {
        struct mem_node *next = n->next;
        if (d == &sh->keys && ((struct mem_entry *)n)->expires_ms <= now) {
            mem_expire(sh, (struct mem_entry *)n);
        } else {
            mem_chain_unlink(n);
            mem_chain_push(&to->b[n->hash & (to->size - 1)], n);
        }
        n = next;
    }
}

static void mem_rehash_finish(struct store_memory_shared *sh, struct mem_dict *d)
{
    free(d->ht[0].b);
    d->ht[0] = d->ht[1];
    d->ht[1].b = NULL;
    d->ht[1].size = 0;
    d->rehashing = false;
    if (d == &sh->keys) sh->sweep_pos = 0;
}

/* Moves up to n non-empty buckets, visiting at most 10 n empty ones. */
static void mem_rehash_step(struct store_memory_shared *sh, struct mem_dict *d, size_t n,
                            uint64_t now)
{
    if (!d->rehashing) return;
    size_t empty_left = n * 10;
    struct mem_table *from = &d->ht[0];
    while (n > 0 && d->rehash_idx < from->size) {
        struct mem_node **head = &from->b[d->rehash_idx++];
        if (*head) {
            mem_move_bucket(sh, d, head, now);
            n--;
        } else if (--empty_left == 0) {
            break;
        }
    }
    if (d->rehash_idx >= from->size) mem_rehash_finish(sh, d);
}

static void mem_rehash_start(struct mem_dict *d, size_t size)
{
    d->ht[1].b = mem_alloc(size * sizeof(struct mem_node *));
    d->ht[1].size = size;
    d->rehashing = true;
    d->rehash_idx = 0;
}

static void mem_sweep(struct store_memory_shared *sh, size_t n, uint64_t now)
{
    struct mem_table *t = mem_dict_live(&sh->keys);
    for (size_t k = 0; k < n && k < t->size; k++) {
        sh->sweep_pos &= t->size - 1;
        mem_purge_chain(sh, &t->b[sh->sweep_pos], now);
        sh->sweep_pos++;
    }
}

/* ---- making room (callers hold sh->mu) ---- */

static bool mem_warn_due(uint64_t *last_ms, uint64_t now)
{
    if (*last_ms && now - *last_ms < MEM_WARN_EVERY_MS) return false;
    *last_ms = now;
    return true;
}

static bool mem_fits(const struct store_memory_shared *sh, uint64_t need)
{
    return !sh->max_bytes || mem_total_bytes(sh) + need <= sh->max_bytes;
}

/* True when need more bytes would fit once every completed record were
 * gone: what the locks hold is never given back. Sweeps a few buckets for
 * dead locks before saying no. */
static bool mem_can_fit(struct store_memory_shared *sh, uint64_t need, uint64_t now)
{
    if (mem_total_bytes(sh) - sh->done_bytes + need <= sh->max_bytes) return true;
    mem_sweep(sh, MEM_FULL_SWEEP, now);
    return mem_total_bytes(sh) - sh->done_bytes + need <= sh->max_bytes;
}

/* True when need more bytes fit under max_bytes, after evicting the
 * oldest completed record of the scope holding the most bytes, as many
 * times as it takes; never a lock, and nothing when even that would not
 * be enough. */
static bool mem_evict_for(struct store_memory_shared *sh, uint64_t need, uint64_t now)
{
    if (mem_fits(sh, need)) return true;
    if (!mem_can_fit(sh, need, now)) return false;
    bool evicted = false;
    char victim[17] = "";
    while (!mem_fits(sh, need) && sh->heap.len > 0) {
        struct mem_scope *top = *mem_heap_slot(&sh->heap, 0);
        if (!victim[0])
            snprintf(victim, sizeof(victim), "%.*s", (int)(top->name_len < 16 ? top->name_len : 16),
                     top->name);
        evicted |= mem_evict_oldest(sh, top, now);
    }
    if (evicted && mem_warn_due(&sh->evict_logged_ms, now))
        log_msg(LOG_WARN,
                "memory store: full, evicting the oldest completed records of the largest scope "
                "(memory.max_bytes %llu; scope %s)",
                (unsigned long long)sh->max_bytes, victim);
    return mem_fits(sh, need);
}

/* Room in scope sc (NULL: a scope yet to be created) for need more bytes
 * under max_scope_bytes: its own oldest completed records go first. 0, or
 * -1 when its locks alone leave no room (nothing is evicted then). sc must
 * outlive this call (pinned, or holding the lock being completed). */
static int mem_scope_room(struct store_memory_shared *sh, struct mem_scope *sc, uint64_t need,
                          uint64_t now)
{
    uint64_t cap = sh->max_scope_bytes;
    if (!cap || (sc ? sc->bytes : 0) + need <= cap) return 0;
    if (!sc) return -1;
    if (sc->bytes - sc->done_bytes + need > cap) {
        mem_sweep(sh, MEM_FULL_SWEEP, now);
        if (sc->bytes - sc->done_bytes + need > cap) return -1;
    }
    bool evicted = false;
    while (sc->bytes + need > cap && sc->oldest)
        evicted |= mem_evict_oldest(sh, sc, now);
    if (evicted && mem_warn_due(&sh->scope_evict_logged_ms, now))
        log_msg(LOG_WARN,
                "memory store: a scope reached memory.max_scope_bytes %llu, evicting its oldest "
                "completed records (scope %.*s)",
                (unsigned long long)cap, (int)(sc->name_len < 16 ? sc->name_len : 16), sc->name);
    return sc->bytes + need <= cap ? 0 : -1;
}

static void mem_refuse(struct store_memory_shared *sh, const char *what, uint64_t limit,
                       uint64_t now)
{
    sh->refused++;
    if (mem_warn_due(&sh->refuse_logged_ms, now))
        log_msg(LOG_WARN, "memory store: full of in-progress locks, refusing new keys (%s %llu)",
                what, (unsigned long long)limit);
}

/* Makes room for a new lock or a record in scope sc (NULL: new): need
 * bytes charged to the scope, need_all to the store (need plus what the
 * table itself grows by). 0, or -1 when only locks are left (in the scope
 * or in the store) and nothing was evicted for it. */
static int mem_make_room(struct store_memory_shared *sh, struct mem_scope *sc, uint64_t need,
                         uint64_t need_all, uint64_t now)
{
    if (!mem_fits(sh, need_all) && !mem_can_fit(sh, need_all, now)) {
        mem_refuse(sh, "memory.max_bytes", sh->max_bytes, now);
        return -1;
    }
    if (mem_scope_room(sh, sc, need, now) < 0) {
        mem_refuse(sh, "memory.max_scope_bytes", sh->max_scope_bytes, now);
        return -1;
    }
    if (!mem_evict_for(sh, need_all, now)) {
        mem_refuse(sh, "memory.max_bytes", sh->max_bytes, now);
        return -1;
    }
    return 0;
}

/* Grows past 3/4 full; shrinks below 1/8 full (to at most 1/2 full), so
 * that churn never leaves a huge, mostly empty table behind. The new
 * bucket array is charged like everything else: when only locks are left
 * and it does not fit, the table stays as it is (longer chains, still
 * correct) rather than going over max_bytes. */
static void mem_maybe_resize(struct store_memory_shared *sh, struct mem_dict *d, uint64_t now)
{
    if (d->rehashing) return;
    size_t size = d->ht[0].size;
    if (d->count > size - size / 4) {
        if (mem_evict_for(sh, (uint64_t)size * 2 * sizeof(struct mem_node *), now))
            mem_rehash_start(d, size * 2);
    } else if (size > MEM_INITIAL_BUCKETS && d->count < size / 8) {
        size_t target = MEM_INITIAL_BUCKETS;
        while (target < d->count * 2)
            target *= 2;
        if (target < size) mem_rehash_start(d, target);
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
    mem_rehash_step(sh, &sh->keys, rehash, now);
    mem_rehash_step(sh, &sh->scopes, rehash, now);
    mem_sweep(sh, sweep, now);
    mem_pop_expired(sh, pop, now);
    mem_maybe_resize(sh, &sh->keys, now);
    mem_maybe_resize(sh, &sh->scopes, now);
}

/* ---- lookups and inserts (callers hold sh->mu) ---- */

/* An operation's skey, hashed before the mutex is taken (the seed never
 * changes): the mutex is held for the table's work only. */
struct mem_skey {
    const char *skey; /* borrowed from the caller */
    size_t len;
    size_t scope_len; /* its scope: the part before the first ':' */
    uint64_t h;       /* of the skey (the prefix around it is the same for all) */
    uint64_t scope_h; /* of its scope; set for acquires only */
};

static void mem_skey_hash(const struct store_memory_shared *sh, struct mem_skey *k,
                          const char *skey, size_t len, bool with_scope)
{
    k->skey = skey;
    k->len = len;
    k->scope_len = mem_scope_name_len(skey, len);
    if (with_scope)
        k->h = siphash13_split(sh->seed, skey, len, k->scope_len, &k->scope_h);
    else
        k->h = siphash13(sh->seed, skey, len);
}

/* Builds "<prefix>{<skey>}" into the table's scratch buffer. */
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
    for (int t = 0; t < mem_dict_tables(&sh->keys); t++) {
        for (struct mem_node *n = mem_dict_chain(&sh->keys, t, h); n; n = n->next) {
            struct mem_entry *e = (struct mem_entry *)n;
            if (n->hash != h || e->key_len != len || memcmp(e->data, key, len) != 0) continue;
            if (e->expires_ms > now) return e;
            mem_expire(sh, e);
            return NULL;
        }
    }
    return NULL;
}

/* A new lock for key (of the skey k), charged to its scope; NULL when
 * there is no room for it. */
static struct mem_entry *mem_insert(struct store_memory_shared *sh, const struct mem_skey *k,
                                    const char *key, size_t len, uint64_t now)
{
    struct mem_scope *sc = mem_scope_find(sh, k->skey, k->scope_len, k->scope_h);
    uint64_t cost = mem_entry_cost(len, 0);
    uint64_t need = cost + (sc ? 0 : mem_scope_cost(k->scope_len));
    uint64_t need_all = need + (sc ? 0 : mem_heap_growth(&sh->heap, sh->scopes.count));
    sh->pinned = sc;
    int room = mem_make_room(sh, sc, need, need_all, now);
    sh->pinned = NULL;
    if (room < 0) {
        if (sc) mem_scope_maybe_free(sh, sc);
        return NULL;
    }
    if (!sc) sc = mem_scope_new(sh, k->skey, k->scope_len, k->scope_h);
    struct mem_entry *e = mem_alloc(sizeof(*e) + len);
    e->node.hash = k->h;
    e->key_len = len;
    e->scope = sc;
    memcpy(e->data, key, len);
    mem_dict_add(&sh->keys, &e->node);
    sc->entries++;
    sh->entry_bytes += cost;
    mem_charge(sh, sc, cost);
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
     * (expired only) can take it, nor its scope, while room is made. */
    struct mem_scope *sc = e->scope;
    if (mem_make_room(sh, sc, record_len, record_len, now) < 0) return -1;
    struct mem_node **pprev = e->node.pprev;
    size_t key_len = e->key_len;
    mem_chain_unlink(&e->node);
    struct mem_entry *n = realloc(e, sizeof(*n) + key_len + record_len);
    if (!n) abort();
    mem_chain_push(pprev, &n->node);
    if (record_len) memcpy(n->data + key_len, record, record_len);
    n->record_len = record_len;
    n->completed = true;
    n->expires_ms = expires_ms;
    mem_fifo_push(sh, n);
    sh->n_completed++;
    sh->entry_bytes += record_len;
    uint64_t cost = mem_entry_cost(key_len, record_len);
    sh->done_bytes += cost;
    sc->done_bytes += cost;
    mem_charge(sh, sc, record_len);
    mem_scope_fifo_push(sh, n);
    return 0;
}

struct store_memory_shared *store_memory_shared_new_bounded(const char *key_prefix,
                                                            uint64_t max_bytes,
                                                            uint64_t max_scope_bytes)
{
    struct store_memory_shared *sh = mem_alloc(sizeof(*sh));
    if (pthread_mutex_init(&sh->mu, NULL) != 0) abort();
    if (RAND_bytes(sh->seed, sizeof(sh->seed)) != 1) {
        log_msg(LOG_ERROR, "memory store: no random bytes for its hash key (RAND_bytes)");
        abort();
    }
    const char *p = key_prefix ? key_prefix : "";
    sh->prefix_len = strlen(p);
    sh->prefix = mem_alloc(sh->prefix_len + 1);
    memcpy(sh->prefix, p, sh->prefix_len);
    sh->max_bytes = max_bytes;
    sh->max_scope_bytes = max_scope_bytes;
    mem_dict_init(&sh->keys);
    mem_dict_init(&sh->scopes);
    mem_heap_reserve(&sh->heap, 0);
    return sh;
}

struct store_memory_shared *store_memory_shared_new(const char *key_prefix, uint64_t max_bytes)
{
    return store_memory_shared_new_bounded(key_prefix, max_bytes, 0);
}

/* Frees every node of d (entries and scopes are plain allocations). */
static void mem_dict_free(struct mem_dict *d)
{
    for (int t = 0; t < 2; t++) {
        for (size_t i = 0; i < d->ht[t].size; i++) {
            struct mem_node *n = d->ht[t].b[i];
            while (n) {
                struct mem_node *next = n->next;
                free(n);
                n = next;
            }
        }
        free(d->ht[t].b);
    }
}

void store_memory_shared_free(struct store_memory_shared *sh)
{
    if (!sh) return;
    free(sh->kbuf);
    mem_dict_free(&sh->keys);
    mem_dict_free(&sh->scopes);
    for (size_t i = 0; i < sh->heap.n_chunks; i++)
        free(sh->heap.chunks[i]);
    free(sh->heap.chunks);
    free(sh->prefix);
    pthread_mutex_destroy(&sh->mu);
    free(sh);
}

void store_memory_shared_stats(struct store_memory_shared *sh, struct store_memory_stats *out)
{
    pthread_mutex_lock(&sh->mu);
    out->max_bytes = sh->max_bytes;
    out->max_scope_bytes = sh->max_scope_bytes;
    out->bytes = mem_total_bytes(sh);
    out->entry_bytes = sh->entry_bytes;
    out->entries = sh->keys.count;
    out->completed = sh->n_completed;
    out->locks = sh->keys.count - sh->n_completed;
    out->buckets = sh->keys.ht[0].size + sh->keys.ht[1].size;
    out->scopes = sh->scopes.count;
    out->scope_bytes = sh->scope_bytes;
    out->evictions = sh->evictions;
    out->expired = sh->expired;
    out->refused = sh->refused;
    pthread_mutex_unlock(&sh->mu);
}

uint64_t store_memory_shared_scope_bytes(struct store_memory_shared *sh, const char *scope,
                                         size_t len)
{
    uint64_t h = siphash13(sh->seed, scope, len);
    pthread_mutex_lock(&sh->mu);
    struct mem_scope *sc = mem_scope_find(sh, scope, len, h);
    uint64_t n = sc ? sc->bytes : 0;
    pthread_mutex_unlock(&sh->mu);
    return n;
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

static struct mem_entry *mem_lookup_locked(struct store_memory_shared *sh, const struct mem_skey *k,
                                           char **key, size_t *key_len, uint64_t now)
{
    *key = mem_key(sh, k->skey, k->len, key_len);
    mem_maintain(sh, now, MEM_OP_REHASH, MEM_OP_SWEEP, MEM_OP_POP);
    return mem_find(sh, *key, *key_len, k->h, now);
}

/* The acquire decision, the same table as the Redis script. */
static void mem_acquire_locked(struct store_memory_shared *sh, struct mem_op *op,
                               const struct mem_skey *k, const uint8_t *fp, const char *token,
                               uint32_t lock_ms)
{
    uint64_t now = mem_now_ms();
    char *key;
    size_t key_len;
    struct mem_entry *e = mem_lookup_locked(sh, k, &key, &key_len, now);
    if (!e) {
        e = mem_insert(sh, k, key, key_len, now);
        if (!e) {
            op->reply.state = STORE_ACQ_ERROR;
        } else {
            memcpy(e->u.token, token, STORE_TOKEN_LEN);
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
    struct mem_skey k;
    mem_skey_hash(s->sh, &k, skey, skey_len, true);
    pthread_mutex_lock(&s->sh->mu);
    mem_acquire_locked(s->sh, op, &k, fp, token, lock_ms);
    pthread_mutex_unlock(&s->sh->mu);
    mem_op_defer(op);
}

enum mem_owned_action { MEM_COMPLETE, MEM_RELEASE, MEM_RENEW };

/* complete / release / renew: each acts only on an in-progress entry that
 * the token owns; returns 1 when it acted, 0 otherwise, -1 when a record
 * does not fit (the lock is then kept until it expires, as when Redis
 * fails to store one). */
static int mem_owned_locked(struct store_memory_shared *sh, enum mem_owned_action action,
                            const struct mem_skey *k, const char *token, const uint8_t *record,
                            size_t record_len, uint64_t expire_after_ms)
{
    uint64_t now = mem_now_ms();
    char *key;
    size_t key_len;
    struct mem_entry *e = mem_lookup_locked(sh, k, &key, &key_len, now);
    if (!e || e->completed || memcmp(e->u.token, token, STORE_TOKEN_LEN) != 0) return 0;
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
    struct mem_skey k;
    mem_skey_hash(s->sh, &k, skey, skey_len, false);
    pthread_mutex_lock(&s->sh->mu);
    op->status = mem_owned_locked(s->sh, action, &k, token, record, record_len, expire_after_ms);
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
