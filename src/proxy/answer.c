/* answer.c — answers idemgate writes itself (see answer.h): our errors and
 * replays of stored records, handed to the exchange's front as a head and
 * a body (the front frames them). Owns nothing. Whether the front is then
 * held or let go is the exchange's business (exchange_answered). */
#include "idemgate/proxy/answer.h"

#include <stdio.h>
#include <string.h>
#include <strings.h>

#include "idemgate/config/config.h"
#include "idemgate/http/writer.h"
#include "idemgate/idem/record.h"
#include "idemgate/proxy/exchange.h"
#include "idemgate/proxy/front.h"

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

const char *answer_error_body(const struct cfg *cfg, const struct cfg_idem *idem, enum err_code e,
                              int status, struct buf *body)
{
    uint64_t limit = answer_limit(cfg, idem, e);
    return err_render(e, status, cfg->error_format == CFG_ERR_PROBLEM, &limit, body);
}

int answer_error_head(const struct cfg *cfg, const struct cfg_idem *idem, enum err_code e,
                      uint32_t retry_s, char retry_buf[12], struct buf *body,
                      struct front_header *hs, size_t *n, struct front_head *fh)
{
    int status = err_status(e, idem ? idem->mismatch_status : 409);
    const char *ctype = answer_error_body(cfg, idem, e, status, body);
    hs[(*n)++] = (struct front_header){"Content-Type", 12, ctype, strlen(ctype)};
    /* the error's row says which Retry-After it carries */
    switch (err_retry_after(e)) {
    case ERR_RETRY_1S:
        hs[(*n)++] = (struct front_header){"Retry-After", 11, "1", 1};
        break;
    case ERR_RETRY_COMPUTED: {
        int l = snprintf(retry_buf, 12, "%u", retry_s > 0 ? retry_s : 1u);
        hs[(*n)++] = (struct front_header){"Retry-After", 11, retry_buf, (size_t)l};
        break;
    }
    case ERR_RETRY_NONE:
        break;
    }
    const char *reason = http1_reason(status);
    *fh = (struct front_head){status,        reason, strlen(reason), hs, *n, FRONT_BODY_LENGTH,
                              buf_size(body)};
    return status;
}

bool answer_ratelimit_headers(const struct exchange *ex, struct front_header *hs, size_t *n,
                              struct answer_rl *vals)
{
    struct idem_rl_info rl;
    if (!idem_ratelimit(&ex->idem, &rl) || rl.cfg->requests == 0 ||
        rl.cfg->headers == CFG_RL_HEADERS_NONE)
        return false;
    if (rl.cfg->headers == CFG_RL_HEADERS_LEGACY) {
        int a = snprintf(vals->v[0], sizeof(vals->v[0]), "%d", rl.cfg->requests);
        int b = snprintf(vals->v[1], sizeof(vals->v[1]), "%u", rl.remaining);
        int c = snprintf(vals->v[2], sizeof(vals->v[2]), "%u", rl.reset_s);
        hs[(*n)++] = (struct front_header){"RateLimit-Limit", 15, vals->v[0], (size_t)a};
        hs[(*n)++] = (struct front_header){"RateLimit-Remaining", 19, vals->v[1], (size_t)b};
        hs[(*n)++] = (struct front_header){"RateLimit-Reset", 15, vals->v[2], (size_t)c};
        return true;
    }
    /* draft-ietf-httpapi-ratelimit-headers: structured fields */
    int a = snprintf(vals->v[0], sizeof(vals->v[0]), "\"default\";q=%d;w=%d", rl.cfg->requests,
                     rl.cfg->window_seconds);
    int b =
        snprintf(vals->v[1], sizeof(vals->v[1]), "\"default\";r=%u;t=%u", rl.remaining, rl.reset_s);
    hs[(*n)++] = (struct front_header){"RateLimit-Policy", 16, vals->v[0], (size_t)a};
    hs[(*n)++] = (struct front_header){"RateLimit", 9, vals->v[1], (size_t)b};
    return true;
}

bool answer_replaces_header(const struct exchange *ex, const char *name, size_t len)
{
    static const char *const names[] = {"ratelimit-limit", "ratelimit-remaining",
                                        "ratelimit-reset", "ratelimit-policy",
                                        "ratelimit",       NULL};
    struct idem_rl_info rl;
    if (len < 9 || strncasecmp(name, "ratelimit", 9) != 0) return false;
    if (!idem_ratelimit(&ex->idem, &rl) || rl.cfg->requests == 0 ||
        rl.cfg->headers == CFG_RL_HEADERS_NONE)
        return false;
    for (const char *const *p = names; *p; p++)
        if (strlen(*p) == len && strncasecmp(*p, name, len) == 0) return true;
    return false;
}

/* Head and body to the front; the body held when the answer will be. */
static void answer_send(struct exchange *ex, const struct front_head *fh, const char *body,
                        size_t len)
{
    ex->fops->head(ex->front, fh);
    if (len) ex->fops->body(ex->front, body, len, exchange_holds(ex));
    exchange_answered(ex);
}

void answer_error(struct exchange *ex, enum err_code e, bool replayed, uint32_t retry_s)
{
    struct front_header hs[10];
    size_t n = 0;
    struct answer_rl rlv;
    char retry[12];
    hs[n++] = (struct front_header){"X-Request-Id", 12, ex->request_id, ex->request_id_len};
    if (replayed) hs[n++] = (struct front_header){"Idempotent-Replayed", 19, "true", 4};
    answer_ratelimit_headers(ex, hs, &n, &rlv);
    struct buf body;
    buf_init(&body);
    struct front_head fh;
    ex->status = answer_error_head(ex->cfg, ex->idem_cfg, e, retry_s, retry, &body, hs, &n, &fh);
    if (ex->front) answer_send(ex, &fh, buf_data(&body), buf_size(&body));
    buf_free(&body);
}

void answer_replay(struct exchange *ex, const struct record *r)
{
    ex->status = r->status;
    if (!ex->front) return;
    struct front_header hs[RECORD_MAX_HEADERS + 7];
    size_t n = 0;
    bool has_date = false;
    struct answer_rl rlv;
    /* the stored headers, pseudo-headers left out; a Date when none was
     * kept (a stored one would be stale, so replays carry today's) */
    for (size_t i = 0; i < r->n_headers && n < RECORD_MAX_HEADERS; i++) {
        const struct record_header *h = &r->headers[i];
        if (h->name_len > 0 && h->name[0] == ':') continue;
        if (answer_replaces_header(ex, h->name, h->name_len)) continue;
        if (h->name_len == 4 && strncasecmp(h->name, "date", 4) == 0) has_date = true;
        hs[n++] = (struct front_header){h->name, h->name_len, h->value, h->value_len};
    }
    if (!has_date) {
        const char *d = http1_date_now();
        hs[n++] = (struct front_header){"Date", 4, d, strlen(d)};
    }
    hs[n++] = (struct front_header){"X-Request-Id", 12, ex->request_id, ex->request_id_len};
    hs[n++] = (struct front_header){"Idempotent-Replayed", 19, "true", 4};
    answer_ratelimit_headers(ex, hs, &n, &rlv);
    size_t reason_len = 0, length_len = 0;
    const char *reason = record_pseudo(r, RECORD_HDR_REASON, &reason_len);
    const char *length = record_pseudo(r, RECORD_HDR_LENGTH, &length_len);
    if (!reason) {
        reason = http1_reason(r->status);
        reason_len = strlen(reason);
    }
    struct front_head fh = {r->status, reason, reason_len, hs, n, FRONT_BODY_NONE, 0};
    /* RFC 9110 8.6: no Content-Length on a 204; a 304 has no body. */
    bool body = r->status != 204 && r->status != 304;
    if (length) { /* a HEAD answer: the length it declared, no body */
        hs[fh.n_headers++] = (struct front_header){"Content-Length", 14, length, length_len};
        body = false;
    } else if (body) {
        fh.body = FRONT_BODY_LENGTH;
        fh.content_length = r->body_len;
    }
    /* the body straight from the store's reply (borrowed until we return:
     * what the front does not send at once it copies) */
    answer_send(ex, &fh, (const char *)r->body, body ? (size_t)r->body_len : 0);
}
