/* cluster.c — Redis Cluster routing (part of redis_internal.h).
 *
 * Owns the slot -> node map, filled by CLUSTER SLOTS (rate-limited), the
 * key's hash slot, and following MOVED / ASK. The node connections
 * themselves are struct rconn (conn.c); operations are op.c's. */
#include "redis_internal.h"

#include "idemgate/core/log.h"

#include <stdlib.h>
#include <string.h>

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

/* The key's slot: only the part between the first '{' and the next '}' is
 * hashed when that part is not empty. */
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

static struct rconn *cluster_node(struct store_redis *s, const char *host, size_t hlen, int port)
{
    for (struct rconn *c = s->conns; c; c = c->next)
        if (c->port == port && strlen(c->host) == hlen && memcmp(c->host, host, hlen) == 0)
            return c;
    return rc_new(s, RC_NODE, rs_strndup(host, hlen), port, false);
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
struct rconn *cluster_any(struct store_redis *s, unsigned from)
{
    size_t n = cluster_count(s);
    if (n == 0) return NULL;
    for (int pass = 0; pass < 2; pass++) {
        struct rconn *c = s->conns;
        for (size_t i = 0; i < from % n; i++)
            c = c->next;
        for (size_t i = 0; i < n; i++) {
            if (pass == 0 ? rs_usable(c) : rc_ensure(c)) return c;
            c = c->next ? c->next : s->conns;
        }
    }
    return NULL;
}

/* One CLUSTER SLOTS range: [start, end, [host, port, ...], replicas...]. */
static bool cluster_range_ok(const redisReply *e)
{
    if (e->type != REDIS_REPLY_ARRAY || e->elements < 3) return false;
    const redisReply *m = e->element[2];
    return e->element[0]->type == REDIS_REPLY_INTEGER &&
           e->element[1]->type == REDIS_REPLY_INTEGER && e->element[0]->integer >= 0 &&
           e->element[0]->integer <= e->element[1]->integer && e->element[1]->integer < RS_NSLOTS &&
           m->type == REDIS_REPLY_ARRAY && m->elements >= 2 &&
           m->element[0]->type == REDIS_REPLY_STRING &&
           m->element[1]->type == REDIS_REPLY_INTEGER && m->element[1]->integer > 0 &&
           m->element[1]->integer <= 65535;
}

/* Replaces the slot map with the answer; false when it is malformed. */
static bool cluster_apply_slots(struct store_redis *s, const struct rconn *asked,
                                const redisReply *r)
{
    if (r->type != REDIS_REPLY_ARRAY) return false;
    for (size_t i = 0; i < r->elements; i++)
        if (!cluster_range_ok(r->element[i])) return false;
    memset(s->slots, 0, RS_NSLOTS * sizeof(*s->slots));
    for (size_t i = 0; i < r->elements; i++) {
        const redisReply *e = r->element[i];
        const redisReply *m = e->element[2];
        const char *host = m->element[0]->str;
        size_t hlen = m->element[0]->len;
        /* A node that does not know its own address says "" or "?". */
        if (hlen == 0 || (hlen == 1 && host[0] == '?')) {
            host = asked->host;
            hlen = strlen(asked->host);
        }
        struct rconn *node = cluster_node(s, host, hlen, (int)m->element[1]->integer);
        for (long long slot = e->element[0]->integer; slot <= e->element[1]->integer; slot++)
            s->slots[slot] = node;
    }
    return true;
}

static void cluster_slots_cb(redisAsyncContext *ac, void *reply, void *priv)
{
    struct rconn *c = rc_of(ac);
    if (!c) return;
    struct store_redis *s = c->s;
    if (!s->refresh_inflight || (uintptr_t)priv != s->refresh_gen) return;
    s->refresh_inflight = false;
    evtimer_del(s->refresh_deadline_ev);
    if (reply && cluster_apply_slots(s, c, reply)) {
        s->refresh_fails = 0;
        return;
    }
    const redisReply *r = reply;
    if (r && s->refresh_fails == 0)
        log_msg(LOG_WARN, "store redis: CLUSTER SLOTS on %s:%d: %s", c->host, c->port,
                r->type == REDIS_REPLY_ERROR && r->str ? r->str : "unexpected answer");
    s->refresh_fails++;
    s->refresh_rr++;
    cluster_refresh_soon(s);
}

static void cluster_refresh_cb(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    struct store_redis *s = arg;
    s->refresh_last_ms = rs_now_ms();
    struct rconn *c = cluster_any(s, s->refresh_rr);
    if (!c && s->conns) {
        /* Nothing reachable: ops fail fast; look again later. */
        s->refresh_fails++;
        cluster_refresh_soon(s);
        return;
    }
    if (!c) return;
    s->refresh_gen++;
    if (redisAsyncCommand(c->ac, cluster_slots_cb, (void *)s->refresh_gen, "CLUSTER SLOTS") !=
        REDIS_OK) {
        s->refresh_rr++;
        cluster_refresh_soon(s);
        return;
    }
    s->refresh_inflight = true;
    struct timeval tv = rs_tv((uint64_t)rs_timeout_ms(s));
    evtimer_add(s->refresh_deadline_ev, &tv);
}

static void cluster_refresh_deadline_cb(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    struct store_redis *s = arg;
    s->refresh_inflight = false;
    s->refresh_gen++; /* the late answer is ignored */
    s->refresh_fails++;
    s->refresh_rr++;
    cluster_refresh_soon(s);
}

/* Rate-limited: one CLUSTER SLOTS at a time, at most one per
 * RS_REFRESH_MIN_MS, less often while they keep failing. */
void cluster_refresh_soon(struct store_redis *s)
{
    if (s->mode != CFG_REDIS_CLUSTER || s->refresh_inflight || evtimer_pending(s->refresh_ev, NULL))
        return;
    uint64_t now = rs_now_ms();
    unsigned step = s->refresh_fails < 4 ? s->refresh_fails : 4;
    uint64_t at = s->refresh_last_ms + ((uint64_t)RS_REFRESH_MIN_MS << step);
    struct timeval tv = rs_tv(at > now ? at - now : 0);
    evtimer_add(s->refresh_ev, &tv);
}

/* "MOVED <slot> <host>:<port>" / "ASK ..." -> 1 / 2 with the target, or 0. */
int rs_parse_redirect(const redisReply *r, unsigned *slot, const char **host, size_t *hlen,
                      int *port)
{
    int kind = reply_is_error(r, "MOVED") ? 1 : reply_is_error(r, "ASK") ? 2 : 0;
    if (!kind) return 0;
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
void rop_redirect(struct rop *op, int kind, unsigned slot, const char *host, size_t hlen, int port)
{
    struct store_redis *s = op->s;
    if (++op->redirects > RS_MAX_REDIRECTS) {
        log_msg(LOG_ERROR, "store redis: too many cluster redirects for slot %u", slot);
        rop_fail(op);
        return;
    }
    if (hlen == 0) { /* "MOVED 12 :6380": same host as the one asked */
        host = op->conn->host;
        hlen = strlen(host);
    }
    struct rconn *target = cluster_node(s, host, hlen, port);
    if (kind == 1) {
        s->slots[slot] = target;
        op->asking = false;
        cluster_refresh_soon(s);
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

void rs_start_cluster(struct store_redis *s)
{
    const struct cfg_redis *rc = &s->cfg->redis;
    s->slots = rs_alloc(RS_NSLOTS * sizeof(*s->slots));
    s->refresh_ev = evtimer_new(s->evb, cluster_refresh_cb, s);
    s->refresh_deadline_ev = evtimer_new(s->evb, cluster_refresh_deadline_cb, s);
    if (!s->refresh_ev || !s->refresh_deadline_ev) abort();
    /* Listed last to first so that the list reads in config order. */
    for (size_t i = rc->nodes.n; i > 0; i--) {
        const struct cfg_hostport *at = &rc->node_addrs[i - 1];
        cluster_node(s, at->host, strlen(at->host), at->port);
    }
    cluster_refresh_soon(s);
}
