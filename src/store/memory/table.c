/* table.c — the memory store's key table: its entries (a lock or a
 * completed record under "<prefix>{<skey>}") and what the operations do
 * to them (acquire; complete, release, renew of an owned lock: the same
 * decisions as the Redis scripts), its buckets and their incremental
 * rehash, the FIFO of completed records by completion, and expiry (lazy
 * on lookup, a bounded sweep of buckets, the oldest end of the FIFO).
 *
 * Owns the dict mechanism (struct mem_dict: init, rehash, resize, free),
 * used for the scopes and the limits too, and every struct mem_entry.
 * Does not own the scopes an entry is charged to, the heap or the
 * eviction order (scopes.c), the limits (limits.c), the struct and its
 * mutex (shared.c), nor anything of a worker (ops.c). Everything here runs under sh->mu, taken by
 * shared.c. */
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

/* Reclaims the expired entries of the next n buckets of the key table. */
static void mem_sweep(struct store_memory_shared *sh, size_t n, uint64_t now)
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

/* A bounded slice of background work: rehash steps, a sweep, expired
 * records off the oldest end, and a resize when one is due. */
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

void mem_maintain_tick(struct store_memory_shared *sh, uint64_t now)
{
    mem_maintain(sh, now, MEM_TICK_REHASH, MEM_TICK_SWEEP, MEM_TICK_POP);
    mem_limits_maintain(sh, now, MEM_TICK_REHASH, MEM_TICK_SWEEP);
}

void mem_dict_step(struct store_memory_shared *sh, struct mem_dict *d, size_t rehash, uint64_t now)
{
    mem_rehash_step(sh, d, rehash, now);
    mem_maybe_resize(sh, d, now);
}

void mem_sweep_more(struct store_memory_shared *sh, uint64_t now)
{
    mem_sweep(sh, MEM_FULL_SWEEP, now);
}

/* ---- lookups and inserts ---- */

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

/* Whether entry e's skey is skey (or, with scope_prefix, has a scope that
 * starts with skey's scope part and the same key part). */
static bool mem_admin_match(const struct store_memory_shared *sh, const struct mem_entry *e,
                            const char *skey, size_t len, bool scope_prefix)
{
    if (e->key_len < sh->prefix_len + 2) return false;
    const char *es = e->data + sh->prefix_len + 1;
    size_t elen = e->key_len - sh->prefix_len - 2;
    if (!scope_prefix) return elen == len && memcmp(es, skey, len) == 0;
    const char *colon = memchr(skey, ':', len);
    const char *ecolon = memchr(es, ':', elen);
    if (!colon || !ecolon) return false;
    size_t sl = (size_t)(colon - skey), esl = (size_t)(ecolon - es);
    size_t kl = len - sl - 1, ekl = elen - esl - 1;
    return esl >= sl && memcmp(es, skey, sl) == 0 && ekl == kl &&
           memcmp(ecolon + 1, colon + 1, kl) == 0;
}

struct mem_entry *mem_admin_find(struct store_memory_shared *sh, const char *skey, size_t len,
                                 bool scope_prefix, uint64_t now)
{
    if (!scope_prefix) { /* one hash lookup */
        struct mem_skey k;
        mem_skey_hash(sh, &k, skey, len, false);
        size_t key_len;
        char *key = mem_key(sh, skey, len, &key_len);
        return mem_find(sh, key, key_len, k.h, now);
    }
    /* a scope prefix: every entry (the admin's rare question) */
    for (int t = 0; t < mem_dict_tables(&sh->keys); t++) {
        struct mem_table *tab = &sh->keys.ht[t];
        for (size_t b = 0; b < tab->size; b++)
            for (struct mem_node *n = tab->b[b]; n; n = n->next) {
                struct mem_entry *e = (struct mem_entry *)n;
                if (e->expires_ms > now && mem_admin_match(sh, e, skey, len, scope_prefix))
                    return e;
            }
    }
    return NULL;
}

/* One operation's lookup: builds its key "<prefix>{<skey>}" into the
 * table's scratch (*key, valid until the next operation), does the
 * operation's bounded share of maintenance (MEM_OP_*), and returns the
 * live entry for the key, or NULL (an expired one is dropped first). */
static struct mem_entry *mem_lookup(struct store_memory_shared *sh, const struct mem_skey *k,
                                    char **key, size_t *key_len, uint64_t now)
{
    *key = mem_key(sh, k->skey, k->len, key_len);
    mem_maintain(sh, now, MEM_OP_REHASH, MEM_OP_SWEEP, MEM_OP_POP);
    return mem_find(sh, *key, *key_len, k->h, now);
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

/* ---- the operations' decisions ---- */

/* The acquire decision, the same table as the Redis script. */
void mem_acquire_locked(struct store_memory_shared *sh, const struct mem_skey *k, const uint8_t *fp,
                        const char *token, uint32_t lock_ms, struct store_acquire_reply *reply,
                        uint8_t **record)
{
    uint64_t now = mem_now_ms();
    char *key;
    size_t key_len;
    struct mem_entry *e = mem_lookup(sh, k, &key, &key_len, now);
    if (!e) {
        e = mem_insert(sh, k, key, key_len, now);
        if (!e) {
            reply->state = STORE_ACQ_ERROR;
        } else {
            memcpy(e->u.token, token, STORE_TOKEN_LEN);
            memcpy(e->fp, fp, STORE_FP_LEN);
            e->expires_ms = now + lock_ms;
            reply->state = STORE_ACQ_LOCKED;
        }
    } else if (memcmp(e->fp, fp, STORE_FP_LEN) != 0) {
        reply->state = STORE_ACQ_MISMATCH;
    } else if (!e->completed) {
        reply->state = STORE_ACQ_IN_PROGRESS;
    } else {
        reply->state = STORE_ACQ_COMPLETED;
        *record = mem_alloc(e->record_len);
        memcpy(*record, e->data + e->key_len, e->record_len);
        reply->record = *record;
        reply->record_len = e->record_len;
    }
}

/* complete / release / renew: each acts only on an in-progress entry that
 * the token owns; returns 1 when it acted, 0 otherwise, -1 when a record
 * does not fit (the lock is then kept until it expires, as when Redis
 * fails to store one). */
int mem_owned_locked(struct store_memory_shared *sh, enum mem_owned_action action,
                     const struct mem_skey *k, const char *token, const uint8_t *record,
                     size_t record_len, uint64_t expire_after_ms)
{
    uint64_t now = mem_now_ms();
    char *key;
    size_t key_len;
    struct mem_entry *e = mem_lookup(sh, k, &key, &key_len, now);
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
