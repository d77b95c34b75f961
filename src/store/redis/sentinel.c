/* sentinel.c — Redis Sentinel master discovery (part of redis_internal.h).
 *
 * Owns the connection to the sentinel being asked (one at a time, in
 * redis.nodes order) and pointing the master connection at the answer.
 * The master connection itself is a struct rconn (conn.c). */
#include "redis_internal.h"

#include "idemgate/core/log.h"

#include <hiredis/adapters/libevent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

void sentinel_free_ac(redisAsyncContext *ac, bool disconnect)
{
    ac->data = NULL;
    if (disconnect)
        redisAsyncDisconnect(ac); /* from inside its own callback */
    else
        redisAsyncFree(ac);
}

/* The sentinel at sent_idx did not help: try the next, or start over
 * after a backoff once all were asked. */
static void sentinel_next(struct store_redis *s, const char *why)
{
    const struct cfg_strlist *nodes = &s->cfg->redis.nodes;
    if (!s->sent_logged)
        log_msg(LOG_WARN, "store redis: sentinel %s: %s", nodes->v[s->sent_idx], why);
    s->sent_idx++;
    if (s->sent_idx < nodes->n) {
        sentinel_ask(s);
        return;
    }
    s->sent_logged = true;
    s->sent_idx = 0;
    rc_schedule_reconnect(s->main);
}

static void sentinel_use_master(struct store_redis *s, const redisReply *host, long port)
{
    struct rconn *m = s->main;
    free(m->host);
    m->host = rs_strndup(host->str, host->len);
    m->port = (int)port;
    rc_connect(m);
}

static void sentinel_reply_cb(redisAsyncContext *ac, void *reply, void *priv)
{
    (void)priv;
    struct store_redis *s = ac->data;
    if (!s || s->sent_ac != ac) return;
    s->sent_ac = NULL;
    evtimer_del(s->sent_timer);
    sentinel_free_ac(ac, true);
    const redisReply *r = reply;
    if (r && r->type == REDIS_REPLY_ARRAY && r->elements == 2 &&
        r->element[0]->type == REDIS_REPLY_STRING && r->element[1]->type == REDIS_REPLY_STRING &&
        r->element[0]->len > 0) {
        long port = strtol(r->element[1]->str, NULL, 10);
        if (port > 0 && port <= 65535) {
            sentinel_use_master(s, r->element[0], port);
            return;
        }
    }
    sentinel_next(s, r && r->type == REDIS_REPLY_ERROR && r->str ? r->str
                                                                 : "does not know the master");
}

static void sentinel_on_connect(const redisAsyncContext *ac, int status)
{
    struct store_redis *s = ac->data;
    if (!s || s->sent_ac != ac || status == REDIS_OK) return;
    s->sent_ac = NULL; /* hiredis frees ac after this callback */
    evtimer_del(s->sent_timer);
    sentinel_next(s, ac->errstr[0] ? ac->errstr : "connect failed");
}

static void sentinel_on_disconnect(const redisAsyncContext *ac, int status)
{
    (void)status;
    struct store_redis *s = ac->data;
    if (!s || s->sent_ac != ac) return;
    s->sent_ac = NULL;
    evtimer_del(s->sent_timer);
    sentinel_next(s, ac->errstr[0] ? ac->errstr : "disconnected");
}

static void sentinel_timeout_cb(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    struct store_redis *s = arg;
    redisAsyncContext *ac = s->sent_ac;
    if (!ac) return;
    s->sent_ac = NULL;
    sentinel_free_ac(ac, false);
    sentinel_next(s, "timed out");
}

/* Asks the sentinel at sent_idx for the master's address. */
void sentinel_ask(struct store_redis *s)
{
    if (s->sent_ac || s->main->ac) return;
    const struct cfg_hostport *at = &s->cfg->redis.node_addrs[s->sent_idx];
    redisAsyncContext *ac = redisAsyncConnect(at->host, at->port);
    if (!ac) abort();
    if (ac->err) {
        char why[128];
        snprintf(why, sizeof(why), "%s", ac->errstr);
        redisAsyncFree(ac);
        sentinel_next(s, why);
        return;
    }
    ac->data = s;
    s->sent_ac = ac;
    redisLibeventAttach(ac, s->evb);
    redisAsyncSetConnectCallback(ac, sentinel_on_connect);
    redisAsyncSetDisconnectCallback(ac, sentinel_on_disconnect);
    struct timeval tv = rs_tv((uint64_t)rs_timeout_ms(s));
    evtimer_add(s->sent_timer, &tv);
    /* The same user and password as the master (SPEC section 2). Its
     * answer is not awaited: a sentinel that needs it refuses the
     * question with NOAUTH, which is what gets logged; one without a
     * password answers the question anyway. */
    if (rs_send_auth(ac, &s->cfg->redis, NULL, NULL) < 0 ||
        redisAsyncCommand(ac, sentinel_reply_cb, NULL, "SENTINEL get-master-addr-by-name %s",
                          s->cfg->redis.master_name) != REDIS_OK) {
        s->sent_ac = NULL;
        evtimer_del(s->sent_timer);
        sentinel_free_ac(ac, false);
        sentinel_next(s, "cannot send");
    }
}

void rs_start_sentinel(struct store_redis *s)
{
    s->sent_timer = evtimer_new(s->evb, sentinel_timeout_cb, s);
    if (!s->sent_timer) abort();
    s->main = rc_new(s, RC_MASTER, rs_strndup("?", 1), 0, false);
    sentinel_ask(s);
}
