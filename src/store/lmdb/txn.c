/* txn.c — the LMDB store's write transaction (struct lm_txn) and what
 * every operation does inside one: entries and their keys, the per-scope
 * bookkeeping and the heap of scopes by bytes, the index of completed
 * records by (scope, completion) and of everything by expiry, making
 * room by the memory store's eviction rules, and the bounded expiry
 * sweep. The layout is in docs/stores.md.
 *
 *   entries  entry key -> struct lm_hdr, skey, record
 *   scopes   scope -> struct lm_scope
 *   heap     be64(bytes) scope -> ""   (scopes holding a completed record)
 *   done     be16(len) scope be64(seq) -> entry key   (completion order)
 *   expiry   be64(expires_ms) 'E' entry key | 'L' scope -> ""
 *   limits   scope -> a limit (limits.c)
 *   meta     "layout" -> LM_LAYOUT, "totals" -> struct lm_totals
 *
 * Owns nothing beyond each transaction, which lm_run begins and ends.
 * Does not own the environment (env.c), the decisions on a key (keys.c)
 * or the limits (limits.c). */
#include "internal.h"

#include "idemgate/core/log.h"
#include "idemgate/core/metrics.h"

#include <stdio.h>
#include <string.h>
#include <xxhash.h>

size_t lm_scope_len(const char *skey, size_t len)
{
    const char *colon = memchr(skey, ':', len);
    size_t n = colon ? (size_t)(colon - skey) : len;
    return n > LM_SCOPE_MAX ? LM_SCOPE_MAX : n;
}

static void be64_put(uint8_t *p, uint64_t v)
{
    for (int i = 7; i >= 0; i--) {
        p[i] = (uint8_t)v;
        v >>= 8;
    }
}

static uint64_t be64_get(const uint8_t *p)
{
    uint64_t v = 0;
    for (int i = 0; i < 8; i++)
        v = v << 8 | p[i];
    return v;
}

void lm_note(struct lm_txn *x, int rc)
{
    if (rc == 0 || rc == MDB_NOTFOUND) {
        if (rc == 0) x->dirty = true;
        return;
    }
    if (!x->err) x->err = rc;
}

static bool lm_warn_due(_Atomic uint64_t *last, uint64_t now)
{
    uint64_t prev = atomic_load(last);
    if (prev && now - prev < LM_WARN_EVERY_MS) return false;
    return atomic_compare_exchange_strong(last, &prev, now);
}

/* ---- keys ---- */

size_t lm_entry_key(const char *skey, size_t len, char *out)
{
    if (len <= LM_KEY_MAX) {
        memcpy(out, skey, len);
        return len;
    }
    XXH128_hash_t h = XXH3_128bits(skey, len);
    memcpy(out, skey, LM_KEY_CUT);
    int n = snprintf(out + LM_KEY_CUT, LM_KEY_MAX + 1 - LM_KEY_CUT, "#%016llx%016llx",
                     (unsigned long long)h.high64, (unsigned long long)h.low64);
    return LM_KEY_CUT + (size_t)n;
}

static size_t lm_done_key(uint8_t *out, const char *scope, size_t slen, uint64_t seq)
{
    out[0] = (uint8_t)(slen >> 8);
    out[1] = (uint8_t)slen;
    memcpy(out + 2, scope, slen);
    be64_put(out + 2 + slen, seq);
    return 2 + slen + 8;
}

static size_t lm_heap_key(uint8_t *out, const char *scope, size_t slen, uint64_t bytes)
{
    be64_put(out, bytes);
    memcpy(out + 8, scope, slen);
    return 8 + slen;
}

static size_t lm_expiry_key(uint8_t *out, uint64_t at, char type, const char *name, size_t len)
{
    be64_put(out, at);
    out[8] = (uint8_t)type;
    memcpy(out + 9, name, len);
    return 9 + len;
}

void lm_expiry_put(struct lm_txn *x, uint64_t at, char type, const char *name, size_t len)
{
    uint8_t k[9 + LM_KEY_MAX];
    MDB_val kv = {lm_expiry_key(k, at, type, name, len), k}, v = {0, ""};
    lm_note(x, mdb_put(x->t, x->e->expiry, &kv, &v, 0));
}

void lm_expiry_del(struct lm_txn *x, uint64_t at, char type, const char *name, size_t len)
{
    uint8_t k[9 + LM_KEY_MAX];
    MDB_val kv = {lm_expiry_key(k, at, type, name, len), k};
    lm_note(x, mdb_del(x->t, x->e->expiry, &kv, NULL));
}

/* ---- the transaction ---- */

static int lm_begin(struct store_lmdb_env *e, struct lm_txn *x)
{
    memset(x, 0, sizeof(*x));
    x->e = e;
    int rc = mdb_txn_begin(e->env, NULL, 0, &x->t);
    if (rc) return rc;
    x->now = clock_wall_ms();
    MDB_val k = {6, "totals"}, v;
    rc = mdb_get(x->t, e->meta, &k, &v);
    if (rc == 0 && v.mv_size == sizeof(x->tot))
        memcpy(&x->tot, v.mv_data, sizeof(x->tot));
    else if (rc != MDB_NOTFOUND && rc != 0) {
        mdb_txn_abort(x->t);
        return rc;
    }
    return 0;
}

static int lm_end(struct lm_txn *x, int rc)
{
    if (!rc) rc = x->err;
    if (rc || !x->dirty) {
        mdb_txn_abort(x->t);
        return rc;
    }
    MDB_val k = {6, "totals"}, v = {sizeof(x->tot), &x->tot};
    rc = mdb_put(x->t, x->e->meta, &k, &v, 0);
    if (rc) {
        mdb_txn_abort(x->t);
        return rc;
    }
    rc = mdb_txn_commit(x->t);
    if (!rc && x->e->fsync) atomic_store(&x->e->unsynced, true);
    if (!rc && x->evicted) metrics_add(M_STORE_EVICTIONS, 0, (long long)x->evicted);
    return rc;
}

static int lm_evict_largest(struct lm_txn *x);

/* LMDB said its map is full although the charged bytes fit: its pages
 * (the B-trees' slack, overflow pages, free pages not yet reusable)
 * take more than the budget allows for. Evicts until a quarter of the
 * budget is free, or 64 records went. */
static void lm_relieve(struct store_lmdb_env *e)
{
    struct lm_txn x;
    if (lm_begin(e, &x)) return;
    for (int i = 0; i < 64 && x.tot.bytes > e->budget / 4 * 3 && !x.err; i++)
        if (lm_evict_largest(&x) < 0) break;
    if (x.evicted)
        log_msg(LOG_WARN, "lmdb store: map full (lmdb.max_bytes %llu), evicted %llu records",
                (unsigned long long)e->max_bytes, (unsigned long long)x.evicted);
    lm_end(&x, 0);
}

int lm_run(struct store_lmdb_env *e, int (*fn)(struct lm_txn *x, void *arg), void *arg)
{
    for (int attempt = 0;; attempt++) {
        struct lm_txn x;
        int rc = lm_begin(e, &x);
        if (rc) return rc;
        rc = lm_end(&x, fn(&x, arg));
        if (rc != MDB_MAP_FULL || attempt > 0) return rc;
        lm_relieve(e);
    }
}

void lm_run_batch(struct store_lmdb_env *e, struct lm_jobq *q)
{
    struct lm_txn x;
    struct lm_job *j;
    int rc = lm_begin(e, &x);
    if (!rc) {
        TAILQ_FOREACH (j, q, link) {
            rc = j->fn(&x, j->args);
            if (!rc) rc = x.err;
            if (rc) break;
        }
        rc = lm_end(&x, rc);
    }
    /* Every job's answer is filled again by its run alone. */
    TAILQ_FOREACH (j, q, link)
        j->rc = rc ? lm_run(e, j->fn, j->args) : 0;
}

/* ---- scopes ---- */

bool lm_scope_get(struct lm_txn *x, const char *scope, size_t len, struct lm_scope *out)
{
    memset(out, 0, sizeof(*out));
    MDB_val k = {len, (void *)scope}, v;
    if (mdb_get(x->t, x->e->scopes, &k, &v) != 0 || v.mv_size != sizeof(*out)) return false;
    memcpy(out, v.mv_data, sizeof(*out));
    return true;
}

static void lm_heap_set(struct lm_txn *x, const char *scope, size_t len, uint64_t bytes, bool add)
{
    uint8_t k[8 + LM_SCOPE_MAX];
    MDB_val kv = {lm_heap_key(k, scope, len, bytes), k}, v = {0, ""};
    lm_note(x, add ? mdb_put(x->t, x->e->heap, &kv, &v, 0) : mdb_del(x->t, x->e->heap, &kv, NULL));
}

void lm_charge(struct lm_txn *x, const char *scope, size_t len, int64_t bytes, int64_t done_bytes,
               int64_t entries, int64_t completed)
{
    struct lm_scope sc;
    bool had = lm_scope_get(x, scope, len, &sc);
    if (had && sc.completed > 0) lm_heap_set(x, scope, len, sc.bytes, false);
    sc.bytes += (uint64_t)bytes;
    sc.done_bytes += (uint64_t)done_bytes;
    sc.entries += (uint64_t)entries;
    sc.completed += (uint64_t)completed;
    MDB_val k = {len, (void *)scope};
    if (sc.entries == 0) {
        if (had) {
            lm_note(x, mdb_del(x->t, x->e->scopes, &k, NULL));
            x->tot.scopes--;
        }
    } else {
        MDB_val v = {sizeof(sc), &sc};
        lm_note(x, mdb_put(x->t, x->e->scopes, &k, &v, 0));
        if (!had) x->tot.scopes++;
        if (sc.completed > 0) lm_heap_set(x, scope, len, sc.bytes, true);
    }
    x->tot.bytes += (uint64_t)bytes;
    x->tot.done_bytes += (uint64_t)done_bytes;
    x->tot.entries += (uint64_t)entries;
    x->tot.completed += (uint64_t)completed;
    x->dirty = true;
}

/* ---- entries ---- */

uint64_t lm_entry_cost(size_t key_len, size_t skey_len, size_t rec_len, bool completed,
                       size_t scope_len)
{
    uint64_t n = LM_ENTRY_OVERHEAD + 2 * key_len + sizeof(struct lm_hdr) + skey_len;
    if (completed) n += rec_len + LM_DONE_OVERHEAD + scope_len;
    return n;
}

/* The entry under key, live or not: 1, 0 none (or unreadable: removed). */
int lm_entry_raw(struct lm_txn *x, const char *key, size_t klen, struct lm_entry *out)
{
    MDB_val k = {klen, (void *)key}, v;
    int rc = mdb_get(x->t, x->e->entries, &k, &v);
    if (rc == MDB_NOTFOUND) return 0;
    if (rc) {
        lm_note(x, rc);
        return -1;
    }
    memcpy(out->key, key, klen);
    out->key_len = klen;
    if (v.mv_size < sizeof(struct lm_hdr)) {
        lm_note(x, mdb_del(x->t, x->e->entries, &k, NULL));
        return 0;
    }
    memcpy(&out->h, v.mv_data, sizeof(out->h));
    out->val = v.mv_data;
    out->val_len = v.mv_size;
    if (out->h.version != LM_VERSION ||
        sizeof(struct lm_hdr) + (size_t)out->h.skey_len > v.mv_size) {
        lm_note(x, mdb_del(x->t, x->e->entries, &k, NULL));
        return 0;
    }
    return 1;
}

int lm_entry_find(struct lm_txn *x, const char *skey, size_t len, struct lm_entry *out)
{
    char key[LM_KEY_MAX + 1];
    size_t klen = lm_entry_key(skey, len, key);
    int f = lm_entry_raw(x, key, klen, out);
    if (f <= 0) {
        out->key_len = klen;
        memcpy(out->key, key, klen);
        return f;
    }
    const char *stored = (const char *)out->val + sizeof(struct lm_hdr);
    if (out->h.skey_len != len || memcmp(stored, skey, len) != 0) return -1; /* a hash collision */
    if (out->h.expires_ms > x->now) return 1;
    lm_drop(x, out, skey);
    x->tot.expired++;
    return 0;
}

int lm_entry_put(struct lm_txn *x, const struct lm_entry *en, const char *skey, const uint8_t *rec,
                 size_t rec_len)
{
    size_t n = sizeof(struct lm_hdr) + en->h.skey_len + rec_len;
    MDB_val k = {en->key_len, (void *)en->key}, v = {n, NULL};
    int rc = mdb_put(x->t, x->e->entries, &k, &v, MDB_RESERVE);
    lm_note(x, rc);
    if (rc) return rc;
    uint8_t *p = v.mv_data;
    memcpy(p, &en->h, sizeof(en->h));
    memcpy(p + sizeof(en->h), skey, en->h.skey_len);
    if (rec_len) memcpy(p + sizeof(en->h) + en->h.skey_len, rec, rec_len);
    lm_expiry_put(x, en->h.expires_ms, 'E', en->key, en->key_len);
    return 0;
}

void lm_drop(struct lm_txn *x, const struct lm_entry *en, const char *skey)
{
    char scope[LM_SCOPE_MAX];
    size_t slen = lm_scope_len(skey, en->h.skey_len);
    memcpy(scope, skey, slen); /* skey may point into the map: copy before writing */
    size_t rec_len = en->val_len - sizeof(struct lm_hdr) - en->h.skey_len;
    bool done = en->h.completed;
    uint64_t cost = lm_entry_cost(en->key_len, en->h.skey_len, rec_len, done, slen);
    MDB_val k = {en->key_len, (void *)en->key};
    lm_note(x, mdb_del(x->t, x->e->entries, &k, NULL));
    lm_expiry_del(x, en->h.expires_ms, 'E', en->key, en->key_len);
    if (done) {
        uint8_t dk[2 + LM_SCOPE_MAX + 8];
        MDB_val d = {lm_done_key(dk, scope, slen, en->h.seq), dk};
        lm_note(x, mdb_del(x->t, x->e->done, &d, NULL));
    }
    lm_charge(x, scope, slen, -(int64_t)cost, done ? -(int64_t)cost : 0, -1, done ? -1 : 0);
}

void lm_done_put(struct lm_txn *x, const char *scope, size_t slen, uint64_t seq, const char *key,
                 size_t klen)
{
    uint8_t dk[2 + LM_SCOPE_MAX + 8];
    MDB_val d = {lm_done_key(dk, scope, slen, seq), dk}, v = {klen, (void *)key};
    lm_note(x, mdb_put(x->t, x->e->done, &d, &v, 0));
}

/* ---- eviction ---- */

/* The oldest completed record of scope goes: 1 evicted, 0 it had expired
 * (reclaimed), -1 none. */
static int lm_evict_oldest(struct lm_txn *x, const char *scope, size_t slen)
{
    uint8_t dk[2 + LM_SCOPE_MAX + 8];
    size_t plen = lm_done_key(dk, scope, slen, 0) - 8;
    MDB_cursor *c;
    if (mdb_cursor_open(x->t, x->e->done, &c)) return -1;
    MDB_val k = {plen, dk}, v;
    int rc = mdb_cursor_get(c, &k, &v, MDB_SET_RANGE);
    if (rc || k.mv_size != plen + 8 || memcmp(k.mv_data, dk, plen) != 0) {
        mdb_cursor_close(c);
        return -1;
    }
    char key[LM_KEY_MAX + 1];
    size_t klen = v.mv_size > LM_KEY_MAX ? LM_KEY_MAX : v.mv_size;
    memcpy(key, v.mv_data, klen);
    uint8_t found_dk[2 + LM_SCOPE_MAX + 8];
    size_t dklen = k.mv_size;
    memcpy(found_dk, k.mv_data, dklen);
    mdb_cursor_close(c);
    struct lm_entry en;
    int f = lm_entry_raw(x, key, klen, &en);
    if (f <= 0 || !en.h.completed) { /* a stale index key */
        MDB_val d = {dklen, found_dk};
        lm_note(x, mdb_del(x->t, x->e->done, &d, NULL));
        return f < 0 ? -1 : 0;
    }
    bool expired = en.h.expires_ms <= x->now;
    lm_drop(x, &en, (const char *)en.val + sizeof(struct lm_hdr));
    if (expired) {
        x->tot.expired++;
        return 0;
    }
    x->tot.evictions++;
    x->evicted++;
    return 1;
}

/* The oldest completed record of the scope holding the most bytes. */
static int lm_evict_largest(struct lm_txn *x)
{
    MDB_cursor *c;
    if (mdb_cursor_open(x->t, x->e->heap, &c)) return -1;
    MDB_val k, v;
    int rc = mdb_cursor_get(c, &k, &v, MDB_LAST);
    uint8_t hk[8 + LM_SCOPE_MAX];
    size_t hklen = 0;
    if (rc == 0 && k.mv_size >= 8 && k.mv_size <= sizeof(hk)) {
        hklen = k.mv_size;
        memcpy(hk, k.mv_data, hklen);
    }
    mdb_cursor_close(c);
    if (rc) return -1;
    int r = hklen ? lm_evict_oldest(x, (const char *)hk + 8, hklen - 8) : -1;
    if (r < 0) { /* a heap key without a completed record behind it: drop it */
        MDB_val d = {hklen ? hklen : k.mv_size, hklen ? (void *)hk : k.mv_data};
        lm_note(x, mdb_del(x->t, x->e->heap, &d, NULL));
        return x->err ? -1 : 0;
    }
    return r;
}

static bool lm_fits(const struct lm_txn *x, uint64_t need)
{
    return x->tot.bytes + need <= x->e->budget;
}

/* Whether need would fit once every completed record were gone (locks and
 * limits are never evicted); looks at a few expired ones first. */
static bool lm_can_fit(struct lm_txn *x, uint64_t need)
{
    if (x->tot.bytes - x->tot.done_bytes + need <= x->e->budget) return true;
    lm_sweep(x, LM_FULL_SWEEP);
    return x->tot.bytes - x->tot.done_bytes + need <= x->e->budget;
}

int lm_evict_for(struct lm_txn *x, uint64_t need)
{
    if (lm_fits(x, need)) return 0;
    if (!lm_can_fit(x, need)) return -1;
    uint64_t before = x->evicted;
    int guard = 0;
    while (!lm_fits(x, need) && !x->err && guard++ < 100000)
        if (lm_evict_largest(x) < 0) break;
    if (x->evicted > before && lm_warn_due(&x->e->evict_logged_ms, x->now))
        log_msg(LOG_WARN,
                "lmdb store: full, evicting the oldest completed records of the largest scope "
                "(lmdb.max_bytes %llu)",
                (unsigned long long)x->e->max_bytes);
    return lm_fits(x, need) ? 0 : -1;
}

static int lm_refuse(struct lm_txn *x, const char *what)
{
    x->tot.refused++;
    x->dirty = true;
    if (lm_warn_due(&x->e->refuse_logged_ms, x->now))
        log_msg(LOG_WARN, "lmdb store: full of in-progress locks, refusing new keys (%s)", what);
    return -1;
}

/* Past max_scope_bytes the scope's own oldest completed records go. */
static int lm_scope_room(struct lm_txn *x, const char *scope, size_t slen, uint64_t need)
{
    uint64_t cap = atomic_load(&x->e->max_scope_bytes);
    struct lm_scope sc;
    bool had = lm_scope_get(x, scope, slen, &sc);
    if (!cap || sc.bytes + need <= cap) return 0;
    if (!had) return -1;
    if (sc.bytes - sc.done_bytes + need > cap) {
        lm_sweep(x, LM_FULL_SWEEP);
        lm_scope_get(x, scope, slen, &sc);
        if (sc.bytes - sc.done_bytes + need > cap) return -1;
    }
    while (sc.bytes + need > cap && sc.completed > 0 && !x->err) {
        if (lm_evict_oldest(x, scope, slen) < 0) break;
        lm_scope_get(x, scope, slen, &sc);
    }
    return sc.bytes + need <= cap ? 0 : -1;
}

int lm_make_room(struct lm_txn *x, const char *scope, size_t slen, uint64_t need)
{
    if (!lm_fits(x, need) && !lm_can_fit(x, need)) return lm_refuse(x, "lmdb.max_bytes");
    if (lm_scope_room(x, scope, slen, need) < 0) return lm_refuse(x, "lmdb.max_scope_bytes");
    if (lm_evict_for(x, need) < 0) return lm_refuse(x, "lmdb.max_bytes");
    return 0;
}

/* ---- the expiry sweep ---- */

static void lm_expire_entry(struct lm_txn *x, const char *key, size_t klen)
{
    struct lm_entry en;
    if (lm_entry_raw(x, key, klen, &en) <= 0 || en.h.expires_ms > x->now) return;
    lm_drop(x, &en, (const char *)en.val + sizeof(struct lm_hdr));
    x->tot.expired++;
}

size_t lm_sweep(struct lm_txn *x, size_t n)
{
    size_t done = 0;
    while (done < n && !x->err) {
        MDB_cursor *c;
        if (mdb_cursor_open(x->t, x->e->expiry, &c)) break;
        MDB_val k, v;
        int rc = mdb_cursor_get(c, &k, &v, MDB_FIRST);
        uint8_t ik[9 + LM_KEY_MAX];
        size_t iklen = rc == 0 && k.mv_size <= sizeof(ik) ? k.mv_size : 0;
        if (iklen) memcpy(ik, k.mv_data, iklen);
        mdb_cursor_close(c);
        if (rc) break;
        if (iklen < 9) { /* not ours: dropped */
            lm_note(x, mdb_del(x->t, x->e->expiry, &k, NULL));
            continue;
        }
        if (be64_get(ik) > x->now) break;
        if (ik[8] == 'L')
            lm_limit_reap(x, (const char *)ik + 9, iklen - 9);
        else
            lm_expire_entry(x, (const char *)ik + 9, iklen - 9);
        MDB_val d = {iklen, ik};
        lm_note(x, mdb_del(x->t, x->e->expiry, &d, NULL));
        done++;
    }
    return done;
}
