/* upstream.c — the `upstream` value, globally and on a route: one URL (a
 * group of one server) or a group object {servers, balance, max_fails,
 * fail_timeout_ms, retries} (docs/configuration.md).
 *
 * Owns: the OPT_UPSTREAM setter, and copying and freeing struct
 * cfg_upstream. Checks every rule of a group that needs only the group:
 * a non-empty list, one scheme, weights 1..100, the ranges, retries at most
 * the number of servers minus one. Does not own the URL grammar (syntax.c)
 * nor when the value is set (load.c, routes.c). */
#include "internal.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define UPSTREAM_WEIGHT_MAX 100
#define UPSTREAM_MAX_FAILS_MAX 100
#define UPSTREAM_FAIL_TIMEOUT_MIN 100
#define UPSTREAM_FAIL_TIMEOUT_MAX 3600000

void cfg_upstream_free(struct cfg_upstream *u)
{
    for (size_t i = 0; i < u->n; i++)
        cfg_url_free(&u->servers[i].url);
    free(u->servers);
    memset(u, 0, sizeof *u);
}

void cfg_upstream_copy(struct cfg_upstream *dst, const struct cfg_upstream *src)
{
    *dst = *src;
    dst->servers = cfg_xcalloc(src->n ? src->n : 1, sizeof(*dst->servers));
    for (size_t i = 0; i < src->n; i++) {
        dst->servers[i].weight = src->servers[i].weight;
        cfg_url_copy(&dst->servers[i].url, &src->servers[i].url);
    }
}

/* One URL into url; the error names what is wrong with it. */
static int parse_server_url(const char *s, struct cfg_url *url, const char *where,
                            struct cfg_err *e)
{
    int rc = s ? cfg_parse_url(s, url) : -1;
    if (rc == -2) {
        const char *path = strchr(strstr(s, "://") + 3, '/');
        return cfg_fail(e, where,
                        "must be an http:// or https:// URL without a path (got %.64s): the "
                        "client's path is forwarded as it is",
                        path);
    }
    if (rc < 0) return cfg_fail(e, where, "must be an http:// or https:// URL with a host");
    return 0;
}

/* An integer member of the group object within [min, max]. */
static int group_int(const cJSON *it, long long min, long long max, int *out, const char *where,
                     struct cfg_err *e)
{
    double d = cJSON_IsNumber(it) ? it->valuedouble : NAN;
    if (!isfinite(d) || d != trunc(d) || d < (double)min || d > (double)max)
        return cfg_fail(e, where, "must be an integer %lld..%lld", min, max);
    *out = (int)d;
    return 0;
}

/* servers[i]: "URL" or {"url": "URL", "weight": N}. */
static int parse_server(const cJSON *it, struct cfg_server *out, const char *path,
                        struct cfg_err *e)
{
    char where[CFG_WHERE_LEN];
    snprintf(where, sizeof where, "config: %.200s", path);
    out->weight = 1;
    if (cJSON_IsString(it)) return parse_server_url(it->valuestring, &out->url, where, e);
    if (!cJSON_IsObject(it))
        return cfg_fail(e, where, "must be a URL or an object {\"url\", \"weight\"}");
    const cJSON *m;
    bool have_url = false;
    cJSON_ArrayForEach (m, it) {
        char kw[CFG_WHERE_LEN];
        cfg_where_key(kw, path, m->string);
        if (cfg_check_duplicate(it, m, kw, e) < 0) return -1;
        if (strcmp(m->string, "url") == 0) {
            if (have_url) cfg_url_free(&out->url);
            if (parse_server_url(cJSON_IsString(m) ? m->valuestring : NULL, &out->url, kw, e) < 0)
                return -1;
            have_url = true;
        } else if (strcmp(m->string, "weight") == 0) {
            if (group_int(m, 1, UPSTREAM_WEIGHT_MAX, &out->weight, kw, e) < 0) return -1;
        } else {
            return cfg_fail(e, kw, "unknown key");
        }
    }
    if (!have_url) {
        char kw[CFG_WHERE_LEN];
        cfg_where_key(kw, path, "url");
        return cfg_fail(e, kw, "is required");
    }
    return 0;
}

static int parse_servers(const cJSON *arr, struct cfg_upstream *g, const char *path,
                         struct cfg_err *e)
{
    char where[CFG_WHERE_LEN];
    snprintf(where, sizeof where, "config: %.200s", path);
    int n = cJSON_IsArray(arr) ? cJSON_GetArraySize(arr) : -1;
    if (n < 0) return cfg_fail(e, where, "must be a list of servers");
    if (n == 0) return cfg_fail(e, where, "must name at least one server");
    g->servers = cfg_xcalloc((size_t)n, sizeof(*g->servers));
    const cJSON *it;
    cJSON_ArrayForEach (it, arr) {
        char sub[CFG_PATH_LEN];
        snprintf(sub, sizeof sub, "%.200s[%zu]", path, g->n);
        int rc = parse_server(it, &g->servers[g->n], sub, e);
        g->n++; /* owned (and freed) from here, valid or not */
        if (rc < 0) return -1;
        if (g->servers[g->n - 1].url.tls != g->servers[0].url.tls)
            return cfg_fail(e, where, "mixes http:// and https:// servers: a group has one scheme");
    }
    return 0;
}

/* The group object; g is zeroed and owns what it holds even on error. */
static int parse_group(const cJSON *obj, struct cfg_upstream *g, const char *where,
                       struct cfg_err *e)
{
    const char *path = strncmp(where, "config: ", 8) == 0 ? where + 8 : where;
    const cJSON *it, *servers = NULL;
    bool have_retries = false;
    g->balance = CFG_BALANCE_ROUND_ROBIN;
    g->max_fails = 1;
    g->fail_timeout_ms = 10000;
    cJSON_ArrayForEach (it, obj) {
        char kw[CFG_WHERE_LEN];
        cfg_where_key(kw, path, it->string);
        if (cfg_check_duplicate(obj, it, kw, e) < 0) return -1;
        int rc = 0;
        if (strcmp(it->string, "servers") == 0) {
            servers = it;
        } else if (strcmp(it->string, "balance") == 0) {
            if (cJSON_IsString(it) && strcmp(it->valuestring, "round_robin") == 0)
                g->balance = CFG_BALANCE_ROUND_ROBIN;
            else if (cJSON_IsString(it) && strcmp(it->valuestring, "least_conn") == 0)
                g->balance = CFG_BALANCE_LEAST_CONN;
            else
                rc = cfg_fail(e, kw, "must be round_robin or least_conn");
        } else if (strcmp(it->string, "max_fails") == 0) {
            rc = group_int(it, 0, UPSTREAM_MAX_FAILS_MAX, &g->max_fails, kw, e);
        } else if (strcmp(it->string, "fail_timeout_ms") == 0) {
            rc = group_int(it, UPSTREAM_FAIL_TIMEOUT_MIN, UPSTREAM_FAIL_TIMEOUT_MAX,
                           &g->fail_timeout_ms, kw, e);
        } else if (strcmp(it->string, "retries") == 0) {
            rc = group_int(it, 0, INT32_MAX, &g->retries, kw, e);
            have_retries = true;
            g->retries_set = true;
        } else {
            rc = cfg_fail(e, kw, "unknown key");
        }
        if (rc < 0) return -1;
    }
    char kw[CFG_WHERE_LEN];
    cfg_where_key(kw, path, "servers");
    if (!servers) return cfg_fail(e, kw, "is required");
    char sub[CFG_PATH_LEN];
    snprintf(sub, sizeof sub, "%.200s.servers", path);
    if (parse_servers(servers, g, sub, e) < 0) return -1;
    if (!have_retries) {
        g->retries = (int)g->n - 1;
    } else if ((size_t)g->retries > g->n - 1) {
        cfg_where_key(kw, path, "retries");
        return cfg_fail(e, kw, "must be 0..%zu (the number of servers minus one)", g->n - 1);
    }
    return 0;
}

int cfg_set_upstream(void *field, const struct cfg_val *v, const char *where, struct cfg_err *e)
{
    struct cfg_upstream g;
    memset(&g, 0, sizeof g);
    if (v->json && cJSON_IsObject(v->json)) {
        if (parse_group(v->json, &g, where, e) < 0) {
            cfg_upstream_free(&g);
            return -1;
        }
    } else {
        const char *s = v->json ? (cJSON_IsString(v->json) ? v->json->valuestring : NULL) : v->text;
        g.servers = cfg_xcalloc(1, sizeof(*g.servers));
        g.servers[0].weight = 1;
        if (parse_server_url(s, &g.servers[0].url, where, e) < 0) {
            free(g.servers);
            return -1;
        }
        g.n = 1;
        g.balance = CFG_BALANCE_ROUND_ROBIN;
        g.max_fails = 1;
        g.fail_timeout_ms = 10000;
        g.retries = 0;
    }
    cfg_upstream_free(field);
    *(struct cfg_upstream *)field = g;
    return 0;
}
