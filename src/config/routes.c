/* routes.c — routes[] (docs/configuration.md) and the lookups made per request.
 *
 * Owns: building each route from the file (the global idempotency
 * settings, after env and flags, overridden key by key; the global
 * upstream unless the route names its own), refusing duplicate prefixes,
 * sorting them longest first, cfg_route_for (the longest prefix of a
 * path) and cfg_idem_covers_method. Does not own: the route's values
 * (values.c through json.c) or its policy rules (checks.c). What it
 * builds is owned by struct cfg and freed by cfg_free (ownership.c). */
#include "internal.h"

#include <stdio.h>
#include <string.h>

static bool is_route_prefix(const char *s)
{
    if (s[0] != '/') return false;
    for (; *s; s++)
        if ((unsigned char)*s <= 0x20 || *s == 0x7f || *s == '?' || *s == '#') return false;
    return true;
}

static int route_member(struct cfg_route *r, const cJSON *it, const char *path, struct cfg_err *e)
{
    char where[CFG_WHERE_LEN];
    cfg_where_key(where, path, it->string);
    if (strcmp(it->string, "prefix") == 0) {
        if (!cJSON_IsString(it) || !is_route_prefix(it->valuestring))
            return cfg_fail(e, where, "must be a path starting with /");
        r->prefix = cfg_xstrdup(it->valuestring);
        return 0;
    }
    if (strcmp(it->string, "upstream") == 0) {
        struct cfg_val v = {it, NULL};
        r->upstream_own = true;
        return cfg_set_upstream(&r->upstream, &v, where, e);
    }
    if (strcmp(it->string, "idempotency") == 0) {
        char sub[CFG_PATH_LEN];
        snprintf(sub, sizeof sub, "%.200s.idempotency", path);
        return cfg_apply_object(it, sub, (char *)&r->idem, cfg_idem_opts, cfg_n_idem_opts,
                                cfg_idem_route_opts, cfg_n_idem_route_opts, e);
    }
    if (strcmp(it->string, "ratelimit") == 0) {
        char sub[CFG_PATH_LEN];
        snprintf(sub, sizeof sub, "%.200s.ratelimit", path);
        return cfg_apply_object(it, sub, (char *)&r->ratelimit, cfg_ratelimit_opts,
                                cfg_n_ratelimit_opts, NULL, 0, e);
    }
    if (strcmp(it->string, "webhook") == 0) {
        char sub[CFG_PATH_LEN];
        snprintf(sub, sizeof sub, "%.200s.webhook", path);
        if (!cJSON_IsObject(it)) return cfg_fail(e, where, "must be an object");
        return cfg_build_webhook(&r->webhook, it, sub, e);
    }
    return cfg_fail(e, where, "unknown key");
}

/* routes[i]: the global idempotency settings (after env and flags),
 * overridden key by key; the global upstream unless it names its own. */
static int build_route(const struct cfg *c, struct cfg_route *r, const cJSON *obj, size_t i,
                       struct cfg_err *e)
{
    char path[32], where[CFG_WHERE_LEN];
    snprintf(path, sizeof path, "routes[%zu]", i);
    snprintf(where, sizeof where, "config: %s", path);
    if (!cJSON_IsObject(obj)) return cfg_fail(e, where, "must be an object");
    cfg_idem_copy(&r->idem, &c->idem);
    r->idem.enabled = true;
    r->ratelimit = c->ratelimit;
    const cJSON *it;
    cJSON_ArrayForEach (it, obj) {
        char kw[CFG_WHERE_LEN];
        cfg_where_key(kw, path, it->string);
        if (cfg_check_duplicate(obj, it, kw, e) < 0 || route_member(r, it, path, e) < 0) return -1;
    }
    if (!r->prefix) {
        cfg_where_key(where, path, "prefix");
        return cfg_fail(e, where, "is required");
    }
    if (r->upstream.n == 0) cfg_upstream_copy(&r->upstream, &c->upstream);
    return 0;
}

/* Stable: equal lengths keep the file's order. */
static void sort_routes(struct cfg_route *v, size_t n)
{
    for (size_t i = 1; i < n; i++) {
        struct cfg_route r = v[i];
        size_t len = strlen(r.prefix), j = i;
        while (j > 0 && strlen(v[j - 1].prefix) < len) {
            v[j] = v[j - 1];
            j--;
        }
        v[j] = r;
    }
}

int cfg_build_routes(struct cfg *c, const cJSON *arr, struct cfg_err *e)
{
    if (!arr) return 0;
    if (!cJSON_IsArray(arr)) return cfg_fail(e, "config: routes", "must be an array of objects");
    size_t n = (size_t)cJSON_GetArraySize(arr);
    if (n == 0) return 0;
    c->routes = cfg_xcalloc(n, sizeof *c->routes);
    c->n_routes = n;
    size_t i = 0;
    const cJSON *it;
    cJSON_ArrayForEach (it, arr) {
        char path[CFG_PATH_LEN];
        snprintf(path, sizeof path, "routes[%zu].idempotency", i);
        if (build_route(c, &c->routes[i], it, i, e) < 0 ||
            cfg_check_idem_policy(c, &c->routes[i].idem, path, true, e) < 0)
            return -1;
        i++;
    }
    for (i = 1; i < n; i++) {
        for (size_t j = 0; j < i; j++) {
            if (strcmp(c->routes[i].prefix, c->routes[j].prefix) == 0) {
                char where[CFG_WHERE_LEN];
                snprintf(where, sizeof where, "config: routes[%zu].prefix", i);
                return cfg_fail(e, where, "duplicates routes[%zu].prefix", j);
            }
        }
    }
    sort_routes(c->routes, n);
    return 0;
}

const struct cfg_route *cfg_route_for(const struct cfg *c, const char *path, size_t len)
{
    const char *q = memchr(path, '?', len);
    if (q) len = (size_t)(q - path);
    for (size_t i = 0; i < c->n_routes; i++) {
        const char *p = c->routes[i].prefix;
        size_t plen = strlen(p);
        if (plen <= len && memcmp(path, p, plen) == 0) return &c->routes[i];
    }
    return NULL;
}

bool cfg_idem_covers_method(const struct cfg_idem *idem, const char *method, size_t len)
{
    for (size_t i = 0; i < idem->methods.n; i++) {
        const char *m = idem->methods.v[i];
        if (strlen(m) == len && memcmp(m, method, len) == 0) return true;
    }
    return false;
}
