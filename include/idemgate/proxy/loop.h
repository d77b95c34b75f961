/* loop.h — what one event loop's clients and exchanges run on: the event
 * base, the configuration generation it serves, its store and upstream
 * pools, its buffer pool and header scratch, its cache of exchanges. It
 * sits below the worker (server.c) and the exchange, so neither calls up
 * into the other; the worker learns that the loop may end through on_idle.
 *
 *   worker ──embeds──▶ loop ◀──borrowed── client, exchange, upstream pool
 *
 * Ownership: the loop owns its pools, scratch, exchange cache and store
 * (loop_free frees them); cfg, base and the connection counter are
 * borrowed from the worker and the server. One thread uses a loop. */
#ifndef IDEMGATE_PROXY_LOOP_H
#define IDEMGATE_PROXY_LOOP_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <sys/queue.h>

#include "idemgate/core/buf.h"
#include "idemgate/idem/engine.h"

struct cfg;
struct event_base;
struct store;
struct upstream_group;
struct client;
struct exchange;
struct http1_head;

struct loop {
    int id;           /* worker number (request ids) */
    uint32_t boot_id; /* random per process (request ids) */
    const struct cfg *cfg;
    struct event_base *base;
    struct store *store;
    struct idem_env idem_env;      /* what the engines of this loop run on */
    struct upstream_group *groups; /* [0] the global upstream, then routes' own */
    size_t n_groups;
    struct buf_pool bufs;         /* connection and record buffers while idle */
    struct http1_head *scratch;   /* request heads are parsed here first */
    TAILQ_HEAD(, client) clients; /* all open client connections */
    unsigned n_exchanges;         /* exchanges alive, attached or not */
    struct exchange *ex_cache;    /* freed exchanges kept for reuse (list) */
    unsigned n_ex_cache;
    uint64_t rid_counter;    /* request-id sequence */
    bool draining;           /* SIGTERM: no new requests on kept-alive connections */
    atomic_int *connections; /* open client connections, all loops (borrowed) */
    /* Called when draining and no client or exchange is left. */
    void (*on_idle)(void *arg);
    void *idle_arg;
};

/* Sets up l on base for cfg with store (takes ownership of store). */
void loop_init(struct loop *l, int id, uint32_t boot_id, const struct cfg *cfg,
               struct event_base *base, struct store *store, atomic_int *connections);
/* Frees what the loop owns; its clients and exchanges must be gone. */
void loop_free(struct loop *l);
/* A client or exchange went away: calls on_idle once draining and empty. */
void loop_maybe_idle(struct loop *l);

#endif
