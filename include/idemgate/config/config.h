/* config.h — one loaded configuration (docs/configuration.md).
 *
 * Built at start and at each reload (a generation, proxy/gen.h, holds it):
 * built-in defaults, then the JSON file (cJSON), then the environment, then
 * the command-line flags. After cfg_load returns 0 the struct is read-only
 * and shared by all workers.
 *
 * Ownership: struct cfg owns every string, list and array it points to
 * (those of its sub-structs and routes too); cfg_free frees what cfg_load
 * allocated. The caller owns the struct cfg itself (a generation embeds
 * it) and must not free or replace a pointer inside it. Anything read
 * out of it (a string, a route, a list) is borrowed from it: valid until
 * cfg_free, never to be freed by the reader. */
#ifndef IDEMGATE_CONFIG_H
#define IDEMGATE_CONFIG_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* A list of strings: owns the array v and each v[i] (NUL-terminated). */
struct cfg_strlist {
    char **v;
    size_t n;
};

/* A parsed "http://host:port" or "https://host:port" URL (no path); owns
 * host and text. */
struct cfg_url {
    bool tls;
    char *host; /* without brackets for IPv6 */
    int port;   /* default 80 / 443 */
    char *text; /* the original URL text */
};

/* upstream.balance. */
enum cfg_balance { CFG_BALANCE_ROUND_ROBIN, CFG_BALANCE_LEAST_CONN };

/* One server of an upstream group: owns url. */
struct cfg_server {
    struct cfg_url url;
    int weight; /* 1..100 */
};

/* `upstream`, globally or on a route: one URL (a group of one server) or
 * a group (docs/configuration.md). Owns servers and their URLs. All
 * servers share one scheme. */
struct cfg_upstream {
    struct cfg_server *servers;
    size_t n; /* >= 1 once loaded */
    enum cfg_balance balance;
    int max_fails;       /* 0..100; 0: never down */
    int fail_timeout_ms; /* 100..3600000 */
    int retries;         /* 0..n-1 */
    bool retries_set;    /* given; else every other server (each address of a name counts) */
};

/* A parsed "host:port" or "[v6]:port" address; owns host and text
 * (admin_listen's are NULL when admin.listen is "off"). */
struct cfg_addr {
    char *host;
    int port;
    char *text;
};

/* One parsed redis.nodes entry: "host:port" or "[v6]:port" (the port is
 * required). The host fits: config refuses a name over 253 bytes and an
 * IPv6 literal over INET6_ADDRSTRLEN. Plain data, no pointers. */
#define CFG_HOST_MAX 254
struct cfg_hostport {
    char host[CFG_HOST_MAX]; /* without brackets for IPv6 */
    int port;
};

/* The client side of a TLS connection idemgate makes (upstream_tls for
 * https:// upstreams, redis.tls for a rediss:// store): what the server's
 * certificate is verified against. Owns ca_file and server_name. */
struct cfg_tls_client {
    char *ca_file;     /* PEM bundle; NULL ("" in the file): the system store */
    bool verify;       /* false: neither the chain nor the name is checked */
    char *server_name; /* SNI and the name checked; NULL ("" in the file):
                        * each connection's own host */
};

enum cfg_store { CFG_STORE_REDIS, CFG_STORE_MEMORY, CFG_STORE_LMDB };
enum cfg_lmdb_sync { CFG_LMDB_SYNC_OS, CFG_LMDB_SYNC_FSYNC };
enum cfg_redis_mode { CFG_REDIS_STANDALONE, CFG_REDIS_CLUSTER, CFG_REDIS_SENTINEL };
enum cfg_failure_mode { CFG_FAIL_CLOSED, CFG_FAIL_OPEN };
enum cfg_anonymous { CFG_ANON_SHARED, CFG_ANON_REJECT, CFG_ANON_BYPASS };
enum cfg_concurrent { CFG_CONC_REJECT, CFG_CONC_WAIT };
enum cfg_error_format { CFG_ERR_JSON, CFG_ERR_PROBLEM };
enum cfg_log_level { CFG_LOG_DEBUG, CFG_LOG_INFO, CFG_LOG_WARN, CFG_LOG_ERROR };
/* idempotency.unknown_outcome: what a request that was sent upstream but
 * never answered leaves behind (docs/requests.md). */
enum cfg_unknown { CFG_UNKNOWN_RELEASE, CFG_UNKNOWN_KEEP };
/* ratelimit.count: which requests of a scope count. */
enum cfg_rl_count { CFG_RL_COUNT_ALL, CFG_RL_COUNT_COVERED };
/* ratelimit.headers: the RateLimit-* headers added to answers. */
enum cfg_rl_headers { CFG_RL_HEADERS_LEGACY, CFG_RL_HEADERS_DRAFT, CFG_RL_HEADERS_NONE };

/* The redis section, with redis.url taken apart; owns its strings, the
 * nodes list, node_addrs and tls_client's strings.
 *
 * TLS: the url's scheme decides for every connection of the store. With
 * rediss:// (tls true) the standalone server, every cluster node (seeds
 * and the nodes CLUSTER SLOTS or a redirection names), every sentinel and
 * the master a sentinel names are all reached over TLS, each verified
 * against tls_client (SNI and the name checked: tls_client.server_name,
 * else that connection's host). In cluster and sentinel mode the url's
 * host, port and db are unused, but its scheme, username and password
 * still apply to every connection (sentinels included). A unix socket is
 * never TLS (the grammar has no rediss scheme for a path). */
struct cfg_redis {
    enum cfg_redis_mode mode;
    char *url;        /* as given */
    bool unix_socket; /* url was unix:///path */
    bool tls;         /* url was rediss://: every connection of the store is TLS */
    char *host;       /* tcp host, or the socket path when unix_socket */
    int port;         /* default 6379 */
    char *username;   /* ACL user (redis://user:password@), NULL when none */
    char *password;   /* NULL when none */
    int db;           /* default 0; any 0..INT_MAX (the server decides) */
    struct cfg_strlist nodes;
    /* nodes.n entries: nodes parsed by config, used by the store (which
     * quotes nodes, as given, in its messages) */
    struct cfg_hostport *node_addrs;
    char *master_name;
    char *key_prefix;
    int timeout_ms;
    enum cfg_failure_mode failure_mode;
    int wait_replicas;
    struct cfg_tls_client tls_client; /* redis.tls; used only when tls is true */
};

/* The idempotency settings; one global copy plus one fully resolved copy
 * per route (global values overridden key by key). Each copy owns its own
 * strings and lists: a route's never point into the global one. */
struct cfg_idem {
    bool enabled; /* only routes can turn it off */
    char *header;
    struct cfg_strlist methods;
    bool required;
    int key_max_length;
    int ttl_seconds;
    int lock_seconds;
    struct cfg_strlist scope_headers;
    enum cfg_anonymous anonymous;
    char *scope_secret;
    struct cfg_strlist fingerprint_headers;
    int mismatch_status; /* 409 or 422 */
    enum cfg_concurrent concurrent;
    int wait_max_ms;
    bool cache_5xx;
    enum cfg_unknown unknown_outcome;
    uint64_t max_cached_response_bytes;
    struct cfg_strlist replay_exclude_headers;
};

/* The limits section: sizes and timeouts, plain numbers. */
struct cfg_limits {
    uint64_t max_request_body_bytes;
    uint64_t max_header_bytes;
    int upstream_connect_timeout_ms;
    int upstream_timeout_ms;
    int client_timeout_ms;
    int max_connections;
    int shutdown_grace_ms;
};

/* The ratelimit section, globally and per route (docs/configuration.md,
 * Rate limits): plain values, copied by value into each route. */
struct cfg_ratelimit {
    bool enabled;
    int requests; /* per window; 0: no rate limit */
    int window_seconds;
    int concurrent; /* 0: no concurrency limit */
    enum cfg_rl_count count;
    enum cfg_rl_headers headers;
};

/* The http2 section: HTTP/2 from clients (docs/configuration.md). */
struct cfg_http2 {
    bool enabled;
    int max_concurrent_streams;
    int initial_window_bytes;
    int max_resets_per_second;
};

/* routes[].webhook.signature and .encoding (docs/webhooks.md). */
enum cfg_wh_sig { CFG_WH_STANDARD, CFG_WH_HMAC_SHA256, CFG_WH_NONE };
enum cfg_wh_enc { CFG_WH_HEX, CFG_WH_BASE64 };

/* One webhook secret as the HMAC key it is: owns v. */
struct cfg_secret {
    unsigned char *v;
    size_t n;
};

/* routes[].webhook (docs/webhooks.md): how a delivery on the route is
 * verified and where its idempotency key comes from. Owns its strings,
 * lists and keys. */
struct cfg_webhook {
    bool enabled; /* the route has a webhook object */
    enum cfg_wh_sig signature;
    char *header; /* hmac-sha256: the header holding the signature */
    char *prefix; /* hmac-sha256: what comes before it ("sha256="); NULL: none */
    enum cfg_wh_enc encoding;
    struct cfg_strlist secrets; /* as written ("env:NAME" kept so, for -T) */
    char *key;                  /* as written; NULL: the scheme's default */
    int tolerance_seconds;      /* standard: webhook-timestamp's distance from now */
    /* resolved at load: */
    struct cfg_secret *keys; /* secrets.n HMAC keys (a standard secret base64-decoded) */
    size_t n_keys;
    bool key_json;    /* the key is a JSON pointer into the body, else a header */
    char *key_source; /* the header's name, or the pointer ("" is the whole body) */
};

/* One entry of routes[]: owns prefix, its upstream and its idem copy. */
struct cfg_route {
    char *prefix;
    struct cfg_upstream upstream;   /* the route's own, or a copy of the default */
    bool upstream_own;              /* the route names its own upstream (its own group) */
    struct cfg_idem idem;           /* resolved */
    struct cfg_ratelimit ratelimit; /* resolved: the global one, overridden key by key */
    struct cfg_webhook webhook;     /* enabled when the route has one */
};

/* The whole configuration, every source applied and checked; see the
 * ownership note at the top. */
struct cfg {
    struct cfg_addr listen;
    int workers; /* resolved: 0 in the file means one per CPU, stored here as the count */
    struct cfg_upstream upstream;
    enum cfg_store store;
    struct cfg_redis redis;
    uint64_t memory_max_bytes;       /* memory.max_bytes: the memory store's bound */
    uint64_t memory_max_scope_bytes; /* memory.max_scope_bytes: one scope's bound, 0 = none */
    char *lmdb_path;                 /* lmdb.path: the LMDB environment's directory */
    uint64_t lmdb_max_bytes;         /* lmdb.max_bytes: the map size (the file's bound) */
    uint64_t lmdb_max_scope_bytes;   /* lmdb.max_scope_bytes: one scope's bound, 0 = none */
    enum cfg_lmdb_sync lmdb_sync;    /* lmdb.sync */
    struct cfg_idem idem;
    enum cfg_error_format error_format;
    struct cfg_limits limits;
    struct cfg_http2 http2;
    struct cfg_ratelimit ratelimit;
    bool admin_enabled; /* false when admin.listen is "off" */
    struct cfg_addr admin_listen;
    char *admin_token; /* admin.token: NULL when none (then /keys answers loopback only) */
    char *tls_cert_file;
    char *tls_key_file;
    struct cfg_tls_client upstream_tls; /* https:// upstreams */
    struct cfg_route *routes;           /* sorted by prefix length, longest first */
    size_t n_routes;
    enum cfg_log_level log_level;
    bool log_access;
};

/* Values given on the command line; NULL when the flag was not given.
 * The strings are the caller's (main.c points them at getopt's optarg):
 * cfg_load borrows them for the call and copies what it keeps. */
struct cfg_flags {
    const char *config_file;
    const char *listen;
    const char *upstream;
    const char *store;
    const char *redis;
    const char *workers;
    const char *admin;
};

/* Fills c from defaults < file (flags->config_file, may be NULL) < env <
 * flags. On error returns -1 and writes one line (no newline) into err,
 * e.g. "config: idempotency.lock_seconds: must be an integer >= 1" or
 * "config: cannot read /x.json: No such file or directory" or
 * "flag --workers: must be an integer >= 0"; c is then freed already.
 * Env variables: IDEMGATE_LISTEN, IDEMGATE_UPSTREAM, IDEMGATE_STORE,
 * IDEMGATE_REDIS_URL, IDEMGATE_WORKERS, IDEMGATE_ADMIN_LISTEN,
 * IDEMGATE_SCOPE_SECRET, IDEMGATE_LOG_LEVEL, IDEMGATE_LMDB_PATH,
 * IDEMPOTENCY_TTL_SECONDS (an
 * env error names the variable: "env IDEMGATE_WORKERS: must be ...").
 * Ownership: c need not be initialized (it is overwritten); on 0 it owns
 * everything it points to and the caller frees it with cfg_free; on -1 it
 * owns nothing (zeroed), and cfg_free on it is a harmless no-op. flags and
 * its strings are borrowed for the call; err (errlen bytes) is the
 * caller's buffer, always NUL-terminated when errlen > 0. */
int cfg_load(struct cfg *c, const struct cfg_flags *flags, char *err, size_t errlen);

/* Same, from a JSON text instead of a file (for tests and fuzzing); env is
 * still applied when use_env is true. json (len bytes, no NUL needed; NULL
 * counts as empty text) is borrowed for the call and copied where kept;
 * flags->config_file, when set, only names the text in messages. c, flags
 * and err are owned as for cfg_load. */
int cfg_load_json(struct cfg *c, const char *json, size_t len, bool use_env,
                  const struct cfg_flags *flags, char *err, size_t errlen);

/* What cfg_dump_json writes in place of a secret. A text holding it where
 * a secret goes does not load ("config: idempotency.scope_secret: holds
 * the redacted value of -T; put the secret back"). */
#define CFG_DUMP_REDACTED "<redacted>"

/* The effective configuration (-T) as JSON in the file's shape, two-space
 * indented, ending with a newline: every key of every section (defaults
 * included), workers resolved to its count, each route resolved (its
 * upstream and every idempotency key). With redact, the password of
 * redis.url and every non-empty scope_secret are CFG_DUMP_REDACTED. The
 * text loads again with cfg_load (once secrets are put back) into an
 * equal struct. c is borrowed; the caller frees the text with free(). */
char *cfg_dump_json(const struct cfg *c, bool redact);

/* True when section ("redis", "limits", ...) has the same values in a
 * and b (nested sections included: "redis" covers redis.tls). */
bool cfg_section_equal(const struct cfg *a, const struct cfg *b, const char *section);
/* How many options that apply only at start (docs/configuration.md, the
 * applies column) differ between a and b; their names ("listen,
 * admin.listen") into out (outlen bytes, NUL-terminated). */
size_t cfg_restart_changes(const struct cfg *a, const struct cfg *b, char *out, size_t outlen);

/* Frees everything c owns, which is what cfg_load allocated, and zeroes
 * c; not c itself (the caller's). Every pointer borrowed from c (a route,
 * a string) is dangling afterwards. Tolerates NULL and a zeroed struct. */
void cfg_free(struct cfg *c);

/* Longest-prefix route for a request path, or NULL for the default; a
 * query ("?...") is ignored. path (len bytes, no NUL needed) is borrowed
 * for the call. The returned route is borrowed from c: valid until
 * cfg_free(c), never freed by the caller. */
const struct cfg_route *cfg_route_for(const struct cfg *c, const char *path, size_t len);

/* True when the method is in idem->methods (exact, case-sensitive).
 * method (len bytes, no NUL needed) and idem are borrowed for the call. */
bool cfg_idem_covers_method(const struct cfg_idem *idem, const char *method, size_t len);

#endif
