/* answers.c — a store's deferred answers (see answers.h). */
#include "idemgate/store/answers.h"

#include <stdlib.h>
#include <string.h>

#include <event2/event.h>

/* Finished answers kept per store, with their event, for the next ones. */
#define ANSWERS_KEPT 64

static void answer_free(struct store_answer *a)
{
    if (a->ev) event_free(a->ev);
    free(a->record);
    if (a->q->op_free) a->q->op_free(a);
    free(a);
}

/* Back to the kept ones (its event stays assigned to it), or freed. */
static void answer_keep(struct store_answer *a)
{
    struct store_answers *q = a->q;
    if (q->n_kept >= ANSWERS_KEPT) {
        answer_free(a);
        return;
    }
    free(a->record);
    struct event *ev = a->ev;
    memset(a, 0, sizeof(*a));
    a->q = q;
    a->ev = ev;
    TAILQ_INSERT_HEAD(&q->kept, a, link);
    q->n_kept++;
}

static void answer_fire(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    struct store_answer *a = arg;
    struct store_answers *q = a->q;
    /* Unlinked first, so that a store_free from inside the callback does
     * not see (and free) the answer that is running. */
    TAILQ_REMOVE(&q->pending, a, link);
    q->firing++;
    switch (a->kind) {
    case STORE_ANSWER_ACQUIRE:
        a->acq_cb(a->arg, &a->reply);
        break;
    case STORE_ANSWER_LIMIT:
        a->limit_cb(a->arg, &a->limit);
        break;
    case STORE_ANSWER_DONE:
        a->done_cb(a->arg, a->status);
        break;
    }
    q->firing--;
    if (q->closed) {
        answer_free(a);
        if (q->firing == 0) q->destroy(q);
        return;
    }
    answer_keep(a);
}

void store_answers_init(struct store_answers *q, struct event_base *evb, size_t op_size,
                        void (*op_free)(struct store_answer *a),
                        void (*destroy)(struct store_answers *q))
{
    memset(q, 0, sizeof(*q));
    q->evb = evb;
    q->op_size = op_size < sizeof(struct store_answer) ? sizeof(struct store_answer) : op_size;
    q->op_free = op_free;
    q->destroy = destroy;
    TAILQ_INIT(&q->pending);
    TAILQ_INIT(&q->kept);
}

struct store_answer *store_answer_new(struct store_answers *q)
{
    struct store_answer *a = TAILQ_FIRST(&q->kept);
    if (a) {
        TAILQ_REMOVE(&q->kept, a, link);
        q->n_kept--;
        return a;
    }
    a = calloc(1, q->op_size);
    if (!a) abort();
    a->q = q;
    a->ev = event_new(q->evb, -1, 0, answer_fire, a);
    if (!a->ev) abort();
    return a;
}

void store_answer_defer(struct store_answer *a)
{
    TAILQ_INSERT_TAIL(&a->q->pending, a, link);
    event_active(a->ev, EV_TIMEOUT, 1);
}

bool store_answers_close(struct store_answers *q)
{
    struct store_answer *a;
    while ((a = TAILQ_FIRST(&q->pending))) {
        TAILQ_REMOVE(&q->pending, a, link);
        answer_free(a);
    }
    if (q->firing > 0) {
        q->closed = true;
        return false;
    }
    return true;
}

void store_answers_free(struct store_answers *q)
{
    struct store_answer *a;
    while ((a = TAILQ_FIRST(&q->kept))) {
        TAILQ_REMOVE(&q->kept, a, link);
        answer_free(a);
    }
    q->n_kept = 0;
}
