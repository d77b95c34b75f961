/* limits.c — the memory store's limits table (store_limit, store.h): one
 * struct mem_limit per scope that has a live rate state or a live slot,
 * in sh->limits ("<scope>" -> mem_limit), and the decisions of limit,
 * limit_release and limit_renew on it: the same as the Redis limit
 * scripts (scripts.c), on the process's monotonic clock instead of TIME.
 *
 * The rate is a GCRA kept exact in integers (store/gcra.h): a request
 * adds an emission interval of window_ms / n ms to the theoretical arrival
 * time TAT, and it passes when TAT - now, after it, is at most window_ms
 * (so a burst of n passes at once). The rate state dies at TAT (then it
 * equals no state); a slot dies when its lease lapses; an entry holding
 * neither is dropped, lazily on lookup and by a bounded sweep on every
 * operation and every tick.
 *
 * Owns every struct mem_limit and its leases array; each is charged to
 * the store's bytes (limit_bytes, and the table's buckets), not to a
 * scope: memory.max_scope_bytes does not count them. Room for them is made
 * by evicting completed records (mem_evict_for); when there is none the
 * operation answers STORE_LIMIT_ERROR and nothing changes. Does not own
 * the dict mechanism (table.c) nor the mutex (shared.c): everything here
 * runs under sh->mu. */
#include "internal.h"

#include <string.h>

/* The longest scope name a limit takes (store.h); longer: a store error. */
#define MEM_LIMIT_SCOPE_MAX 200
/* The first leases array of a scope, in slots. */
#define MEM_LEASES_MIN 4

static uint64_t mem_leases_cost(uint32_t cap)
{
    return cap ? (uint64_t)cap * sizeof(struct mem_lease) + MEM_MALLOC_OVERHEAD : 0;
}

static uint64_t mem_limit_cost(size_t name_len)
{
    return sizeof(struct mem_limit) + name_len + MEM_MALLOC_OVERHEAD;
}

static void mem_limit_charge(struct store_memory_shared *sh, struct mem_limit *l, uint64_t n)
{
    l->bytes += n;
    sh->limit_bytes += n;
}

/* Drops the leases that have lapsed (their order is not kept). */
static void mem_leases_purge(struct mem_limit *l, uint64_t now)
{
    for (uint32_t i = 0; i < l->n_leases;) {
        if (l->leases[i].expires_ms <= now)
            l->leases[i] = l->leases[--l->n_leases];
        else
            i++;
    }
}

static struct mem_lease *mem_lease_find(struct mem_limit *l, const char *token)
{
    for (uint32_t i = 0; i < l->n_leases; i++)
        if (memcmp(l->leases[i].token, token, STORE_TOKEN_LEN) == 0) return &l->leases[i];
    return NULL;
}

static void mem_limit_drop(struct store_memory_shared *sh, struct mem_limit *l)
{
    mem_dict_del(&sh->limits, &l->node);
    sh->limit_bytes -= l->bytes;
    free(l->leases);
    free(l);
}

/* Purges l's lapsed leases, and drops l when nothing of it is live any
 * more; true when it was dropped. */
static bool mem_limit_reap(struct store_memory_shared *sh, struct mem_limit *l, uint64_t now)
{
    mem_leases_purge(l, now);
    if (l->n_leases > 0 || l->rate.until > now) return false;
    mem_limit_drop(sh, l);
    return true;
}

/* The live entry of scope, or NULL (a dead one is dropped first). */
static struct mem_limit *mem_limit_find(struct store_memory_shared *sh, const char *scope,
                                        size_t len, uint64_t h, uint64_t now)
{
    if (!sh->limits.ht[0].size) return NULL;
    for (int t = 0; t < mem_dict_tables(&sh->limits); t++) {
        for (struct mem_node *n = mem_dict_chain(&sh->limits, t, h); n; n = n->next) {
            struct mem_limit *l = (struct mem_limit *)n;
            if (n->hash != h || l->name_len != len || memcmp(l->name, scope, len) != 0) continue;
            return mem_limit_reap(sh, l, now) ? NULL : l;
        }
    }
    return NULL;
}

/* A new, empty entry for scope (room for it was made by the caller). */
static struct mem_limit *mem_limit_new(struct store_memory_shared *sh, const char *scope,
                                       size_t len, uint64_t h)
{
    if (!sh->limits.ht[0].size) mem_dict_init(&sh->limits);
    struct mem_limit *l = mem_alloc(sizeof(*l) + len);
    l->node.hash = h;
    l->name_len = len;
    memcpy(l->name, scope, len);
    mem_dict_add(&sh->limits, &l->node);
    mem_limit_charge(sh, l, mem_limit_cost(len));
    return l;
}

/* The leases array's next size when one more is needed (concurrent >
 * n_leases == cap_leases). */
static uint32_t mem_leases_grown(uint32_t cap, uint32_t concurrent)
{
    uint64_t next = cap ? (uint64_t)cap * 2 : MEM_LEASES_MIN;
    return next > concurrent ? concurrent : (uint32_t)next;
}

void mem_limit_locked(struct store_memory_shared *sh, const char *scope, size_t len, uint64_t h,
                      const char *token, const struct store_limit_args *a,
                      struct store_limit_reply *reply, uint64_t now)
{
    memset(reply, 0, sizeof(*reply));
    bool rate = a->requests > 0;
    bool slot = a->take_slot && a->concurrent > 0;
    if (len > MEM_LIMIT_SCOPE_MAX) {
        reply->verdict = STORE_LIMIT_ERROR;
        return;
    }
    reply->verdict = STORE_LIMIT_ALLOWED;
    if (!rate && !slot) return;
    mem_limits_maintain(sh, now, MEM_OP_REHASH, MEM_OP_SWEEP);
    struct mem_limit *l = mem_limit_find(sh, scope, len, h, now);

    /* the rate: refused, nothing is stored */
    static const struct gcra none;
    struct gcra next;
    if (rate && !gcra_take(l ? &l->rate : &none, a, now, reply, &next)) return;

    /* the slot: token's own lease is overwritten, else a free one taken */
    struct mem_lease *mine = slot && l ? mem_lease_find(l, token) : NULL;
    bool take = slot && (l ? l->n_leases : 0) < a->concurrent;
    if (!rate && !take) {
        reply->verdict = STORE_LIMIT_CONCURRENCY;
        return;
    }

    /* room for what changes, before anything does */
    uint32_t cap_leases = l ? l->cap_leases : 0;
    bool grow = take && !mine && (l ? l->n_leases : 0) == cap_leases;
    uint32_t new_cap = grow ? mem_leases_grown(cap_leases, a->concurrent) : cap_leases;
    uint64_t grow_bytes = mem_leases_cost(new_cap) - mem_leases_cost(cap_leases);
    uint64_t need = grow_bytes;
    if (!l)
        need += mem_limit_cost(len) +
                (sh->limits.ht[0].size ? 0 : MEM_INITIAL_BUCKETS * sizeof(struct mem_node *));
    if (need && !mem_evict_for(sh, need, now)) {
        memset(reply, 0, sizeof(*reply));
        reply->verdict = STORE_LIMIT_ERROR;
        return;
    }
    if (!l) l = mem_limit_new(sh, scope, len, h);
    if (rate) l->rate = next;
    if (!take) {
        if (slot) reply->verdict = STORE_LIMIT_CONCURRENCY; /* the request still counted */
        return;
    }
    if (grow) {
        struct mem_lease *p = realloc(l->leases, (size_t)new_cap * sizeof(*p));
        if (!p) abort();
        l->leases = p;
        l->cap_leases = new_cap;
        mem_limit_charge(sh, l, grow_bytes);
    }
    if (!mine) {
        mine = &l->leases[l->n_leases++];
        memcpy(mine->token, token, STORE_TOKEN_LEN);
    }
    mine->expires_ms = now + a->lease_ms;
}

int mem_limit_lease_locked(struct store_memory_shared *sh, const char *scope, size_t len,
                           uint64_t h, const char *token, bool renew, uint32_t lease_ms,
                           uint64_t now)
{
    if (len > MEM_LIMIT_SCOPE_MAX) return -1;
    mem_limits_maintain(sh, now, MEM_OP_REHASH, MEM_OP_SWEEP);
    struct mem_limit *l = mem_limit_find(sh, scope, len, h, now);
    struct mem_lease *mine = l ? mem_lease_find(l, token) : NULL;
    if (!mine) return 0;
    if (renew) {
        mine->expires_ms = now + lease_ms;
    } else {
        *mine = l->leases[--l->n_leases];
        mem_limit_reap(sh, l, now);
    }
    return 1;
}

/* Drops the dead entries of the next n buckets of the limits table. */
static void mem_limits_sweep(struct store_memory_shared *sh, size_t n, uint64_t now)
{
    struct mem_table *t = mem_dict_live(&sh->limits);
    for (size_t k = 0; k < n && k < t->size; k++) {
        sh->limit_sweep_pos &= t->size - 1;
        struct mem_node *node = t->b[sh->limit_sweep_pos++];
        while (node) {
            struct mem_node *next = node->next;
            mem_limit_reap(sh, (struct mem_limit *)node, now);
            node = next;
        }
    }
}

void mem_limits_maintain(struct store_memory_shared *sh, uint64_t now, size_t rehash, size_t sweep)
{
    if (!sh->limits.ht[0].size) return; /* no limit yet */
    mem_dict_step(sh, &sh->limits, rehash, now);
    mem_limits_sweep(sh, sweep, now);
}

void mem_limits_free(struct store_memory_shared *sh)
{
    for (int t = 0; t < 2; t++) {
        struct mem_table *tab = &sh->limits.ht[t];
        for (size_t i = 0; i < tab->size; i++) {
            struct mem_node *n = tab->b[i];
            while (n) {
                struct mem_node *next = n->next;
                free(((struct mem_limit *)n)->leases);
                free(n);
                n = next;
            }
        }
        free(tab->b);
    }
}
