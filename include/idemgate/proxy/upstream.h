/* upstream.h — per-loop pools of keep-alive upstream connections.
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

struct loop;
struct cfg_url;
struct upstream_pool;
struct ssl_session_st;

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
    struct sockaddr_storage addr;       /* resolved once; again after a failure */
    unsigned addr_len;                  /* 0: not resolved */
    struct ssl_session_st *tls_session; /* last issued, for resumption (owned) */
};

void upstream_pool_init(struct upstream_pool *p, struct loop *l, const struct cfg_url *url);
void upstream_pool_free(struct upstream_pool *p);
/* Returns a connection (caller owns it; set its callback with
 * conn_set_cb), or NULL with errno when a socket cannot even be started. */
struct upconn *upstream_get(struct upstream_pool *p);
/* Gives the connection back: parked when reusable, else closed and freed. */
void upstream_put(struct upconn *u, bool reusable);
/* Call on each event until u->connected: checks the finished non-blocking
 * connect, then (https) runs a TLS handshake step. Returns 0 (connected,
 * or the handshake goes on: connected stays false) or an errno (EPROTO for
 * a failed handshake, logged with its reason). */
int upstream_connect_result(struct upconn *u);

#endif
