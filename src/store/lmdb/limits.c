/* limits.c — the LMDB store's limits (store_limit, store.h): one value per
 * scope in the limits database while it has a live rate state or a live
 * slot, and the decisions of limit, limit_release and limit_renew on it,
 * each in one write transaction: the memory store's rules (GCRA kept
 * exact in integers; leased slots), on the wall clock, shared by every
 * process on the environment.
 *
 *   limits  scope -> struct lm_lim_hdr, then n_leases struct lm_lease
 *
 * A limit is in the expiry index ('L') at the moment nothing of it is
 * live any more (its rate state's end, or its last lease's); the sweep
 * reaps it then. Limits are charged to the store's bytes, not to a
 * scope's, as in the memory store. Owns nothing beyond the call. */
#include "internal.h"

#include "idemgate/store/gcra.h"

#include <string.h>

#define LM_LIMIT_SCOPE_MAX 200

struct lm_lim_hdr {
    struct gcra rate; /* store/gcra.h; all zero: none */
    uint32_t n_leases;
};

struct lm_lease {
    char token[STORE_TOKEN_LEN];
    uint64_t expires_ms;
};

/* A limit read into memory (leases malloc'd with room for one more). */
struct lm_lim {
    bool had; /* stored before */
    uint64_t old_dead, old_cost;
    struct lm_lim_hdr h;
    struct lm_lease *leases;
};

static uint64_t lm_lim_cost(size_t len, uint32_t n)
{
    return LM_LIMIT_OVERHEAD + len + sizeof(struct lm_lim_hdr) +
           (uint64_t)n * sizeof(struct lm_lease);
}

static uint64_t lm_lim_dead(const struct lm_lim *l)
{
    uint64_t d = l->h.rate.until;
    for (uint32_t i = 0; i < l->h.n_leases; i++)
        if (l->leases[i].expires_ms > d) d = l->leases[i].expires_ms;
    return d;
}

static void lm_lim_purge(struct lm_lim *l, uint64_t now)
{
    for (uint32_t i = 0; i < l->h.n_leases;) {
        if (l->leases[i].expires_ms <= now)
            l->leases[i] = l->leases[--l->h.n_leases];
        else
            i++;
    }
    if (l->h.rate.until <= now) memset(&l->h, 0, offsetof(struct lm_lim_hdr, n_leases));
}

static void lm_lim_load(struct lm_txn *x, const char *scope, size_t len, struct lm_lim *l)
{
    memset(l, 0, sizeof(*l));
    MDB_val k = {len, (void *)scope}, v;
    if (mdb_get(x->t, x->e->limits, &k, &v) == 0 && v.mv_size >= sizeof(l->h)) {
        memcpy(&l->h, v.mv_data, sizeof(l->h));
        size_t n = (v.mv_size - sizeof(l->h)) / sizeof(struct lm_lease);
        if (l->h.n_leases > n) l->h.n_leases = (uint32_t)n;
        l->had = true;
        l->old_cost = lm_lim_cost(len, l->h.n_leases);
        l->leases = lm_alloc((l->h.n_leases + 1) * sizeof(struct lm_lease));
        memcpy(l->leases, (const uint8_t *)v.mv_data + sizeof(l->h),
               l->h.n_leases * sizeof(struct lm_lease));
        l->old_dead = lm_lim_dead(l);
    } else {
        l->leases = lm_alloc(sizeof(struct lm_lease));
    }
    lm_lim_purge(l, x->now);
}

/* Writes l back (or removes it when nothing of it is live), with its
 * expiry index key and its bytes. */
static void lm_lim_store(struct lm_txn *x, const char *scope, size_t len, struct lm_lim *l)
{
    MDB_val k = {len, (void *)scope};
    if (l->had) lm_expiry_del(x, l->old_dead, 'L', scope, len);
    uint64_t dead = lm_lim_dead(l);
    uint64_t cost = 0;
    if (dead <= x->now) {
        if (l->had) lm_note(x, mdb_del(x->t, x->e->limits, &k, NULL));
    } else {
        size_t n = sizeof(l->h) + l->h.n_leases * sizeof(struct lm_lease);
        MDB_val v = {n, NULL};
        int rc = mdb_put(x->t, x->e->limits, &k, &v, MDB_RESERVE);
        lm_note(x, rc);
        if (rc) return;
        memcpy(v.mv_data, &l->h, sizeof(l->h));
        memcpy((uint8_t *)v.mv_data + sizeof(l->h), l->leases,
               l->h.n_leases * sizeof(struct lm_lease));
        lm_expiry_put(x, dead, 'L', scope, len);
        cost = lm_lim_cost(len, l->h.n_leases);
    }
    x->tot.bytes += cost - l->old_cost;
    x->tot.limit_bytes += cost - l->old_cost;
    x->dirty = true;
}

static struct lm_lease *lm_lease_find(struct lm_lim *l, const char *token)
{
    for (uint32_t i = 0; i < l->h.n_leases; i++)
        if (memcmp(l->leases[i].token, token, STORE_TOKEN_LEN) == 0) return &l->leases[i];
    return NULL;
}

static void lm_limit_decide(struct lm_txn *x, struct lm_limit_args *la, struct lm_lim *l)
{
    const struct store_limit_args *a = la->a;
    struct store_limit_reply *reply = &la->reply;
    bool rate = a->requests > 0;
    bool slot = a->take_slot && a->concurrent > 0;
    struct gcra next;
    if (rate && !gcra_take(&l->h.rate, a, x->now, reply, &next)) return;
    struct lm_lease *mine = slot ? lm_lease_find(l, la->token) : NULL;
    bool take = slot && l->h.n_leases < a->concurrent;
    if (!rate && !take) {
        reply->verdict = STORE_LIMIT_CONCURRENCY;
        return;
    }
    uint32_t n_after = l->h.n_leases + (take && !mine ? 1 : 0);
    uint64_t grow = lm_lim_cost(la->scope_len, n_after);
    if (grow > l->old_cost && lm_evict_for(x, grow - l->old_cost) < 0) {
        memset(reply, 0, sizeof(*reply));
        reply->verdict = STORE_LIMIT_ERROR;
        return;
    }
    if (rate) l->h.rate = next;
    if (take) {
        if (!mine) {
            mine = &l->leases[l->h.n_leases++];
            memcpy(mine->token, la->token, STORE_TOKEN_LEN);
        }
        mine->expires_ms = x->now + a->lease_ms;
    } else if (slot) {
        reply->verdict = STORE_LIMIT_CONCURRENCY; /* the request still counted */
    }
    lm_lim_store(x, la->scope, la->scope_len, l);
}

int lm_limit_txn(struct lm_txn *x, void *arg)
{
    struct lm_limit_args *la = arg;
    const struct store_limit_args *a = la->a;
    memset(&la->reply, 0, sizeof(la->reply));
    if (la->scope_len > LM_LIMIT_SCOPE_MAX) {
        la->reply.verdict = STORE_LIMIT_ERROR;
        return 0;
    }
    la->reply.verdict = STORE_LIMIT_ALLOWED;
    if (!(a->requests > 0) && !(a->take_slot && a->concurrent > 0)) return 0;
    struct lm_lim l;
    lm_lim_load(x, la->scope, la->scope_len, &l);
    lm_limit_decide(x, la, &l);
    free(l.leases);
    return x->err;
}

int lm_lease_txn(struct lm_txn *x, void *arg)
{
    struct lm_limit_args *la = arg;
    la->status = -1;
    if (la->scope_len > LM_LIMIT_SCOPE_MAX) return 0;
    struct lm_lim l;
    lm_lim_load(x, la->scope, la->scope_len, &l);
    struct lm_lease *mine = lm_lease_find(&l, la->token);
    la->status = mine ? 1 : 0;
    if (mine) {
        if (la->renew)
            mine->expires_ms = x->now + la->lease_ms;
        else
            *mine = l.leases[--l.h.n_leases];
        lm_lim_store(x, la->scope, la->scope_len, &l);
    }
    free(l.leases);
    return x->err;
}

void lm_limit_reap(struct lm_txn *x, const char *scope, size_t len)
{
    struct lm_lim l;
    lm_lim_load(x, scope, len, &l);
    if (l.had) lm_lim_store(x, scope, len, &l);
    free(l.leases);
}
