/* client.h — one accepted client connection: reading and parsing its
 * requests one at a time (pipelined bytes wait in its buffer), handing each
 * complete request to a new exchange, and writing what the exchange queues.
 *
 *   loop ──list──▶ client ──(attached, holds 1 ref)──▶ exchange
 *
 * Ownership: the client owns its socket (conn), its timer, its de-chunked
 * body and normalized-target buffers until an exchange takes them; it
 * borrows its loop. A client that closes while an exchange is attached
 * only detaches it: the exchange takes the request bytes and goes on. */
#ifndef IDEMGATE_PROXY_CLIENT_H
#define IDEMGATE_PROXY_CLIENT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/queue.h>

#include "idemgate/core/buf.h"
#include "idemgate/core/errors.h"
#include "idemgate/core/metrics.h"
#include "idemgate/http/http1.h"
#include "idemgate/net/conn.h"

struct loop;
struct event;
struct exchange;
struct h2conn;
struct front_ops;

/* The client's transport state, with its names (the
 * idemgate_client_connections{state} gauge's label values);
 * client_set_state is the one place it changes, checked by core/fsm.h
 * against the table in client.c. */
#define STATES_CLIENT(X)                                                                           \
    X(CLIENT_IDLE, "idle")       /* waiting for (the rest of) a request */                         \
    X(CLIENT_BUSY, "busy")       /* an exchange is attached and answering */                       \
    X(CLIENT_HOLDING, "holding") /* the answer's last bytes wait for the store */                  \
    X(CLIENT_CLOSING, "closing") /* flushing the last response, then close */

#define CLIENT_STATE_ID(id, name) id,
enum client_state { STATES_CLIENT(CLIENT_STATE_ID) CLIENT__COUNT };
#undef CLIENT_STATE_ID

struct client {
    struct conn c;
    struct loop *loop;
    TAILQ_ENTRY(client) link; /* the loop's list */
    enum client_state state;
    struct exchange *ex; /* attached exchange, or NULL */
    struct h2conn *h2;   /* it speaks HTTP/2 (h2.c owns the streams), or NULL */
    struct event *timer; /* client_timeout_ms: request receive / keep-alive idle */
    char peer[64];       /* client IP as text, for X-Forwarded-For */
    bool tls;            /* HTTPS: requests are read once the handshake is done */
    /* the request being read: its head is parsed into the loop's scratch,
     * then into the exchange (an idle client holds no header table) */
    long head_len;
    bool have_head;
    size_t scanned; /* bytes of the head already searched for its end */
    enum http1_body body;
    uint64_t content_length;
    bool expect_continue;
    bool sent_continue;
    struct http1_chunked chunked;
    struct buf chunked_body;
    size_t chunk_pos; /* bytes of input after the head already decoded */
    bool keep_alive;  /* the last request allows keeping the connection */
    int minor;        /* the last request's HTTP/1.x minor version */
    /* the answer being written (front_h1.c) */
    bool out_chunked; /* its body is re-encoded as chunked, last chunk not yet written */
    bool close_after; /* close the connection after it */
    bool served;      /* at least one request was answered on it */
    /* the target when normalization changed it (docs/requests.md), then an absolute
     * form's authority; taken by the exchange */
    struct buf target;
    size_t target_len, auth_len;
    bool target_changed;
    uint64_t req_start_ms; /* when this request's head began to be read (access line) */
};

/* Accepted socket -> new client on loop (takes ownership of fd). */
void client_accept(struct loop *l, int fd, const char *peer);
/* Closes and frees a client; an attached exchange is detached, not stopped. */
void client_close(struct client *cl);
/* Draining: closes the client if it is between requests and nothing of
 * a next one has arrived. A connection that has not had its first request
 * yet (accepted, maybe not read from) is kept: it is served, then closed. */
void client_drain(struct client *cl);
void client_set_state(struct client *cl, enum client_state to);
/* The attached exchange is finished with the client (its answer is queued
 * whole): the request's bytes are dropped, then the client closes (close,
 * or it asked to, or the loop drains) or reads its next request. */
void client_request_done(struct client *cl, bool close);
/* Flushes queued output; on a write error the client is closed. Returns
 * -1 when it was closed, else what conn_flush returned. */
int client_flush(struct client *cl);
/* Over the output high-water mark: the upstream waits. */
bool client_backlogged(const struct client *cl);
/* The HTTP/1 front (front_h1.c): how an exchange's answer is written to
 * a client. */
extern const struct front_ops client_front_ops;

/* Queues an error answer to a client without an exchange (malformed
 * request, timeout), with its X-Request-Id (borrowed for the call) and
 * Connection: close; returns its status. Defined in answer.c. The caller
 * (client.c) writes its access line. Defined in front_h1.c. */
int client_queue_error(struct client *cl, enum err_code e, const char *request_id,
                       size_t request_id_len);

#endif
