/* server.h — the process: worker threads, each with its own event_base,
 * SO_REUSEPORT listener, store connection and upstream pools (DESIGN
 * section 1; with the memory store, dups of one socket without it, so no
 * other process may join). Workers share only read-only configuration
 * generations (proxy/gen.h) and atomic counters; a reload publishes a new
 * generation and wakes each worker to switch to it.
 *
 * Ownership: struct server owns the workers and a reference to the latest
 * generation; each worker owns its loop, which owns its clients, its
 * exchanges (through their reference counts), its pools and its stores. */
#ifndef IDEMGATE_SERVER_H
#define IDEMGATE_SERVER_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>

#include "idemgate/core/buf.h"
#include "idemgate/proxy/loop.h"

struct cfg;
struct cfg_flags;
struct gen;
struct event_base;
struct event;
struct store;
struct store_memory_shared;
struct store_lmdb_env;
struct listen_claim;
struct upstream_pool;
struct client;
struct exchange;
struct http1_head;

/* One worker thread: its listener, its stop and grace events, and the
 * loop its clients and exchanges run on. */
struct worker {
    int id;
    struct server *srv;
    struct loop loop; /* base, cfg, store, pools, clients, exchanges */
    pthread_t thread;
    int listen_fd;
    struct event *listen_ev;
    int stop_fd; /* eventfd the main thread writes on SIGTERM */
    struct event *stop_ev;
    int reload_fd; /* eventfd written when a reload published a generation */
    struct event *reload_ev;
    bool started;
    struct event *grace_ev; /* fires when shutdown_grace_ms ran out */
};

struct server {
    struct gen *gen;               /* the latest generation (the server's reference) */
    const struct cfg_flags *flags; /* what the configuration is loaded from (borrowed) */
    pthread_mutex_t reload_mu;     /* one reload at a time (SIGHUP, POST /-/reload) */
    pthread_mutex_t ack_mu;        /* guards acks */
    pthread_cond_t ack_cv;         /* a worker switched to the published generation */
    int acks;                      /* workers that did, this reload */
    struct worker *workers;
    int n_workers;
    atomic_int connections; /* open client connections, all workers */
    struct store_memory_shared *mem;
    struct store_lmdb_env *lmdb; /* the LMDB store's environment, or NULL */
    uint32_t boot_id;            /* random per process: prefix of generated request ids */
    struct listen_claim *claim;  /* held while the process listens (net/listen.h) */
};

/* Creates listeners and workers (no threads yet) for generation g (the
 * caller's reference is taken over) and publishes g as the current one.
 * flags (borrowed for the server's life) are what a reload loads from.
 * Returns 0, or -1 after logging why (cannot bind...). */
int server_init(struct server *srv, struct gen *g, const struct cfg_flags *flags);
/* Loads the configuration again (SIGHUP, POST /-/reload; any thread, one
 * at a time) and, when it is valid, publishes it: new requests get it,
 * requests in flight finish under theirs, no connection is closed.
 * Options that apply at start only are logged as ignored. Returns once
 * every worker has switched (new requests get the new generation from
 * then on). Returns 0 with
 * *id the new generation, or -1 with err (the line -t prints) and *id the
 * generation kept; either is logged and counted in
 * idemgate_reloads_total. */
int server_reload(struct server *srv, char *err, size_t errlen, unsigned long *id);
/* Starts the worker threads. */
int server_start(struct server *srv);
/* Asks every worker to stop accepting and drain; returns at once. */
void server_stop(struct server *srv);
/* Joins the workers and frees everything; false when the grace period
 * ran out with exchanges in flight (then some memory is left to exit). */
bool server_free(struct server *srv);

#endif
