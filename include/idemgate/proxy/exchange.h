/* exchange.h — client connections and exchanges.
 *
 * A client is one accepted connection: it reads and parses requests, one at
 * a time (pipelined bytes wait in its buffer), and writes responses.
 * An exchange is one request's life: its route, its idempotency state, its
 * upstream request and its response.
 *
 *   client ──(attached, 1 ref)──▶ exchange ──(1 ref while in use)──▶ upconn
 *                                    │
 *                                    └──(1 ref per store op in flight)──▶ store
 *
 * The exchange owns the request bytes (it takes the client's read buffer),
 * its upstream connection while in use and its record buffer. The last
 * reference frees it (exchange_unref), so a client that disconnects only
 * detaches: the upstream answer is still read and kept. */
#ifndef IDEMGATE_EXCHANGE_H
#define IDEMGATE_EXCHANGE_H

#include <stdbool.h>
#include <stdint.h>

#include "idemgate/core/buf.h"
#include "idemgate/net/conn.h"
#include "idemgate/core/errors.h"
#include "idemgate/core/metrics.h"
#include "idemgate/idem/fingerprint.h"
#include "idemgate/http/http1.h"
#include "idemgate/idem/record.h"
#include "idemgate/store/store.h"

struct worker;
struct event;
struct upconn;
struct cfg_route;
struct cfg_idem;
struct cfg_url;
struct upstream_pool;

enum client_state {
    CLIENT_IDLE,   /* waiting for (the rest of) a request */
    CLIENT_BUSY,   /* an exchange is attached */
    CLIENT_CLOSING /* flushing the last response, then close */
};

struct client {
    struct conn c;
    struct worker *w;
    struct client *prev, *next; /* worker's list */
    enum client_state state;
    struct exchange *ex;
    struct event *timer; /* client_timeout_ms: request receive / keep-alive idle */
    char peer[64];       /* client IP as text, for X-Forwarded-For */
    bool tls;            /* HTTPS: requests are read once the handshake is done */
    /* request being read */
    long head_len;
    /* what the request body needs, from the parsed head (the head itself is
     * parsed into the worker's scratch, then into the exchange: an idle
     * client holds no 3 KiB header table) */
    enum http1_body body;
    uint64_t content_length;
    bool expect_continue;
    struct http1_chunked chunked;
    struct buf chunked_body;
    size_t chunk_pos; /* bytes of input after the head already decoded */
    bool have_head;
    size_t scanned; /* bytes of the head already searched for its end */
    bool sent_continue;
    bool keep_alive; /* the last request allows keeping the connection */
    /* the request's target when normalization changed it (SPEC 3), then
     * an absolute form's authority; moved into the exchange */
    struct buf target;
    size_t target_len, auth_len;
    bool target_changed;
};

enum ex_state {
    EX_NEW,
    EX_ACQUIRING,  /* store acquire in flight */
    EX_WAITING,    /* concurrent "wait": polling for the owner to finish */
    EX_FORWARDING, /* upstream request in flight */
    EX_STREAMING,  /* response head sent to the client, body flowing */
    EX_COMPLETING, /* response done; store complete/release in flight */
    EX_DONE
};

struct exchange {
    int refs;
    enum ex_state state;
    enum metrics_outcome outcome; /* OUT_*: OUTCOMES in core/metrics.h */
    struct worker *w;
    struct client *client; /* NULL once detached */
    struct buf req;        /* owns the request head (and a Content-Length body) */
    struct http1_head head;
    const char *body;
    size_t body_len;
    struct buf body_buf;          /* a de-chunked request body */
    struct buf target;            /* a normalized target (head.target points here), or empty */
    struct http1_slice authority; /* an absolute-form target's: replaces Host */
    bool client_keep_alive;
    int client_minor;
    char peer[64]; /* the client's address, kept if the client leaves */
    char request_id[64];
    size_t request_id_len;
    bool request_id_from_client;
    const struct cfg_idem *idem;
    const struct cfg_url *upstream_url;
    struct upstream_pool *pool;
    uint64_t start_ms;
    uint64_t upstream_start_ms;
    uint64_t upstream_ms;
    int status; /* status sent to the client */

    /* idempotency */
    bool covered; /* acquire was attempted */
    bool owner;   /* we hold the lock */
    char *skey;   /* "<scope>:<key>": skey_buf, or owned when longer */
    char skey_buf[SCOPE_HEX_LEN + 2 + 256];
    size_t skey_len;
    char token[STORE_TOKEN_LEN + 1];
    uint8_t fp[FP_LEN];
    struct event *idem_timer; /* lock renewal, or the wait poll */
    uint64_t wait_deadline_ms;
    bool recording;
    bool keep; /* the response may be kept (status, not SSE, size) */
    struct buf rec;
    struct record_writer rw;
    uint64_t rec_body_len;
    uint64_t store_start_ms;
    bool idem_failure_open;
    bool replayed; /* our answer replays a stored one (Idempotent-Replayed) */

    /* upstream */
    struct upconn *up;
    struct event *up_timer;
    bool up_sent;   /* request bytes reached the upstream's socket */
    bool head_done; /* response head parsed and forwarded */
    struct http1_head rhead;
    struct http1_chunked rchunked;
    uint64_t r_remaining;
    bool client_chunked; /* we re-encode the body as chunked for the client */
    bool client_close;   /* close the client connection after this response */
    bool holding;        /* last response bytes wait for the record to be stored */
    bool logged;         /* the access line was written (and the outcome counted) */
    bool up_reusable;
};

/* Accepted socket -> new client (takes ownership of fd). */
void client_accept(struct worker *w, int fd, const char *peer);
/* Closes and frees a client; a busy exchange is detached, not stopped. */
void client_close(struct client *cl);
/* Draining: closes the client if it is between requests. */
void client_drain(struct client *cl);

/* Frees the worker's cache of reusable exchanges (at the worker's end). */
void exchange_cache_free(struct worker *w);

/* Reference counting (see header comment). */
void exchange_ref(struct exchange *ex);
void exchange_unref(struct exchange *ex);
/* The one place where an exchange's state changes; aborts on an illegal
 * transition (also in release builds). */
void exchange_set_state(struct exchange *ex, enum ex_state to);

/* Called by the idem engine (idem.c): */
void exchange_forward(struct exchange *ex);
void exchange_answer_error(struct exchange *ex, enum err_code e);
void exchange_replay(struct exchange *ex, const struct record *r);
/* Store work after the response finished is done: the exchange may end. */
void exchange_idem_finished(struct exchange *ex);

#endif
