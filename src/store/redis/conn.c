/* conn.c — one Redis server connection (see redis_internal.h).
 *
 * Owns struct rconn: its socket on our connection layer (net/conn, TLS
 * included), commands written as RESP into its output buffer and sent
 * once per loop iteration (flush_ev), replies parsed in place (resp.c) and
 * handed to the ring of pending callbacks in order; the handshake (AUTH,
 * SELECT, the maxmemory-policy check, the server's version, the
 * topology's own commands, SCRIPT LOAD) and its timeout; tearing a
 * connection down (every pending callback gets a NULL reply) and the
 * backoff before reconnecting. Does not own the operations sent on it
 * (op.c), nor decide which server it talks to or what its going down or
 * coming up means: that is the topology's (s->topo), told through its
 * table, or an AUX connection's owner's (down_fn). */
#include "redis_internal.h"

#include "idemgate/core/clock.h"

#include "idemgate/core/log.h"

#include <errno.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#define RC_READ_LIMIT (256 * 1024) /* read at most this much more before parsing */

/* Reconnects (or whatever the topology does then) after a backoff that
 * doubles from RS_BACKOFF_MIN_MS up to RS_BACKOFF_MAX_MS while c fails. */
void rc_schedule_reconnect(struct rconn *c)
{
    unsigned step = c->backoff_step < 5 ? c->backoff_step : 5;
    uint64_t ms = (uint64_t)RS_BACKOFF_MIN_MS << step;
    if (ms > RS_BACKOFF_MAX_MS) ms = RS_BACKOFF_MAX_MS;
    c->backoff_step++;
    struct timeval tv = clock_tv(ms);
    evtimer_add(c->reconnect_ev, &tv);
}

/* ---- the pending ring ---- */

static void rc_q_push(struct rconn *c, rc_reply_fn *fn, void *priv)
{
    if (c->q_len == c->q_cap) {
        size_t cap = c->q_cap ? c->q_cap * 2 : 16;
        struct rc_pending *q = rs_alloc(cap * sizeof(*q));
        for (size_t i = 0; i < c->q_len; i++)
            q[i] = c->q[(c->q_head + i) % c->q_cap];
        free(c->q);
        c->q = q;
        c->q_cap = cap;
        c->q_head = 0;
    }
    c->q[(c->q_head + c->q_len) % c->q_cap] = (struct rc_pending){fn, priv};
    c->q_len++;
}

static struct rc_pending rc_q_pop(struct rconn *c)
{
    struct rc_pending p = c->q[c->q_head];
    c->q_head = (c->q_head + 1) % c->q_cap;
    c->q_len--;
    return p;
}

/* ---- going down ---- */

/* Closes the socket and empties the ring into *owed (the caller calls or
 * drops them); c is IDLE afterwards. */
static void rc_close_io(struct rconn *c, struct rc_pending **owed, size_t *n_owed)
{
    *owed = NULL;
    *n_owed = c->q_len;
    if (c->q_len) {
        *owed = rs_alloc(c->q_len * sizeof(**owed));
        for (size_t i = 0; i < *n_owed; i++)
            (*owed)[i] = rc_q_pop(c);
    }
    c->q_head = 0;
    if (conn_is_open(&c->io)) conn_close(&c->io);
    event_del(c->flush_ev);
    c->flush_queued = false;
    c->state = RC_IDLE;
    c->set_get = false;
    if (c->handshake_ev) evtimer_del(c->handshake_ev);
    evtimer_del(c->kill_ev);
}

/* The connection went (why): log once per outage, start the backoff
 * (what happens when it is over is the topology's), tell the topology,
 * then give every pending callback its NULL reply. User callbacks may run
 * there and even free the store: the caller is inside rs_enter. */
static void rc_went_down(struct rconn *c, const char *why)
{
    struct rc_pending *owed;
    size_t n;
    bool wrote = c->wrote;
    rc_close_io(c, &owed, &n);
    if (c->kind == RC_AUX) {
        free(owed); /* its owner is told instead */
        c->down_fn(c, why, c->down_arg);
        return;
    }
    if (!c->down_logged) {
        if (c->unix_socket)
            log_msg(LOG_WARN, "store redis: connection to %s lost: %s", c->host, why);
        else
            log_msg(LOG_WARN, "store redis: connection to %s:%d lost: %s", c->host, c->port, why);
        c->down_logged = true;
    }
    rc_schedule_reconnect(c);
    if (c->s->topo->on_down) c->s->topo->on_down(c);
    /* Ops read c->wrote (did any byte reach the server?) in their NULL
     * reply: it stays as it was until they have had it. */
    c->wrote = wrote;
    struct store_redis *s = c->s;
    for (size_t i = 0; i < n && !s->freeing; i++)
        if (owed[i].fn) owed[i].fn(c, NULL, owed[i].priv);
    free(owed);
    if (!s->freeing) c->wrote = false;
}

/* Tears c down now, from a libevent callback of the store's. */
static void rc_kill_now(struct rconn *c, const char *why)
{
    if (c->state == RC_IDLE) return;
    struct store_redis *s = c->s;
    rs_enter(s);
    rc_went_down(c, why);
    rs_leave(s);
}

static void rc_kill_cb(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    rc_kill_now(arg, "a command timed out, the handshake failed or the server is not usable");
}

/* Tears c down from the loop (safe from inside a reply callback). */
void rc_kill_soon(struct rconn *c)
{
    if (c->state == RC_IDLE) return;
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

/* ---- writing ---- */

static void rc_flush(struct rconn *c)
{
    c->flush_queued = false;
    if (c->state < RC_HANDSHAKE || buf_size(&c->io.out) == 0) return;
    c->wrote = true;
    if (conn_flush(&c->io) < 0) rc_kill_soon(c);
}

static void rc_flush_cb(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    rc_flush(arg);
}

int rc_command(struct rconn *c, rc_reply_fn *fn, void *priv, int argc, const char **argv,
               const size_t *lens)
{
    if (c->state == RC_IDLE) return -1;
    resp_append_command(conn_outbuf(&c->io), argc, argv, lens);
    rc_q_push(c, fn, priv);
    if (!c->flush_queued) {
        c->flush_queued = true;
        event_active(c->flush_ev, EV_WRITE, 0);
    }
    return 0;
}

int rc_cmd(struct rconn *c, rc_reply_fn *fn, void *priv, ...)
{
    const char *argv[8];
    int argc = 0;
    va_list ap;
    va_start(ap, priv);
    for (const char *a = va_arg(ap, const char *); a && argc < 8; a = va_arg(ap, const char *))
        argv[argc++] = a;
    va_end(ap);
    return rc_command(c, fn, priv, argc, argv, NULL);
}

/* AUTH [user] password, when the URL names either; 1 when sent, 0 when
 * there is nothing to send, -1 when it cannot be queued. */
int rc_send_auth(struct rconn *c, rc_reply_fn *fn, void *priv)
{
    const struct cfg_redis *rc = &c->s->cfg->redis;
    if (!rc->username && !(rc->password && rc->password[0])) return 0;
    if (rc->username) return rc_cmd(c, fn, priv, "AUTH", rc->username, rc->password, NULL) ? -1 : 1;
    return rc_cmd(c, fn, priv, "AUTH", rc->password, NULL) ? -1 : 1;
}

/* ---- reading ---- */

/* Pub/sub messages go to push_fn; every other reply is the oldest
 * pending command's. A reply nobody asked for means the stream is out of
 * step: start over. */
static void rc_dispatch(struct rconn *c, const struct rreply *r)
{
    if (c->push_fn && r->type == RREPLY_ARRAY && r->elements >= 1 &&
        (rs_reply_is(&r->element[0], "message") || rs_reply_is(&r->element[0], "pmessage"))) {
        c->push_fn(c, r, c->push_arg);
        return;
    }
    if (c->q_len == 0) {
        if (c->push_fn && r->type == RREPLY_ERROR) { /* a subscriber's refusal */
            c->push_fn(c, r, c->push_arg);
            return;
        }
        log_msg(LOG_ERROR, "store redis: %s:%d sent a reply nobody asked for", c->host, c->port);
        rc_kill_soon(c);
        return;
    }
    struct rc_pending p = rc_q_pop(c);
    if (p.fn) p.fn(c, r, p.priv);
}

/* Parses and dispatches every complete reply in the input buffer.
 * Returns false when c or its store went away meanwhile. */
static bool rc_read_replies(struct rconn *c)
{
    struct store_redis *s = c->s;
    size_t off = 0;
    bool alive = true;
    c->dispatching++;
    while (off < buf_size(&c->io.in)) {
        struct rreply *r;
        size_t used;
        int rc =
            resp_parse(buf_data(&c->io.in) + off, buf_size(&c->io.in) - off, &c->arena, &r, &used);
        if (rc == 0) break;
        if (rc < 0) {
            log_msg(LOG_ERROR, "store redis: %s:%d: protocol error", c->host, c->port);
            rc_kill_soon(c);
            break;
        }
        off += used;
        rc_dispatch(c, r);
        if (evtimer_pending(c->kill_ev, NULL)) break; /* out of step: torn down next */
        if (s->freeing || c->release_pending || c->state == RC_IDLE) {
            alive = false;
            break;
        }
    }
    c->dispatching--;
    if (s->freeing) return false;
    if (c->release_pending) {
        if (c->dispatching == 0) rc_release(c);
        return false;
    }
    if (conn_is_open(&c->io)) buf_consume(&c->io.in, off);
    return alive;
}

/* The socket connected (or failed to): SO_ERROR says. */
static int rc_connect_result(struct rconn *c)
{
    int err = 0;
    socklen_t len = sizeof(err);
    if (getsockopt(c->io.fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0) return errno;
    return err;
}

static void rc_up(struct rconn *c)
{
    c->state = RC_HANDSHAKE;
    if (c->kind == RC_AUX && c->handshake_left == 0) c->state = RC_READY;
    rc_flush(c);
}

static void rc_io_cb(struct conn *io, short what, void *arg)
{
    (void)io;
    struct rconn *c = arg;
    struct store_redis *s = c->s;
    char why[256];
    rs_enter(s);
    if (c->state == RC_CONNECTING) {
        if (!(what & EV_WRITE) && !(what & EV_READ)) goto out;
        int err = rc_connect_result(c);
        if (err) {
            rc_went_down(c, strerror(err));
            goto out;
        }
        if (s->tls) {
            struct ssl_st *ssl = rs_tls_new(s, c->host);
            if (!ssl) {
                rc_went_down(c, "cannot start TLS");
                goto out;
            }
            conn_set_tls(&c->io, ssl);
            c->state = RC_TLS;
        } else {
            rc_up(c); /* and read what came with the connect (a refusal) */
        }
    }
    if (c->state == RC_TLS) {
        int r = conn_handshake(&c->io, why, sizeof(why));
        if (r < 0) {
            char msg[300];
            snprintf(msg, sizeof(msg), "TLS handshake failed: %s", why);
            rc_went_down(c, msg);
            goto out;
        }
        if (r == 0) goto out;
        rc_up(c);
        what |= EV_READ;
    }
    if ((what & EV_WRITE) && buf_size(&c->io.out) > 0) rc_flush(c);
    if (what & EV_READ) {
        for (;;) {
            size_t got = conn_fill(&c->io, buf_size(&c->io.in) + RC_READ_LIMIT);
            if (buf_size(&c->io.in) > 0 && !rc_read_replies(c)) goto out;
            if (evtimer_pending(c->kill_ev, NULL)) break; /* torn down next: read no more */
            if (c->io.err) {
                rc_went_down(c, strerror(c->io.err));
                goto out;
            }
            if (c->io.eof) {
                rc_went_down(c, "Server closed the connection");
                goto out;
            }
            /* TLS: SSL_has_pending is true for a record only partly
             * received too, which only the next edge completes; decrypted
             * bytes left at the limit are read (got > 0) on the next turn. */
            if (!c->io.rd_ready && (got == 0 || !conn_tls_pending(&c->io))) break;
        }
        if (buf_size(&c->io.in) == 0) conn_trim(&c->io);
    }
out:
    rs_leave(s);
}

/* ---- connecting ---- */

static int rc_socket_unix(const char *path)
{
    struct sockaddr_un sa;
    memset(&sa, 0, sizeof(sa));
    sa.sun_family = AF_UNIX;
    if (strlen(path) >= sizeof(sa.sun_path)) {
        errno = ENAMETOOLONG;
        return -1;
    }
    strcpy(sa.sun_path, path);
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) return -1;
    if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0 && errno != EINPROGRESS &&
        errno != EAGAIN) {
        int e = errno;
        close(fd);
        errno = e;
        return -1;
    }
    return fd;
}

/* Opens c's socket (non-blocking connect); false with why when it cannot
 * even start. */
static bool rc_open_socket(struct rconn *c, char *why, size_t why_len)
{
    int fd;
    if (c->unix_socket) {
        fd = rc_socket_unix(c->host);
    } else {
        struct sockaddr_storage addr;
        unsigned addr_len = 0;
        if (conn_resolve(c->host, c->port, &addr, sizeof(addr), &addr_len) < 0) {
            snprintf(why, why_len, "cannot resolve %s", c->host);
            return false;
        }
        fd = conn_connect_addr((const struct sockaddr *)&addr, addr_len);
    }
    if (fd < 0) {
        snprintf(why, why_len, "%s", strerror(errno));
        return false;
    }
    if (conn_open(&c->io, c->s->evb, fd, rc_io_cb, c) < 0) {
        snprintf(why, why_len, "cannot watch the socket");
        return false;
    }
    /* Not connected yet: the first edge tells. */
    c->io.rd_ready = false;
    c->io.wr_ready = false;
    c->state = RC_CONNECTING;
    c->wrote = false;
    c->set_get = false;
    c->handshake_failed = false;
    return true;
}

#define RS_TAG_AUTH ((void *)(intptr_t)-1)
#define RS_TAG_SELECT ((void *)(intptr_t)-2)
#define RS_TAG_INFO ((void *)(intptr_t)-3)

static const char *rs_tag_name(void *priv)
{
    if (priv == RS_TAG_AUTH) return "AUTH";
    if (priv == RS_TAG_SELECT) return "SELECT";
    return "SCRIPT LOAD";
}

/* INFO server's answer: whether the server takes SET NX PX GET (7.0 and
 * later). An answer without a version (INFO refused by an ACL, say)
 * leaves the acquire script in use: slower, never wrong. */
static void rc_note_version(struct rconn *c, const struct rreply *r)
{
    c->set_get = false;
    static const char tag[] = "redis_version:";
    if (r->type != RREPLY_STRING) return;
    const char *p = memmem(r->str, r->len, tag, sizeof(tag) - 1);
    if (p) c->set_get = atoi(p + sizeof(tag) - 1) >= 7;
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
    c->state = RC_READY;
    c->backoff_step = 0;
    if (c->s->topo->on_ready)
        c->s->topo->on_ready(c);
    else if (c->down_logged)
        log_msg(LOG_INFO, "store redis: connected again");
    c->down_logged = false;
    gb_flush(c);
    rop_flush_parked(c);
}

static void rc_handshake_cb(struct rconn *c, const struct rreply *r, void *priv)
{
    if (!r) return;
    if (priv == RS_TAG_INFO) {
        rc_note_version(c, r);
        rc_handshake_answered(c);
        return;
    }
    bool ok = priv == RS_TAG_AUTH || priv == RS_TAG_SELECT
                  ? r->type != RREPLY_ERROR
                  : rs_script_loaded(c->s, r, (intptr_t)priv);
    if (ok) {
        rc_handshake_answered(c);
        return;
    }
    if (!c->handshake_failed && !c->down_logged) {
        /* The commands behind the first failure fail too, and so does
         * every retry until it is fixed: say it once per outage. */
        log_msg(LOG_ERROR, "store redis: %s failed: %.*s", rs_tag_name(priv),
                r->type == RREPLY_ERROR ? (int)r->len : (int)strlen("unexpected reply"),
                r->type == RREPLY_ERROR ? r->str : "unexpected reply");
    }
    rc_handshake_failed(c);
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

static void rc_info_policy_cb(struct rconn *c, const struct rreply *r, void *priv)
{
    (void)priv;
    static const char tag[] = "maxmemory_policy:";
    if (!r || r->type != RREPLY_STRING) return;
    const char *p = memmem(r->str, r->len, tag, sizeof(tag) - 1);
    if (!p) return;
    p += sizeof(tag) - 1;
    size_t left = (size_t)(r->str + r->len - p), n = 0;
    while (n < left && p[n] != '\r' && p[n] != '\n')
        n++;
    rs_check_policy(c, p, n);
}

/* CONFIG GET maxmemory-policy: {name, value}; when CONFIG is refused (an
 * ACL, a renamed command) INFO memory says it too. */
static void rc_policy_cb(struct rconn *c, const struct rreply *r, void *priv)
{
    (void)priv;
    if (!r) return;
    if (r->type == RREPLY_ARRAY && r->elements == 2 && r->element[1].type == RREPLY_STRING) {
        rs_check_policy(c, r->element[1].str, r->element[1].len);
        return;
    }
    rc_cmd(c, rc_info_policy_cb, NULL, "INFO", "memory", NULL);
}

/* AUTH, SELECT (unless the topology has one database), the eviction
 * policy (not part of the handshake: nobody waits for it), the server's
 * version (INFO server: how to acquire), the topology's own commands
 * (ROLE for a sentinel master), SCRIPT LOAD. */
static int rc_send_handshake(struct rconn *c)
{
    const struct cfg_redis *rc = &c->s->cfg->redis;
    c->handshake_left = RS_NSCRIPTS;
    int auth = rc_send_auth(c, rc_handshake_cb, RS_TAG_AUTH);
    if (auth < 0) return -1;
    c->handshake_left += auth;
    const struct rs_topology_ops *t = c->s->topo;
    if (rc->db != 0 && t->select_db) {
        char db[16];
        snprintf(db, sizeof(db), "%d", rc->db);
        if (rc_cmd(c, rc_handshake_cb, RS_TAG_SELECT, "SELECT", db, NULL) != 0) return -1;
        c->handshake_left++;
    }
    if (rc_cmd(c, rc_policy_cb, NULL, "CONFIG", "GET", "maxmemory-policy", NULL) != 0) return -1;
    if (rc_cmd(c, rc_handshake_cb, RS_TAG_INFO, "INFO", "server", NULL) != 0) return -1;
    c->handshake_left++;
    if (t->handshake) {
        int n = t->handshake(c);
        if (n < 0) return -1;
        c->handshake_left += n;
    }
    return rs_scripts_load(c, rc_handshake_cb);
}

/* Starts connecting; the handshake is queued at once (written when the
 * socket connects), and operations started meanwhile queue up behind it
 * in order. */
void rc_connect(struct rconn *c)
{
    if (c->state != RC_IDLE) return;
    char why[128];
    if (!rc_open_socket(c, why, sizeof(why))) {
        struct store_redis *s = c->s;
        rs_enter(s);
        rc_went_down(c, why);
        rs_leave(s);
        return;
    }
    if (rc_send_handshake(c) != 0) {
        rc_kill_soon(c);
        return;
    }
    struct timeval tv = clock_tv((uint64_t)rs_timeout_ms(c->s));
    evtimer_add(c->handshake_ev, &tv);
}

/* A connected (or connecting) c, opening it when it is not backing off;
 * false when c cannot take a command now. */
bool rc_ensure(struct rconn *c)
{
    if (c->state == RC_IDLE && !evtimer_pending(c->reconnect_ev, NULL)) rc_connect(c);
    return rc_usable(c);
}

/* Whether c can take a command now (connected or connecting, and not
 * about to be torn down). */
bool rc_usable(const struct rconn *c)
{
    return c->state != RC_IDLE && !evtimer_pending(c->kill_ev, NULL);
}

bool rc_is_connected(const struct rconn *c)
{
    return c->state >= RC_HANDSHAKE || c->wrote;
}

static struct rconn *rc_alloc(struct store_redis *s, enum rc_kind kind)
{
    struct rconn *c = rs_alloc(sizeof(*c));
    c->s = s;
    c->kind = kind;
    c->state = RC_IDLE;
    c->io.fd = -1;
    resp_arena_init(&c->arena);
    c->flush_ev = event_new(s->evb, -1, 0, rc_flush_cb, c);
    c->kill_ev = evtimer_new(s->evb, rc_kill_cb, c);
    if (!c->flush_ev || !c->kill_ev) abort();
    return c;
}

/* A DATA connection, disconnected, listed in s->conns; host (or the unix
 * socket path) is taken over. Nothing connects until rc_connect or
 * rc_ensure. */
struct rconn *rc_new(struct store_redis *s, char *host, int port, bool unix_socket)
{
    struct rconn *c = rc_alloc(s, RC_DATA);
    c->host = host;
    c->port = port;
    c->unix_socket = unix_socket;
    c->reconnect_ev = evtimer_new(s->evb, rc_reconnect_cb, c);
    c->handshake_ev = evtimer_new(s->evb, rc_handshake_timeout_cb, c);
    if (!c->reconnect_ev || !c->handshake_ev) abort();
    c->next = s->conns;
    s->conns = c;
    return c;
}

struct rconn *rc_aux_open(struct store_redis *s, const char *host, int port, rc_down_fn *down_fn,
                          void *arg, char *why, size_t why_len)
{
    struct rconn *c = rc_alloc(s, RC_AUX);
    c->host = rs_strndup(host, strlen(host));
    c->port = port;
    c->down_fn = down_fn;
    c->down_arg = arg;
    if (!rc_open_socket(c, why, why_len)) {
        rc_free(c);
        return NULL;
    }
    /* The same user and password as the data connections (a sentinel
     * that needs none answers the next command anyway). Its answer is
     * not awaited: a refusal shows as the next command's NOAUTH. */
    if (rc_send_auth(c, NULL, NULL) < 0) {
        snprintf(why, why_len, "cannot send");
        rc_free(c);
        return NULL;
    }
    return c;
}

void rc_release(struct rconn *c)
{
    if (c->dispatching > 0) {
        c->release_pending = true;
        return;
    }
    rc_free(c);
}

/* Points a disconnected c somewhere else (a new sentinel master). */
void rc_set_address(struct rconn *c, const char *host, size_t hlen, int port)
{
    free(c->host);
    c->host = rs_strndup(host, hlen);
    c->port = port;
}

/* Closes c's socket and frees c, dropping its pending callbacks: the
 * store is being freed (DATA), or its owner is done with it (AUX). */
void rc_free(struct rconn *c)
{
    struct rc_pending *owed;
    size_t n;
    rc_close_io(c, &owed, &n);
    free(owed);
    free(c->q);
    resp_arena_free(&c->arena);
    event_free(c->flush_ev);
    event_free(c->kill_ev);
    if (c->reconnect_ev) event_free(c->reconnect_ev);
    if (c->handshake_ev) event_free(c->handshake_ev);
    free(c->host);
    free(c);
}
