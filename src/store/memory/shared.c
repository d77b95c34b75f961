/* shared.c — the memory store's process-wide table (struct
 * store_memory_shared, store.h): its creation, stats and freeing, and the
 * entry points that run each operation to completion under its mutex
 * (the same atomicity the Redis scripts give): the skey is hashed before
 * the lock is taken, the decision (table.c) under it.
 *
 * Owns the struct and its mutex: every entry point here takes sh->mu, and
 * nothing else in the store does. Does not own how entries are stored,
 * found, decided on or expired (table.c), how bytes are charged and room
 * is made (scopes.c), nor the per-worker stores that call in here and
 * defer the answers onto their event_base (ops.c).
 *
 *   store_memory_shared
 *     keys:   dict  "<prefix>{<scope>:<key>}" -> mem_entry (lock or record)
 *     scopes: dict  "<scope>" -> mem_scope, which every entry points to:
 *             the bytes charged to that scope and its completed records,
 *             oldest completion first (a FIFO)
 *     heap:   the scopes holding a completed record, by bytes (max-heap;
 *             each scope knows its index)
 *     oldest/newest: every completed record, by completion (for expiry)
 *     limits: dict  "<scope>" -> mem_limit: a scope's rate state and
 *             concurrency slots (limits.c), charged to the store only
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
#include "internal.h"

#include "idemgate/core/log.h"

#include <openssl/rand.h>
#include <string.h>

/* ---- the table's lifecycle and stats ---- */

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

void store_memory_shared_set_bounds(struct store_memory_shared *sh, uint64_t max_bytes,
                                    uint64_t max_scope_bytes)
{
    pthread_mutex_lock(&sh->mu);
    sh->max_bytes = max_bytes;
    sh->max_scope_bytes = max_scope_bytes;
    pthread_mutex_unlock(&sh->mu);
}

struct store_memory_shared *store_memory_shared_new(const char *key_prefix, uint64_t max_bytes)
{
    return store_memory_shared_new_bounded(key_prefix, max_bytes, 0);
}

void store_memory_shared_free(struct store_memory_shared *sh)
{
    if (!sh) return;
    free(sh->kbuf);
    mem_limits_free(sh);
    mem_dict_free(&sh->keys);
    mem_dict_free(&sh->scopes);
    mem_heap_free(&sh->heap);
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

/* ---- the operations (each under sh->mu) ---- */

void mem_shared_acquire(struct store_memory_shared *sh, const char *skey, size_t skey_len,
                        const uint8_t *fp, const char *token, uint32_t lock_ms,
                        struct store_acquire_reply *reply, uint8_t **record)
{
    struct mem_skey k;
    mem_skey_hash(sh, &k, skey, skey_len, true);
    pthread_mutex_lock(&sh->mu);
    mem_acquire_locked(sh, &k, fp, token, lock_ms, reply, record);
    pthread_mutex_unlock(&sh->mu);
}

int mem_shared_owned(struct store_memory_shared *sh, enum mem_owned_action action, const char *skey,
                     size_t skey_len, const char *token, const uint8_t *record, size_t record_len,
                     uint64_t expire_after_ms)
{
    struct mem_skey k;
    mem_skey_hash(sh, &k, skey, skey_len, false);
    pthread_mutex_lock(&sh->mu);
    int status = mem_owned_locked(sh, action, &k, token, record, record_len, expire_after_ms);
    pthread_mutex_unlock(&sh->mu);
    return status;
}

void mem_shared_limit(struct store_memory_shared *sh, const char *scope, size_t scope_len,
                      const char *token, const struct store_limit_args *a,
                      struct store_limit_reply *reply)
{
    uint64_t h = siphash13(sh->seed, scope, scope_len);
    pthread_mutex_lock(&sh->mu);
    mem_limit_locked(sh, scope, scope_len, h, token, a, reply, mem_now_ms());
    pthread_mutex_unlock(&sh->mu);
}

int mem_shared_limit_lease(struct store_memory_shared *sh, const char *scope, size_t scope_len,
                           const char *token, bool renew, uint32_t lease_ms)
{
    uint64_t h = siphash13(sh->seed, scope, scope_len);
    pthread_mutex_lock(&sh->mu);
    int status =
        mem_limit_lease_locked(sh, scope, scope_len, h, token, renew, lease_ms, mem_now_ms());
    pthread_mutex_unlock(&sh->mu);
    return status;
}

void mem_shared_tick(struct store_memory_shared *sh)
{
    pthread_mutex_lock(&sh->mu);
    mem_maintain_tick(sh, mem_now_ms());
    pthread_mutex_unlock(&sh->mu);
}

void store_memory_shared_key(struct store_memory_shared *sh, const char *skey, size_t skey_len,
                             bool scope_prefix, bool forget, struct store_key_info *out)
{
    memset(out, 0, sizeof(*out));
    out->ttl_ms = -1;
    pthread_mutex_lock(&sh->mu);
    uint64_t now = mem_now_ms();
    struct mem_entry *e = mem_admin_find(sh, skey, skey_len, scope_prefix, now);
    if (e) {
        out->found = 1;
        out->completed = e->completed;
        memcpy(out->fp, e->fp, STORE_FP_LEN);
        out->ttl_ms = (int64_t)(e->expires_ms - now);
        out->skey_len = e->key_len - sh->prefix_len - 2;
        out->skey = mem_alloc(out->skey_len + 1);
        memcpy(out->skey, e->data + sh->prefix_len + 1, out->skey_len);
        if (e->completed) {
            out->record_len = e->record_len;
            out->record = mem_alloc(e->record_len ? e->record_len : 1);
            memcpy(out->record, e->data + e->key_len, e->record_len);
        }
        if (forget) mem_drop(sh, e);
    }
    pthread_mutex_unlock(&sh->mu);
}
