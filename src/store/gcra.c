/* gcra.c — the rate limit's arithmetic (see gcra.h). */
#include "idemgate/store/gcra.h"

static uint64_t ceil_div(uint64_t a, uint64_t b)
{
    return a / b + (a % b != 0);
}

/* TAT - now in 1/n ms (0: the whole allowance is there). */
static uint64_t gcra_debt(const struct gcra *g, uint64_t n, uint64_t now)
{
    if (g->until <= now || !g->n) return 0;
    uint64_t d0 = g->d;
    if (g->n != n) {
        unsigned __int128 r = ((unsigned __int128)d0 * n + g->n - 1) / g->n;
        d0 = r > UINT64_MAX / 2 ? UINT64_MAX / 2 : (uint64_t)r;
    }
    uint64_t el = now > g->t0 ? now - g->t0 : 0;
    if (el >= ceil_div(d0, n)) return 0;
    return d0 - el * n;
}

bool gcra_take(const struct gcra *g, const struct store_limit_args *a, uint64_t now,
               struct store_limit_reply *reply, struct gcra *next)
{
    uint64_t n = a->requests, w = a->window_ms ? a->window_ms : 1;
    uint64_t d = gcra_debt(g, n, now), cap = w * n, d1 = d + w;
    if (d1 > cap) {
        reply->verdict = STORE_LIMIT_RATE;
        reply->reset_ms = (uint32_t)ceil_div(d, n);
        reply->retry_ms = (uint32_t)ceil_div(d1 - cap, n);
        return false;
    }
    reply->remaining = (uint32_t)((cap - d1) / w);
    reply->reset_ms = (uint32_t)ceil_div(d1, n);
    *next = (struct gcra){now, d1, now + reply->reset_ms, (uint32_t)n};
    return true;
}
