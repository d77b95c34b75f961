/* engine.c — the idempotency state machine (docs/requests.md).
 *
 * Decides whether a request is covered, validates its key, computes its
 * scope and fingerprint, asks the store, and tells its host (engine.h's ops
 * table) to forward, replay or answer. While the upstream works it renews
 * the lock; when the response ends it completes (keeps the record, or a
 * lost record) or releases the key. Owns struct idem's fields; knows no
 * sockets and no host struct. */
#include "idemgate/idem/engine.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#include <openssl/rand.h>

#include "idemgate/config/config.h"
#include "idemgate/core/clock.h"
#include "idemgate/core/fsm.h"
#include "idemgate/core/log.h"
#include "idemgate/http/http1.h"

/* Poll interval of a duplicate waiting for the owner (concurrent "wait").
 * Polling through the store works across instances with no pub/sub. */
#define IDEM_WAIT_POLL_MS 50
#define IDEM_KEY_MAX 8192 /* the largest idempotency.key_max_length config accepts */

/* Legal transitions: from -> bitmask of to. */
static const unsigned idem_transitions[IDEM__COUNT] = {
    [IDEM_NEW] = 1u << IDEM_ACQUIRING | 1u << IDEM_FORWARDED | 1u << IDEM_DONE,
    [IDEM_ACQUIRING] = 1u << IDEM_WAITING | 1u << IDEM_FORWARDED | 1u << IDEM_DONE,
    [IDEM_WAITING] = 1u << IDEM_ACQUIRING | 1u << IDEM_DONE,
    [IDEM_FORWARDED] = 1u << IDEM_COMPLETING | 1u << IDEM_DONE,
    [IDEM_COMPLETING] = 1u << IDEM_DONE,
    [IDEM_DONE] = 0,
};

/* The one place the engine's state changes; an illegal move aborts (also
 * in release builds: it would be a double execution waiting to happen). */
#define IDEM_STATE_NAME(id, name) name,
static const char *const idem_state_names[] = {STATES_ENGINE(IDEM_STATE_NAME)};
#undef IDEM_STATE_NAME

static const struct fsm idem_fsm = {"engine", idem_state_names, IDEM__COUNT, idem_transitions,
                                    METRICS_SET_ENGINE};

/* Its gauge is named at load, before anything serves /metrics. */
__attribute__((constructor)) static void idem_fsm_register(void)
{
    fsm_register(&idem_fsm);
}

static void idem_set_state(struct idem *e, enum idem_state to)
{
    e->state = fsm_next(&idem_fsm, (int)e->state, (int)to);
}

static void idem_acquire(struct idem *e);

static uint32_t lock_ms(const struct idem *e)
{
    return (uint32_t)e->cfg->lock_seconds * 1000u;
}

/* The engine is finished: the host may end the exchange. */
static void idem_done(struct idem *e)
{
    idem_set_state(e, IDEM_DONE);
    e->ops->done(e->host);
}

/* Our own answer; the outcome follows from the error unless already set
 * (a lost replay, a store error). */
static void idem_answer(struct idem *e, enum err_code e_code)
{
    if (e->outcome == OUT_PASSTHROUGH || e->outcome == OUT_EXECUTED) {
        switch (e_code) {
        case ERR_IN_PROGRESS:
            e->outcome = OUT_IN_PROGRESS;
            break;
        case ERR_KEY_REUSE:
            e->outcome = OUT_MISMATCH;
            break;
        case ERR_STORE_UNAVAILABLE:
            e->outcome = OUT_STORE_ERROR;
            break;
        case ERR_RATE_LIMITED:
        case ERR_CONCURRENCY_LIMITED:
            e->outcome = OUT_RATE_LIMITED;
            break;
        default:
            e->outcome = OUT_REJECTED;
            break;
        }
    }
    struct idem_rl_info rl;
    uint32_t retry_s = e_code == ERR_RATE_LIMITED && idem_ratelimit(e, &rl) ? rl.retry_s : 0;
    e->ops->answer(e->host, e_code, e->replayed, retry_s);
    idem_done(e);
}

static void idem_forward(struct idem *e)
{
    idem_set_state(e, IDEM_FORWARDED);
    e->ops->forward(e->host);
}

/* ---- rate and concurrency limits (docs/configuration.md, Rate limits) */

static void idem_new_token(char out[STORE_TOKEN_LEN + 1]);

/* A store call in the background: it only holds the host. */
static void idem_bg_done(void *arg, int status)
{
    (void)status;
    struct idem *e = arg;
    e->ops->release(e->host);
}

/* The limits' scope: the credential's hash as for keys, else the client's
 * address (an anonymous client is limited on its own). */
static void idem_rl_scope(struct idem *e)
{
    const struct cfg_idem *idem = e->cfg;
    for (size_t i = 0; i < idem->scope_headers.n; i++) {
        const struct http1_header *h =
            http1_find_header(e->req.head, idem->scope_headers.v[i], NULL);
        if (!h || h->value.n == 0) continue;
        char out[SCOPE_HEX_LEN + 1];
        scope_hash(idem->scope_secret, strlen(idem->scope_secret), h->value.p, h->value.n, out);
        e->rl_scope_len = (size_t)snprintf(e->rl_scope, sizeof(e->rl_scope), "%s", out);
        return;
    }
    int n = snprintf(e->rl_scope, sizeof(e->rl_scope), "ip:%s", e->req.peer ? e->req.peer : "");
    e->rl_scope_len = n < (int)sizeof(e->rl_scope) ? (size_t)n : sizeof(e->rl_scope) - 1;
}

/* Whether the request counts against its limits (covered: it carries a
 * key on a covered method); sets its scope. */
static bool idem_rl_applies(struct idem *e, bool covered)
{
    const struct cfg_ratelimit *rl = e->req.rl;
    if (!rl || !rl->enabled || (rl->requests == 0 && rl->concurrent == 0)) return false;
    if (!covered && rl->count == CFG_RL_COUNT_COVERED) return false;
    e->rl = rl;
    idem_rl_scope(e);
    return true;
}

static void idem_limited(void *arg, const struct store_limit_reply *r);

/* The request's limits: counted, and a slot asked for (a lease of
 * lock_seconds under the request's token). */
static struct store_limit_args idem_limit_args(const struct idem *e)
{
    return (struct store_limit_args){
        (uint32_t)e->rl->requests, (uint32_t)e->rl->window_seconds * 1000u,
        (uint32_t)e->rl->concurrent, e->rl->concurrent > 0, lock_ms(e)};
}

/* An uncovered request's check: one round trip of its own. */
static void idem_limit(struct idem *e)
{
    if (!e->token[0]) idem_new_token(e->token);
    struct store_limit_args a = idem_limit_args(e);
    e->ops->hold(e->host);
    store_limit(e->env->store, e->rl_scope, e->rl_scope_len, e->token, &a, idem_limited, e);
}

static void idem_slot_release(struct idem *e)
{
    if (!e->rl_slot) return;
    e->rl_slot = false;
    e->ops->hold(e->host);
    store_limit_release(e->env->store, e->rl_scope, e->rl_scope_len, e->token, idem_bg_done, e);
}

/* 429: nothing forwarded, no key locked. */
static void idem_refuse(struct idem *e, enum metrics_rl_reason why)
{
    metrics_add(M_RATELIMITED, (int)why, 1);
    idem_answer(e, why == METRICS_RL_RATE ? ERR_RATE_LIMITED : ERR_CONCURRENCY_LIMITED);
}

/* A request that is not covered: forwarded, after its limit check when
 * it counts. */
static void idem_pass(struct idem *e)
{
    if (!idem_rl_applies(e, false)) {
        idem_forward(e);
        return;
    }
    idem_set_state(e, IDEM_ACQUIRING);
    idem_limit(e);
}

static void idem_store_failed(struct idem *e);

/* The verdict on a request that is not covered. */
static void idem_pass_decide(struct idem *e)
{
    switch (e->rl_reply.verdict) {
    case STORE_LIMIT_ALLOWED:
        if (e->rl_slot) e->ops->timer_arm(e->host, lock_ms(e) / 3); /* the lease's renewal */
        idem_forward(e);
        break;
    case STORE_LIMIT_RATE:
        idem_refuse(e, METRICS_RL_RATE);
        break;
    case STORE_LIMIT_CONCURRENCY:
        idem_refuse(e, METRICS_RL_CONCURRENCY);
        break;
    case STORE_LIMIT_ERROR:
        e->rl = NULL; /* no headers: nothing was counted */
        idem_store_failed(e);
        break;
    }
}

bool idem_ratelimit(const struct idem *e, struct idem_rl_info *info)
{
    if (!e->rl || !e->rl_answered || e->rl_reply.verdict == STORE_LIMIT_ERROR) return false;
    const struct store_limit_reply *r = &e->rl_reply;
    uint32_t window = (uint32_t)e->rl->window_seconds;
    uint32_t reset = (r->reset_ms + 999) / 1000;
    info->cfg = e->rl;
    info->remaining = r->remaining;
    info->reset_s = reset > window ? window : reset;
    info->retry_s =
        r->verdict == STORE_LIMIT_RATE && r->retry_ms > 1000 ? (r->retry_ms + 999) / 1000 : 1;
    return true;
}

void idem_init(struct idem *e, const struct idem_env *env, const struct idem_host_ops *ops,
               void *host)
{
    memset(e, 0, offsetof(struct idem, skey_buf));
    e->env = env;
    e->ops = ops;
    e->host = host;
    e->state = IDEM_NEW;
    fsm_enter(&idem_fsm, IDEM_NEW);
    buf_init(&e->rec);
}

/* Owner tokens need to be unique, not secret: a per-thread random 128-bit
 * seed (from OpenSSL, once) plus a counter, mixed with splitmix64. Calling
 * RAND_bytes per request cost a getpid() syscall each time. */
static __thread uint64_t tok_seed[2];
static __thread uint64_t tok_counter;

static uint64_t splitmix64(uint64_t x)
{
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

static void idem_new_token(char out[STORE_TOKEN_LEN + 1])
{
    static const char hex[] = "0123456789abcdef";
    if (tok_counter == 0 && RAND_bytes((unsigned char *)tok_seed, sizeof(tok_seed)) != 1) abort();
    tok_counter++;
    uint64_t v[2] = {splitmix64(tok_seed[0] + tok_counter), tok_seed[1] ^ tok_counter};
    for (int i = 0; i < 16; i++) {
        unsigned b = (unsigned)(v[i / 8] >> (8 * (i % 8))) & 0xff;
        out[2 * i] = hex[b >> 4];
        out[2 * i + 1] = hex[b & 15];
    }
    out[STORE_TOKEN_LEN] = '\0';
}

/* Scope of the request: 0 with out set, 1 for "bypass", or -1 after
 * answering 401. */
static int idem_scope(struct idem *e, char out[SCOPE_HEX_LEN + 1])
{
    const struct cfg_idem *idem = e->cfg;
    for (size_t i = 0; i < idem->scope_headers.n; i++) {
        const struct http1_header *h =
            http1_find_header(e->req.head, idem->scope_headers.v[i], NULL);
        /* An empty credential is no credential: otherwise every client
         * sending "Authorization:" would share one scope and slip past
         * anonymous "reject". */
        if (!h || h->value.n == 0) continue;
        scope_hash(idem->scope_secret, strlen(idem->scope_secret), h->value.p, h->value.n, out);
        return 0;
    }
    switch (idem->anonymous) {
    case CFG_ANON_REJECT:
        idem_answer(e, ERR_CREDENTIALS_REQUIRED);
        return -1;
    case CFG_ANON_BYPASS:
        return 1;
    case CFG_ANON_SHARED:
        break;
    }
    snprintf(out, SCOPE_HEX_LEN + 1, "%s", SCOPE_ANONYMOUS);
    return 0;
}

static void idem_fingerprint(struct idem *e)
{
    const struct cfg_idem *idem = e->cfg;
    const struct http1_head *h = e->req.head;
    struct fp_state *st = fp_begin();
    fp_part(st, h->method.p, h->method.n);
    fp_part(st, h->target.p, h->target.n);
    for (size_t i = 0; i < idem->fingerprint_headers.n; i++) {
        const struct http1_header *fh = http1_find_header(h, idem->fingerprint_headers.v[i], NULL);
        fp_flag(st, fh != NULL);
        fp_part(st, fh ? fh->value.p : "", fh ? fh->value.n : 0);
    }
    fp_part(st, e->req.body, e->req.body_len);
    fp_end(st, e->fp);
}

/* "<scope>:<key>" into the engine (inline, or malloc'd when long). */
static void idem_set_skey(struct idem *e, const char *scope, const char *key, size_t key_len)
{
    size_t scope_len = strlen(scope);
    e->skey_len = scope_len + 1 + key_len;
    e->skey = e->skey_len < sizeof(e->skey_buf) ? e->skey_buf : malloc(e->skey_len + 1);
    if (!e->skey) abort();
    memcpy(e->skey, scope, scope_len);
    e->skey[scope_len] = ':';
    memcpy(e->skey + scope_len + 1, key, key_len);
    e->skey[e->skey_len] = '\0';
}

/* The key header, validated: 0 with key set, 1 when absent (answered or
 * passed through), -1 after answering 400. */
static int idem_key(struct idem *e, char *key, size_t cap, size_t *key_len)
{
    size_t count = 0;
    const struct http1_header *kh = http1_find_header(e->req.head, e->cfg->header, &count);
    if (!kh) {
        if (e->cfg->required)
            idem_answer(e, ERR_KEY_REQUIRED);
        else
            idem_pass(e);
        return 1;
    }
    if (count > 1 || kh->value.n >= cap ||
        idem_key_parse(kh->value.p, kh->value.n, (size_t)e->cfg->key_max_length, key, key_len)) {
        idem_answer(e, ERR_INVALID_KEY);
        return -1;
    }
    return 0;
}

/* A key a request check gave, validated as a header's would be: 0 with
 * key set, -1 after answering 400. */
static int idem_given_key(struct idem *e, const struct idem_given *g, char *key, size_t cap,
                          size_t *key_len)
{
    if (!g->key) {
        idem_answer(e, g->error);
        return -1;
    }
    if (g->key_len >= cap ||
        idem_key_parse(g->key, g->key_len, (size_t)e->cfg->key_max_length, key, key_len)) {
        idem_answer(e, ERR_WEBHOOK_KEY_INVALID);
        return -1;
    }
    return 0;
}

void idem_start(struct idem *e, const struct cfg_idem *cfg, bool failure_open_mode,
                const struct idem_request *req)
{
    e->cfg = cfg;
    e->req = *req;
    e->outcome = OUT_PASSTHROUGH;
    e->failure_open = failure_open_mode;
    const struct http1_head *h = req->head;
    if (req->refused) {
        idem_answer(e, req->refusal);
        return;
    }
    if (!cfg->enabled || !cfg_idem_covers_method(cfg, h->method.p, h->method.n)) {
        idem_pass(e);
        return;
    }
    /* Room for the longest valid key quoted with every byte escaped; any
     * longer value cannot be valid. */
    char key[2 * IDEM_KEY_MAX + 3];
    size_t key_len = 0;
    char scope[SCOPE_HEX_LEN + 1];
    if (req->given) {
        if (idem_given_key(e, req->given, key, sizeof(key), &key_len) != 0) return;
        memcpy(scope, req->given->scope, sizeof(scope));
    } else {
        if (idem_key(e, key, sizeof(key), &key_len) != 0) return;
        int sr = idem_scope(e, scope);
        if (sr != 0) {
            if (sr > 0) idem_pass(e);
            return;
        }
    }
    idem_set_skey(e, scope, key, key_len);
    idem_fingerprint(e);
    idem_new_token(e->token);
    e->outcome = OUT_EXECUTED;
    e->wait_deadline_ms = clock_now_ms() + (uint64_t)cfg->wait_max_ms;
    /* The limits go out with the acquire (store_acquire: one write to one
     * Redis, or in parallel to two cluster nodes): no round trip added. */
    idem_rl_applies(e, true);
    idem_acquire(e);
}

static void idem_renew_done(void *arg, int status)
{
    struct idem *e = arg;
    if (status == 1) {
        metrics_inc(M_LOCK_RENEWALS);
    } else {
        metrics_inc(M_STORE_ERRORS);
        log_msg(LOG_WARN, "request %.*s: lock renewal %s", (int)e->req.id_len, e->req.id,
                status == 0 ? "refused: lock lost" : "failed: store error");
    }
    e->ops->release(e->host);
}

void idem_timer_fired(struct idem *e)
{
    if (e->state == IDEM_WAITING) {
        idem_set_state(e, IDEM_ACQUIRING);
        idem_acquire(e);
        return;
    }
    if (e->state != IDEM_FORWARDED || !(e->owner || e->rl_slot)) return;
    if (e->rl_slot) {
        e->ops->hold(e->host);
        store_limit_renew(e->env->store, e->rl_scope, e->rl_scope_len, e->token, lock_ms(e),
                          idem_bg_done, e);
        if (!e->owner) {
            e->ops->timer_arm(e->host, lock_ms(e) / 3);
            return;
        }
    }
    /* Renew every lock_seconds/3: two renewals can fail in a row before the
     * lock would lapse while the upstream still works. */
    e->ops->hold(e->host);
    store_renew(e->env->store, e->skey, e->skey_len, e->token, lock_ms(e), idem_renew_done, e);
    e->ops->timer_arm(e->host, lock_ms(e) / 3);
}

static void idem_replay(struct idem *e, const struct store_acquire_reply *r)
{
    struct record rec; /* slices into the store's reply: no copy */
    size_t max = (size_t)e->cfg->max_cached_response_bytes + (16u << 20);
    if (record_decode(r->record, r->record_len, max, &rec) != 0 ||
        memcmp(rec.fp, e->fp, FP_LEN) != 0) {
        metrics_inc(M_STORE_ERRORS);
        log_msg(LOG_ERROR, "request %.*s: stored record is corrupt; treating as store error",
                (int)e->req.id_len, e->req.id);
        idem_answer(e, ERR_STORE_UNAVAILABLE);
        return;
    }
    if (record_is_lost(&rec)) {
        /* The first execution's answer was lost: every retry is told so,
         * and the key never executes again while the record lives. */
        e->outcome = OUT_LOST;
        e->replayed = true;
        idem_answer(e, ERR_UPSTREAM_ANSWER_LOST);
        return;
    }
    e->outcome = OUT_REPLAYED;
    e->replayed = true;
    e->ops->replay(e->host, &rec);
    idem_done(e);
}

static void idem_store_failed(struct idem *e)
{
    metrics_inc(M_STORE_ERRORS);
    e->outcome = OUT_STORE_ERROR;
    if (e->failure_open) {
        metrics_inc(M_OPEN_FORWARDS);
        idem_forward(e);
        return;
    }
    idem_answer(e, ERR_STORE_UNAVAILABLE);
}

static void idem_in_progress(struct idem *e)
{
    uint64_t now = clock_now_ms();
    if (e->cfg->concurrent != CFG_CONC_WAIT || now >= e->wait_deadline_ms) {
        idem_answer(e, ERR_IN_PROGRESS);
        return;
    }
    idem_set_state(e, IDEM_WAITING);
    uint64_t left = e->wait_deadline_ms - now;
    e->ops->timer_arm(e->host, (uint32_t)(left < IDEM_WAIT_POLL_MS ? left : IDEM_WAIT_POLL_MS));
}

static void idem_on_acquire(struct idem *e, const struct store_acquire_reply *r);

/* Both answers are in: the limit's verdict on what the acquire found. A
 * key's lock taken for a refused request is given back at once; a slot
 * taken for a request that is not executed (a replay, a 409) too. */
static void idem_decide(struct idem *e, const struct store_acquire_reply *r)
{
    enum store_limit_verdict v = e->rl_reply.verdict;
    bool locked = r->state == STORE_ACQ_LOCKED;
    if (v == STORE_LIMIT_ERROR) {
        e->rl = NULL; /* nothing was counted: no headers */
        if (!e->failure_open) {
            if (locked) {
                e->ops->hold(e->host);
                store_release(e->env->store, e->skey, e->skey_len, e->token, idem_bg_done, e);
            }
            idem_store_failed(e);
            return;
        }
        /* failure_mode "open": the limit is skipped; the key as found */
        metrics_inc(M_STORE_ERRORS);
        idem_on_acquire(e, r);
        return;
    }
    if (v == STORE_LIMIT_RATE || (v == STORE_LIMIT_CONCURRENCY && locked)) {
        if (locked) {
            e->ops->hold(e->host);
            store_release(e->env->store, e->skey, e->skey_len, e->token, idem_bg_done, e);
        }
        idem_refuse(e, v == STORE_LIMIT_RATE ? METRICS_RL_RATE : METRICS_RL_CONCURRENCY);
        return;
    }
    if (!locked) idem_slot_release(e);
    idem_on_acquire(e, r);
}

static void idem_limit_answered(struct idem *e, const struct store_limit_reply *r)
{
    e->rl_reply = *r;
    e->rl_answered = true;
    e->rl_slot = r->verdict == STORE_LIMIT_ALLOWED && e->rl->concurrent > 0;
}

static void idem_limited(void *arg, const struct store_limit_reply *r)
{
    struct idem *e = arg;
    idem_limit_answered(e, r);
    idem_pass_decide(e);
    e->ops->release(e->host);
}

static void idem_acquired(void *arg, const struct store_acquire_reply *r)
{
    struct idem *e = arg;
    metrics_observe_store(clock_now_ms() - e->store_start_ms);
    if (e->rl && !e->rl_answered) { /* the first acquire carried the limits */
        idem_limit_answered(e, &r->limit);
        idem_decide(e, r);
    } else {
        idem_on_acquire(e, r);
    }
    e->ops->release(e->host);
}

static void idem_on_acquire(struct idem *e, const struct store_acquire_reply *r)
{
    switch (r->state) {
    case STORE_ACQ_LOCKED:
        e->owner = true;
        e->ops->timer_arm(e->host, lock_ms(e) / 3);
        idem_forward(e);
        break;
    case STORE_ACQ_IN_PROGRESS:
        idem_in_progress(e);
        break;
    case STORE_ACQ_MISMATCH:
        idem_answer(e, ERR_KEY_REUSE);
        break;
    case STORE_ACQ_COMPLETED:
        idem_replay(e, r);
        break;
    case STORE_ACQ_ERROR:
        idem_store_failed(e);
        break;
    }
}

static void idem_acquire(struct idem *e)
{
    if (e->state == IDEM_NEW) idem_set_state(e, IDEM_ACQUIRING);
    e->store_start_ms = clock_now_ms();
    e->ops->hold(e->host);
    struct store_acquire_req req = {e->skey,    e->skey_len, e->fp,       e->token,
                                    lock_ms(e), NULL,        e->rl_scope, e->rl_scope_len};
    struct store_limit_args limits;
    if (e->rl && !e->rl_answered) { /* the first acquire: the limits ride with it */
        limits = idem_limit_args(e);
        req.limits = &limits;
    }
    store_acquire(e->env->store, &req, idem_acquired, e);
}

static bool idem_status_keepable(const struct cfg_idem *idem, int status)
{
    /* 401/403 say nothing about the request's effect, and keeping them would
     * let an unauthenticated flood with invented credentials fill the store. */
    if (status == 401 || status == 403) return false;
    if (status == 408 || status == 409 || status == 425 || status == 429) return false;
    if (status >= 500) return idem->cache_5xx;
    return true;
}

static bool idem_excluded(const struct cfg_idem *idem, struct http1_slice name)
{
    if (http1_slice_ieq(name, "content-length") || http1_slice_ieq(name, "x-request-id") ||
        http1_slice_ieq(name, "idempotent-replayed"))
        return true;
    for (size_t i = 0; i < idem->replay_exclude_headers.n; i++)
        if (http1_slice_ieq(name, idem->replay_exclude_headers.v[i])) return true;
    return false;
}

/* Gives the record buffer back (to the pool while it kept its size). */
static void idem_rec_drop(struct idem *e)
{
    buf_reset(&e->rec);
    buf_release(&e->rec, e->env->bufs);
}

static void idem_stop_recording(struct idem *e)
{
    e->keep = IDEM_KEEP_NO;
    e->outcome = OUT_NOT_CACHED;
    idem_rec_drop(e);
}

static void idem_rec_begin(struct idem *e, int status)
{
    buf_init(&e->rec);
    buf_take(&e->rec, e->env->bufs); /* a pooled buffer: no malloc for small answers */
    record_begin(&e->rw, &e->rec, status, (uint64_t)time(NULL) * 1000u, e->fp);
}

/* The headers a replay must reproduce: end-to-end, not excluded. */
static int idem_record_headers(struct idem *e, const struct http1_head *rh)
{
    for (size_t i = 0; i < rh->n_headers; i++) {
        const struct http1_header *h = &rh->headers[i];
        if (http1_is_hop_by_hop(rh, i) || idem_excluded(e->cfg, h->name)) continue;
        if (record_add_header(&e->rw, h->name.p, h->name.n, h->value.p, h->value.n) < 0) return -1;
    }
    return 0;
}

void idem_response_head(struct idem *e, const struct http1_head *rh)
{
    if (!e->owner) return;
    const struct cfg_idem *idem = e->cfg;
    const struct http1_header *ct = http1_find_header(rh, "content-type", NULL);
    bool sse = ct && ct->value.n >= 17 && strncasecmp(ct->value.p, "text/event-stream", 17) == 0;
    bool keep =
        idem_status_keepable(idem, rh->status) && !sse &&
        !(rh->body == HTTP1_BODY_LENGTH && rh->content_length > idem->max_cached_response_bytes);
    if (!keep) {
        e->keep = IDEM_KEEP_NO;
        e->outcome = OUT_NOT_CACHED;
        return;
    }
    e->keep = IDEM_KEEP_RECORDING;
    idem_rec_begin(e, rh->status);
    record_add_header(&e->rw, RECORD_HDR_REASON, strlen(RECORD_HDR_REASON), rh->reason.p,
                      rh->reason.n);
    /* A HEAD answer declares the length of a body it does not carry: keep
     * that, so the replay says what the first answer said. */
    const struct http1_header *cl = http1_find_header(rh, "content-length", NULL);
    if (cl && rh->body == HTTP1_BODY_NONE && http1_slice_ieq(e->req.head->method, "HEAD"))
        record_add_header(&e->rw, RECORD_HDR_LENGTH, strlen(RECORD_HDR_LENGTH), cl->value.p,
                          cl->value.n);
    if (idem_record_headers(e, rh) < 0) {
        idem_stop_recording(e);
        return;
    }
    record_begin_body(&e->rw);
}

void idem_response_body(struct idem *e, const char *p, size_t n)
{
    if (e->keep != IDEM_KEEP_RECORDING) return;
    uint64_t max = e->cfg->max_cached_response_bytes;
    if (buf_size(&e->rec) + n > max + (1u << 20) || e->rec_body_len + n > max) {
        idem_stop_recording(e);
        return;
    }
    e->rec_body_len += n;
    buf_append(&e->rec, p, n);
}

static void idem_store_done(void *arg, int status)
{
    struct idem *e = arg;
    if (status != 1) {
        metrics_inc(M_STORE_ERRORS);
        log_msg(LOG_ERROR,
                "request %.*s: could not %s the idempotency record (%s); the key stays locked "
                "until its lock expires",
                (int)e->req.id_len, e->req.id, e->keep == IDEM_KEEP_RECORDING ? "store" : "release",
                status == 0 ? "lock no longer ours" : "store error");
    }
    idem_done(e);
    e->ops->release(e->host);
}

/* Replaces whatever was recorded by a lost record: status 502 and the
 * pseudo-header RECORD_HDR_LOST naming why, no body. */
static void idem_record_lost(struct idem *e, const char *why)
{
    if (e->keep == IDEM_KEEP_RECORDING) idem_rec_drop(e);
    idem_rec_begin(e, 502);
    record_add_header(&e->rw, RECORD_HDR_LOST, strlen(RECORD_HDR_LOST), why, strlen(why));
    record_begin_body(&e->rw);
    e->keep = IDEM_KEEP_RECORDING;
    e->outcome = OUT_LOST;
}

enum idem_end idem_response_failed(struct idem *e, enum idem_failure f)
{
    enum idem_end how = IDEM_END_FAILED;
    switch (f) {
    case IDEM_FAIL_BAD_HEAD:
        how = e->owner ? IDEM_END_LOST_HEAD : IDEM_END_FAILED;
        break;
    case IDEM_FAIL_CUT:
        how = idem_would_keep(e) ? IDEM_END_LOST_BODY : IDEM_END_FAILED;
        break;
    case IDEM_FAIL_UNANSWERED:
        how = idem_keeps_unanswered(e) ? IDEM_END_UNANSWERED : IDEM_END_FAILED;
        break;
    case IDEM_FAIL_NOT_SENT:
        break;
    }
    if (how != IDEM_END_FAILED) e->outcome = OUT_LOST;
    return how;
}

bool idem_is_owner(const struct idem *e)
{
    return e->owner;
}

bool idem_is_done(const struct idem *e)
{
    return e->state == IDEM_DONE;
}

enum metrics_outcome idem_outcome(const struct idem *e)
{
    return e->outcome;
}

bool idem_keeps_unanswered(const struct idem *e)
{
    return e->owner && e->cfg->unknown_outcome == CFG_UNKNOWN_KEEP;
}

bool idem_would_keep(const struct idem *e)
{
    return e->owner && e->keep == IDEM_KEEP_RECORDING;
}

void idem_response_end(struct idem *e, enum idem_end how)
{
    e->ops->timer_cancel(e->host);
    idem_slot_release(e); /* the answer is over, kept or not */
    if (!e->owner) {
        idem_done(e);
        return;
    }
    idem_set_state(e, IDEM_COMPLETING);
    if (how == IDEM_END_LOST_HEAD || how == IDEM_END_LOST_BODY || how == IDEM_END_UNANSWERED) {
        static const char *const why[] = {[IDEM_END_LOST_HEAD] = "malformed head",
                                          [IDEM_END_LOST_BODY] = "body cut",
                                          [IDEM_END_UNANSWERED] = "no answer"};
        idem_record_lost(e, why[how]);
    } else if (how == IDEM_END_FAILED) {
        if (e->keep == IDEM_KEEP_RECORDING) idem_rec_drop(e);
        e->keep = IDEM_KEEP_NO;
        e->outcome = OUT_NOT_CACHED; /* 502/504 of ours, or a broken answer: released */
    }
    e->ops->hold(e->host);
    if (e->keep == IDEM_KEEP_RECORDING) {
        record_end(&e->rw);
        store_complete(e->env->store, e->skey, e->skey_len, e->token,
                       (const uint8_t *)buf_data(&e->rec), buf_size(&e->rec),
                       (uint32_t)e->cfg->ttl_seconds, idem_store_done, e);
    } else {
        store_release(e->env->store, e->skey, e->skey_len, e->token, idem_store_done, e);
    }
    idem_rec_drop(e);
}

bool idem_scope_key(const struct idem *e, const char **scope, size_t *scope_len, const char **key,
                    size_t *key_len)
{
    if (!e->skey) return false;
    const char *colon = memchr(e->skey, ':', e->skey_len);
    size_t sl = (size_t)(colon - e->skey);
    *scope = e->skey;
    *scope_len = sl < 16 ? sl : 16;
    *key = colon + 1;
    *key_len = e->skey_len - sl - 1;
    return true;
}

void idem_free(struct idem *e)
{
    if (!e->env) return; /* never initialized */
    fsm_leave(&idem_fsm, (int)e->state);
    idem_rec_drop(e);
    if (e->skey != e->skey_buf) free(e->skey);
    e->skey = NULL;
    e->env = NULL;
}
