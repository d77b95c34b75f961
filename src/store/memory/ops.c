/* ops.c — the memory store as seen by one worker (struct store_memory,
 * store.h): the struct store_ops table, each operation's answer deferred
 * onto the worker's event_base through a zero-delay event (so callbacks
 * never fire from inside the call that started them), the recycling of
 * finished ops with their event, and the periodic tick that reclaims a
 * bounded slice of the table when no request comes.
 *
 * Owns the struct store_memory, its pending and cached struct mem_op and
 * their events, and the owned copy of a replayed record until its
 * callback returns. Does not own the shared table (borrowed: it must
 * outlive the store) nor anything in it: the decisions are shared.c's,
 * taken under the table's mutex, which this file never touches. */
#include "internal.h"

#include <event2/event.h>
#include <string.h>
#include <sys/queue.h>

/* Finished ops kept per store, with their event, for the next ones. */
#define MEM_OP_CACHE 64

/* Which callback an op answers with. */
enum mem_op_kind { MEM_OP_DONE, MEM_OP_ACQUIRE, MEM_OP_LIMIT };

/* One operation waiting for its deferred callback. Owned by its store:
 * listed in s->ops while pending, in s->free_ops once recycled. */
struct mem_op {
    TAILQ_ENTRY(mem_op) link; /* in s->ops, or in s->free_ops */
    struct store_memory *s;
    struct event *ev;
    enum mem_op_kind kind;
    store_acquire_cb acq_cb;
    store_done_cb done_cb;
    store_limit_cb limit_cb;
    void *arg;
    struct store_acquire_reply reply;
    struct store_limit_reply limit;
    uint8_t *record; /* owned copy behind reply.record */
    int status;
};

/* The memory backend's struct store, one per worker, used only on that
 * worker's thread. Created by store_memory_new, freed by store_free. */
struct store_memory {
    struct store base; /* first: a struct store * is a struct store_memory * */
    struct event_base *evb;
    struct store_memory_shared *sh;
    int timeout_ms;
    struct event *tick;       /* the periodic bounded reclaim */
    TAILQ_HEAD(, mem_op) ops; /* pending callbacks */
    /* Finished ops kept with their event for the next operations: no
     * malloc and no event_new per operation. */
    TAILQ_HEAD(, mem_op) free_ops;
    unsigned n_free_ops;
    int firing; /* callbacks running: store_free then waits for them */
    bool dead;  /* store_free was called from inside a callback */
};

/* ---- deferred callbacks ---- */

static void mem_op_unlink(struct mem_op *op)
{
    TAILQ_REMOVE(&op->s->ops, op, link);
}

static void mem_op_free(struct mem_op *op)
{
    if (op->ev) event_free(op->ev);
    free(op->record);
    free(op);
}

/* Back to the cache (its event stays assigned to this op), or freed. */
static void mem_op_recycle(struct mem_op *op)
{
    struct store_memory *s = op->s;
    if (s->n_free_ops >= MEM_OP_CACHE) {
        mem_op_free(op);
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

static void mem_store_destroy(struct store_memory *s)
{
    struct mem_op *op;
    while ((op = TAILQ_FIRST(&s->free_ops))) {
        TAILQ_REMOVE(&s->free_ops, op, link);
        mem_op_free(op);
    }
    event_free(s->tick);
    free(s);
}

static void mem_op_fire(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    struct mem_op *op = arg;
    /* Unlinked first, so that a store_free from inside the callback does
     * not see (and free) the op that is running. */
    mem_op_unlink(op);
    struct store_memory *s = op->s;
    s->firing++;
    switch (op->kind) {
    case MEM_OP_ACQUIRE:
        op->acq_cb(op->arg, &op->reply);
        break;
    case MEM_OP_LIMIT:
        op->limit_cb(op->arg, &op->limit);
        break;
    case MEM_OP_DONE:
        op->done_cb(op->arg, op->status);
        break;
    }
    s->firing--;
    if (s->dead) {
        mem_op_free(op);
        if (s->firing == 0) mem_store_destroy(s);
        return;
    }
    mem_op_recycle(op);
}

static struct mem_op *mem_op_new(struct store_memory *s)
{
    struct mem_op *op = TAILQ_FIRST(&s->free_ops);
    if (op) {
        TAILQ_REMOVE(&s->free_ops, op, link);
        s->n_free_ops--;
        return op;
    }
    op = mem_alloc(sizeof(*op));
    op->s = s;
    op->ev = event_new(s->evb, -1, 0, mem_op_fire, op);
    if (!op->ev) abort();
    return op;
}

/* Queues op's callback for the next turn of the loop. */
static void mem_op_defer(struct mem_op *op)
{
    TAILQ_INSERT_TAIL(&op->s->ops, op, link);
    event_active(op->ev, EV_TIMEOUT, 1);
}

/* ---- operations ---- */

static void mem_acquire(struct store *base, const struct store_acquire_req *req,
                        store_acquire_cb cb, void *arg)
{
    const char *skey = req->skey, *token = req->token;
    size_t skey_len = req->skey_len;
    const uint8_t *fp = req->fp;
    uint32_t lock_ms = req->lock_ms;
    struct store_memory *s = (struct store_memory *)base;
    struct mem_op *op = mem_op_new(s);
    op->kind = MEM_OP_ACQUIRE;
    op->acq_cb = cb;
    op->arg = arg;
    mem_shared_acquire(s->sh, skey, skey_len, fp, token, lock_ms, &op->reply, &op->record);
    mem_op_defer(op);
}

static void mem_owned(struct store_memory *s, enum mem_owned_action action, const char *skey,
                      size_t skey_len, const char *token, const uint8_t *record, size_t record_len,
                      uint64_t expire_after_ms, store_done_cb cb, void *arg)
{
    struct mem_op *op = mem_op_new(s);
    op->done_cb = cb;
    op->arg = arg;
    op->status =
        mem_shared_owned(s->sh, action, skey, skey_len, token, record, record_len, expire_after_ms);
    mem_op_defer(op);
}

static void mem_complete(struct store *base, const char *skey, size_t skey_len,
                         const char token[STORE_TOKEN_LEN], const uint8_t *record,
                         size_t record_len, uint32_t ttl_seconds, store_done_cb cb, void *arg)
{
    mem_owned((struct store_memory *)base, MEM_COMPLETE, skey, skey_len, token, record, record_len,
              (uint64_t)ttl_seconds * 1000u, cb, arg);
}

static void mem_release(struct store *base, const char *skey, size_t skey_len,
                        const char token[STORE_TOKEN_LEN], store_done_cb cb, void *arg)
{
    mem_owned((struct store_memory *)base, MEM_RELEASE, skey, skey_len, token, NULL, 0, 0, cb, arg);
}

static void mem_renew(struct store *base, const char *skey, size_t skey_len,
                      const char token[STORE_TOKEN_LEN], uint32_t lock_ms, store_done_cb cb,
                      void *arg)
{
    mem_owned((struct store_memory *)base, MEM_RENEW, skey, skey_len, token, NULL, 0, lock_ms, cb,
              arg);
}

static void mem_ping(struct store *base, store_done_cb cb, void *arg)
{
    struct store_memory *s = (struct store_memory *)base;
    struct mem_op *op = mem_op_new(s);
    op->done_cb = cb;
    op->arg = arg;
    op->status = 1;
    mem_op_defer(op);
}

static void mem_limit(struct store *base, const char *scope, size_t scope_len,
                      const char token[STORE_TOKEN_LEN], const struct store_limit_args *a,
                      store_limit_cb cb, void *arg)
{
    struct store_memory *s = (struct store_memory *)base;
    struct mem_op *op = mem_op_new(s);
    op->kind = MEM_OP_LIMIT;
    op->limit_cb = cb;
    op->arg = arg;
    mem_shared_limit(s->sh, scope, scope_len, token, a, &op->limit);
    mem_op_defer(op);
}

static void mem_limit_lease(struct store_memory *s, const char *scope, size_t scope_len,
                            const char *token, bool renew, uint32_t lease_ms, store_done_cb cb,
                            void *arg)
{
    struct mem_op *op = mem_op_new(s);
    op->done_cb = cb;
    op->arg = arg;
    op->status = mem_shared_limit_lease(s->sh, scope, scope_len, token, renew, lease_ms);
    mem_op_defer(op);
}

static void mem_limit_release(struct store *base, const char *scope, size_t scope_len,
                              const char token[STORE_TOKEN_LEN], store_done_cb cb, void *arg)
{
    mem_limit_lease((struct store_memory *)base, scope, scope_len, token, false, 0, cb, arg);
}

static void mem_limit_renew(struct store *base, const char *scope, size_t scope_len,
                            const char token[STORE_TOKEN_LEN], uint32_t lease_ms, store_done_cb cb,
                            void *arg)
{
    mem_limit_lease((struct store_memory *)base, scope, scope_len, token, true, lease_ms, cb, arg);
}

/* Pending callbacks are dropped; one that is running right now (store_free
 * called from inside it) is no longer listed and mem_op_fire frees it. */
static void mem_free(struct store *base)
{
    struct store_memory *s = (struct store_memory *)base;
    struct mem_op *op;
    while ((op = TAILQ_FIRST(&s->ops))) {
        TAILQ_REMOVE(&s->ops, op, link);
        mem_op_free(op);
    }
    if (s->firing > 0) {
        s->dead = true; /* freed when the running callback returns */
        return;
    }
    mem_store_destroy(s);
}

static const struct store_ops mem_ops = {
    .name = "memory",
    .acquire = mem_acquire,
    .complete = mem_complete,
    .release = mem_release,
    .renew = mem_renew,
    .ping = mem_ping,
    .limit = mem_limit,
    .limit_release = mem_limit_release,
    .limit_renew = mem_limit_renew,
    .free = mem_free,
};

/* Reclaims a bounded slice even when no request comes, so that an idle
 * instance gives back the memory of its expired records. */
static void mem_tick(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    mem_shared_tick(((struct store_memory *)arg)->sh);
}

struct store *store_memory_new(struct event_base *base, struct store_memory_shared *sh,
                               int timeout_ms)
{
    struct store_memory *s = mem_alloc(sizeof(*s));
    s->base.ops = &mem_ops;
    TAILQ_INIT(&s->ops);
    TAILQ_INIT(&s->free_ops);
    s->evb = base;
    s->sh = sh;
    /* Kept for parity with the Redis backend: every answer here is
     * immediate, so the deadline can never be reached. */
    s->timeout_ms = timeout_ms;
    s->tick = event_new(base, -1, EV_PERSIST, mem_tick, s);
    if (!s->tick) abort();
    struct timeval tv = {0, MEM_TICK_MS * 1000};
    event_add(s->tick, &tv);
    return &s->base;
}
