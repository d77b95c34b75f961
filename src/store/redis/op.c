/* op.c — one store operation in flight (see redis_internal.h).
 *
 * Owns struct rop: its deadline timer; sending its command (SET NX PX GET
 * to acquire, else a script with EVALSHA, once more after NOSCRIPT, when
 * the scripts were loaded again; the acquire script after WRONGTYPE); WAIT for
 * replicas after a lock and the release when too few acknowledged; reading
 * the replies; firing the caller's callback exactly once; the store's one
 * deadline timer (every op has the same timeout, so the list of live ops,
 * oldest first, is in deadline order: the timer is armed for its head);
 * failing ops from the loop; recycling op structs; and handing an
 * acquire that failed while it may hold the lock to giveback.c. Does not
 * own connections (conn.c) nor know where a key lives: the topology's
 * route sets op->conn and its on_error_reply handles MOVED, ASK and the
 * like. */
#include "redis_internal.h"

#include "idemgate/core/clock.h"
#include "idemgate/core/log.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define ROP_SPARE_MAX 256 /* op structs kept for reuse per store */

/* Frees (or keeps for reuse) op once its callback has fired and its
 * connection owes it no reply. */
void rop_maybe_free(struct rop *op)
{
    if (op->state != ROP_DONE || op->refs > 0) return;
    struct store_redis *s = op->s;
    TAILQ_REMOVE(&s->ops, op, link);
    if (s->n_spare < ROP_SPARE_MAX) {
        TAILQ_INSERT_HEAD(&s->spare, op, link);
        s->n_spare++;
        return;
    }
    free(op->buf);
    free(op);
}

/* Frees every op, live or spare, without a callback (the store is being
 * freed). */
void rop_free_all(struct store_redis *s)
{
    struct rop *op;
    while ((op = TAILQ_FIRST(&s->ops))) {
        TAILQ_REMOVE(&s->ops, op, link);
        free(op->buf);
        free(op);
    }
    while ((op = TAILQ_FIRST(&s->spare))) {
        TAILQ_REMOVE(&s->spare, op, link);
        free(op->buf);
        free(op);
    }
    s->n_spare = 0;
}

/* Fires the user callback (once) and frees the op when nothing else
 * references it. A ROP_KEY gets key (NULL: found -1), a ROP_LIMIT lim
 * (NULL: STORE_LIMIT_ERROR). */
static void rop_finish_with(struct rop *op, const struct store_acquire_reply *acq, int status,
                            const struct store_key_info *key, const struct store_limit_reply *lim)
{
    if (op->state == ROP_DONE) return;
    op->state = ROP_DONE;
    if (op->kind == ROP_ACQUIRE) {
        op->acq_cb(op->arg, acq);
    } else if (op->kind == ROP_KEY) {
        struct store_key_info failed = {.found = -1, .ttl_ms = -1};
        op->key_cb(op->arg, key ? key : &failed);
    } else if (op->kind == ROP_LIMIT) {
        struct store_limit_reply failed = {.verdict = STORE_LIMIT_ERROR};
        op->limit_cb(op->arg, lim ? lim : &failed);
    } else {
        op->done_cb(op->arg, status);
    }
    rop_maybe_free(op);
}

static void rop_finish(struct rop *op, const struct store_acquire_reply *acq, int status)
{
    rop_finish_with(op, acq, status, NULL, NULL);
}

/* The caller is told STORE_ACQ_ERROR / -1; an acquire that may hold the
 * lock remembers it first, to give it back. */
void rop_fail(struct rop *op)
{
    if (op->state != ROP_DONE && op->kind == ROP_ACQUIRE && op->maybe_locked) gb_remember(op);
    struct store_acquire_reply r = {.state = STORE_ACQ_ERROR};
    rop_finish(op, &r, -1);
}

/* Arms the deadline timer for the oldest op still waiting, if any. */
static void rop_arm_deadline(struct store_redis *s)
{
    const struct rop *op = TAILQ_FIRST(&s->ops);
    while (op && op->state == ROP_DONE)
        op = TAILQ_NEXT(op, link);
    if (!op) return;
    uint64_t now = clock_now_ms();
    struct timeval tv = clock_tv(op->deadline_ms > now ? op->deadline_ms - now : 0);
    evtimer_add(s->deadline_ev, &tv);
}

/* Fails every op whose deadline has passed. A command that got no answer
 * in time means its connection may be stuck (a half-open socket never
 * answers), so that connection starts over (from the loop). */
static void rop_deadline_cb(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    struct store_redis *s = arg;
    rs_enter(s);
    uint64_t now = clock_now_ms();
    for (struct rop *op = TAILQ_FIRST(&s->ops), *next; op && !s->freeing; op = next) {
        next = TAILQ_NEXT(op, link);
        if (op->state == ROP_DONE) continue;
        if (op->deadline_ms > now) break;
        if (op->refs > 0 && op->conn) rc_kill_soon(op->conn);
        rop_fail(op);
    }
    if (!s->freeing) rop_arm_deadline(s);
    rs_leave(s);
}

/* Fails the ops marked fail_soon. */
static void rop_fail_cb(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    struct store_redis *s = arg;
    rs_enter(s);
    for (struct rop *op = TAILQ_FIRST(&s->ops), *next; op && !s->freeing; op = next) {
        next = TAILQ_NEXT(op, link);
        if (!op->fail_soon) continue;
        op->fail_soon = false;
        rop_fail(op);
    }
    rs_leave(s);
}

/* Fails op from the loop, never synchronously. */
static void rop_fail_soon(struct rop *op)
{
    op->fail_soon = true;
    event_active(op->s->fail_ev, EV_TIMEOUT, 0);
}

/* The store's two timers (store_redis_new). */
void rop_timers_new(struct store_redis *s)
{
    s->deadline_ev = evtimer_new(s->evb, rop_deadline_cb, s);
    s->fail_ev = event_new(s->evb, -1, 0, rop_fail_cb, s);
    if (!s->deadline_ev || !s->fail_ev) abort();
}

static void rop_reply_cb(struct rconn *c, const struct rreply *r, void *priv);

/* Sends one command on op->conn (after ASKING when redirected by ASK and
 * the command names the key). */
static int rop_send(struct rop *op, bool keyed, int argc, const char **argv, const size_t *lens)
{
    struct rconn *c = op->conn;
    if (!c || !rc_usable(c)) return -1;
    if (keyed && op->asking && rc_cmd(c, NULL, NULL, "ASKING", NULL) != 0) return -1;
    if (rc_command(c, rop_reply_cb, op, argc, argv, lens) != 0) return -1;
    op->refs++;
    return 0;
}

static int rop_send_script(struct rop *op, enum rs_script script, int argc, const char **args,
                           const size_t *lens)
{
    const char *argv[3 + RS_MAX_ARGS];
    size_t argvlen[3 + RS_MAX_ARGS];
    argv[0] = "EVALSHA";
    argvlen[0] = 7;
    argv[1] = op->s->sha[script];
    argvlen[1] = 40;
    argv[2] = rs_script_numkeys(script);
    argvlen[2] = 1;
    for (int i = 0; i < argc; i++) {
        argv[3 + i] = args[i];
        argvlen[3 + i] = lens[i];
    }
    return rop_send(op, true, 3 + argc, argv, argvlen);
}

/* An acquire's own command: SET NX PX GET where the server takes it,
 * else (an older or not yet known server, a key of the older layout) the
 * acquire script. argv: key, fp, token, ms, lock value. */
static int rop_send_acquire(struct rop *op)
{
    if (op->conn && op->conn->set_get && !op->legacy) {
        const char *argv[7] = {"SET", op->argv[0], op->argv[4], "NX", "PX", op->argv[3], "GET"};
        size_t lens[7] = {3, op->argvlen[0], op->argvlen[4], 2, 2, op->argvlen[3], 3};
        return rop_send(op, true, 7, argv, lens);
    }
    const char *args[3] = {op->argv[0], op->argv[4], op->argv[3]};
    size_t lens[3] = {op->argvlen[0], op->argvlen[4], op->argvlen[3]};
    return rop_send_script(op, RS_ACQUIRE, 3, args, lens);
}

/* SCAN <cursor> MATCH <pattern> COUNT 1000 on op->conn (argv[0]: the
 * pattern). */
static int rop_send_scan(struct rop *op)
{
    const char *argv[6] = {"SCAN", op->cursor, "MATCH", op->argv[0], "COUNT", "1000"};
    size_t lens[6] = {4, strlen(op->cursor), 5, op->argvlen[0], 5, 4};
    return rop_send(op, false, 6, argv, lens);
}

/* The op's own command: its script (or native acquire), or PING. */
int rop_send_main(struct rop *op)
{
    if (op->kind == ROP_KEY && op->stage == ROP_SCAN) return rop_send_scan(op);
    if (op->kind == ROP_PING) {
        const char *argv[1] = {"PING"};
        size_t len[1] = {4};
        return rop_send(op, false, 1, argv, len);
    }
    if (op->kind == ROP_KEY) /* the key and the forget flag */
        return rop_send_script(op, op->script, 2, op->argv, op->argvlen);
    if (op->kind != ROP_ACQUIRE)
        return rop_send_script(op, op->script, op->argc, op->argv, op->argvlen);
    int rc = rop_send_acquire(op);
    /* From here until a reply says otherwise, the server may take the
     * lock for us whatever our caller is told. */
    if (rc == 0) op->maybe_locked = true;
    return rc;
}

/* Gives back a lock taken by this acquire (argv: key, fp, token, ms). */
int rop_send_undo(struct rop *op)
{
    const char *args[2] = {op->argv[0], op->argv[2]};
    size_t lens[2] = {op->argvlen[0], op->argvlen[2]};
    return rop_send_script(op, RS_RELEASE, 2, args, lens);
}

static int rop_send_wait(struct rop *op)
{
    /* WAIT blocks on the server for its timeout (0 would mean forever):
     * leave half of what remains of the deadline for the answer and a
     * possible release. */
    uint64_t now = clock_now_ms();
    uint64_t left = op->deadline_ms > now ? op->deadline_ms - now : 0;
    uint64_t wait_ms = left / 2 ? left / 2 : 1;
    char n[16], ms[24];
    snprintf(n, sizeof(n), "%d", op->s->cfg->redis.wait_replicas);
    snprintf(ms, sizeof(ms), "%llu", (unsigned long long)wait_ms);
    const char *argv[3] = {"WAIT", n, ms};
    size_t lens[3] = {4, strlen(n), strlen(ms)};
    return rop_send(op, false, 3, argv, lens);
}

/* Sends a new op where the topology routes it, or parks it on a
 * connection that is not ready yet. Returns 0 when sent or parked. */
static int rop_dispatch(struct rop *op)
{
    switch (op->s->topo->route(op)) {
    case RS_ROUTE_SEND:
        return rop_send_main(op);
    case RS_ROUTE_PARK:
        op->state = ROP_PARKED;
        return 0;
    case RS_ROUTE_NONE:
        break;
    }
    return -1;
}

/* c is ready: send the ops parked on it, oldest first. A send failure is
 * reported from the loop, so no user callback runs here. */
void rop_flush_parked(struct rconn *c)
{
    struct rop *op;
    TAILQ_FOREACH (op, &c->s->ops, link) {
        if (op->state != ROP_PARKED || op->conn != c) continue;
        op->state = ROP_SENT;
        if (rop_send_main(op) != 0) rop_fail_soon(op);
    }
}

/* Errors behind a failed handshake are its echo, logged already. */
static void rs_log_bad_reply(const struct rconn *c, const struct rreply *r)
{
    if (c && c->handshake_failed) return;
    if (r->type == RREPLY_ERROR)
        log_msg(LOG_ERROR, "store redis: error reply: %.*s", (int)r->len, r->str);
    else
        log_msg(LOG_ERROR, "store redis: unexpected reply type %d", r->type);
}

/* Parses an acquire's answer (SET NX GET's or the script's: nil, or the
 * value found); false when malformed. */
static bool rop_parse_acquire(const struct rop *op, const struct rreply *r,
                              struct store_acquire_reply *out)
{
    if (r->type == RREPLY_NIL) {
        out->state = STORE_ACQ_LOCKED;
        return true;
    }
    return r->type == RREPLY_STRING &&
           rs_parse_value(r->str, r->len, (const uint8_t *)op->argv[1], out);
}

static void rop_on_acquire_main(struct rop *op, const struct rreply *r)
{
    struct store_acquire_reply out = {.state = STORE_ACQ_ERROR};
    if (!rop_parse_acquire(op, r, &out)) {
        if (r->type == RREPLY_STRING)
            log_msg(LOG_ERROR, "store redis: %.*s holds a value idemgate did not write",
                    (int)op->argvlen[0], op->argv[0]);
        else
            rs_log_bad_reply(op->conn, r);
        rop_fail(op);
        return;
    }
    if (out.state == STORE_ACQ_LOCKED && op->s->cfg->redis.wait_replicas > 0) {
        op->stage = ROP_WAIT;
        if (rop_send_wait(op) != 0) rop_fail(op);
        return;
    }
    rop_finish(op, &out, 0);
}

static void rop_on_wait(struct rop *op, const struct rreply *r)
{
    if (r->type == RREPLY_INTEGER && r->integer >= op->s->cfg->redis.wait_replicas) {
        struct store_acquire_reply out = {.state = STORE_ACQ_LOCKED};
        rop_finish(op, &out, 0);
        return;
    }
    log_msg(LOG_WARN, "store redis: WAIT got %lld of %d replicas; lock given back",
            r->type == RREPLY_INTEGER ? r->integer : -1LL, op->s->cfg->redis.wait_replicas);
    op->stage = ROP_UNDO;
    if (rop_send_undo(op) != 0) rop_fail(op);
}

static int rop_status_of(const struct rreply *r, enum rop_kind kind)
{
    if (kind == ROP_PING) return r->type == RREPLY_STATUS ? 1 : -1;
    if (r->type != RREPLY_INTEGER || (r->integer != 0 && r->integer != 1)) return -1;
    return (int)r->integer;
}

/* True when an acquire's reply says the lock is now ours. */
static bool rop_reply_locked(const struct rreply *r)
{
    return r->type == RREPLY_NIL;
}

/* A reply for an acquire whose caller already got an error (and which
 * remembered its lock then): give the lock back now when the reply shows
 * it is ours, forget it when it shows nothing was taken. */
static void rop_on_late_reply(struct rop *op, const struct rreply *r)
{
    if (op->kind != ROP_ACQUIRE) return;
    struct rs_giveback *e = gb_find(op->s, op->argv[2]);
    if (!e || e->inflight) return;
    bool locked;
    if (op->stage == ROP_WAIT)
        locked = true; /* WAIT changes nothing: the lock was taken */
    else if (op->stage == ROP_UNDO)
        locked = r->type != RREPLY_INTEGER; /* 1 or 0: it is gone */
    else
        locked = rop_reply_locked(r);
    if (locked)
        gb_send(e);
    else
        gb_free(e);
}

/* The inspect script's answer: nil, or {value, PTTL}. */
static void rop_on_inspect(struct rop *op, const struct rreply *r)
{
    struct store_key_info k = {.found = 0, .ttl_ms = -1};
    if (r->type == RREPLY_NIL) {
        rop_finish_with(op, NULL, 0, &k, NULL);
        return;
    }
    const struct rreply *v = r->type == RREPLY_ARRAY && r->elements == 2 ? &r->element[0] : NULL;
    if (!v || v->type != RREPLY_STRING || v->len < RS_VAL_HDR ||
        memcmp(v->str, RS_VAL_MAGIC, 3) != 0 || r->element[1].type != RREPLY_INTEGER) {
        rs_log_bad_reply(op->conn, r);
        rop_fail(op);
        return;
    }
    k.found = 1;
    k.completed = v->str[3] == 'c';
    memcpy(k.fp, v->str + 4 + STORE_TOKEN_LEN, STORE_FP_LEN);
    for (int i = 0; i < 8; i++)
        k.created_ms = k.created_ms << 8 | (uint8_t)v->str[RS_VAL_HDR - 8 + i];
    k.ttl_ms = r->element[1].integer;
    k.record = (uint8_t *)(v->str + RS_VAL_HDR); /* borrowed for the callback */
    k.record_len = k.completed ? v->len - RS_VAL_HDR : 0;
    /* the skey: argv[0] is "<prefix>{<skey>}" */
    size_t plen = strlen(op->s->prefix);
    k.skey = (char *)op->argv[0] + plen + 1;
    k.skey_len = op->argvlen[0] - plen - 2;
    rop_finish_with(op, NULL, 0, &k, NULL);
}

/* The limit script's answer: {verdict, remaining, reset_ms, retry_ms}. */
static void rop_on_limit(struct rop *op, const struct rreply *r)
{
    static const enum store_limit_verdict verdicts[] = {STORE_LIMIT_ALLOWED, STORE_LIMIT_RATE,
                                                        STORE_LIMIT_CONCURRENCY};
    bool ok = r->type == RREPLY_ARRAY && r->elements == 4;
    for (size_t i = 0; ok && i < 4; i++)
        ok = r->element[i].type == RREPLY_INTEGER && r->element[i].integer >= 0 &&
             r->element[i].integer <= (i == 0 ? 2 : UINT32_MAX);
    if (!ok) {
        rs_log_bad_reply(op->conn, r);
        rop_fail(op);
        return;
    }
    struct store_limit_reply out = {
        .verdict = verdicts[r->element[0].integer],
        .remaining = (uint32_t)r->element[1].integer,
        .reset_ms = (uint32_t)r->element[2].integer,
        .retry_ms = (uint32_t)r->element[3].integer,
    };
    rop_finish_with(op, NULL, 0, NULL, &out);
}

/* Replaces the op's first argument (the SCAN pattern by the key found);
 * the others are kept. */
static void rop_set_key(struct rop *op, const char *key, size_t len)
{
    size_t total = len;
    for (int i = 1; i < op->argc; i++)
        total += op->argvlen[i];
    size_t cap = total > op->buf_cap ? total : op->buf_cap;
    char *buf = rs_alloc(cap);
    memcpy(buf, key, len);
    char *p = buf + len;
    for (int i = 1; i < op->argc; i++) {
        memcpy(p, op->argv[i], op->argvlen[i]);
        op->argv[i] = p;
        p += op->argvlen[i];
    }
    free(op->buf);
    op->buf = buf;
    op->buf_cap = cap;
    op->argv[0] = buf;
    op->argvlen[0] = len;
}

/* Whether a key SCAN found, "<prefix>{<scope>:<key>}", has exactly the key
 * part asked for (argv[2]): the pattern's * may have matched a ':' of a
 * longer key ("x:dup" for "dup"). */
static bool rop_scan_match(const struct rop *op, const char *k, size_t n)
{
    size_t plen = strlen(op->s->prefix);
    if (n < plen + 2 || k[plen] != '{' || k[n - 1] != '}') return false;
    const char *in = k + plen + 1;
    size_t in_len = n - plen - 2;
    const char *colon = memchr(in, ':', in_len);
    if (!colon) return false;
    size_t key_len = in_len - (size_t)(colon - in) - 1;
    return key_len == op->argvlen[2] && memcmp(colon + 1, op->argv[2], key_len) == 0;
}

/* The next connection to SCAN after c (a cluster's next node), or NULL. */
static struct rconn *rop_next_scan_conn(struct rop *op)
{
    if (!op->s->topo->slots) return NULL;
    for (struct rconn *c = op->conn->next; c; c = c->next)
        if (rc_ensure(c)) return c;
    return NULL;
}

/* SCAN's answer: [cursor, [keys]]: the first key found is inspected;
 * none, the next batch, node, or not found. */
static void rop_on_scan(struct rop *op, const struct rreply *r)
{
    if (r->type != RREPLY_ARRAY || r->elements != 2 || r->element[0].type != RREPLY_STRING ||
        r->element[0].len >= sizeof(op->cursor) || r->element[1].type != RREPLY_ARRAY) {
        rs_log_bad_reply(op->conn, r);
        rop_fail(op);
        return;
    }
    const struct rreply *keys = &r->element[1];
    for (size_t i = 0; i < keys->elements; i++) {
        if (keys->element[i].type != RREPLY_STRING ||
            !rop_scan_match(op, keys->element[i].str, keys->element[i].len))
            continue;
        rop_set_key(op, keys->element[i].str, keys->element[i].len);
        op->stage = ROP_MAIN;
        if (rop_send_main(op) != 0) rop_fail(op);
        return;
    }
    memcpy(op->cursor, r->element[0].str, r->element[0].len);
    op->cursor[r->element[0].len] = '\0';
    if (strcmp(op->cursor, "0") == 0) {
        struct rconn *next = rop_next_scan_conn(op);
        if (!next) {
            struct store_key_info k = {.found = 0, .ttl_ms = -1};
            rop_finish_with(op, NULL, 0, &k, NULL);
            return;
        }
        op->conn = next;
    }
    if (rop_send_scan(op) != 0) rop_fail(op);
}

static void rop_reply_cb(struct rconn *c, const struct rreply *r, void *priv)
{
    struct rop *op = priv;
    op->refs--;
    if (op->state == ROP_DONE) {
        if (r) rop_on_late_reply(op, r);
        rop_maybe_free(op);
        return;
    }
    if (!r) {
        /* Lost before a byte reached the socket: nothing reached the server. */
        if (!rc_is_connected(c)) op->maybe_locked = false;
        rop_fail(op);
        return;
    }
    if (op->kind == ROP_ACQUIRE && op->stage == ROP_MAIN) op->maybe_locked = rop_reply_locked(r);
    const struct rs_topology_ops *t = op->s->topo;
    if (r->type == RREPLY_ERROR && t->on_error_reply && t->on_error_reply(op, r)) return;
    if (op->kind == ROP_ACQUIRE && op->stage == ROP_MAIN && !op->legacy &&
        rs_reply_is_error(r, "WRONGTYPE")) {
        /* A key an older idemgate wrote: the script reads it. */
        op->legacy = true;
        if (rop_send_main(op) != 0) rop_fail(op);
        return;
    }
    if (op->stage == ROP_MAIN && op->kind != ROP_PING && rs_reply_is_error(r, "NOSCRIPT") &&
        !op->retried) {
        op->retried = true;
        if (rs_scripts_reload(op->conn) != 0 || rop_send_main(op) != 0) rop_fail(op);
        return;
    }
    if (op->stage == ROP_UNDO) {
        if (r->type == RREPLY_INTEGER) op->maybe_locked = false; /* given back */
        rop_fail(op);
    } else if (op->stage == ROP_WAIT) {
        rop_on_wait(op, r);
    } else if (op->kind == ROP_ACQUIRE) {
        rop_on_acquire_main(op, r);
    } else if (op->kind == ROP_LIMIT) {
        rop_on_limit(op, r);
    } else if (op->kind == ROP_KEY) {
        if (op->stage == ROP_SCAN)
            rop_on_scan(op, r);
        else
            rop_on_inspect(op, r);
    } else {
        int status = rop_status_of(r, op->kind);
        if (status < 0) rs_log_bad_reply(op->conn, r);
        rop_finish(op, NULL, status);
    }
}

/* Builds the op (a recycled one when there is one), listed last in
 * s->ops, and copies the arguments (the key first) into one buffer it
 * owns. */
struct rop *rop_new(struct store_redis *s, enum rop_kind kind, enum rs_script script, int argc,
                    const char **args, const size_t *lens)
{
    struct rop *op = TAILQ_FIRST(&s->spare);
    char *buf = NULL;
    size_t cap = 0;
    if (op) {
        TAILQ_REMOVE(&s->spare, op, link);
        s->n_spare--;
        buf = op->buf;
        cap = op->buf_cap;
        memset(op, 0, sizeof(*op));
    } else {
        op = rs_alloc(sizeof(*op));
    }
    op->s = s;
    op->kind = kind;
    op->script = script;
    op->state = ROP_SENT;
    size_t total = 0;
    for (int i = 0; i < argc; i++)
        total += lens[i];
    if (total > cap || !buf) {
        free(buf);
        cap = total > 128 ? total : 128;
        buf = rs_alloc(cap);
    }
    op->buf = buf;
    op->buf_cap = cap;
    char *p = op->buf;
    for (int i = 0; i < argc; i++) {
        if (lens[i]) memcpy(p, args[i], lens[i]);
        op->argv[i] = p;
        op->argvlen[i] = lens[i];
        p += lens[i];
    }
    op->argc = argc;
    if (argc > 0 && s->topo->slots) op->slot = rs_keyslot(op->argv[0], op->argvlen[0]);
    TAILQ_INSERT_TAIL(&s->ops, op, link);
    return op;
}

/* Starts op on c, chosen by the caller (a cluster's SCAN visits every
 * node), bypassing the topology's route; NULL c fails it from the loop. */
void rop_start_on(struct rop *op, struct rconn *c)
{
    struct store_redis *s = op->s;
    op->deadline_ms = clock_now_ms() + (uint64_t)rs_timeout_ms(s);
    if (!evtimer_pending(s->deadline_ev, NULL)) rop_arm_deadline(s);
    op->conn = c;
    if (!c || rop_send_main(op) != 0) rop_fail_soon(op);
}

/* Sets op's deadline (redis.timeout_ms) and sends it; the caller's
 * callback never fires from in here. */
void rop_start(struct rop *op)
{
    struct store_redis *s = op->s;
    op->deadline_ms = clock_now_ms() + (uint64_t)rs_timeout_ms(s);
    if (!evtimer_pending(s->deadline_ev, NULL)) rop_arm_deadline(s);
    if (rop_dispatch(op) != 0) rop_fail_soon(op);
}
