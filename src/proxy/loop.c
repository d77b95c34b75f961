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
    l->n_pools = cfg->n_routes + 1;
    l->pools = calloc(l->n_pools, sizeof(*l->pools));
    if (!l->pools) abort();
    upstream_pool_init(&l->pools[0], l, &cfg->upstream);
    for (size_t i = 0; i < cfg->n_routes; i++)
        upstream_pool_init(&l->pools[i + 1], l, &cfg->routes[i].upstream);
}

void loop_free(struct loop *l)
{
    for (size_t i = 0; i < l->n_pools; i++)
        upstream_pool_free(&l->pools[i]);
    free(l->pools);
    l->pools = NULL;
    exchange_cache_free(l);
    buf_pool_free(&l->bufs);
    free(l->scratch);
    l->scratch = NULL;
    if (l->store) store_free(l->store);
    l->store = NULL;
}

void loop_maybe_idle(struct loop *l)
{
    if (l->draining && !l->clients && l->n_exchanges == 0 && l->on_idle) l->on_idle(l->idle_arg);
}
