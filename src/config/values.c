/* values.c — one value into one option, and the error line when it does
 * not fit.
 *
 * Owns: cfg_fail (the "<where>: <message>" line every config error is) and
 * the setter of each kind of option (OPT_*): an integer within bounds, a
 * boolean, one of an enum's names, a string, a header name, a status, a
 * list of tokens or methods, redis.nodes, an address, admin.listen, an
 * http(s) URL, redis.url, redis.key_prefix. Each takes a JSON value or a
 * text (a default, an environment variable, a flag) and says in its
 * message what the value must be. Does not own: the tables (options.c),
 * the grammars (syntax.c), or when which source is applied (load.c).
 *
 * Every option is set through one path, cfg_opt_set(), whatever its
 * source: the built-in default (a text in the table), a JSON value, an
 * environment variable or a flag. A setter parses into temporaries and
 * only replaces the old value once the new one is valid, so the struct
 * always owns exactly what it points to and cfg_free() can run at any
 * point. */
#include "internal.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Writes "<where>: <message>" and returns -1. Control bytes (which a key
 * name in the file may hold) become '?' so the message stays one line. */
int cfg_fail(struct cfg_err *e, const char *where, const char *fmt, ...)
{
    if (!e->buf || e->len == 0) return -1;
    int n = snprintf(e->buf, e->len, "%s: ", where);
    if (n >= 0 && (size_t)n < e->len) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(e->buf + n, e->len - (size_t)n, fmt, ap);
        va_end(ap);
    }
    for (char *p = e->buf; *p; p++)
        if ((unsigned char)*p < 0x20 || *p == 0x7f) *p = '?';
    return -1;
}

/* "config: " + path, the prefix of every error about a key. */
void cfg_where_key(char *out, const char *parent, const char *key)
{
    snprintf(out, CFG_WHERE_LEN, "config: %s%s%s", parent, *parent ? "." : "", key);
}

/* An integral JSON number, or a text of decimal digits; -1 when not an
 * integer. Compared as a double, so a huge number is out of range rather
 * than overflowing (digits past 2^53 count as huge). */
static int val_int(const struct cfg_val *v, double *out)
{
    if (v->json) {
        if (!cJSON_IsNumber(v->json)) return -1;
        double d = v->json->valuedouble;
        if (!isfinite(d) || d != trunc(d)) return -1;
        *out = d;
        return 0;
    }
    size_t n = strlen(v->text);
    long long ll;
    if (n == 0 || strspn(v->text, "0123456789") != n) return -1;
    *out = cfg_parse_uint(v->text, n, 1LL << 53, &ll) < 0 ? 1e300 : (double)ll;
    return 0;
}

static const char *val_str(const struct cfg_val *v)
{
    if (!v->json) return v->text;
    return cJSON_IsString(v->json) ? v->json->valuestring : NULL;
}

/* A JSON array of strings, or a comma-separated text ("" = empty list). */
static int val_list(const struct cfg_val *v, struct cfg_strlist *out)
{
    memset(out, 0, sizeof *out);
    if (!v->json) {
        const char *p = v->text;
        while (*p) {
            const char *comma = strchr(p, ',');
            size_t n = comma ? (size_t)(comma - p) : strlen(p);
            cfg_strlist_push(out, p, n);
            p += n + (comma ? 1 : 0);
        }
        return 0;
    }
    if (!cJSON_IsArray(v->json)) return -1;
    const cJSON *it;
    cJSON_ArrayForEach (it, v->json) {
        if (!cJSON_IsString(it)) {
            cfg_strlist_free(out);
            return -1;
        }
        cfg_strlist_push(out, it->valuestring, strlen(it->valuestring));
    }
    return 0;
}

static void enum_message(const struct cfg_opt *o, char *out, size_t len)
{
    size_t n = 0, used = 0;
    while (o->choices[n])
        n++;
    out[0] = '\0';
    for (size_t i = 0; i < n; i++) {
        const char *sep = i == 0 ? "" : (i + 1 == n ? " or " : ", ");
        int w = snprintf(out + used, len - used, "%s%s", sep, o->choices[i]);
        if (w < 0 || (size_t)w >= len - used) break;
        used += (size_t)w;
    }
}

static int set_int(const struct cfg_opt *o, void *field, const struct cfg_val *v, const char *where,
                   struct cfg_err *e)
{
    double d;
    if (val_int(v, &d) < 0 || d < (double)o->min)
        return cfg_fail(e, where, "must be an integer >= %lld", o->min);
    if (d > (double)o->max) return cfg_fail(e, where, "must be an integer <= %lld", o->max);
    if (o->kind == OPT_U64)
        *(uint64_t *)field = (uint64_t)d;
    else
        *(int *)field = (int)d;
    return 0;
}

static int set_bool(void *field, const struct cfg_val *v, const char *where, struct cfg_err *e)
{
    if (v->json) {
        if (!cJSON_IsBool(v->json)) return cfg_fail(e, where, "must be true or false");
        *(bool *)field = cJSON_IsTrue(v->json);
        return 0;
    }
    if (strcmp(v->text, "true") != 0 && strcmp(v->text, "false") != 0)
        return cfg_fail(e, where, "must be true or false");
    *(bool *)field = v->text[0] == 't';
    return 0;
}

static int set_enum(const struct cfg_opt *o, void *field, const struct cfg_val *v,
                    const char *where, struct cfg_err *e)
{
    const char *s = val_str(v);
    for (int i = 0; s && o->choices[i]; i++) {
        if (strcmp(s, o->choices[i]) == 0) {
            *(int *)field = i;
            return 0;
        }
    }
    char msg[128];
    enum_message(o, msg, sizeof msg);
    return cfg_fail(e, where, "must be %s", msg);
}

static void replace_str(void *field, const char *s, bool empty_is_null)
{
    char **p = field;
    free(*p);
    *p = (empty_is_null && !*s) ? NULL : cfg_xstrdup(s);
}

static int set_string(const struct cfg_opt *o, void *field, const struct cfg_val *v,
                      const char *where, struct cfg_err *e)
{
    const char *s = val_str(v);
    switch (o->kind) {
    case OPT_TOKEN:
        if (!s || !cfg_is_token(s)) return cfg_fail(e, where, "must be a valid HTTP header name");
        break;
    case OPT_KEYPREFIX:
        if (!s || strpbrk(s, "{}")) return cfg_fail(e, where, "must be a string without { or }");
        break;
    default:
        if (!s) return cfg_fail(e, where, "must be a string");
        break;
    }
    replace_str(field, s, o->kind == OPT_OPTSTR);
    return 0;
}

static int set_status(void *field, const struct cfg_val *v, const char *where, struct cfg_err *e)
{
    double d;
    if (val_int(v, &d) < 0 || (d != 409 && d != 422))
        return cfg_fail(e, where, "must be 409 or 422");
    *(int *)field = (int)d;
    return 0;
}

static int set_list(const struct cfg_opt *o, void *field, const struct cfg_val *v,
                    const char *where, struct cfg_err *e)
{
    static const char *const msgs[] = {
        [OPT_TOKENS] = "must be an array of HTTP header names",
        [OPT_METHODS] = "must be upper-case HTTP method tokens",
    };
    struct cfg_strlist l;
    if (val_list(v, &l) < 0) return cfg_fail(e, where, "%s", msgs[o->kind]);
    for (size_t i = 0; i < l.n; i++) {
        bool ok = o->kind == OPT_TOKENS ? cfg_is_token(l.v[i]) : cfg_is_method(l.v[i]);
        if (!ok) {
            cfg_strlist_free(&l);
            return cfg_fail(e, where, "%s", msgs[o->kind]);
        }
    }
    cfg_strlist_free(field);
    *(struct cfg_strlist *)field = l;
    return 0;
}

/* A list of secrets: strings, none empty. */
static int set_secrets(void *field, const struct cfg_val *v, const char *where, struct cfg_err *e)
{
    struct cfg_strlist l;
    if (val_list(v, &l) < 0) return cfg_fail(e, where, "must be an array of strings");
    for (size_t i = 0; i < l.n; i++) {
        if (!l.v[i][0]) {
            cfg_strlist_free(&l);
            return cfg_fail(e, where, "must not hold an empty string");
        }
    }
    cfg_strlist_free(field);
    *(struct cfg_strlist *)field = l;
    return 0;
}

/* redis.nodes: each entry is parsed where it is checked and kept both as
 * given (for messages) and parsed (the store never parses it again). */
static int set_nodes(char *base, const struct cfg_val *v, const char *where, struct cfg_err *e)
{
    struct cfg_redis *r = (struct cfg_redis *)base;
    struct cfg_strlist l;
    if (val_list(v, &l) < 0) return cfg_fail(e, where, "must be an array of host:port strings");
    struct cfg_hostport *hp = cfg_xcalloc(l.n ? l.n : 1, sizeof *hp);
    for (size_t i = 0; i < l.n; i++) {
        char *host;
        if (cfg_parse_hostport(l.v[i], strlen(l.v[i]), 0, &host, &hp[i].port) < 0) {
            char w[CFG_WHERE_LEN + 24];
            snprintf(w, sizeof w, "%s[%zu]", where, i);
            cfg_strlist_free(&l);
            free(hp);
            return cfg_fail(e, w, "must be host:port");
        }
        snprintf(hp[i].host, sizeof hp[i].host, "%s", host);
        free(host);
    }
    cfg_strlist_free(&r->nodes);
    free(r->node_addrs);
    r->nodes = l;
    r->node_addrs = hp;
    return 0;
}

static int set_addr(const struct cfg_opt *o, char *base, void *field, const struct cfg_val *v,
                    const char *where, struct cfg_err *e)
{
    const char *s = val_str(v);
    struct cfg_addr a;
    if (o->kind == OPT_ADMIN) {
        struct cfg *c = (struct cfg *)base;
        if (s && strcmp(s, "off") == 0) {
            cfg_addr_free(field);
            c->admin_enabled = false;
            return 0;
        }
        if (!s || cfg_parse_addr(s, &a) < 0) return cfg_fail(e, where, "must be host:port or off");
        c->admin_enabled = true;
    } else if (!s || cfg_parse_addr(s, &a) < 0) {
        return cfg_fail(e, where, "must be host:port");
    }
    cfg_addr_free(field);
    *(struct cfg_addr *)field = a;
    return 0;
}

static int set_redis_url(char *base, const struct cfg_val *v, const char *where, struct cfg_err *e)
{
    struct cfg_redis *r = (struct cfg_redis *)base;
    const char *s = val_str(v);
    struct cfg_redis_target t;
    if (!s || cfg_parse_redis_url(s, &t) < 0)
        return cfg_fail(e, where,
                        "must be redis[s]://[[user]:password@]host[:port][/db] or unix:///path");
    free(r->url);
    free(r->host);
    free(r->username);
    free(r->password);
    r->url = cfg_xstrdup(s);
    r->unix_socket = t.unix_socket;
    r->tls = t.tls;
    r->host = t.host;
    r->port = t.port;
    r->username = t.username;
    r->password = t.password;
    r->db = t.db;
    return 0;
}

/* Sets one option of the section struct at base from v. */
int cfg_opt_set(const struct cfg_opt *o, char *base, const struct cfg_val *v, const char *where,
                struct cfg_err *e)
{
    void *field = base + o->off;
    switch (o->kind) {
    case OPT_INT:
    case OPT_U64:
        return set_int(o, field, v, where, e);
    case OPT_BOOL:
        return set_bool(field, v, where, e);
    case OPT_ENUM:
        return set_enum(o, field, v, where, e);
    case OPT_STR:
    case OPT_OPTSTR:
    case OPT_TOKEN:
    case OPT_KEYPREFIX:
        return set_string(o, field, v, where, e);
    case OPT_STATUS:
        return set_status(field, v, where, e);
    case OPT_TOKENS:
    case OPT_METHODS:
        return set_list(o, field, v, where, e);
    case OPT_SECRETS:
        return set_secrets(field, v, where, e);
    case OPT_NODES:
        return set_nodes(base, v, where, e);
    case OPT_ADDR:
    case OPT_ADMIN:
        return set_addr(o, base, field, v, where, e);
    case OPT_UPSTREAM:
        return cfg_set_upstream(field, v, where, e);
    case OPT_REDIS_URL:
        return set_redis_url(base, v, where, e);
    }
    abort();
}
