/* h2.c — HTTP/2 from clients (see h2.h), on nghttp2 over our connection
 * layer: the client's conn (net/conn.c, edge-triggered, TLS or not) feeds
 * nghttp2_session_mem_recv and takes what nghttp2_session_mem_send
 * produces; no second I/O stack. Each stream is a front (proxy/front.h):
 * its complete request becomes an exchange, exactly as an HTTP/1 request
 * does, and the exchange's answer goes out as HEADERS and DATA frames
 * through a data provider that respects flow control (a stream whose
 * client does not read fills its own buffer, then tells the exchange it
 * is backlogged: the upstream read pauses for that stream only).
 *
 * Limits (docs/configuration.md, HTTP/2): http2.max_concurrent_streams
 * (nghttp2 refuses the streams beyond it), limits.max_header_bytes for a
 * header block however many CONTINUATION frames carry it (a 431, and
 * GOAWAY when a block keeps coming far past it), max_resets_per_second
 * (Rapid Reset), floods of SETTINGS and PING (nghttp2's own bounds, set
 * here) and of empty frames: GOAWAY ENHANCE_YOUR_CALM and the connection
 * closed, while the exchanges its streams started go on (a stream that
 * goes away is a client that went away).
 *
 * Owns struct h2conn (through its client) and its streams: each stream's
 * header and body bytes until an exchange that outlives the stream takes
 * them (exchange_front_gone), and the answer bytes nghttp2 has not taken
 * yet. */
#include "idemgate/proxy/h2.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <event2/event.h>
#include <nghttp2/nghttp2.h>

#include "idemgate/config/config.h"
#include "idemgate/core/clock.h"
#include "idemgate/core/log.h"
#include "idemgate/http/target.h"
#include "idemgate/proxy/access.h"
#include "idemgate/proxy/answer.h"
#include "idemgate/proxy/client.h"
#include "idemgate/proxy/exchange.h"
#include "idemgate/proxy/front.h"
#include "idemgate/proxy/loop.h"

/* Bytes read from the socket per fill. */
#define H2_FILL (64 * 1024)
/* A stream's answer bytes waiting for the client's window: above this the
 * exchange pauses its upstream. */
#define H2_STREAM_HIGH (256 * 1024)
/* The connection's output buffer: nghttp2 is asked for more frames only
 * below this. */
#define H2_OUT_HIGH (256 * 1024)
/* Empty DATA frames (no END_STREAM) and CONTINUATION frames of one header
 * block beyond these are a flood. */
#define H2_MAX_EMPTY_FRAMES 1000
#define H2_MAX_CONTINUATIONS 64
/* Unanswered SETTINGS and PING ACKs nghttp2 queues before it gives up. */
#define H2_MAX_OUTBOUND_ACK 1000
#define H2_MAX_SETTINGS 32
/* Our HPACK encoder's table (the client's SETTINGS cannot enlarge it). */
#define H2_DEFLATE_TABLE 4096
/* Header fields in one request, pseudo-headers included. */
#define H2_MAX_FIELDS (HTTP1_MAX_HEADERS + 8)
/* Fields of one answer: a replay may carry every stored header. */
#define H2_NV_MAX 256

/* One received header field: offsets into the stream's hdrs. */
struct h2_field {
    uint32_t name, name_len, value, value_len;
};

struct h2_stream {
    struct h2conn *h;
    int32_t id;
    struct exchange *ex; /* attached, or NULL */
    struct buf hdrs;     /* names and values back to back (the request's slices) */
    struct h2_field fields[H2_MAX_FIELDS];
    size_t n_fields;
    size_t hdr_bytes; /* of the block, for limits.max_header_bytes */
    bool too_large;   /* 431 */
    bool too_many;
    struct buf body;
    bool body_too_large; /* answered 413 */
    struct buf target;   /* a normalized :path */
    struct buf out;      /* answer bytes nghttp2 has not taken */
    bool answered;       /* a response was submitted */
    bool ended;          /* its last DATA may carry END_STREAM */
    bool paused;         /* the exchange saw it backlogged */
    uint64_t start_ms;   /* its HEADERS began: the request must be whole in client_timeout_ms */
    TAILQ_ENTRY(h2_stream) link;
};

struct h2conn {
    struct client *cl; /* its connection, loop, timer and place in the loop's list */
    nghttp2_session *s;
    TAILQ_HEAD(, h2_stream) streams;
    unsigned n_streams;    /* in streams: open or half-closed, as RFC 9113 5.1.2 counts */
    bool settings_patched; /* our first SETTINGS carries MAX_CONCURRENT_STREAMS */
    bool in_recv;          /* inside mem_recv: nghttp2 forbids mem_send */
    bool send_soon;        /* h2_send is due from the connection's event */
    bool sending;
    bool dead; /* to close once the callbacks unwind */
    uint64_t reset_window_ms;
    unsigned resets;
    unsigned empty_frames;
    unsigned continuations;
    uint64_t last_read_ms; /* bytes came from the client */
};

static void h2_send(struct h2conn *h);

/* ---------------------------------------------------------- streams */

static struct h2_stream *h2_stream_new(struct h2conn *h, int32_t id)
{
    struct h2_stream *st = calloc(1, sizeof(*st));
    if (!st) abort();
    st->h = h;
    st->id = id;
    buf_init(&st->hdrs);
    buf_init(&st->body);
    buf_init(&st->target);
    buf_init(&st->out);
    st->start_ms = clock_now_ms();
    TAILQ_INSERT_TAIL(&h->streams, st, link);
    h->n_streams++;
    return st;
}

/* The stream is gone: an attached exchange goes on alone with its bytes. */
static void h2_stream_free(struct h2_stream *st)
{
    TAILQ_REMOVE(&st->h->streams, st, link);
    st->h->n_streams--;
    if (st->ex) {
        struct exchange *ex = st->ex;
        st->ex = NULL;
        exchange_front_gone(ex, &st->hdrs, &st->body);
    }
    buf_free(&st->hdrs);
    buf_free(&st->body);
    buf_free(&st->target);
    buf_free(&st->out);
    free(st);
}

static struct h2_stream *h2_stream_of(struct h2conn *h, int32_t id)
{
    return nghttp2_session_get_stream_user_data(h->s, id);
}

/* ------------------------------------------------------ the answers */

static ssize_t h2_read_body(nghttp2_session *s, int32_t id, uint8_t *dst, size_t length,
                            uint32_t *flags, nghttp2_data_source *src, void *arg)
{
    (void)s;
    (void)id;
    (void)arg;
    struct h2_stream *st = src->ptr;
    size_t n = buf_size(&st->out);
    if (n > length) n = length;
    if (n > 0) {
        memcpy(dst, buf_data(&st->out), n);
        buf_consume(&st->out, n);
    }
    if (buf_size(&st->out) == 0) {
        if (st->ended)
            *flags |= NGHTTP2_DATA_FLAG_EOF;
        else if (n == 0)
            return NGHTTP2_ERR_DEFERRED;
    }
    return (ssize_t)n;
}

/* Connection-specific fields never go out over HTTP/2 (RFC 9113 8.2.2). */
static bool h2_forbidden(const char *n, size_t len)
{
    static const char *const names[] = {"connection",        "keep-alive", "proxy-connection",
                                        "transfer-encoding", "upgrade",    NULL};
    for (const char *const *p = names; *p; p++)
        if (strlen(*p) == len && strncasecmp(*p, n, len) == 0) return true;
    return false;
}

/* Submits a response: :status, the headers with lowercased names, a
 * content-length when known; the body through the data provider (always
 * one, so that END_STREAM waits for end(DONE) even without a body). */
static void h2_submit(struct h2_stream *st, const struct front_head *fh)
{
    nghttp2_nv nva[H2_NV_MAX];
    char status[4], length[24];
    size_t n = 0;
    snprintf(status, sizeof(status), "%03d", fh->status);
    nva[n++] = (nghttp2_nv){(uint8_t *)":status", (uint8_t *)status, 7, 3, NGHTTP2_NV_FLAG_NONE};
    struct buf names;
    buf_init(&names);
    size_t total = 0;
    for (size_t i = 0; i < fh->n_headers; i++)
        total += fh->headers[i].name_len;
    char *low = buf_reserve(&names, total + 1);
    size_t at = 0;
    for (size_t i = 0; i < fh->n_headers && n < H2_NV_MAX - 1; i++) {
        const struct front_header *hd = &fh->headers[i];
        if (h2_forbidden(hd->name, hd->name_len)) continue;
        for (size_t k = 0; k < hd->name_len; k++) {
            char c = hd->name[k];
            low[at + k] = c >= 'A' && c <= 'Z' ? (char)(c + 32) : c;
        }
        nva[n++] = (nghttp2_nv){(uint8_t *)low + at, (uint8_t *)hd->value, hd->name_len,
                                hd->value_len, NGHTTP2_NV_FLAG_NONE};
        at += hd->name_len;
    }
    if (fh->body == FRONT_BODY_LENGTH) {
        int l = snprintf(length, sizeof(length), "%llu", (unsigned long long)fh->content_length);
        nva[n++] = (nghttp2_nv){(uint8_t *)"content-length", (uint8_t *)length, 14, (size_t)l,
                                NGHTTP2_NV_FLAG_NONE};
    }
    nghttp2_data_provider prd = {.source.ptr = st, .read_callback = h2_read_body};
    st->answered = true;
    if (nghttp2_submit_response(st->h->s, st->id, nva, n, &prd) != 0)
        nghttp2_submit_rst_stream(st->h->s, NGHTTP2_FLAG_NONE, st->id, NGHTTP2_INTERNAL_ERROR);
    buf_free(&names);
}

static void h2_head(void *front, const struct front_head *fh)
{
    h2_submit(front, fh);
}

static void h2_body(void *front, const char *p, size_t n, bool hold)
{
    (void)hold; /* END_STREAM waits for end(DONE): that is the hold */
    struct h2_stream *st = front;
    buf_append(&st->out, p, n);
    nghttp2_session_resume_data(st->h->s, st->id);
}

/* Frames go out from the connection's own event, after the callbacks of
 * this turn of the loop: the answers of many streams that end together
 * (one upstream read each) leave in one write, not one write each. */
static void h2_send_soon(struct h2conn *h)
{
    if (h->send_soon || h->dead) return;
    h->send_soon = true;
    event_active(h->cl->c.ev, EV_WRITE, 0);
}

static void h2_flush(void *front)
{
    struct h2_stream *st = front;
    h2_send_soon(st->h);
}

static void h2_end(void *front, enum front_end how)
{
    struct h2_stream *st = front;
    struct h2conn *h = st->h;
    if (how == FRONT_END_HOLD) {
        h2_send_soon(h);
        return;
    }
    st->ex = NULL; /* the exchange let us go */
    if (how == FRONT_END_ABORT) {
        nghttp2_submit_rst_stream(h->s, NGHTTP2_FLAG_NONE, st->id, NGHTTP2_INTERNAL_ERROR);
    } else {
        st->ended = true;
        nghttp2_session_resume_data(h->s, st->id);
    }
    h2_send_soon(h);
}

static bool h2_backlogged(const void *front)
{
    struct h2_stream *st = (struct h2_stream *)front;
    bool full = buf_size(&st->out) > H2_STREAM_HIGH;
    if (full) st->paused = true;
    return full;
}

static const struct front_ops h2_front_ops = {
    .head = h2_head,
    .body = h2_body,
    .flush = h2_flush,
    .end = h2_end,
    .backlogged = h2_backlogged,
};

/* Our own answer to a request refused before an exchange (431, 413, 400),
 * with an access line and its count, as over HTTP/1. */
static void h2_refuse(struct h2_stream *st, enum err_code e)
{
    if (st->answered) return;
    struct loop *l = st->h->cl->loop;
    char rid[64];
    size_t rid_len = access_request_id(l, rid);
    struct front_header hs[3];
    size_t n = 0;
    hs[n++] = (struct front_header){"X-Request-Id", 12, rid, rid_len};
    struct buf body;
    buf_init(&body);
    struct front_head fh;
    char retry[12];
    int status = answer_error_head(l->cfg, NULL, e, 0, retry, &body, hs, &n, &fh);
    h2_submit(st, &fh);
    buf_append(&st->out, buf_data(&body), buf_size(&body));
    st->ended = true;
    buf_free(&body);
    struct access_fields f = {.request_id = rid,
                              .request_id_len = rid_len,
                              .status = status,
                              .outcome = OUT_REJECTED,
                              .start_ms = st->start_ms};
    struct buf b;
    if (access_begin(l->cfg, &f, &b)) access_end(&b, NULL);
}

/* ------------------------------------------------------ the requests */

static struct http1_slice h2_slice(const struct h2_stream *st, uint32_t off, uint32_t len)
{
    return (struct http1_slice){buf_data(&st->hdrs) + off, len};
}

/* The request is complete: an exchange for it, its head built in the
 * loop's scratch from the fields (pseudo-headers mapped: :method, :path
 * as the target, :authority as Host). */
static void h2_start(struct h2_stream *st)
{
    struct h2conn *h = st->h;
    struct loop *l = h->cl->loop;
    if (st->too_large || st->too_many) {
        h2_refuse(st, ERR_HEADERS_TOO_LARGE);
        return;
    }
    struct http1_head *hd = l->scratch;
    memset(hd, 0, offsetof(struct http1_head, headers));
    hd->minor_version = 1;
    hd->keep_alive = true;
    struct http1_slice authority = {NULL, 0};
    bool have_host = false;
    for (size_t i = 0; i < st->n_fields; i++) {
        const struct h2_field *f = &st->fields[i];
        struct http1_slice name = h2_slice(st, f->name, f->name_len);
        struct http1_slice value = h2_slice(st, f->value, f->value_len);
        if (name.n > 0 && name.p[0] == ':') {
            if (http1_slice_ieq(name, ":method")) hd->method = value;
            if (http1_slice_ieq(name, ":path")) hd->target = value;
            if (http1_slice_ieq(name, ":authority")) authority = value;
            continue;
        }
        if (http1_slice_ieq(name, "host")) {
            have_host = true;
            hd->host = value;
        }
        if (hd->n_headers == HTTP1_MAX_HEADERS) {
            h2_refuse(st, ERR_HEADERS_TOO_LARGE);
            return;
        }
        hd->headers[hd->n_headers++] = (struct http1_header){name, value};
    }
    if (!have_host && authority.p) {
        if (hd->n_headers == HTTP1_MAX_HEADERS) {
            h2_refuse(st, ERR_HEADERS_TOO_LARGE);
            return;
        }
        hd->host = authority;
        hd->headers[hd->n_headers++] = (struct http1_header){{"host", 4}, authority};
    }
    if (!hd->method.p || !hd->target.p || !http1_method_valid(hd->method.p, hd->method.n) ||
        (hd->host.p && !target_host_valid(hd->host.p, hd->host.n))) {
        h2_refuse(st, ERR_BAD_REQUEST);
        return;
    }
    if (buf_size(&st->body) > 0) {
        hd->body = HTTP1_BODY_LENGTH;
        hd->content_length = buf_size(&st->body);
    }
    struct front_request req = {.head = hd,
                                .body = buf_size(&st->body) ? buf_data(&st->body) : "",
                                .body_len = buf_size(&st->body),
                                .peer = h->cl->peer,
                                .tls = h->cl->tls};
    if (hd->target.n == 1 && hd->target.p[0] == '*') {
        if (!http1_slice_ieq(hd->method, "OPTIONS")) {
            h2_refuse(st, ERR_BAD_REQUEST);
            return;
        }
    } else if (!target_is_normal(hd->target.p, hd->target.n)) {
        char *out = buf_reserve(&st->target, 2 * hd->target.n + 1);
        const char *auth;
        size_t auth_len;
        long n = target_normalize(hd->target.p, hd->target.n, out, &auth, &auth_len);
        if (n < 0 || auth) { /* :path is never absolute-form */
            h2_refuse(st, ERR_BAD_REQUEST);
            return;
        }
        buf_commit(&st->target, (size_t)n);
        req.target = (struct http1_slice){buf_data(&st->target), (size_t)n};
    }
    exchange_start(l, &req, &h2_front_ops, st, &st->ex);
}

/* -------------------------------------------------- nghttp2 callbacks */

static void h2_calm_down(struct h2conn *h, const char *why)
{
    log_msg(LOG_WARN, "client %s: HTTP/2 %s: GOAWAY ENHANCE_YOUR_CALM", h->cl->peer, why);
    nghttp2_session_terminate_session(h->s, NGHTTP2_ENHANCE_YOUR_CALM);
}

static int h2_on_begin_headers(nghttp2_session *s, const nghttp2_frame *frame, void *arg)
{
    struct h2conn *h = arg;
    if (frame->hd.type != NGHTTP2_HEADERS || frame->headers.cat != NGHTTP2_HCAT_REQUEST) return 0;
    /* Over http2.max_concurrent_streams: a stream error, REFUSED_STREAM
     * (RFC 9113 5.1.2; the client may retry it), never the connection's. */
    if (h->n_streams >= (unsigned)h->cl->loop->cfg->http2.max_concurrent_streams) {
        nghttp2_submit_rst_stream(s, NGHTTP2_FLAG_NONE, frame->hd.stream_id,
                                  NGHTTP2_REFUSED_STREAM);
        return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE;
    }
    struct h2_stream *st = h2_stream_new(h, frame->hd.stream_id);
    nghttp2_session_set_stream_user_data(s, frame->hd.stream_id, st);
    return 0;
}

static int h2_on_header(nghttp2_session *s, const nghttp2_frame *frame, const uint8_t *name,
                        size_t namelen, const uint8_t *value, size_t valuelen, uint8_t flags,
                        void *arg)
{
    (void)s;
    (void)flags;
    struct h2conn *h = arg;
    struct h2_stream *st = h2_stream_of(h, frame->hd.stream_id);
    /* trailers (a second HEADERS) are dropped */
    if (!st || frame->hd.type != NGHTTP2_HEADERS || frame->headers.cat != NGHTTP2_HCAT_REQUEST)
        return 0;
    uint64_t max = h->cl->loop->cfg->limits.max_header_bytes;
    st->hdr_bytes += namelen + valuelen + 4; /* as in "name: value\r\n" */
    if (st->hdr_bytes > max) {
        st->too_large = true;
        /* a block that goes on far past the limit is an attack */
        if (st->hdr_bytes > 4 * max + 65536) return NGHTTP2_ERR_CALLBACK_FAILURE;
        return 0;
    }
    if (st->n_fields == H2_MAX_FIELDS) {
        st->too_many = true;
        return 0;
    }
    struct h2_field *f = &st->fields[st->n_fields++];
    f->name = (uint32_t)buf_size(&st->hdrs);
    f->name_len = (uint32_t)namelen;
    buf_append(&st->hdrs, name, namelen);
    f->value = (uint32_t)buf_size(&st->hdrs);
    f->value_len = (uint32_t)valuelen;
    buf_append(&st->hdrs, value, valuelen);
    return 0;
}

static int h2_on_begin_frame(nghttp2_session *s, const nghttp2_frame_hd *hd, void *arg)
{
    (void)s;
    struct h2conn *h = arg;
    if (hd->type == NGHTTP2_HEADERS) h->continuations = 0;
    if (hd->type == NGHTTP2_CONTINUATION && ++h->continuations > H2_MAX_CONTINUATIONS)
        h2_calm_down(h, "CONTINUATION flood");
    if (hd->type == NGHTTP2_DATA && hd->length == 0 && !(hd->flags & NGHTTP2_FLAG_END_STREAM) &&
        ++h->empty_frames > H2_MAX_EMPTY_FRAMES)
        h2_calm_down(h, "empty frame flood");
    return 0;
}

static int h2_on_data(nghttp2_session *s, uint8_t flags, int32_t id, const uint8_t *data,
                      size_t len, void *arg)
{
    (void)s;
    (void)flags;
    struct h2conn *h = arg;
    struct h2_stream *st = h2_stream_of(h, id);
    if (!st || st->body_too_large) return 0;
    if (buf_size(&st->body) + len > h->cl->loop->cfg->limits.max_request_body_bytes) {
        st->body_too_large = true;
        /* answered at once; the rest of the body is read and dropped */
        h2_refuse(st, ERR_PAYLOAD_TOO_LARGE);
        return 0;
    }
    buf_append(&st->body, data, len);
    return 0;
}

/* Rapid Reset: more than max_resets_per_second in one second. */
static void h2_count_reset(struct h2conn *h)
{
    uint64_t now = clock_now_ms();
    if (now - h->reset_window_ms >= 1000) {
        h->reset_window_ms = now;
        h->resets = 0;
    }
    if (++h->resets > (unsigned)h->cl->loop->cfg->http2.max_resets_per_second)
        h2_calm_down(h, "rapid reset");
}

static int h2_on_frame_recv(nghttp2_session *s, const nghttp2_frame *frame, void *arg)
{
    (void)s;
    struct h2conn *h = arg;
    if (frame->hd.type == NGHTTP2_RST_STREAM) {
        h2_count_reset(h);
        return 0;
    }
    if (frame->hd.type != NGHTTP2_HEADERS && frame->hd.type != NGHTTP2_DATA) return 0;
    struct h2_stream *st = h2_stream_of(h, frame->hd.stream_id);
    if (!st || st->ex || st->answered) return 0;
    if (frame->hd.type == NGHTTP2_HEADERS && (st->too_large || st->too_many)) {
        h2_refuse(st, ERR_HEADERS_TOO_LARGE);
        return 0;
    }
    if (frame->hd.flags & NGHTTP2_FLAG_END_STREAM) h2_start(st);
    return 0;
}

static int h2_on_stream_close(nghttp2_session *s, int32_t id, uint32_t code, void *arg)
{
    (void)code;
    struct h2conn *h = arg;
    struct h2_stream *st = h2_stream_of(h, id);
    if (!st) return 0;
    nghttp2_session_set_stream_user_data(s, id, NULL);
    h2_stream_free(st);
    return 0;
}

static nghttp2_session_callbacks *h2_callbacks(void)
{
    static nghttp2_session_callbacks *cbs;
    if (cbs) return cbs; /* set once; only read after */
    if (nghttp2_session_callbacks_new(&cbs) != 0) abort();
    nghttp2_session_callbacks_set_on_begin_headers_callback(cbs, h2_on_begin_headers);
    nghttp2_session_callbacks_set_on_header_callback(cbs, h2_on_header);
    nghttp2_session_callbacks_set_on_begin_frame_callback(cbs, h2_on_begin_frame);
    nghttp2_session_callbacks_set_on_data_chunk_recv_callback(cbs, h2_on_data);
    nghttp2_session_callbacks_set_on_frame_recv_callback(cbs, h2_on_frame_recv);
    nghttp2_session_callbacks_set_on_stream_close_callback(cbs, h2_on_stream_close);
    return cbs;
}

/* ------------------------------------------------------------- I/O */

/* nghttp2 turns a client over its advertised MAX_CONCURRENT_STREAMS into
 * a connection error once the SETTINGS are acknowledged; RFC 9113 5.1.2
 * wants a stream error. So nghttp2 is never told the limit (its own stays
 * unlimited) and h2_on_begin_headers enforces it; the value goes to the
 * client in our first SETTINGS frame, appended here as the frame leaves
 * (its ACK carries no parameters: nghttp2 matches it to what it sent). */
static void h2_patch_settings(struct h2conn *h, struct buf *out, const uint8_t *p, size_t n)
{
    h->settings_patched = true;
    size_t len = n >= 9 ? (size_t)p[0] << 16 | (size_t)p[1] << 8 | p[2] : 0;
    if (n < 9 || p[3] != NGHTTP2_SETTINGS || (p[4] & NGHTTP2_FLAG_ACK) || 9 + len > n) {
        buf_append(out, p, n); /* not the frame expected: sent as it is */
        return;
    }
    uint32_t max = (uint32_t)h->cl->loop->cfg->http2.max_concurrent_streams;
    uint8_t hdr[9], entry[6] = {0,
                                NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS,
                                (uint8_t)(max >> 24),
                                (uint8_t)(max >> 16),
                                (uint8_t)(max >> 8),
                                (uint8_t)max};
    memcpy(hdr, p, 9);
    size_t nlen = len + sizeof(entry);
    hdr[0] = (uint8_t)(nlen >> 16);
    hdr[1] = (uint8_t)(nlen >> 8);
    hdr[2] = (uint8_t)nlen;
    buf_append(out, hdr, 9);
    buf_append(out, p + 9, len);
    buf_append(out, entry, sizeof(entry));
    buf_append(out, p + 9 + len, n - 9 - len);
}

/* Frames nghttp2 has for us into the connection's output, then the
 * socket; streams that paused their upstream and drained resume it. */
static void h2_send(struct h2conn *h)
{
    if (h->in_recv || h->sending || h->dead) return;
    h->sending = true;
    struct conn *c = &h->cl->c;
    for (;;) {
        while (buf_size(&c->out) < H2_OUT_HIGH) {
            const uint8_t *data;
            ssize_t n = nghttp2_session_mem_send(h->s, &data);
            if (n < 0) {
                h->dead = true;
                break;
            }
            if (n == 0) break;
            if (!h->settings_patched)
                h2_patch_settings(h, &c->out, data, (size_t)n);
            else
                buf_append(&c->out, data, (size_t)n);
        }
        if (conn_flush(c) < 0) h->dead = true;
        h->sending = false;
        if (h->dead) break;
        /* One paused stream at a time: resuming it may send, and close
         * streams (any of them), so the list is walked again after each. */
        struct h2_stream *st;
        TAILQ_FOREACH (st, &h->streams, link)
            if (st->ex && st->paused && buf_size(&st->out) <= H2_STREAM_HIGH / 2) break;
        if (!st) break;
        st->paused = false;
        exchange_front_drained(st->ex);
        if (h->dead || h->sending || h->in_recv) return;
        h->sending = true;
    }
    /* Over, or broken: closed from the connection's own event, never from
     * inside an exchange's call. Over with bytes still to write: the
     * socket's own write event comes when it can take them (activating
     * the event meanwhile would spin the loop while the client does not
     * read). */
    if (h->dead || (!nghttp2_session_want_read(h->s) && !nghttp2_session_want_write(h->s) &&
                    buf_size(&c->out) == 0))
        event_active(c->ev, EV_WRITE, 0);
}

/* Closes the connection when it is over: nghttp2 wants nothing more and
 * everything is written, or it broke. Returns true when it closed. */
static bool h2_maybe_close(struct h2conn *h)
{
    struct conn *c = &h->cl->c;
    bool over = !nghttp2_session_want_read(h->s) && !nghttp2_session_want_write(h->s) &&
                buf_size(&c->out) == 0;
    if (!h->dead && !over && !c->err) return false;
    client_close(h->cl);
    return true;
}

static void h2_arm_timer_ms(struct h2conn *h, uint64_t ms)
{
    struct timeval tv = clock_tv(ms);
    evtimer_add(h->cl->timer, &tv);
}

static void h2_arm_timer(struct h2conn *h)
{
    h2_arm_timer_ms(h, (uint64_t)h->cl->loop->cfg->limits.client_timeout_ms);
}

void h2_conn_event(struct h2conn *h, short what)
{
    struct conn *c = &h->cl->c;
    h->send_soon = false;
    if (what & EV_WRITE) h2_send(h);
    while (!h->dead && (c->rd_ready || buf_size(&c->in) > 0)) {
        conn_fill(c, H2_FILL);
        if (buf_size(&c->in) > 0) {
            h->in_recv = true;
            ssize_t n =
                nghttp2_session_mem_recv(h->s, (const uint8_t *)buf_data(&c->in), buf_size(&c->in));
            h->in_recv = false;
            if (n < 0) {
                /* a broken connection, or one of nghttp2's own flood
                 * bounds: a last GOAWAY, then the close */
                log_msg(LOG_INFO, "client %s: HTTP/2: %s: GOAWAY", h->cl->peer,
                        nghttp2_strerror((int)n));
                nghttp2_session_terminate_session(h->s, n == NGHTTP2_ERR_CALLBACK_FAILURE ||
                                                                n == NGHTTP2_ERR_FLOODED
                                                            ? NGHTTP2_ENHANCE_YOUR_CALM
                                                            : NGHTTP2_PROTOCOL_ERROR);
                h2_send(h);
                h->dead = true;
                break;
            }
            buf_consume(&c->in, (size_t)n);
            /* the timer is not pushed back by each frame: a client that
             * trickles a request cannot postpone its 408 (h2_conn_timeout) */
            h->last_read_ms = clock_now_ms();
            if (!evtimer_pending(h->cl->timer, NULL)) h2_arm_timer(h);
        }
        h2_send(h);
        if (c->eof || c->err) {
            h->dead = true;
            break;
        }
        if (!c->rd_ready) break;
    }
    if (h2_maybe_close(h)) return;
    if (buf_size(&c->in) == 0 && buf_size(&c->out) == 0) conn_trim(c);
}

struct h2conn *h2_conn_start(struct client *cl)
{
    const struct cfg_http2 *cfg = &cl->loop->cfg->http2;
    struct h2conn *h = calloc(1, sizeof(*h));
    if (!h) abort();
    h->cl = cl;
    h->last_read_ms = clock_now_ms();
    TAILQ_INIT(&h->streams);
    nghttp2_option *opt;
    if (nghttp2_option_new(&opt) != 0) abort();
    nghttp2_option_set_max_outbound_ack(opt, H2_MAX_OUTBOUND_ACK);
    nghttp2_option_set_max_settings(opt, H2_MAX_SETTINGS);
    nghttp2_option_set_max_deflate_dynamic_table_size(opt, H2_DEFLATE_TABLE);
    int rc = nghttp2_session_server_new2(&h->s, h2_callbacks(), h, opt);
    nghttp2_option_del(opt);
    if (rc != 0) abort();
    /* MAX_CONCURRENT_STREAMS is added as the frame leaves (h2_patch_settings) */
    nghttp2_settings_entry iv[] = {
        {NGHTTP2_SETTINGS_INITIAL_WINDOW_SIZE, (uint32_t)cfg->initial_window_bytes},
        {NGHTTP2_SETTINGS_HEADER_TABLE_SIZE, H2_DEFLATE_TABLE},
        {NGHTTP2_SETTINGS_MAX_HEADER_LIST_SIZE, (uint32_t)cl->loop->cfg->limits.max_header_bytes},
    };
    nghttp2_submit_settings(h->s, NGHTTP2_FLAG_NONE, iv, sizeof(iv) / sizeof(iv[0]));
    return h;
}

void h2_conn_free(struct h2conn *h)
{
    while (!TAILQ_EMPTY(&h->streams)) {
        struct h2_stream *st = TAILQ_FIRST(&h->streams);
        nghttp2_session_set_stream_user_data(h->s, st->id, NULL);
        h2_stream_free(st);
    }
    nghttp2_session_del(h->s);
    free(h);
}

void h2_conn_drain(struct h2conn *h)
{
    nghttp2_submit_goaway(h->s, NGHTTP2_FLAG_NONE, nghttp2_session_get_last_proc_stream_id(h->s),
                          NGHTTP2_NO_ERROR, NULL, 0);
    h2_send(h);
    h2_maybe_close(h);
}

bool h2_conn_timeout(struct h2conn *h)
{
    uint64_t now = clock_now_ms(), ms = (uint64_t)h->cl->loop->cfg->limits.client_timeout_ms;
    if (TAILQ_EMPTY(&h->streams)) {
        if (now - h->last_read_ms < ms) { /* not idle that long yet */
            h2_arm_timer_ms(h, ms - (now - h->last_read_ms));
            return false;
        }
        nghttp2_session_terminate_session(h->s, NGHTTP2_NO_ERROR);
        h2_send(h);
        return true;
    }
    /* As over HTTP/1.1, client_timeout_ms bounds the time to receive a
     * whole request (408), and a client that does not take what it was
     * answered loses the stream; a stream whose exchange runs has the
     * upstream's timeouts. */
    struct h2_stream *st, *next;
    for (st = TAILQ_FIRST(&h->streams); st; st = next) {
        next = TAILQ_NEXT(st, link);
        if (st->ex) continue;
        if (!st->answered && now - st->start_ms >= ms)
            h2_refuse(st, ERR_REQUEST_TIMEOUT);
        else if (st->answered && now - st->start_ms >= 2 * ms)
            nghttp2_submit_rst_stream(h->s, NGHTTP2_FLAG_NONE, st->id, NGHTTP2_CANCEL);
    }
    h2_send(h);
    h2_arm_timer(h);
    return false;
}
