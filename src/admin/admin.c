/* admin.c — /healthz, /readyz and /metrics over evhttp on a thread of its
 * own. Owns its event_base, its evhttp and its store handle. */
#include "idemgate/admin/admin.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <event2/buffer.h>
#include <event2/event.h>
#include <event2/http.h>

#include "idemgate/config/config.h"
#include "idemgate/core/log.h"
#include "idemgate/core/metrics.h"
#include "idemgate/store/store.h"

struct admin {
    struct event_base *base;
    struct evhttp *http;
    struct store *store;
    struct store_memory_shared *mem; /* borrowed; NULL with the Redis store */
    struct event *stop_ev;
    int stop_fd;
    pthread_t thread;
};

static void reply_text(struct evhttp_request *req, int code, const char *reason, const char *ctype,
                       const char *body, size_t n)
{
    struct evbuffer *b = evbuffer_new();
    evbuffer_add(b, body, n);
    evhttp_add_header(evhttp_request_get_output_headers(req), "Content-Type", ctype);
    evhttp_send_reply(req, code, reason, b);
    evbuffer_free(b);
}

static void on_healthz(struct evhttp_request *req, void *arg)
{
    (void)arg;
    reply_text(req, 200, "OK", "text/plain", "ok\n", 3);
}

static void on_ping(void *arg, int status)
{
    struct evhttp_request *req = arg;
    if (status == 1)
        reply_text(req, 200, "OK", "text/plain", "ready\n", 6);
    else
        reply_text(req, 503, "Service Unavailable", "text/plain", "store unavailable\n", 18);
}

static void on_readyz(struct evhttp_request *req, void *arg)
{
    struct admin *a = arg;
    store_ping(a->store, on_ping, req);
}

/* The memory store's own gauges and counters (its table, not requests). */
static void render_memory_store(struct buf *b, struct store_memory_shared *mem)
{
    struct store_memory_stats st;
    store_memory_shared_stats(mem, &st);
    buf_printf(b,
               "# HELP idemgate_memory_store_bytes Bytes charged to the memory store.\n"
               "# TYPE idemgate_memory_store_bytes gauge\nidemgate_memory_store_bytes %llu\n"
               "# HELP idemgate_memory_store_max_bytes memory.max_bytes (0: no limit).\n"
               "# TYPE idemgate_memory_store_max_bytes gauge\n"
               "idemgate_memory_store_max_bytes %llu\n"
               "# HELP idemgate_memory_store_entries Keys held, by state.\n"
               "# TYPE idemgate_memory_store_entries gauge\n"
               "idemgate_memory_store_entries{state=\"in_progress\"} %zu\n"
               "idemgate_memory_store_entries{state=\"completed\"} %zu\n"
               "# HELP idemgate_memory_store_evictions_total Completed records evicted for room.\n"
               "# TYPE idemgate_memory_store_evictions_total counter\n"
               "idemgate_memory_store_evictions_total %llu\n"
               "# HELP idemgate_memory_store_refused_total Operations refused: only locks left.\n"
               "# TYPE idemgate_memory_store_refused_total counter\n"
               "idemgate_memory_store_refused_total %llu\n",
               (unsigned long long)st.bytes, (unsigned long long)st.max_bytes, st.locks,
               st.completed, (unsigned long long)st.evictions, (unsigned long long)st.refused);
    buf_printf(b,
               "# HELP idemgate_memory_store_max_scope_bytes memory.max_scope_bytes (0: none).\n"
               "# TYPE idemgate_memory_store_max_scope_bytes gauge\n"
               "idemgate_memory_store_max_scope_bytes %llu\n"
               "# HELP idemgate_memory_store_scopes Scopes (credentials) holding an entry.\n"
               "# TYPE idemgate_memory_store_scopes gauge\nidemgate_memory_store_scopes %zu\n",
               (unsigned long long)st.max_scope_bytes, st.scopes);
}

static void on_metrics(struct evhttp_request *req, void *arg)
{
    struct admin *a = arg;
    struct buf b;
    buf_init(&b);
    metrics_render(&b);
    if (a->mem) render_memory_store(&b, a->mem);
    reply_text(req, 200, "OK", "text/plain; version=0.0.4", buf_data(&b), buf_size(&b));
    buf_free(&b);
}

static void on_stop(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    struct admin *a = arg;
    event_base_loopbreak(a->base);
}

static void *admin_main(void *arg)
{
    struct admin *a = arg;
    event_base_dispatch(a->base);
    return NULL;
}

static void admin_free(struct admin *a)
{
    if (a->http) evhttp_free(a->http);
    if (a->store) store_free(a->store);
    if (a->stop_ev) event_free(a->stop_ev);
    if (a->stop_fd >= 0) close(a->stop_fd);
    if (a->base) event_base_free(a->base);
    free(a);
}

struct admin *admin_start(const struct cfg *cfg, struct store_memory_shared *mem)
{
    struct admin *a = calloc(1, sizeof(*a));
    if (!a) abort();
    a->stop_fd = -1;
    a->mem = mem;
    struct event_config *ec = event_config_new();
    event_config_set_flag(ec, EVENT_BASE_FLAG_EPOLL_USE_CHANGELIST);
    a->base = event_base_new_with_config(ec);
    event_config_free(ec);
    a->http = evhttp_new(a->base);
    evhttp_set_allowed_methods(a->http, EVHTTP_REQ_GET | EVHTTP_REQ_HEAD);
    if (evhttp_bind_socket(a->http, cfg->admin_listen.host, (ev_uint16_t)cfg->admin_listen.port) !=
        0) {
        log_msg(LOG_ERROR, "cannot listen on admin address %s", cfg->admin_listen.text);
        admin_free(a);
        return NULL;
    }
    evhttp_set_cb(a->http, "/healthz", on_healthz, a);
    evhttp_set_cb(a->http, "/readyz", on_readyz, a);
    evhttp_set_cb(a->http, "/metrics", on_metrics, a);
    a->store = cfg->store == CFG_STORE_MEMORY
                   ? store_memory_new(a->base, mem, cfg->redis.timeout_ms)
                   : store_redis_new(a->base, cfg);
    a->stop_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    a->stop_ev = event_new(a->base, a->stop_fd, EV_READ | EV_PERSIST, on_stop, a);
    event_add(a->stop_ev, NULL);
    if (pthread_create(&a->thread, NULL, admin_main, a) != 0) {
        admin_free(a);
        return NULL;
    }
    return a;
}

void admin_stop(struct admin *a)
{
    if (!a) return;
    uint64_t one = 1;
    if (write(a->stop_fd, &one, sizeof(one)) < 0) log_msg(LOG_ERROR, "cannot stop admin thread");
    pthread_join(a->thread, NULL);
    admin_free(a);
}
