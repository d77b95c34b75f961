/* redis.c — the Redis store's public face (store.h).
 *
 * Owns struct store_redis, the store_ops table (acquire, complete,
 * release, renew, ping, free), building keys, and store_redis_new, which
 * starts the mode's connections. The overview of the backend is in
 * redis_internal.h. Small helpers shared by the backend's files live
 * here too. */
#include "redis_internal.h"

#include "idemgate/core/clock.h"
#include "idemgate/core/log.h"

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

uint64_t rs_now_ms(void)
{
    return clock_now_ms();
}

struct timeval rs_tv(uint64_t ms)
{
    struct timeval tv = {(time_t)(ms / 1000), (suseconds_t)(ms % 1000) * 1000};
    return tv;
}

int rs_timeout_ms(const struct store_redis *s)
{
    return s->cfg->redis.timeout_ms > 0 ? s->cfg->redis.timeout_ms : 1000;
}

bool rs_usable(const struct rconn *c)
{
    return c->ac && !(c->ac->c.flags & (REDIS_DISCONNECTING | REDIS_FREEING));
}

bool reply_is_error(const redisReply *r, const char *prefix)
{
    size_t n = strlen(prefix);
    return r->type == REDIS_REPLY_ERROR && r->str && r->len >= n &&
           strncmp(r->str, prefix, n) == 0 && (r->len == n || r->str[n] == ' ');
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

static void rs_acquire(struct store *base, const char *skey, size_t skey_len,
                       const uint8_t fp[STORE_FP_LEN], const char token[STORE_TOKEN_LEN],
                       uint32_t lock_ms, store_acquire_cb cb, void *arg)
{
    struct store_redis *s = (struct store_redis *)base;
    size_t klen;
    char *key = rs_key(s, skey, skey_len, &klen);
    char ms[16];
    snprintf(ms, sizeof(ms), "%u", lock_ms);
    const char *args[4] = {key, (const char *)fp, token, ms};
    size_t lens[4] = {klen, STORE_FP_LEN, STORE_TOKEN_LEN, strlen(ms)};
    struct rop *op = rop_new(s, ROP_ACQUIRE, RS_ACQUIRE, 4, args, lens);
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

static void rs_ping(struct store *base, store_done_cb cb, void *arg)
{
    struct store_redis *s = (struct store_redis *)base;
    struct rop *op = rop_new(s, ROP_PING, RS_ACQUIRE, 0, NULL, NULL);
    op->done_cb = cb;
    op->arg = arg;
    rop_start(op);
}

/* Ops still owed a reply by hiredis become orphans (s = NULL, done) and
 * are freed by the NULL-reply callbacks that redisAsyncFree runs; an op
 * whose user callback is running is freed by rop_finish when it returns.
 * Called from inside a store callback, redisAsyncFree is postponed by
 * hiredis until that callback returns (REDIS_IN_CALLBACK), which the
 * orphans tolerate. */
static void rs_free(struct store *base)
{
    struct store_redis *s = (struct store_redis *)base;
    struct rop *op = s->ops;
    while (op) {
        struct rop *next = op->next;
        op->s = NULL;
        op->conn = NULL;
        op->prev = op->next = NULL;
        op->done = true;
        if (op->timer) event_free(op->timer);
        op->timer = NULL;
        rop_maybe_free(op);
        op = next;
    }
    s->ops = NULL;
    while (s->gb_head) /* their releases in flight were just dropped */
        gb_free(s->gb_head);
    if (s->sent_ac) {
        redisAsyncContext *ac = s->sent_ac;
        s->sent_ac = NULL;
        sentinel_free_ac(ac, false);
    }
    struct rconn *c = s->conns;
    while (c) {
        struct rconn *next = c->next;
        rc_free(c);
        c = next;
    }
    if (s->refresh_ev) event_free(s->refresh_ev);
    if (s->refresh_deadline_ev) event_free(s->refresh_deadline_ev);
    if (s->sent_timer) event_free(s->sent_timer);
    free(s->slots);
    free(s->prefix);
    free(s);
}

static const struct store_ops rs_ops = {
    .name = "redis",
    .acquire = rs_acquire,
    .complete = rs_complete,
    .release = rs_release,
    .renew = rs_renew,
    .ping = rs_ping,
    .free = rs_free,
};

struct store *store_redis_new(struct event_base *base, const struct cfg *cfg)
{
    struct store_redis *s = rs_alloc(sizeof(*s));
    s->base.ops = &rs_ops;
    s->evb = base;
    s->cfg = cfg;
    s->mode = cfg->redis.mode;
    const char *p = cfg->redis.key_prefix ? cfg->redis.key_prefix : "";
    s->prefix = rs_strndup(p, strlen(p));
    for (int i = 0; i < RS_NSCRIPTS; i++)
        rs_sha1_hex(rs_scripts[i], s->sha[i]);
    bool nodes = cfg->redis.nodes.n > 0 && cfg->redis.node_addrs;
    if (s->mode == CFG_REDIS_SENTINEL && (!nodes || !cfg->redis.master_name)) {
        log_msg(LOG_ERROR, "store redis: sentinel mode needs redis.nodes and redis.master_name");
        s->mode = CFG_REDIS_STANDALONE;
    }
    if (s->mode == CFG_REDIS_CLUSTER && !nodes) {
        log_msg(LOG_ERROR, "store redis: cluster mode needs redis.nodes");
        s->mode = CFG_REDIS_STANDALONE;
    }
    if (s->mode == CFG_REDIS_CLUSTER) {
        rs_start_cluster(s);
    } else if (s->mode == CFG_REDIS_SENTINEL) {
        rs_start_sentinel(s);
    } else {
        const char *host = cfg->redis.host ? cfg->redis.host : "127.0.0.1";
        s->main = rc_new(s, RC_STANDALONE, rs_strndup(host, strlen(host)),
                         cfg->redis.port ? cfg->redis.port : 6379, cfg->redis.unix_socket);
        rc_connect(s->main);
    }
    return &s->base;
}
