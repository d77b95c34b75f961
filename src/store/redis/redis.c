/* redis.c — the Redis store's public face (store_redis_new in store.h).
 *
 * Owns struct store_redis: the store_ops table (acquire, complete,
 * release, renew, ping, limit, limit_release, limit_renew, free, and the
 * deferred free of rs_enter/rs_leave), turning a store key into the Redis
 * key "<prefix>{<skey>}", a scope into its limit keys
 * "<prefix>{rl:<scope>}" and "<prefix>{rl:<scope>}:s", and the script
 * arguments, and store_redis_new, the one place that reads redis.mode: it
 * picks the topology table once. Also
 * the small helpers every file of the backend uses. Does not own the
 * connections (conn.c), the operations (op.c) or the routing (standalone.c,
 * cluster.c, sentinel.c); the overview is in redis_internal.h. */
#include "redis_internal.h"

#include "idemgate/core/buf.h"
#include "idemgate/core/clock.h"
#include "idemgate/core/log.h"
#include "idemgate/net/tls.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

void *rs_alloc(size_t n)
{
    void *p = calloc(1, n ? n : 1);
    if (!p) abort();
    return p;
}

char *rs_strndup(const char *p, size_t n)
{
    char *d = rs_alloc(n + 1);
    if (n) memcpy(d, p, n);
    return d;
}

int rs_timeout_ms(const struct store_redis *s)
{
    return s->cfg->redis.timeout_ms > 0 ? s->cfg->redis.timeout_ms : 1000;
}

/* Whether r is the error "<prefix>" or "<prefix> ...". */
bool rs_reply_is_error(const struct rreply *r, const char *prefix)
{
    size_t n = strlen(prefix);
    return r->type == RREPLY_ERROR && r->len >= n && memcmp(r->str, prefix, n) == 0 &&
           (r->len == n || r->str[n] == ' ');
}

bool rs_reply_is(const struct rreply *r, const char *str)
{
    size_t n = strlen(str);
    return (r->type == RREPLY_STRING || r->type == RREPLY_STATUS || r->type == RREPLY_ERROR) &&
           r->len == n && memcmp(r->str, str, n) == 0;
}

/* "<prefix>{<skey>}" into a fresh buffer; caller frees. */
static char *rs_key(const struct store_redis *s, const char *skey, size_t skey_len, size_t *len)
{
    size_t plen = strlen(s->prefix);
    *len = plen + skey_len + 2;
    char *k = rs_alloc(*len);
    memcpy(k, s->prefix, plen);
    k[plen] = '{';
    memcpy(k + plen + 1, skey, skey_len);
    k[*len - 1] = '}';
    return k;
}

static void rs_acquire(struct store *base, const struct store_acquire_req *req, store_acquire_cb cb,
                       void *arg)
{
    const char *skey = req->skey, *token = req->token;
    size_t skey_len = req->skey_len;
    const uint8_t *fp = req->fp;
    uint32_t lock_ms = req->lock_ms;
    struct store_redis *s = (struct store_redis *)base;
    size_t klen;
    char *key = rs_key(s, skey, skey_len, &klen);
    char ms[16];
    snprintf(ms, sizeof(ms), "%u", lock_ms);
    char lock[RS_VAL_HDR];
    rs_lock_value(lock, fp, token, clock_wall_ms());
    const char *args[5] = {key, (const char *)fp, token, ms, lock};
    size_t lens[5] = {klen, STORE_FP_LEN, STORE_TOKEN_LEN, strlen(ms), RS_VAL_HDR};
    struct rop *op = rop_new(s, ROP_ACQUIRE, RS_ACQUIRE, 5, args, lens);
    free(key);
    op->acq_cb = cb;
    op->arg = arg;
    rop_start(op);
}

/* complete / release / renew: key, token, then extra arguments. */
static void rs_owned(struct store_redis *s, enum rop_kind kind, enum rs_script script,
                     const char *skey, size_t skey_len, const char *token, int nextra,
                     const char **extra, const size_t *extra_lens, store_done_cb cb, void *arg)
{
    size_t klen;
    char *key = rs_key(s, skey, skey_len, &klen);
    const char *args[4] = {key, token};
    size_t lens[4] = {klen, STORE_TOKEN_LEN};
    for (int i = 0; i < nextra; i++) {
        args[2 + i] = extra[i];
        lens[2 + i] = extra_lens[i];
    }
    struct rop *op = rop_new(s, kind, script, 2 + nextra, args, lens);
    free(key);
    op->done_cb = cb;
    op->arg = arg;
    rop_start(op);
}

static void rs_complete(struct store *base, const char *skey, size_t skey_len,
                        const char token[STORE_TOKEN_LEN], const uint8_t *record, size_t record_len,
                        uint32_t ttl_seconds, store_done_cb cb, void *arg)
{
    char ttl[16];
    snprintf(ttl, sizeof(ttl), "%u", ttl_seconds);
    const char *extra[2] = {(const char *)record, ttl};
    size_t lens[2] = {record_len, strlen(ttl)};
    rs_owned((struct store_redis *)base, ROP_COMPLETE, RS_COMPLETE, skey, skey_len, token, 2, extra,
             lens, cb, arg);
}

static void rs_release(struct store *base, const char *skey, size_t skey_len,
                       const char token[STORE_TOKEN_LEN], store_done_cb cb, void *arg)
{
    rs_owned((struct store_redis *)base, ROP_RELEASE, RS_RELEASE, skey, skey_len, token, 0, NULL,
             NULL, cb, arg);
}

static void rs_renew(struct store *base, const char *skey, size_t skey_len,
                     const char token[STORE_TOKEN_LEN], uint32_t lock_ms, store_done_cb cb,
                     void *arg)
{
    char ms[16];
    snprintf(ms, sizeof(ms), "%u", lock_ms);
    const char *extra[1] = {ms};
    size_t lens[1] = {strlen(ms)};
    rs_owned((struct store_redis *)base, ROP_RENEW, RS_RENEW, skey, skey_len, token, 1, extra, lens,
             cb, arg);
}

/* The longest scope a limit takes (store.h); longer: a store error. */
#define RS_LIMIT_SCOPE_MAX 200

/* The two keys of scope's limits, "<prefix>{rl:<scope>}" (the rate
 * state) and the same with ":s" (the slots), in one fresh buffer (the
 * caller frees it): *len is the first one's length, the second one starts
 * right after it and is 2 bytes longer. */
static char *rs_limit_keys(const struct store_redis *s, const char *scope, size_t scope_len,
                           size_t *len)
{
    size_t plen = strlen(s->prefix);
    *len = plen + 3 + scope_len + 2;
    char *k = rs_alloc(2 * *len + 2);
    memcpy(k, s->prefix, plen);
    memcpy(k + plen, "{rl:", 4);
    memcpy(k + plen + 4, scope, scope_len);
    k[*len - 1] = '}';
    memcpy(k + *len, k, *len);
    memcpy(k + 2 * *len, ":s", 2);
    return k;
}

/* A limit op on scope that fails from the loop: its scope is too long. */
static bool rs_limit_refused(struct rop *op, size_t scope_len)
{
    if (scope_len <= RS_LIMIT_SCOPE_MAX) return false;
    rop_start_on(op, NULL);
    return true;
}

/* One script on scope's limit keys: the rate key (with_rate) and the
 * slots key, then token and the extra arguments. */
static struct rop *rs_limit_op(struct store_redis *s, enum rop_kind kind, enum rs_script script,
                               bool with_rate, const char *scope, size_t scope_len,
                               const char *token, int nextra, const char **extra,
                               const size_t *extra_lens)
{
    if (scope_len > RS_LIMIT_SCOPE_MAX) return rop_new(s, kind, script, 0, NULL, NULL);
    size_t klen;
    char *keys = rs_limit_keys(s, scope, scope_len, &klen);
    const char *args[RS_MAX_ARGS];
    size_t lens[RS_MAX_ARGS];
    int argc = 0;
    if (with_rate) {
        args[argc] = keys;
        lens[argc++] = klen;
    }
    args[argc] = keys + klen;
    lens[argc++] = klen + 2;
    args[argc] = token;
    lens[argc++] = STORE_TOKEN_LEN;
    for (int i = 0; i < nextra; i++) {
        args[argc] = extra[i];
        lens[argc++] = extra_lens[i];
    }
    struct rop *op = rop_new(s, kind, script, argc, args, lens);
    free(keys);
    return op;
}

/* Always one script, even with both limits off (it then answers
 * allowed at once): an unreachable Redis answers STORE_LIMIT_ERROR. */
static void rs_limit(struct store *base, const char *scope, size_t scope_len,
                     const char token[STORE_TOKEN_LEN], const struct store_limit_args *a,
                     store_limit_cb cb, void *arg)
{
    struct store_redis *s = (struct store_redis *)base;
    char n[16], w[16], c[16], lease[16];
    snprintf(n, sizeof(n), "%u", a->requests);
    snprintf(w, sizeof(w), "%u", a->window_ms ? a->window_ms : 1);
    snprintf(c, sizeof(c), "%u", a->take_slot ? a->concurrent : 0);
    snprintf(lease, sizeof(lease), "%u", a->lease_ms);
    const char *extra[4] = {n, w, c, lease};
    size_t lens[4] = {strlen(n), strlen(w), strlen(c), strlen(lease)};
    struct rop *op =
        rs_limit_op(s, ROP_LIMIT, RS_LIMIT, true, scope, scope_len, token, 4, extra, lens);
    op->limit_cb = cb;
    op->arg = arg;
    if (!rs_limit_refused(op, scope_len)) rop_start(op);
}

static void rs_limit_release(struct store *base, const char *scope, size_t scope_len,
                             const char token[STORE_TOKEN_LEN], store_done_cb cb, void *arg)
{
    struct rop *op = rs_limit_op((struct store_redis *)base, ROP_RELEASE, RS_LIMIT_RELEASE, false,
                                 scope, scope_len, token, 0, NULL, NULL);
    op->done_cb = cb;
    op->arg = arg;
    if (!rs_limit_refused(op, scope_len)) rop_start(op);
}

static void rs_limit_renew(struct store *base, const char *scope, size_t scope_len,
                           const char token[STORE_TOKEN_LEN], uint32_t lease_ms, store_done_cb cb,
                           void *arg)
{
    char ms[16];
    snprintf(ms, sizeof(ms), "%u", lease_ms);
    const char *extra[1] = {ms};
    size_t lens[1] = {strlen(ms)};
    struct rop *op = rs_limit_op((struct store_redis *)base, ROP_RENEW, RS_LIMIT_RENEW, false,
                                 scope, scope_len, token, 1, extra, lens);
    op->done_cb = cb;
    op->arg = arg;
    if (!rs_limit_refused(op, scope_len)) rop_start(op);
}

/* A glob pattern matching text literally (SCAN MATCH). */
static void rs_glob_escape(struct buf *out, const char *p, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        if (p[i] == '*' || p[i] == '?' || p[i] == '[' || p[i] == ']' || p[i] == '\\')
            buf_append(out, "\\", 1);
        buf_append(out, &p[i], 1);
    }
}

void store_redis_key(struct store *base, const char *skey, size_t skey_len, bool scope_prefix,
                     bool forget, store_key_cb cb, void *arg)
{
    struct store_redis *s = (struct store_redis *)base;
    struct buf first;
    buf_init(&first);
    const char *colon = memchr(skey, ':', skey_len);
    if (scope_prefix && colon) {
        /* "<prefix>{<scope>*:<key>}" with everything but the * literal */
        size_t sl = (size_t)(colon - skey);
        rs_glob_escape(&first, s->prefix, strlen(s->prefix));
        buf_append(&first, "{", 1);
        rs_glob_escape(&first, skey, sl);
        buf_append(&first, "*:", 2);
        rs_glob_escape(&first, colon + 1, skey_len - sl - 1);
        buf_append(&first, "}", 1);
    } else {
        size_t klen;
        char *key = rs_key(s, skey, skey_len, &klen);
        buf_append(&first, key, klen);
        free(key);
    }
    /* argv: the key (or the SCAN pattern), the forget flag, the key part
     * a SCAN match must have exactly (the pattern's * may span a ':') */
    const char *want = colon ? colon + 1 : skey;
    size_t want_len = colon ? skey_len - (size_t)(colon - skey) - 1 : skey_len;
    const char *args[3] = {buf_data(&first), forget ? "1" : "0", want};
    size_t lens[3] = {buf_size(&first), 1, want_len};
    struct rop *op = rop_new(s, ROP_KEY, RS_INSPECT, 3, args, lens);
    buf_free(&first);
    op->key_cb = cb;
    op->arg = arg;
    if (scope_prefix && colon) {
        op->stage = ROP_SCAN;
        strcpy(op->cursor, "0");
        if (s->topo->slots) { /* every node in turn, from the first */
            struct rconn *c = s->conns;
            while (c && !rc_ensure(c))
                c = c->next;
            rop_start_on(op, c);
            return;
        }
    }
    rop_start(op);
}

static void rs_ping(struct store *base, store_done_cb cb, void *arg)
{
    struct store_redis *s = (struct store_redis *)base;
    struct rop *op = rop_new(s, ROP_PING, RS_ACQUIRE, 0, NULL, NULL);
    op->done_cb = cb;
    op->arg = arg;
    rop_start(op);
}

/* Frees everything: ops and give-backs without their callbacks, the
 * connections with what they owe, the topology, the timers. */
static void rs_free_now(struct store_redis *s)
{
    rop_free_all(s);
    while (!TAILQ_EMPTY(&s->gb)) /* their releases in flight were just dropped */
        gb_free(TAILQ_FIRST(&s->gb));
    struct rconn *c = s->conns;
    while (c) {
        struct rconn *next = c->next;
        rc_free(c);
        c = next;
    }
    s->conns = NULL;
    s->topo->free(s);
    event_free(s->deadline_ev);
    event_free(s->fail_ev);
    free(s->prefix);
    free(s);
}

/* A TLS session for a connection to host (rediss://), or NULL. */
struct ssl_st *rs_tls_new(struct store_redis *s, const char *host)
{
    return tls_redis_new(s->tls_set, host);
}

void rs_enter(struct store_redis *s)
{
    s->depth++;
}

bool rs_leave(struct store_redis *s)
{
    if (--s->depth > 0) return !s->freeing;
    if (!s->freeing) return true;
    rs_free_now(s);
    return false;
}

/* Ops in flight are dropped without their callbacks. Called from inside a
 * store callback (depth > 0), the store is only marked: no callback of it
 * fires any more, and the outermost of its libevent callbacks frees it
 * when it unwinds. */
static void rs_free(struct store *base)
{
    struct store_redis *s = (struct store_redis *)base;
    if (s->depth > 0) {
        s->freeing = true;
        struct rop *op;
        TAILQ_FOREACH (op, &s->ops, link)
            op->state = ROP_DONE;
        return;
    }
    rs_free_now(s);
}

static const struct store_ops rs_ops = {
    .name = "redis",
    .acquire = rs_acquire,
    .complete = rs_complete,
    .release = rs_release,
    .renew = rs_renew,
    .ping = rs_ping,
    .limit = rs_limit,
    .limit_release = rs_limit_release,
    .limit_renew = rs_limit_renew,
    .free = rs_free,
};

/* The one place the mode is read: its topology, or standalone when the
 * mode lacks what it needs (only a struct cfg built by hand can; config
 * refuses it). */
static const struct rs_topology_ops *rs_topology_for(const struct cfg_redis *rc)
{
    bool nodes = rc->nodes.n > 0 && rc->node_addrs;
    switch (rc->mode) {
    case CFG_REDIS_SENTINEL:
        if (nodes && rc->master_name) return &rs_sentinel_ops;
        log_msg(LOG_ERROR, "store redis: sentinel mode needs redis.nodes and redis.master_name");
        break;
    case CFG_REDIS_CLUSTER:
        if (nodes) return &rs_cluster_ops;
        log_msg(LOG_ERROR, "store redis: cluster mode needs redis.nodes");
        break;
    case CFG_REDIS_STANDALONE:
        break;
    }
    return &rs_standalone_ops;
}

/* cfg and tls are borrowed and must outlive the store; connecting starts
 * at once (on base) and no callback runs from in here. */
struct store *store_redis_new(struct event_base *base, const struct cfg *cfg,
                              const struct tls_set *tls)
{
    struct store_redis *s = rs_alloc(sizeof(*s));
    s->base.ops = &rs_ops;
    s->evb = base;
    s->cfg = cfg;
    const char *p = cfg->redis.key_prefix ? cfg->redis.key_prefix : "";
    s->prefix = rs_strndup(p, strlen(p));
    rs_scripts_hash(s->sha);
    s->tls = cfg->redis.tls;
    s->tls_set = tls;
    TAILQ_INIT(&s->ops);
    TAILQ_INIT(&s->spare);
    TAILQ_INIT(&s->gb);
    rop_timers_new(s);
    s->topo = rs_topology_for(&cfg->redis);
    s->topo->init(s);
    return &s->base;
}
