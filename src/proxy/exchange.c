/* exchange.c — client connections and one request's life: read and parse
 * the request, hand it to the idem engine, forward it upstream, stream the
 * response back, answer errors and replays.
 *
 * Owns: struct client (one per accepted socket) and struct exchange (one
 * per request). Does not own: the idempotency decisions (idem.c), the
 * upstream pool (upstream.c), the parser (http1.c). */
#include "idemgate/proxy/exchange.h"

#include <assert.h>
#include <errno.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>
#include <sys/socket.h>
#include <sys/uio.h>

#include <event2/event.h>

#include "idemgate/config/config.h"
#include "idemgate/idem/engine.h"
#include "idemgate/core/log.h"
#include "idemgate/core/metrics.h"
#include "idemgate/proxy/server.h"
#include "idemgate/http/target.h"
#include "idemgate/net/tls.h"
#include "idemgate/proxy/upstream.h"

/* Stop reading the upstream while this much waits for a slow client. */
#define CLIENT_OUT_HIGH (1024 * 1024)
/* Bytes read from the upstream per fill. */
#define UPSTREAM_FILL (256 * 1024)
/* Freed exchanges a worker keeps for reuse. */
#define EX_CACHE_MAX 64

static void client_event(struct conn *c, short what, void *arg);
static void ex_access_log(struct exchange *ex);
static void client_process(struct client *cl);
static void client_arm_timer(struct client *cl);
static void ex_up_event(struct conn *c, short what, void *arg);
static void ex_up_read(struct exchange *ex);
/* How an upstream exchange failed, which decides what the key becomes
 * (SPEC section 4): never sent (released), sent but no head (released, or
 * lost with unknown_outcome "keep"), a malformed head (lost), a body cut
 * after its head (lost when the answer would have been kept). */
enum up_fail { UP_NOT_SENT, UP_UNANSWERED, UP_BAD_HEAD, UP_CUT };
static void ex_upstream_failed(struct exchange *ex, enum err_code e, const char *why,
                               enum up_fail kind);

/* ---------------------------------------------------------------- state */

static const char *const ex_state_names[] = {"new",       "acquiring",  "waiting", "forwarding",
                                             "streaming", "completing", "done"};

/* Legal transitions: from -> bitmask of to. */
static const unsigned ex_transitions[] = {
    [EX_NEW] = 1u << EX_ACQUIRING | 1u << EX_FORWARDING | 1u << EX_COMPLETING | 1u << EX_DONE,
    [EX_ACQUIRING] = 1u << EX_WAITING | 1u << EX_FORWARDING | 1u << EX_COMPLETING | 1u << EX_DONE,
    [EX_WAITING] = 1u << EX_ACQUIRING | 1u << EX_COMPLETING | 1u << EX_DONE,
    [EX_FORWARDING] = 1u << EX_STREAMING | 1u << EX_COMPLETING,
    [EX_STREAMING] = 1u << EX_COMPLETING,
    [EX_COMPLETING] = 1u << EX_DONE,
    [EX_DONE] = 0,
};

void exchange_set_state(struct exchange *ex, enum ex_state to)
{
    if (!(ex_transitions[ex->state] & (1u << to))) {
        log_msg(LOG_ERROR, "illegal exchange transition %s -> %s", ex_state_names[ex->state],
                ex_state_names[to]);
        abort();
    }
    ex->state = to;
}

/* ------------------------------------------------------------- helpers */

static void out_status_line(struct buf *o, int status, const char *reason, size_t reason_len)
{
    buf_append(o, "HTTP/1.1 ", 9);
    buf_append_u64(o, (uint64_t)status);
    buf_append(o, " ", 1);
    buf_append(o, reason, reason_len);
    buf_append(o, "\r\n", 2);
}

static void out_header(struct buf *o, const char *name, size_t nl, const char *value, size_t vl)
{
    buf_append(o, name, nl);
    buf_append(o, ": ", 2);
    buf_append(o, value, vl);
    buf_append(o, "\r\n", 2);
}

static char *put_hex(char *p, uint64_t v, int digits)
{
    static const char hex[] = "0123456789abcdef";
    for (int i = digits - 1; i >= 0; i--) {
        p[i] = hex[v & 15];
        v >>= 4;
    }
    return p + digits;
}

/* "<boot:8>-<worker:4>-<counter:12>" in hex: unique per process start,
 * worker and request, built without printf on every request. */
static size_t format_request_id(char out[64], uint32_t boot, unsigned worker, uint64_t n)
{
    char *p = put_hex(out, boot, 8);
    *p++ = '-';
    p = put_hex(p, worker, 4);
    *p++ = '-';
    p = put_hex(p, n, 12);
    *p = '\0';
    return (size_t)(p - out);
}

/* RFC 9110 IMF-fixdate of now, formatted once per second per thread. */
static const char *http_date_now(void)
{
    static __thread time_t cached_sec = -1;
    static __thread char cached[32];
    time_t now = time(NULL);
    if (now != cached_sec) {
        struct tm tm;
        gmtime_r(&now, &tm);
        strftime(cached, sizeof(cached), "%a, %d %b %Y %H:%M:%S GMT", &tm);
        cached_sec = now;
    }
    return cached;
}

static const char *reason_phrase(int status)
{
    switch (status) {
    case 200:
        return "OK";
    case 201:
        return "Created";
    case 400:
        return "Bad Request";
    case 401:
        return "Unauthorized";
    case 408:
        return "Request Timeout";
    case 409:
        return "Conflict";
    case 413:
        return "Content Too Large";
    case 422:
        return "Unprocessable Content";
    case 431:
        return "Request Header Fields Too Large";
    case 501:
        return "Not Implemented";
    case 502:
        return "Bad Gateway";
    case 503:
        return "Service Unavailable";
    case 504:
        return "Gateway Timeout";
    case 505:
        return "HTTP Version Not Supported";
    default:
        return "Unknown";
    }
}

/* ---------------------------------------------------------- exchange */

void exchange_ref(struct exchange *ex)
{
    ex->refs++;
}

static void ex_free_timers(struct exchange *ex)
{
    if (ex->up_timer) event_free(ex->up_timer);
    if (ex->idem_timer) event_free(ex->idem_timer);
    ex->up_timer = ex->idem_timer = NULL;
}

static void ex_free(struct exchange *ex)
{
    struct worker *w = ex->w;
    /* A client that left before its answer: the exchange went on, and is
     * logged and counted now (its request bytes were moved into ex->req). */
    if (!ex->logged) ex_access_log(ex);
    idem_free(ex);
    if (ex->up_timer) evtimer_del(ex->up_timer);
    buf_free(&ex->req);
    buf_free(&ex->body_buf);
    buf_free(&ex->target);
    w->n_exchanges--;
    /* Keep a few, timers included, for the next requests: no per-request
     * malloc of the ~7 KiB exchange or of its two timers. */
    if (w->n_ex_cache < EX_CACHE_MAX) {
        *(struct exchange **)ex = w->ex_cache;
        w->ex_cache = ex;
        w->n_ex_cache++;
    } else {
        ex_free_timers(ex);
        free(ex);
    }
    worker_maybe_done(w);
}

void exchange_cache_free(struct worker *w)
{
    while (w->ex_cache) {
        struct exchange *ex = w->ex_cache;
        w->ex_cache = *(struct exchange **)ex;
        ex_free_timers(ex);
        free(ex);
    }
    w->n_ex_cache = 0;
}

void exchange_unref(struct exchange *ex)
{
    assert(ex->refs > 0);
    if (--ex->refs == 0) ex_free(ex);
}

static bool all_lower_hex(const char *p, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (!((p[i] >= '0' && p[i] <= '9') || (p[i] >= 'a' && p[i] <= 'f'))) return false;
    return true;
}

/* The trace id of a valid W3C traceparent ("00-<32 hex>-<16 hex>-<2 hex>";
 * a later version may append fields after another '-'); all zeros, an
 * upper-case digit or version ff is invalid, and nothing is logged. */
static bool ex_trace_id(const struct http1_head *h, struct http1_slice *out)
{
    const struct http1_header *tp = http1_find_header(h, "traceparent", NULL);
    if (!tp || tp->value.n < 55) return false;
    const char *p = tp->value.p;
    if (p[2] != '-' || p[35] != '-' || p[52] != '-' || !all_lower_hex(p, 2) ||
        !all_lower_hex(p + 3, 32) || !all_lower_hex(p + 36, 16) || !all_lower_hex(p + 53, 2))
        return false;
    if (memcmp(p, "ff", 2) == 0 || (memcmp(p, "00", 2) == 0 && tp->value.n != 55)) return false;
    if (tp->value.n > 55 && p[55] != '-') return false;
    if (strspn(p + 3, "0") >= 32) return false;
    *out = (struct http1_slice){p + 3, 32};
    return true;
}

static void ex_access_log(struct exchange *ex)
{
    const struct cfg *cfg = ex->w->cfg;
    ex->logged = true;
    metrics_outcome((int)ex->outcome);
    if (!cfg->log_access || !log_enabled(LOG_INFO)) return;
    struct buf *bp = log_scratch(), b = *bp;
    log_line_begin(&b, LOG_INFO);
    log_kv_str(&b, "msg", "access", 6);
    log_kv_str(&b, "request_id", ex->request_id, ex->request_id_len);
    log_kv_str(&b, "method", ex->head.method.p, ex->head.method.n);
    const char *q = memchr(ex->head.target.p, '?', ex->head.target.n);
    size_t plen = q ? (size_t)(q - ex->head.target.p) : ex->head.target.n;
    log_kv_str(&b, "path", ex->head.target.p, plen);
    log_kv_int(&b, "status", ex->status);
    const char *outcome = metrics_outcome_name((int)ex->outcome);
    log_kv_str(&b, "outcome", outcome, strlen(outcome));
    log_kv_int(&b, "duration_ms", (long long)(worker_now_ms(ex->w) - ex->start_ms));
    log_kv_int(&b, "upstream_ms", (long long)ex->upstream_ms);
    if (ex->skey) { /* "<scope>:<key>": an operator's way to find the record */
        const char *colon = memchr(ex->skey, ':', ex->skey_len);
        size_t sl = (size_t)(colon - ex->skey);
        log_kv_str(&b, "scope", ex->skey, sl < 16 ? sl : 16);
        log_kv_str(&b, "key", colon + 1, ex->skey_len - sl - 1);
    }
    struct http1_slice trace;
    if (ex_trace_id(&ex->head, &trace)) log_kv_str(&b, "trace_id", trace.p, trace.n);
    log_line_end(&b);
    *bp = b;
}

/* The client got its whole response (or is gone): the client may read its
 * next request while the exchange finishes its store work. */
static void ex_detach_client(struct exchange *ex)
{
    struct client *cl = ex->client;
    if (!cl) return;
    ex_access_log(ex);
    ex->client = NULL;
    cl->ex = NULL;
    size_t used = (size_t)cl->head_len;
    if (cl->body == HTTP1_BODY_LENGTH) used += cl->content_length;
    if (cl->body == HTTP1_BODY_CHUNKED) used += cl->chunk_pos;
    buf_consume(&cl->c.in, used);
    buf_reset(&cl->chunked_body);
    cl->have_head = false;
    cl->scanned = 0;
    cl->head_len = 0;
    cl->chunk_pos = 0;
    cl->sent_continue = false;
    cl->target_changed = false;
    if (ex->client_close || !cl->keep_alive || cl->w->draining) {
        cl->state = CLIENT_CLOSING;
    } else {
        cl->state = CLIENT_IDLE;
    }
    exchange_unref(ex);
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

/* Queues bytes for the client (dropped when it is gone) and tries to send. */
static void ex_client_flush(struct exchange *ex)
{
    struct client *cl = ex->client;
    if (!cl) return;
    if (conn_flush(&cl->c) < 0) client_close(cl);
}

/* The Connection header of a response to the client: close when the
 * client or the response asks for it or when draining; keep-alive spelled
 * out for HTTP/1.0 clients. */
static void ex_out_connection(struct exchange *ex, struct buf *o)
{
    if (ex->client_close || !ex->client_keep_alive || ex->w->draining) {
        ex->client_close = true;
        buf_append_str(o, "Connection: close\r\n");
    } else if (ex->client_minor == 0) {
        buf_append_str(o, "Connection: keep-alive\r\n");
    }
}

static void ex_begin_local_answer(struct exchange *ex, int status, struct buf *o)
{
    ex->status = status;
    out_status_line(o, status, reason_phrase(status), strlen(reason_phrase(status)));
    out_header(o, "X-Request-Id", 12, ex->request_id, ex->request_id_len);
    if (ex->replayed) buf_append_str(o, "Idempotent-Replayed: true\r\n");
    ex_out_connection(ex, o);
}

/* The owner of a key keeps the last bytes of its answer until the store
 * has the outcome (record kept, or key released; exchange_idem_finished
 * then detaches): a client that retries the moment it has the whole
 * answer finds the replay, or a free key, never a 409 of its own lock. */
static void ex_hold_or_detach(struct exchange *ex)
{
    if (ex->owner && ex->client)
        ex->holding = true;
    else
        ex_detach_client(ex);
}

/* The rest of an error response of ours after its status line and
 * Connection header: type, Retry-After where SPEC wants it, length, the
 * SPEC section 5 body in the configured format. Every error we write ends
 * here. */
static void out_error_rest(struct buf *o, const struct cfg *cfg, enum err_code e, int status)
{
    struct buf body;
    buf_init(&body);
    const char *ctype = err_render(e, status, cfg->error_format == CFG_ERR_PROBLEM, &body);
    out_header(o, "Content-Type", 12, ctype, strlen(ctype));
    if (e == ERR_IN_PROGRESS || e == ERR_STORE_UNAVAILABLE) buf_append_str(o, "Retry-After: 1\r\n");
    buf_append_str(o, "Content-Length: ");
    buf_append_u64(o, buf_size(&body));
    buf_append_str(o, "\r\n\r\n");
    buf_append(o, buf_data(&body), buf_size(&body));
    buf_free(&body);
}

/* An error answer to a client without an exchange (malformed request,
 * timeout), after which the connection closes. */
static void client_queue_error(struct client *cl, enum err_code e)
{
    int status = err_status(e, 409);
    const char *reason = reason_phrase(status);
    struct buf *o = conn_outbuf(&cl->c);
    out_status_line(o, status, reason, strlen(reason));
    buf_append_str(o, "Connection: close\r\n");
    out_error_rest(o, cl->w->cfg, e, status);
}

void exchange_answer_error(struct exchange *ex, enum err_code e)
{
    const struct cfg *cfg = ex->w->cfg;
    int status = err_status(e, ex->idem ? ex->idem->mismatch_status : 409);
    if (ex->outcome == OUT_PASSTHROUGH || ex->outcome == OUT_EXECUTED) {
        if (e == ERR_IN_PROGRESS)
            ex->outcome = OUT_IN_PROGRESS;
        else if (e == ERR_KEY_REUSE)
            ex->outcome = OUT_MISMATCH;
        else if (e == ERR_STORE_UNAVAILABLE)
            ex->outcome = OUT_STORE_ERROR;
        else if (status < 500)
            ex->outcome = OUT_REJECTED;
        else if (ex->owner)
            ex->outcome = OUT_NOT_CACHED; /* 502/504: nothing kept, key released */
    }
    if (!ex->client) return;
    struct buf *o = conn_outbuf(&ex->client->c);
    ex_begin_local_answer(ex, status, o);
    out_error_rest(o, cfg, e, status);
    ex_hold_or_detach(ex);
}

void exchange_replay(struct exchange *ex, const struct record *r)
{
    ex->outcome = OUT_REPLAYED;
    if (!ex->client) return;
    struct buf *o = conn_outbuf(&ex->client->c);
    ex->status = r->status;
    size_t reason_len = 0, length_len = 0;
    const char *reason = record_pseudo(r, RECORD_HDR_REASON, &reason_len);
    const char *length = record_pseudo(r, RECORD_HDR_LENGTH, &length_len);
    if (!reason) {
        reason = reason_phrase(r->status);
        reason_len = strlen(reason);
    }
    out_status_line(o, r->status, reason, reason_len);
    bool has_date = false;
    for (size_t i = 0; i < r->n_headers; i++) {
        const struct record_header *h = &r->headers[i];
        if (h->name_len > 0 && h->name[0] == ':') continue; /* pseudo-headers */
        if (h->name_len == 4 && strncasecmp(h->name, "date", 4) == 0) has_date = true;
        out_header(o, h->name, h->name_len, h->value, h->value_len);
    }
    if (!has_date) { /* a stored Date would be stale: replays carry today's */
        buf_append_str(o, "Date: ");
        buf_append_str(o, http_date_now());
        buf_append(o, "\r\n", 2);
    }
    out_header(o, "X-Request-Id", 12, ex->request_id, ex->request_id_len);
    buf_append_str(o, "Idempotent-Replayed: true\r\n");
    ex_out_connection(ex, o);
    /* RFC 9110 8.6: no Content-Length on a 204; a 304 has no body. */
    bool body = r->status != 204 && r->status != 304;
    if (length) { /* a HEAD answer: the length it declared, no body */
        out_header(o, "Content-Length", 14, length, length_len);
        body = false;
    } else if (body) {
        buf_append_str(o, "Content-Length: ");
        buf_append_u64(o, r->body_len);
        buf_append(o, "\r\n", 2);
    }
    buf_append(o, "\r\n", 2);
    /* Head and body in one writev, the body straight from the store's
     * reply (borrowed until we return: what is not sent is copied). */
    struct iovec iov = {(void *)r->body, (size_t)r->body_len};
    if (conn_sendv(&ex->client->c, &iov, body && r->body_len ? 1 : 0) < 0) {
        client_close(ex->client);
        return;
    }
    ex_detach_client(ex);
}

void exchange_idem_finished(struct exchange *ex)
{
    if (ex->state != EX_COMPLETING) exchange_set_state(ex, EX_COMPLETING);
    exchange_set_state(ex, EX_DONE);
    ex_detach_client(ex); /* a response held for its record */
    exchange_unref(ex);
}

/* ------------------------------------------------------ upstream side */

static void ex_build_upstream_request(struct exchange *ex, struct buf *o)
{
    const struct http1_head *h = &ex->head;
    struct client *cl = ex->client;
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
        out_header(o, hd->name.p, hd->name.n, hd->value.p, hd->value.n);
    }
    if (ex->authority.p) {
        out_header(o, "Host", 4, ex->authority.p, ex->authority.n);
    } else if (!have_host) {
        buf_append_str(o, "Host: ");
        buf_append_str(o, ex->upstream_url->host);
        buf_printf(o, ":%d\r\n", ex->upstream_url->port);
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
    /* A client gone before forwarding was HTTPS when the listener is. */
    bool tls = cl ? cl->tls : tls_server_enabled();
    buf_append_str(o, tls ? "https\r\n" : "http\r\n");
    buf_free(&xffv);
    if (!ex->request_id_from_client)
        out_header(o, "X-Request-Id", 12, ex->request_id, ex->request_id_len);
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
        ex_upstream_failed(ex, ERR_UPSTREAM_UNAVAILABLE, "connect timed out", UP_NOT_SENT);
    else if (ex->head_done)
        ex_upstream_failed(ex, ERR_UPSTREAM_TIMEOUT, "body stalled past upstream_timeout_ms",
                           UP_CUT);
    else
        ex_upstream_failed(ex, ERR_UPSTREAM_TIMEOUT, "no answer within upstream_timeout_ms",
                           ex->up_sent ? UP_UNANSWERED : UP_NOT_SENT);
}

static void ex_arm_up_timer(struct exchange *ex, int ms)
{
    struct timeval tv = {ms / 1000, (ms % 1000) * 1000};
    if (!ex->up_timer) ex->up_timer = evtimer_new(ex->w->base, ex_up_timeout, ex);
    evtimer_add(ex->up_timer, &tv);
}

void exchange_forward(struct exchange *ex)
{
    exchange_set_state(ex, EX_FORWARDING);
    ex->upstream_start_ms = worker_now_ms(ex->w);
    struct upconn *u = upstream_get(ex->pool);
    if (!u) {
        ex_upstream_failed(ex, ERR_UPSTREAM_UNAVAILABLE, strerror(errno), UP_NOT_SENT);
        return;
    }
    ex->up = u;
    exchange_ref(ex);
    conn_set_cb(&u->c, ex_up_event, ex);
    ex_build_upstream_request(ex, conn_outbuf(&u->c));
    const struct cfg_limits *lim = &ex->w->cfg->limits;
    if (!u->connected) {
        /* Still connecting: the body waits in out (one copy). */
        buf_append(&u->c.out, ex->body, ex->body_len);
        ex_arm_up_timer(ex, lim->upstream_connect_timeout_ms);
        return;
    }
    ex_arm_up_timer(ex, lim->upstream_timeout_ms);
    /* Head and body in one writev, the body straight from the client's
     * buffer; only what the socket does not take is copied. */
    struct iovec iov = {(void *)ex->body, ex->body_len};
    if (conn_sendv(&u->c, &iov, ex->body_len ? 1 : 0) < 0) {
        ex_upstream_failed(ex, ERR_UPSTREAM_UNAVAILABLE, strerror(u->c.err), UP_NOT_SENT);
        return;
    }
    /* From here the upstream may have the request: what becomes of the key
     * if no answer comes is unknown_outcome's to say. */
    ex->up_sent = true;
}

/* Gives the upstream connection back and drops its reference. */
static void ex_release_upstream(struct exchange *ex, bool reusable)
{
    if (ex->up_timer) evtimer_del(ex->up_timer);
    struct upconn *u = ex->up;
    if (!u) return;
    ex->up = NULL;
    ex->upstream_ms = worker_now_ms(ex->w) - ex->upstream_start_ms;
    metrics_observe_upstream(ex->upstream_ms);
    upstream_put(u, reusable);
    exchange_unref(ex);
}

/* What a failure of this kind makes of the key (SPEC section 4). */
static enum idem_end ex_failure_end(const struct exchange *ex, enum up_fail kind)
{
    switch (kind) {
    case UP_BAD_HEAD:
        return ex->owner ? IDEM_END_LOST_HEAD : IDEM_END_FAILED;
    case UP_CUT:
        return idem_would_keep(ex) ? IDEM_END_LOST_BODY : IDEM_END_FAILED;
    case UP_UNANSWERED:
        return idem_keeps_unanswered(ex) ? IDEM_END_UNANSWERED : IDEM_END_FAILED;
    case UP_NOT_SENT:
        break;
    }
    return IDEM_END_FAILED;
}

/* The one place an upstream failure is logged: why says what happened. */
static void ex_upstream_failed(struct exchange *ex, enum err_code e, const char *why,
                               enum up_fail kind)
{
    /* Hold a reference: releasing the upstream may drop the last but ours. */
    exchange_ref(ex);
    bool streaming = ex->state == EX_STREAMING;
    ex_release_upstream(ex, false);
    enum idem_end how = ex_failure_end(ex, kind);
    if (how == IDEM_END_LOST_HEAD) e = ERR_UPSTREAM_ANSWER_LOST;
    if (how != IDEM_END_FAILED) ex->outcome = OUT_LOST;
    log_msg(LOG_WARN, "request %.*s: upstream %s: %s (%s)%s", (int)ex->request_id_len,
            ex->request_id, ex->upstream_url->text, err_code_name(e), why,
            how != IDEM_END_FAILED ? "; the key is kept as lost" : "");
    if (streaming) {
        /* Head already sent: the only honest signal left is closing, once
         * what arrived is out (and, for an owner, the key's fate stored). */
        ex->client_close = true;
        ex_hold_or_detach(ex);
    } else {
        exchange_answer_error(ex, e);
    }
    exchange_set_state(ex, EX_COMPLETING);
    idem_response_end(ex, how);
    exchange_unref(ex);
}

static void ex_response_done(struct exchange *ex)
{
    exchange_ref(ex);
    ex_release_upstream(ex, ex->up_reusable);
    if (ex->client && ex->client_chunked) buf_append(conn_outbuf(&ex->client->c), "0\r\n\r\n", 5);
    ex_hold_or_detach(ex);
    exchange_set_state(ex, EX_COMPLETING);
    idem_response_end(ex, IDEM_END_OK);
    exchange_unref(ex);
}

static void ex_send_response_head(struct exchange *ex)
{
    const struct http1_head *rh = &ex->rhead;
    ex->status = rh->status;
    if (!ex->client) return;
    struct buf *o = conn_outbuf(&ex->client->c);
    out_status_line(o, rh->status, rh->reason.p, rh->reason.n);
    bool has_rid = false;
    for (size_t i = 0; i < rh->n_headers; i++) {
        const struct http1_header *hd = &rh->headers[i];
        if (http1_is_hop_by_hop(rh, i)) continue;
        if (rh->body != HTTP1_BODY_NONE && http1_slice_ieq(hd->name, "content-length")) continue;
        if (http1_slice_ieq(hd->name, "x-request-id")) has_rid = true;
        /* only idemgate says whether an answer is a replay (SPEC 4) */
        if (http1_slice_ieq(hd->name, "idempotent-replayed")) continue;
        out_header(o, hd->name.p, hd->name.n, hd->value.p, hd->value.n);
    }
    if (!has_rid) out_header(o, "X-Request-Id", 12, ex->request_id, ex->request_id_len);
    if (rh->body == HTTP1_BODY_CHUNKED || rh->body == HTTP1_BODY_CLOSE) {
        if (ex->client_minor >= 1)
            ex->client_chunked = true;
        else
            ex->client_close = true;
    }
    ex_out_connection(ex, o);
    if (rh->body == HTTP1_BODY_LENGTH) {
        buf_append_str(o, "Content-Length: ");
        buf_append_u64(o, rh->content_length);
        buf_append(o, "\r\n", 2);
    } else if (ex->client_chunked) {
        buf_append_str(o, "Transfer-Encoding: chunked\r\n");
    }
    buf_append(o, "\r\n", 2);
}

/* One slice of response body: to the client (framed) and to the engine.
 * A Content-Length or close-delimited slice goes out with one writev
 * behind whatever is queued (no copy), except the last slice of a response
 * being kept, which waits for its record (see ex_response_done). Chunked
 * slices are framed into out and flushed once per read. */
static void ex_body_data(struct exchange *ex, const char *p, size_t n, bool last)
{
    if (n == 0) return;
    idem_response_body(ex, p, n);
    struct client *cl = ex->client;
    if (!cl) return;
    struct buf *o = conn_outbuf(&cl->c);
    if (ex->client_chunked) {
        buf_printf(o, "%zx\r\n", n);
        buf_append(o, p, n);
        buf_append(o, "\r\n", 2);
    } else if (last && ex->owner) { /* held: see ex_hold_or_detach */
        buf_append(o, p, n);
    } else {
        struct iovec iov = {(void *)p, n};
        if (conn_sendv(&cl->c, &iov, 1) < 0) client_close(cl);
    }
}

/* Parses the response head when complete. Returns 1 when the head is done,
 * 0 when more bytes are needed, -1 after failing the exchange. */
static int ex_parse_response_head(struct exchange *ex)
{
    struct upconn *u = ex->up;
    for (;;) {
        bool head_req = http1_slice_ieq(ex->head.method, "HEAD");
        long n = http1_parse_response(buf_data(&u->c.in), buf_size(&u->c.in),
                                      ex->w->cfg->limits.max_header_bytes, head_req, &ex->rhead);
        if (n == HTTP1_INCOMPLETE) {
            if (u->c.eof || u->c.err) {
                /* Some bytes of a head: the upstream ran and its answer
                 * broke off. None: it may never have seen the request. */
                bool partial = buf_size(&u->c.in) > 0;
                ex_upstream_failed(ex, ERR_UPSTREAM_UNAVAILABLE,
                                   partial ? "closed in the middle of the head"
                                           : "closed before a response head",
                                   partial ? UP_BAD_HEAD : UP_UNANSWERED);
                return -1;
            }
            return 0;
        }
        if (n < 0 || ex->rhead.status == 101) {
            ex_upstream_failed(ex, ERR_UPSTREAM_UNAVAILABLE, "malformed response head",
                               UP_BAD_HEAD);
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
        ex->head_done = true;
        ex_send_response_head(ex);
        idem_response_head(ex, &ex->rhead);
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
                ex_upstream_failed(ex, ERR_UPSTREAM_UNAVAILABLE, "malformed chunked body", UP_CUT);
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
                           UP_CUT);
        return -1;
    }
    return 0;
}

static bool ex_client_backlogged(const struct exchange *ex)
{
    return ex->client && buf_size(&ex->client->c.out) > CLIENT_OUT_HIGH;
}

static void ex_up_read(struct exchange *ex)
{
    struct upconn *u = ex->up;
    while (ex->up == u) {
        /* resumed from the client's write edge (ex_client_drained) */
        if (ex->head_done && ex_client_backlogged(ex)) return;
        /* Before the head is parsed, room for the largest head allowed. */
        size_t limit = UPSTREAM_FILL;
        if (!ex->head_done && ex->w->cfg->limits.max_header_bytes + 1 > limit)
            limit = (size_t)ex->w->cfg->limits.max_header_bytes + 1;
        size_t got = conn_fill(&u->c, limit);
        if (got == 0 && buf_size(&u->c.in) == 0 && !u->c.eof && !u->c.err) return;
        if (!ex->head_done) {
            int r = ex_parse_response_head(ex);
            if (r <= 0) return;
        }
        if (got > 0 && ex->head_done) ex_arm_up_timer(ex, ex->w->cfg->limits.upstream_timeout_ms);
        int r = ex_pump_body(ex);
        if (r < 0) return;
        if (r == 1) {
            if (buf_size(&u->c.in) > 0) ex->up_reusable = false;
            ex_response_done(ex);
            return;
        }
        ex_client_flush(ex);
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
            ex_upstream_failed(ex, ERR_UPSTREAM_UNAVAILABLE, strerror(err), UP_NOT_SENT);
            return;
        }
        if (!u->connected) return;
        ex_arm_up_timer(ex, ex->w->cfg->limits.upstream_timeout_ms);
    }
    if ((what & EV_WRITE) || buf_size(&u->c.out) > 0) {
        size_t pending = buf_size(&u->c.out);
        int r = conn_flush(&u->c);
        if (buf_size(&u->c.out) < pending) ex->up_sent = true;
        if (r < 0 && !ex->head_done && buf_size(&u->c.in) == 0) {
            ex_upstream_failed(ex, ERR_UPSTREAM_UNAVAILABLE, strerror(u->c.err),
                               ex->up_sent ? UP_UNANSWERED : UP_NOT_SENT);
            return;
        }
    }
    if (what & EV_READ) ex_up_read(ex);
}

/* The client drained its output: resume an upstream paused on backlog. */
static void ex_client_drained(struct exchange *ex)
{
    if (ex->up && ex->head_done && !ex_client_backlogged(ex)) {
        exchange_ref(ex);
        ex_up_read(ex);
        exchange_unref(ex);
    }
}

/* ---------------------------------------------------------- client */

static void client_timeout(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    struct client *cl = arg;
    if (cl->state == CLIENT_BUSY) return;
    /* A request started but not finished in time: 408. A client that is
     * idle, or does not read what we owe it, is just closed. */
    if (cl->state == CLIENT_IDLE && buf_size(&cl->c.in) > 0 && buf_size(&cl->c.out) == 0) {
        client_queue_error(cl, ERR_REQUEST_TIMEOUT);
        conn_flush(&cl->c);
    }
    client_close(cl);
}

static void client_arm_timer(struct client *cl)
{
    int ms = cl->w->cfg->limits.client_timeout_ms;
    struct timeval tv = {ms / 1000, (ms % 1000) * 1000};
    evtimer_add(cl->timer, &tv);
}

void client_accept(struct worker *w, int fd, const char *peer)
{
    struct client *cl = calloc(1, sizeof(*cl));
    if (!cl) abort();
    cl->w = w;
    cl->state = CLIENT_IDLE;
    cl->keep_alive = true;
    snprintf(cl->peer, sizeof(cl->peer), "%s", peer);
    buf_init(&cl->chunked_body);
    buf_init(&cl->target);
    if (conn_open(&cl->c, w->base, fd, client_event, cl) < 0) {
        free(cl);
        atomic_fetch_sub(&w->srv->connections, 1);
        return;
    }
    cl->c.rd_ready = false; /* wait for the first edge */
    cl->c.pool = &w->bufs;
    if (tls_server_enabled()) {
        struct ssl_st *ssl = tls_server_new();
        if (!ssl) abort(); /* out of memory */
        conn_set_tls(&cl->c, ssl);
        cl->tls = true;
    }
    cl->timer = evtimer_new(w->base, client_timeout, cl);
    metrics_connections(1);
    cl->next = w->clients;
    if (w->clients) w->clients->prev = cl;
    w->clients = cl;
    client_arm_timer(cl);
}

void client_close(struct client *cl)
{
    struct worker *w = cl->w;
    struct exchange *ex = cl->ex;
    if (ex) {
        /* The exchange goes on without us: hand it the request bytes its
         * slices point into (moving the struct keeps the bytes in place). */
        buf_swap(&ex->req, &cl->c.in);
        buf_swap(&ex->body_buf, &cl->chunked_body);
        ex->client = NULL;
        cl->ex = NULL;
        /* An upstream paused on this client's backlog must go on alone
         * (its edge was used up): the answer is still read and kept. */
        if (ex->up && ex->head_done) event_active(ex->up->c.ev, EV_READ, 0);
        exchange_unref(ex);
    }
    if (cl->prev)
        cl->prev->next = cl->next;
    else
        w->clients = cl->next;
    if (cl->next) cl->next->prev = cl->prev;
    conn_close(&cl->c);
    event_free(cl->timer);
    buf_free(&cl->chunked_body);
    buf_free(&cl->target);
    free(cl);
    atomic_fetch_sub(&w->srv->connections, 1);
    metrics_connections(-1);
    worker_maybe_done(w);
}

void client_drain(struct client *cl)
{
    if (cl->state == CLIENT_IDLE && !cl->have_head && buf_size(&cl->c.in) == 0 &&
        buf_size(&cl->c.out) == 0)
        client_close(cl);
}

/* Answers a request we could not parse or accept, then closes. */
static void client_reject(struct client *cl, enum err_code e)
{
    client_queue_error(cl, e);
    cl->state = CLIENT_CLOSING;
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

/* The normalized target (and authority), when normalization changed the
 * target, moves from the client into the exchange: route, fingerprint,
 * access line and upstream all see it (SPEC 3). */
static void ex_take_target(struct exchange *ex, struct client *cl)
{
    if (!cl->target_changed) return;
    buf_swap(&ex->target, &cl->target);
    cl->target_changed = false;
    const char *p = buf_data(&ex->target);
    ex->head.target = (struct http1_slice){p, cl->target_len};
    if (cl->auth_len) ex->authority = (struct http1_slice){p + cl->target_len, cl->auth_len};
}

/* Header names with an underscore are dropped, as nginx does by default:
 * a proxy behind us may map X_Api_Key and X-Api-Key to one name. */
static void ex_drop_underscore_headers(struct http1_head *h)
{
    size_t o = 0;
    for (size_t i = 0; i < h->n_headers; i++) {
        if (memchr(h->headers[i].name.p, '_', h->headers[i].name.n)) continue;
        if (o != i) h->headers[o] = h->headers[i];
        o++;
    }
    h->n_headers = o;
}

/* Checks the target and Host of a parsed head (SPEC 3 and 6); keeps a
 * normalized target in the client when it differs. Returns 0 or -1. */
static int client_check_target(struct client *cl, const struct http1_head *h)
{
    cl->target_changed = false;
    const struct http1_header *host = http1_find_header(h, "host", NULL);
    if (host && !target_host_valid(host->value.p, host->value.n)) return -1;
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

static void client_start_exchange(struct client *cl)
{
    struct worker *w = cl->w;
    evtimer_del(cl->timer);
    struct exchange *ex = w->ex_cache;
    if (ex) {
        w->ex_cache = *(struct exchange **)ex;
        w->n_ex_cache--;
        struct event *up_timer = ex->up_timer, *idem_timer = ex->idem_timer;
        memset(ex, 0, offsetof(struct exchange, head));
        memset(&ex->head + 1, 0, sizeof(*ex) - offsetof(struct exchange, head) - sizeof(ex->head));
        ex->up_timer = up_timer;     /* idle, bound to this ex and base */
        ex->idem_timer = idem_timer; /* idle; idem.c sets its callback */
    } else {
        ex = calloc(1, sizeof(*ex));
        if (!ex) abort();
    }
    w->n_exchanges++;
    ex->refs = 2; /* the client's and the engine's */
    ex->w = w;
    ex->client = cl;
    ex->state = EX_NEW;
    ex->start_ms = worker_now_ms(w);
    if (cl->body == HTTP1_BODY_NONE) {
        /* Parsed into the scratch in this very call: copy the used part. */
        const struct http1_head *sh = w->scratch;
        memcpy(&ex->head, sh,
               offsetof(struct http1_head, headers) + sh->n_headers * sizeof(sh->headers[0]));
    } else {
        /* Reads since the head may have moved the buffer: parse again. */
        http1_parse_request(buf_data(&cl->c.in), buf_size(&cl->c.in),
                            w->cfg->limits.max_header_bytes, &ex->head);
    }
    buf_init(&ex->req);
    buf_init(&ex->body_buf);
    buf_init(&ex->target);
    ex_take_target(ex, cl);
    ex_drop_underscore_headers(&ex->head);
    memcpy(ex->peer, cl->peer, sizeof(ex->peer));
    ex->client_keep_alive = ex->head.keep_alive;
    ex->client_minor = ex->head.minor_version;
    cl->keep_alive = ex->head.keep_alive;
    if (cl->body == HTTP1_BODY_CHUNKED) {
        ex->body = buf_data(&cl->chunked_body);
        ex->body_len = buf_size(&cl->chunked_body);
    } else {
        ex->body = buf_data(&cl->c.in) + cl->head_len;
        ex->body_len = cl->body == HTTP1_BODY_LENGTH ? (size_t)cl->content_length : 0;
    }
    const struct http1_header *rid = http1_find_header(&ex->head, "x-request-id", NULL);
    if (rid && rid->value.n > 0 && rid->value.n < sizeof(ex->request_id)) {
        memcpy(ex->request_id, rid->value.p, rid->value.n);
        ex->request_id_len = rid->value.n;
        ex->request_id_from_client = true;
    } else {
        ex->request_id_len =
            format_request_id(ex->request_id, w->srv->boot_id, (unsigned)w->id, ++w->rid_counter);
    }
    const struct cfg *cfg = w->cfg;
    const struct cfg_route *route = cfg_route_for(cfg, ex->head.target.p, ex->head.target.n);
    ex->idem = route ? &route->idem : &cfg->idem;
    ex->upstream_url = route ? &route->upstream : &cfg->upstream;
    ex->pool = &w->pools[route ? (size_t)(route - cfg->routes) + 1 : 0];
    cl->ex = ex;
    cl->state = CLIENT_BUSY;
    idem_start(ex);
}

/* Reads the body of the request whose head is parsed. Returns 1 when the
 * request is complete, 0 when more is needed, -1 when the client was
 * answered with an error. */
static int client_read_body(struct client *cl)
{
    const struct cfg_limits *lim = &cl->w->cfg->limits;
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
    const struct cfg_limits *lim = &cl->w->cfg->limits;
    size_t size = buf_size(&cl->c.in);
    /* A head only completes with a new LF: without one, skip the rescan so
     * a client dripping its head byte by byte costs O(n), not O(n^2). */
    if (cl->scanned > 0 && cl->scanned < size && size < lim->max_header_bytes &&
        !memchr(buf_data(&cl->c.in) + cl->scanned, '\n', size - cl->scanned)) {
        cl->scanned = size;
        return 0;
    }
    cl->scanned = size;
    struct http1_head *h = cl->w->scratch;
    long r = http1_parse_request(buf_data(&cl->c.in), size, lim->max_header_bytes, h);
    if (r == HTTP1_INCOMPLETE) return 0;
    if (r < 0) {
        client_reject(cl, parse_error_code(r));
        return -1;
    }
    if (client_check_target(cl, h) < 0) {
        client_reject(cl, ERR_BAD_REQUEST);
        return -1;
    }
    cl->head_len = r;
    cl->have_head = true;
    cl->keep_alive = h->keep_alive;
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
    const struct cfg_limits *lim = &cl->w->cfg->limits;
    if (!cl->have_head) return lim->max_header_bytes + 1;
    if (cl->body == HTTP1_BODY_LENGTH) return (size_t)cl->head_len + cl->content_length;
    if (cl->body == HTTP1_BODY_CHUNKED) return (size_t)cl->head_len + cl->chunk_pos + UPSTREAM_FILL;
    return (size_t)cl->head_len;
}

static void client_process(struct client *cl)
{
    const struct cfg_limits *lim = &cl->w->cfg->limits;
    while (cl->state == CLIENT_IDLE) {
        /* A client that pipelines but does not read gets no more answers
         * queued: the next one waits for its write edge. */
        if (buf_size(&cl->c.out) > CLIENT_OUT_HIGH) return;
        conn_fill(&cl->c, client_fill_limit(cl));
        if (cl->c.err) {
            client_close(cl);
            return;
        }
        const char *base = buf_data(&cl->c.in);
        if (!cl->have_head) {
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
            if (cl->c.eof) {
                client_close(cl);
                return;
            }
            if (cl->expect_continue && !cl->sent_continue) {
                cl->sent_continue = true;
                buf_append_str(conn_outbuf(&cl->c), "HTTP/1.1 100 Continue\r\n\r\n");
                if (conn_flush(&cl->c) < 0) {
                    client_close(cl);
                    return;
                }
            }
            if (!cl->c.rd_ready) return;
            continue;
        }
        /* A bodiless head was parsed into the scratch in this call and is
         * copied from there; with a body the exchange parses it again. */
        if (cl->body == HTTP1_BODY_NONE && buf_data(&cl->c.in) != base)
            http1_parse_request(buf_data(&cl->c.in), buf_size(&cl->c.in), lim->max_header_bytes,
                                cl->w->scratch);
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
    }
    if ((what & EV_WRITE) && !(cl->ex && cl->ex->holding)) {
        size_t before = buf_size(&cl->c.out);
        int r = conn_flush(&cl->c);
        if (r < 0 || (r == 1 && cl->state == CLIENT_CLOSING)) {
            client_close(cl);
            return;
        }
        if (r == 1 && cl->ex) {
            /* May end the exchange and the client with it: touch nothing
             * after. A read edge stays noted in rd_ready for later. */
            ex_client_drained(cl->ex);
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
