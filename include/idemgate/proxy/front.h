/* front.h — what an exchange needs from the side that carries its client,
 * whatever the protocol: an HTTP/1 connection (client.c, front_h1.c) or an
 * HTTP/2 stream (h2.c). The exchange, the relay and the answers speak only
 * through these: no status line, chunk framing or frame is written outside
 * a front.
 *
 *   front ──(1 ref, attached)──▶ exchange ──ops──▶ front
 *
 * A front fills a struct front_request when its request is complete and
 * calls exchange_start; from then on the exchange calls the ops below
 * until end(DONE or ABORT), after which it forgets the front (and drops
 * the front's reference). A front that goes away first (a closed
 * connection, a reset stream) calls exchange_front_gone, handing the
 * exchange the bytes the request's slices point into; the exchange goes
 * on alone and its answer is kept. */
#ifndef IDEMGATE_PROXY_FRONT_H
#define IDEMGATE_PROXY_FRONT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "idemgate/http/http1.h"

/* One header of an answer, as it goes out (the front lowercases or
 * frames it as its protocol wants). Borrowed for the call. */
struct front_header {
    const char *name;
    size_t name_len;
    const char *value;
    size_t value_len;
};

/* How the body of an answer is delimited. */
enum front_body {
    FRONT_BODY_NONE,   /* no body bytes (a HEAD answer's Content-Length, if any, is a header) */
    FRONT_BODY_LENGTH, /* content_length bytes follow */
    FRONT_BODY_STREAM  /* bytes until end(): length unknown (chunked, SSE) */
};

struct front_head {
    int status;
    const char *reason; /* HTTP/1 reason phrase (an HTTP/2 front drops it) */
    size_t reason_len;
    const struct front_header *headers; /* end-to-end: nothing hop-by-hop, no framing */
    size_t n_headers;
    enum front_body body;
    uint64_t content_length; /* FRONT_BODY_LENGTH */
};

enum front_end {
    FRONT_END_HOLD, /* the answer is whole, but its last bytes wait: the key's owner
                       lets them go (end DONE) once the store has the outcome */
    FRONT_END_DONE, /* the answer is whole and may all go out; the front is free */
    FRONT_END_ABORT /* the answer broke after its head: the client must see it cut
                       (HTTP/1 closes, HTTP/2 resets the stream); the front is free */
};

struct front_ops {
    /* The answer's head; once per exchange. */
    void (*head)(void *front, const struct front_head *h);
    /* A slice of its body (borrowed for the call). hold: the answer's last
     * bytes, kept until end(DONE) (an owner's, see FRONT_END_HOLD). */
    void (*body)(void *front, const char *p, size_t n, bool hold);
    /* Sends what body() queued so far (after a batch of slices). */
    void (*flush)(void *front);
    void (*end)(void *front, enum front_end how);
    /* Too much waits for the client: the upstream read pauses until the
     * front calls exchange_front_drained. */
    bool (*backlogged)(const void *front);
};

/* A complete request as a front hands it over. Everything is borrowed
 * for the exchange's life while the front is attached (exchange_front_gone
 * hands the bytes over). */
struct front_request {
    const struct http1_head *head; /* copied; its slices point into the front's bytes */
    struct http1_slice target;     /* the target to use (normalized), or {NULL,0}: head's */
    struct http1_slice authority;  /* an absolute form's authority (replaces Host), or none */
    const char *body;
    size_t body_len;
    const char *peer; /* the client's address as text */
    bool tls;         /* it came over TLS (X-Forwarded-Proto) */
};

#endif
