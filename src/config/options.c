/* options.c — the option tables (docs/configuration.md): every key of the file
 * with its kind, bounds and default, globally and per route, and the
 * environment variables and flags that name one of them.
 *
 * Owns: the tables (data only), the names of each enum's values, and
 * looking a key or a section up. Does not own: checking or storing a value
 * (values.c) or walking the tables (json.c, load.c). A new option is one
 * line here (and its field in config.h); config/idemgate.json lists the
 * same defaults, and the unit tests check that it does. */
#include "internal.h"

#include <string.h>

#define OPT(n, k, s, f, lo, hi, ch, d)                                                             \
    {                                                                                              \
        n, k, offsetof(s, f), lo, hi, ch, d, false                                                 \
    }
#define O_INT(s, f, lo, hi, d) OPT(#f, OPT_INT, s, f, lo, hi, NULL, d)
#define O_U64(s, f, lo, hi, d) OPT(#f, OPT_U64, s, f, lo, hi, NULL, d)
#define O_KIND(n, k, s, f, d) OPT(n, k, s, f, 0, 0, NULL, d)
/* An option a reload cannot change (the process keeps the value it
 * started with until the next start). */
#define RESTART(n, k, s, f, lo, hi, ch, d)                                                         \
    {                                                                                              \
        n, k, offsetof(s, f), lo, hi, ch, d, true                                                  \
    }
#define O_ENUM(n, s, f, ch, d) OPT(n, OPT_ENUM, s, f, 0, 0, ch, d)

static const char *const store_names[] = {"redis", "memory", "lmdb", NULL};
static const char *const lmdb_sync_names[] = {"os", "fsync", NULL};
const char *const cfg_mode_names[] = {"standalone", "cluster", "sentinel", NULL};
static const char *const failure_names[] = {"closed", "open", NULL};
static const char *const anon_names[] = {"shared", "reject", "bypass", NULL};
static const char *const conc_names[] = {"reject", "wait", NULL};
static const char *const unknown_names[] = {"release", "keep", NULL};
static const char *const errfmt_names[] = {"json", "problem", NULL};
static const char *const level_names[] = {"debug", "info", "warn", "error", NULL};
static const char *const rl_count_names[] = {"all", "covered", NULL};
static const char *const rl_headers_names[] = {"legacy", "draft", "none", NULL};
static const char *const wh_sig_names[] = {"standard", "hmac-sha256", "none", NULL};
static const char *const wh_enc_names[] = {"hex", "base64", NULL};

_Static_assert(sizeof(enum cfg_store) == sizeof(int), "enums are stored through int *");
_Static_assert(sizeof(enum cfg_lmdb_sync) == sizeof(int), "enums are stored through int *");
_Static_assert(sizeof(enum cfg_log_level) == sizeof(int), "enums are stored through int *");
_Static_assert(sizeof(enum cfg_unknown) == sizeof(int), "enums are stored through int *");

static const struct cfg_opt top_opts[] = {
    RESTART("listen", OPT_ADDR, struct cfg, listen, 0, 0, NULL, "0.0.0.0:8080"),
    RESTART("workers", OPT_INT, struct cfg, workers, 0, 1024, NULL, "0"),
    O_KIND("upstream", OPT_UPSTREAM, struct cfg, upstream, "http://127.0.0.1:9000"),
    RESTART("store", OPT_ENUM, struct cfg, store, 0, 0, store_names, "redis"),
    O_ENUM("error_format", struct cfg, error_format, errfmt_names, "json"),
};

static const struct cfg_opt redis_opts[] = {
    O_ENUM("mode", struct cfg_redis, mode, cfg_mode_names, "standalone"),
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

/* path, max_bytes (the map size every process on the path shares) and
 * sync (how the environment is opened) are fixed at start. */
static const struct cfg_opt lmdb_opts[] = {
    RESTART("path", OPT_STR, struct cfg, lmdb_path, 0, 0, NULL, "/var/lib/idemgate"),
    RESTART("max_bytes", OPT_U64, struct cfg, lmdb_max_bytes, 1048576, 1099511627776LL, NULL,
            "1073741824"),
    OPT("max_scope_bytes", OPT_U64, struct cfg, lmdb_max_scope_bytes, 0, 1099511627776LL, NULL,
        "33554432"),
    RESTART("sync", OPT_ENUM, struct cfg, lmdb_sync, 0, 0, lmdb_sync_names, "os"),
};

const struct cfg_opt cfg_idem_opts[] = {
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
const size_t cfg_n_idem_opts = NOPTS(cfg_idem_opts);

/* Valid only inside routes[i].idempotency (and set to true globally). */
const struct cfg_opt cfg_idem_route_opts[] = {
    O_KIND("enabled", OPT_BOOL, struct cfg_idem, enabled, "true"),
};
const size_t cfg_n_idem_route_opts = NOPTS(cfg_idem_route_opts);

/* The keys of routes[i].webhook (routes.c; webhook.c resolves them). */
const struct cfg_opt cfg_webhook_opts[] = {
    O_ENUM("signature", struct cfg_webhook, signature, wh_sig_names, "standard"),
    O_KIND("header", OPT_OPTSTR, struct cfg_webhook, header, ""),
    O_KIND("prefix", OPT_OPTSTR, struct cfg_webhook, prefix, ""),
    O_ENUM("encoding", struct cfg_webhook, encoding, wh_enc_names, "hex"),
    O_KIND("secrets", OPT_SECRETS, struct cfg_webhook, secrets, ""),
    O_KIND("key", OPT_OPTSTR, struct cfg_webhook, key, ""),
    O_INT(struct cfg_webhook, tolerance_seconds, 1, 86400, "300"),
};
const size_t cfg_n_webhook_opts = NOPTS(cfg_webhook_opts);

static const struct cfg_opt limits_opts[] = {
    O_U64(struct cfg_limits, max_request_body_bytes, 0, 4294967296LL, "10485760"),
    O_U64(struct cfg_limits, max_header_bytes, 1024, 1048576, "65536"),
    O_INT(struct cfg_limits, upstream_connect_timeout_ms, 1, 3600000, "2000"),
    O_INT(struct cfg_limits, upstream_timeout_ms, 1, 3600000, "60000"),
    O_INT(struct cfg_limits, client_timeout_ms, 1, 3600000, "60000"),
    O_INT(struct cfg_limits, max_connections, 1, 1000000, "10000"),
    O_INT(struct cfg_limits, shutdown_grace_ms, 0, 3600000, "10000"),
};

/* Also the keys of routes[i].ratelimit (routes.c). */
const struct cfg_opt cfg_ratelimit_opts[] = {
    O_KIND("enabled", OPT_BOOL, struct cfg_ratelimit, enabled, "false"),
    O_INT(struct cfg_ratelimit, requests, 0, 1000000, "120"),
    O_INT(struct cfg_ratelimit, window_seconds, 1, 86400, "60"),
    O_INT(struct cfg_ratelimit, concurrent, 0, 100000, "10"),
    O_ENUM("count", struct cfg_ratelimit, count, rl_count_names, "all"),
    O_ENUM("headers", struct cfg_ratelimit, headers, rl_headers_names, "legacy"),
};
const size_t cfg_n_ratelimit_opts = NOPTS(cfg_ratelimit_opts);

static const struct cfg_opt http2_opts[] = {
    O_KIND("enabled", OPT_BOOL, struct cfg_http2, enabled, "true"),
    O_INT(struct cfg_http2, max_concurrent_streams, 1, 10000, "100"),
    O_INT(struct cfg_http2, initial_window_bytes, 65535, 2147483647, "65535"),
    O_INT(struct cfg_http2, max_resets_per_second, 1, 100000, "100"),
};

static const struct cfg_opt admin_opts[] = {
    RESTART("listen", OPT_ADMIN, struct cfg, admin_listen, 0, 0, NULL, "127.0.0.1:9091"),
    O_KIND("token", OPT_OPTSTR, struct cfg, admin_token, ""),
};

static const struct cfg_opt tls_opts[] = {
    O_KIND("cert_file", OPT_OPTSTR, struct cfg, tls_cert_file, ""),
    O_KIND("key_file", OPT_OPTSTR, struct cfg, tls_key_file, ""),
};

/* One table for every struct cfg_tls_client: upstream_tls and redis.tls
 * are the same three keys with the same defaults. */
static const struct cfg_opt tls_client_opts[] = {
    O_KIND("ca_file", OPT_OPTSTR, struct cfg_tls_client, ca_file, ""),
    O_KIND("verify", OPT_BOOL, struct cfg_tls_client, verify, "true"),
    O_KIND("server_name", OPT_OPTSTR, struct cfg_tls_client, server_name, ""),
};

static const struct cfg_opt log_opts[] = {
    O_ENUM("level", struct cfg, log_level, level_names, "info"),
    O_KIND("access", OPT_BOOL, struct cfg, log_access, "true"),
};

const struct cfg_section cfg_sections[] = {
    {"", 0, top_opts, NOPTS(top_opts)},
    {"redis", offsetof(struct cfg, redis), redis_opts, NOPTS(redis_opts)},
    {"memory", 0, memory_opts, NOPTS(memory_opts)},
    {"lmdb", 0, lmdb_opts, NOPTS(lmdb_opts)},
    {"idempotency", offsetof(struct cfg, idem), cfg_idem_opts, NOPTS(cfg_idem_opts)},
    {"idempotency", offsetof(struct cfg, idem), cfg_idem_route_opts, NOPTS(cfg_idem_route_opts)},
    {"limits", offsetof(struct cfg, limits), limits_opts, NOPTS(limits_opts)},
    {"http2", offsetof(struct cfg, http2), http2_opts, NOPTS(http2_opts)},
    {"ratelimit", offsetof(struct cfg, ratelimit), cfg_ratelimit_opts, NOPTS(cfg_ratelimit_opts)},
    {"admin", 0, admin_opts, NOPTS(admin_opts)},
    {"tls", 0, tls_opts, NOPTS(tls_opts)},
    /* nested: the "tls" member of the "redis" object (json.c) */
    {"redis.tls", offsetof(struct cfg, redis) + offsetof(struct cfg_redis, tls_client),
     tls_client_opts, NOPTS(tls_client_opts)},
    {"upstream_tls", offsetof(struct cfg, upstream_tls), tls_client_opts, NOPTS(tls_client_opts)},
    {"log", 0, log_opts, NOPTS(log_opts)},
};
const size_t cfg_n_sections = NOPTS(cfg_sections);

const struct cfg_override cfg_env_vars[] = {
    {"IDEMGATE_LISTEN", "", "listen", 0},
    {"IDEMGATE_UPSTREAM", "", "upstream", 0},
    {"IDEMGATE_STORE", "", "store", 0},
    {"IDEMGATE_REDIS_URL", "redis", "url", 0},
    {"IDEMGATE_WORKERS", "", "workers", 0},
    {"IDEMGATE_ADMIN_LISTEN", "admin", "listen", 0},
    {"IDEMGATE_ADMIN_TOKEN", "admin", "token", 0},
    {"IDEMGATE_SCOPE_SECRET", "idempotency", "scope_secret", 0},
    {"IDEMGATE_LOG_LEVEL", "log", "level", 0},
    {"IDEMGATE_LMDB_PATH", "lmdb", "path", 0},
    {"IDEMPOTENCY_TTL_SECONDS", "idempotency", "ttl_seconds", 0},
};
const size_t cfg_n_env_vars = NOPTS(cfg_env_vars);

const struct cfg_override cfg_flag_vars[] = {
    {"--listen", "", "listen", offsetof(struct cfg_flags, listen)},
    {"--upstream", "", "upstream", offsetof(struct cfg_flags, upstream)},
    {"--store", "", "store", offsetof(struct cfg_flags, store)},
    {"--redis", "redis", "url", offsetof(struct cfg_flags, redis)},
    {"--workers", "", "workers", offsetof(struct cfg_flags, workers)},
    {"--admin", "admin", "listen", offsetof(struct cfg_flags, admin)},
};
const size_t cfg_n_flag_vars = NOPTS(cfg_flag_vars);

const struct cfg_opt *cfg_find_opt(const struct cfg_opt *opts, size_t n, const char *name)
{
    for (size_t i = 0; i < n; i++)
        if (strcmp(opts[i].name, name) == 0) return &opts[i];
    return NULL;
}

/* From 1: the top level is not a section of the file. */
const struct cfg_section *cfg_find_section(const char *name)
{
    for (size_t s = 1; s < cfg_n_sections; s++)
        if (strcmp(cfg_sections[s].name, name) == 0) return &cfg_sections[s];
    return NULL;
}
