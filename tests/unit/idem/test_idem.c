/* test_idem.c — the idempotency engine (idem/engine.c) without sockets.
 *
 * The engine runs behind its interface (engine.h) with a fake host of this
 * file's own: the host's ops only record what the engine decided (forward,
 * answer, replay), count references, and keep the engine's one timer as a
 * due time on a fake clock (core/clock.h) that the tests advance, so no
 * test sleeps. The store is a scripted fake (replies delivered from
 * zero-delay events, like the real backends) or, for one round trip, the
 * memory store. Tests play the upstream by calling idem_response_head /
 * _body / _end. Every host must end with the engine DONE, only the test's
 * reference left and no timer armed (leaks are caught under ASan). This
 * program links only the engine, the stores, record, fingerprint, http1,
 * config and core: nothing of the proxy. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <event2/event.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>

#include "idemgate/config/config.h"
#include "idemgate/core/clock.h"
#include "idemgate/core/log.h"
#include "idemgate/core/metrics.h"
#include "idemgate/http/http1.h"
#include "idemgate/idem/engine.h"
#include "idemgate/idem/record.h"
#include "idemgate/store/store.h"

#define MAX_HEAD 65536
#define MAX_HOSTS 8

/* ---------------------------------------------------------- what happened */

/* What the engine asked of its hosts in the current test. */
static struct {
    int forwards;
    int errors;
    enum err_code last_error;
    bool last_replayed;
    int replays;
    struct buf replay; /* the last replayed record, re-encoded */
} calls;

static void calls_reset(void)
{
    calls.forwards = calls.errors = calls.replays = 0;
}

static uint64_t fake_now = 1000000; /* ms, the fake clock */

/* ------------------------------------------------------- the fake store */

#define SCRIPT_MAX 8

struct fake_store {
    struct store base;
    struct event_base *evb;
    /* script: acquire replies in order, the last one repeating */
    enum store_acquire_state script[SCRIPT_MAX];
    size_t n_script, next;
    struct buf reply_record; /* the record of a COMPLETED reply */
    int complete_status, release_status, renew_status;
    /* observations */
    int acquires, completes, releases, renews, pending;
    char skey[1024];
    size_t skey_len;
    char token[STORE_TOKEN_LEN + 1];
    uint8_t fp[STORE_FP_LEN];
    uint32_t lock_ms, renew_lock_ms, ttl;
    int foreign_ops; /* complete/release/renew with another skey or token */
    bool hold;       /* keep replies back until fake_unhold */
    struct fake_op *held[SCRIPT_MAX];
    size_t n_held;
    struct buf record; /* the record given to complete */
};

struct fake_op {
    struct fake_store *fs;
    store_acquire_cb acq_cb;
    store_done_cb done_cb;
    void *arg;
    enum store_acquire_state state;
    int status;
};

static void fake_fire(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    struct fake_op *op = arg;
    op->fs->pending--;
    if (op->acq_cb) {
        struct store_acquire_reply r = {.state = op->state};
        if (op->state == STORE_ACQ_COMPLETED) {
            /* Borrowed only for the callback: a copy catches a late use. */
            size_t n = buf_size(&op->fs->reply_record);
            uint8_t *copy = malloc(n ? n : 1);
            assert_non_null(copy);
            memcpy(copy, buf_data(&op->fs->reply_record), n);
            r.record = copy;
            r.record_len = n;
            op->acq_cb(op->arg, &r);
            free(copy);
        } else {
            op->acq_cb(op->arg, &r);
        }
    } else {
        op->done_cb(op->arg, op->status);
    }
    free(op);
}

static void fake_schedule(struct fake_store *fs, struct fake_op *op)
{
    static const struct timeval zero = {0, 0};
    assert_int_equal(event_base_once(fs->evb, -1, EV_TIMEOUT, fake_fire, op, &zero), 0);
}

static void fake_defer(struct fake_store *fs, struct fake_op *op)
{
    op->fs = fs;
    fs->pending++;
    if (fs->hold) {
        assert_true(fs->n_held < SCRIPT_MAX);
        fs->held[fs->n_held++] = op;
        return;
    }
    fake_schedule(fs, op);
}

/* Lets the held replies go (on the next turn of the loop). */
static void fake_unhold(struct fake_store *fs)
{
    fs->hold = false;
    for (size_t i = 0; i < fs->n_held; i++)
        fake_schedule(fs, fs->held[i]);
    fs->n_held = 0;
}

static void fake_check_owner(struct fake_store *fs, const char *skey, size_t skey_len,
                             const char token[STORE_TOKEN_LEN])
{
    if (skey_len != fs->skey_len || memcmp(skey, fs->skey, skey_len) != 0 ||
        memcmp(token, fs->token, STORE_TOKEN_LEN) != 0)
        fs->foreign_ops++;
}

static void fake_acquire(struct store *s, const struct store_acquire_req *req, store_acquire_cb cb,
                         void *arg)
{
    const char *skey = req->skey, *token = req->token;
    size_t skey_len = req->skey_len;
    const uint8_t *fp = req->fp;
    uint32_t lock_ms = req->lock_ms;
    struct fake_store *fs = (struct fake_store *)s;
    assert_true(fs->n_script > 0);
    assert_true(skey_len < sizeof(fs->skey));
    fs->acquires++;
    memcpy(fs->skey, skey, skey_len);
    fs->skey[skey_len] = '\0';
    fs->skey_len = skey_len;
    memcpy(fs->token, token, STORE_TOKEN_LEN);
    fs->token[STORE_TOKEN_LEN] = '\0';
    memcpy(fs->fp, fp, STORE_FP_LEN);
    fs->lock_ms = lock_ms;
    struct fake_op *op = calloc(1, sizeof(*op));
    assert_non_null(op);
    op->acq_cb = cb;
    op->arg = arg;
    op->state = fs->script[fs->next];
    if (fs->next + 1 < fs->n_script) fs->next++;
    fake_defer(fs, op);
}

static void fake_done(struct fake_store *fs, int status, store_done_cb cb, void *arg)
{
    struct fake_op *op = calloc(1, sizeof(*op));
    assert_non_null(op);
    op->done_cb = cb;
    op->arg = arg;
    op->status = status;
    fake_defer(fs, op);
}

static void fake_complete(struct store *s, const char *skey, size_t skey_len,
                          const char token[STORE_TOKEN_LEN], const uint8_t *record,
                          size_t record_len, uint32_t ttl_seconds, store_done_cb cb, void *arg)
{
    struct fake_store *fs = (struct fake_store *)s;
    fs->completes++;
    fake_check_owner(fs, skey, skey_len, token);
    buf_reset(&fs->record);
    buf_append(&fs->record, record, record_len);
    fs->ttl = ttl_seconds;
    fake_done(fs, fs->complete_status, cb, arg);
}

static void fake_release(struct store *s, const char *skey, size_t skey_len,
                         const char token[STORE_TOKEN_LEN], store_done_cb cb, void *arg)
{
    struct fake_store *fs = (struct fake_store *)s;
    fs->releases++;
    fake_check_owner(fs, skey, skey_len, token);
    fake_done(fs, fs->release_status, cb, arg);
}

static void fake_renew(struct store *s, const char *skey, size_t skey_len,
                       const char token[STORE_TOKEN_LEN], uint32_t lock_ms, store_done_cb cb,
                       void *arg)
{
    struct fake_store *fs = (struct fake_store *)s;
    fs->renews++;
    fake_check_owner(fs, skey, skey_len, token);
    fs->renew_lock_ms = lock_ms;
    fake_done(fs, fs->renew_status, cb, arg);
}

static void fake_ping(struct store *s, store_done_cb cb, void *arg)
{
    fake_done((struct fake_store *)s, 1, cb, arg);
}

static void fake_free(struct store *s)
{
    (void)s; /* embedded in the fixture */
}

static const struct store_ops fake_ops = {
    .name = "fake",
    .acquire = fake_acquire,
    .complete = fake_complete,
    .release = fake_release,
    .renew = fake_renew,
    .ping = fake_ping,
    .free = fake_free,
};

/* Scripts the acquire replies (the last repeats). */
static void fake_script(struct fake_store *fs, size_t n, const enum store_acquire_state *v)
{
    assert_true(n > 0 && n <= SCRIPT_MAX);
    memcpy(fs->script, v, n * sizeof(*v));
    fs->n_script = n;
    fs->next = 0;
}

/* ------------------------------------------------------------- the host */

struct fixture;

/* The fake host: a request, an engine, references, the engine's timer. */
struct host {
    int refs;
    struct fixture *fx;
    struct idem idem;
    struct buf req;
    struct http1_head head;
    const char *body;
    size_t body_len;
    char request_id[64];
    size_t request_id_len;
    const struct cfg_idem *cfg;
    /* what a route's request checks found (proxy/checks.c) */
    bool refused;
    enum err_code refusal;
    const struct idem_given *given;
    bool done;        /* ops->done came */
    bool timer_armed; /* the engine's timer, due at timer_due on the fake clock */
    uint64_t timer_due;
};

struct fixture {
    struct cfg cfg;
    bool have_cfg;
    struct event_base *base;
    struct fake_store fs;
    struct store *store; /* &fs.base, or a memory store */
    struct buf_pool bufs;
    struct idem_env env;
    int base_events; /* events on the base before the test: none may remain */
    unsigned rid;
    struct host *hosts[MAX_HOSTS]; /* alive */
    size_t n_hosts;
};

static void host_ref(struct host *h)
{
    h->refs++;
}

static void host_unref(struct host *h)
{
    assert_true(h->refs > 0);
    if (--h->refs > 0) return;
    struct fixture *fx = h->fx;
    idem_free(&h->idem);
    buf_free(&h->req);
    for (size_t i = 0; i < fx->n_hosts; i++) {
        if (fx->hosts[i] != h) continue;
        fx->hosts[i] = fx->hosts[--fx->n_hosts];
        break;
    }
    free(h);
}

/* Like the exchange: the upstream holds a reference until the test plays
 * its answer. */
static void op_forward(void *host)
{
    calls.forwards++;
    host_ref(host);
}

static void op_answer(void *host, enum err_code e, bool replayed, uint32_t retry_s)
{
    (void)host;
    (void)retry_s;
    calls.errors++;
    calls.last_error = e;
    calls.last_replayed = replayed;
}

static void op_replay(void *host, const struct record *r)
{
    (void)host;
    calls.replays++;
    buf_reset(&calls.replay);
    assert_int_equal(record_encode(r, &calls.replay), 0);
}

/* The engine's reference goes with its done. */
static void op_done(void *host)
{
    struct host *h = host;
    assert_false(h->done);
    h->done = true;
    host_unref(h);
}

static void op_hold(void *host)
{
    host_ref(host);
}

static void op_release(void *host)
{
    host_unref(host);
}

static void op_timer_arm(void *host, uint32_t ms)
{
    struct host *h = host;
    h->timer_armed = true;
    h->timer_due = fake_now + ms;
}

static void op_timer_cancel(void *host)
{
    ((struct host *)host)->timer_armed = false;
}

static const struct idem_host_ops host_ops = {
    .forward = op_forward,
    .answer = op_answer,
    .replay = op_replay,
    .done = op_done,
    .hold = op_hold,
    .release = op_release,
    .timer_arm = op_timer_arm,
    .timer_cancel = op_timer_cancel,
};

/* ------------------------------------------------------------- fixture */

static void fx_config(struct fixture *fx, const char *json)
{
    char err[256] = "";
    if (fx->have_cfg) cfg_free(&fx->cfg);
    memset(&fx->cfg, 0, sizeof(fx->cfg));
    int r = cfg_load_json(&fx->cfg, json, strlen(json), false, NULL, err, sizeof(err));
    if (r != 0) fail_msg("%s: %s", json, err);
    fx->have_cfg = true;
}

static void fx_use_store(struct fixture *fx, struct store *s)
{
    fx->store = s;
    fx->env.store = s;
}

static int fx_setup(void **state)
{
    struct fixture *fx = calloc(1, sizeof(*fx));
    assert_non_null(fx);
    fx_config(fx, "{}");
    clock_set_fake(&fake_now);
    fx->base = event_base_new();
    assert_non_null(fx->base);
    fx->fs.base.ops = &fake_ops;
    fx->fs.evb = fx->base;
    fx->fs.complete_status = fx->fs.release_status = fx->fs.renew_status = 1;
    buf_init(&fx->fs.reply_record);
    buf_init(&fx->fs.record);
    buf_pool_init(&fx->bufs, 16384, 16);
    fx->env.bufs = &fx->bufs;
    fx_use_store(fx, &fx->fs.base);
    fx->base_events = event_base_get_num_events(fx->base, EVENT_BASE_COUNT_ADDED);
    memset(&calls, 0, sizeof(calls));
    buf_init(&calls.replay);
    *state = fx;
    return 0;
}

static int fx_teardown(void **state)
{
    struct fixture *fx = *state;
    assert_int_equal(fx->n_hosts, 0);
    buf_free(&fx->fs.reply_record);
    buf_free(&fx->fs.record);
    buf_free(&calls.replay);
    if (fx->store != &fx->fs.base) store_free(fx->store);
    buf_pool_free(&fx->bufs);
    event_base_free(fx->base);
    cfg_free(&fx->cfg);
    clock_set_fake(NULL);
    free(fx);
    return 0;
}

/* A new host for a complete request text, as the exchange builds one;
 * refs: the test's (standing in for the client's) and the engine's. */
static struct host *fx_exchange_idem(struct fixture *fx, const char *request,
                                     const struct cfg_idem *idem)
{
    struct host *h = calloc(1, sizeof(*h));
    assert_non_null(h);
    assert_true(fx->n_hosts < MAX_HOSTS);
    fx->hosts[fx->n_hosts++] = h;
    h->refs = 2;
    h->fx = fx;
    buf_init(&h->req);
    buf_append_str(&h->req, request);
    long n = http1_parse_request(buf_data(&h->req), buf_size(&h->req), MAX_HEAD, &h->head);
    assert_true(n > 0);
    h->body = buf_data(&h->req) + n;
    h->body_len = h->head.body == HTTP1_BODY_LENGTH ? (size_t)h->head.content_length : 0;
    assert_int_equal(buf_size(&h->req) - (size_t)n, h->body_len);
    h->request_id_len =
        (size_t)snprintf(h->request_id, sizeof(h->request_id), "test-%u", ++fx->rid);
    h->cfg = idem;
    idem_init(&h->idem, &fx->env, &host_ops, h);
    return h;
}

static struct host *fx_exchange(struct fixture *fx, const char *request)
{
    return fx_exchange_idem(fx, request, &fx->cfg.idem);
}

/* Starts the engine on the host's request. */
static void host_start(struct host *h)
{
    struct idem_request req = {.head = &h->head,
                               .body = h->body,
                               .body_len = h->body_len,
                               .id = h->request_id,
                               .id_len = h->request_id_len,
                               .peer = "127.0.0.1",
                               .refused = h->refused,
                               .refusal = h->refusal,
                               .given = h->given};
    idem_start(&h->idem, h->cfg, h->fx->cfg.redis.failure_mode == CFG_FAIL_OPEN, &req);
}

/* Runs the loop until nothing the engine waits on is ready (a host timer
 * not due yet stays). */
static void fx_drain(struct fixture *fx)
{
    for (int i = 0; i < 1000; i++) {
        /* held replies wait for fake_unhold, not for the loop */
        if (fx->fs.pending == (int)fx->fs.n_held &&
            event_base_get_num_events(fx->base, EVENT_BASE_COUNT_ACTIVE) == 0)
            return;
        event_base_loop(fx->base, EVLOOP_NONBLOCK);
    }
    fail_msg("the loop did not settle");
}

/* The earliest armed host timer, or NULL. */
static struct host *fx_next_timer(struct fixture *fx)
{
    struct host *next = NULL;
    for (size_t i = 0; i < fx->n_hosts; i++) {
        struct host *h = fx->hosts[i];
        if (h->timer_armed && (!next || h->timer_due < next->timer_due)) next = h;
    }
    return next;
}

/* Advances the fake clock by ms, firing every host timer that falls due on
 * the way (in order) and running the loop after each. */
static void fx_advance(struct fixture *fx, uint64_t ms)
{
    uint64_t end = fake_now + ms;
    for (;;) {
        fx_drain(fx);
        struct host *h = fx_next_timer(fx);
        if (!h || h->timer_due > end) break;
        if (h->timer_due > fake_now) fake_now = h->timer_due;
        h->timer_armed = false;
        idem_timer_fired(&h->idem);
    }
    fake_now = end;
    fx_drain(fx);
}

/* Fires host timers (advancing the fake clock) until the engine answered
 * the host in some way (forward, error or replay), at most max_ms. */
static void fx_run_until_decided(struct fixture *fx, int max_ms)
{
    uint64_t deadline = fake_now + (uint64_t)max_ms;
    fx_drain(fx);
    while (calls.forwards + calls.errors + calls.replays == 0) {
        struct host *h = fx_next_timer(fx);
        if (!h || h->timer_due > deadline) fail_msg("no decision within %d ms", max_ms);
        fx_advance(fx, h->timer_due > fake_now ? h->timer_due - fake_now : 0);
    }
}

/* The host is over: the engine is done, only the test's reference is left,
 * no timer is armed, and dropping the reference frees it. */
static void fx_end(struct fixture *fx, struct host *ex)
{
    fx_drain(fx);
    assert_int_equal(ex->idem.state, IDEM_DONE);
    assert_true(ex->done);
    assert_false(ex->timer_armed);
    assert_int_equal(ex->refs, 1);
    assert_int_equal(fx->fs.pending, 0);
    assert_int_equal(event_base_get_num_events(fx->base, EVENT_BASE_COUNT_ADDED), fx->base_events);
    assert_int_equal(fx->fs.foreign_ops, 0);
    host_unref(ex);
}

/* Plays the upstream's answer as the relay delivers it: the head, the body
 * in two slices, then the end; drops the upstream's reference. */
static void upstream_answer(struct host *ex, const char *head, const char *body, bool ok)
{
    static struct http1_head rh;
    assert_int_equal(ex->idem.state, IDEM_FORWARDED);
    long n = http1_parse_response(head, strlen(head), MAX_HEAD, false, &rh);
    assert_int_equal(n, (long)strlen(head));
    idem_response_head(&ex->idem, &rh);
    size_t len = strlen(body), half = len / 2;
    if (half > 0) idem_response_body(&ex->idem, body, half);
    if (len > half) idem_response_body(&ex->idem, body + half, len - half);
    idem_response_end(&ex->idem, ok ? IDEM_END_OK : IDEM_END_FAILED);
    host_unref(ex);
}

/* The upstream answered head and body, then ended as how says. */
static void upstream_answer_end(struct host *ex, const char *head, const char *body,
                                enum idem_end how)
{
    static struct http1_head rh;
    long n = http1_parse_response(head, strlen(head), MAX_HEAD, false, &rh);
    assert_int_equal(n, (long)strlen(head));
    idem_response_head(&ex->idem, &rh);
    idem_response_body(&ex->idem, body, strlen(body));
    idem_response_end(&ex->idem, how);
    host_unref(ex);
}

/* The upstream failed before any head (cannot connect, timeout). */
static void upstream_fail(struct host *ex)
{
    assert_int_equal(ex->idem.state, IDEM_FORWARDED);
    idem_response_end(&ex->idem, IDEM_END_FAILED);
    host_unref(ex);
}

/* Forward, answer 200, end: the path of any request forwarded without a
 * lock. */
static void expect_unlocked_forward(struct fixture *fx, struct host *ex)
{
    fx_drain(fx);
    assert_int_equal(calls.forwards, 1);
    assert_int_equal(calls.errors + calls.replays, 0);
    assert_false(ex->idem.owner);
    upstream_answer(ex, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n", "ok", true);
    fx_end(fx, ex);
    assert_int_equal(fx->fs.completes + fx->fs.releases + fx->fs.renews, 0);
}

static void expect_error(struct fixture *fx, struct host *ex, enum err_code e, int acquires)
{
    fx_drain(fx);
    assert_int_equal(calls.errors, 1);
    assert_int_equal(calls.last_error, e);
    assert_int_equal(calls.forwards + calls.replays, 0);
    assert_int_equal(fx->fs.acquires, acquires);
    fx_end(fx, ex);
    assert_int_equal(fx->fs.completes + fx->fs.releases + fx->fs.renews, 0);
}

/* Forwarded as the lock's owner. */
static void expect_owner_forward(struct fixture *fx, struct host *ex)
{
    fx_drain(fx);
    assert_int_equal(calls.forwards, 1);
    assert_int_equal(calls.errors + calls.replays, 0);
    assert_true(ex->idem.owner);
    assert_int_equal(fx->fs.acquires, 1);
}

static const enum store_acquire_state LOCKED[] = {STORE_ACQ_LOCKED};

#define POST_K1                                                                                    \
    "POST /v1/orders?x=1 HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer tok\r\n"                     \
    "Idempotency-Key: k1\r\nContent-Type: application/json\r\nContent-Length: 7\r\n\r\n"           \
    "{\"a\":1}"

/* The fingerprint of POST_K1, computed here from its parts. */
static void post_k1_fp(uint8_t out[FP_LEN])
{
    const char *ct = "application/json";
    size_t ct_len = strlen(ct);
    bool present = true;
    struct fp_input in = {
        "POST", 4, "/v1/orders?x=1", 14, 1, &ct, &ct_len, &present, (const uint8_t *)"{\"a\":1}",
        7};
    fp_compute(&in, out);
}

static uint64_t counter_value(const char *name)
{
    struct buf b;
    buf_init(&b);
    metrics_render(&b);
    buf_append(&b, "", 1);
    char pat[128];
    snprintf(pat, sizeof(pat), "\n%s ", name);
    const char *p = strstr(buf_data(&b), pat);
    assert_non_null(p);
    uint64_t v = strtoull(p + strlen(pat), NULL, 10);
    buf_free(&b);
    return v;
}

/* ----------------------------------------------- not covered / rejected */

static void test_method_not_covered(void **state)
{
    struct fixture *fx = *state;
    fake_script(&fx->fs, 1, LOCKED);
    struct host *ex = fx_exchange(fx, "GET /x HTTP/1.1\r\nHost: a\r\nIdempotency-Key: k1\r\n\r\n");
    host_start(ex);
    assert_int_equal(ex->idem.outcome, OUT_PASSTHROUGH);
    expect_unlocked_forward(fx, ex);
    assert_int_equal(fx->fs.acquires, 0);
}

static void test_route_disabled(void **state)
{
    struct fixture *fx = *state;
    fx_config(fx, "{\"routes\":[{\"prefix\":\"/raw\",\"idempotency\":{\"enabled\":false}}]}");
    fake_script(&fx->fs, 1, LOCKED);
    assert_int_equal(fx->cfg.n_routes, 1);
    struct host *ex = fx_exchange_idem(
        fx, "POST /raw HTTP/1.1\r\nHost: a\r\nIdempotency-Key: k1\r\nContent-Length: 0\r\n\r\n",
        &fx->cfg.routes[0].idem);
    host_start(ex);
    expect_unlocked_forward(fx, ex);
    assert_int_equal(fx->fs.acquires, 0);
}

static void test_no_key_optional(void **state)
{
    struct fixture *fx = *state;
    fake_script(&fx->fs, 1, LOCKED);
    struct host *ex = fx_exchange(fx, "POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\n\r\na");
    host_start(ex);
    assert_int_equal(ex->idem.outcome, OUT_PASSTHROUGH);
    expect_unlocked_forward(fx, ex);
    assert_int_equal(fx->fs.acquires, 0);
}

static void test_no_key_required(void **state)
{
    struct fixture *fx = *state;
    fx_config(fx, "{\"idempotency\":{\"required\":true}}");
    fake_script(&fx->fs, 1, LOCKED);
    struct host *ex = fx_exchange(fx, "PATCH /x HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\n\r\na");
    host_start(ex);
    assert_int_equal(ex->idem.outcome, OUT_REJECTED);
    expect_error(fx, ex, ERR_KEY_REQUIRED, 0);
}

static void test_invalid_keys(void **state)
{
    struct fixture *fx = *state;
    fx_config(fx, "{\"idempotency\":{\"key_max_length\":8}}");
    fake_script(&fx->fs, 1, LOCKED);
    static const char *const bad[] = {
        "POST /x HTTP/1.1\r\nHost: a\r\nIdempotency-Key: k1\r\nidempotency-key: k1\r\n\r\n",
        "POST /x HTTP/1.1\r\nHost: a\r\nIdempotency-Key: \r\n\r\n",
        "POST /x HTTP/1.1\r\nHost: a\r\nIdempotency-Key: \"\"\r\n\r\n",
        "POST /x HTTP/1.1\r\nHost: a\r\nIdempotency-Key: a b\r\n\r\n",
        "POST /x HTTP/1.1\r\nHost: a\r\nIdempotency-Key: 123456789\r\n\r\n",
        "POST /x HTTP/1.1\r\nHost: a\r\nIdempotency-Key: caf\xc3\xa9\r\n\r\n",
        "POST /x HTTP/1.1\r\nHost: a\r\nIdempotency-Key: \"unterminated\r\n\r\n",
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        calls_reset();
        struct host *ex = fx_exchange(fx, bad[i]);
        host_start(ex);
        expect_error(fx, ex, ERR_INVALID_KEY, 0);
    }
}

/* "abc" (an RFC 8941 string) and abc are one key. */
static void test_quoted_key(void **state)
{
    struct fixture *fx = *state;
    fake_script(&fx->fs, 1, LOCKED);
    struct host *ex =
        fx_exchange(fx, "POST /x HTTP/1.1\r\nHost: a\r\nIdempotency-Key: \"abc\"\r\n\r\n");
    host_start(ex);
    expect_owner_forward(fx, ex);
    assert_string_equal(fx->fs.skey, "anonymous:abc");
    upstream_fail(ex);
    fx_end(fx, ex);
}

static void test_anonymous_reject(void **state)
{
    struct fixture *fx = *state;
    fx_config(fx, "{\"idempotency\":{\"anonymous\":\"reject\"}}");
    fake_script(&fx->fs, 1, LOCKED);
    struct host *ex = fx_exchange(fx, "POST /x HTTP/1.1\r\nHost: a\r\nIdempotency-Key: k1\r\n\r\n");
    host_start(ex);
    assert_int_equal(ex->idem.outcome, OUT_REJECTED);
    expect_error(fx, ex, ERR_CREDENTIALS_REQUIRED, 0);
}

static void test_anonymous_bypass(void **state)
{
    struct fixture *fx = *state;
    fx_config(fx, "{\"idempotency\":{\"anonymous\":\"bypass\"}}");
    fake_script(&fx->fs, 1, LOCKED);
    struct host *ex = fx_exchange(fx, "POST /x HTTP/1.1\r\nHost: a\r\nIdempotency-Key: k1\r\n\r\n");
    host_start(ex);
    assert_int_equal(ex->idem.outcome, OUT_PASSTHROUGH);
    expect_unlocked_forward(fx, ex);
    assert_int_equal(fx->fs.acquires, 0);
}

static void test_anonymous_shared(void **state)
{
    struct fixture *fx = *state;
    fake_script(&fx->fs, 1, LOCKED);
    struct host *ex = fx_exchange(fx, "POST /x HTTP/1.1\r\nHost: a\r\nIdempotency-Key: k1\r\n\r\n");
    host_start(ex);
    expect_owner_forward(fx, ex);
    assert_string_equal(fx->fs.skey, "anonymous:k1");
    upstream_fail(ex);
    fx_end(fx, ex);
    assert_int_equal(fx->fs.releases, 1);
}

/* -------------------------------- a route's request checks (a webhook's) */

/* A refusal is answered whatever the method, before any key is read. */
static void test_check_refusal(void **state)
{
    struct fixture *fx = *state;
    fake_script(&fx->fs, 1, LOCKED);
    struct host *ex = fx_exchange(fx, "GET /x HTTP/1.1\r\nHost: a\r\nIdempotency-Key: k1\r\n\r\n");
    ex->refused = true;
    ex->refusal = ERR_INVALID_SIGNATURE;
    host_start(ex);
    assert_int_equal(ex->idem.outcome, OUT_REJECTED);
    expect_error(fx, ex, ERR_INVALID_SIGNATURE, 0);
    assert_int_equal(fx->fs.acquires, 0);
}

/* A given key and scope replace the key header and scope_headers. */
static void test_check_given_key(void **state)
{
    struct fixture *fx = *state;
    fake_script(&fx->fs, 1, LOCKED);
    struct idem_given g = {.key = "evt_1", .key_len = 5};
    snprintf(g.scope, sizeof(g.scope), "%s", "0123456789abcdef");
    struct host *ex = fx_exchange(fx, "POST /x HTTP/1.1\r\nHost: a\r\nIdempotency-Key: k1\r\n"
                                      "Authorization: Bearer t\r\n\r\n");
    ex->given = &g;
    host_start(ex);
    expect_owner_forward(fx, ex);
    assert_string_equal(fx->fs.skey, "0123456789abcdef:evt_1");
    upstream_fail(ex);
    fx_end(fx, ex);
}

/* No key (the header missing), or one that is not a valid key: 400 with
 * the check's error; a method that is not covered passes through. */
static void test_check_given_key_errors(void **state)
{
    struct fixture *fx = *state;
    fake_script(&fx->fs, 1, LOCKED);
    struct idem_given none = {.key = NULL, .error = ERR_WEBHOOK_KEY_REQUIRED};
    struct host *ex = fx_exchange(fx, "POST /x HTTP/1.1\r\nHost: a\r\nIdempotency-Key: k1\r\n\r\n");
    ex->given = &none;
    host_start(ex);
    expect_error(fx, ex, ERR_WEBHOOK_KEY_REQUIRED, 0);
    calls_reset();
    struct idem_given bad = {.key = "a b", .key_len = 3};
    ex = fx_exchange(fx, "POST /x HTTP/1.1\r\nHost: a\r\n\r\n");
    ex->given = &bad;
    host_start(ex);
    expect_error(fx, ex, ERR_WEBHOOK_KEY_INVALID, 0);
    calls_reset();
    ex = fx_exchange(fx, "GET /x HTTP/1.1\r\nHost: a\r\n\r\n");
    ex->given = &none;
    host_start(ex);
    assert_int_equal(ex->idem.outcome, OUT_PASSTHROUGH);
    expect_unlocked_forward(fx, ex);
    assert_int_equal(fx->fs.acquires, 0);
}

/* ------------------------------------------------------- owner: complete */

static bool record_has_header(const struct record *r, const char *name)
{
    for (size_t i = 0; i < r->n_headers; i++)
        if (r->headers[i].name_len == strlen(name) &&
            strncasecmp(r->headers[i].name, name, r->headers[i].name_len) == 0)
            return true;
    return false;
}

static void assert_header(const struct record *r, size_t i, const char *name, const char *value)
{
    assert_true(i < r->n_headers);
    assert_int_equal(r->headers[i].name_len, strlen(name));
    assert_memory_equal(r->headers[i].name, name, strlen(name));
    assert_int_equal(r->headers[i].value_len, strlen(value));
    assert_memory_equal(r->headers[i].value, value, strlen(value));
}

static void test_locked_201_completes(void **state)
{
    struct fixture *fx = *state;
    fake_script(&fx->fs, 1, LOCKED);
    struct host *ex = fx_exchange(fx, POST_K1);
    host_start(ex);
    assert_int_equal(ex->idem.state, IDEM_ACQUIRING);
    assert_int_equal(calls.forwards, 0); /* never synchronously */
    expect_owner_forward(fx, ex);
    assert_int_equal(ex->idem.outcome, OUT_EXECUTED);
    assert_int_equal(fx->fs.lock_ms, 30000);
    uint8_t fp[FP_LEN];
    post_k1_fp(fp);
    assert_memory_equal(fx->fs.fp, fp, FP_LEN);
    for (size_t i = 0; i < STORE_TOKEN_LEN; i++)
        assert_non_null(strchr("0123456789abcdef", fx->fs.token[i]));

    const char *head = "HTTP/1.1 201 Created\r\n"
                       "Content-Type: application/json\r\n"
                       "Set-Cookie: s=1\r\n"
                       "Date: Mon, 01 Jan 2024 00:00:00 GMT\r\n"
                       "Server: up/1\r\n"
                       "Connection: keep-alive, X-Hop\r\n"
                       "Keep-Alive: timeout=5\r\n"
                       "X-Hop: 1\r\n"
                       "Proxy-Thing: 1\r\n"
                       "RateLimit-Remaining: 9\r\n"
                       "X-Request-Id: up-rid\r\n"
                       "Location: /v1/orders/7\r\n"
                       "X-Multi: a\r\n"
                       "X-Multi: b\r\n"
                       "Content-Length: 11\r\n\r\n";
    upstream_answer(ex, head, "{\"id\":7,\"x\"", true);
    fx_end(fx, ex);
    assert_int_equal(fx->fs.completes, 1);
    assert_int_equal(fx->fs.releases, 0);
    assert_int_equal(fx->fs.ttl, 86400);

    struct record *r = malloc(sizeof(*r));
    assert_non_null(r);
    assert_int_equal(record_decode((const uint8_t *)buf_data(&fx->fs.record),
                                   buf_size(&fx->fs.record), SIZE_MAX, r),
                     0);
    assert_int_equal(r->status, 201);
    assert_memory_equal(r->fp, fp, FP_LEN);
    assert_true(r->created_ms > 0);
    assert_header(r, 0, ":reason", "Created");
    assert_header(r, 1, "Content-Type", "application/json");
    assert_header(r, 2, "Location", "/v1/orders/7");
    assert_header(r, 3, "X-Multi", "a");
    assert_header(r, 4, "X-Multi", "b");
    assert_int_equal(r->n_headers, 5);
    static const char *const absent[] = {"Set-Cookie",       "Date",
                                         "Server",           "Connection",
                                         "Keep-Alive",       "X-Hop",
                                         "Proxy-Thing",      "Content-Length",
                                         "X-Request-Id",     "RateLimit-Remaining",
                                         "Transfer-Encoding"};
    for (size_t i = 0; i < sizeof(absent) / sizeof(absent[0]); i++)
        assert_false(record_has_header(r, absent[i]));
    assert_int_equal(r->body_len, 11);
    assert_memory_equal(r->body, "{\"id\":7,\"x\"", 11);
    free(r);
}

/* A chunked body of exactly max_cached_response_bytes is kept. */
static void test_body_at_limit_completes(void **state)
{
    struct fixture *fx = *state;
    fx_config(fx, "{\"idempotency\":{\"max_cached_response_bytes\":16}}");
    fake_script(&fx->fs, 1, LOCKED);
    struct host *ex = fx_exchange(fx, POST_K1);
    host_start(ex);
    expect_owner_forward(fx, ex);
    upstream_answer(ex, "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", "0123456789abcdef",
                    true);
    fx_end(fx, ex);
    assert_int_equal(fx->fs.completes, 1);
    struct record *r = malloc(sizeof(*r));
    assert_non_null(r);
    assert_int_equal(record_decode((const uint8_t *)buf_data(&fx->fs.record),
                                   buf_size(&fx->fs.record), SIZE_MAX, r),
                     0);
    assert_int_equal(r->body_len, 16);
    assert_false(record_has_header(r, "Transfer-Encoding"));
    free(r);
}

static void test_cache_5xx_completes(void **state)
{
    struct fixture *fx = *state;
    fx_config(fx, "{\"idempotency\":{\"cache_5xx\":true}}");
    fake_script(&fx->fs, 1, LOCKED);
    struct host *ex = fx_exchange(fx, POST_K1);
    host_start(ex);
    expect_owner_forward(fx, ex);
    upstream_answer(ex, "HTTP/1.1 500 Oops\r\nContent-Length: 3\r\n\r\n", "bad", true);
    fx_end(fx, ex);
    assert_int_equal(fx->fs.completes, 1);
    assert_int_equal(fx->fs.releases, 0);
}

/* The store refuses the record: the exchange still ends cleanly. */
static void test_complete_fails(void **state)
{
    struct fixture *fx = *state;
    fake_script(&fx->fs, 1, LOCKED);
    fx->fs.complete_status = -1;
    uint64_t before = counter_value("idemgate_store_errors_total");
    struct host *ex = fx_exchange(fx, POST_K1);
    host_start(ex);
    expect_owner_forward(fx, ex);
    upstream_answer(ex, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n", "ok", true);
    fx_end(fx, ex);
    assert_int_equal(fx->fs.completes, 1);
    assert_int_equal(counter_value("idemgate_store_errors_total"), before + 1);
}

/* ------------------------------------------------------- owner: release */

/* One owner exchange answered with head/body/ok; expects a release. */
static void expect_release(struct fixture *fx, const char *head, const char *body, bool ok)
{
    calls_reset();
    fx->fs.acquires = fx->fs.completes = fx->fs.releases = 0;
    struct host *ex = fx_exchange(fx, POST_K1);
    host_start(ex);
    expect_owner_forward(fx, ex);
    upstream_answer(ex, head, body, ok);
    if (ok) assert_int_equal(ex->idem.outcome, OUT_NOT_CACHED);
    fx_end(fx, ex);
    assert_int_equal(fx->fs.completes, 0);
    assert_int_equal(fx->fs.releases, 1);
}

static void test_5xx_released(void **state)
{
    struct fixture *fx = *state;
    fake_script(&fx->fs, 1, LOCKED);
    expect_release(fx, "HTTP/1.1 500 Internal Server Error\r\nContent-Length: 3\r\n\r\n", "bad",
                   true);
    expect_release(fx, "HTTP/1.1 503 Busy\r\nContent-Length: 0\r\n\r\n", "", true);
}

static void test_401_403_released(void **state)
{
    struct fixture *fx = *state;
    fake_script(&fx->fs, 1, LOCKED);
    expect_release(fx, "HTTP/1.1 401 Unauthorized\r\nContent-Length: 1\r\n\r\n", "x", true);
    expect_release(fx, "HTTP/1.1 403 Forbidden\r\nContent-Length: 1\r\n\r\n", "x", true);
}

/* Decodes the record the fake store was given. */
static struct record *stored_record(struct fixture *fx)
{
    struct record *r = malloc(sizeof(*r));
    assert_non_null(r);
    assert_int_equal(record_decode((const uint8_t *)buf_data(&fx->fs.record),
                                   buf_size(&fx->fs.record), SIZE_MAX, r),
                     0);
    return r;
}

/* A keepable head then a cut body: kept as lost (status 502, the :lost
 * mark, no body), never released; the upstream's body is not kept. */
static void test_cut_body_kept_as_lost(void **state)
{
    struct fixture *fx = *state;
    fake_script(&fx->fs, 1, LOCKED);
    struct host *ex = fx_exchange(fx, POST_K1);
    host_start(ex);
    expect_owner_forward(fx, ex);
    assert_true(idem_would_keep(&ex->idem) == false); /* no head yet */
    static struct http1_head rh;
    const char *head = "HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n";
    http1_parse_response(head, strlen(head), MAX_HEAD, false, &rh);
    idem_response_head(&ex->idem, &rh);
    assert_true(idem_would_keep(&ex->idem));
    idem_response_body(&ex->idem, "abc", 3);
    idem_response_end(&ex->idem, IDEM_END_LOST_BODY);
    assert_int_equal(ex->idem.outcome, OUT_LOST);
    host_unref(ex);
    fx_end(fx, ex);
    assert_int_equal(fx->fs.completes, 1);
    assert_int_equal(fx->fs.releases, 0);
    struct record *r = stored_record(fx);
    assert_int_equal(r->status, 502);
    assert_true(record_is_lost(r));
    assert_int_equal(r->body_len, 0);
    free(r);
}

/* unknown_outcome decides about a request that was sent and never
 * answered: released by default, kept as lost with "keep". */
static void test_unanswered_follows_unknown_outcome(void **state)
{
    struct fixture *fx = *state;
    fake_script(&fx->fs, 1, LOCKED);
    struct host *ex = fx_exchange(fx, POST_K1);
    host_start(ex);
    expect_owner_forward(fx, ex);
    assert_false(idem_keeps_unanswered(&ex->idem));
    upstream_fail(ex);
    fx_end(fx, ex);
    assert_int_equal(fx->fs.releases, 1);

    fx_config(fx, "{\"idempotency\":{\"unknown_outcome\":\"keep\"}}");
    fake_script(&fx->fs, 1, LOCKED);
    fx->fs.acquires = fx->fs.completes = fx->fs.releases = 0;
    calls_reset();
    ex = fx_exchange(fx, POST_K1);
    host_start(ex);
    expect_owner_forward(fx, ex);
    assert_true(idem_keeps_unanswered(&ex->idem));
    idem_response_end(&ex->idem, IDEM_END_UNANSWERED);
    host_unref(ex);
    fx_end(fx, ex);
    assert_int_equal(fx->fs.completes, 1);
    struct record *r = stored_record(fx);
    assert_true(record_is_lost(r));
    free(r);
}

/* A lost record found by a retry: 502 upstream_answer_lost, marked as a
 * replay, outcome lost, nothing forwarded. */
static void test_lost_record_answers_502(void **state)
{
    struct fixture *fx = *state;
    static const enum store_acquire_state s[] = {STORE_ACQ_COMPLETED};
    fake_script(&fx->fs, 1, s);
    struct record *r = calloc(1, sizeof(*r));
    assert_non_null(r);
    r->status = 502;
    r->created_ms = 1;
    post_k1_fp(r->fp);
    r->headers[0] = (struct record_header){RECORD_HDR_LOST, 5, "body cut", 8};
    r->n_headers = 1;
    buf_reset(&fx->fs.reply_record);
    assert_int_equal(record_encode(r, &fx->fs.reply_record), 0);
    free(r);
    struct host *ex = fx_exchange(fx, POST_K1);
    host_start(ex);
    fx_drain(fx);
    assert_int_equal(calls.replays + calls.forwards, 0);
    assert_int_equal(ex->idem.outcome, OUT_LOST);
    assert_true(ex->idem.replayed);
    expect_error(fx, ex, ERR_UPSTREAM_ANSWER_LOST, 1);
}

/* The upstream's own Idempotent-Replayed is never kept; a HEAD answer's
 * declared Content-Length is. */
static void test_recorded_headers(void **state)
{
    struct fixture *fx = *state;
    fx_config(fx, "{\"idempotency\":{\"methods\":[\"POST\",\"HEAD\"]}}");
    fake_script(&fx->fs, 1, LOCKED);
    struct host *ex = fx_exchange(fx, POST_K1);
    host_start(ex);
    expect_owner_forward(fx, ex);
    upstream_answer_end(ex,
                        "HTTP/1.1 200 OK\r\nIdempotent-Replayed: false\r\nX-A: 1\r\n"
                        "Content-Length: 2\r\n\r\n",
                        "ok", IDEM_END_OK);
    fx_end(fx, ex);
    struct record *r = stored_record(fx);
    assert_false(record_has_header(r, "Idempotent-Replayed"));
    assert_true(record_has_header(r, "X-A"));
    size_t n;
    assert_null(record_pseudo(r, RECORD_HDR_LENGTH, &n));
    free(r);
}

static void test_retryable_4xx_released(void **state)
{
    struct fixture *fx = *state;
    fake_script(&fx->fs, 1, LOCKED);
    static const char *const heads[] = {
        "HTTP/1.1 408 Request Timeout\r\nContent-Length: 1\r\n\r\n",
        "HTTP/1.1 409 Conflict\r\nContent-Length: 1\r\n\r\n",
        "HTTP/1.1 425 Too Early\r\nContent-Length: 1\r\n\r\n",
        "HTTP/1.1 429 Too Many Requests\r\nContent-Length: 1\r\n\r\n",
    };
    for (size_t i = 0; i < sizeof(heads) / sizeof(heads[0]); i++)
        expect_release(fx, heads[i], "x", true);
}

static void test_sse_released(void **state)
{
    struct fixture *fx = *state;
    fake_script(&fx->fs, 1, LOCKED);
    expect_release(fx,
                   "HTTP/1.1 200 OK\r\nContent-Type: Text/Event-Stream; charset=utf-8\r\n"
                   "Transfer-Encoding: chunked\r\n\r\n",
                   "data: 1\n\ndata: 2\n\n", true);
}

static void test_body_over_limit_released(void **state)
{
    struct fixture *fx = *state;
    fx_config(fx, "{\"idempotency\":{\"max_cached_response_bytes\":16}}");
    fake_script(&fx->fs, 1, LOCKED);
    /* announced by Content-Length */
    expect_release(fx, "HTTP/1.1 200 OK\r\nContent-Length: 17\r\n\r\n", "0123456789abcdefg", true);
    /* found while streaming */
    expect_release(fx, "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", "0123456789abcdefg",
                   true);
    expect_release(fx, "HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n", "0123456789abcdefg", true);
}

static void test_broken_response_released(void **state)
{
    struct fixture *fx = *state;
    fake_script(&fx->fs, 1, LOCKED);
    /* head and part of the body, then the upstream broke */
    expect_release(fx, "HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n", "partial", false);
    /* no head at all: 502 / 504 */
    struct host *ex = fx_exchange(fx, POST_K1);
    fx->fs.releases = 0;
    host_start(ex);
    fx_drain(fx);
    assert_true(ex->idem.owner);
    upstream_fail(ex);
    fx_end(fx, ex);
    assert_int_equal(fx->fs.releases, 1);
    assert_int_equal(fx->fs.completes, 0);
}

/* ------------------------------------------------------------ not owner */

static void test_in_progress_rejected(void **state)
{
    struct fixture *fx = *state;
    static const enum store_acquire_state s[] = {STORE_ACQ_IN_PROGRESS};
    fake_script(&fx->fs, 1, s);
    struct host *ex = fx_exchange(fx, POST_K1);
    host_start(ex);
    expect_error(fx, ex, ERR_IN_PROGRESS, 1);
}

static void test_mismatch(void **state)
{
    struct fixture *fx = *state;
    static const enum store_acquire_state s[] = {STORE_ACQ_MISMATCH};
    fake_script(&fx->fs, 1, s);
    struct host *ex = fx_exchange(fx, POST_K1);
    host_start(ex);
    fx_drain(fx);
    assert_int_equal(ex->idem.outcome, OUT_MISMATCH);
    expect_error(fx, ex, ERR_KEY_REUSE, 1);
}

/* A stored record for POST_K1 (its fingerprint unless fp is given). */
static void encode_stored(struct buf *out, const uint8_t *fp)
{
    struct record *r = calloc(1, sizeof(*r));
    assert_non_null(r);
    r->status = 201;
    r->created_ms = 1700000000000ull;
    if (fp)
        memcpy(r->fp, fp, FP_LEN);
    else
        post_k1_fp(r->fp);
    r->headers[0] = (struct record_header){":reason", 7, "Created", 7};
    r->headers[1] = (struct record_header){"Content-Type", 12, "application/json", 16};
    r->headers[2] = (struct record_header){"Location", 8, "/v1/orders/7", 12};
    r->n_headers = 3;
    r->body = (const uint8_t *)"{\"id\":7}";
    r->body_len = 8;
    buf_reset(out);
    assert_int_equal(record_encode(r, out), 0);
    free(r);
}

static void test_completed_replays(void **state)
{
    struct fixture *fx = *state;
    static const enum store_acquire_state s[] = {STORE_ACQ_COMPLETED};
    fake_script(&fx->fs, 1, s);
    encode_stored(&fx->fs.reply_record, NULL);
    struct host *ex = fx_exchange(fx, POST_K1);
    host_start(ex);
    fx_drain(fx);
    assert_int_equal(calls.replays, 1);
    assert_int_equal(calls.forwards + calls.errors, 0);
    assert_int_equal(ex->idem.outcome, OUT_REPLAYED);
    assert_int_equal(buf_size(&calls.replay), buf_size(&fx->fs.reply_record));
    assert_memory_equal(buf_data(&calls.replay), buf_data(&fx->fs.reply_record),
                        buf_size(&calls.replay));
    fx_end(fx, ex);
    assert_int_equal(fx->fs.completes + fx->fs.releases + fx->fs.renews, 0);
}

static void test_completed_corrupt(void **state)
{
    struct fixture *fx = *state;
    static const enum store_acquire_state s[] = {STORE_ACQ_COMPLETED};
    fake_script(&fx->fs, 1, s);
    struct buf good;
    buf_init(&good);
    encode_stored(&good, NULL);
    uint8_t other_fp[FP_LEN] = {1, 2, 3};
    for (int variant = 0; variant < 5; variant++) {
        struct buf *rb = &fx->fs.reply_record;
        buf_reset(rb);
        switch (variant) {
        case 0: /* truncated */
            buf_append(rb, buf_data(&good), buf_size(&good) - 1);
            break;
        case 1: /* trailing garbage */
            buf_append(rb, buf_data(&good), buf_size(&good));
            buf_append(rb, "x", 1);
            break;
        case 2: /* not a record at all */
            buf_append_str(rb, "HTTP/1.1 200 OK\r\n\r\nhello");
            break;
        case 3: /* empty */
            break;
        case 4: /* well-formed, but another request's */
            encode_stored(rb, other_fp);
            break;
        }
        calls_reset();
        fx->fs.acquires = 0;
        struct host *ex = fx_exchange(fx, POST_K1);
        host_start(ex);
        fx_drain(fx);
        assert_int_equal(calls.replays, 0);
        assert_int_equal(ex->idem.outcome, OUT_STORE_ERROR);
        expect_error(fx, ex, ERR_STORE_UNAVAILABLE, 1);
    }
    buf_free(&good);
}

static void test_store_error_closed(void **state)
{
    struct fixture *fx = *state;
    static const enum store_acquire_state s[] = {STORE_ACQ_ERROR};
    fake_script(&fx->fs, 1, s);
    struct host *ex = fx_exchange(fx, POST_K1);
    host_start(ex);
    fx_drain(fx);
    assert_int_equal(ex->idem.outcome, OUT_STORE_ERROR);
    expect_error(fx, ex, ERR_STORE_UNAVAILABLE, 1);
}

static void test_store_error_open(void **state)
{
    struct fixture *fx = *state;
    fx_config(fx, "{\"redis\":{\"failure_mode\":\"open\"}}");
    static const enum store_acquire_state s[] = {STORE_ACQ_ERROR};
    fake_script(&fx->fs, 1, s);
    uint64_t before = counter_value("idemgate_store_failopen_total");
    struct host *ex = fx_exchange(fx, POST_K1);
    host_start(ex);
    fx_drain(fx);
    assert_int_equal(fx->fs.acquires, 1);
    assert_int_equal(ex->idem.outcome, OUT_STORE_ERROR);
    assert_int_equal(counter_value("idemgate_store_failopen_total"), before + 1);
    /* forwarded without a lock: nothing to complete or release */
    expect_unlocked_forward(fx, ex);
}

/* ------------------------------------------------------ concurrent wait */

static void test_wait_then_replay(void **state)
{
    struct fixture *fx = *state;
    fx_config(fx, "{\"idempotency\":{\"concurrent\":\"wait\",\"wait_max_ms\":5000}}");
    static const enum store_acquire_state s[] = {STORE_ACQ_IN_PROGRESS, STORE_ACQ_IN_PROGRESS,
                                                 STORE_ACQ_COMPLETED};
    fake_script(&fx->fs, 3, s);
    encode_stored(&fx->fs.reply_record, NULL);
    struct host *ex = fx_exchange(fx, POST_K1);
    host_start(ex);
    fx_drain(fx);
    assert_int_equal(ex->idem.state, IDEM_WAITING);
    assert_int_equal(calls.errors + calls.forwards + calls.replays, 0);
    fx_run_until_decided(fx, 4000);
    assert_int_equal(calls.replays, 1);
    assert_int_equal(calls.errors + calls.forwards, 0);
    assert_int_equal(fx->fs.acquires, 3);
    assert_memory_equal(buf_data(&calls.replay), buf_data(&fx->fs.reply_record),
                        buf_size(&fx->fs.reply_record));
    fx_end(fx, ex);
}

/* The owner released (its upstream failed): the waiter takes the lock. */
static void test_wait_then_lock(void **state)
{
    struct fixture *fx = *state;
    fx_config(fx, "{\"idempotency\":{\"concurrent\":\"wait\",\"lock_seconds\":60}}");
    static const enum store_acquire_state s[] = {STORE_ACQ_IN_PROGRESS, STORE_ACQ_LOCKED};
    fake_script(&fx->fs, 2, s);
    struct host *ex = fx_exchange(fx, POST_K1);
    host_start(ex);
    fx_run_until_decided(fx, 4000);
    assert_int_equal(calls.forwards, 1);
    assert_true(ex->idem.owner);
    assert_int_equal(fx->fs.acquires, 2);
    upstream_answer(ex, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n", "ok", true);
    fx_end(fx, ex);
    assert_int_equal(fx->fs.completes, 1);
}

static void test_wait_times_out(void **state)
{
    struct fixture *fx = *state;
    fx_config(fx, "{\"idempotency\":{\"concurrent\":\"wait\",\"wait_max_ms\":200}}");
    static const enum store_acquire_state s[] = {STORE_ACQ_IN_PROGRESS};
    fake_script(&fx->fs, 1, s);
    struct host *ex = fx_exchange(fx, POST_K1);
    uint64_t t0 = fake_now;
    host_start(ex);
    fx_run_until_decided(fx, 4000);
    assert_true(fake_now - t0 >= 200);
    assert_true(fx->fs.acquires >= 2); /* it polled */
    assert_int_equal(ex->idem.outcome, OUT_IN_PROGRESS);
    expect_error(fx, ex, ERR_IN_PROGRESS, fx->fs.acquires);
}

/* ------------------------------------------------------------- renewal */

static void test_lock_renewal(void **state)
{
    struct fixture *fx = *state;
    fx_config(fx, "{\"store\":\"memory\",\"idempotency\":{\"lock_seconds\":1}}");
    fake_script(&fx->fs, 1, LOCKED);
    uint64_t before = counter_value("idemgate_lock_renewals_total");
    struct host *ex = fx_exchange(fx, POST_K1);
    host_start(ex);
    expect_owner_forward(fx, ex);
    assert_int_equal(fx->fs.lock_ms, 1000);
    uint64_t t0 = fake_now;
    fx_advance(fx, 1100); /* renewal every ~333 ms */
    /* a loaded machine runs timers late, never early: give it time */
    while (fx->fs.renews < 2 && fake_now - t0 < 5000)
        fx_advance(fx, 10);
    int renews = fx->fs.renews;
    assert_true(renews >= 2);
    assert_true((uint64_t)renews <= (fake_now - t0) / 333 + 1);
    assert_int_equal(fx->fs.renew_lock_ms, 1000);
    assert_int_equal(fx->fs.foreign_ops, 0); /* same skey and owner token */
    upstream_answer(ex, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n", "ok", true);
    fx_end(fx, ex); /* also: no renewal timer left armed */
    assert_int_equal(fx->fs.renews, renews);
    assert_int_equal(fx->fs.completes, 1);
    assert_int_equal(counter_value("idemgate_lock_renewals_total"), before + (uint64_t)renews);
}

/* A renewal in flight when the response ends keeps the exchange alive. */
static void test_renewal_in_flight_at_end(void **state)
{
    struct fixture *fx = *state;
    fx_config(fx, "{\"store\":\"memory\",\"idempotency\":{\"lock_seconds\":1}}");
    fake_script(&fx->fs, 1, LOCKED);
    fx->fs.renew_status = 0; /* lock lost: logged only */
    struct host *ex = fx_exchange(fx, POST_K1);
    host_start(ex);
    expect_owner_forward(fx, ex);
    fx->fs.hold = true;
    uint64_t deadline = fake_now + 3000;
    while (fx->fs.renews == 0 && fake_now < deadline)
        fx_advance(fx, 10);
    assert_int_equal(fx->fs.renews, 1);
    assert_int_equal(fx->fs.pending, 1); /* its answer not delivered yet */
    upstream_answer(ex, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n", "ok", true);
    assert_int_equal(fx->fs.pending, 2);
    assert_true(ex->refs >= 3); /* the test's, the renewal's, the completion's */
    fake_unhold(&fx->fs);
    fx_end(fx, ex);
    assert_int_equal(fx->fs.renews, 1);
}

/* --------------------------------------------------------------- scope */

static void hmac_hex(const char *secret, const char *cred, char out[SCOPE_HEX_LEN + 1])
{
    unsigned char md[EVP_MAX_MD_SIZE];
    unsigned int n = 0;
    if (*secret)
        assert_non_null(HMAC(EVP_sha256(), secret, (int)strlen(secret), (const unsigned char *)cred,
                             strlen(cred), md, &n));
    else
        assert_int_equal(EVP_Digest(cred, strlen(cred), md, &n, EVP_sha256(), NULL), 1);
    assert_int_equal(n, 32);
    for (unsigned i = 0; i < n; i++)
        snprintf(out + 2 * i, 3, "%02x", md[i]);
}

/* Starts a request, checks the skey it acquired, ends the exchange. */
static void expect_skey(struct fixture *fx, const char *request, const char *secret,
                        const char *cred, const char *key)
{
    fx->fs.acquires = 0;
    calls_reset();
    struct host *ex = fx_exchange(fx, request);
    host_start(ex);
    expect_owner_forward(fx, ex);
    char want[SCOPE_HEX_LEN + 1 + 64];
    hmac_hex(secret, cred, want);
    snprintf(want + SCOPE_HEX_LEN, sizeof(want) - SCOPE_HEX_LEN, ":%s", key);
    assert_string_equal(fx->fs.skey, want);
    assert_null(strstr(fx->fs.skey, cred));
    upstream_fail(ex);
    fx_end(fx, ex);
}

#define SCOPED_REQ(hdrs) "POST /x HTTP/1.1\r\nHost: a\r\n" hdrs "Idempotency-Key: k1\r\n\r\n"

static void test_scope_hmac(void **state)
{
    struct fixture *fx = *state;
    fx_config(fx, "{\"idempotency\":{\"scope_secret\":\"s3cret\"}}");
    fake_script(&fx->fs, 1, LOCKED);
    expect_skey(fx, SCOPED_REQ("Authorization: Bearer alice\r\n"), "s3cret", "Bearer alice", "k1");
    expect_skey(fx, SCOPED_REQ("X-API-Key: key-bob\r\n"), "s3cret", "key-bob", "k1");
    /* no secret: plain SHA-256 */
    fx_config(fx, "{}");
    expect_skey(fx, SCOPED_REQ("Authorization: Bearer alice\r\n"), "", "Bearer alice", "k1");
}

/* Both credentials present: the first of scope_headers wins, whatever the
 * order in the request. */
static void test_scope_header_order(void **state)
{
    struct fixture *fx = *state;
    fake_script(&fx->fs, 1, LOCKED);
    const char *req = SCOPED_REQ("X-API-Key: key-bob\r\nAuthorization: Bearer alice\r\n");
    expect_skey(fx, req, "", "Bearer alice", "k1");
    fx_config(fx, "{\"idempotency\":{\"scope_headers\":[\"X-API-Key\",\"Authorization\"]}}");
    expect_skey(fx, req, "", "key-bob", "k1");
}

/* ---------------------------------------------- round trip, memory store */

static void test_memory_store_round_trip(void **state)
{
    struct fixture *fx = *state;
    struct store_memory_shared *sh = store_memory_shared_new("idem:", 0);
    assert_non_null(sh);
    fx_use_store(fx, store_memory_new(fx->base, sh, 1000));
    fx->base_events = event_base_get_num_events(fx->base, EVENT_BASE_COUNT_ADDED);

    /* first: executes */
    struct host *a = fx_exchange(fx, POST_K1);
    host_start(a);
    fx_drain(fx);
    assert_int_equal(calls.forwards, 1);
    assert_true(a->idem.owner);

    /* a duplicate while the first runs */
    struct host *b = fx_exchange(fx, POST_K1);
    host_start(b);
    fx_drain(fx);
    assert_int_equal(calls.errors, 1);
    assert_int_equal(calls.last_error, ERR_IN_PROGRESS);

    upstream_answer(a,
                    "HTTP/1.1 201 Created\r\nContent-Type: application/json\r\nDate: x\r\n"
                    "Content-Length: 8\r\n\r\n",
                    "{\"id\":7}", true);
    fx_drain(fx);
    assert_int_equal(a->idem.state, IDEM_DONE);
    host_unref(a);
    assert_int_equal(b->idem.state, IDEM_DONE);
    host_unref(b);

    /* the retry: replayed */
    struct host *c = fx_exchange(fx, POST_K1);
    host_start(c);
    fx_drain(fx);
    assert_int_equal(calls.replays, 1);
    assert_int_equal(calls.forwards, 1);
    struct record *r = malloc(sizeof(*r));
    assert_non_null(r);
    assert_int_equal(record_decode((const uint8_t *)buf_data(&calls.replay),
                                   buf_size(&calls.replay), SIZE_MAX, r),
                     0);
    assert_int_equal(r->status, 201);
    assert_header(r, 0, ":reason", "Created");
    assert_header(r, 1, "Content-Type", "application/json");
    assert_int_equal(r->n_headers, 2);
    assert_int_equal(r->body_len, 8);
    assert_memory_equal(r->body, "{\"id\":7}", 8);
    free(r);
    fx_end(fx, c);

    /* same key, another body: reuse */
    struct host *d = fx_exchange(fx, "POST /v1/orders?x=1 HTTP/1.1\r\nHost: a\r\n"
                                     "Authorization: Bearer tok\r\nIdempotency-Key: k1\r\n"
                                     "Content-Type: application/json\r\nContent-Length: "
                                     "7\r\n\r\n{\"a\":2}");
    host_start(d);
    fx_drain(fx);
    assert_int_equal(calls.errors, 2);
    assert_int_equal(calls.last_error, ERR_KEY_REUSE);
    fx_end(fx, d);

    store_free(fx->store);
    fx_use_store(fx, &fx->fs.base);
    store_memory_shared_free(sh);
}

int main(void)
{
    log_set_level(LOG_ERROR); /* the corrupt-record cases log errors on purpose */
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_method_not_covered, fx_setup, fx_teardown),
        cmocka_unit_test_setup_teardown(test_401_403_released, fx_setup, fx_teardown),
        cmocka_unit_test_setup_teardown(test_cut_body_kept_as_lost, fx_setup, fx_teardown),
        cmocka_unit_test_setup_teardown(test_unanswered_follows_unknown_outcome, fx_setup,
                                        fx_teardown),
        cmocka_unit_test_setup_teardown(test_lost_record_answers_502, fx_setup, fx_teardown),
        cmocka_unit_test_setup_teardown(test_recorded_headers, fx_setup, fx_teardown),
        cmocka_unit_test_setup_teardown(test_route_disabled, fx_setup, fx_teardown),
        cmocka_unit_test_setup_teardown(test_no_key_optional, fx_setup, fx_teardown),
        cmocka_unit_test_setup_teardown(test_no_key_required, fx_setup, fx_teardown),
        cmocka_unit_test_setup_teardown(test_invalid_keys, fx_setup, fx_teardown),
        cmocka_unit_test_setup_teardown(test_quoted_key, fx_setup, fx_teardown),
        cmocka_unit_test_setup_teardown(test_anonymous_reject, fx_setup, fx_teardown),
        cmocka_unit_test_setup_teardown(test_anonymous_bypass, fx_setup, fx_teardown),
        cmocka_unit_test_setup_teardown(test_check_refusal, fx_setup, fx_teardown),
        cmocka_unit_test_setup_teardown(test_check_given_key, fx_setup, fx_teardown),
        cmocka_unit_test_setup_teardown(test_check_given_key_errors, fx_setup, fx_teardown),
        cmocka_unit_test_setup_teardown(test_anonymous_shared, fx_setup, fx_teardown),
        cmocka_unit_test_setup_teardown(test_locked_201_completes, fx_setup, fx_teardown),
        cmocka_unit_test_setup_teardown(test_body_at_limit_completes, fx_setup, fx_teardown),
        cmocka_unit_test_setup_teardown(test_cache_5xx_completes, fx_setup, fx_teardown),
        cmocka_unit_test_setup_teardown(test_complete_fails, fx_setup, fx_teardown),
        cmocka_unit_test_setup_teardown(test_5xx_released, fx_setup, fx_teardown),
        cmocka_unit_test_setup_teardown(test_retryable_4xx_released, fx_setup, fx_teardown),
        cmocka_unit_test_setup_teardown(test_sse_released, fx_setup, fx_teardown),
        cmocka_unit_test_setup_teardown(test_body_over_limit_released, fx_setup, fx_teardown),
        cmocka_unit_test_setup_teardown(test_broken_response_released, fx_setup, fx_teardown),
        cmocka_unit_test_setup_teardown(test_in_progress_rejected, fx_setup, fx_teardown),
        cmocka_unit_test_setup_teardown(test_mismatch, fx_setup, fx_teardown),
        cmocka_unit_test_setup_teardown(test_completed_replays, fx_setup, fx_teardown),
        cmocka_unit_test_setup_teardown(test_completed_corrupt, fx_setup, fx_teardown),
        cmocka_unit_test_setup_teardown(test_store_error_closed, fx_setup, fx_teardown),
        cmocka_unit_test_setup_teardown(test_store_error_open, fx_setup, fx_teardown),
        cmocka_unit_test_setup_teardown(test_wait_then_replay, fx_setup, fx_teardown),
        cmocka_unit_test_setup_teardown(test_wait_then_lock, fx_setup, fx_teardown),
        cmocka_unit_test_setup_teardown(test_wait_times_out, fx_setup, fx_teardown),
        cmocka_unit_test_setup_teardown(test_lock_renewal, fx_setup, fx_teardown),
        cmocka_unit_test_setup_teardown(test_renewal_in_flight_at_end, fx_setup, fx_teardown),
        cmocka_unit_test_setup_teardown(test_scope_hmac, fx_setup, fx_teardown),
        cmocka_unit_test_setup_teardown(test_scope_header_order, fx_setup, fx_teardown),
        cmocka_unit_test_setup_teardown(test_memory_store_round_trip, fx_setup, fx_teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
