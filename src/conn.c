/* conn.c — a socket's life on libevent: one persistent edge-triggered
 * event per socket, read until EAGAIN into a reused buffer, write pending
 * output, no interest toggling (see PERF-NOTES.md: toggling is what made
 * bufferevents slow). Owns the fd, the event and the two buffers. */
#include "idemgate/conn.h"

#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <event2/event.h>

#define CONN_READ_CHUNK 16384

static void conn_event(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    struct conn *c = arg;
    if (what & EV_READ) c->rd_ready = true;
    if (what & EV_WRITE) c->wr_ready = true;
    c->cb(c, what, c->arg);
}

int conn_open(struct conn *c, struct event_base *base, int fd, conn_cb cb, void *arg)
{
    memset(c, 0, sizeof(*c));
    c->fd = fd;
    c->cb = cb;
    c->arg = arg;
    c->rd_ready = true;
    c->wr_ready = true;
    buf_init(&c->in);
    buf_init(&c->out);
    c->ev = event_new(base, fd, EV_READ | EV_WRITE | EV_PERSIST | EV_ET, conn_event, c);
    if (!c->ev || event_add(c->ev, NULL) < 0) {
        if (c->ev) event_free(c->ev);
        c->ev = NULL;
        c->fd = -1;
        close(fd);
        return -1;
    }
    return 0;
}

void conn_set_cb(struct conn *c, conn_cb cb, void *arg)
{
    c->cb = cb;
    c->arg = arg;
}

size_t conn_fill(struct conn *c, size_t limit)
{
    size_t total = 0;
    while (c->rd_ready && !c->eof && !c->err && buf_size(&c->in) < limit) {
        size_t want = CONN_READ_CHUNK;
        if (c->in.cap - c->in.len >= want) want = c->in.cap - c->in.len;
        char *dst = buf_reserve(&c->in, want);
        ssize_t n = read(c->fd, dst, want);
        if (n > 0) {
            c->in.len += (size_t)n;
            total += (size_t)n;
            /* A short read drained the socket: the next byte brings a new
             * edge, so skip the read that would only say EAGAIN. */
            if ((size_t)n < want) c->rd_ready = false;
        } else if (n == 0) {
            c->eof = true;
        } else if (errno == EAGAIN || errno == EWOULDBLOCK) {
            c->rd_ready = false;
        } else if (errno != EINTR) {
            c->err = errno;
        }
    }
    return total;
}

int conn_flush(struct conn *c)
{
    while (buf_size(&c->out) > 0) {
        if (c->err) return -1;
        if (!c->wr_ready) return 0;
        ssize_t n = send(c->fd, buf_data(&c->out), buf_size(&c->out), MSG_NOSIGNAL);
        if (n > 0) {
            buf_consume(&c->out, (size_t)n);
        } else if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            c->wr_ready = false;
            return 0;
        } else if (n < 0 && errno == EINTR) {
            continue;
        } else {
            c->err = n < 0 ? errno : EPIPE;
            return -1;
        }
    }
    return 1;
}

void conn_close(struct conn *c)
{
    if (c->ev) {
        event_free(c->ev);
        c->ev = NULL;
    }
    if (c->fd >= 0) {
        close(c->fd);
        c->fd = -1;
    }
    buf_free(&c->in);
    buf_free(&c->out);
}

int conn_set_nonblock(int fd)
{
    int fl = fcntl(fd, F_GETFL, 0);
    if (fl < 0) return -1;
    return fcntl(fd, F_SETFL, fl | O_NONBLOCK);
}

int conn_resolve(const char *host, int port, void *addr, size_t addr_cap, unsigned *addr_len)
{
    struct addrinfo hints, *res = NULL;
    memset(&hints, 0, sizeof(hints));
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_NUMERICSERV;
    char portstr[8];
    snprintf(portstr, sizeof(portstr), "%d", port);
    if (getaddrinfo(host, portstr, &hints, &res) != 0 || !res) return -1;
    int rc = -1;
    if (res->ai_addrlen <= addr_cap) {
        memcpy(addr, res->ai_addr, res->ai_addrlen);
        *addr_len = (unsigned)res->ai_addrlen;
        rc = 0;
    }
    freeaddrinfo(res);
    return rc;
}

int conn_connect_addr(const struct sockaddr *addr, unsigned addr_len)
{
    int fd = socket(addr->sa_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) return -1;
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    if (connect(fd, addr, addr_len) < 0 && errno != EINPROGRESS) {
        int e = errno;
        close(fd);
        errno = e;
        return -1;
    }
    return fd;
}
