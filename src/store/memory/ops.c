/* ops.c — the memory store as seen by one worker (struct store_memory,
 * store.h): the struct store_ops table, each operation's answer deferred
 * onto the worker's event_base (store/answers.h: callbacks never fire from
 * inside the call that started them), and the periodic tick that
 * reclaims a bounded slice of the table when no request comes.
 *
 * Owns the struct store_memory and its answers. Does not own the shared
 * table (borrowed: it must outlive the store) nor anything in it: the
 * decisions are shared.c's, taken under the table's mutex, which this
 * file never touches. */
#include "internal.h"

#include "idemgate/store/answers.h"

#include <event2/event.h>
#include <stddef.h>
#include <string.h>

/* The memory backend's struct store, one per worker, used only on that
 * worker's thread. Created by store_memory_new, freed by store_free. */
struct store_memory {
    struct store base; /* first: a struct store * is a struct store_memory * */
    struct event_base *evb;
    struct store_memory_shared *sh;
    int timeout_ms;
    struct event *tick;           /* the periodic bounded reclaim */
    struct store_answers answers; /* deferred callbacks (store/answers.h) */
};

static void mem_store_destroy(struct store_memory *s)
{
    store_answers_free(&s->answers);
    event_free(s->tick);
    free(s);
}

/* The store was freed from inside a callback: now the last one returned. */
static void mem_answers_closed(struct store_answers *q)
{
    mem_store_destroy(
        (struct store_memory *)(void *)((char *)q - offsetof(struct store_memory, answers)));
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
    struct store_answer *op = store_answer_new(&s->answers);
    op->kind = STORE_ANSWER_ACQUIRE;
    op->acq_cb = cb;
    op->arg = arg;
    mem_shared_acquire(s->sh, skey, skey_len, fp, token, lock_ms, &op->reply, &op->record);
    store_answer_defer(op);
}

static void mem_owned(struct store_memory *s, enum mem_owned_action action, const char *skey,
                      size_t skey_len, const char *token, const uint8_t *record, size_t record_len,
                      uint64_t expire_after_ms, store_done_cb cb, void *arg)
{
    struct store_answer *op = store_answer_new(&s->answers);
    op->done_cb = cb;
    op->arg = arg;
    op->status =
        mem_shared_owned(s->sh, action, skey, skey_len, token, record, record_len, expire_after_ms);
    store_answer_defer(op);
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
    struct store_answer *op = store_answer_new(&s->answers);
    op->done_cb = cb;
    op->arg = arg;
    op->status = 1;
    store_answer_defer(op);
}

static void mem_limit(struct store *base, const char *scope, size_t scope_len,
                      const char token[STORE_TOKEN_LEN], const struct store_limit_args *a,
                      store_limit_cb cb, void *arg)
{
    struct store_memory *s = (struct store_memory *)base;
    struct store_answer *op = store_answer_new(&s->answers);
    op->kind = STORE_ANSWER_LIMIT;
    op->limit_cb = cb;
    op->arg = arg;
    mem_shared_limit(s->sh, scope, scope_len, token, a, &op->limit);
    store_answer_defer(op);
}

static void mem_limit_lease(struct store_memory *s, const char *scope, size_t scope_len,
                            const char *token, bool renew, uint32_t lease_ms, store_done_cb cb,
                            void *arg)
{
    struct store_answer *op = store_answer_new(&s->answers);
    op->done_cb = cb;
    op->arg = arg;
    op->status = mem_shared_limit_lease(s->sh, scope, scope_len, token, renew, lease_ms);
    store_answer_defer(op);
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
 * called from inside it) finishes, then the store goes. */
static void mem_free(struct store *base)
{
    struct store_memory *s = (struct store_memory *)base;
    /* From inside a callback: freed when it returns (mem_answers_closed). */
    if (store_answers_close(&s->answers)) mem_store_destroy(s);
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
    s->evb = base;
    store_answers_init(&s->answers, base, sizeof(struct store_answer), NULL, mem_answers_closed);
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
