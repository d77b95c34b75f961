/* internal.h — what the files of the LMDB store (src/store/lmdb/) share,
 * and nothing else includes: the environment struct, the on-disk layout
 * of every sub-database, the write transaction's context and the
 * functions one file calls in another. The layout is described in
 * docs/stores.md (the LMDB store).
 *
 *   env.c     struct store_lmdb_env: opening (and refusing) an
 *             environment, -t's path check, stats, the admin's key API
 *   txn.c     a write transaction with the store's totals; entries,
 *             scopes, the indexes, room and eviction, the expiry sweep
 *   keys.c    the operations' decisions on one key (acquire; complete,
 *             release, renew of an owned lock)
 *   limits.c  the limits (store_limit): GCRA and leased slots per scope
 *   ops.c     struct store_lmdb (one per loop): the ops table, replays
 *             read lock-free, the loop's batch of writes (sync "os"),
 *             callbacks deferred onto the loop's base, the sweep timer
 *   writer.c  the writer thread of sync "fsync": group commit
 *
 * Threads: with sync "os" every worker runs its own transactions (the
 * writes of one turn of its loop in one); LMDB serializes the writers
 * (across processes too) and lets readers run beside them. With sync
 * "fsync" the write operations go to the process's one
 * writer thread instead, which runs all that queued up meanwhile in one
 * transaction and one flush (docs/stores.md). Owns nothing. */
#ifndef IDEMGATE_STORE_LMDB_INTERNAL_H
#define IDEMGATE_STORE_LMDB_INTERNAL_H

#include "idemgate/core/clock.h"
#include "idemgate/store/store.h"

#include <lmdb.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/queue.h>

/* The layout's name, kept in the meta database: another one is refused. */
#define LM_LAYOUT "idemgate-lmdb-1"
#define LM_VERSION 1
/* Longest entry key kept as it is; a longer skey is cut and hashed (the
 * full skey is in the value and compared). LMDB's keys stop at 511. */
#define LM_KEY_MAX 400
#define LM_KEY_CUT 360
/* A scope name is at most this long in the per-scope bookkeeping. */
#define LM_SCOPE_MAX 200
/* Charged per entry beyond its key and value: LMDB's node headers in the
 * three databases that name it, and its index keys' fixed parts. */
#define LM_ENTRY_OVERHEAD 96
#define LM_DONE_OVERHEAD 48
#define LM_LIMIT_OVERHEAD 64
/* Expired entries one sweep transaction removes at most. */
#define LM_SWEEP_BATCH 256
/* Expired entries looked at before refusing room. */
#define LM_FULL_SWEEP 64
#define LM_TICK_MS 1000
#define LM_WARN_EVERY_MS 10000

struct lm_txn;
struct lm_job;
struct lm_acq_args;

/* The process's handle on one environment (store.h). Created by
 * store_lmdb_env_open, freed by store_lmdb_env_free after every store on
 * it. Owns the MDB_env and the path. */
struct store_lmdb_env {
    MDB_env *env;
    MDB_dbi entries, scopes, done, heap, expiry, limits, meta;
    char *path; /* realpath of lmdb.path */
    uint64_t max_bytes;
    uint64_t budget; /* what may be charged: a part of max_bytes, the rest is LMDB's */
    _Atomic uint64_t max_scope_bytes;
    bool fsync;
    /* this process's counts (the shared ones are in the totals) */
    _Atomic uint64_t evict_logged_ms, refuse_logged_ms;
    /* the writer thread (sync "fsync"; writer.c): its queue under mu */
    bool writer_started;
    _Atomic bool unsynced; /* a commit since the writer's last flush */
    pthread_t writer;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    TAILQ_HEAD(, lm_job) jobs;
    bool stop;
};

/* One write operation in a batch (lm_run_batch): its loop's (sync "os",
 * ops.c) or the writer thread's (sync "fsync"). fn runs on args in the
 * batch's transaction (or alone, again, when the batch failed); rc is its
 * result once committed (and flushed). With the writer thread, land is
 * then called on that thread to hand it back to its loop. */
struct lm_job {
    TAILQ_ENTRY(lm_job) link;
    int (*fn)(struct lm_txn *x, void *arg);
    void *args;
    int rc;
    void (*land)(struct lm_job *j);
};

/* ---- writer.c ---- */

/* Starts e's writer thread (sync "fsync"): 0, or an errno. */
int lm_writer_start(struct store_lmdb_env *e);
/* Runs every job queued, then stops and joins the thread. */
void lm_writer_stop(struct store_lmdb_env *e);
/* Queues j; its land is called once it is committed and flushed. */
void lm_writer_submit(struct store_lmdb_env *e, struct lm_job *j);

/* The value of an entry: this header, the skey, then the record. */
struct lm_hdr {
    uint8_t version;
    uint8_t completed;
    uint16_t pad;
    uint32_t skey_len;
    uint64_t expires_ms; /* wall clock */
    uint64_t created_ms;
    uint64_t seq; /* completion order (completed only) */
    uint8_t fp[STORE_FP_LEN];
    char token[STORE_TOKEN_LEN]; /* in progress: the owner */
};
_Static_assert(sizeof(struct lm_hdr) == 80, "the on-disk header");

/* A scope's bookkeeping (the scopes database: scope -> this). */
struct lm_scope {
    uint64_t bytes;      /* charged: its entries */
    uint64_t done_bytes; /* of which its completed records */
    uint64_t entries;
    uint64_t completed;
};

/* The whole store's counts (meta "totals"), shared by every process. */
struct lm_totals {
    uint64_t bytes; /* entries and limits */
    uint64_t done_bytes;
    uint64_t entries;
    uint64_t completed;
    uint64_t scopes;
    uint64_t seq;
    uint64_t evictions;
    uint64_t expired;
    uint64_t refused;
    uint64_t limit_bytes;
};

TAILQ_HEAD(lm_jobq, lm_job);

/* One write transaction with the totals read at its start. */
struct lm_txn {
    struct store_lmdb_env *e;
    MDB_txn *t;
    struct lm_totals tot;
    uint64_t now;     /* wall clock ms */
    bool dirty;       /* something was written: commit, else abort */
    int err;          /* the first LMDB error (MDB_MAP_FULL makes room and retries) */
    uint64_t evicted; /* by this transaction */
};

/* An entry found: its key, header and value (valid until the next write). */
struct lm_entry {
    char key[LM_KEY_MAX + 1];
    size_t key_len;
    struct lm_hdr h;
    const uint8_t *val; /* the whole value */
    size_t val_len;
};

static inline void *lm_alloc(size_t n)
{
    void *p = calloc(1, n ? n : 1);
    if (!p) abort();
    return p;
}

size_t lm_scope_len(const char *skey, size_t len);

/* ---- txn.c ---- */

/* Runs fn in a write transaction (committed when it wrote something):
 * 0, or an LMDB error. When LMDB's map is full, evicts the oldest
 * completed records of the largest scopes and runs fn once more. */
int lm_run(struct store_lmdb_env *e, int (*fn)(struct lm_txn *x, void *arg), void *arg);
/* Runs every job of q in one write transaction (committed when one
 * wrote something); when that fails (an LMDB error, a full map), each
 * job again in its own (lm_run). Sets each job's rc. */
void lm_run_batch(struct store_lmdb_env *e, struct lm_jobq *q);
/* The entry key of skey into out (LM_KEY_MAX + 1 bytes); its length. */
size_t lm_entry_key(const char *skey, size_t len, char *out);
/* The entry at key as stored (live or not): 1, 0 none, -1 an error. */
int lm_entry_raw(struct lm_txn *x, const char *key, size_t klen, struct lm_entry *out);
/* The live entry of skey (an expired one is removed first): 1, 0 none. */
int lm_entry_find(struct lm_txn *x, const char *skey, size_t len, struct lm_entry *out);
/* Writes an entry (key, header, skey, record) and its expiry index. */
int lm_entry_put(struct lm_txn *x, const struct lm_entry *en, const char *skey, const uint8_t *rec,
                 size_t rec_len);
/* A completed record's place in its scope's order of completions. */
void lm_done_put(struct lm_txn *x, const char *scope, size_t slen, uint64_t seq, const char *key,
                 size_t klen);
/* Removes an entry and everything that names it, uncharging its scope. */
void lm_drop(struct lm_txn *x, const struct lm_entry *en, const char *skey);
/* What an entry is charged. */
uint64_t lm_entry_cost(size_t key_len, size_t skey_len, size_t rec_len, bool completed,
                       size_t scope_len);
/* Charges (or, negative, uncharges) a scope and the totals. */
void lm_charge(struct lm_txn *x, const char *scope, size_t scope_len, int64_t bytes,
               int64_t done_bytes, int64_t entries, int64_t completed);
/* Room for need more bytes in scope: 0, or -1 (only locks left). */
int lm_make_room(struct lm_txn *x, const char *scope, size_t scope_len, uint64_t need);
/* Room for need more bytes in the store (limits): 0 or -1. */
int lm_evict_for(struct lm_txn *x, uint64_t need);
/* Adds or removes an expiry index key: type 'E' (entry) or 'L' (limit). */
void lm_expiry_put(struct lm_txn *x, uint64_t at, char type, const char *name, size_t len);
void lm_expiry_del(struct lm_txn *x, uint64_t at, char type, const char *name, size_t len);
/* Removes up to n expired entries and limits; how many it removed. */
size_t lm_sweep(struct lm_txn *x, size_t n);
bool lm_scope_get(struct lm_txn *x, const char *scope, size_t len, struct lm_scope *out);
/* A write (put or del) noted: dirty, or the error kept. */
void lm_note(struct lm_txn *x, int rc);

/* ---- keys.c ---- */

int lm_acquire_txn(struct lm_txn *x, void *arg);
/* An acquire answered by a look in the read transaction t (lock-free, no
 * write, no flush): 1 when skey holds a live entry (completed, in
 * progress, or another fingerprint's), with a->reply filled; 0 when only
 * a write can decide (absent or expired), or on an error. */
int lm_acquire_peek(struct store_lmdb_env *e, MDB_txn *t, struct lm_acq_args *a);
int lm_owned_txn(struct lm_txn *x, void *arg);

/* The arguments and answer of an acquire (keys.c). */
struct lm_acq_args {
    const char *skey;
    size_t skey_len;
    const uint8_t *fp;
    const char *token;
    uint32_t lock_ms;
    struct store_acquire_reply reply;
    uint8_t *record; /* malloc'd copy behind reply.record */
};

enum lm_owned_action { LM_COMPLETE, LM_RELEASE, LM_RENEW };

struct lm_owned_args {
    enum lm_owned_action action;
    const char *skey;
    size_t skey_len;
    const char *token;
    const uint8_t *record;
    size_t record_len;
    uint64_t after_ms;
    int status;
};

/* ---- limits.c ---- */

struct lm_limit_args {
    const char *scope;
    size_t scope_len;
    const char *token;
    const struct store_limit_args *a; /* NULL: a lease (release or renew) */
    bool renew;
    uint32_t lease_ms;
    struct store_limit_reply reply;
    int status;
};

int lm_limit_txn(struct lm_txn *x, void *arg);
int lm_lease_txn(struct lm_txn *x, void *arg);
/* Reaps the limit of scope: drops lapsed leases, and the whole limit once
 * nothing of it is live (the sweep). */
void lm_limit_reap(struct lm_txn *x, const char *scope, size_t len);

#endif
