/* conn.h — one non-blocking socket on libevent: one persistent
 * edge-triggered event (EV_READ|EV_WRITE|EV_PERSIST|EV_ET) registered once
 * and never toggled, a reused input buffer, a pending-output buffer.
 *
 * Edge-triggered means the owner must read until EAGAIN (or remember that
 * it did not, rd_ready stays true) and call conn_fill again later itself,
 * e.g. after backpressure is lifted. The conn owns fd, event and buffers;
 * conn_close frees them (the struct itself belongs to its owner). */
#ifndef IDEMGATE_CONN_H
#define IDEMGATE_CONN_H

#include <stdbool.h>
#include <stddef.h>
#include <sys/types.h>

#include "idemgate/buf.h"

struct event_base;
struct event;
struct conn;

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
    int err;       /* errno of a fatal read/write error, 0 otherwise */
    conn_cb cb;
    void *arg;
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
/* Deletes the event, closes fd, frees the buffers. Idempotent. */
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
