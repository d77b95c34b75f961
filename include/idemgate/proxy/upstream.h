/* upstream.h — upstream groups (servers, balancing, passive health) and
 * per-loop pools of keep-alive upstream connections.
 *
 * Groups: every `upstream` (the global one, "default", and each route that
 * names its own, named by its prefix) is a group of servers; a host name
 * contributes every address it resolves to, each a server of its own with
 * its own pool. upstream_registry_new resolves them once per
 * configuration generation (proxy/gen.h), at start and at each reload;
 * each loop then keeps its own balancing and health state
 * (upstream_group_init), handed on by identity (group name, address and
 * URL) to the next generation's groups with the idle connections
 * (upstream_groups_adopt). An exchange asks upstream_pick for a
 * server and tells upstream_report how it went, exactly once per pick.
 * What counts as a failure, when a server is down and when a request may
 * go to another server are in docs/configuration.md (upstream).
 *
 * One pool per upstream URL per event loop. upstream_get hands out an idle
 * connection (not idle too long, not closed by the peer) or a new one that
 * is still connecting; the caller owns it until upstream_put, which either
 * parks it (bounded) or closes it. While parked, the pool watches it and
 * drops it when the peer closes it or sends anything.
 *
 * https:// upstreams: after the TCP connect, upstream_connect_result drives
 * the TLS handshake (verified against upstream_tls, see tls.h) before the
 * connection counts as connected; parked connections keep their session,
 * and the pool keeps the last session ticket for resumption. */
#ifndef IDEMGATE_UPSTREAM_H
#define IDEMGATE_UPSTREAM_H

#include <stdbool.h>
#include <stdint.h>
#include <sys/socket.h>

#include "idemgate/net/conn.h"
#include "idemgate/core/metrics.h"

struct loop;
struct cfg;
struct cfg_url;
struct cfg_upstream;
struct upstream_pool;
struct upstream_peer;
struct ssl_session_st;
struct tls_set;
struct upstream_registry;
struct buf;

struct upconn {
    struct conn c;
    struct upstream_pool *pool;
    struct upconn *next; /* idle list */
    bool tcp_connected;  /* connect() finished */
    bool connected;      /* connect() and, for https, the TLS handshake finished */
    uint64_t idle_since_ms;
};

struct upstream_pool {
    struct loop *loop; /* borrowed */
    const struct cfg_url *url;
    struct upconn *idle;
    unsigned n_idle;
    unsigned max_idle;
    struct sockaddr_storage addr;       /* resolved once; again after a failure unless fixed */
    unsigned addr_len;                  /* 0: not resolved */
    bool fixed;                         /* addr is the group's resolved address: keep it */
    char why[160];                      /* why upstream_get last failed */
    struct ssl_session_st *tls_session; /* last issued, for resumption (owned) */
    const struct tls_set *tls;          /* its generation's client context (borrowed) */
};

void upstream_pool_init(struct upstream_pool *p, struct loop *l, const struct cfg_url *url);
void upstream_pool_free(struct upstream_pool *p);
/* Returns a connection (caller owns it; set its callback with
 * conn_set_cb), or NULL when a socket cannot even be started, with the
 * reason (a name that does not resolve, an errno) in p->why. */
struct upconn *upstream_get(struct upstream_pool *p);
/* Gives the connection back: parked when reusable, else closed and freed. */
void upstream_put(struct upconn *u, bool reusable);
/* Call on each event until u->connected: checks the finished non-blocking
 * connect, then (https) runs a TLS handshake step. Returns 0 (connected,
 * or the handshake goes on: connected stays false) or an errno (EPROTO for
 * a failed handshake, logged with its reason). */
int upstream_connect_result(struct upconn *u);

/* ---- groups ---- */

/* One server of a group in one loop: its pool and the loop's balancing and
 * health state of it. */
struct upstream_server {
    struct upstream_pool pool;
    struct upstream_group *group;
    const struct upstream_peer *peer; /* the process-wide part: name, counters */
    const struct cfg_url *url;        /* the configured URL (Host, TLS name) */
    const char *name;                 /* "host:port" of the address */
    int weight;
    int current;       /* smooth weighted round robin */
    unsigned inflight; /* picked, not yet reported */
    unsigned fails;    /* failures in the window that started at window_ms */
    uint64_t window_ms;
    bool down;
    uint64_t down_since_ms; /* while down */
    uint64_t retry_ms;      /* while down: when one request may try it */
    bool trial;             /* that request is out */
};

struct upstream_group {
    const char *name; /* "default" or the route's prefix */
    const struct cfg_upstream *cfg;
    struct upstream_server *servers;
    size_t n;
    unsigned rr; /* least_conn ties */
    int retries; /* the group's retries, or every other server's address */
};

enum upstream_result {
    UPSTREAM_OK,     /* it answered: a down server is up again */
    UPSTREAM_FAILED, /* a failure: counts toward max_fails */
    UPSTREAM_NEUTRAL /* neither (a bad head, the exchange gave up) */
};

/* Resolves every group of cfg (borrowed: it must outlive the registry; a
 * generation owns both); a name that does not resolve is logged and
 * resolved again at each connect instead. prev (NULL at start) is the
 * registry this one replaces: the counters of a server found in both go
 * on. Never fails. */
struct upstream_registry *upstream_registry_new(const struct cfg *cfg,
                                                const struct upstream_registry *prev);
/* Frees it (NULL is fine); no loop group made from it may be left. */
void upstream_registry_free(struct upstream_registry *reg);
/* How many groups there are (default first, then the routes' own). */
size_t upstream_registry_count(const struct upstream_registry *reg);
/* The per-server samples of metric id (named name) into out. */
void upstream_registry_series(const struct upstream_registry *reg, struct buf *out,
                              enum metrics_id id, const char *name);
/* The group a route uses: 0 for the global upstream, else its own. */
size_t upstream_group_index(const struct cfg *cfg, size_t route_index);
/* The loop's copy of group i of reg: pools and state (freed with
 * upstream_group_free); https servers connect with tls's client context.
 * reg and tls are borrowed for the group's life. */
void upstream_group_init(struct upstream_group *g, struct loop *l,
                         const struct upstream_registry *reg, size_t i, const struct tls_set *tls);
void upstream_group_free(struct upstream_group *g);
/* A reload: each server of groups[0..n) found in old[0..n_old) (same
 * group name, address and URL) takes over its health state and, for
 * plain http, its idle connections. */
void upstream_groups_adopt(struct upstream_group *groups, size_t n, struct upstream_group *old,
                           size_t n_old);
/* The server for a request: by the group's balance among the servers that
 * are up and not in tried[0..ntried) (a server down whose fail_timeout_ms
 * is over takes one trial request); when none is, the one down the
 * longest that was not tried; NULL when every server was tried. */
struct upstream_server *upstream_pick(struct upstream_group *g,
                                      struct upstream_server *const *tried, size_t ntried);
/* How the request picked for s went; once per pick. */
void upstream_report(struct upstream_server *s, enum upstream_result r);

#endif
