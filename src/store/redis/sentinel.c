/* sentinel.c — the Redis Sentinel topology (see redis_internal.h).
 *
 * Owns struct rs_sentinel: the connection to the sentinel being asked for
 * redis.master_name's address (one at a time, in redis.nodes order, with
 * the master's user and password, within redis.timeout_ms each); pointing
 * the master connection at the answer; checking with ROLE, as part of its
 * handshake, that it is a master; and failover: a master that goes down,
 * times out or answers READONLY / LOADING / MASTERDOWN is torn down, and
 * when its backoff is over the sentinels are asked again. Every op goes
 * to the master; while none is ready, ops are parked on it (op.c sends
 * them when it is). The master connection is a struct rconn (conn.c);
 * the op in flight when it fails is never retried on another master. */
#include "redis_internal.h"

#include "idemgate/core/log.h"

#include <hiredis/adapters/libevent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* s->topo_state in sentinel mode. */
struct rs_sentinel {
    struct store_redis *s;
    struct rconn *master;  /* its address is the last answer ("?" before) */
    redisAsyncContext *ac; /* the sentinel being asked, or NULL */
    size_t idx;            /* which of redis.nodes */
    bool logged;           /* a whole round failed: quiet until a master is found */
    struct event *timer;   /* the question's deadline */
};

static struct rs_sentinel *st_of(const struct store_redis *s)
{
    return s->topo_state;
}

static void sentinel_ask(struct rs_sentinel *st);

static void sentinel_free_ac(redisAsyncContext *ac, bool disconnect)
{
    ac->data = NULL;
    if (disconnect)
        redisAsyncDisconnect(ac); /* from inside its own callback */
    else
        redisAsyncFree(ac);
}

/* The sentinel at idx did not help: try the next, or start over after
 * the master connection's backoff once all were asked. */
static void sentinel_next(struct rs_sentinel *st, const char *why)
{
    const struct cfg_strlist *nodes = &st->s->cfg->redis.nodes;
    if (!st->logged) log_msg(LOG_WARN, "store redis: sentinel %s: %s", nodes->v[st->idx], why);
    st->idx++;
    if (st->idx < nodes->n) {
        sentinel_ask(st);
        return;
    }
    st->logged = true;
    st->idx = 0;
    rc_schedule_reconnect(st->master);
}

static void sentinel_reply_cb(redisAsyncContext *ac, void *reply, void *priv)
{
    (void)priv;
    struct rs_sentinel *st = ac->data;
    if (!st || st->ac != ac) return;
    st->ac = NULL;
    evtimer_del(st->timer);
    sentinel_free_ac(ac, true);
    const redisReply *r = reply;
    if (r && r->type == REDIS_REPLY_ARRAY && r->elements == 2 &&
        r->element[0]->type == REDIS_REPLY_STRING && r->element[1]->type == REDIS_REPLY_STRING &&
        r->element[0]->len > 0) {
        long port = strtol(r->element[1]->str, NULL, 10);
        if (port > 0 && port <= 65535) {
            rc_set_address(st->master, r->element[0]->str, r->element[0]->len, (int)port);
            rc_connect(st->master);
            return;
        }
    }
    sentinel_next(st, r && r->type == REDIS_REPLY_ERROR && r->str ? r->str
                                                                  : "does not know the master");
}

static void sentinel_on_connect(const redisAsyncContext *ac, int status)
{
    struct rs_sentinel *st = ac->data;
    if (!st || st->ac != ac || status == REDIS_OK) return;
    st->ac = NULL; /* hiredis frees ac after this callback */
    evtimer_del(st->timer);
    sentinel_next(st, ac->errstr[0] ? ac->errstr : "connect failed");
}

static void sentinel_on_disconnect(const redisAsyncContext *ac, int status)
{
    (void)status;
    struct rs_sentinel *st = ac->data;
    if (!st || st->ac != ac) return;
    st->ac = NULL;
    evtimer_del(st->timer);
    sentinel_next(st, ac->errstr[0] ? ac->errstr : "disconnected");
}

static void sentinel_timeout_cb(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    struct rs_sentinel *st = arg;
    redisAsyncContext *ac = st->ac;
    if (!ac) return;
    st->ac = NULL;
    sentinel_free_ac(ac, false);
    sentinel_next(st, "timed out");
}

/* Asks the sentinel at idx for the master's address. */
static void sentinel_ask(struct rs_sentinel *st)
{
    if (st->ac || st->master->ac) return;
    const struct cfg_hostport *at = &st->s->cfg->redis.node_addrs[st->idx];
    char why[128];
    redisAsyncContext *ac = rc_async_connect(at->host, at->port, false, why, sizeof(why));
    if (!ac) {
        sentinel_next(st, why);
        return;
    }
    ac->data = st;
    st->ac = ac;
    redisLibeventAttach(ac, st->s->evb);
    redisAsyncSetConnectCallback(ac, sentinel_on_connect);
    redisAsyncSetDisconnectCallback(ac, sentinel_on_disconnect);
    struct timeval tv = rs_tv((uint64_t)rs_timeout_ms(st->s));
    evtimer_add(st->timer, &tv);
    /* The same user and password as the master (SPEC section 2). Its
     * answer is not awaited: a sentinel that needs it refuses the
     * question with NOAUTH, which is what gets logged; one without a
     * password answers the question anyway. */
    if (rc_send_auth(ac, &st->s->cfg->redis, NULL, NULL) < 0 ||
        redisAsyncCommand(ac, sentinel_reply_cb, NULL, "SENTINEL get-master-addr-by-name %s",
                          st->s->cfg->redis.master_name) != REDIS_OK) {
        st->ac = NULL;
        evtimer_del(st->timer);
        sentinel_free_ac(ac, false);
        sentinel_next(st, "cannot send");
    }
}

static bool sentinel_is_master_role(const redisReply *r)
{
    return r->type == REDIS_REPLY_ARRAY && r->elements >= 1 &&
           r->element[0]->type == REDIS_REPLY_STRING && r->element[0]->len == 6 &&
           memcmp(r->element[0]->str, "master", 6) == 0;
}

static void sentinel_role_cb(redisAsyncContext *ac, void *reply, void *priv)
{
    (void)priv;
    struct rconn *c = rc_of(ac);
    const redisReply *r = reply;
    if (!c || !r) return;
    if (sentinel_is_master_role(r)) {
        rc_handshake_answered(c);
        return;
    }
    log_msg(LOG_WARN, "store redis: %s:%d is not a master (yet); asking the sentinels again",
            c->host, c->port);
    rc_handshake_failed(c);
}

/* ---- the topology table ---- */

/* The master named by a sentinel may be a replica by now (a failover in
 * progress): ROLE says. */
static int sentinel_handshake(struct rconn *c)
{
    return redisAsyncCommand(c->ac, sentinel_role_cb, NULL, "ROLE") == REDIS_OK ? 1 : -1;
}

static enum rs_route sentinel_route(struct rop *op)
{
    struct rconn *m = st_of(op->s)->master;
    op->conn = m;
    return m->ready ? RS_ROUTE_SEND : RS_ROUTE_PARK;
}

/* A master that stopped being one: tear it down, so that the sentinels
 * are asked again; the op fails. */
static bool sentinel_on_error_reply(struct rop *op, const redisReply *r)
{
    bool moved_on = rs_reply_is_error(r, "READONLY") || rs_reply_is_error(r, "LOADING") ||
                    rs_reply_is_error(r, "MASTERDOWN");
    if (!moved_on) return false;
    log_msg(LOG_WARN, "store redis: %s:%d answered %s", op->conn->host, op->conn->port, r->str);
    rc_kill_soon(op->conn);
    rop_fail(op);
    return true;
}

static void sentinel_on_ready(struct rconn *c)
{
    log_msg(LOG_INFO, "store redis: sentinel master %s is %s:%d", c->s->cfg->redis.master_name,
            c->host, c->port);
    st_of(c->s)->logged = false;
}

/* The master's backoff is over: ask the sentinels again, from the first. */
static void sentinel_on_backoff_over(struct rconn *c)
{
    struct rs_sentinel *st = st_of(c->s);
    st->idx = 0;
    sentinel_ask(st);
}

static void sentinel_init(struct store_redis *s)
{
    struct rs_sentinel *st = rs_alloc(sizeof(*st));
    st->s = s;
    st->timer = evtimer_new(s->evb, sentinel_timeout_cb, st);
    if (!st->timer) abort();
    st->master = rc_new(s, rs_strndup("?", 1), 0, false);
    s->topo_state = st;
    sentinel_ask(st);
}

static void sentinel_free(struct store_redis *s)
{
    struct rs_sentinel *st = st_of(s);
    if (st->ac) {
        redisAsyncContext *ac = st->ac;
        st->ac = NULL;
        sentinel_free_ac(ac, false);
    }
    event_free(st->timer);
    free(st);
}

const struct rs_topology_ops rs_sentinel_ops = {
    .select_db = true,
    .init = sentinel_init,
    .route = sentinel_route,
    .on_error_reply = sentinel_on_error_reply,
    .handshake = sentinel_handshake,
    .on_ready = sentinel_on_ready,
    .on_backoff_over = sentinel_on_backoff_over,
    .free = sentinel_free,
};
