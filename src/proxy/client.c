/* client.c — client connections (see client.h): accept, read and parse
 * requests (head, body, normalized target), hand each complete one to an
 * exchange, flush what it queues, time out, close.
 *
 * Owns struct client. Does not own the exchange (exchange.c), the answers
 * (answer.c) or the parser (http1.c). */
#include "idemgate/proxy/client.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#include <event2/event.h>

#include "idemgate/config/config.h"
#include "idemgate/core/clock.h"
#include "idemgate/core/fsm.h"
#include "idemgate/core/log.h"
#include "idemgate/core/metrics.h"
#include "idemgate/http/target.h"
#include "idemgate/net/tls.h"
#include "idemgate/proxy/access.h"
#include "idemgate/proxy/exchange.h"
#include "idemgate/proxy/gen.h"
#include "idemgate/proxy/h2.h"
#include "idemgate/proxy/loop.h"

/* Stop reading the upstream while this much waits for a slow client. */
#define CLIENT_OUT_HIGH (1024 * 1024)
/* Chunked request bodies are read in fills of this much. */
#define CLIENT_FILL (256 * 1024)

static void client_event(struct conn *c, short what, void *arg);
static void client_refuse(struct client *cl, enum err_code e);

/* --------------------------------------------------------------- state */

/* Legal transitions: from -> bitmask of to. */
static const unsigned client_transitions[CLIENT__COUNT] = {
    [CLIENT_IDLE] = 1u << CLIENT_BUSY | 1u << CLIENT_CLOSING,
    [CLIENT_BUSY] = 1u << CLIENT_IDLE | 1u << CLIENT_HOLDING | 1u << CLIENT_CLOSING,
    [CLIENT_HOLDING] = 1u << CLIENT_IDLE | 1u << CLIENT_CLOSING,
    [CLIENT_CLOSING] = 0,
};

#define CLIENT_STATE_NAME(id, name) name,
static const char *const client_state_names[] = {STATES_CLIENT(CLIENT_STATE_NAME)};
#undef CLIENT_STATE_NAME

static const struct fsm client_fsm = {"client", client_state_names, CLIENT__COUNT,
                                      client_transitions, METRICS_SET_CLIENT};

/* Its gauge is named at load, before anything serves /metrics. */
__attribute__((constructor)) static void client_fsm_register(void)
{
    fsm_register(&client_fsm);
}

void client_set_state(struct client *cl, enum client_state to)
{
    cl->state = fsm_next(&client_fsm, (int)cl->state, (int)to);
}

/* ----------------------------------------------------------- lifecycle */

static void client_arm_timer(struct client *cl)
{
    int ms = cl->loop->cfg->limits.client_timeout_ms;
    struct timeval tv = clock_tv((uint64_t)ms);
    evtimer_add(cl->timer, &tv);
}

static void client_timeout(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    struct client *cl = arg;
    if (cl->h2) {
        if (h2_conn_timeout(cl->h2)) client_close(cl);
        return;
    }
    if (cl->state == CLIENT_BUSY || cl->state == CLIENT_HOLDING) return;
    /* A request started but not finished in time: 408. A client that is
     * idle, or does not read what we owe it, is just closed. */
    if (cl->state == CLIENT_IDLE && buf_size(&cl->c.in) > 0 && buf_size(&cl->c.out) == 0) {
        client_refuse(cl, ERR_REQUEST_TIMEOUT);
        conn_flush(&cl->c);
    }
    client_close(cl);
}

void client_accept(struct loop *l, int fd, const char *peer)
{
    struct client *cl = calloc(1, sizeof(*cl));
    if (!cl) abort();
    cl->loop = l;
    cl->state = CLIENT_IDLE;
    cl->keep_alive = true;
    snprintf(cl->peer, sizeof(cl->peer), "%s", peer);
    buf_init(&cl->chunked_body);
    buf_init(&cl->target);
    if (conn_open(&cl->c, l->base, fd, client_event, cl) < 0) {
        free(cl);
        atomic_fetch_sub(l->connections, 1);
        return;
    }
    cl->c.rd_ready = false; /* wait for the first edge */
    cl->c.pool = &l->bufs;
    const struct tls_set *tls = l->gen->gen->tls;
    if (tls_server_enabled(tls)) {
        struct ssl_st *ssl = tls_server_new(tls);
        if (!ssl) abort(); /* out of memory */
        conn_set_tls(&cl->c, ssl);
        cl->tls = true;
    }
    cl->timer = evtimer_new(l->base, client_timeout, cl);
    metrics_connections(1);
    fsm_enter(&client_fsm, CLIENT_IDLE);
    TAILQ_INSERT_HEAD(&l->clients, cl, link);
    client_arm_timer(cl);
}

void client_close(struct client *cl)
{
    struct loop *l = cl->loop;
    if (cl->ex) {
        struct exchange *ex = cl->ex;
        cl->ex = NULL;
        exchange_front_gone(ex, &cl->c.in, &cl->chunked_body);
    }
    if (cl->h2) h2_conn_free(cl->h2);
    TAILQ_REMOVE(&l->clients, cl, link);
    conn_close(&cl->c);
    event_free(cl->timer);
    buf_free(&cl->chunked_body);
    buf_free(&cl->target);
    fsm_leave(&client_fsm, (int)cl->state);
    free(cl);
    atomic_fetch_sub(l->connections, 1);
    metrics_connections(-1);
    loop_maybe_idle(l);
}

void client_drain(struct client *cl)
{
    if (cl->h2) {
        h2_conn_drain(cl->h2);
        return;
    }
    if (cl->state != CLIENT_IDLE || cl->have_head || buf_size(&cl->c.in) > 0 ||
        buf_size(&cl->c.out) > 0 || !cl->served)
        return;
    /* Between requests: close unless the next one is already on its way
     * (bytes in the socket that no edge has brought us yet). */
    char b;
    ssize_t n = recv(cl->c.fd, &b, 1, MSG_PEEK | MSG_DONTWAIT);
    if (n > 0) return;
    client_close(cl);
}

int client_flush(struct client *cl)
{
    int r = conn_flush(&cl->c);
    if (r < 0) client_close(cl);
    return r;
}

bool client_backlogged(const struct client *cl)
{
    return buf_size(&cl->c.out) > CLIENT_OUT_HIGH;
}

void client_request_done(struct client *cl, bool close)
{
    cl->served = true;
    size_t used = (size_t)cl->head_len;
    if (cl->body == HTTP1_BODY_LENGTH) used += cl->content_length;
    if (cl->body == HTTP1_BODY_CHUNKED) used += cl->chunk_pos;
    buf_consume(&cl->c.in, used);
    buf_reset(&cl->chunked_body);
    cl->ex = NULL;
    cl->have_head = false;
    cl->scanned = 0;
    cl->head_len = 0;
    cl->chunk_pos = 0;
    cl->sent_continue = false;
    cl->target_changed = false;
    if (close || !cl->keep_alive || cl->loop->draining)
        client_set_state(cl, CLIENT_CLOSING);
    else
        client_set_state(cl, CLIENT_IDLE);
    /* Flush what is queued; then either close or look at pipelined bytes. */
    int r = conn_flush(&cl->c);
    if (r < 0 || (r == 1 && cl->state == CLIENT_CLOSING)) {
        client_close(cl);
        return;
    }
    client_arm_timer(cl); /* idle keep-alive, or a CLOSING client that never reads */
    /* The next pipelined request starts from the event loop, not from
     * here: answering at once (400, 409, replay...) would otherwise recurse
     * once per pipelined request. */
    if (cl->state == CLIENT_IDLE) event_active(cl->c.ev, EV_READ, 0);
}

/* The request line of a head that did not parse, read as far as it goes,
 * for the access line: a method and a target when they look like ones
 * (visible bytes, bounded, each followed by its separator); else empty. */
static void client_guess_line(const char *p, size_t n, struct http1_slice *method,
                              struct http1_slice *target)
{
    while (n > 0 && (*p == '\r' || *p == '\n')) {
        p++;
        n--;
    }
    size_t i = 0;
    while (i < n && i < 32 && p[i] > 0x20 && p[i] < 0x7f)
        i++;
    if (i == 0 || i >= n || p[i] != ' ') return;
    *method = (struct http1_slice){p, i};
    const char *t = p + i + 1;
    size_t m = n - i - 1, j = 0;
    while (j < m && j < 2048 && t[j] > 0x20 && t[j] < 0x7f)
        j++;
    if (j > 0 && j < m && (t[j] == ' ' || t[j] == '\r' || t[j] == '\n'))
        *target = (struct http1_slice){t, j};
}

/* The path an access line may show for a refused request's target: the
 * normalized one, as an exchange logs it (into cl->target, unused now: the
 * connection closes), or none when the target is refused, since an
 * absolute-form target may carry userinfo (a credential) that must never
 * reach a log. */
static struct http1_slice client_log_target(struct client *cl, struct http1_slice t)
{
    struct http1_slice none = {NULL, 0};
    if (t.n == 0) return none;
    if (target_is_normal(t.p, t.n)) return t;
    buf_reset(&cl->target);
    char *out = buf_reserve(&cl->target, t.n + 1);
    const char *auth;
    size_t auth_len;
    long n = target_normalize(t.p, t.n, out, &auth, &auth_len);
    return n < 0 ? none : (struct http1_slice){out, (size_t)n};
}

/* Answers a request refused before any exchange existed (docs/errors.md:
 * 400, 408, 413, 431, 501, 505) and gives it what every answer has
 * (docs/headers.md, docs/logs.md): an X-Request-Id (the client's, else a new one), one
 * access line and one count, outcome "rejected". The head is parsed again
 * when it can be (a body refused later, a target refused after the
 * parse), else its request line is guessed at. */
static void client_refuse(struct client *cl, enum err_code e)
{
    struct loop *l = cl->loop;
    struct http1_head *h = l->scratch;
    const char *data = buf_data(&cl->c.in);
    size_t size = buf_size(&cl->c.in);
    bool parsed =
        size > 0 && http1_parse_request(data, size, l->cfg->limits.max_header_bytes, h) > 0;
    struct access_fields f = {.outcome = OUT_REJECTED, .start_ms = cl->req_start_ms};
    char rid[64];
    const struct http1_header *x = parsed ? http1_find_header(h, "x-request-id", NULL) : NULL;
    if (x && x->value.n > 0 && x->value.n < sizeof rid) {
        memcpy(rid, x->value.p, x->value.n);
        f.request_id_len = x->value.n;
    } else {
        f.request_id_len = access_request_id(l, rid);
    }
    f.request_id = rid;
    struct http1_slice target = {NULL, 0};
    if (parsed) {
        f.method = h->method;
        target = h->target;
    } else {
        client_guess_line(data, size, &f.method, &target);
    }
    f.target = client_log_target(cl, target);
    f.status = client_queue_error(cl, e, rid, f.request_id_len);
    struct buf b;
    if (access_begin(l->cfg, &f, &b)) access_end(&b, parsed ? h : NULL);
}

/* Answers a request we could not parse or accept, then closes. */
static void client_reject(struct client *cl, enum err_code e)
{
    client_refuse(cl, e);
    client_set_state(cl, CLIENT_CLOSING);
    int r = conn_flush(&cl->c);
    if (r != 0) {
        client_close(cl);
        return;
    }
    /* Stop reading; close after the answer is flushed, or when the timer
     * says the client will not read it. */
    shutdown(cl->c.fd, SHUT_RD);
    client_arm_timer(cl);
}

/* ------------------------------------------------------------- reading */

static enum err_code parse_error_code(long r)
{
    switch (r) {
    case HTTP1_ETOOLARGE:
    case HTTP1_ETOOMANY:
        return ERR_HEADERS_TOO_LARGE;
    case HTTP1_ENOTIMPL:
        return ERR_NOT_IMPLEMENTED;
    case HTTP1_EVERSION:
        return ERR_VERSION;
    default:
        return ERR_BAD_REQUEST;
    }
}

/* Checks the target and Host of a parsed head (docs/requests.md); keeps a
 * normalized target in the client when it differs. Returns 0 or -1. */
static int client_check_target(struct client *cl, const struct http1_head *h)
{
    cl->target_changed = false;
    /* the parser noted Host: no second scan of the headers */
    if (h->host.p && !target_host_valid(h->host.p, h->host.n)) return -1;
    if (h->target.n == 1 && h->target.p[0] == '*') /* asterisk form */
        return http1_slice_ieq(h->method, "OPTIONS") ? 0 : -1;
    if (target_is_normal(h->target.p, h->target.n)) return 0;
    buf_reset(&cl->target);
    char *out = buf_reserve(&cl->target, 2 * h->target.n + 1);
    const char *auth;
    size_t auth_len;
    long n = target_normalize(h->target.p, h->target.n, out, &auth, &auth_len);
    if (n < 0) return -1;
    if (!auth && (size_t)n == h->target.n && memcmp(out, h->target.p, h->target.n) == 0)
        return 0; /* already normal ("/.well-known") */
    /* the authority goes right after (room reserved: it is part of the
     * original target, so both fit in twice its length) */
    if (auth) memcpy(out + n, auth, auth_len);
    buf_commit(&cl->target, (size_t)n + (auth ? auth_len : 0));
    cl->target_len = (size_t)n;
    cl->auth_len = auth ? auth_len : 0;
    cl->target_changed = true;
    return 0;
}

/* Reads the body of the request whose head is parsed. Returns 1 when the
 * request is complete, 0 when more is needed, -1 when the client was
 * answered with an error. */
static int client_read_body(struct client *cl)
{
    const struct cfg_limits *lim = &cl->loop->cfg->limits;
    size_t have = buf_size(&cl->c.in) - (size_t)cl->head_len;
    if (cl->body == HTTP1_BODY_NONE) return 1;
    if (cl->body == HTTP1_BODY_LENGTH) return have >= cl->content_length;
    /* Chunk framing (sizes, extensions) is bounded too: decoded bytes
     * alone would let 1-byte chunks with 1 KiB extensions buffer ~1000x. */
    if (cl->chunk_pos > 2 * lim->max_request_body_bytes + 65536) {
        client_reject(cl, ERR_PAYLOAD_TOO_LARGE);
        return -1;
    }
    const char *p = buf_data(&cl->c.in) + cl->head_len;
    while (cl->chunk_pos < have) {
        size_t used = 0;
        struct http1_slice d;
        int r =
            http1_chunked_next(&cl->chunked, p + cl->chunk_pos, have - cl->chunk_pos, &used, &d);
        cl->chunk_pos += used;
        if (r == HTTP1_CHUNK_DATA) {
            if (buf_size(&cl->chunked_body) + d.n > lim->max_request_body_bytes) {
                client_reject(cl, ERR_PAYLOAD_TOO_LARGE);
                return -1;
            }
            buf_append(&cl->chunked_body, d.p, d.n);
        } else if (r == HTTP1_CHUNK_DONE) {
            return 1;
        } else if (r < 0) {
            client_reject(cl, ERR_BAD_REQUEST);
            return -1;
        } else {
            break;
        }
    }
    return 0;
}

/* Parses the head. Returns 1 when parsed, 0 when more is needed, -1 when
 * the client was rejected or closed. */
static int client_read_head(struct client *cl)
{
    const struct cfg_limits *lim = &cl->loop->cfg->limits;
    size_t size = buf_size(&cl->c.in);
    /* A head only completes with a new LF: without one, skip the rescan so
     * a client dripping its head byte by byte costs O(n), not O(n^2). */
    if (cl->scanned > 0 && cl->scanned < size && size < lim->max_header_bytes &&
        !memchr(buf_data(&cl->c.in) + cl->scanned, '\n', size - cl->scanned)) {
        cl->scanned = size;
        return 0;
    }
    cl->scanned = size;
    struct http1_head *h = cl->loop->scratch;
    long r = http1_parse_request(buf_data(&cl->c.in), size, lim->max_header_bytes, h);
    if (r == HTTP1_INCOMPLETE) return 0;
    if (r < 0 || client_check_target(cl, h) < 0) {
        client_reject(cl, r < 0 ? parse_error_code(r) : ERR_BAD_REQUEST);
        return -1;
    }
    cl->head_len = r;
    cl->have_head = true;
    cl->keep_alive = h->keep_alive;
    cl->minor = h->minor_version;
    cl->body = h->body;
    cl->content_length = h->content_length;
    cl->expect_continue = h->expect_continue;
    if (cl->body == HTTP1_BODY_LENGTH && cl->content_length > lim->max_request_body_bytes) {
        client_reject(cl, ERR_PAYLOAD_TOO_LARGE);
        return -1;
    }
    if (cl->body == HTTP1_BODY_CHUNKED) {
        http1_chunked_init(&cl->chunked);
        cl->chunk_pos = 0;
        buf_reset(&cl->chunked_body);
    }
    return 1;
}

/* How many buffered bytes the current request needs before we stop reading
 * (edge-triggered: what we leave unread is picked up after the exchange). */
static size_t client_fill_limit(const struct client *cl)
{
    const struct cfg_limits *lim = &cl->loop->cfg->limits;
    if (!cl->have_head) return lim->max_header_bytes + 1;
    if (cl->body == HTTP1_BODY_LENGTH) return (size_t)cl->head_len + cl->content_length;
    if (cl->body == HTTP1_BODY_CHUNKED) return (size_t)cl->head_len + cl->chunk_pos + CLIENT_FILL;
    return (size_t)cl->head_len;
}

/* The body is incomplete: 0 to read on, -1 when the client is gone. */
static int client_wait_body(struct client *cl)
{
    if (cl->c.eof) {
        client_close(cl);
        return -1;
    }
    if (cl->expect_continue && !cl->sent_continue) {
        cl->sent_continue = true;
        buf_append_str(conn_outbuf(&cl->c), "HTTP/1.1 100 Continue\r\n\r\n");
        if (conn_flush(&cl->c) < 0) {
            client_close(cl);
            return -1;
        }
    }
    return 0;
}

/* The request is complete: it becomes an exchange's (proxy/front.h). */
static void client_start_exchange(struct client *cl)
{
    struct loop *l = cl->loop;
    struct http1_head *h = l->scratch;
    /* With a body, reads since the head may have moved the buffer: parse
     * again (a bodiless head was parsed into the scratch in this call). */
    if (cl->body != HTTP1_BODY_NONE)
        http1_parse_request(buf_data(&cl->c.in), buf_size(&cl->c.in),
                            l->cfg->limits.max_header_bytes, h);
    struct front_request req = {.head = h, .peer = cl->peer, .tls = cl->tls};
    if (cl->target_changed) {
        const char *p = buf_data(&cl->target);
        req.target = (struct http1_slice){p, cl->target_len};
        if (cl->auth_len) req.authority = (struct http1_slice){p + cl->target_len, cl->auth_len};
    }
    if (cl->body == HTTP1_BODY_CHUNKED) {
        req.body = buf_data(&cl->chunked_body);
        req.body_len = buf_size(&cl->chunked_body);
    } else {
        req.body = buf_data(&cl->c.in) + cl->head_len;
        req.body_len = cl->body == HTTP1_BODY_LENGTH ? (size_t)cl->content_length : 0;
    }
    evtimer_del(cl->timer);
    cl->close_after = false;
    cl->out_chunked = false;
    client_set_state(cl, CLIENT_BUSY);
    exchange_start(l, &req, &client_front_ops, cl, &cl->ex);
}

/* The HTTP/2 client preface (RFC 9113 3.4). */
static const char h2_preface[] = "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
#define H2_PREFACE_LEN (sizeof(h2_preface) - 1)

/* A first request that opens with the HTTP/2 preface (prior knowledge):
 * 1 when the client now speaks HTTP/2, 0 when it is not one, -1 when
 * more bytes must say. */
static int client_is_h2(struct client *cl)
{
    size_t n = buf_size(&cl->c.in);
    if (cl->served || cl->have_head || !cl->loop->cfg->http2.enabled || n == 0) return 0;
    size_t k = n < H2_PREFACE_LEN ? n : H2_PREFACE_LEN;
    if (memcmp(buf_data(&cl->c.in), h2_preface, k) != 0) return 0;
    return n < H2_PREFACE_LEN ? -1 : 1;
}

/* The client speaks HTTP/2 from now on (prior knowledge, or ALPN h2). */
static void client_start_h2(struct client *cl)
{
    cl->h2 = h2_conn_start(cl);
    h2_conn_event(cl->h2, EV_READ | EV_WRITE); /* may close cl */
}

static void client_process(struct client *cl)
{
    const struct cfg_limits *lim = &cl->loop->cfg->limits;
    while (cl->state == CLIENT_IDLE) {
        /* A client that pipelines but does not read gets no more answers
         * queued: the next one waits for its write edge. */
        if (client_backlogged(cl)) return;
        conn_fill(&cl->c, client_fill_limit(cl));
        if (cl->c.err) {
            client_close(cl);
            return;
        }
        int h2 = client_is_h2(cl);
        if (h2 > 0) {
            client_start_h2(cl);
            return;
        }
        if (h2 < 0) {
            if (cl->c.eof) client_close(cl);
            return;
        }
        const char *base = buf_data(&cl->c.in);
        if (!cl->have_head) {
            /* a new request: its duration runs from its first parse */
            if (cl->scanned == 0) cl->req_start_ms = clock_now_ms();
            int r = client_read_head(cl);
            if (r < 0) return;
            if (r == 0) {
                if (cl->c.eof)
                    client_close(cl);
                else if (cl->c.rd_ready)
                    continue;
                else
                    conn_trim(&cl->c); /* idle: hold no buffer memory */
                return;
            }
            base = buf_data(&cl->c.in);
        }
        int r = client_read_body(cl);
        if (r < 0) return;
        if (r == 0) {
            if (client_wait_body(cl) < 0 || !cl->c.rd_ready) return;
            continue;
        }
        /* A bodiless head was parsed into the scratch in this call and is
         * copied from there; with a body the exchange parses it again. */
        if (cl->body == HTTP1_BODY_NONE && buf_data(&cl->c.in) != base)
            http1_parse_request(buf_data(&cl->c.in), buf_size(&cl->c.in), lim->max_header_bytes,
                                cl->loop->scratch);
        client_start_exchange(cl);
        return;
    }
}

static void client_event(struct conn *c, short what, void *arg)
{
    struct client *cl = arg;
    (void)c;
    if (cl->tls && !cl->c.tls_done) {
        /* The client timer (armed at accept) bounds the handshake. */
        char why[256];
        int r = conn_handshake(&cl->c, why, sizeof(why));
        if (r < 0) {
            log_msg(cl->c.eof ? LOG_DEBUG : LOG_INFO, "client %s: TLS handshake failed: %s",
                    cl->peer, why);
            client_close(cl);
        }
        if (r <= 0) return;
        if (conn_alpn_is(&cl->c, "h2") && cl->loop->cfg->http2.enabled) {
            client_start_h2(cl);
            return;
        }
    }
    if (cl->h2) {
        h2_conn_event(cl->h2, what);
        return;
    }
    if ((what & EV_WRITE) && cl->state != CLIENT_HOLDING) {
        size_t before = buf_size(&cl->c.out);
        int r = conn_flush(&cl->c);
        if (r < 0 || (r == 1 && cl->state == CLIENT_CLOSING)) {
            client_close(cl);
            return;
        }
        if (r == 1 && cl->ex) {
            /* May end the exchange and the client with it: touch nothing
             * after. A read edge stays noted in rd_ready for later. */
            exchange_front_drained(cl->ex);
            return;
        }
        /* Between requests the timer bounds a client that stops reading;
         * one that reads, however slowly, gets its time again. */
        if (cl->state != CLIENT_BUSY && buf_size(&cl->c.out) < before) client_arm_timer(cl);
    }
    if (cl->state != CLIENT_IDLE) return;
    /* Pipelined bytes already buffered count as much as a read edge: they
     * wait here while the output is backlogged (client_process). */
    if (cl->c.rd_ready || (what & EV_READ) || buf_size(&cl->c.in) > 0)
        client_process(cl);
    else if (buf_size(&cl->c.out) == 0)
        conn_trim(&cl->c);
}
