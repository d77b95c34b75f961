/* errors.h — the bodies of the errors idemgate itself generates
 * (docs/errors.md): JSON by default, RFC 9457 problem+json on request.
 *
 * Ownership: the names and types returned are static strings (never
 * freed); err_render appends to the caller's buffer (borrowed for the
 * call) and keeps nothing. */
#ifndef IDEMGATE_ERRORS_H
#define IDEMGATE_ERRORS_H

#include <stdbool.h>
#include <stdint.h>

#include "idemgate/core/buf.h"

enum err_code {
    ERR_KEY_REQUIRED,
    ERR_INVALID_KEY,
    ERR_BAD_REQUEST,
    ERR_CREDENTIALS_REQUIRED,
    ERR_INVALID_SIGNATURE,    /* 401: a webhook route's signature check failed */
    ERR_WEBHOOK_KEY_REQUIRED, /* 400: a webhook delivery without its key's header */
    ERR_WEBHOOK_KEY_INVALID,  /* 400: a webhook delivery's key: absent from the body, or bad */
    ERR_IN_PROGRESS,
    ERR_KEY_REUSE,
    ERR_PAYLOAD_TOO_LARGE,
    ERR_HEADERS_TOO_LARGE,
    ERR_NOT_IMPLEMENTED,
    ERR_VERSION,
    ERR_REQUEST_TIMEOUT,
    ERR_UPSTREAM_UNAVAILABLE,
    ERR_STORE_UNAVAILABLE,
    ERR_UPSTREAM_TIMEOUT,
    ERR_UPSTREAM_ANSWER_LOST,
    ERR_RATE_LIMITED,        /* 429: the scope's rate limit (ratelimit.requests) */
    ERR_CONCURRENCY_LIMITED, /* 429: the scope's concurrent executions (ratelimit.concurrent) */
    ERR__COUNT
};

/* The Retry-After an error's answer carries (its row in the table). */
enum err_retry {
    ERR_RETRY_NONE,
    ERR_RETRY_1S,      /* "Retry-After: 1" */
    ERR_RETRY_COMPUTED /* the seconds the caller computed (a rate limit's) */
};
enum err_retry err_retry_after(enum err_code e);

/* The HTTP status for an error; ERR_KEY_REUSE uses mismatch_status. */
int err_status(enum err_code e, int mismatch_status);
const char *err_code_name(enum err_code e);
const char *err_type(enum err_code e);
/* Appends the body to out and returns its Content-Type. The errors whose
 * message names a configured limit say it when limit is given:
 * invalid_idempotency_key (idempotency.key_max_length, characters),
 * payload_too_large (limits.max_request_body_bytes, bytes) and the 431
 * (limits.max_header_bytes, bytes): "The request body exceeds the maximum
 * of 10485760 bytes."; without it (NULL), and for every other error, the
 * generic message. limit is borrowed for the call. */
const char *err_render(enum err_code e, int status, bool problem, const uint64_t *limit,
                       struct buf *out);

#endif
