/* table.c — the memory store's key table: its entries (a lock or a
 * completed record under "<prefix>{<skey>}"), its buckets and their
 * incremental rehash, the FIFO of completed records by completion, and
 * expiry (lazy on lookup, a bounded sweep of buckets, the oldest end of
 * the FIFO).
 *
 * Owns the dict mechanism (struct mem_dict: init, rehash, resize, free),
 * used for the scopes too, and every struct mem_entry. Does not own the
 * scopes an entry is charged to, the heap or the eviction order
 * (scopes.c), the mutex or the operations' decisions (shared.c), nor
 * anything of a worker (ops.c). Callers hold sh->mu, except for
 * mem_skey_hash. */
#include "internal.h"

#include <string.h>

/* ---- dicts ---- */

void mem_dict_init(struct mem_dict *d)
{
    d->ht[0].size = MEM_INITIAL_BUCKETS;
    d->ht[0].b = mem_alloc(MEM_INITIAL_BUCKETS * sizeof(struct mem_node *));
}

void mem_dict_free(struct mem_dict *d)
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

/* ---- the FIFO of all completed records ---- */

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

/* ---- dropping entries ---- */

void mem_drop(struct store_memory_shared *sh, struct mem_entry *e)
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

void mem_expire(struct store_memory_shared *sh, struct mem_entry *e)
{
    mem_drop(sh, e);
    sh->expired++;
}

/* ---- incremental rehash and expiry ---- */

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

void mem_sweep(struct store_memory_shared *sh, size_t n, uint64_t now)
{
    struct mem_table *t = mem_dict_live(&sh->keys);
    for (size_t k = 0; k < n && k < t->size; k++) {
        sh->sweep_pos &= t->size - 1;
        mem_purge_chain(sh, &t->b[sh->sweep_pos], now);
        sh->sweep_pos++;
    }
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

void mem_maintain(struct store_memory_shared *sh, uint64_t now, size_t rehash, size_t sweep,
                  size_t pop)
{
    mem_rehash_step(sh, &sh->keys, rehash, now);
    mem_rehash_step(sh, &sh->scopes, rehash, now);
    mem_sweep(sh, sweep, now);
    mem_pop_expired(sh, pop, now);
    mem_maybe_resize(sh, &sh->keys, now);
    mem_maybe_resize(sh, &sh->scopes, now);
}

/* ---- lookups and inserts ---- */

void mem_skey_hash(const struct store_memory_shared *sh, struct mem_skey *k, const char *skey,
                   size_t len, bool with_scope)
{
    k->skey = skey;
    k->len = len;
    k->scope_len = mem_scope_name_len(skey, len);
    if (with_scope)
        k->h = siphash13_split(sh->seed, skey, len, k->scope_len, &k->scope_h);
    else
        k->h = siphash13(sh->seed, skey, len);
}

char *mem_key(struct store_memory_shared *sh, const char *skey, size_t skey_len, size_t *out_len)
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

struct mem_entry *mem_find(struct store_memory_shared *sh, const char *key, size_t len, uint64_t h,
                           uint64_t now)
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

struct mem_entry *mem_insert(struct store_memory_shared *sh, const struct mem_skey *k,
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

/* The entry is reallocated to hold the record after its key, at the same
 * place in its chain. */
int mem_store_record(struct store_memory_shared *sh, struct mem_entry *e, const uint8_t *record,
                     size_t record_len, uint64_t expires_ms, uint64_t now)
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
