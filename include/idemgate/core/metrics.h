/* metrics.h — process-wide counters and histograms (SPEC section 7),
 * declared once in an X-macro list with their help text. Updated with
 * relaxed atomics from every worker; rendered as Prometheus text. */
#ifndef IDEMGATE_METRICS_H
#define IDEMGATE_METRICS_H

#include <stdint.h>

#include "idemgate/core/buf.h"

/* name, help */
#define METRICS_COUNTERS(X)                                                                        \
    X(M_LOCK_RENEWALS, "idemgate_lock_renewals_total", "Lock renewals that succeeded.")            \
    X(M_STORE_ERRORS, "idemgate_store_errors_total",                                               \
      "Store operations that failed, timed out or were refused.")                                  \
    X(M_OPEN_FORWARDS, "idemgate_store_failopen_total",                                            \
      "Requests forwarded without idempotency because the store failed (failure_mode open).")      \
    X(M_STORE_EVICTIONS, "idemgate_store_evictions_total",                                         \
      "Completed records evicted from the memory store to make room.")

enum metrics_counter {
#define METRICS_ENUM(id, name, help) id,
    METRICS_COUNTERS(METRICS_ENUM)
#undef METRICS_ENUM
        M__COUNT
};

/* Which kind of answer a request got (SPEC section 7 outcomes), in the
 * order of their names in metrics.c. */
enum ex_outcome {
    OUT_PASSTHROUGH,
    OUT_EXECUTED,
    OUT_REPLAYED,
    OUT_IN_PROGRESS,
    OUT_MISMATCH,
    OUT_REJECTED,
    OUT_NOT_CACHED,
    OUT_STORE_ERROR,
    OUT_LOST /* the upstream ran, its answer was lost: kept as lost */
};

void metrics_inc(enum metrics_counter c);
/* outcome: index into the outcome names of exchange.h (enum ex_outcome). */
void metrics_outcome(int outcome);
/* The SPEC name of an outcome ("executed", ...), the one table of them. */
const char *metrics_outcome_name(int outcome);
void metrics_observe_store(uint64_t ms);
void metrics_observe_upstream(uint64_t ms);
void metrics_connections(int delta);
/* Appends the Prometheus text exposition. */
void metrics_render(struct buf *out);

#endif
