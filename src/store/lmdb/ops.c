/* ops.c — the LMDB store as seen by one worker (struct store_lmdb,
 * store.h): the struct store_ops table, each operation run in one short
 * write transaction on the worker's thread and its answer deferred onto
 * the worker's event_base through a zero-delay event (callbacks never
 * fire from inside the call that started them), the recycling of
 * finished ops, and the periodic timer that sweeps expired entries in
 * small bounded transactions.
 *
 * Why on the worker's thread: a transaction here is a few B-tree pages
 * touched in memory (microseconds); with lmdb.sync "fsync" its commit
 * also waits for the disk, which is the price that setting asks for
 * (docs/stores.md has the numbers).
 *
 * Owns the struct store_lmdb, its pending and cached ops with their
 * events, and a replayed record's copy until its callback returns. Does
 * not own the environment (borrowed: it must outlive the store). */
#include "internal.h"

#include "idemgate/core/clock.h"
#include "idemgate/core/log.h"

#include <event2/event.h>
#include <string.h>
#include <sys/queue.h>

#define LM_OP_CACHE 64

enum lm_op_kind { LM_OP_DONE, LM_OP_ACQUIRE, LM_OP_LIMIT };

/* One operation waiting for its deferred callback. Owned by its store:
 * in s->ops while pending, in s->free_ops once recycled. */
struct lm_op {
    TAILQ_ENTRY(lm_op) link;
    struct store_lmdb *s;
    struct event *ev;
    enum lm_op_kind kind;
    store_acquire_cb acq_cb;
    store_done_cb done_cb;
    store_limit_cb limit_cb;
    void *arg;
    struct store_acquire_reply reply;
    struct store_limit_reply limit;
    uint8_t *record; /* owned copy behind reply.record */
    int status;
};

/* The LMDB backend's struct store, one per worker, used on its thread
 * only. Created by store_lmdb_new, freed by store_free. */
struct store_lmdb {
    struct store base; /* first */
    struct event_base *evb;
    struct store_lmdb_env *env;
    struct event *tick;
    TAILQ_HEAD(, lm_op) ops;
    TAILQ_HEAD(, lm_op) free_ops;
    unsigned n_free_ops;
    int firing;
    bool dead;
    uint64_t error_logged_ms;
};

static void lm_op_free(struct lm_op *op)
{
    if (op->ev) event_free(op->ev);
    free(op->record);
    free(op);
}

static void lm_op_recycle(struct lm_op *op)
{
    struct store_lmdb *s = op->s;
    if (s->n_free_ops >= LM_OP_CACHE) {
        lm_op_free(op);
        return;
    }
    free(op->record);
    struct event *ev = op->ev;
    memset(op, 0, sizeof(*op));
    op->s = s;
    op->ev = ev;
    TAILQ_INSERT_HEAD(&s->free_ops, op, link);
    s->n_free_ops++;
}

static void lm_store_destroy(struct store_lmdb *s)
{
    struct lm_op *op;
    while ((op = TAILQ_FIRST(&s->free_ops))) {
        TAILQ_REMOVE(&s->free_ops, op, link);
        lm_op_free(op);
    }
    event_free(s->tick);
    free(s);
}

static void lm_op_fire(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    struct lm_op *op = arg;
    struct store_lmdb *s = op->s;
    TAILQ_REMOVE(&s->ops, op, link); /* first: a store_free inside must not see it */
    s->firing++;
    switch (op->kind) {
    case LM_OP_ACQUIRE:
        op->acq_cb(op->arg, &op->reply);
        break;
    case LM_OP_LIMIT:
        op->limit_cb(op->arg, &op->limit);
        break;
    case LM_OP_DONE:
        op->done_cb(op->arg, op->status);
        break;
    }
    s->firing--;
    if (s->dead) {
        lm_op_free(op);
        if (s->firing == 0) lm_store_destroy(s);
        return;
    }
    lm_op_recycle(op);
}

static struct lm_op *lm_op_new(struct store_lmdb *s)
{
    struct lm_op *op = TAILQ_FIRST(&s->free_ops);
    if (op) {
        TAILQ_REMOVE(&s->free_ops, op, link);
        s->n_free_ops--;
        return op;
    }
    op = lm_alloc(sizeof(*op));
    op->s = s;
    op->ev = event_new(s->evb, -1, 0, lm_op_fire, op);
    if (!op->ev) abort();
    return op;
}

static void lm_op_defer(struct lm_op *op)
{
    TAILQ_INSERT_TAIL(&op->s->ops, op, link);
    event_active(op->ev, EV_TIMEOUT, 1);
}

/* An LMDB error: logged at most every 10 s per worker, and the operation
 * answers as a store error. */
static void lm_failed(struct store_lmdb *s, const char *what, int rc)
{
    uint64_t now = lm_wall_ms();
    if (s->error_logged_ms && now - s->error_logged_ms < LM_WARN_EVERY_MS) return;
    s->error_logged_ms = now;
    log_msg(LOG_ERROR, "lmdb store: %s failed: %s (lmdb.path %s)", what, mdb_strerror(rc),
            s->env->path);
}

/* ---- operations ---- */

static void lm_acquire(struct store *base, const struct store_acquire_req *req, store_acquire_cb cb,
                       void *arg)
{
    struct store_lmdb *s = (struct store_lmdb *)base;
    struct lm_op *op = lm_op_new(s);
    op->kind = LM_OP_ACQUIRE;
    op->acq_cb = cb;
    op->arg = arg;
    struct lm_acq_args a = {req->skey, req->skey_len, req->fp, req->token, req->lock_ms, {0}, NULL};
    int rc = lm_run(s->env, lm_acquire_txn, &a);
    if (rc) {
        lm_failed(s, "acquire", rc);
        free(a.record);
        memset(&a.reply, 0, sizeof(a.reply));
        a.reply.state = STORE_ACQ_ERROR;
        a.record = NULL;
    }
    op->reply = a.reply;
    op->record = a.record;
    lm_op_defer(op);
}

static void lm_owned(struct store_lmdb *s, enum lm_owned_action action, const char *skey,
                     size_t skey_len, const char *token, const uint8_t *record, size_t record_len,
                     uint64_t after_ms, store_done_cb cb, void *arg)
{
    struct lm_op *op = lm_op_new(s);
    op->done_cb = cb;
    op->arg = arg;
    struct lm_owned_args a = {action, skey, skey_len, token, record, record_len, after_ms, -1};
    int rc = lm_run(s->env, lm_owned_txn, &a);
    if (rc) {
        lm_failed(s, "a lock's update", rc);
        a.status = -1;
    }
    op->status = a.status;
    lm_op_defer(op);
}

static void lm_complete(struct store *base, const char *skey, size_t skey_len,
                        const char token[STORE_TOKEN_LEN], const uint8_t *record, size_t record_len,
                        uint32_t ttl_seconds, store_done_cb cb, void *arg)
{
    lm_owned((struct store_lmdb *)base, LM_COMPLETE, skey, skey_len, token, record, record_len,
             (uint64_t)ttl_seconds * 1000u, cb, arg);
}

static void lm_release(struct store *base, const char *skey, size_t skey_len,
                       const char token[STORE_TOKEN_LEN], store_done_cb cb, void *arg)
{
    lm_owned((struct store_lmdb *)base, LM_RELEASE, skey, skey_len, token, NULL, 0, 0, cb, arg);
}

static void lm_renew(struct store *base, const char *skey, size_t skey_len,
                     const char token[STORE_TOKEN_LEN], uint32_t lock_ms, store_done_cb cb,
                     void *arg)
{
    lm_owned((struct store_lmdb *)base, LM_RENEW, skey, skey_len, token, NULL, 0, lock_ms, cb, arg);
}

/* The environment answers a read transaction. */
static void lm_ping(struct store *base, store_done_cb cb, void *arg)
{
    struct store_lmdb *s = (struct store_lmdb *)base;
    struct lm_op *op = lm_op_new(s);
    op->done_cb = cb;
    op->arg = arg;
    MDB_txn *t;
    int rc = mdb_txn_begin(s->env->env, NULL, MDB_RDONLY, &t);
    if (!rc) mdb_txn_abort(t);
    op->status = rc ? -1 : 1;
    lm_op_defer(op);
}

static void lm_limit(struct store *base, const char *scope, size_t scope_len,
                     const char token[STORE_TOKEN_LEN], const struct store_limit_args *a,
                     store_limit_cb cb, void *arg)
{
    struct store_lmdb *s = (struct store_lmdb *)base;
    struct lm_op *op = lm_op_new(s);
    op->kind = LM_OP_LIMIT;
    op->limit_cb = cb;
    op->arg = arg;
    struct lm_limit_args la = {scope, scope_len, token, a, false, 0, {0}, 0};
    int rc = lm_run(s->env, lm_limit_txn, &la);
    if (rc) {
        lm_failed(s, "limit", rc);
        memset(&la.reply, 0, sizeof(la.reply));
        la.reply.verdict = STORE_LIMIT_ERROR;
    }
    op->limit = la.reply;
    lm_op_defer(op);
}

static void lm_lease(struct store_lmdb *s, const char *scope, size_t scope_len, const char *token,
                     bool renew, uint32_t lease_ms, store_done_cb cb, void *arg)
{
    struct lm_op *op = lm_op_new(s);
    op->done_cb = cb;
    op->arg = arg;
    struct lm_limit_args la = {scope, scope_len, token, NULL, renew, lease_ms, {0}, 0};
    int rc = lm_run(s->env, lm_lease_txn, &la);
    if (rc) {
        lm_failed(s, "a slot's update", rc);
        la.status = -1;
    }
    op->status = la.status;
    lm_op_defer(op);
}

static void lm_limit_release(struct store *base, const char *scope, size_t scope_len,
                             const char token[STORE_TOKEN_LEN], store_done_cb cb, void *arg)
{
    lm_lease((struct store_lmdb *)base, scope, scope_len, token, false, 0, cb, arg);
}

static void lm_limit_renew(struct store *base, const char *scope, size_t scope_len,
                           const char token[STORE_TOKEN_LEN], uint32_t lease_ms, store_done_cb cb,
                           void *arg)
{
    lm_lease((struct store_lmdb *)base, scope, scope_len, token, true, lease_ms, cb, arg);
}

static void lm_free(struct store *base)
{
    struct store_lmdb *s = (struct store_lmdb *)base;
    struct lm_op *op;
    while ((op = TAILQ_FIRST(&s->ops))) {
        TAILQ_REMOVE(&s->ops, op, link);
        lm_op_free(op);
    }
    if (s->firing > 0) {
        s->dead = true;
        return;
    }
    lm_store_destroy(s);
}

static const struct store_ops lm_ops = {
    .name = "lmdb",
    .acquire = lm_acquire,
    .complete = lm_complete,
    .release = lm_release,
    .renew = lm_renew,
    .ping = lm_ping,
    .limit = lm_limit,
    .limit_release = lm_limit_release,
    .limit_renew = lm_limit_renew,
    .free = lm_free,
};

/* ---- the sweep ---- */

static int lm_sweep_txn(struct lm_txn *x, void *arg)
{
    *(size_t *)arg = lm_sweep(x, LM_SWEEP_BATCH);
    return x->err;
}

/* Expired entries and limits, LM_SWEEP_BATCH per transaction (so that no
 * writer waits long behind it); again at once while a batch came full.
 * Also frees the reader slots of processes that died. */
static void lm_tick(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    struct store_lmdb *s = arg;
    size_t n = 0;
    int rc = lm_run(s->env, lm_sweep_txn, &n);
    if (rc) lm_failed(s, "the expiry sweep", rc);
    int dead = 0;
    mdb_reader_check(s->env->env, &dead);
    struct timeval tv = clock_tv(n >= LM_SWEEP_BATCH ? 10 : LM_TICK_MS);
    event_add(s->tick, &tv);
}

struct store *store_lmdb_new(struct event_base *base, struct store_lmdb_env *env)
{
    struct store_lmdb *s = lm_alloc(sizeof(*s));
    s->base.ops = &lm_ops;
    TAILQ_INIT(&s->ops);
    TAILQ_INIT(&s->free_ops);
    s->evb = base;
    s->env = env;
    s->tick = event_new(base, -1, 0, lm_tick, s);
    if (!s->tick) abort();
    struct timeval tv = clock_tv(LM_TICK_MS);
    event_add(s->tick, &tv);
    return &s->base;
}
