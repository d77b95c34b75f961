/* answers.h — a store's answers deferred onto its loop, shared by the
 * backends that decide at once on the caller's thread (memory, LMDB): a
 * callback never fires from inside the call that started it (store.h),
 * so each answer waits for the loop's next turn on a zero-delay event.
 *
 * One struct store_answers per struct store, used on its loop's thread
 * only. It owns the answers pending and the finished ones it keeps, with
 * their event, for the next operations (no malloc and no event_new per
 * operation). A backend's operation may be larger than struct
 * store_answer (op_size): it embeds one first, and whatever else it holds
 * is left as its last use left it, for it to reuse or free (op_free). */
#ifndef IDEMGATE_STORE_ANSWERS_H
#define IDEMGATE_STORE_ANSWERS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/queue.h>

#include "idemgate/store/store.h"

struct event;
struct event_base;
struct store_answers;

/* Which callback an answer calls. */
enum store_answer_kind { STORE_ANSWER_DONE, STORE_ANSWER_ACQUIRE, STORE_ANSWER_LIMIT };

struct store_answer {
    TAILQ_ENTRY(store_answer) link; /* pending, or kept */
    struct store_answers *q;
    struct event *ev;
    enum store_answer_kind kind;
    store_acquire_cb acq_cb;
    store_done_cb done_cb;
    store_limit_cb limit_cb;
    void *arg;
    struct store_acquire_reply reply;
    struct store_limit_reply limit;
    uint8_t *record; /* owned copy behind reply.record, freed after its callback */
    int status;
};

TAILQ_HEAD(store_answer_list, store_answer);

struct store_answers {
    struct event_base *evb;
    size_t op_size;
    void (*op_free)(struct store_answer *a);  /* what an operation owns beyond; may be NULL */
    void (*destroy)(struct store_answers *q); /* frees the store (see store_answers_close) */
    struct store_answer_list pending;
    struct store_answer_list kept;
    unsigned n_kept;
    int firing;  /* callbacks running */
    bool closed; /* the store was freed from inside a callback */
};

void store_answers_init(struct store_answers *q, struct event_base *evb, size_t op_size,
                        void (*op_free)(struct store_answer *a),
                        void (*destroy)(struct store_answers *q));
/* An answer to fill (its struct store_answer part zeroed). */
struct store_answer *store_answer_new(struct store_answers *q);
/* Its callback on the loop's next turn. */
void store_answer_defer(struct store_answer *a);
/* The store is being freed: the answers pending are dropped without their
 * callback. True: free the store now (with store_answers_free); false: a
 * callback is running, and when the last one returns q->destroy is
 * called to free it. */
bool store_answers_close(struct store_answers *q);
/* Frees the answers kept. */
void store_answers_free(struct store_answers *q);

#endif
