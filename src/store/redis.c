/* store_redis.c — the Redis backend of the store (store.h).
 *
 * Owns the hiredis 0.14 async connections of one store (per worker),
 * attached to the worker's event_base with the libevent adapter; their
 * reconnect, teardown and handshake timers; the cluster slot map and the
 * sentinel master lookup; and every operation in flight. Knows nothing of
 * HTTP or of what a record contains.
 *
 * Three modes (redis.mode):
 *  - standalone: one connection to redis.url;
 *  - cluster: one lazily opened connection per node, a slot -> node map
 *    filled by CLUSTER SLOTS (at start, after MOVED, after a connection
 *    error; rate-limited), MOVED and ASK redirects followed within the
 *    operation's deadline;
 *  - sentinel: the sentinels in redis.nodes are asked in order for the
 *    master's address, which is checked with ROLE; on a lost connection, a
 *    timeout or a READONLY / LOADING reply the sentinels are asked again.
 *    The operation in flight fails (never retried on another master);
 *    operations started while no master is known wait for one until their
 *    deadline.
 *
 * Each operation is one atomic round trip: a Lua script (loaded with SCRIPT
 * LOAD at connect time, called with EVALSHA, reloaded once on NOSCRIPT).
 * All state of one (scope, key) is one hash "<prefix>{<skey>}" (so one
 * cluster slot):
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
 * hiredis callback) and the reconnect logic takes over.
 *
 * An acquire whose caller was told STORE_ACQ_ERROR while its script was
 * sent and unanswered (deadline, lost connection) may still take the lock
 * when a busy server gets to it. Its (key, token) is remembered in a
 * bounded list (struct rs_giveback) and given back with the release
 * script, fenced by the token (harmless when nothing was taken): at once
 * when the late reply shows the lock was taken, else when a connection to
 * where the key lives is ready again. A server reads a closed connection's
 * last commands before it accepts and reads a new one, so the give-back
 * on the new connection runs after the stray acquire. */
#include "idemgate/store/store.h"

#include "idemgate/core/clock.h"

#include "idemgate/config/config.h"
#include "idemgate/core/log.h"
#include "idemgate/core/metrics.h"

#include <event2/event.h>
#include <hiredis/adapters/libevent.h>
#include <hiredis/async.h>
#include <hiredis/hiredis.h>
#include <openssl/evp.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define RS_BACKOFF_MIN_MS 100
#define RS_BACKOFF_MAX_MS 2000
#define RS_MAX_ARGS 7
#define RS_GIVEBACK_MAX 1024 /* remembered locks per store */
#define RS_GIVEBACK_TRIES 3  /* give-backs that fail before one is dropped */

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

#define RS_NSLOTS 16384
#define RS_MAX_REDIRECTS 5
#define RS_REFRESH_MIN_MS 200 /* at most one CLUSTER SLOTS per this */

enum rop_kind { ROP_ACQUIRE, ROP_COMPLETE, ROP_RELEASE, ROP_RENEW, ROP_PING };

/* An acquire that took the lock may go on: WAIT for replicas, then give
 * the lock back (UNDO) when too few acknowledged. */
enum rop_stage { ROP_MAIN, ROP_WAIT, ROP_UNDO };

/* What a connection is for; decides its handshake and what happens when
 * it goes down. */
enum rconn_role {
    RC_STANDALONE, /* reconnects to redis.url with backoff */
    RC_NODE,       /* cluster node: reconnects lazily, when an op needs it */
    RC_MASTER      /* sentinel master: asks the sentinels again, with backoff */
};

struct store_redis;

/* One server connection (and its reconnect state). Lives as long as the
 * store; only its hiredis context comes and goes. */
struct rconn {
    struct rconn *next; /* the store's list */
    struct store_redis *s;
    enum rconn_role role;
    redisAsyncContext *ac; /* NULL while disconnected */
    char *host;            /* or the unix socket path */
    int port;
    bool unix_socket;
    bool connected;        /* the socket connected: commands may have reached the server */
    bool ready;            /* the handshake has been answered */
    bool down_logged;      /* one log line per outage */
    bool handshake_failed; /* one log line per failed handshake */
    int handshake_left;
    unsigned backoff_step;
    struct event *reconnect_ev;
    struct event *kill_ev;
    struct event *handshake_ev;
};

/* One operation in flight. */
struct rop {
    struct rop *prev, *next; /* the store's list of live ops */
    struct store_redis *s;   /* NULL once the store is freed (orphan) */
    struct rconn *conn;      /* where its commands go; valid while s is */
    struct event *timer;     /* deadline, or zero-delay for a fast failure */
    enum rop_kind kind;
    enum rop_stage stage;
    int refs;          /* replies hiredis still owes this op */
    bool done;         /* the user callback has fired (or was dropped) */
    bool retried;      /* the NOSCRIPT retry is used up */
    bool in_cb;        /* inside the user callback */
    bool parked;       /* waiting for a sentinel master */
    bool asking;       /* ASK redirect: send ASKING before each keyed command */
    bool maybe_locked; /* acquire: the lock may be ours (sent, unanswered, or taken) */
    int redirects;     /* MOVED / ASK followed so far */
    unsigned slot;     /* cluster slot of the key */
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

/* A lock an acquire may have taken after its caller was told it failed;
 * owned by the store's list until given back, found not taken, or dropped.
 * While its release is in flight (inflight) the entry stays listed and is
 * the release's callback argument. */
struct rs_giveback {
    struct rs_giveback *prev, *next;
    struct store_redis *s;
    unsigned slot; /* cluster slot of key */
    int tries;     /* releases that failed */
    bool inflight;
    char token[STORE_TOKEN_LEN];
    size_t key_len;
    char key[]; /* the Redis key, "<prefix>{<skey>}" */
};

struct store_redis {
    struct store base; /* first: a struct store * is a struct store_redis * */
    struct event_base *evb;
    const struct cfg *cfg; /* borrowed */
    enum cfg_redis_mode mode;
    struct rconn *conns; /* every connection */
    struct rconn *main;  /* standalone server or sentinel master */
    struct rop *ops;
    struct rs_giveback *gb_head, *gb_tail; /* oldest first */
    size_t gb_count;
    bool gb_drop_logged; /* one log line per run of dropped give-backs */
    char *prefix;
    char sha[RS_NSCRIPTS][41];
    /* cluster */
    struct rconn **slots; /* RS_NSLOTS entries, NULL = unknown */
    struct event *refresh_ev;
    struct event *refresh_deadline_ev;
    bool refresh_inflight;
    uintptr_t refresh_gen; /* tells a late CLUSTER SLOTS answer apart */
    uint64_t refresh_last_ms;
    unsigned refresh_rr;    /* which node to ask next */
    unsigned refresh_fails; /* in a row: the interval grows */
    /* sentinel */
    redisAsyncContext *sent_ac; /* the sentinel being asked, or NULL */
    size_t sent_idx;
    bool sent_logged;
    struct event *sent_timer;
};

static void *rs_alloc(size_t n)
{
    void *p = calloc(1, n ? n : 1);
    if (!p) abort();
    return p;
}

static char *rs_strndup(const char *p, size_t n)
{
    char *d = rs_alloc(n + 1);
    if (n) memcpy(d, p, n);
    return d;
}

static uint64_t rs_now_ms(void)
{
    return clock_now_ms();
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

/* CRC16-CCITT (XMODEM: poly 0x1021, init 0, no reflection), the checksum
 * Redis Cluster hashes keys with. */
static uint16_t rs_crc16(const char *p, size_t n)
{
    uint16_t crc = 0;
    for (size_t i = 0; i < n; i++) {
        crc ^= (uint16_t)((uint8_t)p[i] << 8);
        for (int b = 0; b < 8; b++)
            crc = crc & 0x8000 ? (uint16_t)((crc << 1) ^ 0x1021) : (uint16_t)(crc << 1);
    }
    return crc;
}

/* The key's slot: only the part between the first '{' and the next '}' is
 * hashed when that part is not empty. */
static unsigned rs_keyslot(const char *key, size_t n)
{
    const char *open = memchr(key, '{', n);
    if (open) {
        size_t from = (size_t)(open - key) + 1;
        const char *close = memchr(key + from, '}', n - from);
        if (close && close > key + from)
            return rs_crc16(key + from, (size_t)(close - key) - from) & (RS_NSLOTS - 1);
    }
    return rs_crc16(key, n) & (RS_NSLOTS - 1);
}

static bool rs_usable(const struct rconn *c)
{
    return c->ac && !(c->ac->c.flags & (REDIS_DISCONNECTING | REDIS_FREEING));
}

static bool reply_is_error(const redisReply *r, const char *prefix)
{
    size_t n = strlen(prefix);
    return r->type == REDIS_REPLY_ERROR && r->str && r->len >= n &&
           strncmp(r->str, prefix, n) == 0 && (r->len == n || r->str[n] == ' ');
}

/* ---- connections ---- */

static void rc_connect(struct rconn *c);
static bool rc_ensure(struct rconn *c);
static void gb_flush(struct rconn *c);
static bool gb_wants(const struct rconn *c);
static void cluster_refresh_soon(struct store_redis *s);
static void sentinel_ask(struct store_redis *s);
static void rs_flush_parked(struct store_redis *s);

static void rc_schedule_reconnect(struct rconn *c)
{
    unsigned step = c->backoff_step < 5 ? c->backoff_step : 5;
    uint64_t ms = (uint64_t)RS_BACKOFF_MIN_MS << step;
    if (ms > RS_BACKOFF_MAX_MS) ms = RS_BACKOFF_MAX_MS;
    c->backoff_step++;
    struct timeval tv = rs_tv(ms);
    evtimer_add(c->reconnect_ev, &tv);
}

/* The connection is gone (c->ac already NULL): log once per outage, then
 * reconnect (standalone), look again (sentinel), or let the slot map catch
 * up and reconnect on demand (cluster). */
static void rc_went_down(struct rconn *c, const char *why)
{
    evtimer_del(c->handshake_ev);
    c->ready = false;
    if (!c->down_logged) {
        if (c->unix_socket)
            log_msg(LOG_WARN, "store redis: connection to %s lost: %s", c->host, why);
        else
            log_msg(LOG_WARN, "store redis: connection to %s:%d lost: %s", c->host, c->port, why);
        c->down_logged = true;
    }
    rc_schedule_reconnect(c);
    if (c->role == RC_NODE) cluster_refresh_soon(c->s);
}

/* Tears the connection down now. Pending commands get their callbacks
 * with a NULL reply from inside redisAsyncFree; user callbacks may run
 * there and even free the store, so c is not touched afterwards. Never
 * called from inside a hiredis callback. */
static void rc_kill_now(struct rconn *c, const char *why)
{
    redisAsyncContext *ac = c->ac;
    if (!ac) return;
    c->ac = NULL;
    rc_went_down(c, why);
    redisAsyncFree(ac);
}

static void rc_kill_cb(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    rc_kill_now(arg, "a command timed out, the handshake failed or the server is not usable");
}

static void rc_kill_soon(struct rconn *c)
{
    struct timeval zero = {0, 0};
    evtimer_add(c->kill_ev, &zero);
}

static void rc_handshake_timeout_cb(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    rc_kill_now(arg, "connect or handshake timed out");
}

static void rc_reconnect_cb(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    struct rconn *c = arg;
    if (c->role == RC_STANDALONE) {
        rc_connect(c);
    } else if (c->role == RC_MASTER) {
        c->s->sent_idx = 0;
        sentinel_ask(c->s);
    } else if (gb_wants(c)) {
        rc_ensure(c); /* a lock waits there to be given back */
    }
    /* RC_NODE: the backoff is over; the next op that needs it connects. */
}

static struct rconn *rc_of(const redisAsyncContext *ac)
{
    struct rconn *c = ac->data;
    return c && c->ac == ac ? c : NULL;
}

static void rc_on_connect(const redisAsyncContext *ac, int status)
{
    struct rconn *c = rc_of(ac);
    if (!c) return;
    if (status == REDIS_OK) {
        c->connected = true;
        return;
    }
    /* hiredis frees ac right after this callback. */
    c->ac = NULL;
    rc_went_down(c, ac->errstr[0] ? ac->errstr : "connect failed");
}

static void rc_on_disconnect(const redisAsyncContext *ac, int status)
{
    (void)status;
    struct rconn *c = rc_of(ac);
    if (!c) return;
    c->ac = NULL;
    rc_went_down(c, ac->errstr[0] ? ac->errstr : "disconnected");
}

#define RS_TAG_AUTH ((void *)(intptr_t)-1)
#define RS_TAG_SELECT ((void *)(intptr_t)-2)
#define RS_TAG_ROLE ((void *)(intptr_t)-3)

static bool rs_check_load_reply(const struct store_redis *s, const redisReply *r, intptr_t i)
{
    return r->type == REDIS_REPLY_STRING && r->len == 40 && memcmp(r->str, s->sha[i], 40) == 0;
}

static bool rs_is_master_role(const redisReply *r)
{
    return r->type == REDIS_REPLY_ARRAY && r->elements >= 1 &&
           r->element[0]->type == REDIS_REPLY_STRING && r->element[0]->len == 6 &&
           memcmp(r->element[0]->str, "master", 6) == 0;
}

static const char *rs_tag_name(void *priv)
{
    if (priv == RS_TAG_AUTH) return "AUTH";
    if (priv == RS_TAG_SELECT) return "SELECT";
    if (priv == RS_TAG_ROLE) return "ROLE";
    return "SCRIPT LOAD";
}

static bool rs_handshake_ok(const struct rconn *c, const redisReply *r, void *priv)
{
    if (priv == RS_TAG_AUTH || priv == RS_TAG_SELECT) return r->type != REDIS_REPLY_ERROR;
    if (priv == RS_TAG_ROLE) return rs_is_master_role(r);
    return rs_check_load_reply(c->s, r, (intptr_t)priv);
}

static void rc_handshake_cb(redisAsyncContext *ac, void *reply, void *priv)
{
    struct rconn *c = rc_of(ac);
    redisReply *r = reply;
    if (!c || !r) return;
    if (!rs_handshake_ok(c, r, priv)) {
        if (priv == RS_TAG_ROLE) {
            log_msg(LOG_WARN,
                    "store redis: %s:%d is not a master (yet); asking the sentinels again", c->host,
                    c->port);
        } else if (!c->handshake_failed && !c->down_logged) {
            /* The commands behind the first failure fail too, and so does
             * every retry until it is fixed: say it once per outage. */
            log_msg(LOG_ERROR, "store redis: %s failed: %s", rs_tag_name(priv),
                    r->type == REDIS_REPLY_ERROR && r->str ? r->str : "unexpected reply");
        }
        c->handshake_failed = true;
        rc_kill_soon(c);
        return;
    }
    if (--c->handshake_left > 0) return;
    evtimer_del(c->handshake_ev);
    c->ready = true;
    c->backoff_step = 0;
    if (c->role == RC_MASTER) {
        log_msg(LOG_INFO, "store redis: sentinel master %s is %s:%d", c->s->cfg->redis.master_name,
                c->host, c->port);
        c->s->sent_logged = false;
    } else if (c->down_logged) {
        log_msg(LOG_INFO, "store redis: connected again");
    }
    c->down_logged = false;
    gb_flush(c);
    if (c->role == RC_MASTER) rs_flush_parked(c->s);
}

static void rc_reload_cb(redisAsyncContext *ac, void *reply, void *priv)
{
    struct rconn *c = rc_of(ac);
    if (c && reply && !rs_check_load_reply(c->s, reply, (intptr_t)priv))
        log_msg(LOG_ERROR, "store redis: SCRIPT LOAD failed on NOSCRIPT reload");
}

/* Queues SCRIPT LOAD for every script; commands sent after these on the
 * same connection run after them, so nobody waits for the answers. */
static int rc_load_scripts(struct rconn *c, redisCallbackFn *fn)
{
    for (intptr_t i = 0; i < RS_NSCRIPTS; i++) {
        const char *argv[3] = {"SCRIPT", "LOAD", rs_scripts[i]};
        size_t lens[3] = {6, 4, strlen(rs_scripts[i])};
        if (redisAsyncCommandArgv(c->ac, fn, (void *)i, 3, argv, lens) != REDIS_OK) return -1;
    }
    return 0;
}

/* AUTH [user] password, when the URL names either; 1 when sent, 0 when
 * there is nothing to send, -1 when it cannot be queued. */
static int rs_send_auth(redisAsyncContext *ac, const struct cfg_redis *rc, redisCallbackFn *fn,
                        void *priv)
{
    if (!rc->username && !(rc->password && rc->password[0])) return 0;
    const char *argv[3] = {"AUTH", rc->username, rc->password};
    size_t lens[3] = {4, rc->username ? strlen(rc->username) : 0, strlen(rc->password)};
    if (!rc->username) {
        argv[1] = rc->password;
        lens[1] = lens[2];
    }
    int argc = rc->username ? 3 : 2;
    return redisAsyncCommandArgv(ac, fn, priv, argc, argv, lens) == REDIS_OK ? 1 : -1;
}

/* An evicted lock or record breaks at-most-once: say so once per process
 * (every worker and every reconnect reads the policy again). */
static atomic_bool rs_policy_warned;

static void rs_check_policy(const struct rconn *c, const char *v, size_t n)
{
    bool evicts =
        (n > 8 && memcmp(v, "allkeys-", 8) == 0) || (n > 9 && memcmp(v, "volatile-", 9) == 0);
    if (!evicts || atomic_exchange(&rs_policy_warned, true)) return;
    log_msg(LOG_WARN,
            "store redis: %s:%d has maxmemory-policy %.*s, which may evict keys: an evicted lock "
            "or record lets a request execute twice (use noeviction)",
            c->host, c->port, (int)n, v);
}

static void rc_info_policy_cb(redisAsyncContext *ac, void *reply, void *priv)
{
    (void)priv;
    struct rconn *c = rc_of(ac);
    const redisReply *r = reply;
    if (!c || !r || r->type != REDIS_REPLY_STRING || !r->str) return;
    const char *p = strstr(r->str, "maxmemory_policy:");
    if (!p) return;
    p += strlen("maxmemory_policy:");
    rs_check_policy(c, p, strcspn(p, "\r\n"));
}

/* CONFIG GET maxmemory-policy: {name, value}; when CONFIG is refused (an
 * ACL, a renamed command) INFO memory says it too. */
static void rc_policy_cb(redisAsyncContext *ac, void *reply, void *priv)
{
    (void)priv;
    struct rconn *c = rc_of(ac);
    const redisReply *r = reply;
    if (!c || !r) return;
    if (r->type == REDIS_REPLY_ARRAY && r->elements == 2 &&
        r->element[1]->type == REDIS_REPLY_STRING) {
        rs_check_policy(c, r->element[1]->str, r->element[1]->len);
        return;
    }
    redisAsyncCommand(ac, rc_info_policy_cb, NULL, "INFO memory");
}

/* AUTH, SELECT (not in a cluster), the eviction policy (not part of the
 * handshake: nobody waits for it), ROLE (sentinel master), SCRIPT LOAD. */
static int rc_send_handshake(struct rconn *c)
{
    const struct cfg_redis *rc = &c->s->cfg->redis;
    c->handshake_left = RS_NSCRIPTS;
    int auth = rs_send_auth(c->ac, rc, rc_handshake_cb, RS_TAG_AUTH);
    if (auth < 0) return -1;
    c->handshake_left += auth;
    if (rc->db != 0 && c->role != RC_NODE) {
        if (redisAsyncCommand(c->ac, rc_handshake_cb, RS_TAG_SELECT, "SELECT %d", rc->db) !=
            REDIS_OK)
            return -1;
        c->handshake_left++;
    }
    if (redisAsyncCommand(c->ac, rc_policy_cb, NULL, "CONFIG GET maxmemory-policy") != REDIS_OK)
        return -1;
    if (c->role == RC_MASTER) {
        if (redisAsyncCommand(c->ac, rc_handshake_cb, RS_TAG_ROLE, "ROLE") != REDIS_OK) return -1;
        c->handshake_left++;
    }
    return rc_load_scripts(c, rc_handshake_cb);
}

/* Starts a connection; the handshake is queued at once (hiredis writes it
 * when the socket connects), and operations started meanwhile queue up
 * behind it in order. */
static void rc_connect(struct rconn *c)
{
    redisAsyncContext *ac =
        c->unix_socket ? redisAsyncConnectUnix(c->host) : redisAsyncConnect(c->host, c->port);
    if (!ac) abort();
    if (ac->err) {
        char why[128];
        snprintf(why, sizeof(why), "%s", ac->errstr);
        redisAsyncFree(ac);
        rc_went_down(c, why);
        return;
    }
    ac->data = c;
    c->ac = ac;
    c->connected = false;
    c->ready = false;
    c->handshake_failed = false;
    redisLibeventAttach(ac, c->s->evb);
    redisAsyncSetConnectCallback(ac, rc_on_connect);
    redisAsyncSetDisconnectCallback(ac, rc_on_disconnect);
    if (rc_send_handshake(c) != 0) {
        rc_kill_soon(c);
        return;
    }
    struct timeval tv = rs_tv((uint64_t)rs_timeout_ms(c->s));
    evtimer_add(c->handshake_ev, &tv);
}

/* A connected (or connecting) context for c, opening one when c is not
 * backing off; false when c cannot take a command now. */
static bool rc_ensure(struct rconn *c)
{
    if (!c->ac && !evtimer_pending(c->reconnect_ev, NULL)) rc_connect(c);
    return rs_usable(c);
}

static struct rconn *rc_new(struct store_redis *s, enum rconn_role role, char *host, int port,
                            bool unix_socket)
{
    struct rconn *c = rs_alloc(sizeof(*c));
    c->s = s;
    c->role = role;
    c->host = host;
    c->port = port;
    c->unix_socket = unix_socket;
    c->reconnect_ev = evtimer_new(s->evb, rc_reconnect_cb, c);
    c->kill_ev = evtimer_new(s->evb, rc_kill_cb, c);
    c->handshake_ev = evtimer_new(s->evb, rc_handshake_timeout_cb, c);
    if (!c->reconnect_ev || !c->kill_ev || !c->handshake_ev) abort();
    c->next = s->conns;
    s->conns = c;
    return c;
}

/* Closes c's context and frees c; the store is being freed. */
static void rc_free(struct rconn *c)
{
    redisAsyncContext *ac = c->ac;
    c->ac = NULL;
    if (ac) {
        ac->data = NULL;
        redisAsyncFree(ac);
    }
    event_free(c->reconnect_ev);
    event_free(c->kill_ev);
    event_free(c->handshake_ev);
    free(c->host);
    free(c);
}

/* ---- cluster: nodes and the slot map ---- */

static struct rconn *cluster_node(struct store_redis *s, const char *host, size_t hlen, int port)
{
    for (struct rconn *c = s->conns; c; c = c->next)
        if (c->port == port && strlen(c->host) == hlen && memcmp(c->host, host, hlen) == 0)
            return c;
    return rc_new(s, RC_NODE, rs_strndup(host, hlen), port, false);
}

static size_t cluster_count(const struct store_redis *s)
{
    size_t n = 0;
    for (const struct rconn *c = s->conns; c; c = c->next)
        n++;
    return n;
}

/* Any node that can take a command now, starting at the round-robin
 * position; connected ones first. */
static struct rconn *cluster_any(struct store_redis *s, unsigned from)
{
    size_t n = cluster_count(s);
    if (n == 0) return NULL;
    for (int pass = 0; pass < 2; pass++) {
        struct rconn *c = s->conns;
        for (size_t i = 0; i < from % n; i++)
            c = c->next;
        for (size_t i = 0; i < n; i++) {
            if (pass == 0 ? rs_usable(c) : rc_ensure(c)) return c;
            c = c->next ? c->next : s->conns;
        }
    }
    return NULL;
}

/* One CLUSTER SLOTS range: [start, end, [host, port, ...], replicas...]. */
static bool cluster_range_ok(const redisReply *e)
{
    if (e->type != REDIS_REPLY_ARRAY || e->elements < 3) return false;
    const redisReply *m = e->element[2];
    return e->element[0]->type == REDIS_REPLY_INTEGER &&
           e->element[1]->type == REDIS_REPLY_INTEGER && e->element[0]->integer >= 0 &&
           e->element[0]->integer <= e->element[1]->integer && e->element[1]->integer < RS_NSLOTS &&
           m->type == REDIS_REPLY_ARRAY && m->elements >= 2 &&
           m->element[0]->type == REDIS_REPLY_STRING &&
           m->element[1]->type == REDIS_REPLY_INTEGER && m->element[1]->integer > 0 &&
           m->element[1]->integer <= 65535;
}

/* Replaces the slot map with the answer; false when it is malformed. */
static bool cluster_apply_slots(struct store_redis *s, const struct rconn *asked,
                                const redisReply *r)
{
    if (r->type != REDIS_REPLY_ARRAY) return false;
    for (size_t i = 0; i < r->elements; i++)
        if (!cluster_range_ok(r->element[i])) return false;
    memset(s->slots, 0, RS_NSLOTS * sizeof(*s->slots));
    for (size_t i = 0; i < r->elements; i++) {
        const redisReply *e = r->element[i];
        const redisReply *m = e->element[2];
        const char *host = m->element[0]->str;
        size_t hlen = m->element[0]->len;
        /* A node that does not know its own address says "" or "?". */
        if (hlen == 0 || (hlen == 1 && host[0] == '?')) {
            host = asked->host;
            hlen = strlen(asked->host);
        }
        struct rconn *node = cluster_node(s, host, hlen, (int)m->element[1]->integer);
        for (long long slot = e->element[0]->integer; slot <= e->element[1]->integer; slot++)
            s->slots[slot] = node;
    }
    return true;
}

static void cluster_slots_cb(redisAsyncContext *ac, void *reply, void *priv)
{
    struct rconn *c = rc_of(ac);
    if (!c) return;
    struct store_redis *s = c->s;
    if (!s->refresh_inflight || (uintptr_t)priv != s->refresh_gen) return;
    s->refresh_inflight = false;
    evtimer_del(s->refresh_deadline_ev);
    if (reply && cluster_apply_slots(s, c, reply)) {
        s->refresh_fails = 0;
        return;
    }
    const redisReply *r = reply;
    if (r && s->refresh_fails == 0)
        log_msg(LOG_WARN, "store redis: CLUSTER SLOTS on %s:%d: %s", c->host, c->port,
                r->type == REDIS_REPLY_ERROR && r->str ? r->str : "unexpected answer");
    s->refresh_fails++;
    s->refresh_rr++;
    cluster_refresh_soon(s);
}

static void cluster_refresh_cb(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    struct store_redis *s = arg;
    s->refresh_last_ms = rs_now_ms();
    struct rconn *c = cluster_any(s, s->refresh_rr);
    if (!c && s->conns) {
        /* Nothing reachable: ops fail fast; look again later. */
        s->refresh_fails++;
        cluster_refresh_soon(s);
        return;
    }
    if (!c) return;
    s->refresh_gen++;
    if (redisAsyncCommand(c->ac, cluster_slots_cb, (void *)s->refresh_gen, "CLUSTER SLOTS") !=
        REDIS_OK) {
        s->refresh_rr++;
        cluster_refresh_soon(s);
        return;
    }
    s->refresh_inflight = true;
    struct timeval tv = rs_tv((uint64_t)rs_timeout_ms(s));
    evtimer_add(s->refresh_deadline_ev, &tv);
}

static void cluster_refresh_deadline_cb(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    struct store_redis *s = arg;
    s->refresh_inflight = false;
    s->refresh_gen++; /* the late answer is ignored */
    s->refresh_fails++;
    s->refresh_rr++;
    cluster_refresh_soon(s);
}

/* Rate-limited: one CLUSTER SLOTS at a time, at most one per
 * RS_REFRESH_MIN_MS, less often while they keep failing. */
static void cluster_refresh_soon(struct store_redis *s)
{
    if (s->mode != CFG_REDIS_CLUSTER || s->refresh_inflight || evtimer_pending(s->refresh_ev, NULL))
        return;
    uint64_t now = rs_now_ms();
    unsigned step = s->refresh_fails < 4 ? s->refresh_fails : 4;
    uint64_t at = s->refresh_last_ms + ((uint64_t)RS_REFRESH_MIN_MS << step);
    struct timeval tv = rs_tv(at > now ? at - now : 0);
    evtimer_add(s->refresh_ev, &tv);
}

/* ---- sentinel: finding the master ---- */

static void sentinel_free_ac(redisAsyncContext *ac, bool disconnect)
{
    ac->data = NULL;
    if (disconnect)
        redisAsyncDisconnect(ac); /* from inside its own callback */
    else
        redisAsyncFree(ac);
}

/* The sentinel at sent_idx did not help: try the next, or start over
 * after a backoff once all were asked. */
static void sentinel_next(struct store_redis *s, const char *why)
{
    const struct cfg_strlist *nodes = &s->cfg->redis.nodes;
    if (!s->sent_logged)
        log_msg(LOG_WARN, "store redis: sentinel %s: %s", nodes->v[s->sent_idx], why);
    s->sent_idx++;
    if (s->sent_idx < nodes->n) {
        sentinel_ask(s);
        return;
    }
    s->sent_logged = true;
    s->sent_idx = 0;
    rc_schedule_reconnect(s->main);
}

static void sentinel_use_master(struct store_redis *s, const redisReply *host, long port)
{
    struct rconn *m = s->main;
    free(m->host);
    m->host = rs_strndup(host->str, host->len);
    m->port = (int)port;
    rc_connect(m);
}

static void sentinel_reply_cb(redisAsyncContext *ac, void *reply, void *priv)
{
    (void)priv;
    struct store_redis *s = ac->data;
    if (!s || s->sent_ac != ac) return;
    s->sent_ac = NULL;
    evtimer_del(s->sent_timer);
    sentinel_free_ac(ac, true);
    const redisReply *r = reply;
    if (r && r->type == REDIS_REPLY_ARRAY && r->elements == 2 &&
        r->element[0]->type == REDIS_REPLY_STRING && r->element[1]->type == REDIS_REPLY_STRING &&
        r->element[0]->len > 0) {
        long port = strtol(r->element[1]->str, NULL, 10);
        if (port > 0 && port <= 65535) {
            sentinel_use_master(s, r->element[0], port);
            return;
        }
    }
    sentinel_next(s, r && r->type == REDIS_REPLY_ERROR && r->str ? r->str
                                                                 : "does not know the master");
}

static void sentinel_on_connect(const redisAsyncContext *ac, int status)
{
    struct store_redis *s = ac->data;
    if (!s || s->sent_ac != ac || status == REDIS_OK) return;
    s->sent_ac = NULL; /* hiredis frees ac after this callback */
    evtimer_del(s->sent_timer);
    sentinel_next(s, ac->errstr[0] ? ac->errstr : "connect failed");
}

static void sentinel_on_disconnect(const redisAsyncContext *ac, int status)
{
    (void)status;
    struct store_redis *s = ac->data;
    if (!s || s->sent_ac != ac) return;
    s->sent_ac = NULL;
    evtimer_del(s->sent_timer);
    sentinel_next(s, ac->errstr[0] ? ac->errstr : "disconnected");
}

static void sentinel_timeout_cb(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    struct store_redis *s = arg;
    redisAsyncContext *ac = s->sent_ac;
    if (!ac) return;
    s->sent_ac = NULL;
    sentinel_free_ac(ac, false);
    sentinel_next(s, "timed out");
}

/* Asks the sentinel at sent_idx for the master's address. */
static void sentinel_ask(struct store_redis *s)
{
    if (s->sent_ac || s->main->ac) return;
    const struct cfg_hostport *at = &s->cfg->redis.node_addrs[s->sent_idx];
    redisAsyncContext *ac = redisAsyncConnect(at->host, at->port);
    if (!ac) abort();
    if (ac->err) {
        char why[128];
        snprintf(why, sizeof(why), "%s", ac->errstr);
        redisAsyncFree(ac);
        sentinel_next(s, why);
        return;
    }
    ac->data = s;
    s->sent_ac = ac;
    redisLibeventAttach(ac, s->evb);
    redisAsyncSetConnectCallback(ac, sentinel_on_connect);
    redisAsyncSetDisconnectCallback(ac, sentinel_on_disconnect);
    struct timeval tv = rs_tv((uint64_t)rs_timeout_ms(s));
    evtimer_add(s->sent_timer, &tv);
    /* The same user and password as the master (SPEC section 2). Its
     * answer is not awaited: a sentinel that needs it refuses the
     * question with NOAUTH, which is what gets logged; one without a
     * password answers the question anyway. */
    if (rs_send_auth(ac, &s->cfg->redis, NULL, NULL) < 0 ||
        redisAsyncCommand(ac, sentinel_reply_cb, NULL, "SENTINEL get-master-addr-by-name %s",
                          s->cfg->redis.master_name) != REDIS_OK) {
        s->sent_ac = NULL;
        evtimer_del(s->sent_timer);
        sentinel_free_ac(ac, false);
        sentinel_next(s, "cannot send");
    }
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

static void gb_remember(struct rop *op);

/* The caller is told STORE_ACQ_ERROR / -1; an acquire that may hold the
 * lock remembers it first, to give it back. */
static void rop_fail(struct rop *op)
{
    if (!op->done && op->kind == ROP_ACQUIRE && op->maybe_locked) gb_remember(op);
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
    if (op->refs > 0 && op->s && op->conn) rc_kill_soon(op->conn);
    rop_fail(op);
}

/* Fails op from the loop, never synchronously. */
static void rop_fail_soon(struct rop *op)
{
    struct timeval zero = {0, 0};
    evtimer_add(op->timer, &zero);
}

static void rop_reply_cb(redisAsyncContext *ac, void *reply, void *priv);

/* Sends one command on op->conn (after ASKING when redirected by ASK and
 * the command names the key). */
static int rop_send(struct rop *op, bool keyed, int argc, const char **argv, const size_t *lens)
{
    struct rconn *c = op->conn;
    if (!op->s || !c || !rs_usable(c)) return -1;
    if (keyed && op->asking && redisAsyncCommand(c->ac, NULL, NULL, "ASKING") != REDIS_OK)
        return -1;
    if (redisAsyncCommandArgv(c->ac, rop_reply_cb, op, argc, argv, lens) != REDIS_OK) return -1;
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
    return rop_send(op, true, 3 + argc, argv, argvlen);
}

static int rop_send_main(struct rop *op)
{
    if (op->kind == ROP_PING) {
        const char *argv[1] = {"PING"};
        size_t len[1] = {4};
        return rop_send(op, false, 1, argv, len);
    }
    int rc = rop_send_script(op, op->script, op->argc, op->argv, op->argvlen);
    /* From here until a reply says otherwise, the server may take the
     * lock for us whatever our caller is told. */
    if (rc == 0 && op->kind == ROP_ACQUIRE) op->maybe_locked = true;
    return rc;
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
    return rop_send(op, false, 3, argv, lens);
}

/* The connection for a new op: the one server, the sentinel master (or
 * none yet: the op is parked), or the node owning the key's slot (any
 * node when the slot is unknown: it answers MOVED). Returns 0 when sent
 * or parked. */
static int rop_dispatch(struct rop *op)
{
    struct store_redis *s = op->s;
    if (s->mode == CFG_REDIS_SENTINEL) {
        op->conn = s->main;
        if (!s->main->ready) {
            op->parked = true;
            return 0;
        }
    } else if (s->mode == CFG_REDIS_CLUSTER) {
        struct rconn *c = op->kind == ROP_PING ? NULL : s->slots[op->slot];
        if (c && !rc_ensure(c)) c = NULL;
        if (!c && (op->kind == ROP_PING || !s->slots[op->slot])) c = cluster_any(s, op->slot);
        op->conn = c;
        if (!c) {
            cluster_refresh_soon(s);
            return -1;
        }
    } else {
        op->conn = s->main;
    }
    return rop_send_main(op);
}

/* The sentinel master is ready: send the ops that waited for it, oldest
 * first. A send failure is reported from the loop, so no user callback
 * runs here. */
static void rs_flush_parked(struct store_redis *s)
{
    struct rop *tail = s->ops;
    while (tail && tail->next)
        tail = tail->next;
    for (struct rop *op = tail; op; op = op->prev) {
        if (!op->parked || op->done) continue;
        op->parked = false;
        op->conn = s->main;
        if (rop_send_main(op) != 0) rop_fail_soon(op);
    }
}

/* Errors behind a failed handshake are its echo, logged already. */
static void rs_log_bad_reply(const struct rconn *c, const redisReply *r)
{
    if (c && c->handshake_failed) return;
    if (r->type == REDIS_REPLY_ERROR)
        log_msg(LOG_ERROR, "store redis: error reply: %s", r->str ? r->str : "");
    else
        log_msg(LOG_ERROR, "store redis: unexpected reply type %d", r->type);
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
        rs_log_bad_reply(op->conn, r);
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

/* True when an acquire script's reply says the lock is now ours. */
static bool rop_reply_locked(const redisReply *r)
{
    struct store_acquire_reply out = {.state = STORE_ACQ_ERROR};
    return rop_parse_acquire(r, &out) && out.state == STORE_ACQ_LOCKED;
}

static void gb_send(struct rs_giveback *e);
static struct rs_giveback *gb_find(struct store_redis *s, const char *token);
static void gb_free(struct rs_giveback *e);

/* A reply for an acquire whose caller already got an error (and which
 * remembered its lock then): give the lock back now when the reply shows
 * it is ours, forget it when it shows nothing was taken. */
static void rop_on_late_reply(struct rop *op, const redisReply *r)
{
    if (op->kind != ROP_ACQUIRE || !op->s) return;
    struct rs_giveback *e = gb_find(op->s, op->argv[2]);
    if (!e || e->inflight) return;
    bool locked;
    if (op->stage == ROP_WAIT)
        locked = true; /* WAIT changes nothing: the lock was taken */
    else if (op->stage == ROP_UNDO)
        locked = r->type != REDIS_REPLY_INTEGER; /* 1 or 0: it is gone */
    else
        locked = rop_reply_locked(r);
    if (locked)
        gb_send(e);
    else
        gb_free(e);
}

/* "MOVED <slot> <host>:<port>" / "ASK ..." -> 1 / 2 with the target, or 0. */
static int rs_parse_redirect(const redisReply *r, unsigned *slot, const char **host, size_t *hlen,
                             int *port)
{
    int kind = reply_is_error(r, "MOVED") ? 1 : reply_is_error(r, "ASK") ? 2 : 0;
    if (!kind) return 0;
    const char *p = r->str + (kind == 1 ? 6 : 4);
    const char *end = r->str + r->len;
    char *after;
    unsigned long sl = strtoul(p, &after, 10);
    if (after == p || after >= end || *after != ' ' || sl >= RS_NSLOTS) return 0;
    const char *addr = after + 1;
    const char *colon = NULL;
    for (const char *q = end; q > addr; q--)
        if (q[-1] == ':') {
            colon = q - 1;
            break;
        }
    if (!colon || colon + 1 >= end) return 0;
    char digits[8];
    size_t dl = (size_t)(end - colon - 1);
    if (dl >= sizeof(digits)) return 0;
    memcpy(digits, colon + 1, dl);
    digits[dl] = '\0';
    long pt = strtol(digits, &after, 10);
    if (*after || pt <= 0 || pt > 65535) return 0;
    *slot = (unsigned)sl;
    *host = addr;
    *hlen = (size_t)(colon - addr);
    *port = (int)pt;
    return kind;
}

/* Follows MOVED (the map learns the new owner) or ASK (this op only, with
 * ASKING) and sends the same command again, within the op's deadline. */
static void rop_redirect(struct rop *op, int kind, unsigned slot, const char *host, size_t hlen,
                         int port)
{
    struct store_redis *s = op->s;
    if (++op->redirects > RS_MAX_REDIRECTS) {
        log_msg(LOG_ERROR, "store redis: too many cluster redirects for slot %u", slot);
        rop_fail(op);
        return;
    }
    if (hlen == 0) { /* "MOVED 12 :6380": same host as the one asked */
        host = op->conn->host;
        hlen = strlen(host);
    }
    struct rconn *target = cluster_node(s, host, hlen, port);
    if (kind == 1) {
        s->slots[slot] = target;
        op->asking = false;
        cluster_refresh_soon(s);
    } else {
        op->asking = true;
    }
    op->conn = target;
    if (!rc_ensure(target)) {
        rop_fail(op);
        return;
    }
    int rc = op->stage == ROP_UNDO ? rop_send_undo(op) : rop_send_main(op);
    if (rc != 0) rop_fail(op);
}

/* Cluster and sentinel replies that are about where the key lives, not
 * about the op; true when handled (op redirected or failed). */
static bool rop_on_topology_error(struct rop *op, const redisReply *r)
{
    struct store_redis *s = op->s;
    if (s->mode == CFG_REDIS_CLUSTER && op->kind != ROP_PING && op->stage != ROP_WAIT) {
        unsigned slot;
        const char *host;
        size_t hlen;
        int port;
        int kind = rs_parse_redirect(r, &slot, &host, &hlen, &port);
        if (kind) {
            rop_redirect(op, kind, slot, host, hlen, port);
            return true;
        }
    }
    if (s->mode == CFG_REDIS_STANDALONE) return false;
    bool moved_on = reply_is_error(r, "READONLY") || reply_is_error(r, "LOADING") ||
                    reply_is_error(r, "MASTERDOWN") ||
                    (s->mode == CFG_REDIS_CLUSTER &&
                     (reply_is_error(r, "CLUSTERDOWN") || reply_is_error(r, "TRYAGAIN")));
    if (!moved_on) return false;
    log_msg(LOG_WARN, "store redis: %s:%d answered %s", op->conn->host, op->conn->port, r->str);
    if (s->mode == CFG_REDIS_SENTINEL)
        rc_kill_soon(op->conn); /* then the sentinels are asked again */
    else
        cluster_refresh_soon(s);
    rop_fail(op);
    return true;
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
        /* Lost before the socket connected: nothing reached the server. */
        if (op->conn && !op->conn->connected) op->maybe_locked = false;
        rop_fail(op);
        return;
    }
    if (op->kind == ROP_ACQUIRE && op->stage == ROP_MAIN) op->maybe_locked = rop_reply_locked(r);
    if (r->type == REDIS_REPLY_ERROR && rop_on_topology_error(op, r)) return;
    if (op->stage == ROP_MAIN && op->kind != ROP_PING && reply_is_error(r, "NOSCRIPT") &&
        !op->retried) {
        op->retried = true;
        if (rc_load_scripts(op->conn, rc_reload_cb) != 0 || rop_send_main(op) != 0) rop_fail(op);
        return;
    }
    if (op->stage == ROP_UNDO) {
        if (r->type == REDIS_REPLY_INTEGER) op->maybe_locked = false; /* given back */
        rop_fail(op);
    } else if (op->stage == ROP_WAIT) {
        rop_on_wait(op, r);
    } else if (op->kind == ROP_ACQUIRE) {
        rop_on_acquire_main(op, r);
    } else {
        int status = rop_status_of(r, op->kind);
        if (status < 0) rs_log_bad_reply(op->conn, r);
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
    if (argc > 0) op->slot = rs_keyslot(op->argv[0], op->argvlen[0]);
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
    if (rop_dispatch(op) != 0) rop_fail_soon(op);
}

/* ---- give-backs: locks that failed acquires may have taken ---- */

static struct rs_giveback *gb_find(struct store_redis *s, const char *token)
{
    for (struct rs_giveback *e = s->gb_head; e; e = e->next)
        if (memcmp(e->token, token, STORE_TOKEN_LEN) == 0) return e;
    return NULL;
}

static void gb_free(struct rs_giveback *e)
{
    struct store_redis *s = e->s;
    if (e->prev)
        e->prev->next = e->next;
    else
        s->gb_head = e->next;
    if (e->next)
        e->next->prev = e->prev;
    else
        s->gb_tail = e->prev;
    s->gb_count--;
    free(e);
}

/* A lock that will not be given back stays until lock_seconds: counted
 * each time, logged once per run of them. */
static void gb_dropped(struct store_redis *s, const char *key, size_t key_len, const char *why)
{
    metrics_inc(M_STORE_ERRORS);
    if (s->gb_drop_logged) return;
    s->gb_drop_logged = true;
    log_msg(LOG_ERROR,
            "store redis: cannot give back the lock of a failed acquire (%s); %.*s may stay "
            "locked until it expires",
            why, (int)key_len, key);
}

static void gb_remember(struct rop *op)
{
    struct store_redis *s = op->s;
    if (!s || gb_find(s, op->argv[2])) return;
    if (s->gb_count >= RS_GIVEBACK_MAX) {
        struct rs_giveback *old = s->gb_head;
        while (old && old->inflight)
            old = old->next;
        if (!old) {
            gb_dropped(s, op->argv[0], op->argvlen[0], "too many remembered");
            return;
        }
        gb_dropped(s, old->key, old->key_len, "too many remembered");
        gb_free(old);
    }
    struct rs_giveback *e = rs_alloc(sizeof(*e) + op->argvlen[0]);
    e->s = s;
    e->slot = op->slot;
    memcpy(e->token, op->argv[2], STORE_TOKEN_LEN);
    e->key_len = op->argvlen[0];
    memcpy(e->key, op->argv[0], e->key_len);
    e->prev = s->gb_tail;
    if (s->gb_tail)
        s->gb_tail->next = e;
    else
        s->gb_head = e;
    s->gb_tail = e;
    s->gb_count++;
}

static void gb_done(void *arg, int status)
{
    struct rs_giveback *e = arg;
    struct store_redis *s = e->s;
    e->inflight = false;
    if (status == 1) {
        log_msg(LOG_WARN,
                "store redis: gave back a lock that an acquire took after it had failed (timed "
                "out or lost its connection): %.*s",
                (int)e->key_len, e->key);
        s->gb_drop_logged = false;
        gb_free(e);
    } else if (status == 0) {
        gb_free(e); /* nothing was taken, or the lock expired since */
    } else if (++e->tries >= RS_GIVEBACK_TRIES) {
        gb_dropped(s, e->key, e->key_len, "the release failed");
        gb_free(e);
    }
    /* else kept: tried again when a connection is ready again */
}

/* The release script, fenced by the token, as an op of our own. Its
 * callback never fires synchronously, so callers may go on walking the
 * list. */
static void gb_send(struct rs_giveback *e)
{
    const char *args[2] = {e->key, e->token};
    size_t lens[2] = {e->key_len, STORE_TOKEN_LEN};
    struct rop *op = rop_new(e->s, ROP_RELEASE, RS_RELEASE, 2, args, lens);
    op->done_cb = gb_done;
    op->arg = e;
    e->inflight = true;
    rop_start(op);
}

/* Whether e's key lives behind c: the one server or master, or in a
 * cluster the node owning its slot (any node while the slot is unknown:
 * it answers MOVED). */
static bool gb_routes_to(const struct store_redis *s, const struct rs_giveback *e,
                         const struct rconn *c)
{
    if (s->mode != CFG_REDIS_CLUSTER) return true;
    return !s->slots[e->slot] || s->slots[e->slot] == c;
}

static bool gb_wants(const struct rconn *c)
{
    for (const struct rs_giveback *e = c->s->gb_head; e; e = e->next)
        if (!e->inflight && gb_routes_to(c->s, e, c)) return true;
    return false;
}

/* c is ready again: give back what waits for it. */
static void gb_flush(struct rconn *c)
{
    struct store_redis *s = c->s;
    for (struct rs_giveback *e = s->gb_head; e; e = e->next)
        if (!e->inflight && gb_routes_to(s, e, c)) gb_send(e);
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
        op->conn = NULL;
        op->prev = op->next = NULL;
        op->done = true;
        if (op->timer) event_free(op->timer);
        op->timer = NULL;
        rop_maybe_free(op);
        op = next;
    }
    s->ops = NULL;
    while (s->gb_head) /* their releases in flight were just dropped */
        gb_free(s->gb_head);
    if (s->sent_ac) {
        redisAsyncContext *ac = s->sent_ac;
        s->sent_ac = NULL;
        sentinel_free_ac(ac, false);
    }
    struct rconn *c = s->conns;
    while (c) {
        struct rconn *next = c->next;
        rc_free(c);
        c = next;
    }
    if (s->refresh_ev) event_free(s->refresh_ev);
    if (s->refresh_deadline_ev) event_free(s->refresh_deadline_ev);
    if (s->sent_timer) event_free(s->sent_timer);
    free(s->slots);
    free(s->prefix);
    free(s);
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

static void rs_start_cluster(struct store_redis *s)
{
    const struct cfg_redis *rc = &s->cfg->redis;
    s->slots = rs_alloc(RS_NSLOTS * sizeof(*s->slots));
    s->refresh_ev = evtimer_new(s->evb, cluster_refresh_cb, s);
    s->refresh_deadline_ev = evtimer_new(s->evb, cluster_refresh_deadline_cb, s);
    if (!s->refresh_ev || !s->refresh_deadline_ev) abort();
    /* Listed last to first so that the list reads in config order. */
    for (size_t i = rc->nodes.n; i > 0; i--) {
        const struct cfg_hostport *at = &rc->node_addrs[i - 1];
        cluster_node(s, at->host, strlen(at->host), at->port);
    }
    cluster_refresh_soon(s);
}

static void rs_start_sentinel(struct store_redis *s)
{
    s->sent_timer = evtimer_new(s->evb, sentinel_timeout_cb, s);
    if (!s->sent_timer) abort();
    s->main = rc_new(s, RC_MASTER, rs_strndup("?", 1), 0, false);
    sentinel_ask(s);
}

struct store *store_redis_new(struct event_base *base, const struct cfg *cfg)
{
    struct store_redis *s = rs_alloc(sizeof(*s));
    s->base.ops = &rs_ops;
    s->evb = base;
    s->cfg = cfg;
    s->mode = cfg->redis.mode;
    const char *p = cfg->redis.key_prefix ? cfg->redis.key_prefix : "";
    s->prefix = rs_strndup(p, strlen(p));
    for (int i = 0; i < RS_NSCRIPTS; i++)
        rs_sha1_hex(rs_scripts[i], s->sha[i]);
    bool nodes = cfg->redis.nodes.n > 0 && cfg->redis.node_addrs;
    if (s->mode == CFG_REDIS_SENTINEL && (!nodes || !cfg->redis.master_name)) {
        log_msg(LOG_ERROR, "store redis: sentinel mode needs redis.nodes and redis.master_name");
        s->mode = CFG_REDIS_STANDALONE;
    }
    if (s->mode == CFG_REDIS_CLUSTER && !nodes) {
        log_msg(LOG_ERROR, "store redis: cluster mode needs redis.nodes");
        s->mode = CFG_REDIS_STANDALONE;
    }
    if (s->mode == CFG_REDIS_CLUSTER) {
        rs_start_cluster(s);
    } else if (s->mode == CFG_REDIS_SENTINEL) {
        rs_start_sentinel(s);
    } else {
        const char *host = cfg->redis.host ? cfg->redis.host : "127.0.0.1";
        s->main = rc_new(s, RC_STANDALONE, rs_strndup(host, strlen(host)),
                         cfg->redis.port ? cfg->redis.port : 6379, cfg->redis.unix_socket);
        rc_connect(s->main);
    }
    return &s->base;
}
