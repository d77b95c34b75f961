/* conn.h — one non-blocking socket on libevent: one persistent
 * edge-triggered event (EV_READ|EV_WRITE|EV_PERSIST|EV_ET) registered once
 * and never toggled, a reused input buffer, a pending-output buffer.
 *
 * Edge-triggered means the owner must read until EAGAIN (or remember that
 * it did not, rd_ready stays true) and call conn_fill again later itself,
 * e.g. after backpressure is lifted. The conn owns fd, event and buffers;
 * conn_close frees them (the struct itself belongs to its owner).
 *
 * TLS: with an SSL attached (conn_set_tls), conn_handshake runs the
 * handshake from the same events (the owner calls it on every event until
 * it says done), then conn_fill/conn_flush go through SSL_read/SSL_write
 * with the same rd_ready/wr_ready meaning. When a read must wait for the
 * socket to take bytes (or a write for bytes to arrive), the conn turns
 * the awaited edge into the one the owner waits for: a write edge is
 * reported as EV_READ too with rd_ready set again, and vice versa. */
#ifndef IDEMGATE_CONN_H
#define IDEMGATE_CONN_H

#include <stdbool.h>
#include <stddef.h>
#include <sys/types.h>

#include "idemgate/core/buf.h"

struct event_base;
struct event;
struct conn;
struct ssl_st;

/* what: EV_READ and/or EV_WRITE as reported by libevent. */
typedef void (*conn_cb)(struct conn *c, short what, void *arg);

struct conn {
    int fd;
    struct event *ev;
    struct buf in;
    struct buf out;
    bool rd_ready; /* may have unread bytes (no EAGAIN seen since the last edge) */
    bool wr_ready; /* may accept more bytes */
    bool eof;      /* peer closed its side (read returned 0) */
    bool rdhup;    /* the peer's FIN was reported (EV_CLOSED): read to EOF */
    int err;       /* errno of a fatal read/write error, 0 otherwise */
    conn_cb cb;
    void *arg;
    struct buf_pool *pool;  /* where idle buffers go (borrowed; may be NULL) */
    struct ssl_st *ssl;     /* NULL: plain TCP */
    bool tls_done;          /* handshake finished */
    bool tls_rd_want_write; /* SSL_read waits for the socket to be writable */
    bool tls_wr_want_read;  /* SSL_write waits for the socket to be readable */
};

/* Takes ownership of fd (made non-blocking by the caller) and registers
 * the event. Returns 0 or -1. */
int conn_open(struct conn *c, struct event_base *base, int fd, conn_cb cb, void *arg);
/* Changes the callback (e.g. when an upstream conn moves between the pool
 * and an exchange). */
void conn_set_cb(struct conn *c, conn_cb cb, void *arg);
/* Reads until EAGAIN, EOF, error, or in holds at least limit unread bytes.
 * Returns the number of bytes read. */
size_t conn_fill(struct conn *c, size_t limit);
/* Writes as much of out as the socket takes. Returns 1 when out is empty,
 * 0 when bytes remain (an EV_WRITE edge will come), -1 on error. */
int conn_flush(struct conn *c);
struct iovec;
/* Sends out's pending bytes and then iov[0..n) with one writev where the
 * socket takes them; what it does not take is copied into out (so iov is
 * borrowed only during the call). TLS: appends and flushes. Returns like
 * conn_flush. */
int conn_sendv(struct conn *c, const struct iovec *iov, int n);
/* out, with memory from the pool when it had none: use before appending. */
static inline struct buf *conn_outbuf(struct conn *c)
{
    if (!c->out.p) buf_take(&c->out, c->pool);
    return &c->out;
}
/* Gives the buffers back to the pool while they are empty (idle). */
void conn_trim(struct conn *c);

/* Attaches an SSL (takes ownership; freed by conn_close) to the conn's
 * socket. The SSL is in connect or accept state already. */
void conn_set_tls(struct conn *c, struct ssl_st *ssl);
/* One handshake step, to call on every event until it returns 1 (done).
 * Returns 0 while in progress, -1 on failure (err is set, eof too when the
 * peer just closed; why, when not
 * NULL, gets a one-line reason such as "certificate verify failed:
 * hostname mismatch"). */
int conn_handshake(struct conn *c, char *why, size_t whylen);
/* True when the finished TLS handshake selected the ALPN protocol proto
 * ("h2"); false without TLS or ALPN. */
bool conn_alpn_is(const struct conn *c, const char *proto);
/* True when TLS has bytes read from the socket that conn_fill has not
 * returned yet (a connection holding them cannot be parked). */
bool conn_tls_pending(const struct conn *c);
/* Sends close_notify when the session is healthy (best effort), frees the
 * SSL, deletes the event, closes fd, frees the buffers. Idempotent. */
void conn_close(struct conn *c);
static inline bool conn_is_open(const struct conn *c)
{
    return c->fd >= 0;
}

/* Socket helpers. */
int conn_set_nonblock(int fd);
struct sockaddr;
/* Resolves host:port (synchronously, like nginx resolves upstream names at
 * start) into addr. Returns 0 or -1. */
int conn_resolve(const char *host, int port, void *addr, size_t addr_cap, unsigned *addr_len);
/* Starts a non-blocking TCP connect (TCP_NODELAY). Returns the fd or -1
 * with errno. */
int conn_connect_addr(const struct sockaddr *addr, unsigned addr_len);

#endif
