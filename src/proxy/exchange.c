/* exchange.c — one request's life (see exchange.h): created from a
 * complete request on a front, it starts the engine, implements the
 * engine's host ops (forward through relay.c, answers through answer.c,
 * the engine's timer, references), lets the front go when its answer is
 * queued (held for an owner until the engine is done), writes the access
 * line, and is freed by its last reference into the loop's cache.
 *
 * Owns struct exchange. Does not own the front (client.c and front_h1.c,
 * h2.c), the upstream side (relay.c), the engine's decisions
 * (idem/engine.c). */
#include "idemgate/proxy/exchange.h"

#include <assert.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <event2/event.h>

#include "idemgate/config/config.h"
#include "idemgate/core/clock.h"
#include "idemgate/core/fsm.h"
#include "idemgate/core/log.h"
#include "idemgate/proxy/access.h"
#include "idemgate/proxy/answer.h"
#include "idemgate/proxy/checks.h"
#include "idemgate/proxy/loop.h"
#include "idemgate/proxy/relay.h"
#include "idemgate/proxy/upstream.h"

/* Freed exchanges a loop keeps for reuse. */
#define EX_CACHE_MAX 64

/* --------------------------------------------------------------- state */

/* Legal transitions: from -> bitmask of to. */
static const unsigned ex_transitions[EX__COUNT] = {
    [EX_NEW] = 1u << EX_FORWARDING | 1u << EX_DONE,
    [EX_FORWARDING] = 1u << EX_STREAMING | 1u << EX_ENDED,
    [EX_STREAMING] = 1u << EX_ENDED,
    [EX_ENDED] = 1u << EX_DONE,
    [EX_DONE] = 0,
};

#define EX_STATE_NAME(id, name) name,
static const char *const ex_state_names[] = {STATES_EXCHANGE(EX_STATE_NAME)};
#undef EX_STATE_NAME

static const struct fsm ex_fsm = {"exchange", ex_state_names, EX__COUNT, ex_transitions,
                                  METRICS_SET_EXCHANGE};

/* Its gauge is named at load, before anything serves /metrics. */
__attribute__((constructor)) static void ex_fsm_register(void)
{
    fsm_register(&ex_fsm);
}

void exchange_set_state(struct exchange *ex, enum ex_state to)
{
    ex->state = fsm_next(&ex_fsm, (int)ex->state, (int)to);
}

/* --------------------------------------------------------- access line */

/* One access line (docs/logs.md) and the outcome counted, once. */
static void ex_access_log(struct exchange *ex)
{
    ex->logged = true;
    struct access_fields f = {ex->request_id,  ex->request_id_len, ex->head.method,
                              ex->head.target, ex->status,         idem_outcome(&ex->idem),
                              ex->start_ms,    ex->upstream_ms};
    struct buf b;
    if (!access_begin(ex->cfg, &f, &b)) return;
    if (ex->server_addr) log_kv_str(&b, "upstream_addr", ex->server_addr, strlen(ex->server_addr));
    if (ex->tries > 1) log_kv_int(&b, "upstream_tries", (long long)ex->tries);
    const char *scope, *key;
    size_t scope_len, key_len;
    if (idem_scope_key(&ex->idem, &scope, &scope_len, &key, &key_len)) {
        log_kv_str(&b, "scope", scope, scope_len);
        log_kv_str(&b, "key", key, key_len);
    }
    access_end(&b, &ex->head);
}

/* ------------------------------------------------------------ lifetime */

void exchange_ref(struct exchange *ex)
{
    ex->refs++;
}

static void ex_free_timers(struct exchange *ex)
{
    if (ex->up_timer) event_free(ex->up_timer);
    if (ex->idem_timer) event_free(ex->idem_timer);
    ex->up_timer = ex->idem_timer = NULL;
}

static void ex_free(struct exchange *ex)
{
    struct loop *l = ex->loop;
    /* A client that left before its answer: the exchange went on, and is
     * logged and counted now (its request bytes were moved into ex->req). */
    if (!ex->logged) ex_access_log(ex);
    if (ex->server && !ex->server_reported) upstream_report(ex->server, UPSTREAM_NEUTRAL);
    idem_free(&ex->idem);
    fsm_leave(&ex_fsm, (int)ex->state);
    if (ex->idem_timer) evtimer_del(ex->idem_timer);
    if (ex->up_timer) evtimer_del(ex->up_timer);
    buf_free(&ex->req);
    buf_free(&ex->body_buf);
    buf_free(&ex->target);
    loop_gen_unref(ex->gen);
    ex->gen = NULL;
    l->n_exchanges--;
    /* Keep a few, timers included, for the next requests: no per-request
     * malloc of the ~7 KiB exchange or of its two timers. */
    if (l->n_ex_cache < EX_CACHE_MAX) {
        *(struct exchange **)ex = l->ex_cache;
        l->ex_cache = ex;
        l->n_ex_cache++;
    } else {
        ex_free_timers(ex);
        free(ex);
    }
    loop_maybe_idle(l);
}

void exchange_cache_free(struct loop *l)
{
    while (l->ex_cache) {
        struct exchange *ex = l->ex_cache;
        l->ex_cache = *(struct exchange **)ex;
        ex_free_timers(ex);
        free(ex);
    }
    l->n_ex_cache = 0;
}

void exchange_unref(struct exchange *ex)
{
    assert(ex->refs > 0);
    if (--ex->refs == 0) ex_free(ex);
}

/* The front got its whole answer (or a cut one): it may go on (read its
 * next request) while the exchange finishes its store work. */
static void ex_detach_front(struct exchange *ex)
{
    void *front = ex->front;
    if (!front) return;
    const struct front_ops *ops = ex->fops;
    enum front_end how = ex->front_abort ? FRONT_END_ABORT : FRONT_END_DONE;
    ex_access_log(ex);
    ex->front = NULL;
    exchange_unref(ex); /* the front's reference */
    ops->end(front, how);
}

/* The owner of a key keeps the last bytes of its answer until the store
 * has the outcome (record kept, or key released; the engine's done then
 * lets the front go): a client that retries the moment it has the whole
 * answer finds the replay, or a free key, never a 409 of its own lock. */
bool exchange_holds(const struct exchange *ex)
{
    return idem_is_owner(&ex->idem) && !idem_is_done(&ex->idem);
}

void exchange_answered(struct exchange *ex)
{
    if (ex->front && exchange_holds(ex))
        ex->fops->end(ex->front, FRONT_END_HOLD);
    else
        ex_detach_front(ex);
}

void exchange_front_gone(struct exchange *ex, struct buf *req_bytes, struct buf *body_bytes)
{
    /* Moving the structs keeps the bytes, and the slices into them, in
     * place. */
    buf_swap(&ex->req, req_bytes);
    buf_swap(&ex->body_buf, body_bytes);
    ex->front = NULL;
    relay_client_gone(ex);
    exchange_unref(ex);
}

void exchange_front_drained(struct exchange *ex)
{
    relay_client_drained(ex);
}

/* ---------------------------------------------------- the engine's host */

static void host_forward(void *host)
{
    relay_forward(host);
}

static void host_answer(void *host, enum err_code e, bool replayed, uint32_t retry_s)
{
    answer_error(host, e, replayed, retry_s);
}

static void host_replay(void *host, const struct record *r)
{
    answer_replay(host, r);
}

/* The engine is finished: an answer it held is let go, and its
 * reference dropped. */
static void host_done(void *host)
{
    struct exchange *ex = host;
    exchange_set_state(ex, EX_DONE); /* from NEW (answered) or ENDED (relayed) */
    ex_detach_front(ex);
    exchange_unref(ex);
}

static void host_hold(void *host)
{
    exchange_ref(host);
}

static void host_release(void *host)
{
    exchange_unref(host);
}

static void host_timer_cb(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    struct exchange *ex = arg;
    idem_timer_fired(&ex->idem);
}

static void host_timer_arm(void *host, uint32_t ms)
{
    struct exchange *ex = host;
    if (!ex->idem_timer) ex->idem_timer = evtimer_new(ex->loop->base, host_timer_cb, ex);
    struct timeval tv = clock_tv((uint64_t)ms);
    evtimer_add(ex->idem_timer, &tv);
}

static void host_timer_cancel(void *host)
{
    struct exchange *ex = host;
    if (ex->idem_timer) evtimer_del(ex->idem_timer);
}

static const struct idem_host_ops ex_host_ops = {
    .forward = host_forward,
    .answer = host_answer,
    .replay = host_replay,
    .done = host_done,
    .hold = host_hold,
    .release = host_release,
    .timer_arm = host_timer_arm,
    .timer_cancel = host_timer_cancel,
};

/* ------------------------------------------------------------- start */

/* A cached exchange (its timers kept, bound to it and the loop's base),
 * or a new one; zeroed but for the big request head, which is written
 * next. */
static struct exchange *ex_alloc(struct loop *l)
{
    struct exchange *ex = l->ex_cache;
    if (!ex) {
        ex = calloc(1, sizeof(*ex));
        if (!ex) abort();
        return ex;
    }
    l->ex_cache = *(struct exchange **)ex;
    l->n_ex_cache--;
    struct event *up_timer = ex->up_timer, *idem_timer = ex->idem_timer;
    memset(ex, 0, offsetof(struct exchange, head));
    memset(&ex->head + 1, 0, sizeof(*ex) - offsetof(struct exchange, head) - sizeof(ex->head));
    ex->up_timer = up_timer;
    ex->idem_timer = idem_timer;
    return ex;
}

/* A normalized target (and authority), when normalization changed the
 * target, is copied into the exchange: route, fingerprint, access line and
 * upstream all see it (docs/requests.md), and it outlives the front. */
static void ex_take_target(struct exchange *ex, const struct front_request *req)
{
    if (!req->target.p && !req->authority.p) return;
    struct http1_slice t = req->target.p ? req->target : ex->head.target;
    buf_reset(&ex->target);
    buf_append(&ex->target, t.p, t.n);
    buf_append(&ex->target, req->authority.p, req->authority.n);
    const char *p = buf_data(&ex->target);
    ex->head.target = (struct http1_slice){p, t.n};
    if (req->authority.p) ex->authority = (struct http1_slice){p + t.n, req->authority.n};
}

/* Header names with an underscore are dropped, as nginx does by default:
 * a proxy behind us may map X_Api_Key and X-Api-Key to one name. */
static void ex_drop_underscore_headers(struct http1_head *h)
{
    size_t o = 0;
    for (size_t i = 0; i < h->n_headers; i++) {
        if (memchr(h->headers[i].name.p, '_', h->headers[i].name.n)) continue;
        if (o != i) h->headers[o] = h->headers[i];
        o++;
    }
    h->n_headers = o;
}

/* The request head, body and id from the front. */
static void ex_take_request(struct exchange *ex, const struct front_request *req)
{
    const struct http1_head *h = req->head;
    memcpy(&ex->head, h,
           offsetof(struct http1_head, headers) + h->n_headers * sizeof(h->headers[0]));
    ex_take_target(ex, req);
    ex_drop_underscore_headers(&ex->head);
    size_t pl = strnlen(req->peer, sizeof(ex->peer) - 1);
    memcpy(ex->peer, req->peer, pl);
    ex->peer[pl] = '\0';
    ex->front_tls = req->tls;
    ex->body = req->body;
    ex->body_len = req->body_len;
    const struct http1_header *rid = http1_find_header(&ex->head, "x-request-id", NULL);
    if (rid && rid->value.n > 0 && rid->value.n < sizeof(ex->request_id)) {
        memcpy(ex->request_id, rid->value.p, rid->value.n);
        ex->request_id_len = rid->value.n;
        ex->request_id_from_client = true;
    } else {
        ex->request_id_len = access_request_id(ex->loop, ex->request_id);
    }
}

void exchange_start(struct loop *l, const struct front_request *req, const struct front_ops *ops,
                    void *front, struct exchange **slot)
{
    struct exchange *ex = ex_alloc(l);
    l->n_exchanges++;
    ex->refs = 2; /* the front's and the engine's */
    ex->loop = l;
    ex->front = front;
    ex->fops = ops;
    ex->state = EX_NEW;
    fsm_enter(&ex_fsm, EX_NEW);
    ex->start_ms = clock_now_ms();
    ex->gen = loop_gen_ref(l);
    ex->cfg = ex->gen->cfg;
    buf_init(&ex->req);
    buf_init(&ex->body_buf);
    buf_init(&ex->target);
    ex_take_request(ex, req);
    const struct cfg *cfg = ex->cfg;
    const struct cfg_route *route = cfg_route_for(cfg, ex->head.target.p, ex->head.target.n);
    ex->idem_cfg = route ? &route->idem : &cfg->idem;
    ex->group =
        &ex->gen->groups[route ? upstream_group_index(cfg, (size_t)(route - cfg->routes)) : 0];
    ex->server = NULL;
    ex->tries = 0;
    ex->server_reported = true;
    ex->server_addr = NULL;
    idem_init(&ex->idem, &ex->gen->idem_env, &ex_host_ops, ex);
    struct idem_request ireq = {
        .head = &ex->head,
        .body = ex->body,
        .body_len = ex->body_len,
        .id = ex->request_id,
        .id_len = ex->request_id_len,
        .rl = route ? &route->ratelimit : &cfg->ratelimit,
        .peer = ex->peer,
    };
    /* The route's checks (a webhook's signature and key) see the target
     * as sent, next to the normalized one. */
    struct check_request creq = {&ex->head, req->head->target, ex->body, ex->body_len};
    struct check_out cout;
    checks_run(route, &creq, &ireq, &cout);
    *slot = ex;
    idem_start(&ex->idem, ex->idem_cfg, cfg->redis.failure_mode == CFG_FAIL_OPEN, &ireq);
    ex->idem.req.given = NULL; /* it pointed at cout */
}
