/* errors.c — the error bodies (docs/errors.md). Owns only static tables. */
#include "idemgate/core/errors.h"

#include <stdio.h>
#include <string.h>

struct err_def {
    int status;
    const char *type;
    const char *code;
    const char *title;
    const char *message;
    enum err_retry retry; /* the Retry-After it carries */
};

static const struct err_def err_defs[ERR__COUNT] = {
    [ERR_KEY_REQUIRED] = {400, "invalid_request_error", "idempotency_key_required",
                          "Idempotency-Key required",
                          "This endpoint requires an Idempotency-Key header.", ERR_RETRY_NONE},
    [ERR_INVALID_KEY] = {400, "invalid_request_error", "invalid_idempotency_key",
                         "Invalid Idempotency-Key",
                         "The Idempotency-Key header must appear once and hold 1 to the maximum "
                         "length of visible ASCII characters.",
                         ERR_RETRY_NONE},
    [ERR_BAD_REQUEST] = {400, "invalid_request_error", "bad_request", "Bad request",
                         "The request is not valid HTTP/1.1.", ERR_RETRY_NONE},
    [ERR_CREDENTIALS_REQUIRED] = {401, "invalid_request_error", "credentials_required",
                                  "Credentials required",
                                  "Requests with an Idempotency-Key must carry credentials.",
                                  ERR_RETRY_NONE},
    [ERR_INVALID_SIGNATURE] = {401, "invalid_request_error", "invalid_signature",
                               "Invalid signature",
                               "The webhook delivery's signature is missing, wrong or too old.",
                               ERR_RETRY_NONE},
    [ERR_WEBHOOK_KEY_REQUIRED] = {400, "invalid_request_error", "idempotency_key_required",
                                  "Webhook key required",
                                  "The delivery lacks the header its idempotency key comes from.",
                                  ERR_RETRY_NONE},
    [ERR_WEBHOOK_KEY_INVALID] = {400, "invalid_request_error", "invalid_idempotency_key",
                                 "Invalid webhook key",
                                 "The delivery's idempotency key is missing from its body, not a "
                                 "string or an integer, or not 1 to the maximum length of visible "
                                 "ASCII characters.",
                                 ERR_RETRY_NONE},
    [ERR_IN_PROGRESS] = {409, "idempotency_error", "request_in_progress", "Request in progress",
                         "A request with this Idempotency-Key is still being processed; retry "
                         "shortly.",
                         ERR_RETRY_1S},
    [ERR_KEY_REUSE] = {409, "idempotency_error", "idempotency_key_reuse", "Idempotency-Key reused",
                       "This Idempotency-Key was already used with a different request.",
                       ERR_RETRY_NONE},
    [ERR_PAYLOAD_TOO_LARGE] = {413, "invalid_request_error", "payload_too_large",
                               "Payload too large",
                               "The request body exceeds the configured maximum size.",
                               ERR_RETRY_NONE},
    [ERR_HEADERS_TOO_LARGE] = {431, "invalid_request_error", "bad_request",
                               "Request header fields too large",
                               "The request head exceeds the configured maximum size.",
                               ERR_RETRY_NONE},
    [ERR_NOT_IMPLEMENTED] = {501, "invalid_request_error", "bad_request", "Not implemented",
                             "The request's transfer coding is not supported.", ERR_RETRY_NONE},
    [ERR_VERSION] = {505, "invalid_request_error", "bad_request", "HTTP version not supported",
                     "Only HTTP/1.0 and HTTP/1.1 are supported.", ERR_RETRY_NONE},
    [ERR_REQUEST_TIMEOUT] = {408, "invalid_request_error", "bad_request", "Request timeout",
                             "The request was not received in time.", ERR_RETRY_NONE},
    [ERR_UPSTREAM_UNAVAILABLE] = {502, "api_error", "upstream_unavailable", "Upstream unavailable",
                                  "The upstream could not be reached.", ERR_RETRY_NONE},
    [ERR_STORE_UNAVAILABLE] = {503, "api_error", "store_unavailable", "Store unavailable",
                               "The idempotency store is unavailable; retry shortly.",
                               ERR_RETRY_1S},
    [ERR_UPSTREAM_TIMEOUT] = {504, "api_error", "upstream_timeout", "Upstream timeout",
                              "The upstream did not answer in time.", ERR_RETRY_NONE},
    [ERR_UPSTREAM_ANSWER_LOST] = {502, "api_error", "upstream_answer_lost", "Upstream answer lost",
                                  "The upstream ran this request but its answer was lost; it will "
                                  "not be executed again with this Idempotency-Key.",
                                  ERR_RETRY_NONE},
    [ERR_RATE_LIMITED] = {429, "rate_limit_error", "rate_limit_exceeded", "Rate limit exceeded",
                          "Too many requests for this credential; retry after the time "
                          "Retry-After gives.",
                          ERR_RETRY_COMPUTED},
    [ERR_CONCURRENCY_LIMITED] = {429, "rate_limit_error", "concurrency_limit_exceeded",
                                 "Concurrency limit exceeded",
                                 "Too many requests of this credential are running at once; "
                                 "retry shortly.",
                                 ERR_RETRY_1S},
};

/* The messages of the errors that name a configured limit, said when the
 * caller gives it (one %llu): key_max_length, max_request_body_bytes,
 * max_header_bytes (100 is the parser's HTTP1_MAX_HEADERS; proxy/answer.c
 * asserts it). */
static const char *const err_limit_messages[ERR__COUNT] = {
    [ERR_INVALID_KEY] = "The Idempotency-Key header must appear once and hold 1 to %llu visible "
                        "ASCII characters.",
    [ERR_PAYLOAD_TOO_LARGE] = "The request body exceeds the maximum of %llu bytes.",
    [ERR_HEADERS_TOO_LARGE] = "The request head exceeds the maximum of %llu bytes or of 100 "
                              "header fields.",
};

int err_status(enum err_code e, int mismatch_status)
{
    if (e == ERR_KEY_REUSE && mismatch_status) return mismatch_status;
    return err_defs[e].status;
}

enum err_retry err_retry_after(enum err_code e)
{
    return (unsigned)e < ERR__COUNT ? err_defs[e].retry : ERR_RETRY_NONE;
}

const char *err_code_name(enum err_code e)
{
    return err_defs[e].code;
}

const char *err_type(enum err_code e)
{
    return err_defs[e].type;
}

const char *err_render(enum err_code e, int status, bool problem, const uint64_t *limit,
                       struct buf *out)
{
    const struct err_def *d = &err_defs[e];
    const char *message = d->message;
    char with_limit[160];
    if (limit && err_limit_messages[e]) {
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wformat-nonliteral"
        snprintf(with_limit, sizeof with_limit, err_limit_messages[e], (unsigned long long)*limit);
#pragma GCC diagnostic pop
        message = with_limit;
    }
    if (problem) {
        buf_printf(out,
                   "{\"type\": \"https://idemgate.dev/errors/%s\", \"title\": \"%s\", "
                   "\"status\": %d, \"detail\": \"%s\", \"code\": \"%s\"}",
                   d->code, d->title, status, message, d->code);
        return "application/problem+json";
    }
    buf_printf(out, "{\"error\": {\"type\": \"%s\", \"code\": \"%s\", \"message\": \"%s\"}}",
               d->type, d->code, message);
    return "application/json";
}
