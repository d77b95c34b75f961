/* gen.c — configuration generations (see gen.h): loading one, counting
 * its references, the current one, and the per-server upstream metrics
 * read from it. Owns each generation's configuration, TLS contexts and
 * upstream registry, and the current pointer (behind one mutex). */
#include "idemgate/proxy/gen.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "idemgate/core/metrics.h"
#include "idemgate/net/tls.h"
#include "idemgate/proxy/upstream.h"

static pthread_mutex_t gen_mu = PTHREAD_MUTEX_INITIALIZER;
static struct gen *gen_cur;

static void gen_free(struct gen *g)
{
    upstream_registry_free(g->upstreams);
    tls_set_free(g->tls);
    cfg_free(&g->cfg);
    free(g);
}

int gen_load(const struct cfg_flags *flags, const struct gen *prev, struct gen **out, char *err,
             size_t errlen)
{
    *out = NULL;
    struct gen *g = calloc(1, sizeof(*g));
    if (!g) abort();
    if (cfg_load(&g->cfg, flags, err, errlen) != 0) {
        free(g);
        return 2;
    }
    g->tls = tls_set_new(&g->cfg, err, errlen);
    if (!g->tls) {
        cfg_free(&g->cfg);
        free(g);
        return 1;
    }
    g->upstreams = upstream_registry_new(&g->cfg, prev ? prev->upstreams : NULL);
    g->id = prev ? prev->id + 1 : 1;
    atomic_init(&g->refs, 1);
    *out = g;
    return 0;
}

void gen_ref(struct gen *g)
{
    atomic_fetch_add_explicit(&g->refs, 1, memory_order_relaxed);
}

void gen_unref(struct gen *g)
{
    if (g && atomic_fetch_sub_explicit(&g->refs, 1, memory_order_acq_rel) == 1) gen_free(g);
}

/* The per-server samples come from the current generation's registry. */
static void gen_series(struct buf *out, enum metrics_id id, const char *name)
{
    struct gen *g = gen_current();
    if (!g) return;
    upstream_registry_series(g->upstreams, out, id, name);
    gen_unref(g);
}

void gen_publish(struct gen *g)
{
    gen_ref(g);
    pthread_mutex_lock(&gen_mu);
    struct gen *old = gen_cur;
    gen_cur = g;
    pthread_mutex_unlock(&gen_mu);
    if (!old) metrics_set_series(gen_series); /* once, before any render */
    gen_unref(old);
}

struct gen *gen_current(void)
{
    pthread_mutex_lock(&gen_mu);
    struct gen *g = gen_cur;
    if (g) gen_ref(g);
    pthread_mutex_unlock(&gen_mu);
    return g;
}

void gen_retire_current(void)
{
    metrics_set_series(NULL);
    pthread_mutex_lock(&gen_mu);
    struct gen *old = gen_cur;
    gen_cur = NULL;
    pthread_mutex_unlock(&gen_mu);
    gen_unref(old);
}
