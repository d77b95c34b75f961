/* conn.c — a socket's life on libevent: one persistent edge-triggered
 * event per socket, read until EAGAIN into a reused buffer, write pending
 * output, no interest toggling (see PERF-NOTES.md: toggling is what made
 * bufferevents slow). Owns the fd, the event, the two buffers and, for
 * TLS, the SSL object (reads, writes and the handshake go through it; the
 * contexts are tls.c's). */
#include "idemgate/net/conn.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include <event2/event.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>

#define CONN_READ_CHUNK 16384

static void conn_event(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    struct conn *c = arg;
    if (what & EV_CLOSED) {
        /* FIN seen (EPOLLRDHUP), maybe in the same edge as the last data:
         * the short-read shortcut must not skip the read that says EOF. */
        c->rdhup = true;
        what |= EV_READ;
    }
    if (what & EV_READ) c->rd_ready = true;
    if (what & EV_WRITE) c->wr_ready = true;
    if (c->ssl) {
        /* TLS may read to write or write to read: the edge the pending
         * operation waited for counts as the one its owner waits for. */
        if ((what & EV_WRITE) && c->tls_rd_want_write) {
            c->tls_rd_want_write = false;
            c->rd_ready = true;
            what |= EV_READ;
        }
        if ((what & EV_READ) && c->tls_wr_want_read) {
            c->tls_wr_want_read = false;
            c->wr_ready = true;
            what |= EV_WRITE;
        }
    }
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
    c->ev = event_new(base, fd, EV_READ | EV_WRITE | EV_CLOSED | EV_PERSIST | EV_ET, conn_event, c);
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

/* The socket gave EAGAIN inside OpenSSL, or the session broke. Returns
 * true when the caller may go on (EINTR). */
static bool conn_tls_io_error(struct conn *c, int ret, bool reading)
{
    int e = SSL_get_error(c->ssl, ret);
    switch (e) {
    case SSL_ERROR_WANT_READ:
        if (reading) {
            c->rd_ready = false;
        } else {
            c->wr_ready = false;
            c->tls_wr_want_read = true;
        }
        return false;
    case SSL_ERROR_WANT_WRITE:
        if (reading) {
            c->rd_ready = false;
            c->tls_rd_want_write = true;
        }
        c->wr_ready = false;
        return false;
    case SSL_ERROR_ZERO_RETURN:
        if (reading) {
            c->eof = true;
        } else {
            c->err = EPIPE;
        }
        return false;
    case SSL_ERROR_SYSCALL:
        if (errno == EINTR) return true;
        c->err = errno ? errno : (reading ? ECONNRESET : EPIPE);
        break;
    default:
        c->err = EPROTO;
        break;
    }
    ERR_clear_error();
    return false;
}

static size_t conn_fill_tls(struct conn *c, size_t limit)
{
    size_t total = 0;
    /* SSL_pending: decrypted bytes OpenSSL holds wait for no edge. */
    while ((c->rd_ready || SSL_pending(c->ssl) > 0) && !c->eof && !c->err &&
           buf_size(&c->in) < limit) {
        size_t want = CONN_READ_CHUNK;
        if (c->in.cap - c->in.len >= want) want = c->in.cap - c->in.len;
        if (want > INT_MAX) want = INT_MAX;
        char *dst = buf_reserve(&c->in, want);
        ERR_clear_error();
        errno = 0;
        int n = SSL_read(c->ssl, dst, (int)want);
        if (n > 0) {
            c->in.len += (size_t)n;
            total += (size_t)n;
        } else if (!conn_tls_io_error(c, n, true) && !c->rd_ready) {
            break;
        }
    }
    return total;
}

size_t conn_fill(struct conn *c, size_t limit)
{
    if (!c->in.p) buf_take(&c->in, c->pool);
    if (c->ssl) return conn_fill_tls(c, limit);
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
            if ((size_t)n < want && !c->rdhup) c->rd_ready = false;
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

static int conn_flush_tls(struct conn *c)
{
    while (buf_size(&c->out) > 0) {
        if (c->err) return -1;
        if (!c->wr_ready) return 0;
        size_t n = buf_size(&c->out);
        if (n > INT_MAX) n = INT_MAX;
        ERR_clear_error();
        errno = 0;
        /* A retry after WANT_WRITE passes the same first bytes, maybe from
         * a moved and longer buffer: the context allows both. */
        int w = SSL_write(c->ssl, buf_data(&c->out), (int)n);
        if (w > 0) {
            buf_consume(&c->out, (size_t)w);
        } else if (!conn_tls_io_error(c, w, false)) {
            return c->err ? -1 : 0;
        }
    }
    return 1;
}

int conn_flush(struct conn *c)
{
    if (c->ssl) return conn_flush_tls(c);
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

#define CONN_MAX_IOV 8

/* Drops n written bytes: first from out, then from the front of iov; the
 * rest of iov goes into out. */
static void conn_keep_unsent(struct conn *c, const struct iovec *iov, int n, size_t written)
{
    size_t from_out = buf_size(&c->out) < written ? buf_size(&c->out) : written;
    buf_consume(&c->out, from_out);
    written -= from_out;
    for (int i = 0; i < n; i++) {
        size_t len = iov[i].iov_len;
        if (written >= len) {
            written -= len;
            continue;
        }
        if (!c->out.p) buf_take(&c->out, c->pool);
        buf_append(&c->out, (const char *)iov[i].iov_base + written, len - written);
        written = 0;
    }
}

int conn_sendv(struct conn *c, const struct iovec *iov, int n)
{
    if (c->err) return -1;
    if (c->ssl || !c->wr_ready || n > CONN_MAX_IOV - 1) {
        conn_keep_unsent(c, iov, n, 0);
        return conn_flush(c);
    }
    struct iovec v[CONN_MAX_IOV];
    int k = 0;
    size_t total = 0;
    if (buf_size(&c->out) > 0) {
        v[k].iov_base = (void *)buf_data(&c->out);
        v[k++].iov_len = buf_size(&c->out);
        total += buf_size(&c->out);
    }
    for (int i = 0; i < n; i++) {
        v[k++] = iov[i];
        total += iov[i].iov_len;
    }
    /* sendmsg, not writev: MSG_NOSIGNAL, a closed peer is an error, not
     * a SIGPIPE. */
    struct msghdr msg;
    memset(&msg, 0, sizeof(msg));
    msg.msg_iov = v;
    msg.msg_iovlen = (size_t)k;
    ssize_t w;
    do {
        w = sendmsg(c->fd, &msg, MSG_NOSIGNAL);
    } while (w < 0 && errno == EINTR);
    if (w < 0 && errno != EAGAIN && errno != EWOULDBLOCK) {
        c->err = errno;
        return -1;
    }
    if (w < 0) {
        c->wr_ready = false;
        w = 0;
    }
    conn_keep_unsent(c, iov, n, (size_t)w);
    /* A short write means the socket buffer filled: the next edge resumes. */
    if ((size_t)w < total) c->wr_ready = false;
    return buf_size(&c->out) == 0 ? 1 : 0;
}

void conn_trim(struct conn *c)
{
    buf_release(&c->in, c->pool);
    buf_release(&c->out, c->pool);
}

void conn_set_tls(struct conn *c, SSL *ssl)
{
    if (SSL_set_fd(ssl, c->fd) != 1) abort(); /* out of memory */
    c->ssl = ssl;
    c->tls_done = false;
}

static void conn_tls_why(struct conn *c, int e, int sys, char *why, size_t whylen)
{
    long vr = SSL_get_verify_result(c->ssl);
    unsigned long ec = ERR_peek_last_error();
    /* Without SSL_VERIFY_PEER a verify result is computed but not enforced. */
    if (vr != X509_V_OK && (SSL_get_verify_mode(c->ssl) & SSL_VERIFY_PEER)) {
        snprintf(why, whylen, "certificate verify failed: %s", X509_verify_cert_error_string(vr));
    } else if (ec != 0) {
        const char *r = ERR_reason_error_string(ec);
        if (r)
            snprintf(why, whylen, "%s", r);
        else
            ERR_error_string_n(ec, why, whylen);
    } else if (e == SSL_ERROR_SYSCALL && sys != 0) {
        snprintf(why, whylen, "%s", strerror(sys));
    } else {
        snprintf(why, whylen, "connection closed during the handshake");
    }
}

int conn_handshake(struct conn *c, char *why, size_t whylen)
{
    if (c->tls_done) return 1;
    if (c->err) return -1;
    ERR_clear_error();
    errno = 0;
    int r = SSL_do_handshake(c->ssl);
    if (r == 1) {
        c->tls_done = true;
        /* Bytes may have come with the last flight: read once more. */
        c->rd_ready = true;
        c->wr_ready = true;
        return 1;
    }
    int e = SSL_get_error(c->ssl, r);
    if (e == SSL_ERROR_WANT_READ) {
        c->rd_ready = false;
        return 0;
    }
    if (e == SSL_ERROR_WANT_WRITE) {
        c->wr_ready = false;
        return 0;
    }
    int sys = errno;
    if (e == SSL_ERROR_SYSCALL && sys == EINTR) return 0;
    if (why && whylen) conn_tls_why(c, e, sys, why, whylen);
    /* A peer that just went away (a port probe) is told by eof. */
    if (!ERR_peek_error() && (e == SSL_ERROR_ZERO_RETURN || (e == SSL_ERROR_SYSCALL && !sys)))
        c->eof = true;
    c->err = e == SSL_ERROR_SYSCALL && sys ? sys : EPROTO;
    ERR_clear_error();
    return -1;
}

bool conn_tls_pending(const struct conn *c)
{
    return c->ssl && SSL_has_pending(c->ssl);
}

void conn_close(struct conn *c)
{
    if (c->ssl) {
        /* close_notify, best effort: never after a broken session (OpenSSL
         * forbids it) and never waiting for the peer's. */
        if (c->tls_done && !c->err && c->fd >= 0) SSL_shutdown(c->ssl);
        SSL_free(c->ssl);
        c->ssl = NULL;
        ERR_clear_error();
    }
    if (c->ev) {
        event_free(c->ev);
        c->ev = NULL;
    }
    if (c->fd >= 0) {
        close(c->fd);
        c->fd = -1;
    }
    buf_reset(&c->in);
    buf_reset(&c->out);
    buf_release(&c->in, c->pool);
    buf_release(&c->out, c->pool);
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

bool conn_alpn_is(const struct conn *c, const char *proto)
{
    if (!c->ssl || !c->tls_done) return false;
    const unsigned char *p = NULL;
    unsigned int n = 0;
    SSL_get0_alpn_selected(c->ssl, &p, &n);
    return p && n == strlen(proto) && memcmp(p, proto, n) == 0;
}
