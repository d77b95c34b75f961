/* store.h — the idempotency state store: an interface of asynchronous
 * operations, with three backends (Redis, memory, LMDB) behind a table of function
 * pointers (as Redis does with ConnectionType).
 *
 * One struct store per worker thread, bound to that worker's event_base.
 * A store knows records, keys and owner tokens; it knows nothing of HTTP.
 *
 * State of one (scope, key): absent, or IN PROGRESS {token, fingerprint,
 * expires after lock_ms}, or COMPLETED {fingerprint, record bytes, expires
 * after ttl}. All of it lives under one backend key,
 * "<key_prefix>{<skey>}" where skey = "<scope>:<key>" (the hash tag keeps
 * it on one Redis Cluster slot).
 *
 * Callback rules (both backends):
 *  - every operation's callback fires exactly once, never synchronously
 *    from inside the call that started it;
 *  - every operation carries a deadline (redis.timeout_ms): if the backend
 *    has not answered by then, the callback fires with STORE_ERROR and a
 *    late reply is dropped;
 *  - pointers handed to a callback are borrowed until it returns;
 *  - all arguments passed to an operation are copied by the call (borrowed
 *    only until it returns); arg is the caller's, handed back untouched
 *    to its callback and never freed by the store.
 *
 * Ownership: whoever creates a store (store_memory_new, store_redis_new)
 * owns it and frees it with store_free, on the thread of its event_base
 * and before that base is freed. */
#ifndef IDEMGATE_STORE_H
#define IDEMGATE_STORE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct event_base;
struct cfg;
struct tls_set;
struct store;

#define STORE_TOKEN_LEN 32 /* owner token: 32 hex chars */
#define STORE_FP_LEN 16    /* fingerprint: 16 raw bytes (XXH3-128) */

enum store_acquire_state {
    STORE_ACQ_LOCKED,      /* absent -> now in progress, owned by our token */
    STORE_ACQ_IN_PROGRESS, /* someone else holds it, same fingerprint */
    STORE_ACQ_MISMATCH,    /* in progress or completed with another fingerprint */
    STORE_ACQ_COMPLETED,   /* completed, same fingerprint: record is set */
    STORE_ACQ_ERROR        /* unreachable, timed out, or a bad reply */
};

/* The rate and concurrency limits of one scope (docs/configuration.md,
 * ratelimit), checked in one atomic step in the store, so that any number
 * of instances sharing it hold one limit. */
struct store_limit_args {
    uint32_t requests;   /* per window (GCRA: a burst of `requests`, then a smooth
                            refill); 0: no rate limit */
    uint32_t window_ms;  /* at least 1000 */
    uint32_t concurrent; /* slots; 0: no concurrency limit */
    bool take_slot;      /* take a slot for the token (a lease of lease_ms) */
    uint32_t lease_ms;   /* a slot's lease: renewed with store_limit_renew */
};

enum store_limit_verdict {
    STORE_LIMIT_ALLOWED,     /* counted (and the slot taken, when asked) */
    STORE_LIMIT_RATE,        /* over the rate: nothing counted, no slot */
    STORE_LIMIT_CONCURRENCY, /* counted against the rate, but no slot free */
    STORE_LIMIT_ERROR        /* unreachable, timed out, or a bad reply */
};

struct store_limit_reply {
    enum store_limit_verdict verdict;
    uint32_t remaining; /* requests still allowed right after this one (rate limit on) */
    uint32_t reset_ms;  /* until the whole allowance of `requests` is back */
    uint32_t retry_ms;  /* STORE_LIMIT_RATE: until the next request would pass */
};

typedef void (*store_limit_cb)(void *arg, const struct store_limit_reply *reply);

/* One acquire: the key's lock and, when limits are given, the scope's
 * rate and concurrency limits checked with it (store_acquire sends both at
 * once: in one write to a standalone Redis, to their two nodes at the same
 * time on a cluster, whose slots differ). Borrowed for the call. */
struct store_acquire_req {
    const char *skey; /* "<scope>:<key>" */
    size_t skey_len;
    const uint8_t *fp; /* STORE_FP_LEN bytes */
    const char *token; /* STORE_TOKEN_LEN chars: the lock's owner, and the slot's */
    uint32_t lock_ms;
    const struct store_limit_args *limits; /* NULL: none */
    const char *scope;                     /* the limits' scope */
    size_t scope_len;
};

struct store_acquire_reply {
    enum store_acquire_state state;
    /* COMPLETED only: the encoded record, borrowed until the callback
     * returns (copy it to keep it). */
    const uint8_t *record;
    size_t record_len;
    /* the limits' verdict (the request's limits; ALLOWED, zeros, without) */
    struct store_limit_reply limit;
};

typedef void (*store_acquire_cb)(void *arg, const struct store_acquire_reply *reply);
/* status: 1 done (the token matched), 0 not done (no such key or another
 * owner's token), -1 store error or timeout. */
typedef void (*store_done_cb)(void *arg, int status);

struct store_ops {
    const char *name;
    /* The lock only: store_acquire adds the limits (req->limits is not
     * read here). */
    void (*acquire)(struct store *s, const struct store_acquire_req *req, store_acquire_cb cb,
                    void *arg);
    void (*complete)(struct store *s, const char *skey, size_t skey_len,
                     const char token[STORE_TOKEN_LEN], const uint8_t *record, size_t record_len,
                     uint32_t ttl_seconds, store_done_cb cb, void *arg);
    void (*release)(struct store *s, const char *skey, size_t skey_len,
                    const char token[STORE_TOKEN_LEN], store_done_cb cb, void *arg);
    void (*renew)(struct store *s, const char *skey, size_t skey_len,
                  const char token[STORE_TOKEN_LEN], uint32_t lock_ms, store_done_cb cb, void *arg);
    /* status 1 when the backend answered, -1 otherwise. */
    void (*ping)(struct store *s, store_done_cb cb, void *arg);
    /* The limits of scope (its "<scope>" as in skeys, bounded to 200
     * bytes): first the rate (GCRA on the store's own clock: Redis TIME,
     * or the process's monotonic clock for the memory store), then, when
     * a->take_slot and a->concurrent, a slot: expired leases are dropped,
     * and a free slot is leased to token for a->lease_ms. */
    void (*limit)(struct store *s, const char *scope, size_t scope_len,
                  const char token[STORE_TOKEN_LEN], const struct store_limit_args *a,
                  store_limit_cb cb, void *arg);
    /* Gives token's slot back (status 1), or finds none (0). */
    void (*limit_release)(struct store *s, const char *scope, size_t scope_len,
                          const char token[STORE_TOKEN_LEN], store_done_cb cb, void *arg);
    /* Extends token's lease to lease_ms from now (1), or finds none (0). */
    void (*limit_renew)(struct store *s, const char *scope, size_t scope_len,
                        const char token[STORE_TOKEN_LEN], uint32_t lease_ms, store_done_cb cb,
                        void *arg);
    /* Frees the store. Operations still in flight are dropped without
     * their callback: free a store only when its worker has no exchange
     * left (or the process is exiting). */
    void (*free)(struct store *s);
};

/* Every backend's struct starts with this. */
struct store {
    const struct store_ops *ops;
};

/* Thin wrappers over the ops table. */
/* The lock, and the limits with it when req->limits: one callback with
 * both answers (the record borrowed as for the lock alone). */
void store_acquire(struct store *s, const struct store_acquire_req *req, store_acquire_cb cb,
                   void *arg);
void store_complete(struct store *s, const char *skey, size_t skey_len,
                    const char token[STORE_TOKEN_LEN], const uint8_t *record, size_t record_len,
                    uint32_t ttl_seconds, store_done_cb cb, void *arg);
void store_release(struct store *s, const char *skey, size_t skey_len,
                   const char token[STORE_TOKEN_LEN], store_done_cb cb, void *arg);
void store_renew(struct store *s, const char *skey, size_t skey_len,
                 const char token[STORE_TOKEN_LEN], uint32_t lock_ms, store_done_cb cb, void *arg);
void store_ping(struct store *s, store_done_cb cb, void *arg);
void store_limit(struct store *s, const char *scope, size_t scope_len,
                 const char token[STORE_TOKEN_LEN], const struct store_limit_args *a,
                 store_limit_cb cb, void *arg);
void store_limit_release(struct store *s, const char *scope, size_t scope_len,
                         const char token[STORE_TOKEN_LEN], store_done_cb cb, void *arg);
void store_limit_renew(struct store *s, const char *scope, size_t scope_len,
                       const char token[STORE_TOKEN_LEN], uint32_t lease_ms, store_done_cb cb,
                       void *arg);
/* Frees s (NULL: nothing), through its ops table. */
void store_free(struct store *s);

/* The admin API's view of one key: what it holds, found by its skey
 * "<scope>:<key>" exactly, or (scope_prefix) by a scope that starts with
 * the given one (the 16 hex digits an access line shows) and the same key.
 * Strings are owned by the struct: free with store_key_info_free. */
struct store_key_info {
    int found;      /* 1, 0 (none), -1 (the store failed) */
    bool completed; /* else a lock in progress */
    uint8_t fp[STORE_FP_LEN];
    uint64_t created_ms; /* wall clock, 0 when the store does not know */
    int64_t ttl_ms;      /* -1 when unknown */
    uint8_t *record;     /* completed: the encoded record */
    size_t record_len;
    char *skey; /* the full skey found */
    size_t skey_len;
};
void store_key_info_free(struct store_key_info *k);
/* info is borrowed until the callback returns. */
typedef void (*store_key_cb)(void *arg, const struct store_key_info *info);
/* Redis backend: the admin API's view of one key (see struct
 * store_key_info), and with forget it is deleted (DEL) in the same atomic
 * step. A scope prefix is found with SCAN MATCH over the whole database
 * (every master of a cluster): as costly as a SCAN, within
 * redis.timeout_ms. skey is copied. */
void store_redis_key(struct store *s, const char *skey, size_t skey_len, bool scope_prefix,
                     bool forget, store_key_cb cb, void *arg);

/* Memory backend (src/store/memory/; its internal.h says which file does
 * what): one shared table (mutex-protected) for the whole process, one
 * struct store per worker that defers callbacks onto its own base.
 *
 * max_bytes (memory.max_bytes; 0 = no limit) bounds everything the table
 * holds: each entry is charged its struct, key, record and allocator
 * overhead, and the bucket arrays and scope bookkeeping are charged too.
 * Every entry is also charged to its scope (the part of the skey before
 * its first ':', all of it without one), and max_scope_bytes
 * (memory.max_scope_bytes; 0 = no limit of its own, so a scope may take
 * up to max_bytes) bounds what one scope holds, locks included.
 *
 * Room for a new lock or a record is made by evicting completed records,
 * never locks: past max_scope_bytes that scope's own oldest completions
 * go first; past max_bytes the scope holding the most bytes (of those
 * holding a completed record) loses its oldest completion, again and
 * again. When locks alone leave no room (in the scope or in the store) the
 * operation answers STORE_ACQ_ERROR / -1 and nothing is evicted for it (a
 * complete that fails so leaves its lock to expire). Every eviction is
 * counted (idemgate_store_evictions_total). A scope's bookkeeping is
 * freed as soon as it holds nothing. Keys and scopes are hashed with
 * SipHash-1-3 under a random key drawn here (RAND_bytes). */
struct store_memory_shared;
/* A new, empty table; key_prefix is copied (NULL: ""). The caller owns
 * it and frees it with store_memory_shared_free. Never fails (aborts when
 * out of memory or of random bytes). */
struct store_memory_shared *store_memory_shared_new_bounded(const char *key_prefix,
                                                            uint64_t max_bytes,
                                                            uint64_t max_scope_bytes);
/* The same with no per-scope limit (max_scope_bytes 0). */
struct store_memory_shared *store_memory_shared_new(const char *key_prefix, uint64_t max_bytes);
/* New bounds (a reload): what is held above them now goes as new entries
 * need room, by the same eviction rules. Any thread. */
void store_memory_shared_set_bounds(struct store_memory_shared *sh, uint64_t max_bytes,
                                    uint64_t max_scope_bytes);
/* Frees the table and every entry in it (NULL: nothing). Free every
 * store made on it (store_free) first. */
void store_memory_shared_free(struct store_memory_shared *sh);

/* The admin API on the shared table, under its mutex, from any thread:
 * fills out (see struct store_key_info; skey borrowed for the call) and,
 * with forget, drops what it found. */
void store_memory_shared_key(struct store_memory_shared *sh, const char *skey, size_t skey_len,
                             bool scope_prefix, bool forget, struct store_key_info *out);

/* A snapshot of the shared table, taken under its mutex (from any
 * thread) into the caller's out. */
struct store_memory_stats {
    uint64_t max_bytes;       /* the limit, 0 = none */
    uint64_t max_scope_bytes; /* the limit of one scope, 0 = none */
    uint64_t bytes;           /* everything charged: entries, scopes, bucket arrays, heap */
    uint64_t entry_bytes;     /* entries only */
    size_t entries;           /* locks + completed */
    size_t locks;
    size_t completed;
    size_t buckets;       /* slots in the key table (both tables while it rehashes) */
    size_t scopes;        /* scopes holding at least one entry */
    uint64_t scope_bytes; /* their bookkeeping */
    uint64_t evictions;   /* completed records evicted to make room */
    uint64_t expired;     /* entries reclaimed after their expiry */
    uint64_t refused;     /* acquires/completes refused: only locks left */
};
void store_memory_shared_stats(struct store_memory_shared *sh, struct store_memory_stats *out);
/* The bytes charged to one scope (its name: the skey part before ':',
 * borrowed for the call), 0 when it holds nothing. Any thread. */
uint64_t store_memory_shared_scope_bytes(struct store_memory_shared *sh, const char *scope,
                                         size_t len);
/* One worker's store on the table: base and sh are borrowed, and both
 * must outlive the store (it answers on base; free it on base's thread).
 * The caller owns the store and frees it with store_free. timeout_ms is
 * kept for parity with Redis: every answer here is immediate. */
struct store *store_memory_new(struct event_base *base, struct store_memory_shared *sh,
                               int timeout_ms);

/* LMDB backend (src/store/lmdb/; its internal.h says which file does
 * what; docs/stores.md the layout): one environment (a directory holding
 * data.mdb and lock.mdb) opened once per process and shared by every
 * process that names the same path: records, locks and limits live in
 * the file, on the wall clock, and outlive the process. One struct store
 * per worker runs each operation in one short LMDB write transaction on
 * the worker's thread (LMDB serializes writers across threads and
 * processes) and defers its callback onto the worker's base.
 *
 * Bounds and eviction are the memory store's (see above), with
 * max_bytes the LMDB map size: what entries and limits are charged is
 * kept under half of it, the rest is left to LMDB's own pages (B-tree
 * slack, copy-on-write, free pages); should LMDB still find its map full,
 * the largest scopes' oldest completed records are evicted and the
 * operation is run once more. */
struct store_lmdb_env;
struct store_lmdb_opts {
    const char *path;         /* the directory (created when missing) */
    uint64_t max_bytes;       /* the map size */
    uint64_t max_scope_bytes; /* 0: no bound of its own */
    bool fsync;               /* flush every commit (else MDB_NOSYNC: the OS's page cache) */
};
/* Opens (creating when missing) the environment at o->path: 0 with *out
 * (the caller frees it with store_lmdb_env_free), or -1 with one line in
 * err naming lmdb.path (a directory that cannot be made, a file that is
 * not an LMDB environment or holds another program's databases, data
 * above max_bytes). o is borrowed for the call. */
int store_lmdb_env_open(const struct store_lmdb_opts *o, struct store_lmdb_env **out, char *err,
                        size_t errlen);
/* -t's check: path can be created (it is, when missing) and written: 0,
 * or -1 with "cannot ...: why" in err. */
int store_lmdb_check_path(const char *path, char *err, size_t errlen);
/* The environment's directory, resolved (realpath): borrowed from env. */
const char *store_lmdb_env_path(const struct store_lmdb_env *env);
/* A reload's new per-scope bound. Any thread. */
void store_lmdb_env_set_scope_bound(struct store_lmdb_env *env, uint64_t max_scope_bytes);
/* Frees env (NULL: nothing); free every store made on it first. */
void store_lmdb_env_free(struct store_lmdb_env *env);
/* One worker's store on env (borrowed: it must outlive the store); the
 * caller owns it and frees it with store_free on base's thread. */
struct store *store_lmdb_new(struct event_base *base, struct store_lmdb_env *env);
/* The admin API on the environment, from any thread, as
 * store_memory_shared_key (a scope prefix walks every entry). */
void store_lmdb_key(struct store_lmdb_env *env, const char *skey, size_t skey_len,
                    bool scope_prefix, bool forget, struct store_key_info *out);
/* What the environment holds (every process's), read in one read
 * transaction. */
struct store_lmdb_stats {
    uint64_t max_bytes;       /* the map size */
    uint64_t max_scope_bytes; /* 0 = none */
    uint64_t bytes;           /* charged: entries and limits */
    uint64_t file_bytes;      /* LMDB's pages in use (up to the last page written) */
    size_t entries, locks, completed, scopes;
    uint64_t evictions, expired, refused;
};
void store_lmdb_stats(struct store_lmdb_env *env, struct store_lmdb_stats *out);
/* The bytes charged to one scope (0 when it holds nothing). */
uint64_t store_lmdb_scope_bytes(struct store_lmdb_env *env, const char *scope, size_t len);

/* Redis backend: its own connections on base (net/conn, TLS for
 * rediss://), one native SET NX PX GET per acquire, short scripts for the
 * fenced complete / release / renew (SCRIPT LOAD, EVALSHA, reloaded on
 * NOSCRIPT), one deadline timer for every operation in flight, reconnect
 * with capped exponential backoff. cfg (redis.* settings) and tls (the
 * Redis context of a rediss:// url, tls_set_new; NULL without TLS) are
 * borrowed for the store's lifetime. Never fails: an unreachable Redis
 * only makes operations answer STORE_ACQ_ERROR / -1 until it is back.
 * An acquire that answered STORE_ACQ_ERROR after its script was sent may
 * still have taken the lock: the store gives such a lock back by itself
 * (release fenced by the token) as soon as Redis answers again. */
struct store *store_redis_new(struct event_base *base, const struct cfg *cfg,
                              const struct tls_set *tls);

#endif
