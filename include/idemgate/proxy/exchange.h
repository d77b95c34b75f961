/* exchange.h — one request's life: from a complete request on a front (an
 * HTTP/1 connection or an HTTP/2 stream, proxy/front.h) to the end of its
 * answer and of the engine's store work, whether the client stayed or not.
 * The exchange is the engine's host (idem/engine.h): it embeds a struct
 * idem and implements its ops (forward through relay.c, answers and
 * replays through answer.c); it talks to its front only through the
 * front's ops.
 *
 *   front ──(attached, 1 ref)──▶ exchange ──(1 ref while in use)──▶ upconn
 *                                   │  └─embeds─▶ struct idem
 *                                   └──(1 ref per store op in flight, via ops->hold)
 *
 * Ownership: the exchange owns the request bytes once its front leaves
 * (exchange_front_gone hands them over), its normalized target, its
 * upstream connection while in use, its timers and its engine. The last reference
 * frees it (exchange_unref), so a client that disconnects only detaches:
 * the upstream answer is still read and kept. Freed exchanges are cached
 * by the loop, timers included. */
#ifndef IDEMGATE_PROXY_EXCHANGE_H
#define IDEMGATE_PROXY_EXCHANGE_H

#include <stdbool.h>
#include <stdint.h>

#include "idemgate/core/buf.h"
#include "idemgate/core/metrics.h"
#include "idemgate/http/http1.h"
#include "idemgate/idem/engine.h"
#include "idemgate/proxy/front.h"

struct loop;
struct client;
struct event;
struct upconn;
struct cfg_idem;
struct cfg_url;
struct upstream_group;
struct loop_gen;
struct upstream_server;

/* The exchange's transport state (the engine has its own), with its names
 * (the idemgate_exchanges_upstream{state} gauge's label values);
 * exchange_set_state is the one place it changes, checked by core/fsm.h
 * against the table in exchange.c. */
#define STATES_EXCHANGE(X)                                                                         \
    X(EX_NEW, "new")               /* the engine decides (acquire, wait) */                        \
    X(EX_FORWARDING, "forwarding") /* upstream request in flight, no response head yet */          \
    X(EX_STREAMING, "streaming")   /* response head sent to the client, body flowing */            \
    X(EX_ENDED, "ended")           /* the upstream side is over; the engine finishes */            \
    X(EX_DONE, "done")             /* the engine is done too: only references are left */

#define EX_STATE_ID(id, name) id,
enum ex_state { STATES_EXCHANGE(EX_STATE_ID) EX__COUNT };
#undef EX_STATE_ID

/* Servers one request may try (retries beyond this are not taken). */
#define EXCHANGE_MAX_TRIES 16

struct exchange {
    int refs;
    enum ex_state state;
    struct loop *loop;
    struct loop_gen *gen;         /* the generation it started on (a reference, to its end) */
    const struct cfg *cfg;        /* gen->cfg */
    void *front;                  /* NULL once detached */
    const struct front_ops *fops; /* the front's */
    struct idem idem;             /* the engine, host = this exchange */

    /* the request (slices into req, or into the client's buffer while it is
     * attached) */
    struct buf req; /* owns the request head (and a Content-Length body) once detached */
    struct http1_head head;
    const char *body;
    size_t body_len;
    struct buf body_buf;          /* a de-chunked request body */
    struct buf target;            /* a normalized target (head.target points here), or empty */
    struct http1_slice authority; /* an absolute-form target's: replaces Host */
    bool front_tls;               /* the request came over TLS */
    char peer[64];                /* the client's address, kept if the client leaves */
    char request_id[64];
    size_t request_id_len;
    bool request_id_from_client;
    const struct cfg_idem *idem_cfg;
    struct upstream_group *group;   /* the route's */
    struct upstream_server *server; /* picked for the current try, or NULL */
    struct upstream_server *tried[EXCHANGE_MAX_TRIES];
    unsigned tries;          /* servers tried (tried[0..tries)) */
    bool server_reported;    /* upstream_report was called for server */
    const char *server_addr; /* the last server's "host:port", for the access line */
    uint64_t start_ms;
    int status;               /* status sent to the client */
    bool logged;              /* the access line was written (and the outcome counted) */
    struct event *idem_timer; /* the engine's timer (kept with the cached exchange) */

    /* the upstream side (relay.c) */
    struct upconn *up;
    struct event *up_timer;
    uint64_t upstream_start_ms;
    uint64_t upstream_ms;
    bool up_sent; /* request bytes reached the upstream's socket */
    bool up_reusable;
    struct http1_head rhead;
    struct http1_chunked rchunked;
    uint64_t r_remaining;
    bool front_abort; /* the answer broke after its head: end(ABORT), not DONE */
};

/* A complete request on a front: a new exchange, attached to front (ops),
 * stored into *slot (the front's; the front's reference until end(DONE or
 * ABORT)), then the engine started on it: the answer may have gone
 * through ops, and the front been let go, before this returns. The
 * exchange holds req's slices until it ends or exchange_front_gone. */
void exchange_start(struct loop *l, const struct front_request *req, const struct front_ops *ops,
                    void *front, struct exchange **slot);
/* The front is going away while ex is attached: ex takes the buffers its
 * request's slices point into (swapped: the bytes stay in place) and
 * goes on alone. */
void exchange_front_gone(struct exchange *ex, struct buf *req_bytes, struct buf *body_bytes);
/* The front's output drained (a paused upstream may go on). */
void exchange_front_drained(struct exchange *ex);
/* The answer is queued whole: the owner of a key holds the client until
 * the engine is done; anyone else lets it go at once. */
void exchange_answered(struct exchange *ex);
/* True when the answer being queued now will be held (its key's owner,
 * store work pending): its last bytes go to the front with hold set. */
bool exchange_holds(const struct exchange *ex);

void exchange_ref(struct exchange *ex);
void exchange_unref(struct exchange *ex);
/* The one place the transport state changes; aborts on an illegal
 * transition (also in release builds). */
void exchange_set_state(struct exchange *ex, enum ex_state to);
/* Frees the loop's cache of reusable exchanges (at the loop's end). */
void exchange_cache_free(struct loop *l);

#endif
