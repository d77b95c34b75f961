/* loop.h — what one event loop's clients and exchanges run on: the event
 * base, the configuration generation it serves (struct loop_gen: that
 * generation's upstream pools and store), its buffer pool and header
 * scratch, its cache of exchanges. It sits below the worker (server.c)
 * and the exchange, so neither calls up into the other; the worker learns
 * that the loop may end through on_idle.
 *
 *   worker ──embeds──▶ loop ──ref──▶ loop_gen (current) ──ref──▶ gen
 *                        ▲             ▲    └──ref──▶ loop_store ──▶ store
 *             borrowed ──┘             └── ref ── exchange (start to end)
 *             client, upstream pool
 *
 * A reload (loop_set_gen) makes a new loop_gen for the new generation:
 * new groups that take over the old ones' health and idle connections,
 * and the same store unless the store settings changed. The old loop_gen
 * lives on until its last exchange ends, then is freed from a callback of
 * its own (never from inside an exchange's), which gives its store back.
 *
 * Ownership: the loop owns its loop_gens (current and retiring), pools,
 * scratch and exchange cache (loop_free frees them); base and the
 * connection counter are borrowed from the worker and the server. One
 * thread uses a loop. */
#ifndef IDEMGATE_PROXY_LOOP_H
#define IDEMGATE_PROXY_LOOP_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <sys/queue.h>

#include "idemgate/core/buf.h"
#include "idemgate/idem/engine.h"

struct cfg;
struct event;
struct event_base;
struct gen;
struct store;
struct store_memory_shared;
struct store_lmdb_env;
struct upstream_group;
struct client;
struct exchange;
struct http1_head;

/* A store of one loop, shared by its loop_gens while the store settings
 * stay the same. */
struct loop_store {
    unsigned refs; /* loop_gens using it */
    struct store *store;
    struct gen *gen; /* whose configuration and TLS context it borrows (a reference) */
};

/* One loop's side of one configuration generation. */
struct loop_gen {
    unsigned refs; /* the loop's while current, and each exchange's */
    struct loop *loop;
    struct gen *gen;               /* a reference */
    const struct cfg *cfg;         /* &gen->cfg */
    struct upstream_group *groups; /* [0] the global upstream, then routes' own */
    size_t n_groups;
    struct loop_store *store;
    struct idem_env idem_env;   /* what the engines of its exchanges run on */
    TAILQ_ENTRY(loop_gen) link; /* loop's retiring list, once not current */
};

struct loop {
    int id;                /* worker number (request ids) */
    uint32_t boot_id;      /* random per process (request ids) */
    struct loop_gen *gen;  /* the current one: what new requests get */
    const struct cfg *cfg; /* gen->cfg */
    struct event_base *base;
    struct store_memory_shared *mem; /* the memory store's table, or NULL (borrowed) */
    struct store_lmdb_env *lmdb;     /* the LMDB store's environment, or NULL (borrowed) */
    TAILQ_HEAD(, loop_gen) retiring; /* replaced, with exchanges still on them */
    struct event *retire_ev;         /* frees the retiring ones left without any */
    struct buf_pool bufs;            /* connection and record buffers while idle */
    struct http1_head *scratch;      /* request heads are parsed here first */
    TAILQ_HEAD(, client) clients;    /* all open client connections */
    unsigned n_exchanges;            /* exchanges alive, attached or not */
    struct exchange *ex_cache;       /* freed exchanges kept for reuse (list) */
    unsigned n_ex_cache;
    uint64_t rid_counter;    /* request-id sequence */
    bool draining;           /* SIGTERM: no new requests on kept-alive connections */
    atomic_int *connections; /* open client connections, all loops (borrowed) */
    /* Called when draining and no client or exchange is left. */
    void (*on_idle)(void *arg);
    void *idle_arg;
};

/* Sets up l on base for generation g (a reference of its own is taken):
 * its groups, and its store (the memory one on mem when mem is not NULL,
 * the LMDB one on lmdb when that is not NULL, else a Redis one). */
void loop_init(struct loop *l, int id, uint32_t boot_id, struct gen *g, struct event_base *base,
               struct store_memory_shared *mem, struct store_lmdb_env *lmdb,
               atomic_int *connections);
/* A reload: new requests of l get generation g from now on (no-op when g
 * is already current); exchanges already started keep theirs. */
void loop_set_gen(struct loop *l, struct gen *g);
/* An exchange's reference on the loop's current generation, and its end. */
struct loop_gen *loop_gen_ref(struct loop *l);
void loop_gen_unref(struct loop_gen *lg);
/* Frees what the loop owns; its clients and exchanges must be gone. */
void loop_free(struct loop *l);
/* A client or exchange went away: calls on_idle once draining and empty. */
void loop_maybe_idle(struct loop *l);

#endif
