/* giveback.c — locks that failed acquires may have taken (see
 * redis_internal.h).
 *
 * Owns the store's bounded list of struct rs_giveback (RS_GIVEBACK_MAX,
 * oldest dropped first, each drop counted and logged) and giving each back
 * with the release script, fenced by its token: at once when a late reply
 * shows the lock was taken, else when a connection the key lives behind
 * is ready again. The release is an ordinary op (op.c); which connection
 * a key lives behind is the topology's (serves). */
#include "redis_internal.h"

#include "idemgate/core/log.h"
#include "idemgate/core/metrics.h"

#include <stdlib.h>
#include <string.h>

/* The entry of the acquire whose token this is, or NULL. */
struct rs_giveback *gb_find(struct store_redis *s, const char *token)
{
    struct rs_giveback *e;
    TAILQ_FOREACH (e, &s->gb, link)
        if (memcmp(e->token, token, STORE_TOKEN_LEN) == 0) return e;
    return NULL;
}

/* Unlists and frees e (given back, found not taken, or dropped). */
void gb_free(struct rs_giveback *e)
{
    struct store_redis *s = e->s;
    TAILQ_REMOVE(&s->gb, e, link);
    s->gb_count--;
    free(e);
}

/* A lock that will not be given back stays until lock_seconds: counted
 * each time, logged once per run of them. */
static void gb_dropped(struct store_redis *s, const char *key, size_t key_len, const char *why)
{
    metrics_inc(M_STORE_ERRORS);
    if (s->gb_drop_logged) return;
    s->gb_drop_logged = true;
    log_msg(LOG_ERROR,
            "store redis: cannot give back the lock of a failed acquire (%s); %.*s may stay "
            "locked until it expires",
            why, (int)key_len, key);
}

void gb_remember(struct rop *op)
{
    struct store_redis *s = op->s;
    if (!s || gb_find(s, op->argv[2])) return;
    if (s->gb_count >= RS_GIVEBACK_MAX) {
        struct rs_giveback *old = TAILQ_FIRST(&s->gb);
        while (old && old->inflight)
            old = TAILQ_NEXT(old, link);
        if (!old) {
            gb_dropped(s, op->argv[0], op->argvlen[0], "too many remembered");
            return;
        }
        gb_dropped(s, old->key, old->key_len, "too many remembered");
        gb_free(old);
    }
    struct rs_giveback *e = rs_alloc(sizeof(*e) + op->argvlen[0]);
    e->s = s;
    e->slot = op->slot;
    memcpy(e->token, op->argv[2], STORE_TOKEN_LEN);
    e->key_len = op->argvlen[0];
    memcpy(e->key, op->argv[0], e->key_len);
    TAILQ_INSERT_TAIL(&s->gb, e, link);
    s->gb_count++;
}

static void gb_done(void *arg, int status)
{
    struct rs_giveback *e = arg;
    struct store_redis *s = e->s;
    e->inflight = false;
    if (status == 1) {
        log_msg(LOG_WARN,
                "store redis: gave back a lock that an acquire took after it had failed (timed "
                "out or lost its connection): %.*s",
                (int)e->key_len, e->key);
        s->gb_drop_logged = false;
        gb_free(e);
    } else if (status == 0) {
        gb_free(e); /* nothing was taken, or the lock expired since */
    } else if (++e->tries >= RS_GIVEBACK_TRIES) {
        gb_dropped(s, e->key, e->key_len, "the release failed");
        gb_free(e);
    }
    /* else kept: tried again when a connection is ready again */
}

/* The release script, fenced by the token, as an op of our own. Its
 * callback never fires synchronously, so callers may go on walking the
 * list. */
void gb_send(struct rs_giveback *e)
{
    const char *args[2] = {e->key, e->token};
    size_t lens[2] = {e->key_len, STORE_TOKEN_LEN};
    struct rop *op = rop_new(e->s, ROP_RELEASE, RS_RELEASE, 2, args, lens);
    op->done_cb = gb_done;
    op->arg = e;
    e->inflight = true;
    rop_start(op);
}

/* Whether e's key lives behind c, as the topology sees it (in a cluster,
 * the node owning its slot, or any node while the slot is unknown). */
static bool gb_routes_to(const struct store_redis *s, const struct rs_giveback *e,
                         const struct rconn *c)
{
    return !s->topo->serves || s->topo->serves(c, e->slot);
}

/* Whether a lock waits to be given back through c. */
bool gb_wants(const struct rconn *c)
{
    const struct rs_giveback *e;
    TAILQ_FOREACH (e, &c->s->gb, link)
        if (!e->inflight && gb_routes_to(c->s, e, c)) return true;
    return false;
}

/* c is ready again: give back what waits for it. */
void gb_flush(struct rconn *c)
{
    struct store_redis *s = c->s;
    struct rs_giveback *e;
    TAILQ_FOREACH (e, &s->gb, link)
        if (!e->inflight && gb_routes_to(s, e, c)) gb_send(e);
}
