/* redis_internal.h — what the files of the Redis store share; private to
 * src/store/redis/ (the public face is store_redis_new in store.h). It
 * sits next to them rather than in include/ because nothing else may use
 * it: the structs below change with the backend, not with the store API.
 *
 * Who owns what:
 *   redis.c       struct store_redis, the store_ops table, store_redis_new
 *                 (the one place redis.mode is read: it picks the topology)
 *   conn.c        struct rconn: connect, handshake, teardown, backoff
 *   scripts.c     the Lua scripts, their SHA1s, SCRIPT LOAD
 *   op.c          struct rop: deadline, EVALSHA / NOSCRIPT, WAIT, replies
 *   giveback.c    struct rs_giveback: locks a failed acquire may have taken
 *   standalone.c  one struct rs_topology_ops each (the table below): where
 *   cluster.c     a key's commands go, and what a connection going down,
 *   sentinel.c    coming up or an error reply like MOVED means in the mode
 *
 * The backend owns the Redis connections of one store (per worker), on our
 * connection layer (net/conn, TLS for rediss://) and the worker's
 * event_base; their reconnect, teardown and handshake timers; the cluster
 * slot map and the sentinel master lookup; and every operation in flight,
 * under one deadline timer per store. It knows
 * nothing of HTTP or of what a record contains.
 *
 * Three modes (redis.mode):
 *  - standalone: one connection to redis.url;
 *  - cluster: one lazily opened connection per node, a slot -> node map
 *    filled by CLUSTER SLOTS (at start, after MOVED, after a connection
 *    error; rate-limited), MOVED and ASK redirects followed within the
 *    operation's deadline;
 *  - sentinel: the sentinels in redis.nodes are asked in order for the
 *    master's address, which is checked with ROLE; one of them is
 *    subscribed to +switch-master, and an announced failover moves the
 *    master connection to the new address at once; on a lost connection,
 *    a timeout or a READONLY / LOADING reply the sentinels are asked again.
 *    The operation in flight fails (never retried on another master);
 *    operations started while no master is known wait for one until their
 *    deadline.
 *
 * Each operation is one atomic round trip. All state of one (scope, key)
 * is one string at "<prefix>{<skey>}" (the hash tag keeps it on one
 * cluster slot): a header of RS_VAL_HDR bytes, then the record
 *   "IG1" | state 'p' (in progress) or 'c' (completed) | owner token (32)
 *   | fingerprint (16 raw bytes) | created-at (ms since the epoch, 8 bytes
 *   big-endian) | record bytes (completed only).
 * An acquire is one native command, SET k <lock> NX PX <lock_ms> GET
 * (Redis 7.0 and later; the server's version is read at connect): nil
 * means the lock is ours, a value says replay, in progress or mismatch.
 * Complete, release and renew are short Lua scripts fenced by the owner
 * token (loaded with SCRIPT LOAD at connect time, called with EVALSHA,
 * reloaded once on NOSCRIPT), each one GET and one SET / DEL / PEXPIRE.
 * The acquire script (for servers older than 7.0, and for the connections
 * whose version is not known yet) answers like SET NX GET.
 *
 * The limits of a scope (store_limit) live apart from its keys, under one
 * hash tag: "<prefix>{rl:<scope>}" holds the rate state (a string
 * "<t0 ms> <d> <n>": the GCRA's TAT is t0 + d / n ms, exact in integers),
 * expiring when the TAT is reached; "<prefix>{rl:<scope>}:s" is a zset of
 * slots, token -> lease expiry (ms), expiring with its longest lease.
 * Each operation is one script on the server's clock (TIME), so any
 * number of instances sharing the Redis hold one limit.
 *
 * Older idemgates kept a hash (s, t, f, r) at the same key. A key of that
 * layout answers SET NX GET with WRONGTYPE; the acquire script then reads
 * it into this layout (a replay, a 409 or a mismatch as before), so an
 * upgraded instance honours what older ones wrote. An older instance
 * meets WRONGTYPE on a key written here and answers 503: mixed, the two
 * never run one key twice.
 *
 * Ownership of an operation (struct rop):
 *
 *      caller ──start──▶ rop ◀──pending entry── rconn (refs: replies owed)
 *                         │
 *                         └─ the store's list (deadline order)
 *
 * The user callback fires exactly once (reply, error or deadline: DONE);
 * the rop itself is recycled only when it is DONE and its connection owes
 * it no reply (refs == 0), because a connection calls back every pending
 * command, with a NULL reply when it goes away. A deadline means the
 * connection may be stuck, so it is torn down (from a deferred event,
 * never from inside a reply callback) and the reconnect logic takes over.
 * A store freed from inside one of its callbacks is freed when that
 * callback unwinds (rs_enter / rs_leave).
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
#include "idemgate/net/conn.h"
#include "idemgate/store/store.h"
#include "resp.h"

#include <event2/event.h>
#include <stdbool.h>
#include <sys/queue.h>
#include <stdint.h>

#define RS_BACKOFF_MIN_MS 100
#define RS_BACKOFF_MAX_MS 2000
#define RS_MAX_ARGS 7
#define RS_GIVEBACK_MAX 1024 /* remembered locks per store */
#define RS_GIVEBACK_TRIES 3  /* give-backs that fail before one is dropped */
#define RS_VAL_MAGIC "IG1"   /* the value layout (see above) */
#define RS_VAL_HDR 60        /* magic 3, state 1, token 32, fingerprint 16, created-at 8 */

enum rs_script {
    RS_ACQUIRE,
    RS_COMPLETE,
    RS_RELEASE,
    RS_RENEW,
    RS_INSPECT,
    RS_LIMIT,         /* KEYS: the rate state, the slots */
    RS_LIMIT_RELEASE, /* KEYS: the slots */
    RS_LIMIT_RENEW,   /* KEYS: the slots */
    RS_NSCRIPTS
};

/* What an op answers with: ROP_LIMIT a store_limit_reply; the others
 * done_cb's status (limit_release and limit_renew run as ROP_RELEASE and
 * ROP_RENEW with their own scripts), except acquire and key. */
enum rop_kind { ROP_ACQUIRE, ROP_COMPLETE, ROP_RELEASE, ROP_RENEW, ROP_PING, ROP_KEY, ROP_LIMIT };

/* An acquire that took the lock may go on: WAIT for replicas, then give
 * the lock back (UNDO) when too few acknowledged. */
enum rop_stage { ROP_MAIN, ROP_WAIT, ROP_UNDO, ROP_SCAN /* ROP_KEY: finding a scope prefix */ };

struct store_redis;

/* The life of a connection (struct rconn):
 *
 *   IDLE ──rc_connect──▶ CONNECTING ──TCP up──▶ [TLS] ──▶ HANDSHAKE ──all answered──▶ READY
 *    ▲                        │                   │           │                          │
 *    └──────────────── lost, refused, timed out, failed, torn down ◀─────────────────────┘
 *
 * Commands may be queued from CONNECTING on: they wait in the output
 * buffer behind the handshake and go out once the socket (and TLS) is up.
 * IDLE has no socket; a data connection's backoff timer may be running. */
enum rc_state { RC_IDLE, RC_CONNECTING, RC_TLS, RC_HANDSHAKE, RC_READY };

/* What a connection is for. DATA: a server the store's ops go to (the
 * one server, a cluster node, the sentinel master): listed in s->conns,
 * with the full handshake, a reconnect backoff and the topology told of
 * its going down and coming up. AUX: a sentinel asked a question or
 * subscribed to: AUTH only, not listed, its owner told when it goes. */
enum rc_kind { RC_DATA, RC_AUX };

struct rconn;
struct rreply;
/* A reply (NULL: the connection went before it came), borrowed until the
 * callback returns. */
typedef void rc_reply_fn(struct rconn *c, const struct rreply *r, void *priv);
/* An AUX connection went (lost, refused, closed by the server): c is
 * already IDLE, its pending callbacks were dropped. */
typedef void rc_down_fn(struct rconn *c, const char *why, void *arg);

/* A reply the connection owes: who gets it (fn NULL: nobody). */
struct rc_pending {
    rc_reply_fn *fn;
    void *priv;
};

/* One server connection on our connection layer (net/conn): commands are
 * written as RESP into its output buffer and everything queued in one
 * loop iteration goes out with one write; replies are parsed in place
 * (resp.c) and handed, in order, to the callbacks of a ring of pending
 * entries. A DATA connection lives as long as the store (only its socket
 * comes and goes); an AUX one as long as its owner keeps it. */
struct rconn {
    struct rconn *next; /* the store's list (DATA) */
    struct store_redis *s;
    enum rc_kind kind;
    enum rc_state state;
    char *host; /* or the unix socket path */
    int port;
    bool unix_socket;
    struct conn io;          /* open from CONNECTING on */
    struct resp_arena arena; /* the reply being parsed */
    struct rc_pending *q;    /* ring: replies owed, oldest at q_head */
    size_t q_head, q_len, q_cap;
    struct event *flush_ev; /* active: output waits for the end of the iteration */
    bool flush_queued;
    bool wrote;            /* bytes reached the socket since it connected */
    int dispatching;       /* inside its reply callbacks */
    bool release_pending;  /* AUX: rc_release from inside a callback */
    bool down_logged;      /* one log line per outage */
    bool handshake_failed; /* one log line per failed handshake */
    int handshake_left;
    bool set_get; /* the server takes SET NX PX GET (7.0+): known once READY */
    unsigned backoff_step;
    struct event *reconnect_ev; /* DATA */
    struct event *kill_ev;
    struct event *handshake_ev; /* DATA */
    rc_down_fn *down_fn;        /* AUX */
    void *down_arg;
    rc_reply_fn *push_fn; /* pub/sub messages (a subscriber), or NULL */
    void *push_arg;
};

/* Where an operation is:
 *   PARKED ──conn ready──▶ SENT ──last needed reply, deadline or failure──▶ DONE
 * (a new op is SENT or PARKED at once, or DONE from the loop when it has
 * nowhere to go). DONE means its callback fired; the op is freed (or
 * recycled) once no reply is owed to it either (refs == 0). */
enum rop_state { ROP_PARKED, ROP_SENT, ROP_DONE };

/* One operation in flight. */
struct rop {
    TAILQ_ENTRY(rop) link; /* the store's live ops (oldest first), or its spares */
    struct store_redis *s;
    struct rconn *conn; /* where its commands go */
    enum rop_kind kind;
    enum rop_stage stage;
    enum rop_state state;
    int refs;          /* replies its connection still owes it */
    bool fail_soon;    /* to fail from the loop (s->fail_ev) */
    bool retried;      /* the NOSCRIPT retry is used up */
    bool asking;       /* ASK redirect: send ASKING before each keyed command */
    bool maybe_locked; /* acquire: the lock may be ours (sent, unanswered, or taken) */
    bool legacy;       /* acquire: the key holds the older layout (the script reads it) */
    int redirects;     /* MOVED / ASK followed so far */
    unsigned slot;     /* cluster slot of the key */
    enum rs_script script;
    store_acquire_cb acq_cb;
    store_done_cb done_cb;
    store_key_cb key_cb;
    store_limit_cb limit_cb;
    char cursor[24]; /* ROP_SCAN: SCAN's cursor on conn */
    void *arg;
    uint64_t deadline_ms; /* clock_now_ms() */
    /* the arguments (acquire: key fp token ms lock-value; limit: rate key,
     * slots key, token requests window slots lease) */
    int argc;
    const char *argv[RS_MAX_ARGS];
    size_t argvlen[RS_MAX_ARGS];
    char *buf; /* owns the bytes argv points into */
    size_t buf_cap;
};

/* A lock an acquire may have taken after its caller was told it failed;
 * owned by the store's list until given back, found not taken, or dropped.
 * While its release is in flight (inflight) the entry stays listed and is
 * the release's callback argument. */
struct rs_giveback {
    TAILQ_ENTRY(rs_giveback) link; /* the store's list, oldest first */
    struct store_redis *s;
    unsigned slot; /* cluster slot of key */
    int tries;     /* releases that failed */
    bool inflight;
    char token[STORE_TOKEN_LEN];
    size_t key_len;
    char key[]; /* the Redis key, "<prefix>{<skey>}" */
};

/* Where a new operation goes (rs_topology_ops.route). */
enum rs_route {
    RS_ROUTE_SEND, /* op->conn is set: send now */
    RS_ROUTE_PARK, /* op->conn is set but not ready: sent when it is */
    RS_ROUTE_NONE  /* nowhere to send it now: the op fails (from the loop) */
};

/* One routing module per redis.mode, chosen once by store_redis_new (the
 * way Redis puts ConnectionType in front of its transports): which server
 * a key's commands go to, and what a topology event means. Connections,
 * operations and give-backs call these and never ask for the mode. The
 * entries marked optional may be NULL. */
struct rs_topology_ops {
    /* The handshake SELECTs redis.url's database (a cluster has only 0). */
    bool select_db;
    /* Keys live in cluster slots: op->slot (and a give-back's) is computed. */
    bool slots;
    /* Makes the mode's state (s->topo_state) and its first connections. */
    void (*init)(struct store_redis *s);
    /* Sets op->conn for a new op: the connection for its key. */
    enum rs_route (*route)(struct rop *op);
    /* An error reply about where the key lives (MOVED, ASK, READONLY, ...):
     * true when handled (op redirected, or failed). Optional. */
    bool (*on_error_reply)(struct rop *op, const struct rreply *r);
    /* Queues the mode's own handshake commands on c, after AUTH, SELECT
     * and the policy check, before SCRIPT LOAD; returns how many of their
     * answers the handshake waits for, or -1. Optional. */
    int (*handshake)(struct rconn *c);
    /* c's handshake is complete: log it. Optional ("connected again"
     * after an outage). Give-backs and parked ops go out after it. */
    void (*on_ready)(struct rconn *c);
    /* c went down; its reconnect backoff is already running. Optional. */
    void (*on_down)(struct rconn *c);
    /* c's reconnect backoff is over. */
    void (*on_backoff_over)(struct rconn *c);
    /* Whether a key of this cluster slot lives behind c (give-backs wait
     * for that connection). Optional: every key does. */
    bool (*serves)(const struct rconn *c, unsigned slot);
    /* Frees the mode's state; every connection has been freed already. */
    void (*free)(struct store_redis *s);
};

extern const struct rs_topology_ops rs_standalone_ops;
extern const struct rs_topology_ops rs_cluster_ops;
extern const struct rs_topology_ops rs_sentinel_ops;

struct store_redis {
    struct store base; /* first: a struct store * is a struct store_redis * */
    struct event_base *evb;
    const struct cfg *cfg;              /* borrowed */
    const struct rs_topology_ops *topo; /* the mode's routing */
    void *topo_state;                   /* owned by topo (its free) */
    struct rconn *conns;                /* every DATA connection */
    TAILQ_HEAD(, rop) ops;              /* live ops, oldest (first deadline) first */
    TAILQ_HEAD(, rop) spare;            /* freed ops kept for reuse */
    size_t n_spare;
    struct event *deadline_ev;     /* the oldest live op's deadline */
    struct event *fail_ev;         /* active: ops marked fail_soon */
    int depth;                     /* libevent callbacks of the store on the stack */
    bool tls;                      /* rediss:// */
    const struct tls_set *tls_set; /* its Redis context (borrowed) */
    bool freeing;                  /* store_free was called inside one: freed when it unwinds */
    TAILQ_HEAD(, rs_giveback) gb;  /* remembered locks, oldest first */
    size_t gb_count;
    bool gb_drop_logged; /* one log line per run of dropped give-backs */
    char *prefix;
    char sha[RS_NSCRIPTS][41];
};

/* redis.c: small helpers */
void *rs_alloc(size_t n); /* zeroed; aborts when out of memory */
char *rs_strndup(const char *p, size_t n);
int rs_timeout_ms(const struct store_redis *s); /* redis.timeout_ms */
bool rs_reply_is_error(const struct rreply *r, const char *prefix);
bool rs_reply_is(const struct rreply *r, const char *s); /* a string, status or error equal to s */
/* Every libevent callback of the store that may reach a user callback
 * runs between these: a store_free from inside one only marks the store,
 * and the outermost rs_leave frees it. rs_leave returns false when the
 * store is gone (or going): touch nothing of it then. */
struct ssl_st *rs_tls_new(struct store_redis *s, const char *host);
void rs_enter(struct store_redis *s);
bool rs_leave(struct store_redis *s);

/* conn.c */
struct rconn *rc_new(struct store_redis *s, char *host, int port, bool unix_socket);
void rc_free(struct rconn *c);
/* An AUX connection to host:port, connecting now, AUTH queued: commands
 * may follow at once. NULL (down_fn not called) when it cannot start; why
 * says it. The owner lets it go with rc_release. */
struct rconn *rc_aux_open(struct store_redis *s, const char *host, int port, rc_down_fn *down_fn,
                          void *arg, char *why, size_t why_len);
/* Closes and frees an AUX connection, dropping its pending callbacks
 * (safe from inside one of them: done when it returns). */
void rc_release(struct rconn *c);
void rc_set_address(struct rconn *c, const char *host, size_t hlen, int port);
void rc_connect(struct rconn *c);
bool rc_ensure(struct rconn *c);
bool rc_usable(const struct rconn *c);
bool rc_is_connected(const struct rconn *c); /* the socket and TLS are up */
void rc_kill_soon(struct rconn *c);
void rc_schedule_reconnect(struct rconn *c);
void rc_handshake_answered(struct rconn *c);
void rc_handshake_failed(struct rconn *c);
/* Queues one command (argv[i] of lens[i] bytes; lens NULL: C strings)
 * whose reply goes to fn (NULL: ignored). 0, or -1 when c cannot take
 * commands now (fn is then never called). Never calls fn itself. */
int rc_command(struct rconn *c, rc_reply_fn *fn, void *priv, int argc, const char **argv,
               const size_t *lens);
/* The same with C-string arguments, NULL-terminated. */
int rc_cmd(struct rconn *c, rc_reply_fn *fn, void *priv, ...) __attribute__((sentinel));
int rc_send_auth(struct rconn *c, rc_reply_fn *fn, void *priv);

/* scripts.c */
void rs_scripts_hash(char sha[RS_NSCRIPTS][41]);
/* EVALSHA's numkeys for script i: how many of its arguments are keys. */
const char *rs_script_numkeys(enum rs_script i);
bool rs_script_loaded(const struct store_redis *s, const struct rreply *r, intptr_t i);
int rs_scripts_load(struct rconn *c, rc_reply_fn *fn);
int rs_scripts_reload(struct rconn *c);
void rs_lock_value(char out[RS_VAL_HDR], const uint8_t fp[STORE_FP_LEN],
                   const char token[STORE_TOKEN_LEN], uint64_t created_ms);
bool rs_parse_value(const char *v, size_t n, const uint8_t fp[STORE_FP_LEN],
                    struct store_acquire_reply *out);

/* op.c */
struct rop *rop_new(struct store_redis *s, enum rop_kind kind, enum rs_script script, int argc,
                    const char **args, const size_t *lens);
void rop_start(struct rop *op);
void rop_start_on(struct rop *op, struct rconn *c);
int rop_send_main(struct rop *op);
int rop_send_undo(struct rop *op);
void rop_fail(struct rop *op);
void rop_maybe_free(struct rop *op);
void rop_flush_parked(struct rconn *c);
void rop_timers_new(struct store_redis *s);
void rop_free_all(struct store_redis *s);

/* giveback.c */
struct rs_giveback *gb_find(struct store_redis *s, const char *token);
void gb_free(struct rs_giveback *e);
void gb_remember(struct rop *op);
void gb_send(struct rs_giveback *e);
bool gb_wants(const struct rconn *c);
void gb_flush(struct rconn *c);

/* cluster.c */
unsigned rs_keyslot(const char *key, size_t n);

#endif
