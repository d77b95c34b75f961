/* access.h — the access line and the requests counter (docs/logs.md,
 * docs/metrics.md): one line and one idemgate_requests_total{outcome} count per
 * answer idemgate gives, whether an exchange gave it (exchange.c) or the
 * client refused a request before any exchange existed (client.c: 400,
 * 408, 413, 431, 501, 505, outcome "rejected"); and the request ids of
 * both.
 *
 * Ownership: everything passed in is borrowed for the call. A line is
 * built in the thread's log scratch (core/log.h) between access_begin and
 * access_end; nothing is kept. */
#ifndef IDEMGATE_PROXY_ACCESS_H
#define IDEMGATE_PROXY_ACCESS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "idemgate/core/buf.h"
#include "idemgate/core/metrics.h"
#include "idemgate/http/http1.h"

struct cfg;
struct loop;

/* The fields every access line has. target is the request's (the path is
 * what precedes a '?'); method and target may be empty when the request
 * line could not be read. */
struct access_fields {
    const char *request_id;
    size_t request_id_len;
    struct http1_slice method, target;
    int status;
    enum metrics_outcome outcome;
    uint64_t start_ms; /* on the monotonic clock: duration_ms is measured from it */
    uint64_t upstream_ms;
};

/* Counts f->outcome in idemgate_requests_total and, when access lines are
 * on (log.access, level info), starts the line in *b (msg, request_id,
 * method, path, status, outcome, duration_ms, upstream_ms) and returns
 * true: the caller may add fields (log_kv_*), then calls access_end.
 * Returns false, and b is untouched, when no line is written. */
bool access_begin(const struct cfg *cfg, const struct access_fields *f, struct buf *b);
/* Adds trace_id (from a valid W3C traceparent of h; h may be NULL) and
 * writes the line. */
void access_end(struct buf *b, const struct http1_head *h);

/* A new request id of the loop, "<boot:8>-<worker:4>-<counter:12>" in
 * hex, into out (NUL-terminated); returns its length. */
size_t access_request_id(struct loop *l, char out[64]);

#endif
