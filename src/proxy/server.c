/* server.c — listeners and worker threads. Each worker has its own
 * event_base, its own listening socket, its own store connection and
 * upstream pools: workers share nothing mutable but atomic counters. With
 * a shared store (Redis, LMDB) each worker's socket is its own SO_REUSEPORT one
 * (the kernel spreads connections, and another process on the same store
 * may join: a rolling restart); with the memory store the workers hold
 * dups of one socket without SO_REUSEPORT, so no other process can join
 * it. The address claim (net/listen.h) refuses, before any bind, an
 * address held by a process with another store. Owns the workers and,
 * through them, every client, and the claim. */
#include "idemgate/proxy/server.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <event2/event.h>
#include <openssl/rand.h>

#include "idemgate/config/config.h"
#include "idemgate/proxy/client.h"
#include "idemgate/http/http1.h"
#include "idemgate/core/log.h"
#include "idemgate/core/metrics.h"
#include "idemgate/store/store.h"
#include "idemgate/core/clock.h"
#include "idemgate/net/listen.h"
#include "idemgate/proxy/gen.h"
#include "idemgate/proxy/upstream.h"

#define ACCEPT_BATCH 64
#define LISTEN_BACKLOG 4096

static void peer_text(const struct sockaddr_storage *ss, char *out, size_t n)
{
    if (ss->ss_family == AF_INET) {
        inet_ntop(AF_INET, &((const struct sockaddr_in *)ss)->sin_addr, out, (socklen_t)n);
    } else if (ss->ss_family == AF_INET6) {
        inet_ntop(AF_INET6, &((const struct sockaddr_in6 *)ss)->sin6_addr, out, (socklen_t)n);
    } else {
        snprintf(out, n, "unknown");
    }
}

/* Accepts up to ACCEPT_BATCH connections; false once the queue is empty. */
static bool worker_accept_batch(struct worker *w, int lfd)
{
    for (int i = 0; i < ACCEPT_BATCH; i++) {
        struct sockaddr_storage ss;
        socklen_t sl = sizeof(ss);
        int fd = accept4(lfd, (struct sockaddr *)&ss, &sl, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EMFILE || errno == ENFILE)
                log_msg(LOG_ERROR, "accept: %s", strerror(errno));
            return false;
        }
        if (atomic_fetch_add(&w->srv->connections, 1) >= w->loop.cfg->limits.max_connections) {
            /* Over the limit: refuse at once rather than hold the socket. */
            atomic_fetch_sub(&w->srv->connections, 1);
            close(fd);
            continue;
        }
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
        char peer[64];
        peer_text(&ss, peer, sizeof(peer));
        client_accept(&w->loop, fd, peer);
    }
    return true;
}

static void worker_accept(evutil_socket_t lfd, short what, void *arg)
{
    (void)what;
    struct worker *w = arg;
    if (!w->loop.draining) worker_accept_batch(w, lfd);
}

/* The loop is draining and empty: the worker's thread may end. */
static void worker_idle(void *arg)
{
    struct worker *w = arg;
    event_base_loopbreak(w->loop.base);
}

static void worker_grace_expired(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    struct worker *w = arg;
    log_msg(LOG_WARN, "worker %d: shutdown grace ran out with %u exchange(s) in flight", w->id,
            w->loop.n_exchanges);
    event_base_loopbreak(w->loop.base);
}

/* SIGTERM reached us through the worker's eventfd: stop accepting, close
 * idle clients, let the rest finish (each closes after its response). */
static void worker_stop(evutil_socket_t fd, short what, void *arg)
{
    (void)what;
    struct worker *w = arg;
    uint64_t v;
    if (read(fd, &v, sizeof(v)) < 0) { /* nothing to do: the wakeup is what counts */
    }
    if (w->loop.draining) return;
    /* Connections the kernel already queued on our socket are ours to
     * serve (a rolling restart must not reset them): accept them all
     * before the socket closes. */
    if (w->listen_fd >= 0)
        for (int i = 0; i < LISTEN_BACKLOG; i += ACCEPT_BATCH)
            if (!worker_accept_batch(w, w->listen_fd)) break;
    w->loop.draining = true;
    if (w->listen_ev) {
        event_free(w->listen_ev);
        w->listen_ev = NULL;
    }
    if (w->listen_fd >= 0) {
        close(w->listen_fd);
        w->listen_fd = -1;
    }
    for (struct client *cl = TAILQ_FIRST(&w->loop.clients), *next; cl; cl = next) {
        next = TAILQ_NEXT(cl, link);
        client_drain(cl);
    }
    int ms = w->loop.cfg->limits.shutdown_grace_ms;
    struct timeval tv = clock_tv((uint64_t)ms);
    w->grace_ev = evtimer_new(w->loop.base, worker_grace_expired, w);
    evtimer_add(w->grace_ev, &tv);
    loop_maybe_idle(&w->loop);
}

/* A reload was published: new requests of this loop get it. */
static void worker_reload(evutil_socket_t fd, short what, void *arg)
{
    (void)what;
    struct worker *w = arg;
    uint64_t v;
    if (read(fd, &v, sizeof(v)) < 0) { /* nothing to do: the wakeup is what counts */
    }
    struct gen *g = gen_current();
    if (g) loop_set_gen(&w->loop, g);
    gen_unref(g);
    pthread_mutex_lock(&w->srv->ack_mu);
    w->srv->acks++;
    pthread_cond_signal(&w->srv->ack_cv);
    pthread_mutex_unlock(&w->srv->ack_mu);
}

/* Waits (up to a second: a worker that is leaving may not answer) until
 * every worker runs new requests on the published generation. */
static void server_wait_workers(struct server *srv)
{
    struct timespec until;
    clock_gettime(CLOCK_REALTIME, &until);
    until.tv_sec += 1;
    pthread_mutex_lock(&srv->ack_mu);
    while (srv->acks < srv->n_workers &&
           pthread_cond_timedwait(&srv->ack_cv, &srv->ack_mu, &until) == 0) {
    }
    pthread_mutex_unlock(&srv->ack_mu);
}

/* Takes ownership of listen_fd. */
static int worker_init(struct server *srv, struct worker *w, int id, int listen_fd, char *err,
                       size_t errlen)
{
    w->id = id;
    w->srv = srv;
    w->listen_fd = -1;
    w->stop_fd = -1;
    w->reload_fd = -1;
    struct event_config *ec = event_config_new();
    event_config_set_flag(ec, EVENT_BASE_FLAG_NOLOCK);
    event_config_set_flag(ec, EVENT_BASE_FLAG_EPOLL_USE_CHANGELIST);
    struct event_base *base = event_base_new_with_config(ec);
    event_config_free(ec);
    w->listen_fd = listen_fd;
    if (!base) {
        snprintf(err, errlen, "cannot create an event base");
        return -1;
    }
    w->loop.base = base;
    w->listen_ev = event_new(base, w->listen_fd, EV_READ | EV_PERSIST, worker_accept, w);
    event_add(w->listen_ev, NULL);
    w->stop_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    w->stop_ev = event_new(base, w->stop_fd, EV_READ | EV_PERSIST, worker_stop, w);
    event_add(w->stop_ev, NULL);
    w->reload_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    w->reload_ev = event_new(base, w->reload_fd, EV_READ | EV_PERSIST, worker_reload, w);
    event_add(w->reload_ev, NULL);
    loop_init(&w->loop, id, srv->boot_id, srv->gen, base, srv->mem, srv->lmdb, &srv->connections);
    w->loop.on_idle = worker_idle;
    w->loop.idle_arg = w;
    return 0;
}

int server_init(struct server *srv, struct gen *g, const struct cfg_flags *flags)
{
    memset(srv, 0, sizeof(*srv));
    srv->gen = g;
    srv->flags = flags;
    pthread_mutex_init(&srv->reload_mu, NULL);
    pthread_mutex_init(&srv->ack_mu, NULL);
    pthread_cond_init(&srv->ack_cv, NULL);
    gen_publish(g);
    const struct cfg *cfg = &g->cfg;
    atomic_init(&srv->connections, 0);
    char err[512];
    if (RAND_bytes((unsigned char *)&srv->boot_id, sizeof(srv->boot_id)) != 1) abort();
    if (cfg->store == CFG_STORE_MEMORY)
        srv->mem = store_memory_shared_new_bounded(cfg->redis.key_prefix, cfg->memory_max_bytes,
                                                   cfg->memory_max_scope_bytes);
    if (cfg->store == CFG_STORE_LMDB) {
        struct store_lmdb_opts o = {cfg->lmdb_path, cfg->lmdb_max_bytes, cfg->lmdb_max_scope_bytes,
                                    cfg->lmdb_sync == CFG_LMDB_SYNC_FSYNC};
        if (store_lmdb_env_open(&o, &srv->lmdb, err, sizeof(err)) < 0) {
            log_msg(LOG_ERROR, "%s", err);
            return -1;
        }
    }
    int n = cfg->workers > 0 ? cfg->workers : 1;
    srv->workers = calloc((size_t)n, sizeof(*srv->workers));
    if (!srv->workers) abort();

    const struct cfg_addr *a = &cfg->listen;
    struct sockaddr_storage ss;
    socklen_t sl;
    if (listen_resolve(a->host, a->port, a->text, &ss, &sl, err, sizeof(err)) < 0) {
        log_msg(LOG_ERROR, "%s", err);
        return -1;
    }
    bool memory = cfg->store == CFG_STORE_MEMORY;
    /* Every store kind this binary has, to name the holder of an address. */
    static const char *const kinds[] = {"memory", "redis", "lmdb", NULL};
    struct listen_store_id id = {memory ? "memory" : "redis", NULL, memory};
    if (srv->lmdb) /* shared by the processes naming the same environment */
        id = (struct listen_store_id){"lmdb", store_lmdb_env_path(srv->lmdb), false};
    srv->claim = listen_claim_take((struct sockaddr *)&ss, &id, kinds, err, sizeof(err));
    if (!srv->claim) {
        log_msg(LOG_ERROR, "cannot listen on %s: %s", a->text, err);
        return -1;
    }
    /* The memory store's one socket, without SO_REUSEPORT: the kernel too
     * keeps every other process off it (an older idemgate, or not one). */
    int shared_fd = memory ? listen_bind((struct sockaddr *)&ss, sl, false, LISTEN_BACKLOG) : -1;
    int rc = 0;
    if (memory && shared_fd < 0) {
        log_msg(LOG_ERROR, "cannot listen on %s: %s", a->text, strerror(errno));
        rc = -1;
    }
    for (int i = 0; i < n && rc == 0; i++) {
        int fd = memory ? fcntl(shared_fd, F_DUPFD_CLOEXEC, 0)
                        : listen_bind((struct sockaddr *)&ss, sl, true, LISTEN_BACKLOG);
        if (fd < 0) {
            log_msg(LOG_ERROR, "cannot listen on %s: %s", a->text, strerror(errno));
            rc = -1;
            break;
        }
        srv->n_workers = i + 1; /* worker_free() cleans up after a half-made one */
        if (worker_init(srv, &srv->workers[i], i, fd, err, sizeof(err)) < 0) {
            log_msg(LOG_ERROR, "%s", err);
            rc = -1;
        }
    }
    if (shared_fd >= 0) close(shared_fd);
    listen_claim_settled(srv->claim);
    return rc;
}

static void *worker_main(void *arg)
{
    struct worker *w = arg;
    event_base_dispatch(w->loop.base);
    log_scratch_free();
    return NULL;
}

int server_start(struct server *srv)
{
    for (int i = 0; i < srv->n_workers; i++) {
        if (pthread_create(&srv->workers[i].thread, NULL, worker_main, &srv->workers[i]) != 0) {
            log_msg(LOG_ERROR, "cannot start worker thread %d", i);
            return -1;
        }
        srv->workers[i].started = true;
    }
    return 0;
}

void server_stop(struct server *srv)
{
    uint64_t one = 1;
    for (int i = 0; i < srv->n_workers; i++)
        if (srv->workers[i].stop_fd >= 0 && write(srv->workers[i].stop_fd, &one, sizeof(one)) < 0)
            log_msg(LOG_ERROR, "cannot signal worker %d", i);
}

/* Returns false when exchanges were still in flight (grace ran out). */
static bool worker_free(struct worker *w)
{
    while (!TAILQ_EMPTY(&w->loop.clients))
        client_close(TAILQ_FIRST(&w->loop.clients));
    if (w->loop.n_exchanges > 0) return false;
    if (w->loop.gen) loop_free(&w->loop);
    if (w->listen_ev) event_free(w->listen_ev);
    if (w->listen_fd >= 0) close(w->listen_fd);
    if (w->stop_ev) event_free(w->stop_ev);
    if (w->stop_fd >= 0) close(w->stop_fd);
    if (w->reload_ev) event_free(w->reload_ev);
    if (w->reload_fd >= 0) close(w->reload_fd);
    if (w->grace_ev) event_free(w->grace_ev);
    if (w->loop.base) event_base_free(w->loop.base);
    return true;
}

bool server_free(struct server *srv)
{
    bool clean = true;
    for (int i = 0; i < srv->n_workers; i++)
        if (srv->workers[i].started) pthread_join(srv->workers[i].thread, NULL);
    for (int i = 0; i < srv->n_workers; i++)
        if (!worker_free(&srv->workers[i])) clean = false;
    if (!clean) return false; /* exiting anyway: leave the rest to the OS */
    gen_retire_current();
    gen_unref(srv->gen);
    srv->gen = NULL;
    pthread_mutex_destroy(&srv->reload_mu);
    pthread_mutex_destroy(&srv->ack_mu);
    pthread_cond_destroy(&srv->ack_cv);
    free(srv->workers);
    listen_claim_free(srv->claim);
    if (srv->mem) store_memory_shared_free(srv->mem);
    store_lmdb_env_free(srv->lmdb);
    return true;
}

/* The restart-only keys keep their start values: the memory store's
 * table, the LMDB environment, the listeners and the workers stay as they
 * are. */
int server_reload(struct server *srv, char *err, size_t errlen, unsigned long *id)
{
    pthread_mutex_lock(&srv->reload_mu);
    struct gen *old = srv->gen, *g = NULL;
    int rc = gen_load(srv->flags, old, &g, err, errlen);
    if (rc != 0) {
        metrics_add(M_RELOADS, METRICS_RELOAD_FAILED, 1);
        log_msg(LOG_ERROR, "reload failed, configuration kept (generation %lu): %s", old->id, err);
        *id = old->id;
        pthread_mutex_unlock(&srv->reload_mu);
        return -1;
    }
    char keys[256];
    if (cfg_restart_changes(&old->cfg, &g->cfg, keys, sizeof(keys)) > 0)
        for (char *save = NULL, *k = strtok_r(keys, ", ", &save); k;
             k = strtok_r(NULL, ", ", &save))
            log_msg(LOG_WARN, "reload: %s changed: ignored until the next start", k);
    log_set_level((enum log_level)g->cfg.log_level);
    if (srv->mem)
        store_memory_shared_set_bounds(srv->mem, g->cfg.memory_max_bytes,
                                       g->cfg.memory_max_scope_bytes);
    if (srv->lmdb) store_lmdb_env_set_scope_bound(srv->lmdb, g->cfg.lmdb_max_scope_bytes);
    gen_publish(g);
    srv->gen = g;
    pthread_mutex_lock(&srv->ack_mu);
    srv->acks = 0;
    pthread_mutex_unlock(&srv->ack_mu);
    uint64_t one = 1;
    for (int i = 0; i < srv->n_workers; i++)
        if (srv->workers[i].reload_fd >= 0 &&
            write(srv->workers[i].reload_fd, &one, sizeof(one)) < 0)
            log_msg(LOG_ERROR, "cannot signal worker %d", i);
    server_wait_workers(srv);
    metrics_add(M_RELOADS, METRICS_RELOAD_OK, 1);
    log_msg(LOG_INFO, "reload: generation %lu", g->id);
    *id = g->id;
    gen_unref(old); /* the server's; loops and exchanges hold their own */
    pthread_mutex_unlock(&srv->reload_mu);
    return 0;
}
