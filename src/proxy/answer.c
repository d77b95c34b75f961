/* answer.c — answers idemgate writes itself (see answer.h): our errors and
 * replays of stored records. Writes into the client's output buffer; owns
 * nothing. Whether the client is then held or let go is the exchange's
 * business (exchange_answered). */
#include "idemgate/proxy/answer.h"

#include <string.h>
#include <strings.h>
#include <sys/uio.h>

#include "idemgate/config/config.h"
#include "idemgate/http/writer.h"
#include "idemgate/idem/record.h"
#include "idemgate/proxy/client.h"
#include "idemgate/proxy/exchange.h"
#include "idemgate/proxy/loop.h"

void answer_connection(struct exchange *ex, struct buf *o)
{
    if (ex->client_close || !ex->client_keep_alive || ex->loop->draining) {
        ex->client_close = true;
        buf_append_str(o, "Connection: close\r\n");
    } else if (ex->client_minor == 0) {
        buf_append_str(o, "Connection: keep-alive\r\n");
    }
}

/* The parser's header count, which the 431's message names (errors.c). */
_Static_assert(HTTP1_MAX_HEADERS == 100, "core/errors.c says 100 header fields");

/* The limit an error names, from the configuration it was checked against
 * (idem: the request's policy, NULL for the global one). */
static uint64_t answer_limit(const struct cfg *cfg, const struct cfg_idem *idem, enum err_code e)
{
    switch (e) {
    case ERR_INVALID_KEY:
        return (uint64_t)(idem ? idem : &cfg->idem)->key_max_length;
    case ERR_PAYLOAD_TOO_LARGE:
        return cfg->limits.max_request_body_bytes;
    case ERR_HEADERS_TOO_LARGE:
        return cfg->limits.max_header_bytes;
    default:
        return 0;
    }
}

void answer_error_rest(struct buf *o, const struct cfg *cfg, const struct cfg_idem *idem,
                       enum err_code e, int status)
{
    struct buf body;
    buf_init(&body);
    uint64_t limit = answer_limit(cfg, idem, e);
    const char *ctype = err_render(e, status, cfg->error_format == CFG_ERR_PROBLEM, &limit, &body);
    http1_write_header(o, "Content-Type", 12, ctype, strlen(ctype));
    if (e == ERR_IN_PROGRESS || e == ERR_STORE_UNAVAILABLE) buf_append_str(o, "Retry-After: 1\r\n");
    http1_write_header_u64(o, "Content-Length", 14, buf_size(&body));
    buf_append(o, "\r\n", 2);
    buf_append(o, buf_data(&body), buf_size(&body));
    buf_free(&body);
}

int client_queue_error(struct client *cl, enum err_code e, const char *request_id,
                       size_t request_id_len)
{
    int status = err_status(e, 409);
    const char *reason = http1_reason(status);
    struct buf *o = conn_outbuf(&cl->c);
    http1_write_status(o, status, reason, strlen(reason));
    http1_write_header(o, "X-Request-Id", 12, request_id, request_id_len);
    buf_append_str(o, "Connection: close\r\n");
    answer_error_rest(o, cl->loop->cfg, NULL, e, status);
    return status;
}

void answer_error(struct exchange *ex, enum err_code e, bool replayed)
{
    int status = err_status(e, ex->idem_cfg ? ex->idem_cfg->mismatch_status : 409);
    ex->status = status;
    if (!ex->client) return;
    struct buf *o = conn_outbuf(&ex->client->c);
    const char *reason = http1_reason(status);
    http1_write_status(o, status, reason, strlen(reason));
    http1_write_header(o, "X-Request-Id", 12, ex->request_id, ex->request_id_len);
    if (replayed) buf_append_str(o, "Idempotent-Replayed: true\r\n");
    answer_connection(ex, o);
    answer_error_rest(o, ex->cfg, ex->idem_cfg, e, status);
    exchange_answered(ex);
}

/* The stored headers, pseudo-headers left out; a Date when none was kept
 * (a stored one would be stale, so replays carry today's). */
static void answer_replay_headers(struct buf *o, const struct record *r)
{
    bool has_date = false;
    for (size_t i = 0; i < r->n_headers; i++) {
        const struct record_header *h = &r->headers[i];
        if (h->name_len > 0 && h->name[0] == ':') continue;
        if (h->name_len == 4 && strncasecmp(h->name, "date", 4) == 0) has_date = true;
        http1_write_header(o, h->name, h->name_len, h->value, h->value_len);
    }
    if (!has_date) {
        const char *d = http1_date_now();
        http1_write_header(o, "Date", 4, d, strlen(d));
    }
}

void answer_replay(struct exchange *ex, const struct record *r)
{
    ex->status = r->status;
    struct client *cl = ex->client;
    if (!cl) return;
    struct buf *o = conn_outbuf(&cl->c);
    size_t reason_len = 0, length_len = 0;
    const char *reason = record_pseudo(r, RECORD_HDR_REASON, &reason_len);
    const char *length = record_pseudo(r, RECORD_HDR_LENGTH, &length_len);
    if (!reason) {
        reason = http1_reason(r->status);
        reason_len = strlen(reason);
    }
    http1_write_status(o, r->status, reason, reason_len);
    answer_replay_headers(o, r);
    http1_write_header(o, "X-Request-Id", 12, ex->request_id, ex->request_id_len);
    buf_append_str(o, "Idempotent-Replayed: true\r\n");
    answer_connection(ex, o);
    /* RFC 9110 8.6: no Content-Length on a 204; a 304 has no body. */
    bool body = r->status != 204 && r->status != 304;
    if (length) { /* a HEAD answer: the length it declared, no body */
        http1_write_header(o, "Content-Length", 14, length, length_len);
        body = false;
    } else if (body) {
        http1_write_header_u64(o, "Content-Length", 14, r->body_len);
    }
    buf_append(o, "\r\n", 2);
    /* Head and body in one writev, the body straight from the store's
     * reply (borrowed until we return: what is not sent is copied). */
    struct iovec iov = {(void *)r->body, (size_t)r->body_len};
    if (conn_sendv(&cl->c, &iov, body && r->body_len ? 1 : 0) < 0) {
        client_close(cl);
        return;
    }
    exchange_answered(ex);
}
