/* config.c — builds the frozen struct cfg (SPEC sections 1 and 2).
 *
 * Owns: the option tables (name, kind, bounds, default), the JSON walk
 * (cJSON), the environment and flag overrides, the value parsers (HTTP
 * tokens, host:port, http(s) URLs, Redis URLs), route resolution and
 * cfg_free. Does not own: reading flags from argv (main.c) or acting on
 * any value.
 *
 * Every option is set through one path, opt_set(), whatever its source:
 * the built-in default (a text in the table), a JSON value, an environment
 * variable or a flag. A setter parses into temporaries and only replaces
 * the old value once the new one is valid, so the struct always owns
 * exactly what it points to and cfg_free() can run at any point. */
#include "idemgate/config/config.h"

#include <arpa/inet.h>
#include <cjson/cJSON.h>
#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

#define CFG_MAX_FILE_BYTES (16u * 1024 * 1024)
#define CFG_PATH_LEN 256  /* a JSON path, e.g. routes[3].idempotency */
#define CFG_WHERE_LEN 320 /* "config: " + a path + a key */

/* ---------------------------------------------------------------- memory */

static void *xcalloc(size_t n, size_t size)
{
    void *p = calloc(n ? n : 1, size ? size : 1);
    if (!p) abort();
    return p;
}

static char *xstrndup(const char *s, size_t n)
{
    char *p = strndup(s, n);
    if (!p) abort();
    return p;
}

static char *xstrdup(const char *s)
{
    return xstrndup(s, strlen(s));
}

static void strlist_free(struct cfg_strlist *l)
{
    for (size_t i = 0; i < l->n; i++)
        free(l->v[i]);
    free(l->v);
    l->v = NULL;
    l->n = 0;
}

static void strlist_push(struct cfg_strlist *l, const char *s, size_t n)
{
    char **v = realloc(l->v, (l->n + 1) * sizeof *v);
    if (!v) abort();
    l->v = v;
    l->v[l->n++] = xstrndup(s, n);
}

static void strlist_copy(struct cfg_strlist *dst, const struct cfg_strlist *src)
{
    memset(dst, 0, sizeof *dst);
    for (size_t i = 0; i < src->n; i++)
        strlist_push(dst, src->v[i], strlen(src->v[i]));
}

static void url_free(struct cfg_url *u)
{
    free(u->host);
    free(u->text);
    memset(u, 0, sizeof *u);
}

static void url_copy(struct cfg_url *dst, const struct cfg_url *src)
{
    dst->tls = src->tls;
    dst->port = src->port;
    dst->host = src->host ? xstrdup(src->host) : NULL;
    dst->text = src->text ? xstrdup(src->text) : NULL;
}

static void addr_free(struct cfg_addr *a)
{
    free(a->host);
    free(a->text);
    memset(a, 0, sizeof *a);
}

static void idem_free(struct cfg_idem *m)
{
    free(m->header);
    free(m->scope_secret);
    strlist_free(&m->methods);
    strlist_free(&m->scope_headers);
    strlist_free(&m->fingerprint_headers);
    strlist_free(&m->replay_exclude_headers);
    memset(m, 0, sizeof *m);
}

static void idem_copy(struct cfg_idem *dst, const struct cfg_idem *src)
{
    *dst = *src;
    dst->header = src->header ? xstrdup(src->header) : NULL;
    dst->scope_secret = src->scope_secret ? xstrdup(src->scope_secret) : NULL;
    strlist_copy(&dst->methods, &src->methods);
    strlist_copy(&dst->scope_headers, &src->scope_headers);
    strlist_copy(&dst->fingerprint_headers, &src->fingerprint_headers);
    strlist_copy(&dst->replay_exclude_headers, &src->replay_exclude_headers);
}

static void redis_free(struct cfg_redis *r)
{
    free(r->url);
    free(r->host);
    free(r->username);
    free(r->password);
    free(r->master_name);
    free(r->key_prefix);
    strlist_free(&r->nodes);
    free(r->node_addrs);
    memset(r, 0, sizeof *r);
}

void cfg_free(struct cfg *c)
{
    if (!c) return;
    addr_free(&c->listen);
    url_free(&c->upstream);
    redis_free(&c->redis);
    idem_free(&c->idem);
    addr_free(&c->admin_listen);
    free(c->tls_cert_file);
    free(c->tls_key_file);
    free(c->upstream_tls_ca_file);
    free(c->upstream_tls_server_name);
    for (size_t i = 0; i < c->n_routes; i++) {
        free(c->routes[i].prefix);
        url_free(&c->routes[i].upstream);
        idem_free(&c->routes[i].idem);
    }
    free(c->routes);
    memset(c, 0, sizeof *c);
}

/* ---------------------------------------------------------------- errors */

struct cfg_err {
    char *buf;
    size_t len;
};

/* Writes "<where>: <message>" and returns -1. Control bytes (which a key
 * name in the file may hold) become '?' so the message stays one line. */
__attribute__((format(printf, 3, 4))) static int fail(struct cfg_err *e, const char *where,
                                                      const char *fmt, ...)
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
static void where_key(char *out, const char *parent, const char *key)
{
    snprintf(out, CFG_WHERE_LEN, "config: %s%s%s", parent, *parent ? "." : "", key);
}

/* ---------------------------------------------------------------- parsers */

static bool is_tchar(unsigned char ch)
{
    if ((ch >= '0' && ch <= '9') || (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z'))
        return true;
    return ch && strchr("!#$%&'*+-.^_`|~", ch) != NULL;
}

static bool is_token(const char *s)
{
    if (!*s) return false;
    for (; *s; s++)
        if (!is_tchar((unsigned char)*s)) return false;
    return true;
}

static bool is_method(const char *s)
{
    if (!is_token(s)) return false;
    for (; *s; s++)
        if (*s >= 'a' && *s <= 'z') return false;
    return true;
}

/* Decimal digits only, value <= max. */
static int parse_uint(const char *s, size_t n, long long max, long long *out)
{
    long long v = 0;
    if (n == 0) return -1;
    for (size_t i = 0; i < n; i++) {
        if (s[i] < '0' || s[i] > '9') return -1;
        v = v * 10 + (s[i] - '0');
        if (v > max) return -1;
    }
    *out = v;
    return 0;
}

static bool is_hostname(const char *s, size_t n)
{
    if (n == 0 || n > 253) return false;
    for (size_t i = 0; i < n; i++) {
        unsigned char ch = (unsigned char)s[i];
        if (!((ch >= '0' && ch <= '9') || (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') ||
              ch == '-' || ch == '.' || ch == '_'))
            return false;
    }
    return true;
}

/* Parses "host[:port]" or "[v6][:port]" (s[0..n)). The port is required
 * when def_port is 0. Returns the host without brackets (caller frees). */
static int parse_hostport(const char *s, size_t n, int def_port, char **host, int *port)
{
    const char *h, *rest;
    size_t hlen;
    if (n > 0 && s[0] == '[') {
        const char *close = memchr(s, ']', n);
        char tmp[INET6_ADDRSTRLEN];
        struct in6_addr a6;
        if (!close) return -1;
        h = s + 1;
        hlen = (size_t)(close - h);
        if (hlen == 0 || hlen >= sizeof tmp) return -1;
        memcpy(tmp, h, hlen);
        tmp[hlen] = '\0';
        if (inet_pton(AF_INET6, tmp, &a6) != 1) return -1;
        rest = close + 1;
    } else {
        const char *colon = memchr(s, ':', n);
        h = s;
        hlen = colon ? (size_t)(colon - s) : n;
        if (!is_hostname(h, hlen)) return -1;
        rest = s + hlen;
    }
    size_t rlen = n - (size_t)(rest - s);
    long long p = def_port;
    if (rlen == 0) {
        if (def_port == 0) return -1;
    } else if (rest[0] != ':' || parse_uint(rest + 1, rlen - 1, 65535, &p) < 0 || p < 1) {
        return -1;
    }
    *host = xstrndup(h, hlen);
    *port = (int)p;
    return 0;
}

/* "host:port", "[v6]:port" or "*:port" (any IPv4 address). */
static int parse_addr(const char *s, struct cfg_addr *out)
{
    memset(out, 0, sizeof *out);
    if (s[0] == '*' && s[1] == ':') {
        long long p;
        if (parse_uint(s + 2, strlen(s + 2), 65535, &p) < 0 || p < 1) return -1;
        out->host = xstrdup("0.0.0.0");
        out->port = (int)p;
    } else if (parse_hostport(s, strlen(s), 0, &out->host, &out->port) < 0) {
        return -1;
    }
    out->text = xstrdup(s);
    return 0;
}

static bool prefix_ci(const char *s, const char *prefix)
{
    return strncasecmp(s, prefix, strlen(prefix)) == 0;
}

/* "http://host[:port][/]" or "https://...": no path, query or userinfo. */
static int parse_url(const char *s, struct cfg_url *out)
{
    const char *auth;
    memset(out, 0, sizeof *out);
    if (prefix_ci(s, "http://")) {
        auth = s + 7;
    } else if (prefix_ci(s, "https://")) {
        out->tls = true;
        auth = s + 8;
    } else {
        return -1;
    }
    size_t n = strlen(auth);
    if (n > 0 && auth[n - 1] == '/') n--;
    if (memchr(auth, '/', n) || memchr(auth, '@', n)) return -1;
    if (parse_hostport(auth, n, out->tls ? 443 : 80, &out->host, &out->port) < 0) return -1;
    out->text = xstrdup(s);
    return 0;
}

static int hexval(char ch)
{
    if (ch >= '0' && ch <= '9') return ch - '0';
    if (ch >= 'a' && ch <= 'f') return ch - 'a' + 10;
    if (ch >= 'A' && ch <= 'F') return ch - 'A' + 10;
    return -1;
}

/* Percent-decodes s[0..n) into a new string; NULL when malformed. */
static char *percent_decode(const char *s, size_t n)
{
    char *out = xcalloc(n + 1, 1);
    size_t j = 0;
    for (size_t i = 0; i < n; i++) {
        if (s[i] != '%') {
            out[j++] = s[i];
            continue;
        }
        int hi = i + 2 < n ? hexval(s[i + 1]) : -1;
        int lo = i + 2 < n ? hexval(s[i + 2]) : -1;
        if (hi < 0 || lo < 0 || (hi == 0 && lo == 0)) {
            free(out);
            return NULL;
        }
        out[j++] = (char)(hi * 16 + lo);
        i += 2;
    }
    return out;
}

struct redis_target {
    bool unix_socket;
    char *host;
    int port;
    char *username;
    char *password;
    int db;
};

static void redis_target_free(struct redis_target *t)
{
    free(t->host);
    free(t->username);
    free(t->password);
}

/* The userinfo of a Redis URL, "[user]:password" (s[0..n)): an ACL user
 * with its password, or the password of the default user; both
 * percent-decoded. ":" alone means neither. */
static int parse_redis_userinfo(const char *s, size_t n, struct redis_target *t)
{
    const char *colon = memchr(s, ':', n);
    if (!colon) return -1; /* "user@" without a password is not in the grammar */
    size_t ulen = (size_t)(colon - s), plen = n - ulen - 1;
    if (ulen > 0 && !(t->username = percent_decode(s, ulen))) return -1;
    if (plen > 0 && !(t->password = percent_decode(colon + 1, plen))) return -1;
    if (t->username && !t->password) t->password = xstrdup("");
    return 0;
}

/* "redis://[[user]:password@]host[:port][/db]" or "unix:///path". The
 * database is any number Redis may have (--databases can be large). */
static int parse_redis_url(const char *s, struct redis_target *t)
{
    memset(t, 0, sizeof *t);
    if (strncmp(s, "unix://", 7) == 0) {
        if (s[7] != '/' || s[8] == '\0') return -1;
        t->unix_socket = true;
        t->host = xstrdup(s + 7);
        return 0;
    }
    if (strncmp(s, "redis://", 8) != 0) return -1;
    const char *rest = s + 8;
    const char *at = strrchr(rest, '@');
    if (at) {
        if (parse_redis_userinfo(rest, (size_t)(at - rest), t) < 0) goto bad;
        rest = at + 1;
    }
    const char *slash = strchr(rest, '/');
    size_t hlen = slash ? (size_t)(slash - rest) : strlen(rest);
    long long db = 0;
    if (slash && slash[1] && parse_uint(slash + 1, strlen(slash + 1), INT_MAX, &db) < 0) goto bad;
    if (parse_hostport(rest, hlen, 6379, &t->host, &t->port) < 0) goto bad;
    t->db = (int)db;
    return 0;
bad:
    redis_target_free(t);
    return -1;
}

/* ---------------------------------------------------------------- options */

enum opt_kind {
    OPT_INT,       /* int in [min, max] */
    OPT_U64,       /* uint64_t in [min, max] */
    OPT_BOOL,      /* true | false */
    OPT_STR,       /* any string, never NULL */
    OPT_OPTSTR,    /* any string, "" stored as NULL */
    OPT_ENUM,      /* one of choices, stored as its index */
    OPT_TOKEN,     /* an HTTP token (header name) */
    OPT_TOKENS,    /* a list of HTTP tokens */
    OPT_METHODS,   /* a list of upper-case HTTP tokens */
    OPT_NODES,     /* a list of host:port, kept parsed too (struct cfg_redis base only) */
    OPT_ADDR,      /* host:port */
    OPT_ADMIN,     /* host:port or "off" (struct cfg base only) */
    OPT_URL,       /* http(s)://host[:port] */
    OPT_REDIS_URL, /* the whole struct cfg_redis target (struct cfg_redis base only) */
    OPT_STATUS,    /* 409 | 422 */
    OPT_KEYPREFIX  /* a string without hash-tag braces */
};

struct cfg_opt {
    const char *name;
    enum opt_kind kind;
    size_t off; /* from the section's base struct */
    long long min, max;
    const char *const *choices; /* OPT_ENUM, NULL-terminated */
    const char *def;            /* the default, as text */
};

/* A JSON value, or a text (a default, an env variable or a flag). */
struct cfg_val {
    const cJSON *json;
    const char *text;
};

#define OPT(n, k, s, f, lo, hi, ch, d)                                                             \
    {                                                                                              \
        n, k, offsetof(s, f), lo, hi, ch, d                                                        \
    }
#define O_INT(s, f, lo, hi, d) OPT(#f, OPT_INT, s, f, lo, hi, NULL, d)
#define O_U64(s, f, lo, hi, d) OPT(#f, OPT_U64, s, f, lo, hi, NULL, d)
#define O_KIND(n, k, s, f, d) OPT(n, k, s, f, 0, 0, NULL, d)
#define O_ENUM(n, s, f, ch, d) OPT(n, OPT_ENUM, s, f, 0, 0, ch, d)

static const char *const store_names[] = {"redis", "memory", NULL};
static const char *const mode_names[] = {"standalone", "cluster", "sentinel", NULL};
static const char *const failure_names[] = {"closed", "open", NULL};
static const char *const anon_names[] = {"shared", "reject", "bypass", NULL};
static const char *const conc_names[] = {"reject", "wait", NULL};
static const char *const unknown_names[] = {"release", "keep", NULL};
static const char *const errfmt_names[] = {"json", "problem", NULL};
static const char *const level_names[] = {"debug", "info", "warn", "error", NULL};

_Static_assert(sizeof(enum cfg_store) == sizeof(int), "enums are stored through int *");
_Static_assert(sizeof(enum cfg_log_level) == sizeof(int), "enums are stored through int *");
_Static_assert(sizeof(enum cfg_unknown) == sizeof(int), "enums are stored through int *");

static const struct cfg_opt top_opts[] = {
    O_KIND("listen", OPT_ADDR, struct cfg, listen, "0.0.0.0:8080"),
    O_INT(struct cfg, workers, 0, 1024, "0"),
    O_KIND("upstream", OPT_URL, struct cfg, upstream, "http://127.0.0.1:9000"),
    O_ENUM("store", struct cfg, store, store_names, "redis"),
    O_ENUM("error_format", struct cfg, error_format, errfmt_names, "json"),
};

static const struct cfg_opt redis_opts[] = {
    O_ENUM("mode", struct cfg_redis, mode, mode_names, "standalone"),
    O_KIND("url", OPT_REDIS_URL, struct cfg_redis, url, "redis://127.0.0.1:6379/0"),
    O_KIND("nodes", OPT_NODES, struct cfg_redis, nodes, ""),
    O_KIND("master_name", OPT_OPTSTR, struct cfg_redis, master_name, ""),
    O_KIND("key_prefix", OPT_KEYPREFIX, struct cfg_redis, key_prefix, "idem:"),
    O_INT(struct cfg_redis, timeout_ms, 1, 600000, "1000"),
    O_ENUM("failure_mode", struct cfg_redis, failure_mode, failure_names, "closed"),
    O_INT(struct cfg_redis, wait_replicas, 0, 64, "0"),
};

static const struct cfg_opt memory_opts[] = {
    OPT("max_bytes", OPT_U64, struct cfg, memory_max_bytes, 1048576, 68719476736LL, NULL,
        "268435456"),
    /* 0: no limit of its own (a scope may fill max_bytes); above max_bytes
     * it binds no tighter than max_bytes */
    OPT("max_scope_bytes", OPT_U64, struct cfg, memory_max_scope_bytes, 0, 68719476736LL, NULL,
        "33554432"),
};

static const struct cfg_opt idem_opts[] = {
    O_KIND("header", OPT_TOKEN, struct cfg_idem, header, "Idempotency-Key"),
    O_KIND("methods", OPT_METHODS, struct cfg_idem, methods, "POST,PATCH"),
    O_KIND("required", OPT_BOOL, struct cfg_idem, required, "false"),
    O_INT(struct cfg_idem, key_max_length, 1, 8192, "255"),
    O_INT(struct cfg_idem, ttl_seconds, 1, 31536000, "86400"),
    O_INT(struct cfg_idem, lock_seconds, 1, 86400, "30"),
    O_KIND("scope_headers", OPT_TOKENS, struct cfg_idem, scope_headers, "Authorization,X-API-Key"),
    O_ENUM("anonymous", struct cfg_idem, anonymous, anon_names, "shared"),
    O_KIND("scope_secret", OPT_STR, struct cfg_idem, scope_secret, ""),
    O_KIND("fingerprint_headers", OPT_TOKENS, struct cfg_idem, fingerprint_headers, "Content-Type"),
    O_KIND("mismatch_status", OPT_STATUS, struct cfg_idem, mismatch_status, "409"),
    O_ENUM("concurrent", struct cfg_idem, concurrent, conc_names, "reject"),
    O_INT(struct cfg_idem, wait_max_ms, 0, 600000, "5000"),
    O_KIND("cache_5xx", OPT_BOOL, struct cfg_idem, cache_5xx, "false"),
    O_ENUM("unknown_outcome", struct cfg_idem, unknown_outcome, unknown_names, "release"),
    O_U64(struct cfg_idem, max_cached_response_bytes, 0, 1073741824, "1048576"),
    O_KIND("replay_exclude_headers", OPT_TOKENS, struct cfg_idem, replay_exclude_headers,
           "Set-Cookie,Date,Server,RateLimit-Limit,RateLimit-Remaining,RateLimit-Reset"),
};

/* Valid only inside routes[i].idempotency (and set to true globally). */
static const struct cfg_opt idem_route_opts[] = {
    O_KIND("enabled", OPT_BOOL, struct cfg_idem, enabled, "true"),
};

static const struct cfg_opt limits_opts[] = {
    O_U64(struct cfg_limits, max_request_body_bytes, 0, 4294967296LL, "10485760"),
    O_U64(struct cfg_limits, max_header_bytes, 1024, 1048576, "65536"),
    O_INT(struct cfg_limits, upstream_connect_timeout_ms, 1, 3600000, "2000"),
    O_INT(struct cfg_limits, upstream_timeout_ms, 1, 3600000, "60000"),
    O_INT(struct cfg_limits, client_timeout_ms, 1, 3600000, "60000"),
    O_INT(struct cfg_limits, max_connections, 1, 1000000, "10000"),
    O_INT(struct cfg_limits, shutdown_grace_ms, 0, 3600000, "10000"),
};

static const struct cfg_opt admin_opts[] = {
    O_KIND("listen", OPT_ADMIN, struct cfg, admin_listen, "127.0.0.1:9091"),
};

static const struct cfg_opt tls_opts[] = {
    O_KIND("cert_file", OPT_OPTSTR, struct cfg, tls_cert_file, ""),
    O_KIND("key_file", OPT_OPTSTR, struct cfg, tls_key_file, ""),
};

static const struct cfg_opt upstream_tls_opts[] = {
    O_KIND("ca_file", OPT_OPTSTR, struct cfg, upstream_tls_ca_file, ""),
    O_KIND("verify", OPT_BOOL, struct cfg, upstream_tls_verify, "true"),
    O_KIND("server_name", OPT_OPTSTR, struct cfg, upstream_tls_server_name, ""),
};

static const struct cfg_opt log_opts[] = {
    O_ENUM("level", struct cfg, log_level, level_names, "info"),
    O_KIND("access", OPT_BOOL, struct cfg, log_access, "true"),
};

#define NOPTS(a) (sizeof(a) / sizeof((a)[0]))

struct cfg_section {
    const char *name; /* "" for the top level */
    size_t base;      /* offset of the section's struct inside struct cfg */
    const struct cfg_opt *opts;
    size_t n;
};

static const struct cfg_section sections[] = {
    {"", 0, top_opts, NOPTS(top_opts)},
    {"redis", offsetof(struct cfg, redis), redis_opts, NOPTS(redis_opts)},
    {"memory", 0, memory_opts, NOPTS(memory_opts)},
    {"idempotency", offsetof(struct cfg, idem), idem_opts, NOPTS(idem_opts)},
    {"idempotency", offsetof(struct cfg, idem), idem_route_opts, NOPTS(idem_route_opts)},
    {"limits", offsetof(struct cfg, limits), limits_opts, NOPTS(limits_opts)},
    {"admin", 0, admin_opts, NOPTS(admin_opts)},
    {"tls", 0, tls_opts, NOPTS(tls_opts)},
    {"upstream_tls", 0, upstream_tls_opts, NOPTS(upstream_tls_opts)},
    {"log", 0, log_opts, NOPTS(log_opts)},
};

/* Environment variables and flags, each naming one option by its path. */
struct cfg_override {
    const char *name;
    const char *section;
    const char *key;
    size_t flag_off; /* into struct cfg_flags (flags only) */
};

static const struct cfg_override env_vars[] = {
    {"IDEMGATE_LISTEN", "", "listen", 0},
    {"IDEMGATE_UPSTREAM", "", "upstream", 0},
    {"IDEMGATE_STORE", "", "store", 0},
    {"IDEMGATE_REDIS_URL", "redis", "url", 0},
    {"IDEMGATE_WORKERS", "", "workers", 0},
    {"IDEMGATE_ADMIN_LISTEN", "admin", "listen", 0},
    {"IDEMGATE_SCOPE_SECRET", "idempotency", "scope_secret", 0},
    {"IDEMGATE_LOG_LEVEL", "log", "level", 0},
    {"IDEMPOTENCY_TTL_SECONDS", "idempotency", "ttl_seconds", 0},
};

static const struct cfg_override flag_vars[] = {
    {"--listen", "", "listen", offsetof(struct cfg_flags, listen)},
    {"--upstream", "", "upstream", offsetof(struct cfg_flags, upstream)},
    {"--store", "", "store", offsetof(struct cfg_flags, store)},
    {"--redis", "redis", "url", offsetof(struct cfg_flags, redis)},
    {"--workers", "", "workers", offsetof(struct cfg_flags, workers)},
    {"--admin", "admin", "listen", offsetof(struct cfg_flags, admin)},
};

static const struct cfg_opt *find_opt(const struct cfg_opt *opts, size_t n, const char *name)
{
    for (size_t i = 0; i < n; i++)
        if (strcmp(opts[i].name, name) == 0) return &opts[i];
    return NULL;
}

/* ---------------------------------------------------------------- setters */

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
    *out = parse_uint(v->text, n, 1LL << 53, &ll) < 0 ? 1e300 : (double)ll;
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
            strlist_push(out, p, n);
            p += n + (comma ? 1 : 0);
        }
        return 0;
    }
    if (!cJSON_IsArray(v->json)) return -1;
    const cJSON *it;
    cJSON_ArrayForEach(it, v->json)
    {
        if (!cJSON_IsString(it)) {
            strlist_free(out);
            return -1;
        }
        strlist_push(out, it->valuestring, strlen(it->valuestring));
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
        return fail(e, where, "must be an integer >= %lld", o->min);
    if (d > (double)o->max) return fail(e, where, "must be an integer <= %lld", o->max);
    if (o->kind == OPT_U64)
        *(uint64_t *)field = (uint64_t)d;
    else
        *(int *)field = (int)d;
    return 0;
}

static int set_bool(void *field, const struct cfg_val *v, const char *where, struct cfg_err *e)
{
    if (v->json) {
        if (!cJSON_IsBool(v->json)) return fail(e, where, "must be true or false");
        *(bool *)field = cJSON_IsTrue(v->json);
        return 0;
    }
    if (strcmp(v->text, "true") != 0 && strcmp(v->text, "false") != 0)
        return fail(e, where, "must be true or false");
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
    return fail(e, where, "must be %s", msg);
}

static void replace_str(void *field, const char *s, bool empty_is_null)
{
    char **p = field;
    free(*p);
    *p = (empty_is_null && !*s) ? NULL : xstrdup(s);
}

static int set_string(const struct cfg_opt *o, void *field, const struct cfg_val *v,
                      const char *where, struct cfg_err *e)
{
    const char *s = val_str(v);
    switch (o->kind) {
    case OPT_TOKEN:
        if (!s || !is_token(s)) return fail(e, where, "must be a valid HTTP header name");
        break;
    case OPT_KEYPREFIX:
        if (!s || strpbrk(s, "{}")) return fail(e, where, "must be a string without { or }");
        break;
    default:
        if (!s) return fail(e, where, "must be a string");
        break;
    }
    replace_str(field, s, o->kind == OPT_OPTSTR);
    return 0;
}

static int set_status(void *field, const struct cfg_val *v, const char *where, struct cfg_err *e)
{
    double d;
    if (val_int(v, &d) < 0 || (d != 409 && d != 422)) return fail(e, where, "must be 409 or 422");
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
    if (val_list(v, &l) < 0) return fail(e, where, "%s", msgs[o->kind]);
    for (size_t i = 0; i < l.n; i++) {
        bool ok = o->kind == OPT_TOKENS ? is_token(l.v[i]) : is_method(l.v[i]);
        if (!ok) {
            strlist_free(&l);
            return fail(e, where, "%s", msgs[o->kind]);
        }
    }
    strlist_free(field);
    *(struct cfg_strlist *)field = l;
    return 0;
}

/* redis.nodes: each entry is parsed where it is checked and kept both as
 * given (for messages) and parsed (the store never parses it again). */
static int set_nodes(char *base, const struct cfg_val *v, const char *where, struct cfg_err *e)
{
    struct cfg_redis *r = (struct cfg_redis *)base;
    struct cfg_strlist l;
    if (val_list(v, &l) < 0) return fail(e, where, "must be an array of host:port strings");
    struct cfg_hostport *hp = xcalloc(l.n ? l.n : 1, sizeof *hp);
    for (size_t i = 0; i < l.n; i++) {
        char *host;
        if (parse_hostport(l.v[i], strlen(l.v[i]), 0, &host, &hp[i].port) < 0) {
            char w[CFG_WHERE_LEN + 24];
            snprintf(w, sizeof w, "%s[%zu]", where, i);
            strlist_free(&l);
            free(hp);
            return fail(e, w, "must be host:port");
        }
        snprintf(hp[i].host, sizeof hp[i].host, "%s", host);
        free(host);
    }
    strlist_free(&r->nodes);
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
            addr_free(field);
            c->admin_enabled = false;
            return 0;
        }
        if (!s || parse_addr(s, &a) < 0) return fail(e, where, "must be host:port or off");
        c->admin_enabled = true;
    } else if (!s || parse_addr(s, &a) < 0) {
        return fail(e, where, "must be host:port");
    }
    addr_free(field);
    *(struct cfg_addr *)field = a;
    return 0;
}

static int set_url(void *field, const struct cfg_val *v, const char *where, struct cfg_err *e)
{
    const char *s = val_str(v);
    struct cfg_url u;
    if (!s || parse_url(s, &u) < 0)
        return fail(e, where, "must be an http:// or https:// URL with a host");
    url_free(field);
    *(struct cfg_url *)field = u;
    return 0;
}

static int set_redis_url(char *base, const struct cfg_val *v, const char *where, struct cfg_err *e)
{
    struct cfg_redis *r = (struct cfg_redis *)base;
    const char *s = val_str(v);
    struct redis_target t;
    if (!s || parse_redis_url(s, &t) < 0)
        return fail(e, where, "must be redis://[[user]:password@]host[:port][/db] or unix:///path");
    free(r->url);
    free(r->host);
    free(r->username);
    free(r->password);
    r->url = xstrdup(s);
    r->unix_socket = t.unix_socket;
    r->host = t.host;
    r->port = t.port;
    r->username = t.username;
    r->password = t.password;
    r->db = t.db;
    return 0;
}

/* Sets one option of the section struct at base from v. */
static int opt_set(const struct cfg_opt *o, char *base, const struct cfg_val *v, const char *where,
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
    case OPT_NODES:
        return set_nodes(base, v, where, e);
    case OPT_ADDR:
    case OPT_ADMIN:
        return set_addr(o, base, field, v, where, e);
    case OPT_URL:
        return set_url(field, v, where, e);
    case OPT_REDIS_URL:
        return set_redis_url(base, v, where, e);
    }
    abort();
}

static void apply_defaults(struct cfg *c)
{
    struct cfg_err none = {NULL, 0};
    for (size_t s = 0; s < NOPTS(sections); s++) {
        const struct cfg_section *sec = &sections[s];
        for (size_t i = 0; i < sec->n; i++) {
            struct cfg_val v = {NULL, sec->opts[i].def};
            if (opt_set(&sec->opts[i], (char *)c + sec->base, &v, "default", &none) < 0)
                abort(); /* a broken table is a programming error */
        }
    }
}

/* ---------------------------------------------------------------- JSON */

/* -1 when an earlier member of obj has the same key as item. */
static int check_duplicate(const cJSON *obj, const cJSON *item, const char *where,
                           struct cfg_err *e)
{
    for (const cJSON *p = obj->child; p && p != item; p = p->next)
        if (strcmp(p->string, item->string) == 0) return fail(e, where, "duplicate key");
    return 0;
}

/* Applies a JSON object to one section's struct; extra is a second table
 * that is also valid there (routes[i].idempotency's "enabled"). */
static int apply_object(const cJSON *obj, const char *path, char *base, const struct cfg_opt *opts,
                        size_t n, const struct cfg_opt *extra, size_t n_extra, struct cfg_err *e)
{
    char where[CFG_WHERE_LEN];
    if (!cJSON_IsObject(obj)) {
        snprintf(where, sizeof where, "config: %s", path);
        return fail(e, where, "must be an object");
    }
    const cJSON *it;
    cJSON_ArrayForEach(it, obj)
    {
        where_key(where, path, it->string);
        if (check_duplicate(obj, it, where, e) < 0) return -1;
        const struct cfg_opt *o = find_opt(opts, n, it->string);
        if (!o && extra) o = find_opt(extra, n_extra, it->string);
        if (!o) return fail(e, where, "unknown key");
        struct cfg_val v = {it, NULL};
        if (opt_set(o, base, &v, where, e) < 0) return -1;
    }
    return 0;
}

static const struct cfg_section *find_section(const char *name)
{
    for (size_t s = 1; s < NOPTS(sections); s++)
        if (strcmp(sections[s].name, name) == 0) return &sections[s];
    return NULL;
}

/* The file's top level: options, sections, and routes (kept for later,
 * because routes inherit the global values after env and flags). */
static int apply_file(struct cfg *c, const cJSON *root, const cJSON **routes, struct cfg_err *e)
{
    char where[CFG_WHERE_LEN];
    const cJSON *it;
    cJSON_ArrayForEach(it, root)
    {
        where_key(where, "", it->string);
        if (check_duplicate(root, it, where, e) < 0) return -1;
        if (strcmp(it->string, "routes") == 0) {
            *routes = it;
            continue;
        }
        const struct cfg_section *sec = find_section(it->string);
        if (sec) {
            if (apply_object(it, it->string, (char *)c + sec->base, sec->opts, sec->n, NULL, 0, e) <
                0)
                return -1;
            continue;
        }
        const struct cfg_opt *o = find_opt(top_opts, NOPTS(top_opts), it->string);
        if (!o) return fail(e, where, "unknown key");
        struct cfg_val v = {it, NULL};
        if (opt_set(o, (char *)c, &v, where, e) < 0) return -1;
    }
    return 0;
}

/* ---------------------------------------------------------------- env, flags */

static int apply_override(struct cfg *c, const struct cfg_override *ov, const char *text,
                          const char *where, struct cfg_err *e)
{
    const struct cfg_section *sec = ov->section[0] ? find_section(ov->section) : &sections[0];
    const struct cfg_opt *o = find_opt(sec->opts, sec->n, ov->key);
    struct cfg_val v = {NULL, text};
    if (!o) abort();
    return opt_set(o, (char *)c + sec->base, &v, where, e);
}

/* An empty variable counts as unset (as `VAR=` in a compose file means). */
static int apply_env(struct cfg *c, struct cfg_err *e)
{
    char where[CFG_WHERE_LEN];
    for (size_t i = 0; i < NOPTS(env_vars); i++) {
        const char *text = getenv(env_vars[i].name);
        if (!text || !*text) continue;
        snprintf(where, sizeof where, "env %s", env_vars[i].name);
        if (apply_override(c, &env_vars[i], text, where, e) < 0) return -1;
    }
    return 0;
}

static int apply_flags(struct cfg *c, const struct cfg_flags *flags, struct cfg_err *e)
{
    char where[CFG_WHERE_LEN];
    if (!flags) return 0;
    for (size_t i = 0; i < NOPTS(flag_vars); i++) {
        const char *text = *(const char *const *)((const char *)flags + flag_vars[i].flag_off);
        if (!text) continue;
        snprintf(where, sizeof where, "flag %s", flag_vars[i].name);
        if (apply_override(c, &flag_vars[i], text, where, e) < 0) return -1;
    }
    return 0;
}

/* ---------------------------------------------------------------- policy checks */

/* Hop-by-hop and framing headers: a proxy consumes or rewrites them, so a
 * key or a scope read from one is not what the client meant to send. */
static bool is_hop_or_framing(const char *name)
{
    static const char *const names[] = {"Connection",        "Keep-Alive", "TE",
                                        "Trailer",           "Upgrade",    "Content-Length",
                                        "Transfer-Encoding", NULL};
    if (prefix_ci(name, "Proxy-")) return true;
    for (size_t i = 0; names[i]; i++)
        if (strcasecmp(name, names[i]) == 0) return true;
    return false;
}

/* A renewal is sent a third of the way into a lock and may take up to
 * redis.timeout_ms: it must be able to finish (or fail) before the lock
 * expires, so timeout_ms < 2/3 lock_seconds. */
static int check_lock_vs_timeout(const struct cfg *c, const struct cfg_idem *m, const char *path,
                                 bool is_route, struct cfg_err *e)
{
    long long timeout = c->redis.timeout_ms, lock_ms = (long long)m->lock_seconds * 1000;
    if (c->store != CFG_STORE_REDIS || timeout * 3 < lock_ms * 2) return 0;
    char where[CFG_WHERE_LEN];
    if (!is_route) {
        return fail(e, "config: redis.timeout_ms",
                    "must be below two thirds of %s.lock_seconds (at most %lld with "
                    "lock_seconds %d)",
                    path, (lock_ms * 2 - 1) / 3, m->lock_seconds);
    }
    where_key(where, path, "lock_seconds");
    return fail(e, where,
                "must be more than 1.5 times redis.timeout_ms (at least %lld with %lld ms)",
                timeout * 3 / 2000 + 1, timeout);
}

/* The rules of SPEC section 2 that tie one idempotency policy's keys
 * together; path is "idempotency" or "routes[i].idempotency". A route with
 * the engine off is not checked: none of its keys is used. */
static int check_idem_policy(const struct cfg *c, const struct cfg_idem *m, const char *path,
                             bool is_route, struct cfg_err *e)
{
    char where[CFG_WHERE_LEN];
    if (!m->enabled) return 0;
    if (check_lock_vs_timeout(c, m, path, is_route, e) < 0) return -1;
    if (m->required && m->methods.n == 0) {
        where_key(where, path, "required");
        return fail(e, where, "cannot be true when methods is empty");
    }
    if (is_hop_or_framing(m->header)) {
        where_key(where, path, "header");
        return fail(e, where, "must not be a hop-by-hop or framing header (%s)", m->header);
    }
    for (size_t i = 0; i < m->scope_headers.n; i++) {
        if (!is_hop_or_framing(m->scope_headers.v[i])) continue;
        char key[48];
        snprintf(key, sizeof key, "scope_headers[%zu]", i);
        where_key(where, path, key);
        return fail(e, where, "must not name a hop-by-hop or framing header (%s)",
                    m->scope_headers.v[i]);
    }
    return 0;
}

/* ---------------------------------------------------------------- routes */

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
    where_key(where, path, it->string);
    if (strcmp(it->string, "prefix") == 0) {
        if (!cJSON_IsString(it) || !is_route_prefix(it->valuestring))
            return fail(e, where, "must be a path starting with /");
        r->prefix = xstrdup(it->valuestring);
        return 0;
    }
    if (strcmp(it->string, "upstream") == 0) {
        struct cfg_val v = {it, NULL};
        return set_url(&r->upstream, &v, where, e);
    }
    if (strcmp(it->string, "idempotency") == 0) {
        char sub[CFG_PATH_LEN];
        snprintf(sub, sizeof sub, "%.200s.idempotency", path);
        return apply_object(it, sub, (char *)&r->idem, idem_opts, NOPTS(idem_opts), idem_route_opts,
                            NOPTS(idem_route_opts), e);
    }
    return fail(e, where, "unknown key");
}

/* routes[i]: the global idempotency settings (after env and flags),
 * overridden key by key; the global upstream unless it names its own. */
static int build_route(const struct cfg *c, struct cfg_route *r, const cJSON *obj, size_t i,
                       struct cfg_err *e)
{
    char path[32], where[CFG_WHERE_LEN];
    snprintf(path, sizeof path, "routes[%zu]", i);
    snprintf(where, sizeof where, "config: %s", path);
    if (!cJSON_IsObject(obj)) return fail(e, where, "must be an object");
    idem_copy(&r->idem, &c->idem);
    r->idem.enabled = true;
    const cJSON *it;
    cJSON_ArrayForEach(it, obj)
    {
        char kw[CFG_WHERE_LEN];
        where_key(kw, path, it->string);
        if (check_duplicate(obj, it, kw, e) < 0 || route_member(r, it, path, e) < 0) return -1;
    }
    if (!r->prefix) {
        where_key(where, path, "prefix");
        return fail(e, where, "is required");
    }
    if (!r->upstream.host) url_copy(&r->upstream, &c->upstream);
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

static int build_routes(struct cfg *c, const cJSON *arr, struct cfg_err *e)
{
    if (!arr) return 0;
    if (!cJSON_IsArray(arr)) return fail(e, "config: routes", "must be an array of objects");
    size_t n = (size_t)cJSON_GetArraySize(arr);
    if (n == 0) return 0;
    c->routes = xcalloc(n, sizeof *c->routes);
    c->n_routes = n;
    size_t i = 0;
    const cJSON *it;
    cJSON_ArrayForEach(it, arr)
    {
        char path[CFG_PATH_LEN];
        snprintf(path, sizeof path, "routes[%zu].idempotency", i);
        if (build_route(c, &c->routes[i], it, i, e) < 0 ||
            check_idem_policy(c, &c->routes[i].idem, path, true, e) < 0)
            return -1;
        i++;
    }
    for (i = 1; i < n; i++) {
        for (size_t j = 0; j < i; j++) {
            if (strcmp(c->routes[i].prefix, c->routes[j].prefix) == 0) {
                char where[CFG_WHERE_LEN];
                snprintf(where, sizeof where, "config: routes[%zu].prefix", i);
                return fail(e, where, "duplicates routes[%zu].prefix", j);
            }
        }
    }
    sort_routes(c->routes, n);
    return 0;
}

/* ---------------------------------------------------------------- loading */

/* Rules across keys, checked once every source has been applied. */
static int check_cross(const struct cfg *c, struct cfg_err *e)
{
    const struct cfg_redis *r = &c->redis;
    const char *mode = mode_names[r->mode];
    if (r->mode != CFG_REDIS_STANDALONE && r->nodes.n == 0)
        return fail(e, "config: redis.nodes", "must list at least one host:port when mode is %s",
                    mode);
    if (r->mode == CFG_REDIS_SENTINEL && !r->master_name)
        return fail(e, "config: redis.master_name", "is required when mode is sentinel");
    if (c->tls_cert_file && !c->tls_key_file)
        return fail(e, "config: tls.key_file", "is required when tls.cert_file is set");
    if (c->tls_key_file && !c->tls_cert_file)
        return fail(e, "config: tls.cert_file", "is required when tls.key_file is set");
    return 0;
}

static void resolve_workers(struct cfg *c)
{
    if (c->workers != 0) return;
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    c->workers = n < 1 ? 1 : (n > 1024 ? 1024 : (int)n);
}

static int line_of(const char *s, size_t len, size_t off)
{
    int line = 1;
    for (size_t i = 0; i < off && i < len; i++)
        if (s[i] == '\n') line++;
    return line;
}

/* Parses the whole text; trailing garbage and NUL bytes are errors. buf is
 * NUL-terminated at len, so cJSON never reads past it. */
static cJSON *parse_json(const char *name, const char *buf, size_t len, struct cfg_err *e)
{
    const char *end = NULL;
    char where[CFG_WHERE_LEN];
    snprintf(where, sizeof where, "config: %s", name);
    const char *nul = memchr(buf, '\0', len);
    if (nul)
        return fail(e, where, "invalid JSON near line %d", line_of(buf, len, (size_t)(nul - buf))),
               NULL;
    cJSON *root = cJSON_ParseWithLengthOpts(buf, len, &end, false);
    if (root) {
        while (end < buf + len && strchr(" \t\r\n", *end) && *end)
            end++;
        if (end == buf + len) return root;
        cJSON_Delete(root);
    }
    size_t off = (end && end >= buf && end <= buf + len) ? (size_t)(end - buf) : len;
    fail(e, where, "invalid JSON near line %d", line_of(buf, len, off));
    return NULL;
}

static int load(struct cfg *c, const char *name, const char *json, size_t len, bool use_env,
                const struct cfg_flags *flags, struct cfg_err *e)
{
    cJSON *root = NULL;
    const cJSON *routes = NULL;
    memset(c, 0, sizeof *c);
    apply_defaults(c);
    if (json) {
        char *buf = xcalloc(len + 1, 1);
        memcpy(buf, json, len);
        root = parse_json(name, buf, len, e);
        free(buf);
        if (!root) goto fail;
        if (!cJSON_IsObject(root)) {
            char where[CFG_WHERE_LEN];
            snprintf(where, sizeof where, "config: %s", name);
            fail(e, where, "must be a JSON object");
            goto fail;
        }
        if (apply_file(c, root, &routes, e) < 0) goto fail;
    }
    if ((use_env && apply_env(c, e) < 0) || apply_flags(c, flags, e) < 0 ||
        check_idem_policy(c, &c->idem, "idempotency", false, e) < 0 ||
        build_routes(c, routes, e) < 0 || check_cross(c, e) < 0)
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
    if (!f) return fail(e, where, "%s", strerror(errno));
    size_t cap = 4096, n = 0;
    char *buf = xcalloc(cap, 1);
    for (;;) {
        if (n == cap) {
            if (cap >= CFG_MAX_FILE_BYTES) {
                free(buf);
                fclose(f);
                return fail(e, where, "%s", strerror(EFBIG));
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
        return fail(e, where, "%s", strerror(err));
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

/* ---------------------------------------------------------------- lookups */

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
