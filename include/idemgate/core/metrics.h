/* metrics.h — every metric of /metrics (docs/metrics.md), declared once.
 *
 * METRICS(X) is the one list: a row per metric with its id, kind
 * (COUNTER, GAUGE, HISTOGRAM), group, Prometheus name, label set and help
 * text. It generates enum metrics_id, the names and the exposition, the
 * way twemproxy's STATS_POOL_CODEC does. Label sets are X-lists too
 * (OUTCOMES, RELOAD_RESULTS, ...), each generating its enum and names, so
 * an outcome has its name in exactly one place. The state lists of the
 * state machines live with their modules (core/fsm.h): their gauges get
 * the names at start (metrics_state_names).
 *
 * Values are process-wide, updated with relaxed atomics from every thread
 * (counts, not synchronisation). Nothing here allocates; metrics_render
 * appends to a buffer its caller owns. */
#ifndef IDEMGATE_METRICS_H
#define IDEMGATE_METRICS_H

#include <stdint.h>

#include "idemgate/core/buf.h"

/* ---------------------------------------------------------- label sets */

/* X(id, label value) */

/* Which kind of answer the client got: idemgate_requests_total{outcome=...}. */
#define OUTCOMES(X)                                                                                \
    X(OUT_PASSTHROUGH, "passthrough")                                                              \
    X(OUT_EXECUTED, "executed")                                                                    \
    X(OUT_REPLAYED, "replayed")                                                                    \
    X(OUT_IN_PROGRESS, "in_progress")                                                              \
    X(OUT_MISMATCH, "mismatch")                                                                    \
    X(OUT_REJECTED, "rejected")                                                                    \
    X(OUT_NOT_CACHED, "not_cached")                                                                \
    X(OUT_STORE_ERROR, "store_error")                                                              \
    X(OUT_LOST, "lost")                 /* the upstream ran, its answer was lost: kept as lost */  \
    X(OUT_RATE_LIMITED, "rate_limited") /* 429: the scope's rate or concurrency limit */

/* A memory store entry: a lock or a completed record. */
#define STATES_MEMORY_ENTRY(X)                                                                     \
    X(METRICS_ENTRY_IN_PROGRESS, "in_progress")                                                    \
    X(METRICS_ENTRY_COMPLETED, "completed")

/* Why a request was refused 429: idemgate_ratelimited_total{reason=...}. */
#define RATELIMIT_REASONS(X)                                                                       \
    X(METRICS_RL_RATE, "rate")                                                                     \
    X(METRICS_RL_CONCURRENCY, "concurrency")

/* How a reload went: idemgate_reloads_total{result=...}. */
#define RELOAD_RESULTS(X)                                                                          \
    X(METRICS_RELOAD_OK, "ok")                                                                     \
    X(METRICS_RELOAD_FAILED, "failed")

/* What a webhook route's signature check found:
 * idemgate_webhook_verifications_total{result=...}. */
#define WEBHOOK_RESULTS(X)                                                                         \
    X(METRICS_WEBHOOK_VALID, "valid")                                                              \
    X(METRICS_WEBHOOK_INVALID, "invalid")

#define METRICS_LABEL_ID(id, value) id,
enum metrics_outcome { OUTCOMES(METRICS_LABEL_ID) OUT__COUNT };
enum metrics_entry_state { STATES_MEMORY_ENTRY(METRICS_LABEL_ID) METRICS_ENTRY__COUNT };
enum metrics_reload_result { RELOAD_RESULTS(METRICS_LABEL_ID) METRICS_RELOAD__COUNT };
enum metrics_rl_reason { RATELIMIT_REASONS(METRICS_LABEL_ID) METRICS_RL__COUNT };
enum metrics_webhook_result { WEBHOOK_RESULTS(METRICS_LABEL_ID) METRICS_WEBHOOK__COUNT };
#undef METRICS_LABEL_ID

/* The most states a state machine's gauge may have (core/fsm.h). */
#define METRICS_STATES_MAX 8

/* X(id, label name, values list, number of values); NONE: no label. A
 * state machine's set has no list here (METRICS_NO_VALUES) but room for
 * METRICS_STATES_MAX values, named at start by its module. */
#define METRICS_LABEL_SETS(X)                                                                      \
    X(NONE, NULL, METRICS_NO_VALUES, 0)                                                            \
    X(OUTCOME, "outcome", OUTCOMES, OUT__COUNT)                                                    \
    X(ENGINE_STATE, "state", METRICS_NO_VALUES, METRICS_STATES_MAX)                                \
    X(EXCHANGE_STATE, "state", METRICS_NO_VALUES, METRICS_STATES_MAX)                              \
    X(CLIENT_STATE, "state", METRICS_NO_VALUES, METRICS_STATES_MAX)                                \
    X(ENTRY_STATE, "state", STATES_MEMORY_ENTRY, METRICS_ENTRY__COUNT)                             \
    X(RELOAD_RESULT, "result", RELOAD_RESULTS, METRICS_RELOAD__COUNT)                              \
    X(RL_REASON, "reason", RATELIMIT_REASONS, METRICS_RL__COUNT)                                   \
    X(WEBHOOK_RESULT, "result", WEBHOOK_RESULTS, METRICS_WEBHOOK__COUNT)                           \
    X(SERIES, "upstream", METRICS_NO_VALUES, 0) /* upstream, server: from the series callback */
#define METRICS_NO_VALUES(X)

/* Where each state machine's list is (for scripts/check-docs and readers;
 * never expanded by the compiler): X(label set, header, list). */
#define METRICS_STATE_LISTS(X)                                                                     \
    X(ENGINE_STATE, "include/idemgate/idem/engine.h", STATES_ENGINE)                               \
    X(EXCHANGE_STATE, "include/idemgate/proxy/exchange.h", STATES_EXCHANGE)                        \
    X(CLIENT_STATE, "include/idemgate/proxy/client.h", STATES_CLIENT)

/* ------------------------------------------------------------ the list */

/* Groups: ALWAYS is rendered by metrics_render; MEMORY_STORE rows are the
 * memory store's table and LMDB_STORE rows the LMDB store's environment,
 * set (metrics_set) and rendered by the admin listener only when that
 * store is in use. */
enum metrics_group {
    METRICS_GROUP_ALWAYS = 1u << 0,
    METRICS_GROUP_MEMORY_STORE = 1u << 1,
    METRICS_GROUP_LMDB_STORE = 1u << 2
};

/* X(id, kind, group, name, label set, help), in exposition order. */
#define METRICS(X)                                                                                 \
    X(M_REQUESTS, COUNTER, ALWAYS, "idemgate_requests_total", OUTCOME,                             \
      "Requests by idempotency outcome.")                                                          \
    X(M_LOCK_RENEWALS, COUNTER, ALWAYS, "idemgate_lock_renewals_total", NONE,                      \
      "Lock renewals that succeeded.")                                                             \
    X(M_STORE_ERRORS, COUNTER, ALWAYS, "idemgate_store_errors_total", NONE,                        \
      "Store operations that failed, timed out or were refused.")                                  \
    X(M_OPEN_FORWARDS, COUNTER, ALWAYS, "idemgate_store_failopen_total", NONE,                     \
      "Requests forwarded without idempotency because the store failed (failure_mode open).")      \
    X(M_STORE_EVICTIONS, COUNTER, ALWAYS, "idemgate_store_evictions_total", NONE,                  \
      "Completed records evicted from the memory or LMDB store to make room.")                     \
    X(M_CONNECTIONS_ACTIVE, GAUGE, ALWAYS, "idemgate_connections_active", NONE,                    \
      "Open client connections.")                                                                  \
    X(M_CLIENT_CONNECTIONS, GAUGE, ALWAYS, "idemgate_client_connections", CLIENT_STATE,            \
      "Client connections by transport state.")                                                    \
    X(M_EXCHANGES, GAUGE, ALWAYS, "idemgate_exchanges", ENGINE_STATE,                              \
      "Exchanges alive, by the idempotency engine's state.")                                       \
    X(M_EXCHANGES_UPSTREAM, GAUGE, ALWAYS, "idemgate_exchanges_upstream", EXCHANGE_STATE,          \
      "Exchanges alive, by the state of their upstream side.")                                     \
    X(M_UPSTREAM_DURATION, HISTOGRAM, ALWAYS, "idemgate_upstream_duration_seconds", NONE,          \
      "Upstream request duration.")                                                                \
    X(M_STORE_DURATION, HISTOGRAM, ALWAYS, "idemgate_store_duration_seconds", NONE,                \
      "Store operation duration.")                                                                 \
    X(M_UPSTREAM_SERVER_UP, GAUGE, ALWAYS, "idemgate_upstream_server_up", SERIES,                  \
      "1 while an upstream server is up, 0 while failures keep it down (labels upstream, "         \
      "server).")                                                                                  \
    X(M_UPSTREAM_FAILURES, COUNTER, ALWAYS, "idemgate_upstream_failures_total", SERIES,            \
      "Upstream failures: refused, timed out, TLS failed, broken, unanswered or cut "              \
      "(labels upstream, server).")                                                                \
    X(M_UPSTREAM_RETRIES, COUNTER, ALWAYS, "idemgate_upstream_retries_total", NONE,                \
      "Requests sent to another server of their group after a failure before any byte was "        \
      "written.")                                                                                  \
    X(M_RATELIMITED, COUNTER, ALWAYS, "idemgate_ratelimited_total", RL_REASON,                     \
      "Requests refused 429 by a scope's rate or concurrency limit, by reason.")                   \
    X(M_RELOADS, COUNTER, ALWAYS, "idemgate_reloads_total", RELOAD_RESULT,                         \
      "Configuration reloads (SIGHUP, POST /-/reload), by result.")                                \
    X(M_WEBHOOK_VERIFICATIONS, COUNTER, ALWAYS, "idemgate_webhook_verifications_total",            \
      WEBHOOK_RESULT, "Signature checks of requests on webhook routes, by result.")                \
    X(M_MEMORY_STORE_BYTES, GAUGE, MEMORY_STORE, "idemgate_memory_store_bytes", NONE,              \
      "Bytes charged to the memory store.")                                                        \
    X(M_MEMORY_STORE_MAX_BYTES, GAUGE, MEMORY_STORE, "idemgate_memory_store_max_bytes", NONE,      \
      "memory.max_bytes: the memory store's bound (1 MiB to 64 GiB).")                             \
    X(M_MEMORY_STORE_ENTRIES, GAUGE, MEMORY_STORE, "idemgate_memory_store_entries", ENTRY_STATE,   \
      "Keys held, by state.")                                                                      \
    X(M_MEMORY_STORE_REFUSED, COUNTER, MEMORY_STORE, "idemgate_memory_store_refused_total", NONE,  \
      "Operations refused: only locks left.")                                                      \
    X(M_MEMORY_STORE_MAX_SCOPE_BYTES, GAUGE, MEMORY_STORE,                                         \
      "idemgate_memory_store_max_scope_bytes", NONE, "memory.max_scope_bytes (0: none).")          \
    X(M_MEMORY_STORE_SCOPES, GAUGE, MEMORY_STORE, "idemgate_memory_store_scopes", NONE,            \
      "Scopes (credentials) holding an entry.")                                                    \
    X(M_LMDB_STORE_BYTES, GAUGE, LMDB_STORE, "idemgate_lmdb_store_bytes", NONE,                    \
      "Bytes charged to the LMDB store (every process on its path).")                              \
    X(M_LMDB_STORE_FILE_BYTES, GAUGE, LMDB_STORE, "idemgate_lmdb_store_file_bytes", NONE,          \
      "Bytes of LMDB pages in use, up to the last page written.")                                  \
    X(M_LMDB_STORE_MAX_BYTES, GAUGE, LMDB_STORE, "idemgate_lmdb_store_max_bytes", NONE,            \
      "lmdb.max_bytes: the LMDB map size.")                                                        \
    X(M_LMDB_STORE_ENTRIES, GAUGE, LMDB_STORE, "idemgate_lmdb_store_entries", ENTRY_STATE,         \
      "Keys held in the LMDB store, by state.")                                                    \
    X(M_LMDB_STORE_REFUSED, COUNTER, LMDB_STORE, "idemgate_lmdb_store_refused_total", NONE,        \
      "LMDB store operations refused: only locks left (every process on its path).")               \
    X(M_LMDB_STORE_SCOPES, GAUGE, LMDB_STORE, "idemgate_lmdb_store_scopes", NONE,                  \
      "Scopes (credentials) holding an entry in the LMDB store.")

enum metrics_id {
#define METRICS_ID(id, kind, group, name, labels, help) id,
    METRICS(METRICS_ID)
#undef METRICS_ID
        M__COUNT
};

/* The per-state gauges that metrics_state_move keeps: X(set, metric); the
 * metric's label set lists the states. */
#define METRICS_GAUGE_SETS(X)                                                                      \
    X(METRICS_SET_ENGINE, M_EXCHANGES)                                                             \
    X(METRICS_SET_EXCHANGE, M_EXCHANGES_UPSTREAM)                                                  \
    X(METRICS_SET_CLIENT, M_CLIENT_CONNECTIONS)

enum metrics_gauge_set {
#define METRICS_SET_ID(set, metric) set,
    METRICS_GAUGE_SETS(METRICS_SET_ID)
#undef METRICS_SET_ID
        METRICS_SET__COUNT
};

/* ----------------------------------------------------------- updating */

/* Out-of-range ids, labels and states are ignored (never a crash for a
 * count); a histogram id is ignored by all but metrics_observe. */

/* +1 on an unlabeled counter: metrics_inc(M_STORE_ERRORS). */
void metrics_inc(enum metrics_id id);
/* delta on one label value of a counter or gauge (label: its set's enum;
 * 0 for an unlabeled metric). */
void metrics_add(enum metrics_id id, int label, long long delta);
/* Sets a value read from elsewhere (the memory store's gauges). */
void metrics_set(enum metrics_id id, int label, long long value);
/* The current value (tests, and whoever needs to read one back). */
long long metrics_value(enum metrics_id id, int label);
/* One observation of a HISTOGRAM metric, in milliseconds. */
void metrics_observe(enum metrics_id id, uint64_t ms);

/* An object moves from state `from` to state `to` of set: -1 as from for
 * one just created, -1 as to for one being freed. The two counters move
 * one after the other, so a scrape may see the object in neither. */
void metrics_state_move(enum metrics_gauge_set set, int from, int to);
/* Names the n states of set's gauge (n at most METRICS_STATES_MAX; the
 * array is borrowed for the process's life): core/fsm.h does it at start,
 * before /metrics is served. Until then the gauge has no samples. */
void metrics_state_names(enum metrics_gauge_set set, const char *const *names, int n);
/* The label value of a state of set ("acquiring"), "unknown" if none. */
const char *metrics_state_name(enum metrics_gauge_set set, int state);

/* Shorthands kept for their callers. */
void metrics_outcome(enum metrics_outcome outcome); /* idemgate_requests_total */
/* The name of an outcome (docs/outcomes.md) ("executed", ...), "unknown" if none. */
const char *metrics_outcome_name(int outcome);
void metrics_observe_store(uint64_t ms);
void metrics_observe_upstream(uint64_t ms);
void metrics_connections(int delta); /* idemgate_connections_active */

/* ---------------------------------------------------------- rendering */

/* Appends the Prometheus text exposition (HELP, TYPE, values) of the rows
 * whose group is in groups (METRICS_GROUP_* bits), in list order. */
void metrics_render_groups(struct buf *out, unsigned groups);
/* metrics_render_groups(out, METRICS_GROUP_ALWAYS). */
void metrics_render(struct buf *out);
/* The samples of the rows whose label set is SERIES (labels known only at
 * run time: the upstream groups' servers) come from fn, called with the
 * row's id and name after its HELP and TYPE lines; set once at start,
 * before any render (NULL: no samples). */
typedef void metrics_series_fn(struct buf *out, enum metrics_id id, const char *name);
void metrics_set_series(metrics_series_fn *fn);

#endif
