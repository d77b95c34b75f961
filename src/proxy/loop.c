/* loop.c — one event loop's shared context (see loop.h): its upstream
 * pools, buffer pool, header scratch and the idle check. Owns those; not
 * the threads, listeners or signals (server.c). */
#include "idemgate/proxy/loop.h"

#include <stdlib.h>

#include "idemgate/config/config.h"
#include "idemgate/http/http1.h"
#include "idemgate/proxy/exchange.h"
#include "idemgate/proxy/upstream.h"

void loop_init(struct loop *l, int id, uint32_t boot_id, const struct cfg *cfg,
               struct event_base *base, struct store *store, atomic_int *connections)
{
    l->id = id;
    TAILQ_INIT(&l->clients);
    l->boot_id = boot_id;
    l->cfg = cfg;
    l->base = base;
    l->store = store;
    l->connections = connections;
    buf_pool_init(&l->bufs, 16384, 256);
    l->idem_env.store = store;
    l->idem_env.bufs = &l->bufs;
    l->scratch = malloc(sizeof(*l->scratch));
    if (!l->scratch) abort();
    l->n_groups = upstream_groups_count();
    l->groups = calloc(l->n_groups ? l->n_groups : 1, sizeof(*l->groups));
    if (!l->groups) abort();
    for (size_t i = 0; i < l->n_groups; i++)
        upstream_group_init(&l->groups[i], l, i);
}

void loop_free(struct loop *l)
{
    for (size_t i = 0; i < l->n_groups; i++)
        upstream_group_free(&l->groups[i]);
    free(l->groups);
    l->groups = NULL;
    exchange_cache_free(l);
    buf_pool_free(&l->bufs);
    free(l->scratch);
    l->scratch = NULL;
    if (l->store) store_free(l->store);
    l->store = NULL;
}

void loop_maybe_idle(struct loop *l)
{
    if (l->draining && TAILQ_EMPTY(&l->clients) && l->n_exchanges == 0 && l->on_idle)
        l->on_idle(l->idle_arg);
}
