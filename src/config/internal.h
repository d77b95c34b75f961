/* internal.h — what the files of the config (src/config/) share, and
 * nothing else includes: the option tables' structs, the error line, the
 * value grammars and setters, and the steps cfg_load strings together.
 *
 * It lives next to the sources, not under include/idemgate/, because no
 * other module may see any of it: everything outside this folder (main.c,
 * the proxy, the store, the unit tests and the fuzzer) goes through
 * idemgate/config/config.h, and reads a loaded, read-only struct cfg, never a table
 * or a setter. The tables and the setters change with the options, not
 * with that interface. Owns nothing.
 *
 *   ownership.c  allocation (aborts when out of memory), string lists,
 *                the copies and frees of every struct holding strings,
 *                cfg_free
 *   syntax.c     the grammars of one text: HTTP tokens and methods,
 *                decimal numbers, host:port, listen addresses, http(s)
 *                URLs, Redis URLs; no messages, no options
 *   values.c     the error line (cfg_fail), and setting one option of each
 *                kind (OPT_*) from one JSON value or text: cfg_opt_set
 *   options.c    the tables: every key with its kind, bounds and default,
 *                globally and per route; the environment variables and
 *                the flags; looking a key or a section up
 *   json.c       the JSON text parsed whole, and its objects walked
 *                against the tables
 *   routes.c     routes[] built, checked and sorted; cfg_route_for and
 *                cfg_idem_covers_method, the lookups made per request
 *   checks.c     the rules that tie several keys together
 *   load.c       the order: defaults < file < env < flags, then the
 *                checks; cfg_load and cfg_load_json
 *   dump.c       the struct written back as JSON (-T), secrets redacted
 *
 * Every function that can fail returns 0, or -1 after writing the one
 * error line into its struct cfg_err (and then owns nothing new). */
#ifndef IDEMGATE_CONFIG_INTERNAL_H
#define IDEMGATE_CONFIG_INTERNAL_H

#include "idemgate/config/config.h"

#include <cjson/cJSON.h>
#include <stdbool.h>
#include <stddef.h>

#define CFG_WHERE_LEN 320 /* "config: " + a path + a key */
#define CFG_PATH_LEN 256  /* a JSON path, e.g. routes[3].idempotency */
#define NOPTS(a) (sizeof(a) / sizeof((a)[0]))

/* ---------------------------------------------------------------- ownership.c */

void *cfg_xcalloc(size_t n, size_t size); /* zeroed; aborts when out of memory */
char *cfg_xstrndup(const char *s, size_t n);
char *cfg_xstrdup(const char *s);
void cfg_strlist_free(struct cfg_strlist *l);
void cfg_strlist_push(struct cfg_strlist *l, const char *s, size_t n); /* copies s[0..n) */
void cfg_url_free(struct cfg_url *u);
void cfg_url_copy(struct cfg_url *dst, const struct cfg_url *src); /* dst: uninitialized */
void cfg_addr_free(struct cfg_addr *a);
void cfg_tls_client_free(struct cfg_tls_client *t);
void cfg_idem_free(struct cfg_idem *m);
void cfg_idem_copy(struct cfg_idem *dst, const struct cfg_idem *src); /* dst: uninitialized */
void cfg_webhook_free(struct cfg_webhook *w);                         /* webhook.c */

/* ---------------------------------------------------------------- values.c: errors */

/* Where the one error line goes: the caller's buffer (NULL or len 0: the
 * line is dropped, as for the built-in defaults). Borrowed. */
struct cfg_err {
    char *buf;
    size_t len;
};

/* Writes "<where>: <message>" and returns -1. Control bytes (which a key
 * name in the file may hold) become '?' so the message stays one line. */
__attribute__((format(printf, 3, 4))) int cfg_fail(struct cfg_err *e, const char *where,
                                                   const char *fmt, ...);

/* "config: " + path, the prefix of every error about a key; out holds
 * CFG_WHERE_LEN bytes. */
void cfg_where_key(char *out, const char *parent, const char *key);

/* ---------------------------------------------------------------- syntax.c */

bool cfg_is_token(const char *s);  /* an HTTP token (RFC 9110 tchar) */
bool cfg_is_method(const char *s); /* a token without lower-case letters */
bool cfg_prefix_ci(const char *s, const char *prefix);

/* Decimal digits only, value <= max. */
int cfg_parse_uint(const char *s, size_t n, long long max, long long *out);

/* Parses "host[:port]" or "[v6][:port]" (s[0..n)). The port is required
 * when def_port is 0. Returns the host without brackets (caller frees). */
int cfg_parse_hostport(const char *s, size_t n, int def_port, char **host, int *port);

/* "host:port", "[v6]:port" or "*:port" (any IPv4 address); out is
 * overwritten and, on success, owns its strings. */
int cfg_parse_addr(const char *s, struct cfg_addr *out);

/* "http://host[:port][/]" or "https://...": no path, query or userinfo;
 * out is overwritten and, on success, owns its strings. */
/* 0, -1 when not an http(s) URL with a host, -2 when it has a path. */
int cfg_parse_url(const char *s, struct cfg_url *out);

/* What a Redis URL names; its strings are owned by it until handed over
 * to struct cfg_redis (or freed with cfg_redis_target_free). */
struct cfg_redis_target {
    bool unix_socket;
    bool tls;   /* rediss:// (never with unix_socket) */
    char *host; /* or the socket path when unix_socket */
    int port;
    char *username; /* NULL when none */
    char *password; /* NULL when none */
    int db;
};

/* "redis://[[user]:password@]host[:port][/db]", "rediss://..." (TLS) or
 * "unix:///path"; on error t owns nothing. */
int cfg_parse_redis_url(const char *s, struct cfg_redis_target *t);
void cfg_redis_target_free(struct cfg_redis_target *t);

/* ---------------------------------------------------------------- options.c */

/* The kind of an option: how its value is checked and stored. */
enum cfg_opt_kind {
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
    OPT_UPSTREAM,  /* http(s)://host[:port], or a group object (struct cfg_upstream) */
    OPT_REDIS_URL, /* the whole struct cfg_redis target (struct cfg_redis base only) */
    OPT_STATUS,    /* 409 | 422 */
    OPT_KEYPREFIX, /* a string without hash-tag braces */
    OPT_SECRETS    /* a list of non-empty strings, redacted by -T (routes[].webhook) */
};

/* One key of a section: where it is stored, how it is checked, and its
 * built-in default. */
struct cfg_opt {
    const char *name;
    enum cfg_opt_kind kind;
    size_t off; /* from the section's base struct */
    long long min, max;
    const char *const *choices; /* OPT_ENUM, NULL-terminated */
    const char *def;            /* the default, as text */
    bool restart;               /* applies at start only: a reload logs it as ignored */
};

/* One object of the file ("" for the top level) and its table. */
struct cfg_section {
    const char *name; /* "" for the top level */
    size_t base;      /* offset of the section's struct inside struct cfg */
    const struct cfg_opt *opts;
    size_t n;
};

/* An environment variable or a flag, naming one option by its path. */
struct cfg_override {
    const char *name;
    const char *section;
    const char *key;
    size_t flag_off; /* into struct cfg_flags (flags only) */
};

/* cfg_sections[0] is the top level; "idempotency" is listed twice, its
 * second table (cfg_idem_route_opts: "enabled") being set by its default
 * only, since a lookup by name finds the first. A section named
 * "parent.key" ("redis.tls") is nested: the object at key inside the
 * parent's object, never a member of the top level; its base is an offset
 * inside struct cfg like any other's. */
extern const struct cfg_section cfg_sections[];
extern const size_t cfg_n_sections;
extern const struct cfg_opt cfg_ratelimit_opts[];
extern const size_t cfg_n_ratelimit_opts;
extern const struct cfg_opt cfg_webhook_opts[]; /* routes[i].webhook */
extern const size_t cfg_n_webhook_opts;
extern const struct cfg_opt cfg_idem_opts[];
extern const size_t cfg_n_idem_opts;
extern const struct cfg_opt cfg_idem_route_opts[]; /* valid only inside routes[i] */
extern const size_t cfg_n_idem_route_opts;
extern const struct cfg_override cfg_env_vars[];
extern const size_t cfg_n_env_vars;
extern const struct cfg_override cfg_flag_vars[];
extern const size_t cfg_n_flag_vars;
extern const char *const cfg_mode_names[]; /* by enum cfg_redis_mode */

const struct cfg_opt *cfg_find_opt(const struct cfg_opt *opts, size_t n, const char *name);
/* A section other than the top level, by name; NULL when none. */
const struct cfg_section *cfg_find_section(const char *name);

/* ---------------------------------------------------------------- values.c: setters */

/* A JSON value, or a text (a default, an env variable or a flag); both
 * borrowed for the call. */
struct cfg_val {
    const cJSON *json;
    const char *text;
};

/* Sets one option of the section struct at base from v; where names it in
 * the error ("config: redis.url", "env IDEMGATE_WORKERS", ...). The old
 * value is replaced only once the new one is valid. */
int cfg_opt_set(const struct cfg_opt *o, char *base, const struct cfg_val *v, const char *where,
                struct cfg_err *e);

/* ---------------------------------------------------------------- upstream.c */

/* The OPT_UPSTREAM setter (a struct cfg_upstream), for a route's own too. */
int cfg_set_upstream(void *field, const struct cfg_val *v, const char *where, struct cfg_err *e);
void cfg_upstream_free(struct cfg_upstream *u);
void cfg_upstream_copy(struct cfg_upstream *dst,
                       const struct cfg_upstream *src); /* dst: uninitialized */

/* ---------------------------------------------------------------- webhook.c */

/* routes[i].webhook from its object (path "routes[i].webhook"): defaults,
 * the object's keys, then the secrets and the key's source resolved. */
int cfg_build_webhook(struct cfg_webhook *w, const cJSON *obj, const char *path, struct cfg_err *e);

/* ---------------------------------------------------------------- json.c */

/* Parses the whole text (buf NUL-terminated at len); trailing garbage and
 * NUL bytes are errors naming the line. Caller frees with cJSON_Delete. */
cJSON *cfg_parse_json(const char *name, const char *buf, size_t len, struct cfg_err *e);

/* -1 when an earlier member of obj has the same key as item. */
int cfg_check_duplicate(const cJSON *obj, const cJSON *item, const char *where, struct cfg_err *e);

/* Applies a JSON object to one section's struct; extra is a second table
 * that is also valid there (routes[i].idempotency's "enabled"). */
int cfg_apply_object(const cJSON *obj, const char *path, char *base, const struct cfg_opt *opts,
                     size_t n, const struct cfg_opt *extra, size_t n_extra, struct cfg_err *e);

/* The file's top level: options and sections; *routes is set to the
 * "routes" member (borrowed from root), applied later by cfg_build_routes
 * because routes inherit the global values after env and flags. */
int cfg_apply_file(struct cfg *c, const cJSON *root, const cJSON **routes, struct cfg_err *e);

/* ---------------------------------------------------------------- routes.c */

/* Builds c->routes from the file's "routes" (NULL: none), each checked
 * with cfg_check_idem_policy; on error c owns what was built so far. */
int cfg_build_routes(struct cfg *c, const cJSON *arr, struct cfg_err *e);

/* ---------------------------------------------------------------- checks.c */

/* The rules of docs/configuration.md that tie one idempotency policy's keys
 * together; path is "idempotency" or "routes[i].idempotency". */
int cfg_check_idem_policy(const struct cfg *c, const struct cfg_idem *m, const char *path,
                          bool is_route, struct cfg_err *e);

/* Rules across sections, checked once every source has been applied. */
int cfg_check_cross(const struct cfg *c, struct cfg_err *e);

/* ---------------------------------------------------------------- dump.c */

/* What -T writes in place of a secret (CFG_DUMP_REDACTED). */
#define CFG_REDACTED CFG_DUMP_REDACTED

/* -1 when a secret is CFG_REDACTED: a -T text loaded without the secret
 * put back. Called by cfg_check_cross. */
int cfg_check_redacted(const struct cfg *c, struct cfg_err *e);

#endif
