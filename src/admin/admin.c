/* admin.c — /healthz, /readyz, /metrics, the keys API and /-/reload
 * over evhttp on a thread of its own (docs/admin.md). Owns its event_base,
 * its evhttp, its store handle and its references to the current
 * configuration generation (the token and scope secret come from it) and
 * to the one its store borrows (a new store when a reload changed the
 * Redis settings, once no call of the old one is in flight). */
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

#include <arpa/inet.h>
#include <netinet/in.h>
#include <openssl/crypto.h>
#include <sys/queue.h>
#include <time.h>
#include <event2/keyvalq_struct.h>

#include "idemgate/config/config.h"
#include "idemgate/idem/fingerprint.h"
#include "idemgate/idem/record.h"
#include "idemgate/core/log.h"
#include "idemgate/core/metrics.h"
#include "idemgate/net/listen.h"
#include "idemgate/proxy/gen.h"
#include "idemgate/store/store.h"

struct admin {
    struct gen *gen;       /* the current generation, as last seen (a reference) */
    const struct cfg *cfg; /* gen->cfg */
    struct event_base *base;
    struct evhttp *http;
    struct store *store;
    struct gen *store_gen; /* the one store borrows (a reference) */
    unsigned inflight;     /* store calls not yet answered */
    admin_reload_fn *reload;
    void *reload_arg;
    struct store_memory_shared *mem; /* borrowed; NULL with the Redis store */
    struct store_lmdb_env *lmdb;     /* borrowed; NULL unless the LMDB store */
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

/* The current generation; a new store when the Redis settings changed and
 * the old one has nothing in flight. */
static void admin_refresh(struct admin *a)
{
    struct gen *g = gen_current();
    if (!g) return;
    if (g == a->gen) {
        gen_unref(g);
        return;
    }
    gen_unref(a->gen);
    a->gen = g;
    a->cfg = &g->cfg;
    if (a->mem || a->lmdb || a->inflight > 0 ||
        cfg_section_equal(&a->store_gen->cfg, &g->cfg, "redis"))
        return;
    store_free(a->store);
    gen_unref(a->store_gen);
    gen_ref(g);
    a->store_gen = g;
    a->store = store_redis_new(a->base, &g->cfg, g->tls);
}

struct ping_call {
    struct admin *a;
    struct evhttp_request *req;
};

static void on_ping(void *arg, int status)
{
    struct ping_call *pc = arg;
    struct evhttp_request *req = pc->req;
    pc->a->inflight--;
    free(pc);
    if (status == 1)
        reply_text(req, 200, "OK", "text/plain", "ready\n", 6);
    else
        reply_text(req, 503, "Service Unavailable", "text/plain", "store unavailable\n", 18);
}

static void on_readyz(struct evhttp_request *req, void *arg)
{
    struct admin *a = arg;
    admin_refresh(a);
    struct ping_call *pc = malloc(sizeof(*pc));
    if (!pc) abort();
    *pc = (struct ping_call){a, req};
    a->inflight++;
    store_ping(a->store, on_ping, pc);
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
    metrics_set(M_MEMORY_STORE_REFUSED, 0, (long long)st.refused);
    metrics_set(M_MEMORY_STORE_MAX_SCOPE_BYTES, 0, (long long)st.max_scope_bytes);
    metrics_set(M_MEMORY_STORE_SCOPES, 0, (long long)st.scopes);
}

/* The LMDB store's (its environment's, shared by every process on it). */
static void publish_lmdb_store(struct store_lmdb_env *env)
{
    struct store_lmdb_stats st;
    store_lmdb_stats(env, &st);
    metrics_set(M_LMDB_STORE_BYTES, 0, (long long)st.bytes);
    metrics_set(M_LMDB_STORE_FILE_BYTES, 0, (long long)st.file_bytes);
    metrics_set(M_LMDB_STORE_MAX_BYTES, 0, (long long)st.max_bytes);
    metrics_set(M_LMDB_STORE_ENTRIES, METRICS_ENTRY_IN_PROGRESS, (long long)st.locks);
    metrics_set(M_LMDB_STORE_ENTRIES, METRICS_ENTRY_COMPLETED, (long long)st.completed);
    metrics_set(M_LMDB_STORE_REFUSED, 0, (long long)st.refused);
    metrics_set(M_LMDB_STORE_SCOPES, 0, (long long)st.scopes);
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
    if (a->lmdb) {
        publish_lmdb_store(a->lmdb);
        groups |= METRICS_GROUP_LMDB_STORE;
    }
    metrics_render_groups(&b, groups);
    reply_text(req, 200, "OK", "text/plain; version=0.0.4", buf_data(&b), buf_size(&b));
    buf_free(&b);
}

/* ---- /keys/{key}: the admin API of one Idempotency-Key ---- */

static void reply_json(struct evhttp_request *req, int code, const char *reason, struct buf *b)
{
    reply_text(req, code, reason, "application/json", buf_data(b), buf_size(b));
}

static void reply_error(struct evhttp_request *req, int code, const char *reason, const char *msg)
{
    struct buf b;
    buf_init(&b);
    buf_append_str(&b, "{\"error\": \"");
    buf_append_json_str(&b, msg, strlen(msg));
    buf_append_str(&b, "\"}\n");
    reply_json(req, code, reason, &b);
    buf_free(&b);
}

/* The loopback rule: without admin.token only 127.0.0.0/8 and ::1. */
static bool peer_is_loopback(struct evhttp_request *req)
{
    struct evhttp_connection *conn = evhttp_request_get_connection(req);
    const struct sockaddr *sa = conn ? evhttp_connection_get_addr(conn) : NULL;
    if (!sa) return false;
    if (sa->sa_family == AF_INET)
        return (ntohl(((const struct sockaddr_in *)sa)->sin_addr.s_addr) >> 24) == 127;
    if (sa->sa_family == AF_INET6) {
        const struct in6_addr *a6 = &((const struct sockaddr_in6 *)sa)->sin6_addr;
        if (IN6_IS_ADDR_LOOPBACK(a6)) return true;
        return IN6_IS_ADDR_V4MAPPED(a6) && a6->s6_addr[12] == 127;
    }
    return false;
}

/* 0 when the request may use /keys or /-/reload (what), else the status
 * it was answered. */
static int admin_authorize(struct admin *a, struct evhttp_request *req, const char *what)
{
    const char *token = a->cfg->admin_token;
    if (!token || !token[0]) {
        if (peer_is_loopback(req)) return 0;
        char msg[128];
        snprintf(msg, sizeof(msg), "%s answers loopback clients only while admin.token is not set",
                 what);
        reply_error(req, 403, "Forbidden", msg);
        return 403;
    }
    const char *h = evhttp_find_header(evhttp_request_get_input_headers(req), "Authorization");
    size_t tl = strlen(token);
    if (h && strncmp(h, "Bearer ", 7) == 0 && strlen(h + 7) == tl &&
        CRYPTO_memcmp(h + 7, token, tl) == 0)
        return 0;
    evhttp_add_header(evhttp_request_get_output_headers(req), "WWW-Authenticate", "Bearer");
    reply_error(req, 401, "Unauthorized", "Authorization: Bearer <admin.token> required");
    return 401;
}

struct keys_call {
    struct admin *a;
    struct evhttp_request *req;
    bool forget;
    char key[512];
};

static void hex(struct buf *b, const uint8_t *p, size_t n)
{
    static const char digits[] = "0123456789abcdef";
    for (size_t i = 0; i < n; i++) {
        char two[2] = {digits[p[i] >> 4], digits[p[i] & 15]};
        buf_append(b, two, 2);
    }
}

static void iso_time(struct buf *b, uint64_t ms)
{
    time_t t = (time_t)(ms / 1000);
    struct tm tm;
    gmtime_r(&t, &tm);
    char out[40];
    strftime(out, sizeof(out), "%Y-%m-%dT%H:%M:%S", &tm);
    buf_printf(b, "\"%s.%03uZ\"", out, (unsigned)(ms % 1000));
}

/* The answer for what the store found. */
static void keys_answer(struct keys_call *kc, const struct store_key_info *k)
{
    struct evhttp_request *req = kc->req;
    if (k->found < 0) {
        reply_error(req, 503, "Service Unavailable", "store unavailable");
        return;
    }
    if (k->found == 0) {
        reply_error(req, 404, "Not Found", "no record or lock for this key in this scope");
        return;
    }
    if (kc->forget) {
        log_msg(LOG_WARN, "admin: deleted the %s of key %.*s", k->completed ? "record" : "lock",
                (int)k->skey_len, k->skey);
        evhttp_send_reply(req, 204, "No Content", NULL);
        return;
    }
    struct record rec;
    bool decoded =
        k->completed && record_decode(k->record, k->record_len, k->record_len, &rec) == 0;
    struct buf b;
    buf_init(&b);
    const char *colon = memchr(k->skey, ':', k->skey_len);
    size_t sl = colon ? (size_t)(colon - k->skey) : 0;
    buf_append_str(&b, "{\"key\": \"");
    buf_append_json_str(&b, colon ? colon + 1 : k->skey,
                        colon ? k->skey_len - sl - 1 : k->skey_len);
    buf_append_str(&b, "\", \"scope\": \"");
    buf_append_json_str(&b, k->skey, sl < 16 ? sl : 16);
    buf_append_str(&b, "\"");
    const char *state = !k->completed                     ? "in_progress"
                        : decoded && record_is_lost(&rec) ? "lost"
                                                          : "completed";
    buf_printf(&b, ", \"state\": \"%s\", \"created_at\": ", state);
    uint64_t created = decoded ? rec.created_ms : k->created_ms;
    if (created)
        iso_time(&b, created);
    else
        buf_append_str(&b, "null");
    if (k->ttl_ms >= 0)
        buf_printf(&b, ", \"expires_in_seconds\": %lld", (long long)((k->ttl_ms + 999) / 1000));
    else
        buf_append_str(&b, ", \"expires_in_seconds\": null");
    buf_append_str(&b, ", \"fingerprint\": \"");
    hex(&b, k->fp, STORE_FP_LEN);
    buf_append_str(&b, "\"");
    if (decoded) {
        buf_printf(&b, ", \"status\": %d, \"headers\": [", rec.status);
        bool first = true;
        for (size_t i = 0; i < rec.n_headers; i++) {
            if (rec.headers[i].name_len && rec.headers[i].name[0] == ':') continue; /* ours */
            buf_append_str(&b, first ? "\"" : ", \"");
            first = false;
            buf_append_json_str(&b, rec.headers[i].name, rec.headers[i].name_len);
            buf_append_str(&b, "\"");
        }
        buf_printf(&b, "], \"body_bytes\": %llu", (unsigned long long)rec.body_len);
    } else {
        buf_append_str(&b, ", \"status\": null, \"headers\": [], \"body_bytes\": null");
    }
    buf_append_str(&b, "}\n");
    reply_json(req, 200, "OK", &b);
    buf_free(&b);
}

static void keys_redis_done(void *arg, const struct store_key_info *k)
{
    struct keys_call *kc = arg;
    kc->a->inflight--;
    keys_answer(kc, k);
    free(kc);
}

static bool is_hex(const char *s, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (!((s[i] >= '0' && s[i] <= '9') || (s[i] >= 'a' && s[i] <= 'f'))) return false;
    return n > 0;
}

/* GET / DELETE /keys/{key}: the scope from Idempotency-Scope-Credential
 * (hashed as requests' credentials are), ?scope= (the hex the access line
 * shows: a prefix, or all 64 digits), else the anonymous scope. */
static void on_keys(struct evhttp_request *req, void *arg)
{
    struct admin *a = arg;
    enum evhttp_cmd_type cmd = evhttp_request_get_command(req);
    const struct evhttp_uri *u = evhttp_request_get_evhttp_uri(req);
    const char *path = u ? evhttp_uri_get_path(u) : NULL;
    if (!path || strncmp(path, "/keys/", 6) != 0 || !path[6]) {
        reply_error(req, 404, "Not Found", "not found");
        return;
    }
    if (cmd != EVHTTP_REQ_GET && cmd != EVHTTP_REQ_DELETE) {
        evhttp_add_header(evhttp_request_get_output_headers(req), "Allow", "GET, DELETE");
        reply_error(req, 405, "Method Not Allowed", "GET or DELETE");
        return;
    }
    admin_refresh(a);
    if (admin_authorize(a, req, "/keys")) return;
    size_t klen = 0;
    char *key = evhttp_uridecode(path + 6, 0, &klen);
    bool key_ok = key && klen >= 1 && klen <= 255;
    for (size_t i = 0; key_ok && i < klen; i++)
        key_ok = key[i] > 0x20 && key[i] < 0x7f;
    if (!key_ok) {
        free(key);
        reply_error(req, 400, "Bad Request", "the key must be 1 to 255 visible ASCII characters");
        return;
    }
    char scope[SCOPE_HEX_LEN + 1];
    bool prefix = false;
    const char *cred =
        evhttp_find_header(evhttp_request_get_input_headers(req), "Idempotency-Scope-Credential");
    struct evkeyvalq q;
    TAILQ_INIT(&q);
    const char *query = evhttp_uri_get_query(u);
    const char *qs =
        query && evhttp_parse_query_str(query, &q) == 0 ? evhttp_find_header(&q, "scope") : NULL;
    if (cred && cred[0]) {
        const char *secret = a->cfg->idem.scope_secret ? a->cfg->idem.scope_secret : "";
        scope_hash(secret, strlen(secret), cred, strlen(cred), scope);
    } else if (qs) {
        size_t n = strlen(qs);
        if (n > SCOPE_HEX_LEN || (!is_hex(qs, n) && strcmp(qs, SCOPE_ANONYMOUS) != 0)) {
            evhttp_clear_headers(&q);
            free(key);
            reply_error(req, 400, "Bad Request",
                        "scope must be hex digits of a scope hash (as access lines show it)");
            return;
        }
        snprintf(scope, sizeof(scope), "%s", qs);
        prefix = n < SCOPE_HEX_LEN && strcmp(qs, SCOPE_ANONYMOUS) != 0;
    } else {
        snprintf(scope, sizeof(scope), "%s", SCOPE_ANONYMOUS);
    }
    evhttp_clear_headers(&q);
    struct keys_call *kc = calloc(1, sizeof(*kc));
    if (!kc) abort();
    kc->a = a;
    kc->req = req;
    kc->forget = cmd == EVHTTP_REQ_DELETE;
    int sl = snprintf(kc->key, sizeof(kc->key), "%s:%.*s", scope, (int)klen, key);
    free(key);
    if (a->mem || a->lmdb) {
        struct store_key_info k;
        if (a->mem)
            store_memory_shared_key(a->mem, kc->key, (size_t)sl, prefix, kc->forget, &k);
        else
            store_lmdb_key(a->lmdb, kc->key, (size_t)sl, prefix, kc->forget, &k);
        keys_answer(kc, &k);
        store_key_info_free(&k);
        free(kc);
        return;
    }
    a->inflight++;
    store_redis_key(a->store, kc->key, (size_t)sl, prefix, kc->forget, keys_redis_done, kc);
}

/* POST /-/reload: as SIGHUP does; 200 with the new generation, or 400
 * with the error (the line -t prints) and the old one kept. */
static void on_reload(struct evhttp_request *req, void *arg)
{
    struct admin *a = arg;
    admin_refresh(a);
    if (evhttp_request_get_command(req) != EVHTTP_REQ_POST) {
        evhttp_add_header(evhttp_request_get_output_headers(req), "Allow", "POST");
        reply_error(req, 405, "Method Not Allowed", "POST");
        return;
    }
    if (admin_authorize(a, req, "/-/reload")) return;
    char err[512] = "";
    unsigned long id = 0;
    bool ok = a->reload(a->reload_arg, err, sizeof(err), &id) == 0;
    struct buf b;
    buf_init(&b);
    buf_printf(&b, "{\"result\": \"%s\", \"generation\": %lu", ok ? "ok" : "failed", id);
    if (!ok) {
        buf_append_str(&b, ", \"error\": \"");
        buf_append_json_str(&b, err, strlen(err));
        buf_append_str(&b, "\"");
    }
    buf_append_str(&b, "}\n");
    reply_json(req, ok ? 200 : 400, ok ? "OK" : "Bad Request", &b);
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
    gen_unref(a->store_gen);
    gen_unref(a->gen);
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

struct admin *admin_start(int listen_fd, struct store_memory_shared *mem,
                          struct store_lmdb_env *lmdb, admin_reload_fn *reload, void *reload_arg)
{
    struct admin *a = calloc(1, sizeof(*a));
    if (!a) abort();
    a->stop_fd = -1;
    a->mem = mem;
    a->lmdb = lmdb;
    a->reload = reload;
    a->reload_arg = reload_arg;
    a->gen = gen_current();
    a->cfg = &a->gen->cfg;
    const struct cfg *cfg = a->cfg;
    struct event_config *ec = event_config_new();
    event_config_set_flag(ec, EVENT_BASE_FLAG_EPOLL_USE_CHANGELIST);
    a->base = event_base_new_with_config(ec);
    event_config_free(ec);
    a->http = evhttp_new(a->base);
    /* Every method reaches the callbacks: /keys answers 405 with Allow. */
    evhttp_set_allowed_methods(a->http, EVHTTP_REQ_GET | EVHTTP_REQ_HEAD | EVHTTP_REQ_DELETE |
                                            EVHTTP_REQ_POST | EVHTTP_REQ_PUT | EVHTTP_REQ_PATCH |
                                            EVHTTP_REQ_OPTIONS);
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
    evhttp_set_cb(a->http, "/-/reload", on_reload, a);
    evhttp_set_gencb(a->http, on_keys, a);
    gen_ref(a->gen);
    a->store_gen = a->gen;
    if (cfg->store == CFG_STORE_MEMORY)
        a->store = store_memory_new(a->base, mem, cfg->redis.timeout_ms);
    else if (cfg->store == CFG_STORE_LMDB)
        a->store = store_lmdb_new(a->base, lmdb);
    else
        a->store = store_redis_new(a->base, cfg, a->gen->tls);
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
