/* load.c — builds a read-only struct cfg (docs/configuration.md):
 * cfg_load and cfg_load_json.
 *
 * Owns: the order of the sources, built-in defaults < the JSON file < the
 * environment < the flags, then the policy checks, the routes (which
 * inherit the global values once every source has been applied) and the
 * cross-checks; reading the file; resolving workers = 0 to the CPU count;
 * freeing a half-built struct on any error. Does not own: reading flags
 * from argv (main.c), the tables (options.c), the values (values.c), or
 * acting on any value. */
#include "internal.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define CFG_MAX_FILE_BYTES (16u * 1024 * 1024)

static void apply_defaults(struct cfg *c)
{
    struct cfg_err none = {NULL, 0};
    for (size_t s = 0; s < cfg_n_sections; s++) {
        const struct cfg_section *sec = &cfg_sections[s];
        for (size_t i = 0; i < sec->n; i++) {
            struct cfg_val v = {NULL, sec->opts[i].def};
            if (cfg_opt_set(&sec->opts[i], (char *)c + sec->base, &v, "default", &none) < 0)
                abort(); /* a broken table is a programming error */
        }
    }
}

static int apply_override(struct cfg *c, const struct cfg_override *ov, const char *text,
                          const char *where, struct cfg_err *e)
{
    const struct cfg_section *sec =
        ov->section[0] ? cfg_find_section(ov->section) : &cfg_sections[0];
    const struct cfg_opt *o = cfg_find_opt(sec->opts, sec->n, ov->key);
    struct cfg_val v = {NULL, text};
    if (!o) abort();
    return cfg_opt_set(o, (char *)c + sec->base, &v, where, e);
}

/* An empty variable counts as unset (as `VAR=` in a compose file means). */
static int apply_env(struct cfg *c, struct cfg_err *e)
{
    char where[CFG_WHERE_LEN];
    for (size_t i = 0; i < cfg_n_env_vars; i++) {
        const char *text = getenv(cfg_env_vars[i].name);
        if (!text || !*text) continue;
        snprintf(where, sizeof where, "env %s", cfg_env_vars[i].name);
        if (apply_override(c, &cfg_env_vars[i], text, where, e) < 0) return -1;
    }
    return 0;
}

static int apply_flags(struct cfg *c, const struct cfg_flags *flags, struct cfg_err *e)
{
    char where[CFG_WHERE_LEN];
    if (!flags) return 0;
    for (size_t i = 0; i < cfg_n_flag_vars; i++) {
        const char *text = *(const char *const *)((const char *)flags + cfg_flag_vars[i].flag_off);
        if (!text) continue;
        snprintf(where, sizeof where, "flag %s", cfg_flag_vars[i].name);
        if (apply_override(c, &cfg_flag_vars[i], text, where, e) < 0) return -1;
    }
    return 0;
}

static void resolve_workers(struct cfg *c)
{
    if (c->workers != 0) return;
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    c->workers = n < 1 ? 1 : (n > 1024 ? 1024 : (int)n);
}

static int load(struct cfg *c, const char *name, const char *json, size_t len, bool use_env,
                const struct cfg_flags *flags, struct cfg_err *e)
{
    cJSON *root = NULL;
    const cJSON *routes = NULL;
    memset(c, 0, sizeof *c);
    apply_defaults(c);
    if (json) {
        char *buf = cfg_xcalloc(len + 1, 1);
        memcpy(buf, json, len);
        root = cfg_parse_json(name, buf, len, e);
        free(buf);
        if (!root) goto fail;
        if (!cJSON_IsObject(root)) {
            char where[CFG_WHERE_LEN];
            snprintf(where, sizeof where, "config: %s", name);
            cfg_fail(e, where, "must be a JSON object");
            goto fail;
        }
        if (cfg_apply_file(c, root, &routes, e) < 0) goto fail;
    }
    if ((use_env && apply_env(c, e) < 0) || apply_flags(c, flags, e) < 0 ||
        cfg_check_idem_policy(c, &c->idem, "idempotency", false, e) < 0 ||
        cfg_build_routes(c, routes, e) < 0 || cfg_check_cross(c, e) < 0)
        goto fail;
    resolve_workers(c);
    cJSON_Delete(root);
    return 0;
fail:
    cJSON_Delete(root);
    cfg_free(c);
    return -1;
}

static int read_file(const char *path, char **out, size_t *len, struct cfg_err *e)
{
    char where[CFG_WHERE_LEN];
    snprintf(where, sizeof where, "config: cannot read %s", path);
    FILE *f = fopen(path, "rb");
    if (!f) return cfg_fail(e, where, "%s", strerror(errno));
    size_t cap = 4096, n = 0;
    char *buf = cfg_xcalloc(cap, 1);
    for (;;) {
        if (n == cap) {
            if (cap >= CFG_MAX_FILE_BYTES) {
                free(buf);
                fclose(f);
                return cfg_fail(e, where, "%s", strerror(EFBIG));
            }
            cap *= 2;
            char *nb = realloc(buf, cap);
            if (!nb) abort();
            buf = nb;
        }
        size_t got = fread(buf + n, 1, cap - n, f);
        n += got;
        if (got == 0) break;
    }
    int err = ferror(f) ? (errno ? errno : EIO) : 0;
    fclose(f);
    if (err) {
        free(buf);
        return cfg_fail(e, where, "%s", strerror(err));
    }
    *out = buf;
    *len = n;
    return 0;
}

int cfg_load(struct cfg *c, const struct cfg_flags *flags, char *err, size_t errlen)
{
    struct cfg_err e = {err, errlen};
    const char *path = flags ? flags->config_file : NULL;
    if (err && errlen) err[0] = '\0';
    if (!path) return load(c, NULL, NULL, 0, true, flags, &e);
    char *text = NULL;
    size_t len = 0;
    if (read_file(path, &text, &len, &e) < 0) {
        memset(c, 0, sizeof *c);
        return -1;
    }
    int rc = load(c, path, text, len, true, flags, &e);
    free(text);
    return rc;
}

int cfg_load_json(struct cfg *c, const char *json, size_t len, bool use_env,
                  const struct cfg_flags *flags, char *err, size_t errlen)
{
    struct cfg_err e = {err, errlen};
    if (err && errlen) err[0] = '\0';
    const char *name = flags && flags->config_file ? flags->config_file : "(json)";
    return load(c, name, json ? json : "", json ? len : 0, use_env, flags, &e);
}
