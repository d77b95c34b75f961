/* internal.h — what the files of the memory store (src/store/memory/)
 * share, and nothing else includes: the structs of the shared table, its
 * bounded-work constants, the byte accounting, the skey hashing, the
 * chain and dict primitives, and the functions one file of the store
 * calls in another. The small helpers are static inline here because
 * they sit on every operation's path (inlined, as they were when the
 * store was one file).
 *
 * It lives next to the sources, not under include/idemgate/, because no
 * other module may see these structs: everything outside this folder goes
 * through the public interface, idemgate/store/store.h. Owns nothing.
 *
 *   table.c   the key table: entries and the operations' decisions on
 *             them, buckets, incremental rehash, expiry
 *   scopes.c  per-scope accounting, the heap of scopes, eviction
 *   shared.c  struct store_memory_shared: creation, stats, freeing, and
 *             the mutex around every operation
 *   limits.c  the limits table: each scope's rate state (GCRA) and
 *             concurrency slots (store_limit), their expiry
 *   ops.c     struct store_memory (one per worker): the ops table,
 *             callbacks deferred onto the worker's base, recycled ops
 *
 * Locking: the store_memory_shared_* and mem_shared_* entry points
 * (shared.c) take sh->mu; every other function declared here expects its
 * caller to hold it, except mem_skey_hash (it reads only the seed, which
 * never changes). The layout of the table is described at the top of
 * shared.c. */
#ifndef IDEMGATE_STORE_MEMORY_INTERNAL_H
#define IDEMGATE_STORE_MEMORY_INTERNAL_H

#include "idemgate/core/clock.h"
#include "idemgate/core/siphash.h"
#include "idemgate/store/gcra.h"
#include "idemgate/store/store.h"

#include <pthread.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

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

/* A link in a chain of either dict; the first member of what it links
 * (struct mem_entry, struct mem_scope), which the dict owns. */
struct mem_node {
    struct mem_node *next;
    struct mem_node **pprev; /* the pointer to this node in its chain */
    uint64_t hash;
};

/* One bucket array of a dict (owned by it). */
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

/* One (scope, key): in progress {token, fp} or completed {fp, record}.
 * Owned by sh->keys (one allocation: the struct, its key, its record). */
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
 * entry. Owned by sh->scopes; the heap and the entries only point to it. */
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

/* One slot of a scope's concurrency limit: leased to token until
 * expires_ms (monotonic). */
struct mem_lease {
    char token[STORE_TOKEN_LEN];
    uint64_t expires_ms;
};

/* The limits of one scope (store_limit): its rate state (store/gcra.h)
 * and its slots, while either is live. Owned by
 * sh->limits (the struct with its name); owns its leases array. */
struct mem_limit {
    struct mem_node node; /* first: in sh->limits */
    struct gcra rate;     /* all zero: none */
    uint32_t n_leases, cap_leases;
    struct mem_lease *leases; /* n_leases live or lapsed, unordered */
    uint64_t bytes;           /* charged: the struct, its name, its leases array */
    size_t name_len;
    char name[];
};

/* Max-heap of the scopes that hold a completed record, by bytes. Owns its
 * chunks, not the scopes. */
struct mem_heap {
    struct mem_scope ***chunks; /* n_chunks of MEM_HEAP_CHUNK slots */
    size_t n_chunks, dir_cap;
    size_t len;
};

/* The process-wide table (store.h): created and freed by shared.c, used by
 * every worker's store under mu. Owns the dicts (and through them every
 * entry and scope), the heap, the prefix and the key scratch. */
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
    /* "<scope>" -> mem_limit; its buckets are allocated by the first
     * limit (size 0 until then), then charged like the others */
    struct mem_dict limits;
    size_t limit_sweep_pos;
    uint64_t limit_bytes; /* every mem_limit's bytes */
};

/* An operation's skey, hashed before the mutex is taken (the seed never
 * changes): the mutex is held for the table's work only. Lives on the
 * stack of the operation's call. */
struct mem_skey {
    const char *skey; /* borrowed from the caller */
    size_t len;
    size_t scope_len; /* its scope: the part before the first ':' */
    uint64_t h;       /* of the skey (the prefix around it is the same for all) */
    uint64_t scope_h; /* of its scope; set for acquires only */
};

/* ---- allocation and clock ---- */

/* Zeroed memory, or abort: the store has no way to report it. */
static inline void *mem_alloc(size_t n)
{
    void *p = calloc(1, n ? n : 1);
    if (!p) abort();
    return p;
}

static inline uint64_t mem_now_ms(void)
{
    return clock_now_ms();
}

/* ---- accounting (callers hold sh->mu) ---- */

static inline uint64_t mem_entry_cost(size_t key_len, size_t record_len)
{
    return sizeof(struct mem_entry) + key_len + record_len + MEM_MALLOC_OVERHEAD;
}

static inline uint64_t mem_scope_cost(size_t name_len)
{
    return sizeof(struct mem_scope) + name_len + MEM_MALLOC_OVERHEAD;
}

static inline uint64_t mem_dict_bytes(const struct mem_dict *d)
{
    return (uint64_t)(d->ht[0].size + d->ht[1].size) * sizeof(struct mem_node *);
}

static inline uint64_t mem_heap_bytes(const struct mem_heap *h)
{
    return (uint64_t)h->n_chunks *
               (MEM_HEAP_CHUNK * sizeof(struct mem_scope *) + MEM_MALLOC_OVERHEAD) +
           (uint64_t)h->dir_cap * sizeof(struct mem_scope **);
}

static inline uint64_t mem_total_bytes(const struct store_memory_shared *sh)
{
    return sh->entry_bytes + sh->scope_bytes + mem_dict_bytes(&sh->keys) +
           mem_dict_bytes(&sh->scopes) + mem_heap_bytes(&sh->heap) + sh->limit_bytes +
           mem_dict_bytes(&sh->limits);
}

/* True when need more bytes fit under max_bytes as things stand. */
static inline bool mem_fits(const struct store_memory_shared *sh, uint64_t need)
{
    return !sh->max_bytes || mem_total_bytes(sh) + need <= sh->max_bytes;
}

/* The scope of an skey: the part before its first ':' (all of it without). */
static inline size_t mem_scope_name_len(const char *skey, size_t skey_len)
{
    const char *colon = memchr(skey, ':', skey_len);
    return colon ? (size_t)(colon - skey) : skey_len;
}

/* Fills k for skey: its scope, the hash of the skey and, with_scope,
 * the hash of its scope. Reads only the seed: no lock needed. */
static inline void mem_skey_hash(const struct store_memory_shared *sh, struct mem_skey *k,
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

/* ---- chains and dicts (callers hold sh->mu) ---- */

static inline void mem_chain_push(struct mem_node **head, struct mem_node *n)
{
    n->next = *head;
    if (*head) (*head)->pprev = &n->next;
    *head = n;
    n->pprev = head;
}

static inline void mem_chain_unlink(struct mem_node *n)
{
    *n->pprev = n->next;
    if (n->next) n->next->pprev = n->pprev;
    n->next = NULL;
    n->pprev = NULL;
}

static inline struct mem_table *mem_dict_live(struct mem_dict *d)
{
    return d->rehashing ? &d->ht[1] : &d->ht[0];
}

/* The first node of the chain of table t that may hold hash h. */
static inline struct mem_node *mem_dict_chain(struct mem_dict *d, int t, uint64_t h)
{
    struct mem_table *tab = &d->ht[t];
    return tab->b[h & (tab->size - 1)];
}

static inline int mem_dict_tables(const struct mem_dict *d)
{
    return d->rehashing ? 2 : 1;
}

static inline void mem_dict_add(struct mem_dict *d, struct mem_node *n)
{
    struct mem_table *t = mem_dict_live(d);
    mem_chain_push(&t->b[n->hash & (t->size - 1)], n);
    d->count++;
}

static inline void mem_dict_del(struct mem_dict *d, struct mem_node *n)
{
    mem_chain_unlink(n);
    d->count--;
}

/* ---- table.c: the key table ---- */

/* What complete, release and renew do to the lock their token owns. */
enum mem_owned_action { MEM_COMPLETE, MEM_RELEASE, MEM_RENEW };

/* The acquire decision (the same table as the Redis script) for k: fills
 * reply; for STORE_ACQ_COMPLETED, *record is a malloc'd copy of the
 * record that reply->record points to (the caller frees it). */
void mem_acquire_locked(struct store_memory_shared *sh, const struct mem_skey *k, const uint8_t *fp,
                        const char *token, uint32_t lock_ms, struct store_acquire_reply *reply,
                        uint8_t **record);
/* complete / release / renew of the lock token owns: 1 when it acted, 0
 * when there is no such lock (or it is completed), -1 when a record does
 * not fit (the lock is then kept until it expires). */
int mem_owned_locked(struct store_memory_shared *sh, enum mem_owned_action action,
                     const struct mem_skey *k, const char *token, const uint8_t *record,
                     size_t record_len, uint64_t expire_after_ms);

void mem_dict_init(struct mem_dict *d);
/* Frees every node of d (entries and scopes are plain allocations). */
void mem_dict_free(struct mem_dict *d);
/* Removes e from the table, the FIFOs and its scope, and frees it (and
 * the scope, when that was its last entry). */
void mem_drop(struct store_memory_shared *sh, struct mem_entry *e);
/* The admin API's lookup (under mu): the live entry for skey exactly (one
 * hash lookup), or with scope_prefix the first whose scope starts with
 * skey's scope and whose key is skey's (a walk of the whole table). */
struct mem_entry *mem_admin_find(struct store_memory_shared *sh, const char *skey, size_t len,
                                 bool scope_prefix, uint64_t now);
/* mem_drop, counted as expired. */
void mem_expire(struct store_memory_shared *sh, struct mem_entry *e);
/* Reclaims the expired entries of a few more buckets (MEM_FULL_SWEEP):
 * the last try before room is refused. */
void mem_sweep_more(struct store_memory_shared *sh, uint64_t now);
/* A store's periodic slice of background work (MEM_TICK_*: rehash steps,
 * a sweep, expired records off the oldest end, a resize when due, and the
 * limits table's share); each operation does a smaller one in mem_lookup. */
void mem_maintain_tick(struct store_memory_shared *sh, uint64_t now);
/* Up to rehash buckets of d's incremental rehash, then a resize when one
 * is due (a growth charged, and made room for, like everything else). */
void mem_dict_step(struct store_memory_shared *sh, struct mem_dict *d, size_t rehash, uint64_t now);

/* ---- scopes.c: scopes, their heap, eviction ---- */

struct mem_scope *mem_scope_find(struct store_memory_shared *sh, const char *name, size_t len,
                                 uint64_t h);
/* A new, empty scope (room for it was made by the caller). */
struct mem_scope *mem_scope_new(struct store_memory_shared *sh, const char *name, size_t len,
                                uint64_t h);
/* Frees sc once it holds nothing, unless the operation in hand uses it. */
void mem_scope_maybe_free(struct store_memory_shared *sh, struct mem_scope *sc);
void mem_charge(struct store_memory_shared *sh, struct mem_scope *sc, uint64_t n);
void mem_uncharge(struct store_memory_shared *sh, struct mem_scope *sc, uint64_t n);
/* Its scope's FIFO of completed records; a scope's first completed record
 * puts it in the heap (charge the record before), its last takes it out. */
void mem_scope_fifo_push(struct store_memory_shared *sh, struct mem_entry *e);
void mem_scope_fifo_unlink(struct store_memory_shared *sh, struct mem_entry *e);
/* Bytes that reserving one more heap slot would add. */
uint64_t mem_heap_growth(const struct mem_heap *h, size_t scopes);
/* Makes sure there is a heap slot for scopes + 1 scopes. */
void mem_heap_reserve(struct mem_heap *h, size_t scopes);
/* Frees the heap's chunks (not the scopes). */
void mem_heap_free(struct mem_heap *h);
/* True when need more bytes fit under max_bytes, after evicting as much
 * as it takes (never a lock; nothing when even that would not do). */
bool mem_evict_for(struct store_memory_shared *sh, uint64_t need, uint64_t now);
/* Makes room for a new lock or a record in scope sc (NULL: new): need
 * bytes charged to the scope, need_all to the store. 0, or -1 when only
 * locks are left and nothing was evicted for it. */
int mem_make_room(struct store_memory_shared *sh, struct mem_scope *sc, uint64_t need,
                  uint64_t need_all, uint64_t now);

/* ---- limits.c: the limits table ---- */

/* The limit decision for scope (hash h) at now: fills reply. */
void mem_limit_locked(struct store_memory_shared *sh, const char *scope, size_t len, uint64_t h,
                      const char *token, const struct store_limit_args *a,
                      struct store_limit_reply *reply, uint64_t now);
/* limit_release (lease_ms unused) or limit_renew of token's slot: 1 when
 * it held a live lease, else 0. */
int mem_limit_lease_locked(struct store_memory_shared *sh, const char *scope, size_t len,
                           uint64_t h, const char *token, bool renew, uint32_t lease_ms,
                           uint64_t now);
/* A bounded slice of the limits table's upkeep: rehash, resize, and the
 * dead entries of sweep buckets. */
void mem_limits_maintain(struct store_memory_shared *sh, uint64_t now, size_t rehash, size_t sweep);
/* Frees every mem_limit and the table's buckets. */
void mem_limits_free(struct store_memory_shared *sh);

/* ---- shared.c: the operations, each under sh->mu ---- */

/* The acquire decision for skey (all arguments borrowed for the call).
 * Fills reply; for STORE_ACQ_COMPLETED, *record is a malloc'd copy of the
 * record that reply->record points to (the caller frees it). */
void mem_shared_acquire(struct store_memory_shared *sh, const char *skey, size_t skey_len,
                        const uint8_t *fp, const char *token, uint32_t lock_ms,
                        struct store_acquire_reply *reply, uint8_t **record);
/* complete / release / renew of the lock token owns: 1 when it acted, 0
 * when there is no such lock, -1 when a record does not fit. */
int mem_shared_owned(struct store_memory_shared *sh, enum mem_owned_action action, const char *skey,
                     size_t skey_len, const char *token, const uint8_t *record, size_t record_len,
                     uint64_t expire_after_ms);
/* The limits of scope (store_limit), under sh->mu: fills reply. */
void mem_shared_limit(struct store_memory_shared *sh, const char *scope, size_t scope_len,
                      const char *token, const struct store_limit_args *a,
                      struct store_limit_reply *reply);
/* limit_release (renew false) or limit_renew: 1, 0 (no live lease). */
int mem_shared_limit_lease(struct store_memory_shared *sh, const char *scope, size_t scope_len,
                           const char *token, bool renew, uint32_t lease_ms);
/* A store's periodic slice of background work (MEM_TICK_*). */
void mem_shared_tick(struct store_memory_shared *sh);

#endif
