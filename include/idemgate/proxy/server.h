/* server.h — the process: worker threads, each with its own event_base,
 * SO_REUSEPORT listener, store connection and upstream pools (DESIGN
 * section 1; with the memory store, dups of one socket without it, so no
 * other process may join). Workers share only the frozen config and atomic
 * counters.
 *
 * Ownership: struct server owns the workers; each worker owns its loop,
 * which owns its clients, its exchanges (through their reference counts),
 * its pools and its store. */
#ifndef IDEMGATE_SERVER_H
#define IDEMGATE_SERVER_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>

#include "idemgate/core/buf.h"
#include "idemgate/proxy/loop.h"

struct cfg;
struct event_base;
struct event;
struct store;
struct store_memory_shared;
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
    bool started;
    struct event *grace_ev; /* fires when shutdown_grace_ms ran out */
};

struct server {
    const struct cfg *cfg;
    struct worker *workers;
    int n_workers;
    atomic_int connections; /* open client connections, all workers */
    struct store_memory_shared *mem;
    uint32_t boot_id;           /* random per process: prefix of generated request ids */
    struct listen_claim *claim; /* held while the process listens (net/listen.h) */
};

/* Creates listeners and workers (no threads yet). Returns 0, or -1 after
 * logging why (cannot bind...). */
int server_init(struct server *srv, const struct cfg *cfg);
/* Starts the worker threads. */
int server_start(struct server *srv);
/* Asks every worker to stop accepting and drain; returns at once. */
void server_stop(struct server *srv);
/* Joins the workers and frees everything; false when the grace period
 * ran out with exchanges in flight (then some memory is left to exit). */
bool server_free(struct server *srv);

#endif
