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
 * the op in flight when it fails is never retried on another master.
 *
 * Failovers are also followed as they are announced: one subscriber
 * connection (to one sentinel at a time, in redis.nodes order, moving to
 * the next when it drops or stops answering, after a backoff; AUTH as for
 * the questions) is SUBSCRIBEd to +switch-master. An announcement
 * "<name> <old-ip> <old-port> <new-ip> <new-port>" for master_name that
 * names another address than the master connection's switches at once:
 * the master connection is torn down (its ops in flight fail, as after
 * any loss), new ops park, and it reconnects to the new address without
 * a backoff. Each time a subscription is confirmed (a switch may have
 * been announced while there was none) the sentinels are asked again
 * (a check: the master connection is left alone unless the answer names
 * another address). The questions and the subscriber are AUX connections
 * (conn.c): AUTH only, their loss told to this file. A subscriber's
 * messages arrive through its push callback, the confirmations of its
 * SUBSCRIBEs through their own; its liveness probe is SUBSCRIBE
 * +switch-master again. A sentinel that refuses pub/sub (an error reply:
 * an ACL, NOAUTH) is logged once at warn; failovers are then found from
 * errors, as before. */
#include "redis_internal.h"

#include "idemgate/core/clock.h"

#include "idemgate/core/log.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define RS_SUB_CHANNEL "+switch-master"
#define RS_SUB_PROBE_MS 5000 /* the subscriber's liveness probe */

/* What the subscriber's timer is counting down to. */
enum rs_sub_phase {
    SUB_BACKOFF, /* connect to the sentinel at sub_idx */
    SUB_CONFIRM, /* the subscription must be confirmed by then */
    SUB_PROBE    /* the last probe must have been answered by then */
};

/* s->topo_state in sentinel mode. */
struct rs_sentinel {
    struct store_redis *s;
    struct rconn *master; /* its address is the last answer ("?" before) */
    struct rconn *ask;    /* the sentinel being asked (AUX), or NULL */
    size_t idx;           /* which of redis.nodes */
    bool logged;          /* a whole round failed: quiet until a master is found */
    bool checking;        /* the question is a check: the master is connected */
    bool recheck;         /* ask again once the question in flight is answered */
    struct event *timer;  /* the question's deadline */
    /* A switch announced while the master connection was up: where it
     * reconnects once torn down (NULL: none). */
    char *switch_host;
    size_t switch_hlen;
    int switch_port;
    bool connect_now; /* the master's "backoff" is the switch: connect */
    /* The +switch-master subscriber. */
    struct rconn *sub;  /* AUX; NULL while there is none */
    size_t sub_idx;     /* which of redis.nodes */
    bool sub_confirmed; /* sub's SUBSCRIBE was confirmed */
    bool sub_heard;     /* sub answered since the last probe */
    bool sub_warned;    /* a round failed: quiet until confirmed */
    size_t sub_fails;   /* sentinels that failed since the last confirmation */
    unsigned sub_backoff;
    enum rs_sub_phase sub_phase;
    struct event *sub_timer;
};

static struct rs_sentinel *st_of(const struct store_redis *s)
{
    return s->topo_state;
}

static void sentinel_ask(struct rs_sentinel *st);
static void sentinel_check(struct rs_sentinel *st);

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
    bool was_check = st->checking;
    st->checking = false;
    /* a check of a connected master changes nothing; a master that went
     * down meanwhile is asked for again after its backoff */
    if (was_check && st->master->state != RC_IDLE) return;
    rc_schedule_reconnect(st->master);
}

static bool sentinel_same_address(const struct rconn *c, const char *host, size_t hlen, int port)
{
    return c->port == port && strlen(c->host) == hlen && memcmp(c->host, host, hlen) == 0;
}

/* Lets go of the question in flight (its answer is not wanted any more). */
static void sentinel_drop_question(struct rs_sentinel *st)
{
    struct rconn *c = st->ask;
    if (!c) return;
    st->ask = NULL;
    st->checking = false;
    evtimer_del(st->timer);
    rc_release(c);
}

/* The master is at host:port (an answer or an announcement). A master
 * connection that is down connects there now; one that is up elsewhere
 * is torn down (from the loop: its ops in flight fail, new ones park) and
 * reconnects there at once (sentinel_on_down); one that is up there
 * already stays. */
static void sentinel_switch(struct rs_sentinel *st, const char *host, size_t hlen, int port)
{
    struct rconn *m = st->master;
    if (m->state != RC_IDLE) {
        bool same = st->switch_host ? st->switch_port == port && st->switch_hlen == hlen &&
                                          memcmp(st->switch_host, host, hlen) == 0
                                    : sentinel_same_address(m, host, hlen, port);
        if (same) return;
        log_msg(LOG_WARN, "store redis: sentinel master %s moved to %.*s:%d; leaving %s:%d",
                st->s->cfg->redis.master_name, (int)hlen, host, port, m->host, m->port);
        free(st->switch_host);
        st->switch_host = rs_strndup(host, hlen);
        st->switch_hlen = hlen;
        st->switch_port = port;
        m->down_logged = true; /* this outage is logged: no "connection lost" */
        rc_kill_soon(m);
        return;
    }
    sentinel_drop_question(st);
    free(st->switch_host);
    st->switch_host = NULL;
    st->connect_now = false;
    evtimer_del(m->reconnect_ev);
    rc_set_address(m, host, hlen, port);
    rc_connect(m);
}

/* A reply's text for a log line, as a C string. */
static const char *sentinel_why(const struct rreply *r, char *buf, size_t n, const char *dflt)
{
    if (!r || r->type != RREPLY_ERROR) return dflt;
    snprintf(buf, n, "%.*s", (int)r->len, r->str);
    return buf;
}

static void sentinel_reply_cb(struct rconn *c, const struct rreply *r, void *priv)
{
    struct rs_sentinel *st = priv;
    if (st->ask != c) return;
    st->ask = NULL;
    evtimer_del(st->timer);
    rc_release(c);
    if (r && r->type == RREPLY_ARRAY && r->elements == 2 && r->element[0].type == RREPLY_STRING &&
        r->element[1].type == RREPLY_STRING && r->element[0].len > 0 && r->element[1].len < 8) {
        char digits[8];
        memcpy(digits, r->element[1].str, r->element[1].len);
        digits[r->element[1].len] = '\0';
        long port = strtol(digits, NULL, 10);
        if (port > 0 && port <= 65535) {
            st->checking = false;
            sentinel_switch(st, r->element[0].str, r->element[0].len, (int)port);
            if (st->recheck) {
                st->recheck = false;
                sentinel_check(st);
            }
            return;
        }
    }
    char buf[256];
    sentinel_next(st, sentinel_why(r, buf, sizeof(buf), "does not know the master"));
}

/* The sentinel being asked went away (refused, lost). */
static void sentinel_ask_down(struct rconn *c, const char *why, void *arg)
{
    struct rs_sentinel *st = arg;
    if (st->ask != c) return;
    st->ask = NULL;
    evtimer_del(st->timer);
    rc_release(c);
    sentinel_next(st, why);
}

static void sentinel_timeout_cb(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    struct rs_sentinel *st = arg;
    struct rconn *c = st->ask;
    if (!c) return;
    st->ask = NULL;
    rc_release(c);
    sentinel_next(st, "timed out");
}

/* Asks the sentinel at idx for the master's address (a discovery while
 * the master connection is down, or a check while it is up). */
static void sentinel_ask(struct rs_sentinel *st)
{
    if (st->ask || (st->master->state != RC_IDLE && !st->checking)) return;
    const struct cfg_hostport *at = &st->s->cfg->redis.node_addrs[st->idx];
    char why[128];
    struct rconn *c =
        rc_aux_open(st->s, at->host, at->port, sentinel_ask_down, st, why, sizeof(why));
    if (!c) {
        sentinel_next(st, why);
        return;
    }
    st->ask = c;
    struct timeval tv = clock_tv((uint64_t)rs_timeout_ms(st->s));
    evtimer_add(st->timer, &tv);
    /* AUTH went first (rc_aux_open): a sentinel that needs it and was
     * refused answers the question NOAUTH, which is what gets logged. */
    if (rc_cmd(c, sentinel_reply_cb, st, "SENTINEL", "get-master-addr-by-name",
               st->s->cfg->redis.master_name, NULL) != 0) {
        sentinel_drop_question(st);
        sentinel_next(st, "cannot send");
    }
}

/* Asks the sentinels whether the master is still where the master
 * connection is (a switch may have been announced while nobody
 * listened); after the question in flight, if any. */
static void sentinel_check(struct rs_sentinel *st)
{
    if (st->ask) {
        st->recheck = true;
        return;
    }
    if (st->master->state == RC_IDLE || st->switch_host) return; /* being found anyway */
    st->checking = true;
    st->idx = 0;
    sentinel_ask(st);
}

/* ---- the +switch-master subscriber ---- */

static void sub_connect(struct rs_sentinel *st);

static void sub_arm(struct rs_sentinel *st, enum rs_sub_phase phase, uint64_t ms)
{
    st->sub_phase = phase;
    struct timeval tv = clock_tv(ms);
    evtimer_add(st->sub_timer, &tv);
}

/* The subscriber at sub_idx failed or went away (st->sub already NULL):
 * the next sentinel after a backoff. Logged once every sentinel has
 * failed (one down is what the others are for), then quiet until a
 * subscription is confirmed again. */
static void sub_failed(struct rs_sentinel *st, const char *why)
{
    const struct cfg_strlist *nodes = &st->s->cfg->redis.nodes;
    if (!st->sub_warned && ++st->sub_fails >= nodes->n) {
        log_msg(LOG_WARN,
                "store redis: no " RS_SUB_CHANNEL " subscription (sentinel %s: %s); "
                "failovers are found from errors until one is made",
                nodes->v[st->sub_idx], why);
        st->sub_warned = true;
    }
    st->sub_confirmed = false;
    st->sub_idx = (st->sub_idx + 1) % nodes->n;
    unsigned step = st->sub_backoff < 5 ? st->sub_backoff : 5;
    uint64_t ms = (uint64_t)RS_BACKOFF_MIN_MS << step;
    if (ms > RS_BACKOFF_MAX_MS) ms = RS_BACKOFF_MAX_MS;
    st->sub_backoff++;
    sub_arm(st, SUB_BACKOFF, ms);
}

/* Closes the subscriber from the loop (never from its own callback). */
static void sub_drop(struct rs_sentinel *st, const char *why)
{
    struct rconn *c = st->sub;
    if (!c) return;
    st->sub = NULL;
    evtimer_del(st->sub_timer);
    rc_release(c);
    sub_failed(st, why);
}

/* "<master-name> <old-ip> <old-port> <new-ip> <new-port>": the new
 * address, when the announcement is about our master. */
static void sub_on_switch(struct rs_sentinel *st, const char *p, size_t n)
{
    const char *f[5];
    size_t len[5];
    int k = 0;
    size_t i = 0;
    while (k < 5) {
        while (i < n && p[i] == ' ')
            i++;
        if (i == n) return;
        f[k] = p + i;
        while (i < n && p[i] != ' ')
            i++;
        len[k] = (size_t)(p + i - f[k]);
        k++;
    }
    const char *name = st->s->cfg->redis.master_name;
    if (len[0] != strlen(name) || memcmp(f[0], name, len[0]) != 0) return;
    char port_s[8];
    if (len[4] == 0 || len[4] >= sizeof(port_s)) return;
    memcpy(port_s, f[4], len[4]);
    port_s[len[4]] = '\0';
    char *end;
    long port = strtol(port_s, &end, 10);
    if (*end || port <= 0 || port > 65535 || len[3] == 0) return;
    sentinel_switch(st, f[3], len[3], (int)port);
}

/* The answer to a SUBSCRIBE (the first one or a probe's): its
 * confirmation, or a refusal. */
static void sub_reply_cb(struct rconn *c, const struct rreply *r, void *priv)
{
    struct rs_sentinel *st = priv;
    if (st->sub != c || !r) return;
    if (r->type == RREPLY_ERROR) {
        char buf[256];
        sub_drop(st, sentinel_why(r, buf, sizeof(buf), ""));
        return;
    }
    if (r->type != RREPLY_ARRAY || r->elements != 3 || !rs_reply_is(&r->element[0], "subscribe"))
        return;
    st->sub_heard = true;
    if (st->sub_confirmed) return;
    st->sub_confirmed = true;
    st->sub_backoff = 0;
    st->sub_fails = 0;
    if (st->sub_warned)
        log_msg(LOG_INFO, "store redis: sentinel %s: subscribed to " RS_SUB_CHANNEL,
                st->s->cfg->redis.nodes.v[st->sub_idx]);
    st->sub_warned = false;
    sub_arm(st, SUB_PROBE, RS_SUB_PROBE_MS);
    sentinel_check(st);
}

/* A message on the subscriber (or an error nobody asked for). */
static void sub_push_cb(struct rconn *c, const struct rreply *r, void *arg)
{
    struct rs_sentinel *st = arg;
    if (st->sub != c) return;
    if (r->type == RREPLY_ERROR) {
        sub_reply_cb(c, r, st);
        return;
    }
    if (r->elements == 3 && rs_reply_is(&r->element[1], RS_SUB_CHANNEL) &&
        r->element[2].type == RREPLY_STRING)
        sub_on_switch(st, r->element[2].str, r->element[2].len);
}

/* The subscriber went away (refused, lost, closed). */
static void sub_down(struct rconn *c, const char *why, void *arg)
{
    struct rs_sentinel *st = arg;
    if (st->sub != c) return;
    st->sub = NULL;
    evtimer_del(st->sub_timer);
    rc_release(c);
    sub_failed(st, why);
}

static void sub_timer_cb(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    struct rs_sentinel *st = arg;
    switch (st->sub_phase) {
    case SUB_BACKOFF:
        sub_connect(st);
        return;
    case SUB_CONFIRM:
        sub_drop(st, "the subscription was not confirmed in time");
        return;
    case SUB_PROBE:
        if (!st->sub_heard) {
            sub_drop(st, "the sentinel stopped answering");
            return;
        }
        st->sub_heard = false;
        if (rc_cmd(st->sub, sub_reply_cb, st, "SUBSCRIBE", RS_SUB_CHANNEL, NULL) != 0) {
            sub_drop(st, "cannot send");
            return;
        }
        sub_arm(st, SUB_PROBE, RS_SUB_PROBE_MS);
        return;
    }
}

/* Connects the subscriber to the sentinel at sub_idx: AUTH (as for the
 * questions: its answer is not awaited, a refusal shows as the
 * SUBSCRIBE's error), then SUBSCRIBE, confirmed within redis.timeout_ms. */
static void sub_connect(struct rs_sentinel *st)
{
    if (st->sub) return;
    const struct cfg_hostport *at = &st->s->cfg->redis.node_addrs[st->sub_idx];
    char why[128];
    struct rconn *c = rc_aux_open(st->s, at->host, at->port, sub_down, st, why, sizeof(why));
    if (!c) {
        sub_failed(st, why);
        return;
    }
    st->sub = c;
    st->sub_confirmed = false;
    st->sub_heard = false;
    c->push_fn = sub_push_cb;
    c->push_arg = st;
    if (rc_cmd(c, sub_reply_cb, st, "SUBSCRIBE", RS_SUB_CHANNEL, NULL) != 0) {
        sub_drop(st, "cannot send");
        return;
    }
    sub_arm(st, SUB_CONFIRM, (uint64_t)rs_timeout_ms(st->s));
}

static bool sentinel_is_master_role(const struct rreply *r)
{
    return r->type == RREPLY_ARRAY && r->elements >= 1 && rs_reply_is(&r->element[0], "master");
}

static void sentinel_role_cb(struct rconn *c, const struct rreply *r, void *priv)
{
    (void)priv;
    if (!r) return;
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
    return rc_cmd(c, sentinel_role_cb, NULL, "ROLE", NULL) == 0 ? 1 : -1;
}

/* New ops park while a switch is pending: the master being left may
 * still answer, but they go to the new one. */
static enum rs_route sentinel_route(struct rop *op)
{
    struct rs_sentinel *st = st_of(op->s);
    struct rconn *m = st->master;
    op->conn = m;
    return m->state == RC_READY && !st->switch_host ? RS_ROUTE_SEND : RS_ROUTE_PARK;
}

/* A master that stopped being one: tear it down, so that the sentinels
 * are asked again; the op fails. */
static bool sentinel_on_error_reply(struct rop *op, const struct rreply *r)
{
    bool moved_on = rs_reply_is_error(r, "READONLY") || rs_reply_is_error(r, "LOADING") ||
                    rs_reply_is_error(r, "MASTERDOWN");
    if (!moved_on) return false;
    log_msg(LOG_WARN, "store redis: %s:%d answered %.*s", op->conn->host, op->conn->port,
            (int)r->len, r->str);
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

/* The master connection is down: after an announced switch, it is
 * pointed at the new address and connects from the loop, now. */
static void sentinel_on_down(struct rconn *c)
{
    struct rs_sentinel *st = st_of(c->s);
    if (!st->switch_host) return;
    rc_set_address(c, st->switch_host, st->switch_hlen, st->switch_port);
    free(st->switch_host);
    st->switch_host = NULL;
    st->connect_now = true;
    evtimer_del(c->reconnect_ev);
    struct timeval zero = {0, 0};
    evtimer_add(c->reconnect_ev, &zero);
}

/* The master's backoff is over: ask the sentinels again, from the first
 * (or, after a switch, connect to the address announced). */
static void sentinel_on_backoff_over(struct rconn *c)
{
    struct rs_sentinel *st = st_of(c->s);
    if (st->connect_now) {
        st->connect_now = false;
        sentinel_drop_question(st);
        rc_connect(c);
        return;
    }
    st->idx = 0;
    sentinel_ask(st);
}

static void sentinel_init(struct store_redis *s)
{
    struct rs_sentinel *st = rs_alloc(sizeof(*st));
    st->s = s;
    st->timer = evtimer_new(s->evb, sentinel_timeout_cb, st);
    if (!st->timer) abort();
    st->sub_timer = evtimer_new(s->evb, sub_timer_cb, st);
    if (!st->sub_timer) abort();
    st->master = rc_new(s, rs_strndup("?", 1), 0, false);
    s->topo_state = st;
    sentinel_ask(st);
    sub_connect(st);
}

static void sentinel_free(struct store_redis *s)
{
    struct rs_sentinel *st = st_of(s);
    if (st->ask) rc_free(st->ask);
    if (st->sub) rc_free(st->sub);
    st->ask = st->sub = NULL;
    event_free(st->timer);
    event_free(st->sub_timer);
    free(st->switch_host);
    free(st);
}

const struct rs_topology_ops rs_sentinel_ops = {
    .select_db = true,
    .init = sentinel_init,
    .route = sentinel_route,
    .on_error_reply = sentinel_on_error_reply,
    .handshake = sentinel_handshake,
    .on_ready = sentinel_on_ready,
    .on_down = sentinel_on_down,
    .on_backoff_over = sentinel_on_backoff_over,
    .free = sentinel_free,
};
