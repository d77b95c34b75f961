/* store_redis.c — the Redis backend of the store (store.h).
 *
 * Owns one hiredis 0.14 async connection per store (per worker), attached
 * to the worker's event_base with the libevent adapter; its reconnect,
 * teardown and handshake timers; and every operation in flight. Knows
 * nothing of HTTP or of what a record contains.
 *
 * Each operation is one atomic round trip: a Lua script (loaded with SCRIPT
 * LOAD at connect time, called with EVALSHA, reloaded once on NOSCRIPT).
 * All state of one (scope, key) is one hash "<prefix>{<skey>}":
 *   s = "p" (in progress) | "c" (completed), t = owner token,
 *   f = fingerprint (16 raw bytes), r = record bytes.
 *
 * hiredis 0.14 has no command timeouts, so every operation runs its own
 * deadline timer. Ownership of an operation (struct rop):
 *
 *      caller ──start──▶ rop ◀──privdata── hiredis (refs: replies owed)
 *                         │
 *                         └─ timer (deadline)
 *
 * The user callback fires exactly once (reply, error or deadline: `done`);
 * the rop itself is freed only when it is done AND hiredis owes it no reply
 * (refs == 0), because hiredis calls back every pending command, with a NULL
 * reply when the connection goes away. A deadline means the connection may
 * be stuck, so it is torn down (from a deferred event, never from inside a
 * hiredis callback) and the reconnect logic takes over. */
#include "idemgate/store.h"

#include "idemgate/config.h"
#include "idemgate/log.h"

#include <event2/event.h>
#include <hiredis/adapters/libevent.h>
#include <hiredis/async.h>
#include <hiredis/hiredis.h>
#include <openssl/evp.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define RS_BACKOFF_MIN_MS 100
#define RS_BACKOFF_MAX_MS 2000
#define RS_MAX_ARGS 7

enum rs_script { RS_ACQUIRE, RS_COMPLETE, RS_RELEASE, RS_RENEW, RS_NSCRIPTS };

/* Acquire replies {code} or {3, record}; codes follow the table in store.h.
 * HMGET returns false for a missing key or field, so an absent key reads
 * as s == false. */
static const char *const rs_scripts[RS_NSCRIPTS] = {
    [RS_ACQUIRE] = "local v = redis.call('HMGET', KEYS[1], 's', 'f')\n"
                   "if not v[1] then\n"
                   "  redis.call('HSET', KEYS[1], 's', 'p', 't', ARGV[2], 'f', ARGV[1])\n"
                   "  redis.call('PEXPIRE', KEYS[1], ARGV[3])\n"
                   "  return {0}\n"
                   "end\n"
                   "if v[2] ~= ARGV[1] then return {2} end\n"
                   "if v[1] == 'c' then\n"
                   "  return {3, redis.call('HGET', KEYS[1], 'r')}\n"
                   "end\n"
                   "return {1}\n",
    [RS_COMPLETE] = "local v = redis.call('HMGET', KEYS[1], 's', 't')\n"
                    "if v[1] ~= 'p' or v[2] ~= ARGV[1] then return 0 end\n"
                    "redis.call('HSET', KEYS[1], 's', 'c', 'r', ARGV[2])\n"
                    "redis.call('HDEL', KEYS[1], 't')\n"
                    "redis.call('EXPIRE', KEYS[1], ARGV[3])\n"
                    "return 1\n",
    [RS_RELEASE] = "local v = redis.call('HMGET', KEYS[1], 's', 't')\n"
                   "if v[1] ~= 'p' or v[2] ~= ARGV[1] then return 0 end\n"
                   "redis.call('DEL', KEYS[1])\n"
                   "return 1\n",
    [RS_RENEW] = "local v = redis.call('HMGET', KEYS[1], 's', 't')\n"
                 "if v[1] ~= 'p' or v[2] ~= ARGV[1] then return 0 end\n"
                 "redis.call('PEXPIRE', KEYS[1], ARGV[2])\n"
                 "return 1\n",
};

enum rop_kind { ROP_ACQUIRE, ROP_COMPLETE, ROP_RELEASE, ROP_RENEW, ROP_PING };

/* An acquire that took the lock may go on: WAIT for replicas, then give
 * the lock back (UNDO) when too few acknowledged. */
enum rop_stage { ROP_MAIN, ROP_WAIT, ROP_UNDO };

struct store_redis;

/* One operation in flight. */
struct rop {
    struct rop *prev, *next; /* the store's list of live ops */
    struct store_redis *s;   /* NULL once the store is freed (orphan) */
    struct event *timer;     /* deadline, or zero-delay for a fast failure */
    enum rop_kind kind;
    enum rop_stage stage;
    int refs;     /* replies hiredis still owes this op */
    bool done;    /* the user callback has fired (or was dropped) */
    bool retried; /* the NOSCRIPT retry is used up */
    bool in_cb;   /* inside the user callback */
    enum rs_script script;
    store_acquire_cb acq_cb;
    store_done_cb done_cb;
    void *arg;
    uint64_t deadline_ms; /* monotonic */
    int argc;             /* the script arguments, after EVALSHA sha 1 */
    const char *argv[RS_MAX_ARGS];
    size_t argvlen[RS_MAX_ARGS];
    char *buf; /* owns the bytes argv points into */
};

struct store_redis {
    struct store base; /* first: a struct store * is a struct store_redis * */
    struct event_base *evb;
    const struct cfg *cfg; /* borrowed */
    redisAsyncContext *ac; /* NULL while disconnected */
    bool down_logged;      /* one log line per outage */
    bool handshake_failed; /* one log line per failed handshake */
    int handshake_left;
    unsigned backoff_step;
    struct event *reconnect_ev;
    struct event *kill_ev;
    struct event *handshake_ev;
    struct rop *ops;
    char *prefix;
    char sha[RS_NSCRIPTS][41];
};

static void *rs_alloc(size_t n)
{
    void *p = calloc(1, n ? n : 1);
    if (!p) abort();
    return p;
}

static uint64_t rs_now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

static struct timeval rs_tv(uint64_t ms)
{
    struct timeval tv = {(time_t)(ms / 1000), (suseconds_t)(ms % 1000) * 1000};
    return tv;
}

static int rs_timeout_ms(const struct store_redis *s)
{
    return s->cfg->redis.timeout_ms > 0 ? s->cfg->redis.timeout_ms : 1000;
}

static void rs_sha1_hex(const char *text, char out[41])
{
    unsigned char md[EVP_MAX_MD_SIZE];
    unsigned int n = 0;
    if (!EVP_Digest(text, strlen(text), md, &n, EVP_sha1(), NULL) || n != 20) abort();
    for (unsigned i = 0; i < n; i++)
        snprintf(out + 2 * i, 3, "%02x", md[i]);
}

static bool rs_usable(const struct store_redis *s)
{
    return s->ac && !(s->ac->c.flags & (REDIS_DISCONNECTING | REDIS_FREEING));
}

/* ---- connection ---- */

static void rs_connect(struct store_redis *s);

static void rs_schedule_reconnect(struct store_redis *s)
{
    unsigned step = s->backoff_step < 5 ? s->backoff_step : 5;
    uint64_t ms = (uint64_t)RS_BACKOFF_MIN_MS << step;
    if (ms > RS_BACKOFF_MAX_MS) ms = RS_BACKOFF_MAX_MS;
    s->backoff_step++;
    struct timeval tv = rs_tv(ms);
    evtimer_add(s->reconnect_ev, &tv);
}

static void rs_went_down(struct store_redis *s, const char *why)
{
    evtimer_del(s->handshake_ev);
    if (!s->down_logged) {
        log_msg(LOG_WARN, "store redis: connection to %s lost: %s",
                s->cfg->redis.host ? s->cfg->redis.host : "?", why);
        s->down_logged = true;
    }
}

/* Tears the connection down now. Pending commands get their callbacks
 * with a NULL reply from inside redisAsyncFree; user callbacks may run
 * there and even free the store, so s is not touched afterwards. Never
 * called from inside a hiredis callback. */
static void rs_kill_now(struct store_redis *s, const char *why)
{
    redisAsyncContext *ac = s->ac;
    if (!ac) return;
    s->ac = NULL;
    rs_went_down(s, why);
    rs_schedule_reconnect(s);
    redisAsyncFree(ac);
}

static void rs_kill_cb(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    rs_kill_now(arg, "a command timed out or the handshake failed");
}

static void rs_kill_soon(struct store_redis *s)
{
    struct timeval zero = {0, 0};
    evtimer_add(s->kill_ev, &zero);
}

static void rs_handshake_timeout_cb(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    rs_kill_now(arg, "connect or handshake timed out");
}

static void rs_reconnect_cb(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    rs_connect(arg);
}

static struct store_redis *rs_of(const redisAsyncContext *ac)
{
    struct store_redis *s = ac->data;
    return s && s->ac == ac ? s : NULL;
}

static void rs_on_connect(const redisAsyncContext *ac, int status)
{
    struct store_redis *s = rs_of(ac);
    if (!s || status == REDIS_OK) return;
    /* hiredis frees ac right after this callback. */
    s->ac = NULL;
    rs_went_down(s, ac->errstr[0] ? ac->errstr : "connect failed");
    rs_schedule_reconnect(s);
}

static void rs_on_disconnect(const redisAsyncContext *ac, int status)
{
    (void)status;
    struct store_redis *s = rs_of(ac);
    if (!s) return;
    s->ac = NULL;
    rs_went_down(s, ac->errstr[0] ? ac->errstr : "disconnected");
    rs_schedule_reconnect(s);
}

#define RS_TAG_AUTH ((void *)(intptr_t)-1)
#define RS_TAG_SELECT ((void *)(intptr_t)-2)

static bool rs_check_load_reply(const struct store_redis *s, const redisReply *r, intptr_t i)
{
    return r->type == REDIS_REPLY_STRING && r->len == 40 && memcmp(r->str, s->sha[i], 40) == 0;
}

static const char *rs_tag_name(void *priv)
{
    if (priv == RS_TAG_AUTH) return "AUTH";
    if (priv == RS_TAG_SELECT) return "SELECT";
    return "SCRIPT LOAD";
}

static void rs_handshake_cb(redisAsyncContext *ac, void *reply, void *priv)
{
    struct store_redis *s = rs_of(ac);
    redisReply *r = reply;
    if (!s || !r) return;
    bool ok = priv == RS_TAG_AUTH || priv == RS_TAG_SELECT
                  ? r->type != REDIS_REPLY_ERROR
                  : rs_check_load_reply(s, r, (intptr_t)priv);
    if (!ok) {
        /* The commands behind the first failure fail too, and so does
         * every retry until it is fixed: say it once per outage. */
        if (!s->handshake_failed && !s->down_logged)
            log_msg(LOG_ERROR, "store redis: %s failed: %s", rs_tag_name(priv),
                    r->type == REDIS_REPLY_ERROR && r->str ? r->str : "unexpected reply");
        s->handshake_failed = true;
        rs_kill_soon(s);
        return;
    }
    if (--s->handshake_left > 0) return;
    evtimer_del(s->handshake_ev);
    s->backoff_step = 0;
    if (s->down_logged) log_msg(LOG_INFO, "store redis: connected again");
    s->down_logged = false;
}

static void rs_reload_cb(redisAsyncContext *ac, void *reply, void *priv)
{
    struct store_redis *s = rs_of(ac);
    if (s && reply && !rs_check_load_reply(s, reply, (intptr_t)priv))
        log_msg(LOG_ERROR, "store redis: SCRIPT LOAD failed on NOSCRIPT reload");
}

/* Queues SCRIPT LOAD for every script; commands sent after these on the
 * same connection run after them, so nobody waits for the answers. */
static int rs_load_scripts(struct store_redis *s, redisCallbackFn *fn)
{
    for (intptr_t i = 0; i < RS_NSCRIPTS; i++) {
        const char *argv[3] = {"SCRIPT", "LOAD", rs_scripts[i]};
        size_t lens[3] = {6, 4, strlen(rs_scripts[i])};
        if (redisAsyncCommandArgv(s->ac, fn, (void *)i, 3, argv, lens) != REDIS_OK) return -1;
    }
    return 0;
}

static int rs_send_handshake(struct store_redis *s)
{
    const struct cfg_redis *rc = &s->cfg->redis;
    s->handshake_left = RS_NSCRIPTS;
    if (rc->password && rc->password[0]) {
        if (redisAsyncCommand(s->ac, rs_handshake_cb, RS_TAG_AUTH, "AUTH %s", rc->password) !=
            REDIS_OK)
            return -1;
        s->handshake_left++;
    }
    if (rc->db != 0) {
        if (redisAsyncCommand(s->ac, rs_handshake_cb, RS_TAG_SELECT, "SELECT %d", rc->db) !=
            REDIS_OK)
            return -1;
        s->handshake_left++;
    }
    return rs_load_scripts(s, rs_handshake_cb);
}

/* Starts a connection; the handshake is queued at once (hiredis writes it
 * when the socket connects), and operations started meanwhile queue up
 * behind it in order. */
static void rs_connect(struct store_redis *s)
{
    const struct cfg_redis *rc = &s->cfg->redis;
    const char *host = rc->host ? rc->host : "127.0.0.1";
    redisAsyncContext *ac = rc->unix_socket ? redisAsyncConnectUnix(host)
                                            : redisAsyncConnect(host, rc->port ? rc->port : 6379);
    if (!ac) abort();
    if (ac->err) {
        rs_went_down(s, ac->errstr);
        redisAsyncFree(ac);
        rs_schedule_reconnect(s);
        return;
    }
    ac->data = s;
    s->ac = ac;
    s->handshake_failed = false;
    redisLibeventAttach(ac, s->evb);
    redisAsyncSetConnectCallback(ac, rs_on_connect);
    redisAsyncSetDisconnectCallback(ac, rs_on_disconnect);
    if (rs_send_handshake(s) != 0) {
        rs_kill_soon(s);
        return;
    }
    struct timeval tv = rs_tv((uint64_t)rs_timeout_ms(s));
    evtimer_add(s->handshake_ev, &tv);
}

/* ---- operations ---- */

static void rop_maybe_free(struct rop *op)
{
    if (!op->done || op->refs > 0 || op->in_cb) return;
    struct store_redis *s = op->s;
    if (s) {
        if (op->prev)
            op->prev->next = op->next;
        else
            s->ops = op->next;
        if (op->next) op->next->prev = op->prev;
    }
    if (op->timer) event_free(op->timer);
    free(op->buf);
    free(op);
}

/* Fires the user callback (once) and frees the op when nothing else
 * references it. Neither op's store nor op is used after the callback
 * unless still alive. */
static void rop_finish(struct rop *op, const struct store_acquire_reply *acq, int status)
{
    if (op->done) return;
    op->done = true;
    if (op->timer) evtimer_del(op->timer);
    op->in_cb = true;
    if (op->kind == ROP_ACQUIRE)
        op->acq_cb(op->arg, acq);
    else
        op->done_cb(op->arg, status);
    op->in_cb = false;
    rop_maybe_free(op);
}

static void rop_fail(struct rop *op)
{
    struct store_acquire_reply r = {.state = STORE_ACQ_ERROR};
    rop_finish(op, &r, -1);
}

static void rop_timer_cb(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    struct rop *op = arg;
    /* A command that got no answer in time: the connection may be stuck
     * (a half-open socket never answers), so start over. Scheduled before
     * the callback, which may free the store. */
    if (op->refs > 0 && op->s) rs_kill_soon(op->s);
    rop_fail(op);
}

/* Fails op from the loop, never synchronously. */
static void rop_fail_soon(struct rop *op)
{
    struct timeval zero = {0, 0};
    evtimer_add(op->timer, &zero);
}

static void rop_reply_cb(redisAsyncContext *ac, void *reply, void *priv);

static int rop_send(struct rop *op, int argc, const char **argv, const size_t *lens)
{
    struct store_redis *s = op->s;
    if (!s || !rs_usable(s)) return -1;
    if (redisAsyncCommandArgv(s->ac, rop_reply_cb, op, argc, argv, lens) != REDIS_OK) return -1;
    op->refs++;
    return 0;
}

static int rop_send_script(struct rop *op, enum rs_script script, int argc, const char **args,
                           const size_t *lens)
{
    const char *argv[3 + RS_MAX_ARGS];
    size_t argvlen[3 + RS_MAX_ARGS];
    argv[0] = "EVALSHA";
    argvlen[0] = 7;
    argv[1] = op->s->sha[script];
    argvlen[1] = 40;
    argv[2] = "1";
    argvlen[2] = 1;
    for (int i = 0; i < argc; i++) {
        argv[3 + i] = args[i];
        argvlen[3 + i] = lens[i];
    }
    return rop_send(op, 3 + argc, argv, argvlen);
}

static int rop_send_main(struct rop *op)
{
    if (op->kind == ROP_PING) {
        const char *argv[1] = {"PING"};
        size_t len[1] = {4};
        return rop_send(op, 1, argv, len);
    }
    return rop_send_script(op, op->script, op->argc, op->argv, op->argvlen);
}

/* Gives back a lock taken by this acquire (argv: key, fp, token, ms). */
static int rop_send_undo(struct rop *op)
{
    const char *args[2] = {op->argv[0], op->argv[2]};
    size_t lens[2] = {op->argvlen[0], op->argvlen[2]};
    return rop_send_script(op, RS_RELEASE, 2, args, lens);
}

static int rop_send_wait(struct rop *op)
{
    /* WAIT blocks on the server for its timeout (0 would mean forever):
     * leave half of what remains of the deadline for the answer and a
     * possible release. */
    uint64_t now = rs_now_ms();
    uint64_t left = op->deadline_ms > now ? op->deadline_ms - now : 0;
    uint64_t wait_ms = left / 2 ? left / 2 : 1;
    char n[16], ms[24];
    snprintf(n, sizeof(n), "%d", op->s->cfg->redis.wait_replicas);
    snprintf(ms, sizeof(ms), "%llu", (unsigned long long)wait_ms);
    const char *argv[3] = {"WAIT", n, ms};
    size_t lens[3] = {4, strlen(n), strlen(ms)};
    return rop_send(op, 3, argv, lens);
}

/* Errors behind a failed handshake are its echo, logged already. */
static void rs_log_bad_reply(const struct store_redis *s, const redisReply *r)
{
    if (s->handshake_failed) return;
    if (r->type == REDIS_REPLY_ERROR)
        log_msg(LOG_ERROR, "store redis: error reply: %s", r->str ? r->str : "");
    else
        log_msg(LOG_ERROR, "store redis: unexpected reply type %d", r->type);
}

static bool reply_is_noscript(const redisReply *r)
{
    return r->type == REDIS_REPLY_ERROR && r->str && strncmp(r->str, "NOSCRIPT", 8) == 0;
}

/* Parses the acquire script's answer; false when malformed. */
static bool rop_parse_acquire(const redisReply *r, struct store_acquire_reply *out)
{
    if (r->type != REDIS_REPLY_ARRAY || r->elements < 1 ||
        r->element[0]->type != REDIS_REPLY_INTEGER)
        return false;
    switch (r->element[0]->integer) {
    case 0:
        out->state = STORE_ACQ_LOCKED;
        return true;
    case 1:
        out->state = STORE_ACQ_IN_PROGRESS;
        return true;
    case 2:
        out->state = STORE_ACQ_MISMATCH;
        return true;
    case 3:
        if (r->elements < 2 || r->element[1]->type != REDIS_REPLY_STRING) return false;
        out->state = STORE_ACQ_COMPLETED;
        out->record = (const uint8_t *)r->element[1]->str;
        out->record_len = r->element[1]->len;
        return true;
    default:
        return false;
    }
}

static void rop_on_acquire_main(struct rop *op, const redisReply *r)
{
    struct store_acquire_reply out = {.state = STORE_ACQ_ERROR};
    if (!rop_parse_acquire(r, &out)) {
        rs_log_bad_reply(op->s, r);
        rop_fail(op);
        return;
    }
    if (out.state == STORE_ACQ_LOCKED && op->s->cfg->redis.wait_replicas > 0) {
        op->stage = ROP_WAIT;
        if (rop_send_wait(op) != 0) rop_fail(op);
        return;
    }
    rop_finish(op, &out, 0);
}

static void rop_on_wait(struct rop *op, const redisReply *r)
{
    if (r->type == REDIS_REPLY_INTEGER && r->integer >= op->s->cfg->redis.wait_replicas) {
        struct store_acquire_reply out = {.state = STORE_ACQ_LOCKED};
        rop_finish(op, &out, 0);
        return;
    }
    log_msg(LOG_WARN, "store redis: WAIT got %lld of %d replicas; lock given back",
            r->type == REDIS_REPLY_INTEGER ? r->integer : -1LL, op->s->cfg->redis.wait_replicas);
    op->stage = ROP_UNDO;
    if (rop_send_undo(op) != 0) rop_fail(op);
}

static int rop_status_of(const redisReply *r, enum rop_kind kind)
{
    if (kind == ROP_PING) return r->type == REDIS_REPLY_STATUS ? 1 : -1;
    if (r->type != REDIS_REPLY_INTEGER || (r->integer != 0 && r->integer != 1)) return -1;
    return (int)r->integer;
}

/* A reply for an op whose caller already got an error: if it shows that
 * we hold a lock nobody will use, give it back. */
static void rop_on_late_reply(struct rop *op, const redisReply *r)
{
    if (op->kind != ROP_ACQUIRE || !op->s || !rs_usable(op->s)) return;
    struct store_acquire_reply out = {.state = STORE_ACQ_ERROR};
    bool locked = op->stage == ROP_WAIT || (op->stage == ROP_MAIN && rop_parse_acquire(r, &out) &&
                                            out.state == STORE_ACQ_LOCKED);
    if (!locked) return;
    const char *argv[5] = {"EVALSHA", op->s->sha[RS_RELEASE], "1", op->argv[0], op->argv[2]};
    size_t lens[5] = {7, 40, 1, op->argvlen[0], op->argvlen[2]};
    redisAsyncCommandArgv(op->s->ac, NULL, NULL, 5, argv, lens);
}

static void rop_reply_cb(redisAsyncContext *ac, void *reply, void *priv)
{
    (void)ac;
    struct rop *op = priv;
    const redisReply *r = reply;
    op->refs--;
    if (op->done) {
        if (r) rop_on_late_reply(op, r);
        rop_maybe_free(op);
        return;
    }
    if (!r) {
        rop_fail(op);
        return;
    }
    if (op->stage == ROP_MAIN && op->kind != ROP_PING && reply_is_noscript(r) && !op->retried) {
        op->retried = true;
        if (rs_load_scripts(op->s, rs_reload_cb) != 0 || rop_send_main(op) != 0) rop_fail(op);
        return;
    }
    if (op->stage == ROP_UNDO) {
        rop_fail(op);
    } else if (op->stage == ROP_WAIT) {
        rop_on_wait(op, r);
    } else if (op->kind == ROP_ACQUIRE) {
        rop_on_acquire_main(op, r);
    } else {
        int status = rop_status_of(r, op->kind);
        if (status < 0) rs_log_bad_reply(op->s, r);
        rop_finish(op, NULL, status);
    }
}

/* Builds the op and copies the script arguments into one buffer. */
static struct rop *rop_new(struct store_redis *s, enum rop_kind kind, enum rs_script script,
                           int argc, const char **args, const size_t *lens)
{
    struct rop *op = rs_alloc(sizeof(*op));
    op->s = s;
    op->kind = kind;
    op->script = script;
    op->timer = evtimer_new(s->evb, rop_timer_cb, op);
    if (!op->timer) abort();
    size_t total = 0;
    for (int i = 0; i < argc; i++)
        total += lens[i];
    op->buf = rs_alloc(total);
    char *p = op->buf;
    for (int i = 0; i < argc; i++) {
        if (lens[i]) memcpy(p, args[i], lens[i]);
        op->argv[i] = p;
        op->argvlen[i] = lens[i];
        p += lens[i];
    }
    op->argc = argc;
    op->next = s->ops;
    if (s->ops) s->ops->prev = op;
    s->ops = op;
    return op;
}

static void rop_start(struct rop *op)
{
    struct store_redis *s = op->s;
    uint64_t ms = (uint64_t)rs_timeout_ms(s);
    op->deadline_ms = rs_now_ms() + ms;
    struct timeval tv = rs_tv(ms);
    evtimer_add(op->timer, &tv);
    if (rop_send_main(op) != 0) rop_fail_soon(op);
}

/* "<prefix>{<skey>}" into a fresh buffer; caller frees. */
static char *rs_key(const struct store_redis *s, const char *skey, size_t skey_len, size_t *len)
{
    size_t plen = strlen(s->prefix);
    *len = plen + skey_len + 2;
    char *k = rs_alloc(*len);
    memcpy(k, s->prefix, plen);
    k[plen] = '{';
    memcpy(k + plen + 1, skey, skey_len);
    k[*len - 1] = '}';
    return k;
}

static void rs_acquire(struct store *base, const char *skey, size_t skey_len,
                       const uint8_t fp[STORE_FP_LEN], const char token[STORE_TOKEN_LEN],
                       uint32_t lock_ms, store_acquire_cb cb, void *arg)
{
    struct store_redis *s = (struct store_redis *)base;
    size_t klen;
    char *key = rs_key(s, skey, skey_len, &klen);
    char ms[16];
    snprintf(ms, sizeof(ms), "%u", lock_ms);
    const char *args[4] = {key, (const char *)fp, token, ms};
    size_t lens[4] = {klen, STORE_FP_LEN, STORE_TOKEN_LEN, strlen(ms)};
    struct rop *op = rop_new(s, ROP_ACQUIRE, RS_ACQUIRE, 4, args, lens);
    free(key);
    op->acq_cb = cb;
    op->arg = arg;
    rop_start(op);
}

/* complete / release / renew: key, token, then extra arguments. */
static void rs_owned(struct store_redis *s, enum rop_kind kind, enum rs_script script,
                     const char *skey, size_t skey_len, const char *token, int nextra,
                     const char **extra, const size_t *extra_lens, store_done_cb cb, void *arg)
{
    size_t klen;
    char *key = rs_key(s, skey, skey_len, &klen);
    const char *args[4] = {key, token};
    size_t lens[4] = {klen, STORE_TOKEN_LEN};
    for (int i = 0; i < nextra; i++) {
        args[2 + i] = extra[i];
        lens[2 + i] = extra_lens[i];
    }
    struct rop *op = rop_new(s, kind, script, 2 + nextra, args, lens);
    free(key);
    op->done_cb = cb;
    op->arg = arg;
    rop_start(op);
}

static void rs_complete(struct store *base, const char *skey, size_t skey_len,
                        const char token[STORE_TOKEN_LEN], const uint8_t *record, size_t record_len,
                        uint32_t ttl_seconds, store_done_cb cb, void *arg)
{
    char ttl[16];
    snprintf(ttl, sizeof(ttl), "%u", ttl_seconds);
    const char *extra[2] = {(const char *)record, ttl};
    size_t lens[2] = {record_len, strlen(ttl)};
    rs_owned((struct store_redis *)base, ROP_COMPLETE, RS_COMPLETE, skey, skey_len, token, 2, extra,
             lens, cb, arg);
}

static void rs_release(struct store *base, const char *skey, size_t skey_len,
                       const char token[STORE_TOKEN_LEN], store_done_cb cb, void *arg)
{
    rs_owned((struct store_redis *)base, ROP_RELEASE, RS_RELEASE, skey, skey_len, token, 0, NULL,
             NULL, cb, arg);
}

static void rs_renew(struct store *base, const char *skey, size_t skey_len,
                     const char token[STORE_TOKEN_LEN], uint32_t lock_ms, store_done_cb cb,
                     void *arg)
{
    char ms[16];
    snprintf(ms, sizeof(ms), "%u", lock_ms);
    const char *extra[1] = {ms};
    size_t lens[1] = {strlen(ms)};
    rs_owned((struct store_redis *)base, ROP_RENEW, RS_RENEW, skey, skey_len, token, 1, extra, lens,
             cb, arg);
}

static void rs_ping(struct store *base, store_done_cb cb, void *arg)
{
    struct store_redis *s = (struct store_redis *)base;
    struct rop *op = rop_new(s, ROP_PING, RS_ACQUIRE, 0, NULL, NULL);
    op->done_cb = cb;
    op->arg = arg;
    rop_start(op);
}

/* Ops still owed a reply by hiredis become orphans (s = NULL, done) and
 * are freed by the NULL-reply callbacks that redisAsyncFree runs; an op
 * whose user callback is running is freed by rop_finish when it returns.
 * Called from inside a store callback, redisAsyncFree is postponed by
 * hiredis until that callback returns (REDIS_IN_CALLBACK), which the
 * orphans tolerate. */
static void rs_free(struct store *base)
{
    struct store_redis *s = (struct store_redis *)base;
    struct rop *op = s->ops;
    while (op) {
        struct rop *next = op->next;
        op->s = NULL;
        op->prev = op->next = NULL;
        op->done = true;
        if (op->timer) event_free(op->timer);
        op->timer = NULL;
        rop_maybe_free(op);
        op = next;
    }
    s->ops = NULL;
    event_free(s->reconnect_ev);
    event_free(s->kill_ev);
    event_free(s->handshake_ev);
    redisAsyncContext *ac = s->ac;
    s->ac = NULL;
    free(s->prefix);
    free(s);
    if (ac) {
        ac->data = NULL;
        redisAsyncFree(ac);
    }
}

static const struct store_ops rs_ops = {
    .name = "redis",
    .acquire = rs_acquire,
    .complete = rs_complete,
    .release = rs_release,
    .renew = rs_renew,
    .ping = rs_ping,
    .free = rs_free,
};

struct store *store_redis_new(struct event_base *base, const struct cfg *cfg)
{
    struct store_redis *s = rs_alloc(sizeof(*s));
    s->base.ops = &rs_ops;
    s->evb = base;
    s->cfg = cfg;
    const char *p = cfg->redis.key_prefix ? cfg->redis.key_prefix : "";
    s->prefix = rs_alloc(strlen(p) + 1);
    memcpy(s->prefix, p, strlen(p));
    for (int i = 0; i < RS_NSCRIPTS; i++)
        rs_sha1_hex(rs_scripts[i], s->sha[i]);
    s->reconnect_ev = evtimer_new(base, rs_reconnect_cb, s);
    s->kill_ev = evtimer_new(base, rs_kill_cb, s);
    s->handshake_ev = evtimer_new(base, rs_handshake_timeout_cb, s);
    if (!s->reconnect_ev || !s->kill_ev || !s->handshake_ev) abort();
    if (cfg->redis.mode != CFG_REDIS_STANDALONE)
        log_msg(LOG_WARN,
                "store redis: cluster and sentinel modes are not supported yet; "
                "using %s as a standalone server",
                cfg->redis.host ? cfg->redis.host : "?");
    rs_connect(s);
    return &s->base;
}
