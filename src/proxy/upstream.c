/* upstream.c — keep-alive upstream connection pools, one per upstream URL
 * per event loop (no locks: a pool belongs to one loop). Owns parked
 * connections; a connection handed out belongs to its exchange until it is
 * put back. For https, the SSL of each connection (through its conn) and
 * the pool's last session; the client context is tls.c's. */
#include "idemgate/proxy/upstream.h"

#include <errno.h>
#include <stdlib.h>
#include <sys/socket.h>

#include <event2/event.h>
#include <openssl/ssl.h>

#include "idemgate/config/config.h"
#include "idemgate/core/log.h"
#include "idemgate/core/clock.h"
#include "idemgate/proxy/loop.h"
#include "idemgate/net/tls.h"

/* Many servers close idle keep-alive connections after ~5 s (Node.js,
 * gunicorn). Reusing one just as the server closes it would fail a request
 * that we must not retry (it may be a POST), so park connections for less. */
#define UPSTREAM_MAX_IDLE_MS 4000
#define UPSTREAM_MAX_IDLE_CONNS 256

void upstream_pool_init(struct upstream_pool *p, struct loop *l, const struct cfg_url *url)
{
    p->loop = l;
    p->url = url;
    p->idle = NULL;
    p->n_idle = 0;
    p->max_idle = UPSTREAM_MAX_IDLE_CONNS;
    p->addr_len = 0;
    p->tls_session = NULL;
}

static void upconn_free(struct upconn *u)
{
    conn_close(&u->c);
    free(u);
}

static void pool_unlink(struct upstream_pool *p, struct upconn *u)
{
    for (struct upconn **pp = &p->idle; *pp; pp = &(*pp)->next) {
        if (*pp == u) {
            *pp = u->next;
            p->n_idle--;
            u->next = NULL;
            return;
        }
    }
}

static void upconn_log_stray(const struct upconn *u)
{
    log_msg(LOG_WARN, "upstream %s: bytes arrived on an idle connection after its answer; closed",
            u->pool->url->text);
}

/* A parked connection became readable: the peer closed it or sent bytes
 * nobody asked for. Either way it cannot be reused. */
static void pool_idle_event(struct conn *c, short what, void *arg)
{
    struct upconn *u = arg;
    if (!(what & EV_READ)) return;
    char b;
    ssize_t n = recv(c->fd, &b, 1, MSG_PEEK);
    /* An edge may report bytes an exchange already read: only a real EOF,
     * error or unexpected byte retires the connection. */
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return;
    if (n > 0) upconn_log_stray(u);
    pool_unlink(u->pool, u);
    upconn_free(u);
}

/* Nothing arrived on a parked connection since its last answer (docs/requests.md).
 * pool_idle_event retires one that gets bytes or a FIN, but only once its
 * event is dispatched: bytes that arrived in the same batch of events as
 * the request now taking the connection would be read as that request's
 * answer. One non-blocking peek per reuse closes that window. */
static bool upconn_quiet(struct upconn *u)
{
    char b;
    ssize_t n = recv(u->c.fd, &b, 1, MSG_PEEK | MSG_DONTWAIT);
    if (n > 0) upconn_log_stray(u);
    return n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK);
}

void upstream_pool_free(struct upstream_pool *p)
{
    while (p->idle) {
        struct upconn *u = p->idle;
        p->idle = u->next;
        upconn_free(u);
    }
    p->n_idle = 0;
    if (p->tls_session) SSL_SESSION_free(p->tls_session);
    p->tls_session = NULL;
}

struct upconn *upstream_get(struct upstream_pool *p)
{
    uint64_t now = clock_now_ms();
    while (p->idle) {
        struct upconn *u = p->idle;
        p->idle = u->next;
        p->n_idle--;
        u->next = NULL;
        if (now - u->idle_since_ms < UPSTREAM_MAX_IDLE_MS && !u->c.eof && !u->c.err &&
            upconn_quiet(u)) {
            return u;
        }
        upconn_free(u);
    }
    if (p->addr_len == 0 &&
        conn_resolve(p->url->host, p->url->port, &p->addr, sizeof(p->addr), &p->addr_len) < 0) {
        errno = EHOSTUNREACH;
        return NULL;
    }
    int fd = conn_connect_addr((const struct sockaddr *)&p->addr, p->addr_len);
    if (fd < 0) {
        p->addr_len = 0; /* resolve again next time */
        return NULL;
    }
    struct upconn *u = calloc(1, sizeof(*u));
    if (!u) abort();
    u->pool = p;
    if (conn_open(&u->c, p->loop->base, fd, pool_idle_event, u) < 0) {
        free(u);
        errno = ENOMEM;
        return NULL;
    }
    u->c.pool = &p->loop->bufs;
    /* Not connected yet: the first EV_WRITE edge tells. */
    u->c.wr_ready = false;
    u->c.rd_ready = false;
    return u;
}

void upstream_put(struct upconn *u, bool reusable)
{
    struct upstream_pool *p = u->pool;
    if (!reusable || u->c.eof || u->c.err || buf_size(&u->c.in) > 0 || buf_size(&u->c.out) > 0 ||
        !u->connected || conn_tls_pending(&u->c) || p->n_idle >= p->max_idle || p->loop->draining) {
        upconn_free(u);
        return;
    }
    buf_reset(&u->c.in);
    conn_trim(&u->c); /* parked connections hold no buffer memory */
    u->idle_since_ms = clock_now_ms();
    conn_set_cb(&u->c, pool_idle_event, u);
    u->next = p->idle;
    p->idle = u;
    p->n_idle++;
}

static int upstream_tls_start(struct upconn *u)
{
    struct upstream_pool *p = u->pool;
    SSL *ssl = tls_client_new(p->loop->cfg, p->url, &p->tls_session);
    if (!ssl) {
        log_msg(LOG_ERROR, "upstream %s: cannot start TLS", p->url->text);
        return ENOMEM;
    }
    conn_set_tls(&u->c, ssl);
    return 0;
}

int upstream_connect_result(struct upconn *u)
{
    if (!u->tcp_connected) {
        int err = 0;
        socklen_t len = sizeof(err);
        if (getsockopt(u->c.fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0) return errno;
        if (err != 0) {
            u->pool->addr_len = 0; /* the name may point elsewhere now */
            return err;
        }
        u->tcp_connected = true;
        if (!u->pool->url->tls) {
            u->connected = true;
            return 0;
        }
        err = upstream_tls_start(u);
        if (err) return err;
    }
    char why[256];
    int r = conn_handshake(&u->c, why, sizeof(why));
    if (r < 0) {
        log_msg(LOG_WARN, "upstream %s: TLS handshake failed: %s", u->pool->url->text, why);
        return EPROTO;
    }
    if (r == 1) u->connected = true;
    return 0;
}
