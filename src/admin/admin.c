/* admin.c — /healthz, /readyz and /metrics over evhttp on a thread of its
 * own. Owns its event_base, its evhttp and its store handle. */
#include "idemgate/admin/admin.h"

#include <errno.h>
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
#include "idemgate/net/listen.h"
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

/* The memory store's own gauges and counters (its table, not requests):
 * the MEMORY_STORE rows of METRICS(X), read from the table just before
 * they are rendered. */
static void publish_memory_store(struct store_memory_shared *mem)
{
    struct store_memory_stats st;
    store_memory_shared_stats(mem, &st);
    metrics_set(M_MEMORY_STORE_BYTES, 0, (long long)st.bytes);
    metrics_set(M_MEMORY_STORE_MAX_BYTES, 0, (long long)st.max_bytes);
    metrics_set(M_MEMORY_STORE_ENTRIES, METRICS_ENTRY_IN_PROGRESS, (long long)st.locks);
    metrics_set(M_MEMORY_STORE_ENTRIES, METRICS_ENTRY_COMPLETED, (long long)st.completed);
    metrics_set(M_MEMORY_STORE_EVICTIONS, 0, (long long)st.evictions);
    metrics_set(M_MEMORY_STORE_REFUSED, 0, (long long)st.refused);
    metrics_set(M_MEMORY_STORE_MAX_SCOPE_BYTES, 0, (long long)st.max_scope_bytes);
    metrics_set(M_MEMORY_STORE_SCOPES, 0, (long long)st.scopes);
}

static void on_metrics(struct evhttp_request *req, void *arg)
{
    struct admin *a = arg;
    struct buf b;
    buf_init(&b);
    unsigned groups = METRICS_GROUP_ALWAYS;
    if (a->mem) {
        publish_memory_store(a->mem);
        groups |= METRICS_GROUP_MEMORY_STORE;
    }
    metrics_render_groups(&b, groups);
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

int admin_listen(const struct cfg *cfg)
{
    /* Our own socket, so that a failure says why (evhttp_bind_socket
     * loses errno). */
    const struct cfg_addr *la = &cfg->admin_listen;
    struct sockaddr_storage ss;
    socklen_t sl;
    char err[256];
    if (listen_resolve(la->host, la->port, la->text, &ss, &sl, err, sizeof(err)) < 0) {
        log_msg(LOG_ERROR, "admin: %s", err);
        return -1;
    }
    int fd = listen_bind((struct sockaddr *)&ss, sl, false, 128);
    if (fd < 0)
        log_msg(LOG_ERROR, "cannot listen on admin address %s: %s", la->text, strerror(errno));
    return fd;
}

struct admin *admin_start(const struct cfg *cfg, int listen_fd, struct store_memory_shared *mem)
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
    if (!evhttp_accept_socket_with_handle(a->http, listen_fd)) {
        log_msg(LOG_ERROR, "cannot listen on admin address %s: cannot watch the socket",
                cfg->admin_listen.text);
        close(listen_fd);
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
