/* json.c — the config file's JSON (cJSON).
 *
 * Owns: parsing the whole text (trailing garbage and NUL bytes are errors
 * naming the line), refusing duplicate keys and unknown keys, and walking
 * an object against a section's table, each member set through
 * cfg_opt_set with its JSON path for the message. Does not own: reading
 * the file or the order of the sources (load.c), the routes array
 * (routes.c), or the values (values.c). */
#include "internal.h"

#include <stdio.h>
#include <string.h>

static int line_of(const char *s, size_t len, size_t off)
{
    int line = 1;
    for (size_t i = 0; i < off && i < len; i++)
        if (s[i] == '\n') line++;
    return line;
}

/* Parses the whole text; trailing garbage and NUL bytes are errors. buf is
 * NUL-terminated at len, so cJSON never reads past it. */
cJSON *cfg_parse_json(const char *name, const char *buf, size_t len, struct cfg_err *e)
{
    const char *end = NULL;
    char where[CFG_WHERE_LEN];
    snprintf(where, sizeof where, "config: %s", name);
    const char *nul = memchr(buf, '\0', len);
    if (nul)
        return cfg_fail(e, where, "invalid JSON near line %d",
                        line_of(buf, len, (size_t)(nul - buf))),
               NULL;
    cJSON *root = cJSON_ParseWithLengthOpts(buf, len, &end, false);
    if (root) {
        while (end < buf + len && strchr(" \t\r\n", *end) && *end)
            end++;
        if (end == buf + len) return root;
        cJSON_Delete(root);
    }
    size_t off = (end && end >= buf && end <= buf + len) ? (size_t)(end - buf) : len;
    cfg_fail(e, where, "invalid JSON near line %d", line_of(buf, len, off));
    return NULL;
}

/* -1 when an earlier member of obj has the same key as item. */
int cfg_check_duplicate(const cJSON *obj, const cJSON *item, const char *where, struct cfg_err *e)
{
    for (const cJSON *p = obj->child; p && p != item; p = p->next)
        if (strcmp(p->string, item->string) == 0) return cfg_fail(e, where, "duplicate key");
    return 0;
}

/* The section nested in the section at path under key ("redis" + "tls":
 * "redis.tls"), and where its struct is, given base, the struct of the
 * section at path. NULL when there is none (always inside routes[i]). */
static const struct cfg_section *nested_section(const char *path, const char *key, char *base,
                                                char **nested_base)
{
    const struct cfg_section *parent = strchr(path, '.') ? NULL : cfg_find_section(path);
    char name[CFG_WHERE_LEN];
    if (!parent || strchr(key, '.')) return NULL;
    if (snprintf(name, sizeof name, "%s.%s", path, key) >= (int)sizeof name) return NULL;
    const struct cfg_section *sec = cfg_find_section(name);
    if (!sec) return NULL;
    /* both bases are offsets inside struct cfg */
    *nested_base = base - parent->base + sec->base;
    return sec;
}

/* Applies a JSON object to one section's struct; extra is a second table
 * that is also valid there (routes[i].idempotency's "enabled"). A member
 * that names a nested section ("tls" in "redis") is applied to it. */
int cfg_apply_object(const cJSON *obj, const char *path, char *base, const struct cfg_opt *opts,
                     size_t n, const struct cfg_opt *extra, size_t n_extra, struct cfg_err *e)
{
    char where[CFG_WHERE_LEN];
    if (!cJSON_IsObject(obj)) {
        snprintf(where, sizeof where, "config: %s", path);
        return cfg_fail(e, where, "must be an object");
    }
    const cJSON *it;
    cJSON_ArrayForEach (it, obj) {
        cfg_where_key(where, path, it->string);
        if (cfg_check_duplicate(obj, it, where, e) < 0) return -1;
        const struct cfg_opt *o = cfg_find_opt(opts, n, it->string);
        if (!o && extra) o = cfg_find_opt(extra, n_extra, it->string);
        if (!o) {
            char *nbase;
            const struct cfg_section *sec = nested_section(path, it->string, base, &nbase);
            if (!sec) return cfg_fail(e, where, "unknown key");
            if (cfg_apply_object(it, sec->name, nbase, sec->opts, sec->n, NULL, 0, e) < 0)
                return -1;
            continue;
        }
        struct cfg_val v = {it, NULL};
        if (cfg_opt_set(o, base, &v, where, e) < 0) return -1;
    }
    return 0;
}

/* The file's top level: options, sections, and routes (kept for later,
 * because routes inherit the global values after env and flags). */
int cfg_apply_file(struct cfg *c, const cJSON *root, const cJSON **routes, struct cfg_err *e)
{
    char where[CFG_WHERE_LEN];
    const cJSON *it;
    cJSON_ArrayForEach (it, root) {
        cfg_where_key(where, "", it->string);
        if (cfg_check_duplicate(root, it, where, e) < 0) return -1;
        if (strcmp(it->string, "routes") == 0) {
            *routes = it;
            continue;
        }
        /* "redis.tls" is a section, but only as "tls" inside "redis" */
        const struct cfg_section *sec =
            strchr(it->string, '.') ? NULL : cfg_find_section(it->string);
        if (sec) {
            if (cfg_apply_object(it, it->string, (char *)c + sec->base, sec->opts, sec->n, NULL, 0,
                                 e) < 0)
                return -1;
            continue;
        }
        const struct cfg_opt *o = cfg_find_opt(cfg_sections[0].opts, cfg_sections[0].n, it->string);
        if (!o) return cfg_fail(e, where, "unknown key");
        struct cfg_val v = {it, NULL};
        if (cfg_opt_set(o, (char *)c, &v, where, e) < 0) return -1;
    }
    return 0;
}
