/* idem.c — the idempotency state machine (SPEC sections 3 and 4).
 *
 * Decides whether a request is covered, validates its key, computes its
 * scope and fingerprint, asks the store, and drives the exchange: forward,
 * replay, or answer. While the upstream works it renews the lock; when the
 * response ends it completes (keeps the record) or releases the key. Owns
 * the exchange's idempotency fields; knows no sockets. */
#include "idemgate/idem/engine.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <event2/event.h>
#include <openssl/rand.h>

#include "idemgate/config/config.h"
#include "idemgate/proxy/exchange.h"
#include "idemgate/core/log.h"
#include "idemgate/core/metrics.h"
#include "idemgate/proxy/server.h"

/* Poll interval of a duplicate waiting for the owner (concurrent "wait").
 * Polling through the store works across instances with no pub/sub. */
#define IDEM_WAIT_POLL_MS 50
#define ANON_SCOPE "anonymous"
#define IDEM_KEY_MAX 8192 /* the largest idempotency.key_max_length config.c accepts */

static void idem_acquire(struct exchange *ex);

static void idem_answer(struct exchange *ex, enum err_code e)
{
    exchange_answer_error(ex, e);
    exchange_idem_finished(ex);
}

static void idem_passthrough(struct exchange *ex)
{
    ex->outcome = OUT_PASSTHROUGH;
    exchange_forward(ex);
}

/* (Re)creates the exchange's one engine timer with callback cb. */
static void idem_timer_set(struct exchange *ex, event_callback_fn cb)
{
    if (!ex->idem_timer) {
        ex->idem_timer = evtimer_new(ex->w->base, cb, ex);
        return;
    }
    evtimer_del(ex->idem_timer);
    evtimer_assign(ex->idem_timer, ex->w->base, cb, ex);
}

static void timer_arm_ms(struct event *ev, long ms)
{
    struct timeval tv = {ms / 1000, (ms % 1000) * 1000};
    evtimer_add(ev, &tv);
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
static int idem_scope(struct exchange *ex, char out[SCOPE_HEX_LEN + 1])
{
    const struct cfg_idem *idem = ex->idem;
    for (size_t i = 0; i < idem->scope_headers.n; i++) {
        const struct http1_header *h = http1_find_header(&ex->head, idem->scope_headers.v[i], NULL);
        /* An empty credential is no credential: otherwise every client
         * sending "Authorization:" would share one scope and slip past
         * anonymous "reject". */
        if (!h || h->value.n == 0) continue;
        scope_hash(idem->scope_secret, strlen(idem->scope_secret), h->value.p, h->value.n, out);
        return 0;
    }
    switch (idem->anonymous) {
    case CFG_ANON_REJECT:
        idem_answer(ex, ERR_CREDENTIALS_REQUIRED);
        return -1;
    case CFG_ANON_BYPASS:
        return 1;
    case CFG_ANON_SHARED:
        break;
    }
    snprintf(out, SCOPE_HEX_LEN + 1, "%s", ANON_SCOPE);
    return 0;
}

static void idem_fingerprint(struct exchange *ex)
{
    const struct cfg_idem *idem = ex->idem;
    struct fp_state *st = fp_begin();
    fp_part(st, ex->head.method.p, ex->head.method.n);
    fp_part(st, ex->head.target.p, ex->head.target.n);
    for (size_t i = 0; i < idem->fingerprint_headers.n; i++) {
        const struct http1_header *h =
            http1_find_header(&ex->head, idem->fingerprint_headers.v[i], NULL);
        fp_flag(st, h != NULL);
        fp_part(st, h ? h->value.p : "", h ? h->value.n : 0);
    }
    fp_part(st, ex->body, ex->body_len);
    fp_end(st, ex->fp);
}

void idem_start(struct exchange *ex)
{
    const struct cfg_idem *idem = ex->idem;
    const struct http1_head *h = &ex->head;
    if (!idem->enabled || !cfg_idem_covers_method(idem, h->method.p, h->method.n)) {
        idem_passthrough(ex);
        return;
    }
    size_t count = 0;
    const struct http1_header *kh = http1_find_header(h, idem->header, &count);
    if (!kh) {
        if (idem->required)
            idem_answer(ex, ERR_KEY_REQUIRED);
        else
            idem_passthrough(ex);
        return;
    }
    /* Room for the longest valid key quoted with every byte escaped; any
     * longer value cannot be valid. */
    char key[2 * IDEM_KEY_MAX + 3];
    size_t key_len = 0;
    if (count > 1 || kh->value.n >= sizeof(key) ||
        idem_key_parse(kh->value.p, kh->value.n, (size_t)idem->key_max_length, key, &key_len)) {
        idem_answer(ex, ERR_INVALID_KEY);
        return;
    }
    char scope[SCOPE_HEX_LEN + 1];
    int sr = idem_scope(ex, scope);
    if (sr != 0) {
        if (sr > 0) idem_passthrough(ex);
        return;
    }
    size_t scope_len = strlen(scope);
    ex->skey_len = scope_len + 1 + key_len;
    ex->skey = ex->skey_len < sizeof(ex->skey_buf) ? ex->skey_buf : malloc(ex->skey_len + 1);
    if (!ex->skey) abort();
    memcpy(ex->skey, scope, scope_len);
    ex->skey[scope_len] = ':';
    memcpy(ex->skey + scope_len + 1, key, key_len);
    ex->skey[ex->skey_len] = '\0';
    idem_fingerprint(ex);
    idem_new_token(ex->token);
    ex->covered = true;
    ex->outcome = OUT_EXECUTED;
    ex->wait_deadline_ms = worker_now_ms(ex->w) + (uint64_t)idem->wait_max_ms;
    idem_acquire(ex);
}

static void idem_renew_done(void *arg, int status)
{
    struct exchange *ex = arg;
    if (status == 1) {
        metrics_inc(M_LOCK_RENEWALS);
    } else {
        metrics_inc(M_STORE_ERRORS);
        log_msg(LOG_WARN, "request %.*s: lock renewal %s", (int)ex->request_id_len, ex->request_id,
                status == 0 ? "refused: lock lost" : "failed: store error");
    }
    exchange_unref(ex);
}

/* Renew every lock_seconds/3: two renewals can fail in a row before the
 * lock would lapse while the upstream still works. */
static void idem_renew_tick(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    struct exchange *ex = arg;
    uint32_t lock_ms = (uint32_t)ex->idem->lock_seconds * 1000u;
    exchange_ref(ex);
    store_renew(ex->w->store, ex->skey, ex->skey_len, ex->token, lock_ms, idem_renew_done, ex);
    timer_arm_ms(ex->idem_timer, lock_ms / 3);
}

static void idem_wait_tick(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    struct exchange *ex = arg;
    exchange_set_state(ex, EX_ACQUIRING);
    idem_acquire(ex);
}

static void idem_replay(struct exchange *ex, const struct store_acquire_reply *r)
{
    struct record rec; /* slices into the store's reply: no copy */
    size_t max = (size_t)ex->idem->max_cached_response_bytes + (16u << 20);
    if (record_decode(r->record, r->record_len, max, &rec) != 0 ||
        memcmp(rec.fp, ex->fp, FP_LEN) != 0) {
        metrics_inc(M_STORE_ERRORS);
        log_msg(LOG_ERROR, "request %.*s: stored record is corrupt; treating as store error",
                (int)ex->request_id_len, ex->request_id);
        idem_answer(ex, ERR_STORE_UNAVAILABLE);
        return;
    }
    if (record_is_lost(&rec)) {
        /* The first execution's answer was lost: every retry is told so,
         * and the key never executes again while the record lives. */
        ex->outcome = OUT_LOST;
        ex->replayed = true;
        idem_answer(ex, ERR_UPSTREAM_ANSWER_LOST);
        return;
    }
    exchange_replay(ex, &rec);
    exchange_idem_finished(ex);
}

static void idem_store_failed(struct exchange *ex)
{
    metrics_inc(M_STORE_ERRORS);
    ex->outcome = OUT_STORE_ERROR;
    if (ex->idem_failure_open) {
        metrics_inc(M_OPEN_FORWARDS);
        exchange_forward(ex);
        return;
    }
    idem_answer(ex, ERR_STORE_UNAVAILABLE);
}

static void idem_acquired(void *arg, const struct store_acquire_reply *r)
{
    struct exchange *ex = arg;
    metrics_observe_store(worker_now_ms(ex->w) - ex->store_start_ms);
    switch (r->state) {
    case STORE_ACQ_LOCKED: {
        ex->owner = true;
        uint32_t lock_ms = (uint32_t)ex->idem->lock_seconds * 1000u;
        idem_timer_set(ex, idem_renew_tick);
        timer_arm_ms(ex->idem_timer, lock_ms / 3);
        exchange_forward(ex);
        break;
    }
    case STORE_ACQ_IN_PROGRESS: {
        uint64_t now = worker_now_ms(ex->w);
        if (ex->idem->concurrent == CFG_CONC_WAIT && now < ex->wait_deadline_ms) {
            exchange_set_state(ex, EX_WAITING);
            idem_timer_set(ex, idem_wait_tick);
            uint64_t left = ex->wait_deadline_ms - now;
            timer_arm_ms(ex->idem_timer,
                         (long)(left < IDEM_WAIT_POLL_MS ? left : IDEM_WAIT_POLL_MS));
        } else {
            idem_answer(ex, ERR_IN_PROGRESS);
        }
        break;
    }
    case STORE_ACQ_MISMATCH:
        idem_answer(ex, ERR_KEY_REUSE);
        break;
    case STORE_ACQ_COMPLETED:
        idem_replay(ex, r);
        break;
    case STORE_ACQ_ERROR:
        idem_store_failed(ex);
        break;
    }
    exchange_unref(ex);
}

static void idem_acquire(struct exchange *ex)
{
    if (ex->state == EX_NEW) exchange_set_state(ex, EX_ACQUIRING);
    ex->idem_failure_open = ex->w->cfg->redis.failure_mode == CFG_FAIL_OPEN;
    ex->store_start_ms = worker_now_ms(ex->w);
    exchange_ref(ex);
    store_acquire(ex->w->store, ex->skey, ex->skey_len, ex->fp, ex->token,
                  (uint32_t)ex->idem->lock_seconds * 1000u, idem_acquired, ex);
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
static void idem_rec_drop(struct exchange *ex)
{
    buf_reset(&ex->rec);
    buf_release(&ex->rec, &ex->w->bufs);
}

static void idem_stop_recording(struct exchange *ex)
{
    ex->recording = false;
    ex->keep = false;
    idem_rec_drop(ex);
}

void idem_response_head(struct exchange *ex, const struct http1_head *rh)
{
    if (!ex->owner) return;
    const struct cfg_idem *idem = ex->idem;
    const struct http1_header *ct = http1_find_header(rh, "content-type", NULL);
    bool sse = ct && ct->value.n >= 17 && strncasecmp(ct->value.p, "text/event-stream", 17) == 0;
    ex->keep =
        idem_status_keepable(idem, rh->status) && !sse &&
        !(rh->body == HTTP1_BODY_LENGTH && rh->content_length > idem->max_cached_response_bytes);
    if (!ex->keep) {
        ex->outcome = OUT_NOT_CACHED;
        return;
    }
    ex->recording = true;
    buf_init(&ex->rec);
    buf_take(&ex->rec, &ex->w->bufs); /* a pooled buffer: no malloc for small answers */
    record_begin(&ex->rw, &ex->rec, rh->status, (uint64_t)time(NULL) * 1000u, ex->fp);
    record_add_header(&ex->rw, ":reason", 7, rh->reason.p, rh->reason.n);
    /* A HEAD answer declares the length of a body it does not carry: keep
     * that, so the replay says what the first answer said. */
    const struct http1_header *cl = http1_find_header(rh, "content-length", NULL);
    if (cl && rh->body == HTTP1_BODY_NONE && http1_slice_ieq(ex->head.method, "HEAD"))
        record_add_header(&ex->rw, RECORD_HDR_LENGTH, strlen(RECORD_HDR_LENGTH), cl->value.p,
                          cl->value.n);
    for (size_t i = 0; i < rh->n_headers; i++) {
        const struct http1_header *h = &rh->headers[i];
        if (http1_is_hop_by_hop(rh, i) || idem_excluded(idem, h->name)) continue;
        if (record_add_header(&ex->rw, h->name.p, h->name.n, h->value.p, h->value.n) < 0) {
            idem_stop_recording(ex);
            ex->outcome = OUT_NOT_CACHED;
            return;
        }
    }
    record_begin_body(&ex->rw);
}

void idem_response_body(struct exchange *ex, const char *p, size_t n)
{
    if (!ex->recording) return;
    if (buf_size(&ex->rec) + n > ex->idem->max_cached_response_bytes + (1u << 20) ||
        ex->rec_body_len + n > ex->idem->max_cached_response_bytes) {
        idem_stop_recording(ex);
        ex->outcome = OUT_NOT_CACHED;
        return;
    }
    ex->rec_body_len += n;
    buf_append(&ex->rec, p, n);
}

static void idem_store_done(void *arg, int status)
{
    struct exchange *ex = arg;
    if (status != 1) {
        metrics_inc(M_STORE_ERRORS);
        log_msg(LOG_ERROR,
                "request %.*s: could not %s the idempotency record (%s); the key stays locked "
                "until its lock expires",
                (int)ex->request_id_len, ex->request_id, ex->keep ? "store" : "release",
                status == 0 ? "lock no longer ours" : "store error");
    }
    exchange_idem_finished(ex);
    exchange_unref(ex);
}

/* Replaces whatever was recorded by a lost record: status 502 and the
 * pseudo-header RECORD_HDR_LOST naming why, no body. */
static void idem_record_lost(struct exchange *ex, const char *why)
{
    if (ex->recording)
        buf_reset(&ex->rec);
    else {
        buf_init(&ex->rec);
        buf_take(&ex->rec, &ex->w->bufs);
    }
    ex->recording = true;
    record_begin(&ex->rw, &ex->rec, 502, (uint64_t)time(NULL) * 1000u, ex->fp);
    record_add_header(&ex->rw, RECORD_HDR_LOST, strlen(RECORD_HDR_LOST), why, strlen(why));
    record_begin_body(&ex->rw);
}

bool idem_keeps_unanswered(const struct exchange *ex)
{
    return ex->owner && ex->idem->unknown_outcome == CFG_UNKNOWN_KEEP;
}

bool idem_would_keep(const struct exchange *ex)
{
    return ex->owner && ex->keep;
}

void idem_response_end(struct exchange *ex, enum idem_end how)
{
    if (ex->idem_timer) evtimer_del(ex->idem_timer);
    if (!ex->owner) {
        exchange_idem_finished(ex);
        return;
    }
    exchange_ref(ex);
    if (how == IDEM_END_LOST_HEAD || how == IDEM_END_LOST_BODY || how == IDEM_END_UNANSWERED) {
        static const char *const why[] = {[IDEM_END_LOST_HEAD] = "malformed head",
                                          [IDEM_END_LOST_BODY] = "body cut",
                                          [IDEM_END_UNANSWERED] = "no answer"};
        ex->keep = true;
        ex->outcome = OUT_LOST;
        idem_record_lost(ex, why[how]);
    }
    if ((how == IDEM_END_OK && ex->keep && ex->recording) || ex->outcome == OUT_LOST) {
        record_end(&ex->rw);
        store_complete(ex->w->store, ex->skey, ex->skey_len, ex->token,
                       (const uint8_t *)buf_data(&ex->rec), buf_size(&ex->rec),
                       (uint32_t)ex->idem->ttl_seconds, idem_store_done, ex);
    } else {
        ex->keep = false;
        store_release(ex->w->store, ex->skey, ex->skey_len, ex->token, idem_store_done, ex);
    }
    idem_rec_drop(ex);
    ex->recording = false;
}

void idem_free(struct exchange *ex)
{
    if (ex->idem_timer) evtimer_del(ex->idem_timer); /* kept with the exchange for reuse */
    idem_rec_drop(ex);
    if (ex->skey != ex->skey_buf) free(ex->skey);
    ex->skey = NULL;
}
