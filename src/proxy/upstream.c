/* upstream.c — upstream groups and keep-alive connection pools (see
 * upstream.h). Owns the process-wide list of each group's resolved
 * servers (their names and metrics counters), each loop's balancing and
 * health state of them, and one pool per server per loop (no locks: a
 * pool belongs to one loop): its parked connections (a connection handed
 * out belongs to its exchange until it is put back) and, for https, the
 * SSL of each connection (through its conn) and the pool's last session;
 * the client context is tls.c's. */
#include "idemgate/proxy/upstream.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netdb.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#include <event2/event.h>
#include <openssl/ssl.h>

#include "idemgate/config/config.h"
#include "idemgate/core/log.h"
#include "idemgate/core/clock.h"
#include "idemgate/core/metrics.h"
#include "idemgate/proxy/loop.h"
#include "idemgate/net/listen.h"
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
    p->tls = NULL;
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

/* Resolves the pool's host (its first address); -1 with why. */
static int upstream_resolve_one(struct upstream_pool *p)
{
    socklen_t len;
    if (listen_resolve(p->url->host, p->url->port, p->url->host, &p->addr, &len, p->why,
                       sizeof(p->why)) < 0)
        return -1;
    p->addr_len = (unsigned)len;
    return 0;
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
    if (p->addr_len == 0 && upstream_resolve_one(p) < 0) return NULL;
    int fd = conn_connect_addr((const struct sockaddr *)&p->addr, p->addr_len);
    if (fd < 0) {
        snprintf(p->why, sizeof(p->why), "%s", strerror(errno));
        if (!p->fixed) p->addr_len = 0; /* resolve again next time */
        return NULL;
    }
    struct upconn *u = calloc(1, sizeof(*u));
    if (!u) abort();
    u->pool = p;
    if (conn_open(&u->c, p->loop->base, fd, pool_idle_event, u) < 0) {
        free(u);
        snprintf(p->why, sizeof(p->why), "cannot watch the socket");
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
    SSL *ssl = tls_client_new(p->tls, p->url, &p->tls_session);
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

/* ------------------------------------------------------------------ groups */

/* One address of a group's server, for the whole process. */
struct upstream_peer {
    char name[INET6_ADDRSTRLEN + 8]; /* "host:port", "[v6]:port" */
    const struct cfg_server *srv;
    struct sockaddr_storage addr;
    unsigned addr_len; /* 0: the name did not resolve at start */
    atomic_llong failures;
    atomic_int down; /* loops that have it down */
};

struct upstream_reg {
    const char *name;
    const struct cfg_upstream *cfg;
    struct upstream_peer *peers;
    size_t n;
};

struct upstream_registry {
    struct upstream_reg *regs; /* [0] the global upstream, then routes' own */
    size_t n;
};

static void peer_name(struct upstream_peer *p, const struct sockaddr *sa)
{
    char host[INET6_ADDRSTRLEN];
    int port;
    if (sa->sa_family == AF_INET6) {
        const struct sockaddr_in6 *a = (const struct sockaddr_in6 *)sa;
        inet_ntop(AF_INET6, &a->sin6_addr, host, sizeof(host));
        port = ntohs(a->sin6_port);
        snprintf(p->name, sizeof(p->name), "[%s]:%d", host, port);
    } else {
        const struct sockaddr_in *a = (const struct sockaddr_in *)sa;
        inet_ntop(AF_INET, &a->sin_addr, host, sizeof(host));
        port = ntohs(a->sin_port);
        snprintf(p->name, sizeof(p->name), "%s:%d", host, port);
    }
}

/* Every address of srv, appended to r (deduplicated); one unresolved peer
 * when the name does not resolve now (logged: resolved at each connect). */
static void reg_add_server(struct upstream_reg *r, const struct cfg_server *srv, const char *group)
{
    struct addrinfo hints, *res = NULL;
    memset(&hints, 0, sizeof(hints));
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    char port[8];
    snprintf(port, sizeof(port), "%d", srv->url.port);
    int rc = getaddrinfo(srv->url.host, port, &hints, &res);
    if (rc != 0 || !res) {
        log_msg(LOG_WARN,
                "upstream %s: server %s: cannot resolve %s: %s; trying again at each "
                "connect",
                group, srv->url.text, srv->url.host, rc ? gai_strerror(rc) : "no address");
        r->peers = realloc(r->peers, (r->n + 1) * sizeof(*r->peers));
        if (!r->peers) abort();
        struct upstream_peer *p = &r->peers[r->n++];
        memset(p, 0, sizeof(*p));
        p->srv = srv;
        bool v6 = strchr(srv->url.host, ':') != NULL;
        snprintf(p->name, sizeof(p->name), v6 ? "[%.60s]:%d" : "%.60s:%d", srv->url.host,
                 srv->url.port);
        if (res) freeaddrinfo(res);
        return;
    }
    for (struct addrinfo *ai = res; ai; ai = ai->ai_next) {
        if (ai->ai_addrlen > sizeof(struct sockaddr_storage)) continue;
        struct upstream_peer tmp;
        memset(&tmp, 0, sizeof(tmp));
        memcpy(&tmp.addr, ai->ai_addr, ai->ai_addrlen);
        tmp.addr_len = (unsigned)ai->ai_addrlen;
        peer_name(&tmp, ai->ai_addr);
        bool dup = false;
        for (size_t i = 0; i < r->n && !dup; i++)
            dup = strcmp(r->peers[i].name, tmp.name) == 0;
        if (dup) {
            log_msg(LOG_WARN, "upstream %s: server %s is %s again: one server (the first's weight)",
                    group, srv->url.text, tmp.name);
            continue;
        }
        tmp.srv = srv;
        r->peers = realloc(r->peers, (r->n + 1) * sizeof(*r->peers));
        if (!r->peers) abort();
        r->peers[r->n++] = tmp;
    }
    freeaddrinfo(res);
}

static void reg_build(struct upstream_reg *r, const char *name, const struct cfg_upstream *u)
{
    r->name = name;
    r->cfg = u;
    for (size_t i = 0; i < u->n; i++)
        reg_add_server(r, &u->servers[i], name);
}

void upstream_registry_series(const struct upstream_registry *reg, struct buf *out,
                              enum metrics_id id, const char *name)
{
    const struct upstream_reg *regs = reg->regs;
    for (size_t g = 0; g < reg->n; g++)
        for (size_t i = 0; i < regs[g].n; i++) {
            const struct upstream_peer *p = &regs[g].peers[i];
            long long v = id == M_UPSTREAM_SERVER_UP
                              ? atomic_load_explicit(&p->down, memory_order_relaxed) == 0
                              : atomic_load_explicit(&p->failures, memory_order_relaxed);
            buf_printf(out, "%s{upstream=\"", name);
            /* a route prefix may hold a quote or a backslash: escaped */
            for (const char *c = regs[g].name; *c; c++) {
                if (*c == '"' || *c == '\\') buf_append(out, "\\", 1);
                buf_append(out, c, 1);
            }
            buf_printf(out, "\",server=\"%s\"} %lld\n", p->name, v);
        }
}

size_t upstream_group_index(const struct cfg *cfg, size_t route_index)
{
    size_t g = 1;
    for (size_t i = 0; i < route_index && i < cfg->n_routes; i++)
        if (cfg->routes[i].upstream_own) g++;
    return route_index < cfg->n_routes && cfg->routes[route_index].upstream_own ? g : 0;
}

/* The same server of the same group in prev, or NULL. */
static const struct upstream_peer *reg_find_peer(const struct upstream_registry *prev,
                                                 const char *group, const char *name)
{
    for (size_t g = 0; prev && g < prev->n; g++) {
        if (strcmp(prev->regs[g].name, group) != 0) continue;
        for (size_t i = 0; i < prev->regs[g].n; i++)
            if (strcmp(prev->regs[g].peers[i].name, name) == 0) return &prev->regs[g].peers[i];
    }
    return NULL;
}

struct upstream_registry *upstream_registry_new(const struct cfg *cfg,
                                                const struct upstream_registry *prev)
{
    struct upstream_registry *reg = calloc(1, sizeof(*reg));
    if (!reg) abort();
    size_t n = 1;
    for (size_t i = 0; i < cfg->n_routes; i++)
        if (cfg->routes[i].upstream_own) n++;
    reg->regs = calloc(n, sizeof(*reg->regs));
    if (!reg->regs) abort();
    reg_build(&reg->regs[0], "default", &cfg->upstream);
    reg->n = 1;
    for (size_t i = 0; i < cfg->n_routes; i++)
        if (cfg->routes[i].upstream_own)
            reg_build(&reg->regs[reg->n++], cfg->routes[i].prefix, &cfg->routes[i].upstream);
    /* a counter goes on across a reload: Prometheus sees no reset */
    for (size_t g = 0; g < reg->n; g++)
        for (size_t i = 0; i < reg->regs[g].n; i++) {
            struct upstream_peer *p = &reg->regs[g].peers[i];
            const struct upstream_peer *old = reg_find_peer(prev, reg->regs[g].name, p->name);
            if (old) atomic_store(&p->failures, atomic_load(&old->failures));
        }
    return reg;
}

void upstream_registry_free(struct upstream_registry *reg)
{
    if (!reg) return;
    for (size_t i = 0; i < reg->n; i++)
        free(reg->regs[i].peers);
    free(reg->regs);
    free(reg);
}

size_t upstream_registry_count(const struct upstream_registry *reg)
{
    return reg->n;
}

void upstream_group_init(struct upstream_group *g, struct loop *l,
                         const struct upstream_registry *reg, size_t i, const struct tls_set *tls)
{
    const struct upstream_reg *r = &reg->regs[i];
    memset(g, 0, sizeof(*g));
    g->name = r->name;
    g->cfg = r->cfg;
    g->n = r->n;
    /* retries default to every other server: addresses, not URLs */
    g->retries = r->cfg->retries_set ? r->cfg->retries : (int)(r->n ? r->n - 1 : 0);
    g->servers = calloc(r->n ? r->n : 1, sizeof(*g->servers));
    if (!g->servers) abort();
    for (size_t k = 0; k < r->n; k++) {
        struct upstream_server *s = &g->servers[k];
        const struct upstream_peer *p = &r->peers[k];
        upstream_pool_init(&s->pool, l, &p->srv->url);
        s->pool.tls = tls;
        if (p->addr_len) {
            memcpy(&s->pool.addr, &p->addr, p->addr_len);
            s->pool.addr_len = p->addr_len;
            s->pool.fixed = true;
        }
        s->group = g;
        s->peer = p;
        s->url = &p->srv->url;
        s->name = p->name;
        s->weight = p->srv->weight;
    }
}

void upstream_group_free(struct upstream_group *g)
{
    for (size_t k = 0; k < g->n; k++) {
        struct upstream_server *s = &g->servers[k];
        if (s->down)
            atomic_fetch_sub_explicit(&((struct upstream_peer *)s->peer)->down, 1,
                                      memory_order_relaxed);
        upstream_pool_free(&s->pool);
    }
    free(g->servers);
    g->servers = NULL;
    g->n = 0;
}

/* One server's health, its idle connections (plain http: an https one
 * was verified under the settings of its own generation) from old to s. */
static void server_adopt(struct upstream_server *s, struct upstream_server *old)
{
    s->fails = old->fails;
    s->window_ms = old->window_ms;
    s->down_since_ms = old->down_since_ms;
    s->retry_ms = old->retry_ms;
    if (old->down && !s->down) {
        s->down = true;
        atomic_fetch_add_explicit(&((struct upstream_peer *)s->peer)->down, 1,
                                  memory_order_relaxed);
    }
    if (old->down) {
        old->down = false;
        atomic_fetch_sub_explicit(&((struct upstream_peer *)old->peer)->down, 1,
                                  memory_order_relaxed);
    }
    if (s->url->tls) return;
    struct upstream_pool *from = &old->pool, *to = &s->pool;
    while (from->idle && to->n_idle < to->max_idle) {
        struct upconn *u = from->idle;
        from->idle = u->next;
        from->n_idle--;
        u->pool = to;
        u->next = to->idle;
        to->idle = u;
        to->n_idle++;
    }
}

void upstream_groups_adopt(struct upstream_group *groups, size_t n, struct upstream_group *old,
                           size_t n_old)
{
    for (size_t g = 0; g < n; g++)
        for (size_t o = 0; o < n_old; o++) {
            if (strcmp(groups[g].name, old[o].name) != 0) continue;
            for (size_t k = 0; k < groups[g].n; k++)
                for (size_t j = 0; j < old[o].n; j++) {
                    struct upstream_server *s = &groups[g].servers[k], *os = &old[o].servers[j];
                    if (strcmp(s->name, os->name) == 0 && strcmp(s->url->text, os->url->text) == 0)
                        server_adopt(s, os);
                }
        }
}

static bool was_tried(const struct upstream_server *s, struct upstream_server *const *tried,
                      size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (tried[i] == s) return true;
    return false;
}

/* Up, or down with its fail_timeout_ms over and no trial out. */
static bool eligible(const struct upstream_server *s, uint64_t now)
{
    return !s->down || (now >= s->retry_ms && !s->trial);
}

/* Smooth weighted round robin (nginx's): every eligible server gains its
 * weight, the richest is chosen and pays the sum. */
static struct upstream_server *pick_rr(struct upstream_group *g, uint64_t now,
                                       struct upstream_server *const *tried, size_t ntried)
{
    struct upstream_server *best = NULL;
    int total = 0;
    for (size_t i = 0; i < g->n; i++) {
        struct upstream_server *s = &g->servers[i];
        if (!eligible(s, now) || was_tried(s, tried, ntried)) continue;
        s->current += s->weight;
        total += s->weight;
        if (!best || s->current > best->current) best = s;
    }
    if (best) best->current -= total;
    return best;
}

/* The fewest requests in flight relative to weight; ties in turn. */
static struct upstream_server *pick_least(struct upstream_group *g, uint64_t now,
                                          struct upstream_server *const *tried, size_t ntried)
{
    struct upstream_server *best = NULL;
    size_t start = g->rr++ % (g->n ? g->n : 1);
    for (size_t k = 0; k < g->n; k++) {
        struct upstream_server *s = &g->servers[(start + k) % g->n];
        if (!eligible(s, now) || was_tried(s, tried, ntried)) continue;
        if (!best || (unsigned long long)s->inflight * (unsigned)best->weight <
                         (unsigned long long)best->inflight * (unsigned)s->weight)
            best = s;
    }
    return best;
}

struct upstream_server *upstream_pick(struct upstream_group *g,
                                      struct upstream_server *const *tried, size_t ntried)
{
    uint64_t now = clock_now_ms();
    struct upstream_server *s = g->cfg->balance == CFG_BALANCE_LEAST_CONN
                                    ? pick_least(g, now, tried, ntried)
                                    : pick_rr(g, now, tried, ntried);
    if (!s) {
        /* None is up: never refuse while one might answer; the one down
         * the longest is tried anyway. */
        for (size_t i = 0; i < g->n; i++) {
            struct upstream_server *c = &g->servers[i];
            if (was_tried(c, tried, ntried)) continue;
            if (!s || c->down_since_ms < s->down_since_ms) s = c;
        }
        if (!s) return NULL;
    }
    if (s->down) s->trial = true;
    s->inflight++;
    return s;
}

static void server_set_down(struct upstream_server *s, bool down)
{
    if (s->down == down) return;
    s->down = down;
    atomic_fetch_add_explicit(&((struct upstream_peer *)s->peer)->down, down ? 1 : -1,
                              memory_order_relaxed);
}

void upstream_report(struct upstream_server *s, enum upstream_result r)
{
    if (s->inflight > 0) s->inflight--;
    const struct cfg_upstream *cfg = s->group->cfg;
    uint64_t now = clock_now_ms();
    bool was_trial = s->trial;
    s->trial = false;
    if (r == UPSTREAM_OK) {
        if (s->down) {
            log_msg(LOG_INFO, "upstream %s: server %s is up again", s->group->name, s->name);
            server_set_down(s, false);
        }
        s->fails = 0;
        return;
    }
    if (r != UPSTREAM_FAILED) return;
    atomic_fetch_add_explicit(&((struct upstream_peer *)s->peer)->failures, 1,
                              memory_order_relaxed);
    if (cfg->max_fails == 0) return;
    if (s->down) {
        if (was_trial) s->retry_ms = now + (uint64_t)cfg->fail_timeout_ms;
        return;
    }
    if (s->fails == 0 || now - s->window_ms >= (uint64_t)cfg->fail_timeout_ms) {
        s->window_ms = now;
        s->fails = 0;
    }
    if (++s->fails < (unsigned)cfg->max_fails) return;
    log_msg(LOG_WARN, "upstream %s: server %s is down for %d ms after %u failure%s", s->group->name,
            s->name, cfg->fail_timeout_ms, s->fails, s->fails == 1 ? "" : "s");
    server_set_down(s, true);
    s->down_since_ms = now;
    s->retry_ms = now + (uint64_t)cfg->fail_timeout_ms;
    s->fails = 0;
}
