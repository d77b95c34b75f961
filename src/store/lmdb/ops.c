/* ops.c — the LMDB store as seen by one worker (struct store_lmdb,
 * store.h): the struct store_ops table; each acquire first looked at in a
 * read transaction (a replay, a 409, a mismatch answered lock-free);
 * the writes run in batches, one write transaction each: on the worker's
 * thread once the ready events have run (sync "os": microseconds), or on
 * the writer thread (sync "fsync", writer.c: its flush would stop this
 * loop); each answer deferred onto
 * the worker's event_base (store/answers.h: callbacks never fire from
 * inside the call that started them); and the periodic timer that sweeps
 * expired entries in small bounded transactions (docs/stores.md).
 *
 * Owns the struct store_lmdb and its operations (through its answers).
 * Does not own the environment (borrowed: it must outlive the store). */
#include "internal.h"

#include "idemgate/core/clock.h"
#include "idemgate/core/log.h"
#include "idemgate/store/answers.h"

#include <event2/event.h>
#include <stddef.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/queue.h>
#include <unistd.h>

/* One operation: its answer (first), its arguments, its run (inline, or
 * on the writer thread). Owned by its store's answers (store/answers.h);
 * with the writer thread, counted in s->in_writer until it lands in
 * s->landed. */
struct lm_op {
    struct store_answer ans; /* first */
    /* the run: its arguments, what makes the answer of its result */
    union {
        struct lm_acq_args acq;
        struct lm_owned_args owned;
        struct lm_limit_args lim;
    } a;
    struct store_limit_args limit_args;
    void (*finish)(struct lm_op *op, int rc);
    struct lm_job job;
    /* copies of the caller's strings and record, for the write that runs
     * after the call (kept while the answer is kept for the next one) */
    uint8_t *bytes;
    size_t bytes_cap;
};

/* The LMDB backend's struct store, one per worker, used on its thread
 * only (but for landed, in_writer and wake_fd, which the writer thread
 * reaches under mu). Created by store_lmdb_new, freed by store_free. */
struct store_lmdb {
    struct store base; /* first */
    struct event_base *evb;
    struct store_lmdb_env *env;
    struct event *tick;
    struct store_answers answers;
    uint64_t error_logged_ms;
    /* the writer thread's answers (sync "fsync") */
    pthread_mutex_t mu;
    pthread_cond_t cv; /* in_writer came down to 0 */
    struct store_answer_list landed;
    unsigned in_writer;
    int wake_fd; /* an eventfd: something landed */
    struct event *wake;
    MDB_txn *rtxn; /* reset between uses */
    /* sync "os": the writes this loop queued since its last batch ran */
    struct lm_jobq batch;
    struct event *run_batch;
};

static struct store_lmdb *lm_store_of(const struct lm_op *op)
{
    return (struct store_lmdb *)(void *)((char *)op->ans.q - offsetof(struct store_lmdb, answers));
}

static void lm_op_free_bytes(struct store_answer *a)
{
    free(((struct lm_op *)(void *)a)->bytes);
}

static void lm_store_destroy(struct store_lmdb *s)
{
    store_answers_free(&s->answers);
    event_free(s->tick);
    event_free(s->run_batch);
    if (s->wake) event_free(s->wake);
    if (s->rtxn) mdb_txn_abort(s->rtxn);
    if (s->wake_fd >= 0) close(s->wake_fd);
    pthread_cond_destroy(&s->cv);
    pthread_mutex_destroy(&s->mu);
    free(s);
}

/* The store was freed from inside a callback: now the last one returned. */
static void lm_answers_closed(struct store_answers *q)
{
    lm_store_destroy(
        (struct store_lmdb *)(void *)((char *)q - offsetof(struct store_lmdb, answers)));
}

static struct lm_op *lm_op_new(struct store_lmdb *s)
{
    return (struct lm_op *)(void *)store_answer_new(&s->answers);
}

static void lm_op_defer(struct lm_op *op)
{
    store_answer_defer(&op->ans);
}

/* An LMDB error: logged at most every 10 s per worker, and the operation
 * answers as a store error. */
static void lm_failed(struct store_lmdb *s, const char *what, int rc)
{
    uint64_t now = clock_wall_ms();
    if (s->error_logged_ms && now - s->error_logged_ms < LM_WARN_EVERY_MS) return;
    s->error_logged_ms = now;
    log_msg(LOG_ERROR, "lmdb store: %s failed: %s (lmdb.path %s)", what, mdb_strerror(rc),
            s->env->path);
}

/* ---- running an operation ---- */

/* Room for n bytes of copies in op (what the caller lent is copied there:
 * a write runs after the call, lm_op_run). */
static uint8_t *lm_op_bytes(struct lm_op *op, size_t n)
{
    if (n > op->bytes_cap) {
        free(op->bytes);
        op->bytes = lm_alloc(n);
        op->bytes_cap = n;
    }
    return op->bytes;
}

static struct lm_op *lm_op_of_job(struct lm_job *j)
{
    return (struct lm_op *)(void *)((char *)j - offsetof(struct lm_op, job));
}

/* On the writer thread: the operation is committed (and flushed); its
 * loop is woken to answer it. Under mu, so that a store being freed
 * (lm_free waits for in_writer to reach 0) is never written to after. */
static void lm_op_land(struct lm_job *j)
{
    struct lm_op *op = lm_op_of_job(j);
    struct store_lmdb *s = lm_store_of(op);
    pthread_mutex_lock(&s->mu);
    bool first = TAILQ_EMPTY(&s->landed);
    TAILQ_INSERT_TAIL(&s->landed, &op->ans, link);
    if (first) {
        uint64_t one = 1;
        if (write(s->wake_fd, &one, sizeof(one)) < 0) { /* the counter is already set */
        }
    }
    if (--s->in_writer == 0) pthread_cond_broadcast(&s->cv);
    pthread_mutex_unlock(&s->mu);
}

/* On the loop: what landed is answered (deferred like any answer). */
static void lm_wake(evutil_socket_t fd, short what, void *arg)
{
    (void)what;
    struct store_lmdb *s = arg;
    uint64_t n;
    if (read(fd, &n, sizeof(n)) < 0) { /* nothing to read: woken twice */
    }
    struct store_answer_list q = TAILQ_HEAD_INITIALIZER(q);
    pthread_mutex_lock(&s->mu);
    TAILQ_CONCAT(&q, &s->landed, link);
    pthread_mutex_unlock(&s->mu);
    struct store_answer *a;
    while ((a = TAILQ_FIRST(&q))) {
        TAILQ_REMOVE(&q, a, link);
        struct lm_op *op = (struct lm_op *)(void *)a;
        op->finish(op, op->job.rc);
        lm_op_defer(op);
    }
}

/* Sync "os", on the loop, once the events that were ready have run: every
 * write they queued, in one transaction (one commit's page and free-list
 * work for all of them), then each answered. */
static void lm_batch_run(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    struct store_lmdb *s = arg;
    if (TAILQ_EMPTY(&s->batch)) return; /* run already, by lm_free */
    struct lm_jobq q = TAILQ_HEAD_INITIALIZER(q);
    TAILQ_CONCAT(&q, &s->batch, link);
    lm_run_batch(s->env, &q);
    struct lm_job *j;
    while ((j = TAILQ_FIRST(&q))) {
        TAILQ_REMOVE(&q, j, link);
        struct lm_op *op = lm_op_of_job(j);
        op->finish(op, j->rc);
        lm_op_defer(op);
    }
}

/* Runs fn on op's arguments in a write transaction: with sync "os" on
 * this loop, in the batch of writes run once the ready events have run
 * (lm_batch_run); with "fsync" on the writer thread, whose flush would
 * otherwise stop this loop. Then finish makes the answer of fn's result
 * and the callback is deferred. Either way the run outlives the call:
 * the callers copy what they were lent. */
static void lm_op_run(struct lm_op *op, int (*fn)(struct lm_txn *x, void *arg), void *args,
                      void (*finish)(struct lm_op *op, int rc))
{
    struct store_lmdb *s = lm_store_of(op);
    op->finish = finish;
    op->job.fn = fn;
    op->job.args = args;
    if (!s->env->fsync) {
        if (TAILQ_EMPTY(&s->batch)) event_active(s->run_batch, EV_TIMEOUT, 1);
        TAILQ_INSERT_TAIL(&s->batch, &op->job, link);
        return;
    }
    op->job.land = lm_op_land;
    pthread_mutex_lock(&s->mu);
    s->in_writer++;
    pthread_mutex_unlock(&s->mu);
    lm_writer_submit(s->env, &op->job);
}

/* ---- operations ---- */

/* The store's read transaction, renewed (its reader slot kept between
 * uses): NULL when LMDB refused one. */
static bool lm_read_txn(struct store_lmdb *s)
{
    if (s->rtxn) return mdb_txn_renew(s->rtxn) == 0;
    if (mdb_txn_begin(s->env->env, NULL, MDB_RDONLY, &s->rtxn) == 0) return true;
    s->rtxn = NULL;
    return false;
}

static void lm_acquire_finish(struct lm_op *op, int rc)
{
    struct lm_acq_args *a = &op->a.acq;
    if (rc) {
        lm_failed(lm_store_of(op), "acquire", rc);
        free(a->record);
        memset(&a->reply, 0, sizeof(a->reply));
        a->reply.state = STORE_ACQ_ERROR;
        a->record = NULL;
    }
    op->ans.reply = a->reply;
    op->ans.record = a->record;
}

static void lm_acquire(struct store *base, const struct store_acquire_req *req, store_acquire_cb cb,
                       void *arg)
{
    struct store_lmdb *s = (struct store_lmdb *)base;
    struct lm_op *op = lm_op_new(s);
    op->ans.kind = STORE_ANSWER_ACQUIRE;
    op->ans.acq_cb = cb;
    op->ans.arg = arg;
    struct lm_acq_args *a = &op->a.acq;
    *a = (struct lm_acq_args){req->skey,    req->skey_len, req->fp, req->token,
                              req->lock_ms, {0},           NULL};
    /* A replay, a 409 or a mismatch is read, lock-free, on this loop:
     * only an acquire that may write takes LMDB's one writer lock (and,
     * with sync "fsync", goes to the writer thread). */
    if (lm_read_txn(s)) {
        int found = lm_acquire_peek(s->env, s->rtxn, a);
        mdb_txn_reset(s->rtxn);
        if (found) {
            lm_acquire_finish(op, 0);
            lm_op_defer(op);
            return;
        }
    }
    uint8_t *b = lm_op_bytes(op, req->skey_len + STORE_FP_LEN + STORE_TOKEN_LEN);
    memcpy(b, req->skey, req->skey_len);
    memcpy(b + req->skey_len, req->fp, STORE_FP_LEN);
    memcpy(b + req->skey_len + STORE_FP_LEN, req->token, STORE_TOKEN_LEN);
    a->skey = (const char *)b;
    a->fp = b + req->skey_len;
    a->token = (const char *)b + req->skey_len + STORE_FP_LEN;
    lm_op_run(op, lm_acquire_txn, a, lm_acquire_finish);
}

static void lm_owned_finish(struct lm_op *op, int rc)
{
    if (rc) {
        lm_failed(lm_store_of(op), "a lock's update", rc);
        op->a.owned.status = -1;
    }
    op->ans.status = op->a.owned.status;
}

static void lm_owned(struct store_lmdb *s, enum lm_owned_action action, const char *skey,
                     size_t skey_len, const char *token, const uint8_t *record, size_t record_len,
                     uint64_t after_ms, store_done_cb cb, void *arg)
{
    struct lm_op *op = lm_op_new(s);
    op->ans.done_cb = cb;
    op->ans.arg = arg;
    struct lm_owned_args *a = &op->a.owned;
    *a = (struct lm_owned_args){action, skey, skey_len, token, record, record_len, after_ms, -1};
    uint8_t *b = lm_op_bytes(op, skey_len + STORE_TOKEN_LEN + record_len);
    memcpy(b, skey, skey_len);
    memcpy(b + skey_len, token, STORE_TOKEN_LEN);
    if (record_len) memcpy(b + skey_len + STORE_TOKEN_LEN, record, record_len);
    a->skey = (const char *)b;
    a->token = (const char *)b + skey_len;
    a->record = b + skey_len + STORE_TOKEN_LEN;
    lm_op_run(op, lm_owned_txn, a, lm_owned_finish);
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
    op->ans.done_cb = cb;
    op->ans.arg = arg;
    MDB_txn *t;
    int rc = mdb_txn_begin(s->env->env, NULL, MDB_RDONLY, &t);
    if (!rc) mdb_txn_abort(t);
    op->ans.status = rc ? -1 : 1;
    lm_op_defer(op);
}

static void lm_limit_finish(struct lm_op *op, int rc)
{
    if (rc) {
        lm_failed(lm_store_of(op), "limit", rc);
        memset(&op->a.lim.reply, 0, sizeof(op->a.lim.reply));
        op->a.lim.reply.verdict = STORE_LIMIT_ERROR;
    }
    op->ans.limit = op->a.lim.reply;
}

static void lm_lease_finish(struct lm_op *op, int rc)
{
    if (rc) {
        lm_failed(lm_store_of(op), "a slot's update", rc);
        op->a.lim.status = -1;
    }
    op->ans.status = op->a.lim.status;
}

/* The limit's arguments in op (the scope and token copied, lm_op_run). */
static struct lm_limit_args *lm_limit_args(struct lm_op *op, const char *scope, size_t scope_len,
                                           const char *token)
{
    struct lm_limit_args *la = &op->a.lim;
    *la = (struct lm_limit_args){scope, scope_len, token, NULL, false, 0, {0}, 0};
    uint8_t *b = lm_op_bytes(op, scope_len + STORE_TOKEN_LEN);
    memcpy(b, scope, scope_len);
    memcpy(b + scope_len, token, STORE_TOKEN_LEN);
    la->scope = (const char *)b;
    la->token = (const char *)b + scope_len;
    return la;
}

static void lm_limit(struct store *base, const char *scope, size_t scope_len,
                     const char token[STORE_TOKEN_LEN], const struct store_limit_args *a,
                     store_limit_cb cb, void *arg)
{
    struct store_lmdb *s = (struct store_lmdb *)base;
    struct lm_op *op = lm_op_new(s);
    op->ans.kind = STORE_ANSWER_LIMIT;
    op->ans.limit_cb = cb;
    op->ans.arg = arg;
    struct lm_limit_args *la = lm_limit_args(op, scope, scope_len, token);
    op->limit_args = *a;
    la->a = &op->limit_args;
    lm_op_run(op, lm_limit_txn, la, lm_limit_finish);
}

static void lm_lease(struct store_lmdb *s, const char *scope, size_t scope_len, const char *token,
                     bool renew, uint32_t lease_ms, store_done_cb cb, void *arg)
{
    struct lm_op *op = lm_op_new(s);
    op->ans.done_cb = cb;
    op->ans.arg = arg;
    struct lm_limit_args *la = lm_limit_args(op, scope, scope_len, token);
    la->renew = renew;
    la->lease_ms = lease_ms;
    lm_op_run(op, lm_lease_txn, la, lm_lease_finish);
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
    /* Sync "os": what this loop queued is written (a completion is not
     * lost), its answers dropped with the rest of what is pending. */
    lm_batch_run(-1, 0, s);
    /* What the writer thread holds lands first (at most one batch), and
     * is dropped with the rest of what is pending. */
    pthread_mutex_lock(&s->mu);
    while (s->in_writer > 0)
        pthread_cond_wait(&s->cv, &s->mu);
    TAILQ_CONCAT(&s->answers.pending, &s->landed, link);
    pthread_mutex_unlock(&s->mu);
    /* From inside a callback: freed when it returns (lm_answers_closed). */
    if (store_answers_close(&s->answers)) lm_store_destroy(s);
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
    s->evb = base;
    s->env = env;
    store_answers_init(&s->answers, base, sizeof(struct lm_op), lm_op_free_bytes,
                       lm_answers_closed);
    pthread_mutex_init(&s->mu, NULL);
    pthread_cond_init(&s->cv, NULL);
    TAILQ_INIT(&s->landed);
    TAILQ_INIT(&s->batch);
    s->run_batch = event_new(base, -1, 0, lm_batch_run, s);
    if (!s->run_batch) abort();
    s->wake_fd = -1;
    if (env->fsync) {
        s->wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
        if (s->wake_fd < 0) abort();
        s->wake = event_new(base, s->wake_fd, EV_READ | EV_PERSIST, lm_wake, s);
        if (!s->wake || event_add(s->wake, NULL) < 0) abort();
    }
    s->tick = event_new(base, -1, 0, lm_tick, s);
    if (!s->tick) abort();
    struct timeval tv = clock_tv(LM_TICK_MS);
    event_add(s->tick, &tv);
    return &s->base;
}
