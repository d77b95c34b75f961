/* relay.c — the upstream side of an exchange (see relay.h): the request
 * rewritten and sent, the response head and body relayed to the front
 * (proxy/front.h: it frames them; backpressure when it says it is
 * backlogged), the upstream timer, and every failure classified for the
 * engine.
 *
 * Owns the exchange's upstream connection while in use. Does not own the
 * exchange (exchange.c), the pool (upstream.c) or the decisions about the
 * key (idem/engine.c: told through idem_response_head/_body/_end). */
#include "idemgate/proxy/relay.h"

#include <errno.h>
#include <string.h>
#include <sys/uio.h>

#include <event2/event.h>

#include "idemgate/config/config.h"
#include "idemgate/core/clock.h"
#include "idemgate/core/log.h"
#include "idemgate/core/metrics.h"
#include "idemgate/http/writer.h"
#include "idemgate/proxy/answer.h"
#include "idemgate/proxy/exchange.h"
#include "idemgate/proxy/loop.h"
#include "idemgate/proxy/upstream.h"

/* Bytes read from the upstream per fill. */
#define UPSTREAM_FILL (256 * 1024)

static void ex_up_event(struct conn *c, short what, void *arg);
static void ex_up_read(struct exchange *ex);
static void ex_upstream_failed(struct exchange *ex, enum err_code e, const char *why,
                               enum idem_failure kind);

/* The response head went to the client: the body flows. */
static bool streaming(const struct exchange *ex)
{
    return ex->state == EX_STREAMING;
}

static void ex_build_upstream_request(struct exchange *ex, struct buf *o)
{
    const struct http1_head *h = &ex->head;
    buf_append(o, h->method.p, h->method.n);
    buf_append(o, " ", 1);
    buf_append(o, h->target.p, h->target.n);
    buf_append(o, " HTTP/1.1\r\n", 11);
    struct http1_slice xfp = {NULL, 0};
    bool have_host = false;
    struct buf xffv;
    buf_init(&xffv);
    for (size_t i = 0; i < h->n_headers; i++) {
        const struct http1_header *hd = &h->headers[i];
        if (http1_is_hop_by_hop(h, i)) continue;
        if (http1_slice_ieq(hd->name, "content-length") || http1_slice_ieq(hd->name, "expect"))
            continue;
        if (http1_slice_ieq(hd->name, "x-forwarded-for")) {
            if (buf_size(&xffv)) buf_append(&xffv, ", ", 2);
            buf_append(&xffv, hd->value.p, hd->value.n);
            continue;
        }
        if (http1_slice_ieq(hd->name, "x-forwarded-proto")) {
            xfp = hd->value;
            continue;
        }
        if (http1_slice_ieq(hd->name, "host")) {
            if (ex->authority.p) continue; /* an absolute form's authority replaces it */
            have_host = true;
        }
        http1_write_header(o, hd->name.p, hd->name.n, hd->value.p, hd->value.n);
    }
    if (ex->authority.p) {
        http1_write_header(o, "Host", 4, ex->authority.p, ex->authority.n);
    } else if (!have_host) {
        const struct cfg_url *url = ex->server->url;
        buf_append_str(o, "Host: ");
        buf_append_str(o, url->host);
        buf_printf(o, ":%d\r\n", url->port);
    }
    const char *peer = ex->peer;
    buf_append_str(o, "X-Forwarded-For: ");
    if (buf_size(&xffv) > 0) {
        buf_append(o, buf_data(&xffv), buf_size(&xffv));
        buf_append(o, ", ", 2);
    }
    buf_append_str(o, peer);
    buf_append_str(o, "\r\nX-Forwarded-Proto: ");
    if (xfp.p) {
        buf_append(o, xfp.p, xfp.n);
        buf_append(o, ", ", 2);
    }
    buf_append_str(o, ex->front_tls ? "https\r\n" : "http\r\n");
    buf_free(&xffv);
    if (!ex->request_id_from_client)
        http1_write_header(o, "X-Request-Id", 12, ex->request_id, ex->request_id_len);
    if (h->body != HTTP1_BODY_NONE || ex->body_len > 0) {
        buf_append_str(o, "Content-Length: ");
        buf_append_u64(o, ex->body_len);
        buf_append(o, "\r\n", 2);
    }
    buf_append(o, "\r\n", 2);
}

static void ex_up_timeout(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    struct exchange *ex = arg;
    if (!ex->up->connected)
        ex_upstream_failed(ex, ERR_UPSTREAM_UNAVAILABLE, "connect timed out", IDEM_FAIL_NOT_SENT);
    else if (streaming(ex))
        ex_upstream_failed(ex, ERR_UPSTREAM_TIMEOUT, "body stalled past upstream_timeout_ms",
                           IDEM_FAIL_CUT);
    else
        ex_upstream_failed(ex, ERR_UPSTREAM_TIMEOUT, "no answer within upstream_timeout_ms",
                           ex->up_sent ? IDEM_FAIL_UNANSWERED : IDEM_FAIL_NOT_SENT);
}

static void ex_arm_up_timer(struct exchange *ex, int ms)
{
    struct timeval tv = clock_tv((uint64_t)ms);
    if (!ex->up_timer) ex->up_timer = evtimer_new(ex->loop->base, ex_up_timeout, ex);
    evtimer_add(ex->up_timer, &tv);
}

/* Tells the group how the try went, once per pick. */
static void ex_report(struct exchange *ex, enum upstream_result r)
{
    if (ex->server_reported) return;
    ex->server_reported = true;
    upstream_report(ex->server, r);
}

/* Sends the request to the next server of the group. False when every
 * server was tried already. */
static bool ex_try(struct exchange *ex)
{
    struct upstream_server *s =
        ex->tries < EXCHANGE_MAX_TRIES ? upstream_pick(ex->group, ex->tried, ex->tries) : NULL;
    if (!s) return false;
    ex->server = s;
    ex->server_reported = false;
    ex->server_addr = s->name;
    ex->tried[ex->tries++] = s;
    ex->up_sent = false;
    ex->upstream_start_ms = clock_now_ms();
    struct upconn *u = upstream_get(&s->pool);
    if (!u) {
        ex_upstream_failed(ex, ERR_UPSTREAM_UNAVAILABLE, s->pool.why, IDEM_FAIL_NOT_SENT);
        return true;
    }
    ex->up = u;
    exchange_ref(ex);
    conn_set_cb(&u->c, ex_up_event, ex);
    ex_build_upstream_request(ex, conn_outbuf(&u->c));
    const struct cfg_limits *lim = &ex->cfg->limits;
    if (!u->connected) {
        /* Still connecting: the body waits in out (one copy). */
        buf_append(&u->c.out, ex->body, ex->body_len);
        ex_arm_up_timer(ex, lim->upstream_connect_timeout_ms);
        return true;
    }
    ex_arm_up_timer(ex, lim->upstream_timeout_ms);
    /* Head and body in one writev, the body straight from the client's
     * buffer; only what the socket does not take is copied. */
    struct iovec iov = {(void *)ex->body, ex->body_len};
    if (conn_sendv(&u->c, &iov, ex->body_len ? 1 : 0) < 0) {
        ex_upstream_failed(ex, ERR_UPSTREAM_UNAVAILABLE, strerror(u->c.err), IDEM_FAIL_NOT_SENT);
        return true;
    }
    /* From here the upstream may have the request: what becomes of the key
     * if no answer comes is unknown_outcome's to say. */
    ex->up_sent = true;
    return true;
}

void relay_forward(struct exchange *ex)
{
    exchange_set_state(ex, EX_FORWARDING);
    ex_try(ex); /* a group has a server: the first pick never fails */
}

/* A try failed before any byte reached the server: another server of the
 * group may take the request (whatever its method: nobody ran it), up to
 * the group's retries. True when it went there. */
static bool ex_retry(struct exchange *ex, const char *why)
{
    if (ex->tries > (unsigned)ex->group->retries || ex->tries >= ex->group->n) return false;
    log_msg(LOG_WARN,
            "request %.*s: upstream %s: server %s failed before the request was sent (%s); "
            "trying another",
            (int)ex->request_id_len, ex->request_id, ex->group->name, ex->server->name, why);
    metrics_inc(M_UPSTREAM_RETRIES);
    return ex_try(ex);
}

/* Gives the upstream connection back and drops its reference. */
static void ex_release_upstream(struct exchange *ex, bool reusable)
{
    if (ex->up_timer) evtimer_del(ex->up_timer);
    struct upconn *u = ex->up;
    if (!u) return;
    ex->up = NULL;
    ex->upstream_ms = clock_now_ms() - ex->upstream_start_ms;
    metrics_observe_upstream(ex->upstream_ms);
    upstream_put(u, reusable);
    exchange_unref(ex);
}

/* The one place an upstream failure is logged: why says what happened. */
static void ex_upstream_failed(struct exchange *ex, enum err_code e, const char *why,
                               enum idem_failure kind)
{
    /* Hold a reference: releasing the upstream may drop the last but ours. */
    exchange_ref(ex);
    bool streaming = ex->state == EX_STREAMING;
    ex_release_upstream(ex, false);
    /* A head we refuse came from a server that is up: not its failure. */
    ex_report(ex, kind == IDEM_FAIL_BAD_HEAD ? UPSTREAM_NEUTRAL : UPSTREAM_FAILED);
    if (kind == IDEM_FAIL_NOT_SENT && !streaming && ex_retry(ex, why)) {
        exchange_unref(ex);
        return;
    }
    enum idem_end how = idem_response_failed(&ex->idem, kind);
    if (how == IDEM_END_LOST_HEAD) e = ERR_UPSTREAM_ANSWER_LOST;
    log_msg(LOG_WARN, "request %.*s: upstream %s (%s): %s (%s)%s", (int)ex->request_id_len,
            ex->request_id, ex->server->url->text, ex->server->name, err_code_name(e), why,
            how != IDEM_END_FAILED ? "; the key is kept as lost" : "");
    if (streaming) {
        /* Head already sent: the only honest signal left is cutting the
         * answer, once what arrived is out (and, for an owner, the key's
         * fate stored). */
        ex->front_abort = true;
        exchange_answered(ex);
    } else {
        answer_error(ex, e, false, 0);
    }
    exchange_set_state(ex, EX_ENDED);
    idem_response_end(&ex->idem, how);
    exchange_unref(ex);
}

static void ex_response_done(struct exchange *ex)
{
    exchange_ref(ex);
    ex_release_upstream(ex, ex->up_reusable);
    ex_report(ex, UPSTREAM_OK);
    exchange_answered(ex);
    exchange_set_state(ex, EX_ENDED);
    idem_response_end(&ex->idem, IDEM_END_OK);
    exchange_unref(ex);
}

/* The upstream's response head as the front sends it: end to end only,
 * with our X-Request-Id when it has none, the body's framing left to the
 * front. */
static void ex_send_response_head(struct exchange *ex)
{
    const struct http1_head *rh = &ex->rhead;
    ex->status = rh->status;
    if (!ex->front) return;
    struct front_header hs[HTTP1_MAX_HEADERS + 4];
    size_t n = 0;
    bool has_rid = false;
    struct answer_rl rlv;
    for (size_t i = 0; i < rh->n_headers; i++) {
        const struct http1_header *hd = &rh->headers[i];
        if (http1_is_hop_by_hop(rh, i)) continue;
        if (rh->body != HTTP1_BODY_NONE && http1_slice_ieq(hd->name, "content-length")) continue;
        if (http1_slice_ieq(hd->name, "x-request-id")) has_rid = true;
        /* only idemgate says whether an answer is a replay (docs/headers.md) */
        if (http1_slice_ieq(hd->name, "idempotent-replayed")) continue;
        if (answer_replaces_header(ex, hd->name.p, hd->name.n)) continue;
        hs[n++] = (struct front_header){hd->name.p, hd->name.n, hd->value.p, hd->value.n};
    }
    if (!has_rid)
        hs[n++] = (struct front_header){"X-Request-Id", 12, ex->request_id, ex->request_id_len};
    answer_ratelimit_headers(ex, hs, &n, &rlv);
    struct front_head fh = {rh->status, rh->reason.p, rh->reason.n, hs, n, FRONT_BODY_NONE, 0};
    if (rh->body == HTTP1_BODY_LENGTH) {
        fh.body = FRONT_BODY_LENGTH;
        fh.content_length = rh->content_length;
    } else if (rh->body == HTTP1_BODY_CHUNKED || rh->body == HTTP1_BODY_CLOSE) {
        fh.body = FRONT_BODY_STREAM;
    }
    ex->fops->head(ex->front, &fh);
}

/* One slice of response body: to the front and to the engine. The last
 * slice of a response being kept waits in the front for its record (see
 * exchange_answered). */
static void ex_body_data(struct exchange *ex, const char *p, size_t n, bool last)
{
    if (n == 0) return;
    idem_response_body(&ex->idem, p, n);
    if (ex->front) ex->fops->body(ex->front, p, n, last && idem_is_owner(&ex->idem));
}

/* Parses the response head when complete. Returns 1 when the head is done,
 * 0 when more bytes are needed, -1 after failing the exchange. */
static int ex_parse_response_head(struct exchange *ex)
{
    struct upconn *u = ex->up;
    for (;;) {
        bool head_req = http1_slice_ieq(ex->head.method, "HEAD");
        long n = http1_parse_response(buf_data(&u->c.in), buf_size(&u->c.in),
                                      ex->cfg->limits.max_header_bytes, head_req, &ex->rhead);
        if (n == HTTP1_INCOMPLETE) {
            if (u->c.eof || u->c.err) {
                /* Some bytes of a head: the upstream ran and its answer
                 * broke off. None: it may never have seen the request. */
                bool partial = buf_size(&u->c.in) > 0;
                ex_upstream_failed(ex, ERR_UPSTREAM_UNAVAILABLE,
                                   partial ? "closed in the middle of the head"
                                           : "closed before a response head",
                                   partial ? IDEM_FAIL_BAD_HEAD : IDEM_FAIL_UNANSWERED);
                return -1;
            }
            return 0;
        }
        if (n < 0 || ex->rhead.status == 101) {
            ex_upstream_failed(ex, ERR_UPSTREAM_UNAVAILABLE, "malformed response head",
                               IDEM_FAIL_BAD_HEAD);
            return -1;
        }
        if (ex->rhead.status >= 100 && ex->rhead.status < 200) {
            buf_consume(&u->c.in, (size_t)n); /* interim response: skip */
            continue;
        }
        ex->up_reusable = ex->rhead.keep_alive && ex->rhead.body != HTTP1_BODY_CLOSE;
        ex->r_remaining = ex->rhead.content_length;
        http1_chunked_init(&ex->rchunked);
        exchange_set_state(ex, EX_STREAMING);
        ex_send_response_head(ex);
        idem_response_head(&ex->idem, &ex->rhead);
        /* The head's slices are used up: now drop its bytes. */
        buf_consume(&u->c.in, (size_t)n);
        return 1;
    }
}

/* Consumes body bytes from the upstream buffer. Returns 1 at the end of the
 * response, 0 when more is needed, -1 after failing the exchange. */
static int ex_pump_body(struct exchange *ex)
{
    struct upconn *u = ex->up;
    struct buf *in = &u->c.in;
    switch (ex->rhead.body) {
    case HTTP1_BODY_NONE:
        return 1;
    case HTTP1_BODY_LENGTH: {
        size_t n = buf_size(in);
        if (n > ex->r_remaining) n = (size_t)ex->r_remaining;
        ex_body_data(ex, buf_data(in), n, n == ex->r_remaining);
        buf_consume(in, n);
        ex->r_remaining -= n;
        if (ex->r_remaining == 0) return 1;
        break;
    }
    case HTTP1_BODY_CHUNKED:
        while (buf_size(in) > 0) {
            size_t used = 0;
            struct http1_slice d;
            int r = http1_chunked_next(&ex->rchunked, buf_data(in), buf_size(in), &used, &d);
            if (r == HTTP1_CHUNK_DATA) ex_body_data(ex, d.p, d.n, false);
            buf_consume(in, used);
            if (r == HTTP1_CHUNK_DONE) return 1;
            if (r < 0) {
                ex_upstream_failed(ex, ERR_UPSTREAM_UNAVAILABLE, "malformed chunked body",
                                   IDEM_FAIL_CUT);
                return -1;
            }
            if (r == HTTP1_CHUNK_MORE) break;
        }
        break;
    case HTTP1_BODY_CLOSE:
        ex_body_data(ex, buf_data(in), buf_size(in), false);
        buf_consume(in, buf_size(in));
        if (u->c.eof) return 1;
        break;
    }
    if (u->c.eof || u->c.err) {
        ex_upstream_failed(ex, ERR_UPSTREAM_UNAVAILABLE, "closed in the middle of the body",
                           IDEM_FAIL_CUT);
        return -1;
    }
    return 0;
}

static bool ex_client_backlogged(const struct exchange *ex)
{
    return ex->front && ex->fops->backlogged(ex->front);
}

static void ex_up_read(struct exchange *ex)
{
    struct upconn *u = ex->up;
    while (ex->up == u) {
        /* resumed from the client's write edge (relay_client_drained) */
        if (streaming(ex) && ex_client_backlogged(ex)) return;
        /* Before the head is parsed, room for the largest head allowed. */
        size_t limit = UPSTREAM_FILL;
        if (!streaming(ex) && ex->cfg->limits.max_header_bytes + 1 > limit)
            limit = (size_t)ex->cfg->limits.max_header_bytes + 1;
        size_t got = conn_fill(&u->c, limit);
        if (got == 0 && buf_size(&u->c.in) == 0 && !u->c.eof && !u->c.err) return;
        if (!streaming(ex)) {
            int r = ex_parse_response_head(ex);
            if (r <= 0) return;
        }
        if (got > 0 && streaming(ex)) ex_arm_up_timer(ex, ex->cfg->limits.upstream_timeout_ms);
        int r = ex_pump_body(ex);
        if (r < 0) return;
        if (r == 1) {
            if (buf_size(&u->c.in) > 0) ex->up_reusable = false;
            ex_response_done(ex);
            return;
        }
        if (ex->front) ex->fops->flush(ex->front);
        if (!u->c.rd_ready && !u->c.eof) return;
    }
}

static void ex_up_event(struct conn *c, short what, void *arg)
{
    struct exchange *ex = arg;
    struct upconn *u = ex->up;
    (void)c;
    if (!u->connected) {
        int err = upstream_connect_result(u);
        if (err) {
            ex_upstream_failed(ex, ERR_UPSTREAM_UNAVAILABLE, strerror(err), IDEM_FAIL_NOT_SENT);
            return;
        }
        if (!u->connected) return;
        ex_arm_up_timer(ex, ex->cfg->limits.upstream_timeout_ms);
    }
    if ((what & EV_WRITE) || buf_size(&u->c.out) > 0) {
        size_t pending = buf_size(&u->c.out);
        int r = conn_flush(&u->c);
        if (buf_size(&u->c.out) < pending) ex->up_sent = true;
        if (r < 0 && !streaming(ex) && buf_size(&u->c.in) == 0) {
            ex_upstream_failed(ex, ERR_UPSTREAM_UNAVAILABLE, strerror(u->c.err),
                               ex->up_sent ? IDEM_FAIL_UNANSWERED : IDEM_FAIL_NOT_SENT);
            return;
        }
    }
    if (what & EV_READ) ex_up_read(ex);
}

void relay_client_drained(struct exchange *ex)
{
    if (ex->up && streaming(ex) && !ex_client_backlogged(ex)) {
        exchange_ref(ex);
        ex_up_read(ex);
        exchange_unref(ex);
    }
}

void relay_client_gone(struct exchange *ex)
{
    if (ex->up && streaming(ex)) event_active(ex->up->c.ev, EV_READ, 0);
}
