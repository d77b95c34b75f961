/* loop.c — one event loop's shared context (see loop.h): its
 * generations (loop_gen: upstream groups and store per configuration
 * generation), buffer pool, header scratch and the idle check. Owns
 * those; not the threads, listeners or signals (server.c). */
#include "idemgate/proxy/loop.h"

#include <stdlib.h>

#include <event2/event.h>

#include "idemgate/config/config.h"
#include "idemgate/core/log.h"
#include "idemgate/http/http1.h"
#include "idemgate/proxy/exchange.h"
#include "idemgate/proxy/gen.h"
#include "idemgate/proxy/upstream.h"
#include "idemgate/store/store.h"

/* The store for generation g: prev's when its settings are the same (the
 * memory store is one table for the process, the LMDB store one
 * environment: always the same), else a new one with new connections. */
static struct loop_store *loop_store_for(struct loop *l, struct gen *g, struct loop_store *prev)
{
    if (prev && (l->mem || l->lmdb || cfg_section_equal(&prev->gen->cfg, &g->cfg, "redis"))) {
        prev->refs++;
        return prev;
    }
    struct loop_store *ls = calloc(1, sizeof(*ls));
    if (!ls) abort();
    ls->refs = 1;
    gen_ref(g);
    ls->gen = g;
    if (l->mem)
        ls->store = store_memory_new(l->base, l->mem, g->cfg.redis.timeout_ms);
    else if (l->lmdb)
        ls->store = store_lmdb_new(l->base, l->lmdb);
    else
        ls->store = store_redis_new(l->base, &g->cfg, g->tls);
    if (prev && l->id == 0)
        log_msg(LOG_INFO, "reload: redis settings changed: new store connections");
    return ls;
}

static void loop_store_unref(struct loop_store *ls)
{
    if (--ls->refs > 0) return;
    store_free(ls->store);
    gen_unref(ls->gen);
    free(ls);
}

static struct loop_gen *loop_gen_new(struct loop *l, struct gen *g, struct loop_gen *prev)
{
    struct loop_gen *lg = calloc(1, sizeof(*lg));
    if (!lg) abort();
    lg->refs = 1;
    lg->loop = l;
    gen_ref(g);
    lg->gen = g;
    lg->cfg = &g->cfg;
    lg->n_groups = upstream_registry_count(g->upstreams);
    lg->groups = calloc(lg->n_groups, sizeof(*lg->groups));
    if (!lg->groups) abort();
    for (size_t i = 0; i < lg->n_groups; i++)
        upstream_group_init(&lg->groups[i], l, g->upstreams, i, g->tls);
    if (prev) upstream_groups_adopt(lg->groups, lg->n_groups, prev->groups, prev->n_groups);
    lg->store = loop_store_for(l, g, prev ? prev->store : NULL);
    lg->idem_env.store = lg->store->store;
    lg->idem_env.bufs = &l->bufs;
    return lg;
}

static void loop_gen_free(struct loop_gen *lg)
{
    for (size_t i = 0; i < lg->n_groups; i++)
        upstream_group_free(&lg->groups[i]);
    free(lg->groups);
    loop_store_unref(lg->store);
    gen_unref(lg->gen);
    free(lg);
}

/* The retiring generations without exchanges, freed outside of any
 * exchange's or connection's callback. */
static void loop_retire(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    struct loop *l = arg;
    for (struct loop_gen *lg = TAILQ_FIRST(&l->retiring), *next; lg; lg = next) {
        next = TAILQ_NEXT(lg, link);
        if (lg->refs > 0) continue;
        TAILQ_REMOVE(&l->retiring, lg, link);
        loop_gen_free(lg);
    }
}

void loop_init(struct loop *l, int id, uint32_t boot_id, struct gen *g, struct event_base *base,
               struct store_memory_shared *mem, struct store_lmdb_env *lmdb,
               atomic_int *connections)
{
    l->id = id;
    TAILQ_INIT(&l->clients);
    TAILQ_INIT(&l->retiring);
    l->boot_id = boot_id;
    l->base = base;
    l->mem = mem;
    l->lmdb = lmdb;
    l->connections = connections;
    buf_pool_init(&l->bufs, 16384, 256);
    l->scratch = malloc(sizeof(*l->scratch));
    if (!l->scratch) abort();
    l->retire_ev = event_new(base, -1, 0, loop_retire, l);
    if (!l->retire_ev) abort();
    l->gen = loop_gen_new(l, g, NULL);
    l->cfg = l->gen->cfg;
}

void loop_set_gen(struct loop *l, struct gen *g)
{
    struct loop_gen *old = l->gen;
    if (old->gen == g) return;
    l->gen = loop_gen_new(l, g, old);
    l->cfg = l->gen->cfg;
    TAILQ_INSERT_TAIL(&l->retiring, old, link);
    loop_gen_unref(old);
}

struct loop_gen *loop_gen_ref(struct loop *l)
{
    l->gen->refs++;
    return l->gen;
}

void loop_gen_unref(struct loop_gen *lg)
{
    /* the current one always keeps the loop's reference */
    if (--lg->refs == 0) event_active(lg->loop->retire_ev, 0, 0);
}

void loop_free(struct loop *l)
{
    if (l->gen) {
        l->gen->refs--;
        TAILQ_INSERT_TAIL(&l->retiring, l->gen, link);
        l->gen = NULL;
        l->cfg = NULL;
    }
    loop_retire(-1, 0, l); /* every one: no exchange is left */
    if (l->retire_ev) event_free(l->retire_ev);
    l->retire_ev = NULL;
    exchange_cache_free(l);
    buf_pool_free(&l->bufs);
    free(l->scratch);
    l->scratch = NULL;
}

void loop_maybe_idle(struct loop *l)
{
    if (l->draining && TAILQ_EMPTY(&l->clients) && l->n_exchanges == 0 && l->on_idle)
        l->on_idle(l->idle_arg);
}
