/* gcra.h — the rate limit's arithmetic (docs/configuration.md, Rate
 * limits), shared by the stores that keep a scope's rate themselves
 * (memory, LMDB; Redis runs the same rules in its script). GCRA in
 * integers: a scope's theoretical arrival time is TAT = t0 + d / n ms,
 * d counting units of 1/n ms (a request adds window_ms of them), so that
 * `requests` per window is exact. Pure functions. */
#ifndef IDEMGATE_STORE_GCRA_H
#define IDEMGATE_STORE_GCRA_H

#include <stdbool.h>
#include <stdint.h>

#include "idemgate/store/store.h"

/* A scope's rate state; all zero: none. */
struct gcra {
    uint64_t t0;    /* when d was computed */
    uint64_t d;     /* TAT - t0, in 1/n ms */
    uint64_t until; /* the state is dead from then on (TAT) */
    uint32_t n;     /* the requests per window it was computed for */
};

/* One more request at now against a->requests per a->window_ms: true
 * (it passes: reply's remaining and reset_ms set, and *next the state to
 * keep once the request is counted) or false (over the rate: reply's
 * verdict STORE_LIMIT_RATE, reset_ms and retry_ms; nothing to keep). A
 * state computed for another number of requests (a reload) is rescaled. */
bool gcra_take(const struct gcra *g, const struct store_limit_args *a, uint64_t now,
               struct store_limit_reply *reply, struct gcra *next);

#endif
