/* redis_internal.h — what the files of the Redis store share; private to
 * src/store/redis/ (the public face is store_redis_new in store.h).
 *
 * The backend owns the hiredis 0.14 async connections of one store (per
 * worker), attached to the worker's event_base with the libevent adapter;
 * their reconnect, teardown and handshake timers; the cluster slot map and
 * the sentinel master lookup; and every operation in flight. It knows
 * nothing of HTTP or of what a record contains.
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
#ifndef IDEMGATE_STORE_REDIS_INTERNAL_H
#define IDEMGATE_STORE_REDIS_INTERNAL_H

#include "idemgate/config/config.h"
#include "idemgate/store/store.h"

#include <event2/event.h>
#include <hiredis/async.h>
#include <hiredis/hiredis.h>
#include <stdbool.h>
#include <stdint.h>

#define RS_BACKOFF_MIN_MS 100
#define RS_BACKOFF_MAX_MS 2000
#define RS_MAX_ARGS 7
#define RS_GIVEBACK_MAX 1024 /* remembered locks per store */
#define RS_GIVEBACK_TRIES 3  /* give-backs that fail before one is dropped */

enum rs_script { RS_ACQUIRE, RS_COMPLETE, RS_RELEASE, RS_RENEW, RS_NSCRIPTS };

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

/* redis.c */
void *rs_alloc(size_t n);
char *rs_strndup(const char *p, size_t n);
uint64_t rs_now_ms(void);
struct timeval rs_tv(uint64_t ms);
int rs_timeout_ms(const struct store_redis *s);
bool rs_usable(const struct rconn *c);
bool reply_is_error(const redisReply *r, const char *prefix);

/* conn.c */
void rc_schedule_reconnect(struct rconn *c);
void rc_kill_soon(struct rconn *c);
struct rconn *rc_of(const redisAsyncContext *ac);
int rs_send_auth(redisAsyncContext *ac, const struct cfg_redis *rc, redisCallbackFn *fn,
                 void *priv);
void rc_connect(struct rconn *c);
bool rc_ensure(struct rconn *c);
struct rconn *rc_new(struct store_redis *s, enum rconn_role role, char *host, int port,
                     bool unix_socket);
void rc_free(struct rconn *c);

/* scripts.c */
extern const char *const rs_scripts[RS_NSCRIPTS];
void rs_sha1_hex(const char *text, char out[41]);
bool rs_check_load_reply(const struct store_redis *s, const redisReply *r, intptr_t i);
void rc_reload_cb(redisAsyncContext *ac, void *reply, void *priv);
int rc_load_scripts(struct rconn *c, redisCallbackFn *fn);

/* op.c */
void rop_maybe_free(struct rop *op);
void rop_finish(struct rop *op, const struct store_acquire_reply *acq, int status);
void rop_fail(struct rop *op);
int rop_send_main(struct rop *op);
int rop_send_undo(struct rop *op);
void rs_flush_parked(struct store_redis *s);
struct rop *rop_new(struct store_redis *s, enum rop_kind kind, enum rs_script script, int argc,
                    const char **args, const size_t *lens);
void rop_start(struct rop *op);

/* giveback.c */
struct rs_giveback *gb_find(struct store_redis *s, const char *token);
void gb_free(struct rs_giveback *e);
void gb_remember(struct rop *op);
void gb_send(struct rs_giveback *e);
bool gb_wants(const struct rconn *c);
void gb_flush(struct rconn *c);

/* cluster.c */
unsigned rs_keyslot(const char *key, size_t n);
struct rconn *cluster_any(struct store_redis *s, unsigned from);
void cluster_refresh_soon(struct store_redis *s);
int rs_parse_redirect(const redisReply *r, unsigned *slot, const char **host, size_t *hlen,
                      int *port);
void rop_redirect(struct rop *op, int kind, unsigned slot, const char *host, size_t hlen, int port);
void rs_start_cluster(struct store_redis *s);

/* sentinel.c */
void sentinel_free_ac(redisAsyncContext *ac, bool disconnect);
void sentinel_ask(struct store_redis *s);
void rs_start_sentinel(struct store_redis *s);

#endif
