/* conn.c — one Redis server connection (see redis_internal.h).
 *
 * Owns struct rconn: its hiredis async context on the worker's event
 * base; the handshake (AUTH, SELECT, the maxmemory-policy check, the
 * topology's own commands, SCRIPT LOAD) and its timeout; tearing a stuck
 * connection down (always from a deferred event); the backoff before
 * reconnecting. Does not own the operations sent on it (op.c), nor decide
 * which server it talks to or what its going down or coming up means:
 * that is the topology's (s->topo), told through its table. */
#include "redis_internal.h"

#include "idemgate/core/log.h"

#include <hiredis/adapters/libevent.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Reconnects (or whatever the topology does then) after a backoff that
 * doubles from RS_BACKOFF_MIN_MS up to RS_BACKOFF_MAX_MS while c fails. */
void rc_schedule_reconnect(struct rconn *c)
{
    unsigned step = c->backoff_step < 5 ? c->backoff_step : 5;
    uint64_t ms = (uint64_t)RS_BACKOFF_MIN_MS << step;
    if (ms > RS_BACKOFF_MAX_MS) ms = RS_BACKOFF_MAX_MS;
    c->backoff_step++;
    struct timeval tv = rs_tv(ms);
    evtimer_add(c->reconnect_ev, &tv);
}

/* The connection is gone (c->ac already NULL): log once per outage, start
 * the backoff (what happens when it is over is the topology's), and tell
 * the topology. */
static void rc_went_down(struct rconn *c, const char *why)
{
    evtimer_del(c->handshake_ev);
    c->ready = false;
    if (!c->down_logged) {
        if (c->unix_socket)
            log_msg(LOG_WARN, "store redis: connection to %s lost: %s", c->host, why);
        else
            log_msg(LOG_WARN, "store redis: connection to %s:%d lost: %s", c->host, c->port, why);
        c->down_logged = true;
    }
    rc_schedule_reconnect(c);
    if (c->s->topo->on_down) c->s->topo->on_down(c);
}

/* Tears the connection down now. Pending commands get their callbacks
 * with a NULL reply from inside redisAsyncFree; user callbacks may run
 * there and even free the store, so c is not touched afterwards. Never
 * called from inside a hiredis callback. */
static void rc_kill_now(struct rconn *c, const char *why)
{
    redisAsyncContext *ac = c->ac;
    if (!ac) return;
    c->ac = NULL;
    rc_went_down(c, why);
    redisAsyncFree(ac);
}

static void rc_kill_cb(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    rc_kill_now(arg, "a command timed out, the handshake failed or the server is not usable");
}

/* Tears c down from the loop (safe from inside a hiredis callback). */
void rc_kill_soon(struct rconn *c)
{
    struct timeval zero = {0, 0};
    evtimer_add(c->kill_ev, &zero);
}

static void rc_handshake_timeout_cb(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    rc_kill_now(arg, "connect or handshake timed out");
}

static void rc_reconnect_cb(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    struct rconn *c = arg;
    c->s->topo->on_backoff_over(c);
}

static void rc_on_connect(const redisAsyncContext *ac, int status)
{
    struct rconn *c = rc_of(ac);
    if (!c) return;
    if (status == REDIS_OK) {
        c->connected = true;
        return;
    }
    /* hiredis frees ac right after this callback. */
    c->ac = NULL;
    rc_went_down(c, ac->errstr[0] ? ac->errstr : "connect failed");
}

static void rc_on_disconnect(const redisAsyncContext *ac, int status)
{
    (void)status;
    struct rconn *c = rc_of(ac);
    if (!c) return;
    c->ac = NULL;
    rc_went_down(c, ac->errstr[0] ? ac->errstr : "disconnected");
}

#define RS_TAG_AUTH ((void *)(intptr_t)-1)
#define RS_TAG_SELECT ((void *)(intptr_t)-2)
#define RS_TAG_INFO ((void *)(intptr_t)-3)

/* INFO server's answer: whether the server takes SET NX PX GET (7.0 and
 * later). An answer without a version (INFO refused by an ACL, say)
 * leaves the acquire script in use: slower, never wrong. */
static void rc_note_version(struct rconn *c, const redisReply *r)
{
    c->set_get = false;
    const char *p =
        r->type == REDIS_REPLY_STRING && r->str ? strstr(r->str, "redis_version:") : NULL;
    if (p) c->set_get = atoi(p + strlen("redis_version:")) >= 7;
}

static const char *rs_tag_name(void *priv)
{
    if (priv == RS_TAG_AUTH) return "AUTH";
    if (priv == RS_TAG_SELECT) return "SELECT";
    return "SCRIPT LOAD";
}

static bool rs_handshake_ok(const struct rconn *c, const redisReply *r, void *priv)
{
    if (priv == RS_TAG_AUTH || priv == RS_TAG_SELECT) return r->type != REDIS_REPLY_ERROR;
    return rs_script_loaded(c->s, r, (intptr_t)priv);
}

/* A handshake answer was wrong: the commands behind it would fail too, so
 * the connection starts over (and logs nothing more until it is ready). */
void rc_handshake_failed(struct rconn *c)
{
    c->handshake_failed = true;
    rc_kill_soon(c);
}

/* One more handshake answer was right; after the last one, c is ready:
 * the topology logs it, then what waited for c goes out (give-backs
 * first, then operations parked on it, oldest first). */
void rc_handshake_answered(struct rconn *c)
{
    if (--c->handshake_left > 0) return;
    evtimer_del(c->handshake_ev);
    c->ready = true;
    c->backoff_step = 0;
    if (c->s->topo->on_ready)
        c->s->topo->on_ready(c);
    else if (c->down_logged)
        log_msg(LOG_INFO, "store redis: connected again");
    c->down_logged = false;
    gb_flush(c);
    rop_flush_parked(c);
}

static void rc_handshake_cb(redisAsyncContext *ac, void *reply, void *priv)
{
    struct rconn *c = rc_of(ac);
    redisReply *r = reply;
    if (!c || !r) return;
    if (priv == RS_TAG_INFO) {
        rc_note_version(c, r);
        rc_handshake_answered(c);
        return;
    }
    if (rs_handshake_ok(c, r, priv)) {
        rc_handshake_answered(c);
        return;
    }
    if (!c->handshake_failed && !c->down_logged) {
        /* The commands behind the first failure fail too, and so does
         * every retry until it is fixed: say it once per outage. */
        log_msg(LOG_ERROR, "store redis: %s failed: %s", rs_tag_name(priv),
                r->type == REDIS_REPLY_ERROR && r->str ? r->str : "unexpected reply");
    }
    rc_handshake_failed(c);
}

/* AUTH [user] password, when the URL names either; 1 when sent, 0 when
 * there is nothing to send, -1 when it cannot be queued. */
int rc_send_auth(redisAsyncContext *ac, const struct cfg_redis *rc, redisCallbackFn *fn, void *priv)
{
    if (!rc->username && !(rc->password && rc->password[0])) return 0;
    const char *argv[3] = {"AUTH", rc->username, rc->password};
    size_t lens[3] = {4, rc->username ? strlen(rc->username) : 0, strlen(rc->password)};
    if (!rc->username) {
        argv[1] = rc->password;
        lens[1] = lens[2];
    }
    int argc = rc->username ? 3 : 2;
    return redisAsyncCommandArgv(ac, fn, priv, argc, argv, lens) == REDIS_OK ? 1 : -1;
}

/* An evicted lock or record breaks at-most-once: say so once per process
 * (every worker and every reconnect reads the policy again). */
static atomic_bool rs_policy_warned;

static void rs_check_policy(const struct rconn *c, const char *v, size_t n)
{
    bool evicts =
        (n > 8 && memcmp(v, "allkeys-", 8) == 0) || (n > 9 && memcmp(v, "volatile-", 9) == 0);
    if (!evicts || atomic_exchange(&rs_policy_warned, true)) return;
    log_msg(LOG_WARN,
            "store redis: %s:%d has maxmemory-policy %.*s, which may evict keys: an evicted lock "
            "or record lets a request execute twice (use noeviction)",
            c->host, c->port, (int)n, v);
}

static void rc_info_policy_cb(redisAsyncContext *ac, void *reply, void *priv)
{
    (void)priv;
    struct rconn *c = rc_of(ac);
    const redisReply *r = reply;
    if (!c || !r || r->type != REDIS_REPLY_STRING || !r->str) return;
    const char *p = strstr(r->str, "maxmemory_policy:");
    if (!p) return;
    p += strlen("maxmemory_policy:");
    rs_check_policy(c, p, strcspn(p, "\r\n"));
}

/* CONFIG GET maxmemory-policy: {name, value}; when CONFIG is refused (an
 * ACL, a renamed command) INFO memory says it too. */
static void rc_policy_cb(redisAsyncContext *ac, void *reply, void *priv)
{
    (void)priv;
    struct rconn *c = rc_of(ac);
    const redisReply *r = reply;
    if (!c || !r) return;
    if (r->type == REDIS_REPLY_ARRAY && r->elements == 2 &&
        r->element[1]->type == REDIS_REPLY_STRING) {
        rs_check_policy(c, r->element[1]->str, r->element[1]->len);
        return;
    }
    redisAsyncCommand(ac, rc_info_policy_cb, NULL, "INFO memory");
}

/* AUTH, SELECT (unless the topology has one database), the eviction
 * policy (not part of the handshake: nobody waits for it), the server's
 * version (INFO server: how to acquire), the topology's
 * own commands (ROLE for a sentinel master), SCRIPT LOAD. */
static int rc_send_handshake(struct rconn *c)
{
    const struct cfg_redis *rc = &c->s->cfg->redis;
    c->handshake_left = RS_NSCRIPTS;
    int auth = rc_send_auth(c->ac, rc, rc_handshake_cb, RS_TAG_AUTH);
    if (auth < 0) return -1;
    c->handshake_left += auth;
    const struct rs_topology_ops *t = c->s->topo;
    if (rc->db != 0 && t->select_db) {
        if (redisAsyncCommand(c->ac, rc_handshake_cb, RS_TAG_SELECT, "SELECT %d", rc->db) !=
            REDIS_OK)
            return -1;
        c->handshake_left++;
    }
    if (redisAsyncCommand(c->ac, rc_policy_cb, NULL, "CONFIG GET maxmemory-policy") != REDIS_OK)
        return -1;
    if (redisAsyncCommand(c->ac, rc_handshake_cb, RS_TAG_INFO, "INFO server") != REDIS_OK)
        return -1;
    c->handshake_left++;
    if (t->handshake) {
        int n = t->handshake(c);
        if (n < 0) return -1;
        c->handshake_left += n;
    }
    return rs_scripts_load(c, rc_handshake_cb);
}

/* Starts a connection; the handshake is queued at once (hiredis writes it
 * when the socket connects), and operations started meanwhile queue up
 * behind it in order. */
redisAsyncContext *rc_async_connect(const char *host, int port, bool unix_socket, char *why,
                                    size_t why_len)
{
    redisAsyncContext *ac =
        unix_socket ? redisAsyncConnectUnix(host) : redisAsyncConnect(host, port);
    if (!ac) abort(); /* out of memory */
    if (!ac->err) return ac;
    snprintf(why, why_len, "%s", ac->errstr);
    redisAsyncFree(ac);
    return NULL;
}

void rc_connect(struct rconn *c)
{
    char why[128];
    redisAsyncContext *ac = rc_async_connect(c->host, c->port, c->unix_socket, why, sizeof(why));
    if (!ac) {
        rc_went_down(c, why);
        return;
    }
    ac->data = c;
    c->ac = ac;
    c->connected = false;
    c->ready = false;
    c->set_get = false;
    c->handshake_failed = false;
    redisLibeventAttach(ac, c->s->evb);
    redisAsyncSetConnectCallback(ac, rc_on_connect);
    redisAsyncSetDisconnectCallback(ac, rc_on_disconnect);
    if (rc_send_handshake(c) != 0) {
        rc_kill_soon(c);
        return;
    }
    struct timeval tv = rs_tv((uint64_t)rs_timeout_ms(c->s));
    evtimer_add(c->handshake_ev, &tv);
}

/* A connected (or connecting) context for c, opening one when c is not
 * backing off; false when c cannot take a command now. */
bool rc_ensure(struct rconn *c)
{
    if (!c->ac && !evtimer_pending(c->reconnect_ev, NULL)) rc_connect(c);
    return rc_usable(c);
}

/* Whether c can take a command now (connected or connecting). */
bool rc_usable(const struct rconn *c)
{
    return c->ac && !(c->ac->c.flags & (REDIS_DISCONNECTING | REDIS_FREEING));
}

/* The connection an async context belongs to; NULL for a context that
 * was let go (closed or freed with its store). */
struct rconn *rc_of(const redisAsyncContext *ac)
{
    struct rconn *c = ac->data;
    return c && c->ac == ac ? c : NULL;
}

/* A connection, disconnected, listed in s->conns; host (or the unix socket
 * path) is taken over. Nothing connects until rc_connect or rc_ensure. */
struct rconn *rc_new(struct store_redis *s, char *host, int port, bool unix_socket)
{
    struct rconn *c = rs_alloc(sizeof(*c));
    c->s = s;
    c->host = host;
    c->port = port;
    c->unix_socket = unix_socket;
    c->reconnect_ev = evtimer_new(s->evb, rc_reconnect_cb, c);
    c->kill_ev = evtimer_new(s->evb, rc_kill_cb, c);
    c->handshake_ev = evtimer_new(s->evb, rc_handshake_timeout_cb, c);
    if (!c->reconnect_ev || !c->kill_ev || !c->handshake_ev) abort();
    c->next = s->conns;
    s->conns = c;
    return c;
}

/* Points a disconnected c somewhere else (a new sentinel master). */
void rc_set_address(struct rconn *c, const char *host, size_t hlen, int port)
{
    free(c->host);
    c->host = rs_strndup(host, hlen);
    c->port = port;
}

/* Closes c's context and frees c; the store is being freed. */
void rc_free(struct rconn *c)
{
    redisAsyncContext *ac = c->ac;
    c->ac = NULL;
    if (ac) {
        ac->data = NULL;
        redisAsyncFree(ac);
    }
    event_free(c->reconnect_ev);
    event_free(c->kill_ev);
    event_free(c->handshake_ev);
    free(c->host);
    free(c);
}
