/* cluster.c — the Redis Cluster topology (see redis_internal.h).
 *
 * Owns struct rs_cluster: the slot -> node map, filled by CLUSTER SLOTS (at
 * start, after MOVED, after a node went down or answered CLUSTERDOWN;
 * one at a time, rate-limited, asked of the nodes in turn); the hash slot
 * of a key; routing an op to the node owning its slot (any node while the
 * slot is unknown: it answers MOVED); following MOVED (the map learns the
 * new owner) and ASK (this op only, after ASKING) within the op's
 * deadline. A node is a struct rconn (conn.c), opened lazily when an op or
 * a give-back needs it, and never SELECTs (a cluster has database 0 only).
 * Operations are op.c's. */
#include "redis_internal.h"

#include "idemgate/core/clock.h"
#include "idemgate/core/log.h"

#include <stdlib.h>
#include <string.h>

#define RS_NSLOTS 16384
#define RS_MAX_REDIRECTS 5
#define RS_REFRESH_MIN_MS 200 /* at most one CLUSTER SLOTS per this */

/* s->topo_state in cluster mode. */
struct rs_cluster {
    struct store_redis *s;
    struct rconn *slots[RS_NSLOTS]; /* NULL = unknown; the nodes are s->conns */
    struct event *refresh_ev;
    struct event *refresh_deadline_ev;
    bool refresh_inflight;
    uintptr_t refresh_gen; /* tells a late CLUSTER SLOTS answer apart */
    uint64_t refresh_last_ms;
    unsigned refresh_rr;    /* which node to ask next */
    unsigned refresh_fails; /* in a row: the interval grows */
};

static struct rs_cluster *cl_of(const struct store_redis *s)
{
    return s->topo_state;
}

/* CRC16-CCITT (XMODEM: poly 0x1021, init 0, no reflection), the checksum
 * Redis Cluster hashes keys with. */
static uint16_t rs_crc16(const char *p, size_t n)
{
    uint16_t crc = 0;
    for (size_t i = 0; i < n; i++) {
        crc ^= (uint16_t)((uint8_t)p[i] << 8);
        for (int b = 0; b < 8; b++)
            crc = crc & 0x8000 ? (uint16_t)((crc << 1) ^ 0x1021) : (uint16_t)(crc << 1);
    }
    return crc;
}

/* The key's slot (op.c keeps it with every op): only the part between
 * the first '{' and the next '}' is hashed when that part is not empty. */
unsigned rs_keyslot(const char *key, size_t n)
{
    const char *open = memchr(key, '{', n);
    if (open) {
        size_t from = (size_t)(open - key) + 1;
        const char *close = memchr(key + from, '}', n - from);
        if (close && close > key + from)
            return rs_crc16(key + from, (size_t)(close - key) - from) & (RS_NSLOTS - 1);
    }
    return rs_crc16(key, n) & (RS_NSLOTS - 1);
}

/* The node at host:port, listed (and so known to every later lookup)
 * the first time it is named. */
static struct rconn *cluster_node(struct store_redis *s, const char *host, size_t hlen, int port)
{
    for (struct rconn *c = s->conns; c; c = c->next)
        if (c->port == port && strlen(c->host) == hlen && memcmp(c->host, host, hlen) == 0)
            return c;
    return rc_new(s, rs_strndup(host, hlen), port, false);
}

static size_t cluster_count(const struct store_redis *s)
{
    size_t n = 0;
    for (const struct rconn *c = s->conns; c; c = c->next)
        n++;
    return n;
}

/* Any node that can take a command now, starting at the round-robin
 * position; connected ones first. */
static struct rconn *cluster_any(struct store_redis *s, unsigned from)
{
    size_t n = cluster_count(s);
    if (n == 0) return NULL;
    for (int pass = 0; pass < 2; pass++) {
        struct rconn *c = s->conns;
        for (size_t i = 0; i < from % n; i++)
            c = c->next;
        for (size_t i = 0; i < n; i++) {
            if (pass == 0 ? rc_usable(c) : rc_ensure(c)) return c;
            c = c->next ? c->next : s->conns;
        }
    }
    return NULL;
}

/* One CLUSTER SLOTS range: [start, end, [host, port, ...], replicas...]. */
static bool cluster_range_ok(const struct rreply *e)
{
    if (e->type != RREPLY_ARRAY || e->elements < 3) return false;
    const struct rreply *m = &e->element[2];
    return e->element[0].type == RREPLY_INTEGER && e->element[1].type == RREPLY_INTEGER &&
           e->element[0].integer >= 0 && e->element[0].integer <= e->element[1].integer &&
           e->element[1].integer < RS_NSLOTS && m->type == RREPLY_ARRAY && m->elements >= 2 &&
           m->element[0].type == RREPLY_STRING && m->element[1].type == RREPLY_INTEGER &&
           m->element[1].integer > 0 && m->element[1].integer <= 65535;
}

/* Replaces the slot map with the answer; false when it is malformed. */
static bool cluster_apply_slots(struct rs_cluster *cl, const struct rconn *asked,
                                const struct rreply *r)
{
    if (r->type != RREPLY_ARRAY) return false;
    for (size_t i = 0; i < r->elements; i++)
        if (!cluster_range_ok(&r->element[i])) return false;
    memset(cl->slots, 0, sizeof(cl->slots));
    for (size_t i = 0; i < r->elements; i++) {
        const struct rreply *e = &r->element[i];
        const struct rreply *m = &e->element[2];
        const char *host = m->element[0].str;
        size_t hlen = m->element[0].len;
        /* A node that does not know its own address says "" or "?". */
        if (hlen == 0 || (hlen == 1 && host[0] == '?')) {
            host = asked->host;
            hlen = strlen(asked->host);
        }
        struct rconn *node = cluster_node(cl->s, host, hlen, (int)m->element[1].integer);
        for (long long slot = e->element[0].integer; slot <= e->element[1].integer; slot++)
            cl->slots[slot] = node;
    }
    return true;
}

/* Rate-limited: one CLUSTER SLOTS at a time, at most one per
 * RS_REFRESH_MIN_MS, less often while they keep failing. */
static void cluster_refresh_soon(struct rs_cluster *cl)
{
    if (cl->refresh_inflight || evtimer_pending(cl->refresh_ev, NULL)) return;
    uint64_t now = clock_now_ms();
    unsigned step = cl->refresh_fails < 4 ? cl->refresh_fails : 4;
    uint64_t at = cl->refresh_last_ms + ((uint64_t)RS_REFRESH_MIN_MS << step);
    struct timeval tv = clock_tv(at > now ? at - now : 0);
    evtimer_add(cl->refresh_ev, &tv);
}

static void cluster_slots_cb(struct rconn *c, const struct rreply *reply, void *priv)
{
    struct rs_cluster *cl = cl_of(c->s);
    if (!cl->refresh_inflight || (uintptr_t)priv != cl->refresh_gen) return;
    cl->refresh_inflight = false;
    evtimer_del(cl->refresh_deadline_ev);
    if (reply && cluster_apply_slots(cl, c, reply)) {
        cl->refresh_fails = 0;
        return;
    }
    const struct rreply *r = reply;
    if (r && cl->refresh_fails == 0)
        log_msg(LOG_WARN, "store redis: CLUSTER SLOTS on %s:%d: %.*s", c->host, c->port,
                r->type == RREPLY_ERROR ? (int)r->len : (int)strlen("unexpected answer"),
                r->type == RREPLY_ERROR ? r->str : "unexpected answer");
    cl->refresh_fails++;
    cl->refresh_rr++;
    cluster_refresh_soon(cl);
}

static void cluster_refresh_cb(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    struct rs_cluster *cl = arg;
    struct store_redis *s = cl->s;
    cl->refresh_last_ms = clock_now_ms();
    struct rconn *c = cluster_any(s, cl->refresh_rr);
    if (!c && s->conns) {
        /* Nothing reachable: ops fail fast; look again later. */
        cl->refresh_fails++;
        cluster_refresh_soon(cl);
        return;
    }
    if (!c) return;
    cl->refresh_gen++;
    if (rc_cmd(c, cluster_slots_cb, (void *)cl->refresh_gen, "CLUSTER", "SLOTS", NULL) != 0) {
        cl->refresh_rr++;
        cluster_refresh_soon(cl);
        return;
    }
    cl->refresh_inflight = true;
    struct timeval tv = clock_tv((uint64_t)rs_timeout_ms(s));
    evtimer_add(cl->refresh_deadline_ev, &tv);
}

static void cluster_refresh_deadline_cb(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    struct rs_cluster *cl = arg;
    cl->refresh_inflight = false;
    cl->refresh_gen++; /* the late answer is ignored */
    cl->refresh_fails++;
    cl->refresh_rr++;
    cluster_refresh_soon(cl);
}

/* "MOVED <slot> <host>:<port>" / "ASK ..." -> 1 / 2 with the target, or 0. */
static int rs_parse_redirect(const struct rreply *r, unsigned *slot, const char **host,
                             size_t *hlen, int *port)
{
    int kind = rs_reply_is_error(r, "MOVED") ? 1 : rs_reply_is_error(r, "ASK") ? 2 : 0;
    if (!kind || r->len <= (kind == 1 ? 6u : 4u)) return 0;
    const char *p = r->str + (kind == 1 ? 6 : 4);
    const char *end = r->str + r->len;
    char *after;
    unsigned long sl = strtoul(p, &after, 10);
    if (after == p || after >= end || *after != ' ' || sl >= RS_NSLOTS) return 0;
    const char *addr = after + 1;
    const char *colon = NULL;
    for (const char *q = end; q > addr; q--)
        if (q[-1] == ':') {
            colon = q - 1;
            break;
        }
    if (!colon || colon + 1 >= end) return 0;
    char digits[8];
    size_t dl = (size_t)(end - colon - 1);
    if (dl >= sizeof(digits)) return 0;
    memcpy(digits, colon + 1, dl);
    digits[dl] = '\0';
    long pt = strtol(digits, &after, 10);
    if (*after || pt <= 0 || pt > 65535) return 0;
    *slot = (unsigned)sl;
    *host = addr;
    *hlen = (size_t)(colon - addr);
    *port = (int)pt;
    return kind;
}

/* Follows MOVED (the map learns the new owner) or ASK (this op only, with
 * ASKING) and sends the same command again, within the op's deadline. */
static void cluster_redirect(struct rop *op, int kind, unsigned slot, const char *host, size_t hlen,
                             int port)
{
    struct rs_cluster *cl = cl_of(op->s);
    if (++op->redirects > RS_MAX_REDIRECTS) {
        log_msg(LOG_ERROR, "store redis: too many cluster redirects for slot %u", slot);
        rop_fail(op);
        return;
    }
    if (hlen == 0) { /* "MOVED 12 :6380": same host as the one asked */
        host = op->conn->host;
        hlen = strlen(host);
    }
    struct rconn *target = cluster_node(op->s, host, hlen, port);
    if (kind == 1) {
        cl->slots[slot] = target;
        op->asking = false;
        cluster_refresh_soon(cl);
    } else {
        op->asking = true;
    }
    op->conn = target;
    if (!rc_ensure(target)) {
        rop_fail(op);
        return;
    }
    int rc = op->stage == ROP_UNDO ? rop_send_undo(op) : rop_send_main(op);
    if (rc != 0) rop_fail(op);
}

/* ---- the topology table ---- */

/* The node owning the key's slot, or any node when the slot is unknown
 * (it answers MOVED) or the op is a PING. */
static enum rs_route cluster_route(struct rop *op)
{
    struct rs_cluster *cl = cl_of(op->s);
    struct rconn *c = op->kind == ROP_PING ? NULL : cl->slots[op->slot];
    if (c && !rc_ensure(c)) c = NULL;
    if (!c && (op->kind == ROP_PING || !cl->slots[op->slot])) c = cluster_any(op->s, op->slot);
    op->conn = c;
    if (!c) {
        cluster_refresh_soon(cl);
        return RS_ROUTE_NONE;
    }
    return RS_ROUTE_SEND;
}

/* MOVED / ASK are followed (not for WAIT, which names no key); a node that
 * cannot serve the slot now fails the op and the map is asked for again. */
static bool cluster_on_error_reply(struct rop *op, const struct rreply *r)
{
    if (op->kind != ROP_PING && op->stage != ROP_WAIT) {
        unsigned slot;
        const char *host;
        size_t hlen;
        int port;
        int kind = rs_parse_redirect(r, &slot, &host, &hlen, &port);
        if (kind) {
            cluster_redirect(op, kind, slot, host, hlen, port);
            return true;
        }
    }
    bool moved_on = rs_reply_is_error(r, "READONLY") || rs_reply_is_error(r, "LOADING") ||
                    rs_reply_is_error(r, "MASTERDOWN") || rs_reply_is_error(r, "CLUSTERDOWN") ||
                    rs_reply_is_error(r, "TRYAGAIN");
    if (!moved_on) return false;
    log_msg(LOG_WARN, "store redis: %s:%d answered %.*s", op->conn->host, op->conn->port,
            (int)r->len, r->str);
    cluster_refresh_soon(cl_of(op->s));
    rop_fail(op);
    return true;
}

/* A node went down: the map may be out of date. */
static void cluster_on_down(struct rconn *c)
{
    cluster_refresh_soon(cl_of(c->s));
}

/* Reconnect only when a lock waits there to be given back; otherwise the
 * next op that needs the node connects. */
static void cluster_on_backoff_over(struct rconn *c)
{
    if (gb_wants(c)) rc_ensure(c);
}

static bool cluster_serves(const struct rconn *c, unsigned slot)
{
    const struct rs_cluster *cl = cl_of(c->s);
    return !cl->slots[slot] || cl->slots[slot] == c;
}

static void cluster_init(struct store_redis *s)
{
    const struct cfg_redis *rc = &s->cfg->redis;
    struct rs_cluster *cl = rs_alloc(sizeof(*cl));
    cl->s = s;
    cl->refresh_ev = evtimer_new(s->evb, cluster_refresh_cb, cl);
    cl->refresh_deadline_ev = evtimer_new(s->evb, cluster_refresh_deadline_cb, cl);
    if (!cl->refresh_ev || !cl->refresh_deadline_ev) abort();
    s->topo_state = cl;
    /* Listed last to first so that the list reads in config order. */
    for (size_t i = rc->nodes.n; i > 0; i--) {
        const struct cfg_hostport *at = &rc->node_addrs[i - 1];
        cluster_node(s, at->host, strlen(at->host), at->port);
    }
    cluster_refresh_soon(cl);
}

static void cluster_free(struct store_redis *s)
{
    struct rs_cluster *cl = cl_of(s);
    event_free(cl->refresh_ev);
    event_free(cl->refresh_deadline_ev);
    free(cl);
}

const struct rs_topology_ops rs_cluster_ops = {
    .select_db = false,
    .slots = true,
    .init = cluster_init,
    .route = cluster_route,
    .on_error_reply = cluster_on_error_reply,
    .on_down = cluster_on_down,
    .on_backoff_over = cluster_on_backoff_over,
    .serves = cluster_serves,
    .free = cluster_free,
};
