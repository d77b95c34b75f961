/* dump.c — the effective configuration as JSON (-T, docs/configuration.md): what
 * every source merged into a struct cfg, written back in the file's own
 * shape, so that the text loads again with -c.
 *
 * Owns: walking the option tables (options.c) over a struct cfg, each
 * kind written as the JSON value its setter (values.c) reads; the routes;
 * the redaction of secrets (the password of redis.url, every
 * scope_secret), and the check that refuses a redacted value when such a
 * text is loaded again without the secret put back. Does not own: the
 * tables, the values, or printing (main.c). Written from the tables, a new
 * option is dumped without a line here; a new kind of option does not
 * compile until it has its case (the switch has no default). */
#include "internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static cJSON *str_or_empty(const char *s)
{
    return cJSON_CreateString(s ? s : "");
}

static cJSON *list_json(const struct cfg_strlist *l)
{
    cJSON *a = cJSON_CreateArray();
    for (size_t i = 0; i < l->n; i++)
        cJSON_AddItemToArray(a, cJSON_CreateString(l->v[i]));
    return a;
}

/* redis.url with its password (the userinfo after ':', up to the last '@',
 * as cfg_parse_redis_url reads it) replaced by CFG_REDACTED. */
static cJSON *redis_url_json(const struct cfg_redis *r, bool redact)
{
    const char *url = r->url ? r->url : "";
    const char *rest = strstr(url, "://");
    const char *at = rest ? strrchr(rest + 3, '@') : NULL;
    const char *colon = at ? memchr(rest + 3, ':', (size_t)(at - rest - 3)) : NULL;
    if (!redact || !r->password || !*r->password || !colon || colon + 1 == at)
        return cJSON_CreateString(url);
    size_t head = (size_t)(colon + 1 - url), n = head + strlen(CFG_REDACTED) + strlen(at) + 1;
    char *s = cfg_xcalloc(n, 1);
    memcpy(s, url, head);
    strcpy(s + head, CFG_REDACTED);
    strcat(s, at);
    cJSON *j = cJSON_CreateString(s);
    free(s);
    return j;
}

static bool is_secret(const struct cfg_opt *o)
{
    return (o->kind == OPT_STR && strcmp(o->name, "scope_secret") == 0) ||
           (o->kind == OPT_OPTSTR && strcmp(o->name, "token") == 0); /* admin.token */
}

/* One URL when the group is just that (loads back the same), else the
 * group object with every member. */
static cJSON *upstream_json(const struct cfg_upstream *u)
{
    if (u->n == 1 && u->servers[0].weight == 1 && u->balance == CFG_BALANCE_ROUND_ROBIN &&
        u->max_fails == 1 && u->fail_timeout_ms == 10000 && !u->retries_set)
        return str_or_empty(u->servers[0].url.text);
    cJSON *g = cJSON_CreateObject();
    cJSON *servers = cJSON_CreateArray();
    for (size_t i = 0; i < u->n; i++) {
        cJSON *srv = cJSON_CreateObject();
        cJSON_AddItemToObject(srv, "url", str_or_empty(u->servers[i].url.text));
        cJSON_AddItemToObject(srv, "weight", cJSON_CreateNumber(u->servers[i].weight));
        cJSON_AddItemToArray(servers, srv);
    }
    cJSON_AddItemToObject(g, "servers", servers);
    cJSON_AddItemToObject(
        g, "balance",
        cJSON_CreateString(u->balance == CFG_BALANCE_LEAST_CONN ? "least_conn" : "round_robin"));
    cJSON_AddItemToObject(g, "max_fails", cJSON_CreateNumber(u->max_fails));
    cJSON_AddItemToObject(g, "fail_timeout_ms", cJSON_CreateNumber(u->fail_timeout_ms));
    if (u->retries_set) cJSON_AddItemToObject(g, "retries", cJSON_CreateNumber(u->retries));
    return g;
}

/* One option of the section struct at base (c is the whole struct, for
 * the options that live outside their section's struct). */
static cJSON *opt_json(const struct cfg *c, const struct cfg_opt *o, const char *base, bool redact)
{
    const void *field = base + o->off;
    switch (o->kind) {
    case OPT_INT:
    case OPT_STATUS:
        return cJSON_CreateNumber(*(const int *)field);
    case OPT_U64:
        return cJSON_CreateNumber((double)*(const uint64_t *)field);
    case OPT_BOOL:
        return cJSON_CreateBool(*(const bool *)field);
    case OPT_ENUM:
        return cJSON_CreateString(o->choices[*(const int *)field]);
    case OPT_STR:
    case OPT_OPTSTR:
    case OPT_TOKEN:
    case OPT_KEYPREFIX: {
        const char *s = *(char *const *)field;
        if (redact && is_secret(o) && s && *s) s = CFG_REDACTED;
        return str_or_empty(s);
    }
    case OPT_TOKENS:
    case OPT_METHODS:
        return list_json(field);
    case OPT_SECRETS: {
        /* "env:NAME" names a secret without holding it: kept. */
        const struct cfg_strlist *l = field;
        cJSON *a = cJSON_CreateArray();
        for (size_t i = 0; i < l->n; i++)
            cJSON_AddItemToArray(a, cJSON_CreateString(redact && strncmp(l->v[i], "env:", 4) != 0
                                                           ? CFG_REDACTED
                                                           : l->v[i]));
        return a;
    }
    case OPT_NODES:
        return list_json(&((const struct cfg_redis *)base)->nodes);
    case OPT_ADDR:
        return str_or_empty(((const struct cfg_addr *)field)->text);
    case OPT_ADMIN:
        return cJSON_CreateString(c->admin_enabled ? ((const struct cfg_addr *)field)->text
                                                   : "off");
    case OPT_UPSTREAM:
        return upstream_json((const struct cfg_upstream *)field);
    case OPT_REDIS_URL:
        return redis_url_json((const struct cfg_redis *)base, redact);
    }
    abort();
}

static cJSON *section_json(const struct cfg *c, const struct cfg_opt *opts, size_t n,
                           const char *base, bool redact)
{
    cJSON *obj = cJSON_CreateObject();
    for (size_t i = 0; i < n; i++)
        cJSON_AddItemToObject(obj, opts[i].name, opt_json(c, &opts[i], base, redact));
    return obj;
}

/* Each route resolved: its own upstream (a route without one uses the
 * default group), every idempotency key (the global values it inherited
 * included), enabled. */
static cJSON *routes_json(const struct cfg *c, bool redact)
{
    cJSON *arr = cJSON_CreateArray();
    for (size_t i = 0; i < c->n_routes; i++) {
        const struct cfg_route *r = &c->routes[i];
        cJSON *o = cJSON_CreateObject();
        cJSON_AddItemToObject(o, "prefix", cJSON_CreateString(r->prefix));
        if (r->upstream_own) cJSON_AddItemToObject(o, "upstream", upstream_json(&r->upstream));
        cJSON *idem =
            section_json(c, cfg_idem_opts, cfg_n_idem_opts, (const char *)&r->idem, redact);
        for (size_t k = 0; k < cfg_n_idem_route_opts; k++)
            cJSON_AddItemToObject(
                idem, cfg_idem_route_opts[k].name,
                opt_json(c, &cfg_idem_route_opts[k], (const char *)&r->idem, redact));
        cJSON_AddItemToObject(o, "idempotency", idem);
        cJSON_AddItemToObject(o, "ratelimit",
                              section_json(c, cfg_ratelimit_opts, cfg_n_ratelimit_opts,
                                           (const char *)&r->ratelimit, redact));
        if (r->webhook.enabled)
            cJSON_AddItemToObject(o, "webhook",
                                  section_json(c, cfg_webhook_opts, cfg_n_webhook_opts,
                                               (const char *)&r->webhook, redact));
        cJSON_AddItemToArray(arr, o);
    }
    return arr;
}

/* The effective configuration as a tree: every section, then routes. */
static cJSON *cfg_tree(const struct cfg *c, bool redact)
{
    cJSON *root = cJSON_CreateObject();
    for (size_t s = 0; s < cfg_n_sections; s++) {
        const struct cfg_section *sec = &cfg_sections[s];
        const char *base = (const char *)c + sec->base;
        if (s == 0) {
            for (size_t i = 0; i < sec->n; i++)
                cJSON_AddItemToObject(root, sec->opts[i].name,
                                      opt_json(c, &sec->opts[i], base, redact));
            continue;
        }
        if (sec->opts == cfg_idem_route_opts) continue; /* valid inside routes[i] only */
        cJSON *obj = section_json(c, sec->opts, sec->n, base, redact);
        const char *dot = strchr(sec->name, '.');
        if (!dot) {
            cJSON_AddItemToObject(root, sec->name, obj);
            continue;
        }
        /* nested ("redis.tls"): its parent comes first in the table */
        char parent[CFG_WHERE_LEN];
        snprintf(parent, sizeof parent, "%.*s", (int)(dot - sec->name), sec->name);
        cJSON *p = cJSON_GetObjectItemCaseSensitive(root, parent);
        if (!p) abort(); /* a broken table is a programming error */
        cJSON_AddItemToObject(p, dot + 1, obj);
    }
    cJSON_AddItemToObject(root, "routes", routes_json(c, redact));
    return root;
}

bool cfg_section_equal(const struct cfg *a, const struct cfg *b, const char *section)
{
    cJSON *ta = cfg_tree(a, false), *tb = cfg_tree(b, false);
    bool same = cJSON_Compare(cJSON_GetObjectItemCaseSensitive(ta, section),
                              cJSON_GetObjectItemCaseSensitive(tb, section), true);
    cJSON_Delete(ta);
    cJSON_Delete(tb);
    return same;
}

size_t cfg_restart_changes(const struct cfg *a, const struct cfg *b, char *out, size_t outlen)
{
    cJSON *ta = cfg_tree(a, false), *tb = cfg_tree(b, false);
    size_t n = 0, used = 0;
    if (outlen) out[0] = '\0';
    for (size_t s = 0; s < cfg_n_sections; s++) {
        const struct cfg_section *sec = &cfg_sections[s];
        const cJSON *sa = s == 0 ? ta : cJSON_GetObjectItemCaseSensitive(ta, sec->name);
        const cJSON *sb = s == 0 ? tb : cJSON_GetObjectItemCaseSensitive(tb, sec->name);
        for (size_t i = 0; i < sec->n; i++) {
            if (!sec->opts[i].restart) continue;
            const char *k = sec->opts[i].name;
            if (cJSON_Compare(cJSON_GetObjectItemCaseSensitive(sa, k),
                              cJSON_GetObjectItemCaseSensitive(sb, k), true))
                continue;
            int w = snprintf(out + used, outlen - used, "%s%s%s%s", n ? ", " : "", sec->name,
                             s == 0 ? "" : ".", k);
            if (w > 0 && (size_t)w < outlen - used) used += (size_t)w;
            n++;
        }
    }
    cJSON_Delete(ta);
    cJSON_Delete(tb);
    return n;
}

char *cfg_dump_json(const struct cfg *c, bool redact)
{
    cJSON *root = cfg_tree(c, redact);
    char *text = cJSON_Print(root);
    cJSON_Delete(root);
    if (!text) abort();
    /* spaces, not cJSON's tabs: two per level of indentation, one after a
     * colon (a tab inside a string is escaped, so every tab is layout) */
    size_t tabs = 0, n = strlen(text);
    for (size_t i = 0; i < n; i++)
        tabs += text[i] == '\t';
    char *out = cfg_xcalloc(n + tabs + 2, 1), *o = out;
    for (size_t i = 0; i < n; i++) {
        if (text[i] != '\t') {
            *o++ = text[i];
            continue;
        }
        *o++ = ' ';
        if (i == 0 || text[i - 1] != ':') *o++ = ' ';
    }
    *o = '\n';
    cJSON_free(text);
    return out;
}

/* A redacted value loaded back without the secret put in again would run
 * with the wrong password or, worse, another scope key (every key of
 * every client would look new): refused, naming the key. */
int cfg_check_redacted(const struct cfg *c, struct cfg_err *e)
{
    static const char why[] = "holds the redacted value of -T; put the secret back";
    if (c->redis.password && strcmp(c->redis.password, CFG_REDACTED) == 0)
        return cfg_fail(e, "config: redis.url", "%s", why);
    if (c->idem.scope_secret && strcmp(c->idem.scope_secret, CFG_REDACTED) == 0)
        return cfg_fail(e, "config: idempotency.scope_secret", "%s", why);
    if (c->admin_token && strcmp(c->admin_token, CFG_REDACTED) == 0)
        return cfg_fail(e, "config: admin.token", "%s", why);
    for (size_t i = 0; i < c->n_routes; i++) {
        const char *s = c->routes[i].idem.scope_secret;
        if (!s || strcmp(s, CFG_REDACTED) != 0) continue;
        char where[CFG_WHERE_LEN]; /* routes are sorted: named by prefix, not index */
        snprintf(where, sizeof where, "config: routes[%.200s].idempotency.scope_secret",
                 c->routes[i].prefix);
        return cfg_fail(e, where, "%s", why);
    }
    return 0;
}
