/* fuzz_config.c — libFuzzer driver for the configuration loader: any input
 * either loads (and then satisfies the struct's invariants) or fails with
 * one "config: ..." line and a zeroed struct; cfg_free releases all. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "idemgate/config/config.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void check_loaded(const struct cfg *c)
{
    if (!c->listen.host || c->listen.port < 1 || c->listen.port > 65535) abort();
    if (c->upstream.n == 0 || !c->upstream.servers[0].url.host || !c->redis.host ||
        !c->idem.header || !c->idem.scope_secret)
        abort();
    if (c->workers < 1 || c->workers > 1024) abort();
    if (c->idem.mismatch_status != 409 && c->idem.mismatch_status != 422) abort();
    if (c->admin_enabled != (c->admin_listen.host != NULL)) abort();
    for (size_t i = 0; i < c->n_routes; i++) {
        const struct cfg_route *r = &c->routes[i];
        if (!r->prefix || r->prefix[0] != '/' || r->upstream.n == 0 || !r->idem.header) abort();
        if (i > 0 && strlen(c->routes[i - 1].prefix) < strlen(r->prefix))
            abort(); /* longest first */
        /* a route's own prefix resolves to a route with a prefix at least
         * as long (itself, or a longer duplicate-free match) */
        const struct cfg_route *got = cfg_route_for(c, r->prefix, strlen(r->prefix));
        if (!got || strlen(got->prefix) < strlen(r->prefix)) abort();
    }
    for (size_t i = 0; i < c->idem.methods.n; i++) {
        const char *m = c->idem.methods.v[i];
        if (!cfg_idem_covers_method(&c->idem, m, strlen(m))) abort();
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct cfg c;
    char err[512];
    if (cfg_load_json(&c, (const char *)data, size, false, NULL, err, sizeof err) == 0) {
        check_loaded(&c);
        cfg_free(&c);
        return 0;
    }
    static const struct cfg zero;
    if (strncmp(err, "config: ", 8) != 0 || strchr(err, '\n') || memcmp(&c, &zero, sizeof c) != 0)
        abort();
    return 0;
}
