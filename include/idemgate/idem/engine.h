/* engine.h — the idempotency engine (docs/requests.md), behind a
 * small interface.
 *
 * The engine decides from a parsed request whether it is covered, validates
 * its key, computes scope and fingerprint, asks the store, and tells its
 * host what to do: forward the request, answer with an error, replay a
 * record. While the upstream works it renews the lock; when the host reports
 * how the response ended it completes (the record, or a lost record) or
 * releases the key, then says it is done. It knows no sockets and no host
 * struct: the host is a void pointer behind an ops table, as h2o's proxy
 * hands its HTTP client callbacks and the client never sees the proxy.
 *
 *   host (exchange) ──embeds──▶ struct idem ──ops──▶ host
 *                                   │
 *                                   └──env──▶ store, buffer pool (borrowed)
 *
 * Ownership: the engine owns its key copy, token, fingerprint and record
 * buffer (given back to env->bufs); the request (head, body, id) is
 * borrowed from the host for the engine's whole life; records handed to
 * ops->replay are borrowed until it returns. Every store operation in
 * flight holds the host (ops->hold / ops->release), so the host outlives
 * every callback. ops are never called from inside idem_start's caller
 * stack for a store decision (store callbacks are never synchronous), but
 * idem_start itself may call ops->forward / ops->answer at once (a request
 * that is not covered, a bad key). */
#ifndef IDEMGATE_IDEM_ENGINE_H
#define IDEMGATE_IDEM_ENGINE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "idemgate/core/buf.h"
#include "idemgate/core/errors.h"
#include "idemgate/core/metrics.h"
#include "idemgate/idem/fingerprint.h"
#include "idemgate/idem/record.h"
#include "idemgate/store/store.h"

struct cfg_idem;
struct cfg_ratelimit;
struct http1_head;

/* The engine's states, with their names (the idemgate_exchanges{state}
 * gauge's label values); idem_set_state is the one place they change,
 * checked by core/fsm.h against the table in engine.c. */
#define STATES_ENGINE(X)                                                                           \
    X(IDEM_NEW, "new")                                                                             \
    X(IDEM_ACQUIRING, "acquiring")   /* store acquire in flight */                                 \
    X(IDEM_WAITING, "waiting")       /* concurrent "wait": polling for the owner */                \
    X(IDEM_FORWARDED, "forwarded")   /* the host forwards (owner, passthrough, fail-open) */       \
    X(IDEM_COMPLETING, "completing") /* complete/release in flight */                              \
    X(IDEM_DONE, "done")

#define IDEM_STATE_ID(id, name) id,
enum idem_state { STATES_ENGINE(IDEM_STATE_ID) IDEM__COUNT };
#undef IDEM_STATE_ID

/* What becomes of the response being forwarded, decided by its head. */
enum idem_keep {
    IDEM_KEEP_UNDECIDED, /* no head yet (or not the owner) */
    IDEM_KEEP_RECORDING, /* keepable: recorded as it streams */
    IDEM_KEEP_NO         /* not kept: status, SSE or size */
};

/* How the exchange ended on the upstream's side (docs/requests.md). */
enum idem_end {
    IDEM_END_OK,         /* a complete response: kept when keepable */
    IDEM_END_FAILED,     /* never sent, or not keepable: the key is released */
    IDEM_END_UNANSWERED, /* sent, no head came: kept as lost (unknown_outcome "keep") */
    IDEM_END_LOST_HEAD,  /* the head was malformed: the upstream ran, kept as lost */
    IDEM_END_LOST_BODY   /* a keepable head, then the body was cut: kept as lost */
};

/* What the engine asks of its host. Every op gets the host pointer given
 * to idem_init. */
struct idem_host_ops {
    /* Send the request upstream; the host later reports the response with
     * idem_response_head/_body/_end. */
    void (*forward)(void *host);
    /* Answer with one of our errors (replayed: a stored lost answer, marked
     * Idempotent-Replayed; retry_s: the Retry-After the engine computed, for
     * an error whose row asks for one: a rate limit's). */
    void (*answer)(void *host, enum err_code e, bool replayed, uint32_t retry_s);
    /* Replay a stored response (r borrowed until the call returns). */
    void (*replay)(void *host, const struct record *r);
    /* The engine is finished (its store work is over): called exactly once,
     * last; the host may then end the exchange. */
    void (*done)(void *host);
    /* A store operation goes in flight / called back: keep the host alive
     * in between (reference counting). */
    void (*hold)(void *host);
    void (*release)(void *host);
    /* The engine's one timer (lock renewal, or the wait poll): fire once in
     * ms by calling idem_timer_fired; arming again replaces it. */
    void (*timer_arm)(void *host, uint32_t ms);
    void (*timer_cancel)(void *host);
};

/* What the engine runs on: one per event loop, borrowed. */
struct idem_env {
    struct store *store;
    struct buf_pool *bufs; /* the record buffer comes from here */
};

/* The key and scope a request check gave (a webhook delivery's, from the
 * delivery itself and its route: proxy/checks.c), used instead of the key
 * header and scope_headers. key NULL: there is none, answer error. */
struct idem_given {
    const char *key;
    size_t key_len;
    enum err_code error;
    char scope[SCOPE_HEX_LEN + 1];
};

/* The request, borrowed from the host for the engine's life: the parsed
 * head (its target already normalized), the body, and the request id for
 * log lines. */
struct idem_request {
    const struct http1_head *head;
    const char *body;
    size_t body_len;
    const char *id;
    size_t id_len;
    const struct cfg_ratelimit *rl; /* the request's limits (docs/configuration.md) */
    const char *peer;               /* the client's address: an anonymous request's scope */
    /* What the route's request checks found: a refusal, answered at once
     * whatever the method; a key given (NULL: the key header). */
    bool refused;
    enum err_code refusal;
    const struct idem_given *given;
};

/* The limit a request was counted against, for the RateLimit headers of
 * its answer (idem_ratelimit). */
struct idem_rl_info {
    const struct cfg_ratelimit *cfg;
    uint32_t remaining;
    uint32_t reset_s; /* rounded up, at most window_seconds */
    uint32_t retry_s; /* a 429: Retry-After */
};

/* The longest scope a limit is kept under: "ip:" and an address, or a
 * scope hash. */
#define IDEM_RL_SCOPE_MAX 80

#define IDEM_SKEY_INLINE (SCOPE_HEX_LEN + 2 + 256)

struct idem {
    enum idem_state state;
    enum metrics_outcome outcome; /* what the client got (docs/outcomes.md) */
    enum idem_keep keep;
    bool owner;        /* we hold the lock */
    bool failure_open; /* the store failed and failure_mode is "open" */
    bool replayed;     /* the answer replays a stored one */
    const struct idem_host_ops *ops;
    void *host;
    const struct idem_env *env;
    const struct cfg_idem *cfg;
    struct idem_request req;
    char *skey; /* "<scope>:<key>": skey_buf, or owned when longer; NULL when no key */
    size_t skey_len;
    char token[STORE_TOKEN_LEN + 1];
    uint8_t fp[FP_LEN];
    uint64_t wait_deadline_ms;
    uint64_t store_start_ms;
    /* the rate and concurrency limits (ratelimit) */
    const struct cfg_ratelimit *rl; /* NULL when the request is not counted */
    char rl_scope[IDEM_RL_SCOPE_MAX];
    size_t rl_scope_len;
    bool rl_answered; /* the limits' answer is in rl_reply */
    bool rl_slot;     /* we hold a concurrency slot (given back at the end) */
    struct store_limit_reply rl_reply;
    struct buf rec; /* the record being written (pooled) */
    struct record_writer rw;
    uint64_t rec_body_len;
    char skey_buf[IDEM_SKEY_INLINE]; /* last: idem_init does not clear it */
};

/* Prepares e (state NEW) for one request of host. env, ops and host are
 * borrowed for the engine's life. */
void idem_init(struct idem *e, const struct idem_env *env, const struct idem_host_ops *ops,
               void *host);
/* Starts on a complete request under policy cfg (both borrowed): answers,
 * forwards, or starts an acquire whose callback does one of those. */
void idem_start(struct idem *e, const struct cfg_idem *cfg, bool failure_open_mode,
                const struct idem_request *req);
/* The host's timer armed by ops->timer_arm fired. */
void idem_timer_fired(struct idem *e);
/* The upstream answered with this head: decides whether the response may
 * be kept and starts recording it. */
void idem_response_head(struct idem *e, const struct http1_head *rh);
/* Body bytes of the response, as delivered. */
void idem_response_body(struct idem *e, const char *p, size_t n);
/* Whether a failure of that kind keeps the key as lost: an unanswered
 * request with unknown_outcome "keep", a cut keepable answer. */
enum idem_failure {
    IDEM_FAIL_NOT_SENT,   /* no byte reached the upstream: it never ran */
    IDEM_FAIL_UNANSWERED, /* sent, no response head came */
    IDEM_FAIL_BAD_HEAD,   /* a malformed (or partial) head: the upstream ran */
    IDEM_FAIL_CUT         /* the body broke off after the head */
};
/* How the key ends after such a failure (docs/requests.md): released
 * (IDEM_END_FAILED), or kept as lost (the outcome becomes "lost" now, so
 * the answer the host queues next is logged as such). The host answers,
 * then calls idem_response_end with what this returned. */
enum idem_end idem_response_failed(struct idem *e, enum idem_failure f);
/* True, with info, when the request was counted against a rate limit:
 * its answer carries the RateLimit headers (ratelimit.headers). */
bool idem_ratelimit(const struct idem *e, struct idem_rl_info *info);
/* Read-only views for the host: whether this request holds the key's
 * lock (its answer is then held until the store has the outcome), whether
 * the engine is done, and the outcome so far (the access line's). */
bool idem_is_owner(const struct idem *e);
bool idem_is_done(const struct idem *e);
enum metrics_outcome idem_outcome(const struct idem *e);
bool idem_keeps_unanswered(const struct idem *e);
bool idem_would_keep(const struct idem *e);
/* The exchange is over from the upstream's side: completes (the record or
 * a lost record) or releases the key, then ops->done once the store is
 * done (or at once). A failed, forwarded request of an owner counts as
 * not_cached. */
void idem_response_end(struct idem *e, enum idem_end how);
/* The scope (at most 16 characters of it) and key of a keyed request, for
 * the access line; false when the request had no key. */
bool idem_scope_key(const struct idem *e, const char **scope, size_t *scope_len, const char **key,
                    size_t *key_len);
/* Frees what the engine holds (the timer is the host's). Tolerates an
 * engine that never started. */
void idem_free(struct idem *e);

#endif
