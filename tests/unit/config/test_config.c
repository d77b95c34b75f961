/* test_config.c — unit tests for the config (src/config/): defaults,
 * every error path (each names its key), precedence defaults < file < env
 * < flags, routes and their override semantics, and the shipped config/
 * files. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#include "idemgate/config/config.h"

static const char *const env_names[] = {
    "IDEMGATE_LISTEN",       "IDEMGATE_UPSTREAM",  "IDEMGATE_STORE",
    "IDEMGATE_REDIS_URL",    "IDEMGATE_WORKERS",   "IDEMGATE_ADMIN_LISTEN",
    "IDEMGATE_SCOPE_SECRET", "IDEMGATE_LOG_LEVEL", "IDEMPOTENCY_TTL_SECONDS",
};

static char err[512];

static int clear_env(void **state)
{
    (void)state;
    for (size_t i = 0; i < sizeof env_names / sizeof env_names[0]; i++)
        unsetenv(env_names[i]);
    return 0;
}

/* The repository root: $IDEMGATE_SOURCE_DIR, or derived from __FILE__. */
static void source_path(char *out, size_t n, const char *rel)
{
    const char *dir = getenv("IDEMGATE_SOURCE_DIR");
    if (dir) {
        snprintf(out, n, "%s/%s", dir, rel);
        return;
    }
    const char *f = __FILE__;
    const char *p = strstr(f, "tests/unit/config/test_config.c");
    int plen = p ? (int)(p - f) : 0;
    snprintf(out, n, "%.*s%s", plen, f, rel);
}

static int load(struct cfg *c, const char *json)
{
    return cfg_load_json(c, json, strlen(json), false, NULL, err, sizeof err);
}

static void load_ok(struct cfg *c, const char *json)
{
    if (load(c, json) != 0) fail_msg("load failed: %s\n  json: %s", err, json);
}

static bool zeroed(const struct cfg *c)
{
    static const struct cfg z;
    return memcmp(c, &z, sizeof z) == 0;
}

static void expect_error_with(const char *json, bool use_env, const struct cfg_flags *fl,
                              const char *want)
{
    struct cfg c;
    memset(&c, 0x5a, sizeof c);
    int rc = cfg_load_json(&c, json, strlen(json), use_env, fl, err, sizeof err);
    if (rc != -1 || strcmp(err, want) != 0)
        fail_msg("json: %s\n  rc=%d\n  got:  %s\n  want: %s", json, rc, err, want);
    assert_true(zeroed(&c));
    cfg_free(&c); /* freeing again after an error is harmless */
}

static void expect_error(const char *json, const char *want)
{
    expect_error_with(json, false, NULL, want);
}

/* ---------------------------------------------------------------- comparison */

static void assert_str_eq(const char *a, const char *b)
{
    if (!a || !b)
        assert_ptr_equal(a, b);
    else
        assert_string_equal(a, b);
}

static void assert_list_eq(const struct cfg_strlist *a, const struct cfg_strlist *b)
{
    assert_int_equal(a->n, b->n);
    for (size_t i = 0; i < a->n; i++)
        assert_string_equal(a->v[i], b->v[i]);
}

static void assert_url_eq(const struct cfg_url *a, const struct cfg_url *b)
{
    assert_int_equal(a->tls, b->tls);
    assert_str_eq(a->host, b->host);
    assert_int_equal(a->port, b->port);
    assert_str_eq(a->text, b->text);
}

static void assert_upstream_eq(const struct cfg_upstream *a, const struct cfg_upstream *b)
{
    assert_int_equal(a->n, b->n);
    for (size_t i = 0; i < a->n; i++) {
        assert_url_eq(&a->servers[i].url, &b->servers[i].url);
        assert_int_equal(a->servers[i].weight, b->servers[i].weight);
    }
    assert_int_equal(a->balance, b->balance);
    assert_int_equal(a->max_fails, b->max_fails);
    assert_int_equal(a->fail_timeout_ms, b->fail_timeout_ms);
    assert_int_equal(a->retries, b->retries);
}

static void assert_addr_eq(const struct cfg_addr *a, const struct cfg_addr *b)
{
    assert_str_eq(a->host, b->host);
    assert_int_equal(a->port, b->port);
    assert_str_eq(a->text, b->text);
}

static void assert_idem_eq(const struct cfg_idem *a, const struct cfg_idem *b)
{
    assert_int_equal(a->enabled, b->enabled);
    assert_str_eq(a->header, b->header);
    assert_list_eq(&a->methods, &b->methods);
    assert_int_equal(a->required, b->required);
    assert_int_equal(a->key_max_length, b->key_max_length);
    assert_int_equal(a->ttl_seconds, b->ttl_seconds);
    assert_int_equal(a->lock_seconds, b->lock_seconds);
    assert_list_eq(&a->scope_headers, &b->scope_headers);
    assert_int_equal(a->anonymous, b->anonymous);
    assert_str_eq(a->scope_secret, b->scope_secret);
    assert_list_eq(&a->fingerprint_headers, &b->fingerprint_headers);
    assert_int_equal(a->mismatch_status, b->mismatch_status);
    assert_int_equal(a->concurrent, b->concurrent);
    assert_int_equal(a->wait_max_ms, b->wait_max_ms);
    assert_int_equal(a->cache_5xx, b->cache_5xx);
    assert_int_equal(a->unknown_outcome, b->unknown_outcome);
    assert_int_equal(a->max_cached_response_bytes, b->max_cached_response_bytes);
    assert_list_eq(&a->replay_exclude_headers, &b->replay_exclude_headers);
}

static void assert_cfg_eq(const struct cfg *a, const struct cfg *b)
{
    assert_addr_eq(&a->listen, &b->listen);
    assert_int_equal(a->workers, b->workers);
    assert_upstream_eq(&a->upstream, &b->upstream);
    assert_int_equal(a->store, b->store);
    assert_int_equal(a->redis.mode, b->redis.mode);
    assert_str_eq(a->redis.url, b->redis.url);
    assert_int_equal(a->redis.unix_socket, b->redis.unix_socket);
    assert_int_equal(a->redis.tls, b->redis.tls);
    assert_str_eq(a->redis.host, b->redis.host);
    assert_int_equal(a->redis.port, b->redis.port);
    assert_str_eq(a->redis.username, b->redis.username);
    assert_str_eq(a->redis.password, b->redis.password);
    assert_int_equal(a->redis.db, b->redis.db);
    assert_list_eq(&a->redis.nodes, &b->redis.nodes);
    assert_str_eq(a->redis.master_name, b->redis.master_name);
    assert_str_eq(a->redis.key_prefix, b->redis.key_prefix);
    assert_int_equal(a->redis.timeout_ms, b->redis.timeout_ms);
    assert_int_equal(a->redis.failure_mode, b->redis.failure_mode);
    assert_int_equal(a->redis.wait_replicas, b->redis.wait_replicas);
    assert_str_eq(a->redis.tls_client.ca_file, b->redis.tls_client.ca_file);
    assert_int_equal(a->redis.tls_client.verify, b->redis.tls_client.verify);
    assert_str_eq(a->redis.tls_client.server_name, b->redis.tls_client.server_name);
    assert_true(a->memory_max_bytes == b->memory_max_bytes);
    assert_true(a->memory_max_scope_bytes == b->memory_max_scope_bytes);
    assert_idem_eq(&a->idem, &b->idem);
    assert_int_equal(a->error_format, b->error_format);
    assert_int_equal(a->limits.max_request_body_bytes, b->limits.max_request_body_bytes);
    assert_int_equal(a->limits.max_header_bytes, b->limits.max_header_bytes);
    assert_int_equal(a->limits.upstream_connect_timeout_ms, b->limits.upstream_connect_timeout_ms);
    assert_int_equal(a->limits.upstream_timeout_ms, b->limits.upstream_timeout_ms);
    assert_int_equal(a->limits.client_timeout_ms, b->limits.client_timeout_ms);
    assert_int_equal(a->limits.max_connections, b->limits.max_connections);
    assert_int_equal(a->limits.shutdown_grace_ms, b->limits.shutdown_grace_ms);
    assert_int_equal(a->admin_enabled, b->admin_enabled);
    assert_addr_eq(&a->admin_listen, &b->admin_listen);
    assert_str_eq(a->tls_cert_file, b->tls_cert_file);
    assert_str_eq(a->tls_key_file, b->tls_key_file);
    assert_str_eq(a->upstream_tls.ca_file, b->upstream_tls.ca_file);
    assert_int_equal(a->upstream_tls.verify, b->upstream_tls.verify);
    assert_str_eq(a->upstream_tls.server_name, b->upstream_tls.server_name);
    assert_int_equal(a->n_routes, b->n_routes);
    for (size_t i = 0; i < a->n_routes; i++) {
        assert_string_equal(a->routes[i].prefix, b->routes[i].prefix);
        assert_upstream_eq(&a->routes[i].upstream, &b->routes[i].upstream);
        assert_int_equal(a->routes[i].upstream_own, b->routes[i].upstream_own);
        assert_idem_eq(&a->routes[i].idem, &b->routes[i].idem);
    }
    assert_int_equal(a->log_level, b->log_level);
    assert_int_equal(a->log_access, b->log_access);
}

static void write_file(char *path, size_t n, const char *text)
{
    snprintf(path, n, "/tmp/idemgate-test-config-XXXXXX");
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    size_t len = strlen(text);
    assert_int_equal(write(fd, text, len), (ssize_t)len);
    close(fd);
}

/* ---------------------------------------------------------------- defaults */

static void test_defaults_match_spec(void **state)
{
    (void)state;
    struct cfg c;
    load_ok(&c, "{}");
    assert_string_equal(c.listen.host, "0.0.0.0");
    assert_int_equal(c.listen.port, 8080);
    assert_string_equal(c.listen.text, "0.0.0.0:8080");
    assert_true(c.workers >= 1);
    assert_false(c.upstream.servers[0].url.tls);
    assert_string_equal(c.upstream.servers[0].url.host, "127.0.0.1");
    assert_int_equal(c.upstream.servers[0].url.port, 9000);
    assert_int_equal(c.store, CFG_STORE_REDIS);
    assert_int_equal(c.redis.mode, CFG_REDIS_STANDALONE);
    assert_string_equal(c.redis.url, "redis://127.0.0.1:6379/0");
    assert_false(c.redis.unix_socket);
    assert_false(c.redis.tls);
    assert_string_equal(c.redis.host, "127.0.0.1");
    assert_int_equal(c.redis.port, 6379);
    assert_null(c.redis.username);
    assert_null(c.redis.password);
    assert_int_equal(c.redis.db, 0);
    assert_int_equal(c.redis.nodes.n, 0);
    assert_null(c.redis.master_name);
    assert_string_equal(c.redis.key_prefix, "idem:");
    assert_int_equal(c.redis.timeout_ms, 1000);
    assert_int_equal(c.redis.failure_mode, CFG_FAIL_CLOSED);
    assert_int_equal(c.redis.wait_replicas, 0);
    assert_null(c.redis.tls_client.ca_file);
    assert_true(c.redis.tls_client.verify);
    assert_null(c.redis.tls_client.server_name);
    assert_true(c.memory_max_bytes == 268435456ULL);
    assert_true(c.memory_max_scope_bytes == 33554432ULL);
    assert_true(c.idem.enabled);
    assert_string_equal(c.idem.header, "Idempotency-Key");
    assert_int_equal(c.idem.methods.n, 2);
    assert_string_equal(c.idem.methods.v[0], "POST");
    assert_string_equal(c.idem.methods.v[1], "PATCH");
    assert_false(c.idem.required);
    assert_int_equal(c.idem.key_max_length, 255);
    assert_int_equal(c.idem.ttl_seconds, 86400);
    assert_int_equal(c.idem.lock_seconds, 30);
    assert_int_equal(c.idem.scope_headers.n, 2);
    assert_string_equal(c.idem.scope_headers.v[0], "Authorization");
    assert_string_equal(c.idem.scope_headers.v[1], "X-API-Key");
    assert_int_equal(c.idem.anonymous, CFG_ANON_SHARED);
    assert_string_equal(c.idem.scope_secret, "");
    assert_int_equal(c.idem.fingerprint_headers.n, 1);
    assert_string_equal(c.idem.fingerprint_headers.v[0], "Content-Type");
    assert_int_equal(c.idem.mismatch_status, 409);
    assert_int_equal(c.idem.concurrent, CFG_CONC_REJECT);
    assert_int_equal(c.idem.wait_max_ms, 5000);
    assert_false(c.idem.cache_5xx);
    assert_int_equal(c.idem.unknown_outcome, CFG_UNKNOWN_RELEASE);
    assert_int_equal(c.idem.max_cached_response_bytes, 1048576);
    assert_int_equal(c.idem.replay_exclude_headers.n, 6);
    assert_string_equal(c.idem.replay_exclude_headers.v[0], "Set-Cookie");
    assert_string_equal(c.idem.replay_exclude_headers.v[5], "RateLimit-Reset");
    assert_int_equal(c.error_format, CFG_ERR_JSON);
    assert_int_equal(c.limits.max_request_body_bytes, 10485760);
    assert_int_equal(c.limits.max_header_bytes, 65536);
    assert_int_equal(c.limits.upstream_connect_timeout_ms, 2000);
    assert_int_equal(c.limits.upstream_timeout_ms, 60000);
    assert_int_equal(c.limits.client_timeout_ms, 60000);
    assert_int_equal(c.limits.max_connections, 10000);
    assert_int_equal(c.limits.shutdown_grace_ms, 10000);
    assert_true(c.admin_enabled);
    assert_string_equal(c.admin_listen.host, "127.0.0.1");
    assert_int_equal(c.admin_listen.port, 9091);
    assert_null(c.tls_cert_file);
    assert_null(c.tls_key_file);
    assert_null(c.upstream_tls.ca_file);
    assert_true(c.upstream_tls.verify);
    assert_null(c.upstream_tls.server_name);
    assert_int_equal(c.n_routes, 0);
    assert_null(c.routes);
    assert_int_equal(c.log_level, CFG_LOG_INFO);
    assert_true(c.log_access);
    cfg_free(&c);
}

static void test_default_file_equals_builtin(void **state)
{
    (void)state;
    char path[1024];
    source_path(path, sizeof path, "config/idemgate.json");
    struct cfg_flags fl = {.config_file = path};
    struct cfg a, b;
    if (cfg_load(&a, &fl, err, sizeof err) != 0) fail_msg("%s", err);
    load_ok(&b, "{}");
    assert_cfg_eq(&a, &b);
    cfg_free(&a);
    cfg_free(&b);
}

static void test_no_file_is_defaults(void **state)
{
    (void)state;
    struct cfg_flags fl = {0};
    struct cfg a, b;
    assert_int_equal(cfg_load(&a, &fl, err, sizeof err), 0);
    assert_int_equal(cfg_load(&b, NULL, err, sizeof err), 0);
    struct cfg d;
    load_ok(&d, "{}");
    assert_cfg_eq(&a, &d);
    assert_cfg_eq(&b, &d);
    cfg_free(&a);
    cfg_free(&b);
    cfg_free(&d);
}

static void test_example_sidecar(void **state)
{
    (void)state;
    char path[1024];
    source_path(path, sizeof path, "config/sidecar.json");
    struct cfg_flags fl = {.config_file = path};
    struct cfg c;
    if (cfg_load(&c, &fl, err, sizeof err) != 0) fail_msg("%s", err);
    assert_int_equal(c.workers, 2);
    assert_int_equal(c.upstream.servers[0].url.port, 3000);
    assert_int_equal(c.idem.anonymous, CFG_ANON_REJECT);
    assert_int_equal(c.n_routes, 0);
    cfg_free(&c);
}

static void test_example_gateway(void **state)
{
    (void)state;
    char path[1024];
    source_path(path, sizeof path, "config/gateway.json");
    struct cfg_flags fl = {.config_file = path};
    struct cfg c;
    if (cfg_load(&c, &fl, err, sizeof err) != 0) fail_msg("%s", err);
    assert_int_equal(c.redis.mode, CFG_REDIS_CLUSTER);
    assert_int_equal(c.redis.nodes.n, 3);
    assert_int_equal(c.n_routes, 3);
    assert_string_equal(c.routes[0].prefix, "/v1/payments");
    assert_true(c.routes[0].upstream.servers[0].url.tls);
    assert_true(c.routes[0].idem.required);
    assert_int_equal(c.routes[0].idem.mismatch_status, 422);
    assert_int_equal(c.routes[0].idem.lock_seconds, 30);
    const struct cfg_route *r = cfg_route_for(&c, "/v1/search?q=x", 14);
    assert_non_null(r);
    assert_false(r->idem.enabled);
    assert_string_equal(r->upstream.servers[0].url.host, "api.internal");
    r = cfg_route_for(&c, "/v1/images/1", 12);
    assert_non_null(r);
    assert_int_equal(r->idem.lock_seconds, 120);
    assert_int_equal(r->idem.max_cached_response_bytes, 8388608);
    assert_int_equal(c.error_format, CFG_ERR_PROBLEM);
    cfg_free(&c);
}

/* ---------------------------------------------------------------- JSON shape */

static void test_invalid_json_line(void **state)
{
    (void)state;
    expect_error("{\n  \"listen\": \"0.0.0.0:1\",\n  \"workers\": ,\n}",
                 "config: (json): invalid JSON near line 3");
    expect_error("", "config: (json): invalid JSON near line 1");
    expect_error("{\"a\":", "config: (json): invalid JSON near line 1");
}

static void test_trailing_garbage(void **state)
{
    (void)state;
    expect_error("{}\n\n x", "config: (json): invalid JSON near line 3");
    struct cfg c;
    load_ok(&c, "  {}  \n\t\r\n");
    cfg_free(&c);
}

static void test_embedded_nul(void **state)
{
    (void)state;
    struct cfg c;
    const char text[] = "{\n\"workers\": 1}\0{}";
    assert_int_equal(cfg_load_json(&c, text, sizeof text - 1, false, NULL, err, sizeof err), -1);
    assert_string_equal(err, "config: (json): invalid JSON near line 2");
}

static void test_top_level_not_object(void **state)
{
    (void)state;
    expect_error("[]", "config: (json): must be a JSON object");
    expect_error("42", "config: (json): must be a JSON object");
    expect_error("null", "config: (json): must be a JSON object");
}

static void test_file_errors(void **state)
{
    (void)state;
    struct cfg c;
    struct cfg_flags fl = {.config_file = "/nonexistent/idemgate.json"};
    assert_int_equal(cfg_load(&c, &fl, err, sizeof err), -1);
    assert_string_equal(
        err, "config: cannot read /nonexistent/idemgate.json: No such file or directory");
    assert_true(zeroed(&c));
    fl.config_file = "/";
    assert_int_equal(cfg_load(&c, &fl, err, sizeof err), -1);
    assert_string_equal(err, "config: cannot read /: Is a directory");
}

static void test_file_invalid_json_names_file(void **state)
{
    (void)state;
    char path[64], want[160];
    write_file(path, sizeof path, "{\n\"workers\": 2,\n\"listen\": nope\n}\n");
    struct cfg_flags fl = {.config_file = path};
    struct cfg c;
    assert_int_equal(cfg_load(&c, &fl, err, sizeof err), -1);
    snprintf(want, sizeof want, "config: %s: invalid JSON near line 3", path);
    assert_string_equal(err, want);
    unlink(path);
}

static void test_file_key_error(void **state)
{
    (void)state;
    char path[64];
    write_file(path, sizeof path, "{\"idempotency\": {\"lock_seconds\": 0}}");
    struct cfg_flags fl = {.config_file = path};
    struct cfg c;
    assert_int_equal(cfg_load(&c, &fl, err, sizeof err), -1);
    assert_string_equal(err, "config: idempotency.lock_seconds: must be an integer >= 1");
    unlink(path);
}

static void test_unknown_keys(void **state)
{
    (void)state;
    expect_error("{\"listn\": \"a:1\"}", "config: listn: unknown key");
    expect_error("{\"redis\": {\"timeout\": 5}}", "config: redis.timeout: unknown key");
    expect_error("{\"idempotency\": {\"ttl\": 5}}", "config: idempotency.ttl: unknown key");
    expect_error("{\"limits\": {\"x\": 1}}", "config: limits.x: unknown key");
    expect_error("{\"admin\": {\"port\": 1}}", "config: admin.port: unknown key");
    expect_error("{\"tls\": {\"ca_file\": \"\"}}", "config: tls.ca_file: unknown key");
    expect_error("{\"upstream_tls\": {\"cert\": \"\"}}", "config: upstream_tls.cert: unknown key");
    expect_error("{\"log\": {\"format\": \"json\"}}", "config: log.format: unknown key");
    expect_error("{\"memory\": {\"max\": 1048576}}", "config: memory.max: unknown key");
}

static void test_enabled_not_global(void **state)
{
    (void)state;
    expect_error("{\"idempotency\": {\"enabled\": false}}",
                 "config: idempotency.enabled: unknown key");
}

static void test_unknown_route_keys(void **state)
{
    (void)state;
    expect_error("{\"routes\": [{\"prefix\": \"/a\", \"path\": \"/b\"}]}",
                 "config: routes[0].path: unknown key");
    expect_error("{\"routes\": [{\"prefix\": \"/a\"}, {\"prefix\": \"/b\", \"idempotency\": "
                 "{\"enable\": false}}]}",
                 "config: routes[1].idempotency.enable: unknown key");
}

static void test_duplicate_key(void **state)
{
    (void)state;
    expect_error("{\"workers\": 1, \"workers\": 2}", "config: workers: duplicate key");
    expect_error("{\"redis\": {\"url\": \"redis://a\", \"url\": \"redis://b\"}}",
                 "config: redis.url: duplicate key");
}

static void test_section_not_object(void **state)
{
    (void)state;
    expect_error("{\"redis\": 1}", "config: redis: must be an object");
    expect_error("{\"idempotency\": []}", "config: idempotency: must be an object");
    expect_error("{\"log\": \"info\"}", "config: log: must be an object");
    expect_error("{\"memory\": 1048576}", "config: memory: must be an object");
}

static void test_control_chars_in_key(void **state)
{
    (void)state;
    expect_error("{\"a\\nb\": 1}", "config: a?b: unknown key");
}

/* ---------------------------------------------------------------- integers */

static void test_int_fraction(void **state)
{
    (void)state;
    expect_error("{\"idempotency\": {\"lock_seconds\": 1.5}}",
                 "config: idempotency.lock_seconds: must be an integer >= 1");
    expect_error("{\"workers\": 0.5}", "config: workers: must be an integer >= 0");
}

static void test_int_wrong_type(void **state)
{
    (void)state;
    expect_error("{\"idempotency\": {\"lock_seconds\": \"30\"}}",
                 "config: idempotency.lock_seconds: must be an integer >= 1");
    expect_error("{\"workers\": true}", "config: workers: must be an integer >= 0");
    expect_error("{\"workers\": null}", "config: workers: must be an integer >= 0");
}

static void test_int_below_min(void **state)
{
    (void)state;
    expect_error("{\"idempotency\": {\"lock_seconds\": 0}}",
                 "config: idempotency.lock_seconds: must be an integer >= 1");
    expect_error("{\"workers\": -1}", "config: workers: must be an integer >= 0");
}

static void test_int_above_max(void **state)
{
    (void)state;
    expect_error("{\"idempotency\": {\"lock_seconds\": 86401}}",
                 "config: idempotency.lock_seconds: must be an integer <= 86400");
    expect_error("{\"workers\": 1025}", "config: workers: must be an integer <= 1024");
    expect_error("{\"workers\": 1e300}", "config: workers: must be an integer <= 1024");
}

static void test_workers(void **state)
{
    (void)state;
    struct cfg c;
    load_ok(&c, "{\"workers\": 0}");
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    assert_int_equal(c.workers, n < 1 ? 1 : (n > 1024 ? 1024 : n));
    cfg_free(&c);
    load_ok(&c, "{\"workers\": 7}");
    assert_int_equal(c.workers, 7);
    cfg_free(&c);
    load_ok(&c, "{\"workers\": 1024}");
    assert_int_equal(c.workers, 1024);
    cfg_free(&c);
}

static void test_ttl_range(void **state)
{
    (void)state;
    struct cfg c;
    load_ok(&c, "{\"idempotency\": {\"ttl_seconds\": 31536000}}");
    assert_int_equal(c.idem.ttl_seconds, 31536000);
    cfg_free(&c);
    expect_error("{\"idempotency\": {\"ttl_seconds\": 31536001}}",
                 "config: idempotency.ttl_seconds: must be an integer <= 31536000");
    expect_error("{\"idempotency\": {\"ttl_seconds\": 0}}",
                 "config: idempotency.ttl_seconds: must be an integer >= 1");
}

static void test_key_max_length_range(void **state)
{
    (void)state;
    expect_error("{\"idempotency\": {\"key_max_length\": 0}}",
                 "config: idempotency.key_max_length: must be an integer >= 1");
    expect_error("{\"idempotency\": {\"key_max_length\": 8193}}",
                 "config: idempotency.key_max_length: must be an integer <= 8192");
}

static void test_wait_max_ms_range(void **state)
{
    (void)state;
    struct cfg c;
    load_ok(&c, "{\"idempotency\": {\"wait_max_ms\": 0, \"concurrent\": \"wait\"}}");
    assert_int_equal(c.idem.wait_max_ms, 0);
    assert_int_equal(c.idem.concurrent, CFG_CONC_WAIT);
    cfg_free(&c);
    expect_error("{\"idempotency\": {\"wait_max_ms\": 600001}}",
                 "config: idempotency.wait_max_ms: must be an integer <= 600000");
}

static void test_redis_int_ranges(void **state)
{
    (void)state;
    expect_error("{\"redis\": {\"timeout_ms\": 0}}",
                 "config: redis.timeout_ms: must be an integer >= 1");
    expect_error("{\"redis\": {\"timeout_ms\": 600001}}",
                 "config: redis.timeout_ms: must be an integer <= 600000");
    expect_error("{\"redis\": {\"wait_replicas\": 65}}",
                 "config: redis.wait_replicas: must be an integer <= 64");
    expect_error("{\"redis\": {\"wait_replicas\": -1}}",
                 "config: redis.wait_replicas: must be an integer >= 0");
}

static void test_u64_ranges(void **state)
{
    (void)state;
    struct cfg c;
    load_ok(&c, "{\"limits\": {\"max_request_body_bytes\": 4294967296}, \"idempotency\": "
                "{\"max_cached_response_bytes\": 1073741824}}");
    assert_true(c.limits.max_request_body_bytes == 4294967296ULL);
    assert_true(c.idem.max_cached_response_bytes == 1073741824ULL);
    cfg_free(&c);
    load_ok(&c, "{\"limits\": {\"max_request_body_bytes\": 0}}");
    assert_true(c.limits.max_request_body_bytes == 0);
    cfg_free(&c);
    expect_error("{\"limits\": {\"max_request_body_bytes\": 4294967297}}",
                 "config: limits.max_request_body_bytes: must be an integer <= 4294967296");
    expect_error("{\"idempotency\": {\"max_cached_response_bytes\": 1073741825}}",
                 "config: idempotency.max_cached_response_bytes: must be an integer <= 1073741824");
    expect_error("{\"idempotency\": {\"max_cached_response_bytes\": -1}}",
                 "config: idempotency.max_cached_response_bytes: must be an integer >= 0");
}

/* memory.max_scope_bytes: 0 (no limit of its own) up to 64 GiB; a value
 * above max_bytes is accepted (max_bytes binds first). */
static void test_memory_max_scope_bytes(void **state)
{
    (void)state;
    struct cfg c;
    load_ok(&c, "{\"memory\": {\"max_scope_bytes\": 0}}");
    assert_true(c.memory_max_scope_bytes == 0);
    cfg_free(&c);
    load_ok(&c, "{\"memory\": {\"max_bytes\": 1048576, \"max_scope_bytes\": 4194304}}");
    assert_true(c.memory_max_scope_bytes == 4194304ULL);
    assert_true(c.memory_max_bytes == 1048576ULL);
    cfg_free(&c);
    load_ok(&c, "{\"memory\": {\"max_scope_bytes\": 68719476736}}");
    assert_true(c.memory_max_scope_bytes == 68719476736ULL);
    cfg_free(&c);
    expect_error("{\"memory\": {\"max_scope_bytes\": 68719476737}}",
                 "config: memory.max_scope_bytes: must be an integer <= 68719476736");
    expect_error("{\"memory\": {\"max_scope_bytes\": -1}}",
                 "config: memory.max_scope_bytes: must be an integer >= 0");
    expect_error("{\"memory\": {\"max_scope_bytes\": \"32MB\"}}",
                 "config: memory.max_scope_bytes: must be an integer >= 0");
}

static void test_memory_max_bytes(void **state)
{
    (void)state;
    struct cfg c;
    load_ok(&c, "{\"memory\": {\"max_bytes\": 1048576}}");
    assert_true(c.memory_max_bytes == 1048576ULL);
    cfg_free(&c);
    load_ok(&c, "{\"memory\": {\"max_bytes\": 68719476736}}");
    assert_true(c.memory_max_bytes == 68719476736ULL);
    cfg_free(&c);
    load_ok(&c, "{\"memory\": {}}");
    assert_true(c.memory_max_bytes == 268435456ULL);
    cfg_free(&c);
    expect_error("{\"memory\": {\"max_bytes\": 1048575}}",
                 "config: memory.max_bytes: must be an integer >= 1048576");
    expect_error("{\"memory\": {\"max_bytes\": 68719476737}}",
                 "config: memory.max_bytes: must be an integer <= 68719476736");
    expect_error("{\"memory\": {\"max_bytes\": 0}}",
                 "config: memory.max_bytes: must be an integer >= 1048576");
    expect_error("{\"memory\": {\"max_bytes\": 2097152.5}}",
                 "config: memory.max_bytes: must be an integer >= 1048576");
    expect_error("{\"memory\": {\"max_bytes\": \"256MB\"}}",
                 "config: memory.max_bytes: must be an integer >= 1048576");
}

static void test_max_header_bytes_range(void **state)
{
    (void)state;
    expect_error("{\"limits\": {\"max_header_bytes\": 1023}}",
                 "config: limits.max_header_bytes: must be an integer >= 1024");
    expect_error("{\"limits\": {\"max_header_bytes\": 1048577}}",
                 "config: limits.max_header_bytes: must be an integer <= 1048576");
}

static void test_limits_ranges(void **state)
{
    (void)state;
    expect_error("{\"limits\": {\"upstream_connect_timeout_ms\": 0}}",
                 "config: limits.upstream_connect_timeout_ms: must be an integer >= 1");
    expect_error("{\"limits\": {\"upstream_timeout_ms\": 3600001}}",
                 "config: limits.upstream_timeout_ms: must be an integer <= 3600000");
    expect_error("{\"limits\": {\"client_timeout_ms\": 0}}",
                 "config: limits.client_timeout_ms: must be an integer >= 1");
    expect_error("{\"limits\": {\"max_connections\": 0}}",
                 "config: limits.max_connections: must be an integer >= 1");
    expect_error("{\"limits\": {\"max_connections\": 1000001}}",
                 "config: limits.max_connections: must be an integer <= 1000000");
    expect_error("{\"limits\": {\"shutdown_grace_ms\": -1}}",
                 "config: limits.shutdown_grace_ms: must be an integer >= 0");
}

static void test_mismatch_status(void **state)
{
    (void)state;
    struct cfg c;
    load_ok(&c, "{\"idempotency\": {\"mismatch_status\": 422}}");
    assert_int_equal(c.idem.mismatch_status, 422);
    cfg_free(&c);
    expect_error("{\"idempotency\": {\"mismatch_status\": 400}}",
                 "config: idempotency.mismatch_status: must be 409 or 422");
    expect_error("{\"idempotency\": {\"mismatch_status\": \"409\"}}",
                 "config: idempotency.mismatch_status: must be 409 or 422");
    expect_error("{\"idempotency\": {\"mismatch_status\": 409.5}}",
                 "config: idempotency.mismatch_status: must be 409 or 422");
}

/* ---------------------------------------------------------------- other types */

static void test_bool_type(void **state)
{
    (void)state;
    expect_error("{\"idempotency\": {\"required\": \"true\"}}",
                 "config: idempotency.required: must be true or false");
    expect_error("{\"log\": {\"access\": 1}}", "config: log.access: must be true or false");
    expect_error("{\"upstream_tls\": {\"verify\": null}}",
                 "config: upstream_tls.verify: must be true or false");
    struct cfg c;
    load_ok(&c, "{\"idempotency\": {\"required\": true, \"cache_5xx\": true}, \"log\": "
                "{\"access\": false}}");
    assert_true(c.idem.required);
    assert_true(c.idem.cache_5xx);
    assert_false(c.log_access);
    cfg_free(&c);
}

static void test_string_type(void **state)
{
    (void)state;
    expect_error("{\"idempotency\": {\"scope_secret\": 5}}",
                 "config: idempotency.scope_secret: must be a string");
    expect_error("{\"tls\": {\"cert_file\": []}}", "config: tls.cert_file: must be a string");
    expect_error("{\"redis\": {\"master_name\": false}}",
                 "config: redis.master_name: must be a string");
}

static void test_enums(void **state)
{
    (void)state;
    expect_error("{\"store\": \"mongo\"}", "config: store: must be redis, memory or lmdb");
    expect_error("{\"store\": 1}", "config: store: must be redis, memory or lmdb");
    expect_error("{\"redis\": {\"mode\": \"replica\"}}",
                 "config: redis.mode: must be standalone, cluster or sentinel");
    expect_error("{\"redis\": {\"failure_mode\": \"Open\"}}",
                 "config: redis.failure_mode: must be closed or open");
    expect_error("{\"idempotency\": {\"anonymous\": \"allow\"}}",
                 "config: idempotency.anonymous: must be shared, reject or bypass");
    expect_error("{\"idempotency\": {\"concurrent\": \"queue\"}}",
                 "config: idempotency.concurrent: must be reject or wait");
    expect_error("{\"error_format\": \"xml\"}", "config: error_format: must be json or problem");
    expect_error("{\"log\": {\"level\": \"trace\"}}",
                 "config: log.level: must be debug, info, warn or error");
}

static void test_enum_values(void **state)
{
    (void)state;
    struct cfg c;
    load_ok(&c, "{\"store\": \"memory\", \"error_format\": \"problem\", \"redis\": "
                "{\"failure_mode\": \"open\"}, \"idempotency\": {\"anonymous\": \"bypass\"}, "
                "\"log\": {\"level\": \"error\"}}");
    assert_int_equal(c.store, CFG_STORE_MEMORY);
    assert_int_equal(c.error_format, CFG_ERR_PROBLEM);
    assert_int_equal(c.redis.failure_mode, CFG_FAIL_OPEN);
    assert_int_equal(c.idem.anonymous, CFG_ANON_BYPASS);
    assert_int_equal(c.log_level, CFG_LOG_ERROR);
    cfg_free(&c);
}

static void test_header_token(void **state)
{
    (void)state;
    expect_error("{\"idempotency\": {\"header\": \"Idem Key\"}}",
                 "config: idempotency.header: must be a valid HTTP header name");
    expect_error("{\"idempotency\": {\"header\": \"\"}}",
                 "config: idempotency.header: must be a valid HTTP header name");
    expect_error("{\"idempotency\": {\"header\": \"X:Y\"}}",
                 "config: idempotency.header: must be a valid HTTP header name");
    struct cfg c;
    load_ok(&c, "{\"idempotency\": {\"header\": \"X-Idempotency-Key\"}}");
    assert_string_equal(c.idem.header, "X-Idempotency-Key");
    cfg_free(&c);
}

static void test_methods(void **state)
{
    (void)state;
    expect_error("{\"idempotency\": {\"methods\": [\"post\"]}}",
                 "config: idempotency.methods: must be upper-case HTTP method tokens");
    expect_error("{\"idempotency\": {\"methods\": \"POST\"}}",
                 "config: idempotency.methods: must be upper-case HTTP method tokens");
    expect_error("{\"idempotency\": {\"methods\": [\"POST\", 1]}}",
                 "config: idempotency.methods: must be upper-case HTTP method tokens");
    expect_error("{\"idempotency\": {\"methods\": [\"PO ST\"]}}",
                 "config: idempotency.methods: must be upper-case HTTP method tokens");
    struct cfg c;
    load_ok(&c, "{\"idempotency\": {\"methods\": [\"POST\", \"PUT\", \"M-SEARCH\"]}}");
    assert_int_equal(c.idem.methods.n, 3);
    assert_string_equal(c.idem.methods.v[2], "M-SEARCH");
    cfg_free(&c);
    load_ok(&c, "{\"idempotency\": {\"methods\": []}}");
    assert_int_equal(c.idem.methods.n, 0);
    assert_false(cfg_idem_covers_method(&c.idem, "POST", 4));
    cfg_free(&c);
}

static void test_header_lists(void **state)
{
    (void)state;
    expect_error("{\"idempotency\": {\"scope_headers\": [\"Bad Header\"]}}",
                 "config: idempotency.scope_headers: must be an array of HTTP header names");
    expect_error("{\"idempotency\": {\"fingerprint_headers\": \"Content-Type\"}}",
                 "config: idempotency.fingerprint_headers: must be an array of HTTP header names");
    expect_error("{\"idempotency\": {\"replay_exclude_headers\": [\"Date\", null]}}",
                 "config: idempotency.replay_exclude_headers: must be an array of HTTP header "
                 "names");
    expect_error("{\"idempotency\": {\"scope_headers\": [\"\"]}}",
                 "config: idempotency.scope_headers: must be an array of HTTP header names");
    struct cfg c;
    load_ok(&c, "{\"idempotency\": {\"scope_headers\": [], \"replay_exclude_headers\": "
                "[\"Set-Cookie\"]}}");
    assert_int_equal(c.idem.scope_headers.n, 0);
    assert_int_equal(c.idem.replay_exclude_headers.n, 1);
    cfg_free(&c);
}

/* ---------------------------------------------------------------- addresses */

static void test_listen_ipv6(void **state)
{
    (void)state;
    struct cfg c;
    load_ok(&c, "{\"listen\": \"[::1]:8080\"}");
    assert_string_equal(c.listen.host, "::1");
    assert_int_equal(c.listen.port, 8080);
    assert_string_equal(c.listen.text, "[::1]:8080");
    cfg_free(&c);
    load_ok(&c, "{\"listen\": \"[::]:80\"}");
    assert_string_equal(c.listen.host, "::");
    cfg_free(&c);
}

static void test_listen_forms(void **state)
{
    (void)state;
    struct cfg c;
    load_ok(&c, "{\"listen\": \"*:8081\"}");
    assert_string_equal(c.listen.host, "0.0.0.0");
    assert_int_equal(c.listen.port, 8081);
    cfg_free(&c);
    load_ok(&c, "{\"listen\": \"localhost:65535\"}");
    assert_string_equal(c.listen.host, "localhost");
    assert_int_equal(c.listen.port, 65535);
    cfg_free(&c);
    load_ok(&c, "{\"listen\": \"10.1.2.3:1\"}");
    assert_string_equal(c.listen.host, "10.1.2.3");
    cfg_free(&c);
}

static void test_listen_bad(void **state)
{
    (void)state;
    static const char *const bad[] = {
        "8080",     "localhost", "host:0",   "host:65536", ":8080",   "::1:8080",
        "[::1]",    "[zz]:80",   "host:80x", "host:",      "[::1]80", "a b:80",
        "host:+80", "[]:80",     "*:",       "*:0",        "",        "host:99999999999",
    };
    char json[128];
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        snprintf(json, sizeof json, "{\"listen\": \"%s\"}", bad[i]);
        expect_error(json, "config: listen: must be host:port");
    }
    expect_error("{\"listen\": 8080}", "config: listen: must be host:port");
}

static void test_admin_listen(void **state)
{
    (void)state;
    struct cfg c;
    load_ok(&c, "{\"admin\": {\"listen\": \"off\"}}");
    assert_false(c.admin_enabled);
    assert_null(c.admin_listen.host);
    cfg_free(&c);
    load_ok(&c, "{\"admin\": {\"listen\": \"[::1]:9999\"}}");
    assert_true(c.admin_enabled);
    assert_string_equal(c.admin_listen.host, "::1");
    assert_int_equal(c.admin_listen.port, 9999);
    cfg_free(&c);
    expect_error("{\"admin\": {\"listen\": \"9091\"}}",
                 "config: admin.listen: must be host:port or off");
    expect_error("{\"admin\": {\"listen\": false}}",
                 "config: admin.listen: must be host:port or off");
}

/* ---------------------------------------------------------------- URLs */

static void test_upstream_good(void **state)
{
    (void)state;
    struct cfg c;
    load_ok(&c, "{\"upstream\": \"https://api.example.com\"}");
    assert_true(c.upstream.servers[0].url.tls);
    assert_string_equal(c.upstream.servers[0].url.host, "api.example.com");
    assert_int_equal(c.upstream.servers[0].url.port, 443);
    assert_string_equal(c.upstream.servers[0].url.text, "https://api.example.com");
    cfg_free(&c);
    load_ok(&c, "{\"upstream\": \"http://backend/\"}");
    assert_false(c.upstream.servers[0].url.tls);
    assert_string_equal(c.upstream.servers[0].url.host, "backend");
    assert_int_equal(c.upstream.servers[0].url.port, 80);
    cfg_free(&c);
    load_ok(&c, "{\"upstream\": \"http://[::1]:9000\"}");
    assert_string_equal(c.upstream.servers[0].url.host, "::1");
    assert_int_equal(c.upstream.servers[0].url.port, 9000);
    cfg_free(&c);
    load_ok(&c, "{\"upstream\": \"HTTPS://h:8443/\"}");
    assert_true(c.upstream.servers[0].url.tls);
    assert_int_equal(c.upstream.servers[0].url.port, 8443);
    cfg_free(&c);
}

static void test_upstream_bad(void **state)
{
    (void)state;
    static const char *const bad[] = {
        "ftp://h",
        "http://",
        "http://h?x=1",
        "http://u@h",
        "http://u:p@h:80",
        "http://h:0",
        "http://h:99999",
        "http://[::1",
        "h:80",
        "https://:443",
        "http://h#frag",
        "http://[::1]x",
        "",
    };
    char json[128];
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        snprintf(json, sizeof json, "{\"upstream\": \"%s\"}", bad[i]);
        expect_error(json, "config: upstream: must be an http:// or https:// URL with a host");
    }
    expect_error("{\"upstream\": null}",
                 "config: upstream: must be an http:// or https:// URL with a host");
    /* a path is named: the client's path is forwarded as it is */
    expect_error("{\"upstream\": \"http://h/base\"}",
                 "config: upstream: must be an http:// or https:// URL without a path (got "
                 "/base): the client's path is forwarded as it is");
    expect_error("{\"upstream\": \"http://h:80//\"}",
                 "config: upstream: must be an http:// or https:// URL without a path (got //): "
                 "the client's path is forwarded as it is");
}

static void test_upstream_group(void **state)
{
    (void)state;
    struct cfg c;
    load_ok(&c, "{\"upstream\": {\"servers\": [\"http://a:1\", {\"url\": \"http://b:2\", "
                "\"weight\": 5}, \"http://c:3\"]}}");
    assert_int_equal(c.upstream.n, 3);
    assert_string_equal(c.upstream.servers[1].url.host, "b");
    assert_int_equal(c.upstream.servers[0].weight, 1);
    assert_int_equal(c.upstream.servers[1].weight, 5);
    assert_int_equal(c.upstream.balance, CFG_BALANCE_ROUND_ROBIN);
    assert_int_equal(c.upstream.max_fails, 1);
    assert_int_equal(c.upstream.fail_timeout_ms, 10000);
    assert_int_equal(c.upstream.retries, 2); /* servers minus one */
    cfg_free(&c);
    load_ok(&c, "{\"upstream\": {\"servers\": [\"https://a\", \"https://b\"], \"balance\": "
                "\"least_conn\", \"max_fails\": 0, \"fail_timeout_ms\": 100, \"retries\": 0},"
                " \"routes\": [{\"prefix\": \"/a\"}, {\"prefix\": \"/b\", \"upstream\": "
                "\"http://x:9\"}]}");
    assert_int_equal(c.upstream.balance, CFG_BALANCE_LEAST_CONN);
    assert_int_equal(c.upstream.max_fails, 0);
    assert_int_equal(c.upstream.retries, 0);
    assert_true(c.upstream.servers[0].url.tls);
    const struct cfg_route *a = cfg_route_for(&c, "/a", 2), *b = cfg_route_for(&c, "/b", 2);
    assert_false(a->upstream_own);
    assert_int_equal(a->upstream.n, 2); /* a copy of the global group */
    assert_true(b->upstream_own);
    assert_int_equal(b->upstream.n, 1);
    cfg_free(&c);
}

static void test_upstream_group_bad(void **state)
{
    (void)state;
    expect_error("{\"upstream\": {\"servers\": []}}",
                 "config: upstream.servers: must name at least one server");
    expect_error("{\"upstream\": {}}", "config: upstream.servers: is required");
    expect_error("{\"upstream\": {\"servers\": [\"http://a\", \"https://b\"]}}",
                 "config: upstream.servers: mixes http:// and https:// servers: a group has one "
                 "scheme");
    expect_error("{\"upstream\": {\"servers\": [{\"url\": \"http://a\", \"weight\": 0}]}}",
                 "config: upstream.servers[0].weight: must be an integer 1..100");
    expect_error("{\"upstream\": {\"servers\": [{\"url\": \"http://a\", \"weight\": 101}]}}",
                 "config: upstream.servers[0].weight: must be an integer 1..100");
    expect_error("{\"upstream\": {\"servers\": [{\"weight\": 2}]}}",
                 "config: upstream.servers[0].url: is required");
    expect_error("{\"upstream\": {\"servers\": [\"http://a\", \"http://b\"], \"retries\": 2}}",
                 "config: upstream.retries: must be 0..1 (the number of servers minus one)");
    expect_error("{\"upstream\": {\"servers\": [\"http://a\"], \"balance\": \"random\"}}",
                 "config: upstream.balance: must be round_robin or least_conn");
    expect_error("{\"upstream\": {\"servers\": [\"http://a\"], \"max_fails\": 101}}",
                 "config: upstream.max_fails: must be an integer 0..100");
    expect_error("{\"upstream\": {\"servers\": [\"http://a\"], \"fail_timeout_ms\": 99}}",
                 "config: upstream.fail_timeout_ms: must be an integer 100..3600000");
    expect_error("{\"upstream\": {\"servers\": [\"http://a\"], \"weight\": 1}}",
                 "config: upstream.weight: unknown key");
    expect_error("{\"upstream\": {\"servers\": [\"http://a/x\"]}}",
                 "config: upstream.servers[0]: must be an http:// or https:// URL without a path "
                 "(got /x): the client's path is forwarded as it is");
    expect_error("{\"routes\": [{\"prefix\": \"/r\", \"upstream\": {\"servers\": 1}}]}",
                 "config: routes[0].upstream.servers: must be a list of servers");
}

static void test_redis_url_tcp(void **state)
{
    (void)state;
    struct cfg c;
    load_ok(&c, "{\"redis\": {\"url\": \"redis://:s3cret@r.example:6380/3\"}}");
    assert_false(c.redis.unix_socket);
    assert_null(c.redis.username);
    assert_string_equal(c.redis.host, "r.example");
    assert_int_equal(c.redis.port, 6380);
    assert_string_equal(c.redis.password, "s3cret");
    assert_int_equal(c.redis.db, 3);
    assert_string_equal(c.redis.url, "redis://:s3cret@r.example:6380/3");
    cfg_free(&c);
    assert_null(c.redis.username);
    cfg_free(&c);
    load_ok(&c, "{\"redis\": {\"url\": \"redis://user:pw@h\"}}");
    assert_string_equal(c.redis.host, "h");
    assert_int_equal(c.redis.port, 6379);
    assert_string_equal(c.redis.username, "user");
    assert_string_equal(c.redis.password, "pw");
    assert_int_equal(c.redis.db, 0);
    cfg_free(&c);
    /* an ACL user with a percent-encoded name and password, a database
     * above 15 (Redis decides how many it has) */
    load_ok(&c, "{\"redis\": {\"url\": \"redis://app%3Aone:p%40ss:w@h:7001/20\"}}");
    assert_string_equal(c.redis.username, "app:one");
    assert_string_equal(c.redis.password, "p@ss:w");
    assert_int_equal(c.redis.port, 7001);
    assert_int_equal(c.redis.db, 20);
    cfg_free(&c);
    load_ok(&c, "{\"redis\": {\"url\": \"redis://h/2147483647\"}}");
    assert_int_equal(c.redis.db, 2147483647);
    assert_null(c.redis.username);
    assert_null(c.redis.password);
    cfg_free(&c);
    /* a user without a password (a nopass ACL user) */
    load_ok(&c, "{\"redis\": {\"url\": \"redis://bot:@h\"}}");
    assert_string_equal(c.redis.username, "bot");
    assert_string_equal(c.redis.password, "");
    cfg_free(&c);
    load_ok(&c, "{\"redis\": {\"url\": \"redis://:@h\"}}");
    assert_null(c.redis.username);
    assert_null(c.redis.password);
    cfg_free(&c);
    load_ok(&c, "{\"redis\": {\"url\": \"redis://[::1]:7000/15\"}}");
    assert_string_equal(c.redis.host, "::1");
    assert_int_equal(c.redis.port, 7000);
    assert_int_equal(c.redis.db, 15);
    assert_null(c.redis.password);
    cfg_free(&c);
    load_ok(&c, "{\"redis\": {\"url\": \"redis://:p%40ss@h/\"}}");
    assert_string_equal(c.redis.password, "p@ss");
    assert_int_equal(c.redis.db, 0);
    cfg_free(&c);
}

static void test_redis_url_tls(void **state)
{
    (void)state;
    struct cfg c;
    /* rediss:// is redis:// over TLS: the same grammar, the same parts */
    load_ok(&c, "{\"redis\": {\"url\": \"rediss://app:p%40ss@r.example:6380/3\"}}");
    assert_true(c.redis.tls);
    assert_false(c.redis.unix_socket);
    assert_string_equal(c.redis.host, "r.example");
    assert_int_equal(c.redis.port, 6380);
    assert_string_equal(c.redis.username, "app");
    assert_string_equal(c.redis.password, "p@ss");
    assert_int_equal(c.redis.db, 3);
    assert_string_equal(c.redis.url, "rediss://app:p%40ss@r.example:6380/3");
    cfg_free(&c);
    load_ok(&c, "{\"redis\": {\"url\": \"rediss://[::1]\"}}");
    assert_true(c.redis.tls);
    assert_string_equal(c.redis.host, "::1");
    assert_int_equal(c.redis.port, 6379); /* no other default port for TLS */
    cfg_free(&c);
    /* a later source replaces the scheme too */
    struct cfg_flags fl = {.redis = "redis://h"};
    const char *json = "{\"redis\": {\"url\": \"rediss://h\"}}";
    assert_int_equal(cfg_load_json(&c, json, strlen(json), false, &fl, err, sizeof err), 0);
    assert_false(c.redis.tls);
    cfg_free(&c);
    fl.redis = "rediss://h:7000";
    assert_int_equal(cfg_load_json(&c, "{}", 2, false, &fl, err, sizeof err), 0);
    assert_true(c.redis.tls);
    assert_int_equal(c.redis.port, 7000);
    cfg_free(&c);
    /* the scheme decides TLS for cluster nodes and sentinels too: the url
     * is still parsed (and required to be valid) in those modes */
    load_ok(&c, "{\"redis\": {\"mode\": \"cluster\", \"url\": \"rediss://:pw@unused\", "
                "\"nodes\": [\"a:7000\"]}}");
    assert_true(c.redis.tls);
    assert_string_equal(c.redis.password, "pw");
    cfg_free(&c);
}

static void test_redis_tls_section(void **state)
{
    (void)state;
    struct cfg c;
    load_ok(&c, "{\"redis\": {\"url\": \"rediss://h\", \"tls\": {\"ca_file\": \"\", "
                "\"verify\": false, \"server_name\": \"redis.internal\"}}}");
    assert_null(c.redis.tls_client.ca_file);
    assert_false(c.redis.tls_client.verify);
    assert_string_equal(c.redis.tls_client.server_name, "redis.internal");
    /* its own copy: upstream_tls keeps its defaults */
    assert_true(c.upstream_tls.verify);
    assert_null(c.upstream_tls.server_name);
    cfg_free(&c);
    /* "tls" may come before "url", and is kept (unused) with redis:// */
    load_ok(&c, "{\"redis\": {\"tls\": {\"server_name\": \"x\"}, \"url\": \"redis://h\"}, "
                "\"upstream_tls\": {\"server_name\": \"y\"}}");
    assert_false(c.redis.tls);
    assert_string_equal(c.redis.tls_client.server_name, "x");
    assert_string_equal(c.upstream_tls.server_name, "y");
    cfg_free(&c);
    load_ok(&c, "{\"redis\": {\"tls\": {}}}");
    assert_true(c.redis.tls_client.verify);
    cfg_free(&c);
    expect_error("{\"redis\": {\"tls\": {\"verify\": \"no\"}}}",
                 "config: redis.tls.verify: must be true or false");
    expect_error("{\"redis\": {\"tls\": {\"ca_file\": 1}}}",
                 "config: redis.tls.ca_file: must be a string");
    expect_error("{\"redis\": {\"tls\": {\"server_name\": null}}}",
                 "config: redis.tls.server_name: must be a string");
    expect_error("{\"redis\": {\"tls\": {\"cert_file\": \"/c.pem\"}}}",
                 "config: redis.tls.cert_file: unknown key");
    expect_error("{\"redis\": {\"tls\": true}}", "config: redis.tls: must be an object");
    expect_error("{\"redis\": {\"tls\": {}, \"tls\": {}}}", "config: redis.tls: duplicate key");
    expect_error("{\"redis\": {\"tls\": {\"verify\": true, \"verify\": false}}}",
                 "config: redis.tls.verify: duplicate key");
    /* nested only: not a top-level key, not inside another section */
    expect_error("{\"redis.tls\": {}}", "config: redis.tls: unknown key");
    expect_error("{\"upstream_tls\": {\"tls\": {}}}", "config: upstream_tls.tls: unknown key");
    expect_error("{\"redis\": {\"tls\": {\"tls\": {}}}}", "config: redis.tls.tls: unknown key");
    expect_error("{\"routes\": [{\"prefix\": \"/a\", \"idempotency\": {\"tls\": {}}}]}",
                 "config: routes[0].idempotency.tls: unknown key");
}

/* A CA certificate (EC P-256, the same throwaway CA as tests/unit/net/
 * test_tls.c): a file redis.tls.ca_file may name. */
static const char CA_PEM[] = "-----BEGIN CERTIFICATE-----\n"
                             "MIIBjjCCATOgAwIBAgIUEGxqHWfCYSoy6vb9xOT5hlDB3sQwCgYIKoZIzj0EAwIw\n"
                             "GzEZMBcGA1UEAwwQaWRlbWdhdGUgdGVzdCBDQTAgFw0yNjEyMDcxODAzMjFaGA8y\n"
                             "MTI2MTExMzE4MDMyMVowGzEZMBcGA1UEAwwQaWRlbWdhdGUgdGVzdCBDQTBZMBMG\n"
                             "ByqGSM49AgEGCCqGSM49AwEHA0IABAtyKN2bMohBkP2rXq5qFhWRhpZ/a9C+GsWJ\n"
                             "kZCsaLBI0kqyrkMufArBBIqG7BZUpFBlcTlcZtyw1/Rq7TYsgs2jUzBRMB0GA1Ud\n"
                             "DgQWBBTA474KI0z3cH94BhWsjAdsn+wnpDAfBgNVHSMEGDAWgBTA474KI0z3cH94\n"
                             "BhWsjAdsn+wnpDAPBgNVHRMBAf8EBTADAQH/MAoGCCqGSM49BAMCA0kAMEYCIQCp\n"
                             "oP/2wDQsutsRMAomQvtOvvqDIz21CrHLpLeBgqfFPgIhAJunAmGgxWHGeO+x0AYj\n"
                             "lgvA8LHvKl+rTxpdcq9LxEXf\n"
                             "-----END CERTIFICATE-----\n";

static void test_redis_tls_ca_file(void **state)
{
    (void)state;
    char ca[64], junk[64], json[512];
    struct cfg c;
    write_file(ca, sizeof ca, CA_PEM);
    write_file(junk, sizeof junk, "not a certificate\n");
    snprintf(json, sizeof json,
             "{\"redis\": {\"url\": \"rediss://h\", \"tls\": {\"ca_file\": \"%s\"}}}", ca);
    load_ok(&c, json);
    assert_string_equal(c.redis.tls_client.ca_file, ca);
    cfg_free(&c);
    /* missing, a directory, not PEM: one line naming the key (exit 2 at -t) */
    expect_error(
        "{\"redis\": {\"url\": \"rediss://h\", \"tls\": {\"ca_file\": \"/nonexistent/ca.pem\"}}}",
        "config: redis.tls.ca_file: cannot load /nonexistent/ca.pem: No such file or "
        "directory");
    expect_error("{\"redis\": {\"url\": \"rediss://h\", \"tls\": {\"ca_file\": \"/tmp\"}}}",
                 "config: redis.tls.ca_file: cannot load /tmp: not a regular file");
    snprintf(json, sizeof json,
             "{\"redis\": {\"url\": \"rediss://h\", \"tls\": {\"ca_file\": \"%s\"}}}", junk);
    assert_int_equal(load(&c, json), -1);
    char want[160];
    snprintf(want, sizeof want, "config: redis.tls.ca_file: cannot load %s: ", junk);
    assert_memory_equal(err, want, strlen(want));
    assert_non_null(strstr(err, "no certificate"));
    assert_null(strchr(err, '\n'));
    /* the url from a flag (applied last) still gets the file checked */
    struct cfg_flags fl = {.redis = "rediss://h"};
    expect_error_with("{\"redis\": {\"tls\": {\"ca_file\": \"/nonexistent/ca.pem\"}}}", false, &fl,
                      "config: redis.tls.ca_file: cannot load /nonexistent/ca.pem: No such file "
                      "or directory");
    /* not read when nothing will read it: redis://, the memory store, or
     * verify false */
    load_ok(&c, "{\"redis\": {\"tls\": {\"ca_file\": \"/nonexistent/ca.pem\"}}}");
    cfg_free(&c);
    load_ok(&c, "{\"store\": \"memory\", \"redis\": {\"url\": \"rediss://h\", \"tls\": "
                "{\"ca_file\": \"/nonexistent/ca.pem\"}}}");
    cfg_free(&c);
    load_ok(&c, "{\"redis\": {\"url\": \"rediss://h\", \"tls\": {\"ca_file\": "
                "\"/nonexistent/ca.pem\", \"verify\": false}}}");
    cfg_free(&c);
    unlink(ca);
    unlink(junk);
}

static void test_redis_url_unix(void **state)
{
    (void)state;
    struct cfg c;
    load_ok(&c, "{\"redis\": {\"url\": \"unix:///var/run/redis/redis.sock\"}}");
    assert_true(c.redis.unix_socket);
    assert_string_equal(c.redis.host, "/var/run/redis/redis.sock");
    assert_null(c.redis.password);
    cfg_free(&c);
}

static void test_redis_url_bad(void **state)
{
    (void)state;
    static const char *const bad[] = {
        "http://h",           "redis://",         "redis://h/2147483648", "redis://h/-1",
        "redis://user@h",     "redis://u%zz:p@h", "redis://h/x",          "unix://relative",
        "unix:///",           "redis://h:0",      "redis://:%zz@h",       "rediss://",
        "redis://h:6379/0?x", "redis://a b",      "redis://:%00@h",       "",
        "REDISS://h",         "rediss:/h",        "rediss://h/x",         "redis+tls://h",
        "rediss:///tmp/s",    "unixs:///tmp/s",   "rediss://u@h",         "redisss://h",
    };
    char json[128];
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        snprintf(json, sizeof json, "{\"redis\": {\"url\": \"%s\"}}", bad[i]);
        expect_error(json,
                     "config: redis.url: must be redis[s]://[[user]:password@]host[:port][/db] "
                     "or unix:///path");
    }
}

/* ---------------------------------------------------------------- redis modes */

static void test_redis_cluster(void **state)
{
    (void)state;
    expect_error("{\"redis\": {\"mode\": \"cluster\"}}",
                 "config: redis.nodes: must list at least one host:port when mode is cluster");
    struct cfg c;
    load_ok(&c, "{\"redis\": {\"mode\": \"cluster\", \"nodes\": [\"a:7000\", \"[::1]:7001\"]}}");
    assert_int_equal(c.redis.mode, CFG_REDIS_CLUSTER);
    assert_int_equal(c.redis.nodes.n, 2);
    assert_string_equal(c.redis.nodes.v[1], "[::1]:7001");
    /* Parsed once here; the store uses this form. */
    assert_string_equal(c.redis.node_addrs[0].host, "a");
    assert_int_equal(c.redis.node_addrs[0].port, 7000);
    assert_string_equal(c.redis.node_addrs[1].host, "::1");
    assert_int_equal(c.redis.node_addrs[1].port, 7001);
    cfg_free(&c);
}

static void test_redis_nodes_bad(void **state)
{
    (void)state;
    expect_error("{\"redis\": {\"mode\": \"cluster\", \"nodes\": [\"a:7000\", \"b\"]}}",
                 "config: redis.nodes[1]: must be host:port");
    /* A listen address's "*:port" names no server to connect to. */
    expect_error("{\"redis\": {\"mode\": \"cluster\", \"nodes\": [\"*:7000\"]}}",
                 "config: redis.nodes[0]: must be host:port");
    expect_error("{\"redis\": {\"nodes\": \"a:7000\"}}",
                 "config: redis.nodes: must be an array of host:port strings");
    expect_error("{\"redis\": {\"nodes\": [7000]}}",
                 "config: redis.nodes: must be an array of host:port strings");
}

static void test_redis_sentinel(void **state)
{
    (void)state;
    expect_error("{\"redis\": {\"mode\": \"sentinel\"}}",
                 "config: redis.nodes: must list at least one host:port when mode is sentinel");
    expect_error("{\"redis\": {\"mode\": \"sentinel\", \"nodes\": [\"s:26379\"]}}",
                 "config: redis.master_name: is required when mode is sentinel");
    struct cfg c;
    load_ok(&c, "{\"redis\": {\"mode\": \"sentinel\", \"nodes\": [\"s:26379\"], \"master_name\": "
                "\"mymaster\"}}");
    assert_int_equal(c.redis.mode, CFG_REDIS_SENTINEL);
    assert_string_equal(c.redis.master_name, "mymaster");
    cfg_free(&c);
}

static void test_key_prefix(void **state)
{
    (void)state;
    expect_error("{\"redis\": {\"key_prefix\": \"idem:{x}\"}}",
                 "config: redis.key_prefix: must be a string without { or }");
    expect_error("{\"redis\": {\"key_prefix\": 1}}",
                 "config: redis.key_prefix: must be a string without { or }");
    struct cfg c;
    load_ok(&c, "{\"redis\": {\"key_prefix\": \"\"}}");
    assert_string_equal(c.redis.key_prefix, "");
    cfg_free(&c);
}

/* ---------------------------------------------------------------- unknown_outcome */

static void test_unknown_outcome(void **state)
{
    (void)state;
    expect_error("{\"idempotency\": {\"unknown_outcome\": \"forget\"}}",
                 "config: idempotency.unknown_outcome: must be release or keep");
    expect_error("{\"idempotency\": {\"unknown_outcome\": true}}",
                 "config: idempotency.unknown_outcome: must be release or keep");
    expect_error("{\"routes\": [{\"prefix\": \"/a\", \"idempotency\": {\"unknown_outcome\": "
                 "\"Keep\"}}]}",
                 "config: routes[0].idempotency.unknown_outcome: must be release or keep");
    struct cfg c;
    load_ok(&c, "{\"idempotency\": {\"unknown_outcome\": \"keep\"}, \"routes\": [{\"prefix\": "
                "\"/a\"}, {\"prefix\": \"/b\", \"idempotency\": {\"unknown_outcome\": "
                "\"release\"}}]}");
    assert_int_equal(c.idem.unknown_outcome, CFG_UNKNOWN_KEEP);
    assert_int_equal(cfg_route_for(&c, "/a", 2)->idem.unknown_outcome, CFG_UNKNOWN_KEEP);
    assert_int_equal(cfg_route_for(&c, "/b", 2)->idem.unknown_outcome, CFG_UNKNOWN_RELEASE);
    cfg_free(&c);
    load_ok(&c, "{\"routes\": [{\"prefix\": \"/k\", \"idempotency\": {\"unknown_outcome\": "
                "\"keep\"}}]}");
    assert_int_equal(c.idem.unknown_outcome, CFG_UNKNOWN_RELEASE);
    assert_int_equal(c.routes[0].idem.unknown_outcome, CFG_UNKNOWN_KEEP);
    cfg_free(&c);
}

/* ---------------------------------------------------------------- cross-checks */

static void test_cross_timeout_vs_lock(void **state)
{
    (void)state;
    /* 2/3 of 1 s is 666 ms: the default timeout_ms (1000) does not fit */
    expect_error("{\"idempotency\": {\"lock_seconds\": 1}}",
                 "config: redis.timeout_ms: must be below two thirds of "
                 "idempotency.lock_seconds (at most 666 with lock_seconds 1)");
    expect_error("{\"redis\": {\"timeout_ms\": 20000}}",
                 "config: redis.timeout_ms: must be below two thirds of "
                 "idempotency.lock_seconds (at most 19999 with lock_seconds 30)");
    expect_error("{\"redis\": {\"timeout_ms\": 1000}, \"routes\": [{\"prefix\": \"/a\"}, "
                 "{\"prefix\": \"/b\", \"idempotency\": {\"lock_seconds\": 1}}]}",
                 "config: routes[1].idempotency.lock_seconds: must be more than 1.5 times "
                 "redis.timeout_ms (at least 2 with 1000 ms)");
    struct cfg c;
    load_ok(&c, "{\"redis\": {\"timeout_ms\": 19999}}");
    cfg_free(&c);
    load_ok(&c, "{\"redis\": {\"timeout_ms\": 666}, \"idempotency\": {\"lock_seconds\": 1}}");
    cfg_free(&c);
    load_ok(&c, "{\"idempotency\": {\"lock_seconds\": 2}}");
    cfg_free(&c);
    /* routes override key by key: a route may need a longer lock */
    expect_error("{\"redis\": {\"timeout_ms\": 5000}, \"idempotency\": {\"lock_seconds\": 60}, "
                 "\"routes\": [{\"prefix\": \"/a\", \"idempotency\": {\"lock_seconds\": 7}}]}",
                 "config: routes[0].idempotency.lock_seconds: must be more than 1.5 times "
                 "redis.timeout_ms (at least 8 with 5000 ms)");
    /* the memory store has no timeout to fit; a route without the engine
     * uses none of its keys */
    load_ok(&c, "{\"store\": \"memory\", \"idempotency\": {\"lock_seconds\": 1}}");
    cfg_free(&c);
    load_ok(&c, "{\"routes\": [{\"prefix\": \"/off\", \"idempotency\": {\"enabled\": false, "
                "\"lock_seconds\": 1}}]}");
    cfg_free(&c);
    /* env and flags count too */
    struct cfg_flags fl = {.store = "redis"};
    expect_error_with("{\"store\": \"memory\", \"idempotency\": {\"lock_seconds\": 1}}", false, &fl,
                      "config: redis.timeout_ms: must be below two thirds of "
                      "idempotency.lock_seconds (at most 666 with lock_seconds 1)");
}

static void test_cross_required_needs_methods(void **state)
{
    (void)state;
    expect_error("{\"idempotency\": {\"required\": true, \"methods\": []}}",
                 "config: idempotency.required: cannot be true when methods is empty");
    expect_error("{\"routes\": [{\"prefix\": \"/a\", \"idempotency\": {\"required\": true, "
                 "\"methods\": []}}]}",
                 "config: routes[0].idempotency.required: cannot be true when methods is empty");
    /* inherited: the global list is empty, the route asks for a key */
    expect_error("{\"idempotency\": {\"methods\": []}, \"routes\": [{\"prefix\": \"/a\"}, "
                 "{\"prefix\": \"/b\", \"idempotency\": {\"required\": true}}]}",
                 "config: routes[1].idempotency.required: cannot be true when methods is empty");
    struct cfg c;
    load_ok(&c, "{\"idempotency\": {\"methods\": []}}");
    cfg_free(&c);
    load_ok(&c, "{\"routes\": [{\"prefix\": \"/a\", \"idempotency\": {\"enabled\": false, "
                "\"required\": true, \"methods\": []}}]}");
    cfg_free(&c);
}

static void test_cross_hop_by_hop_headers(void **state)
{
    (void)state;
    static const char *const bad[] = {
        "Connection",
        "keep-alive",
        "TE",
        "Trailer",
        "Upgrade",
        "content-length",
        "Proxy-Authorization",
        "proxy-connection",
        "Transfer-Encoding",
    };
    char json[256], want[256];
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        snprintf(json, sizeof json, "{\"idempotency\": {\"header\": \"%s\"}}", bad[i]);
        snprintf(want, sizeof want,
                 "config: idempotency.header: must not be a hop-by-hop or framing header (%s)",
                 bad[i]);
        expect_error(json, want);
        snprintf(json, sizeof json,
                 "{\"idempotency\": {\"scope_headers\": [\"Authorization\", \"%s\"]}}", bad[i]);
        snprintf(want, sizeof want,
                 "config: idempotency.scope_headers[1]: must not name a hop-by-hop or framing "
                 "header (%s)",
                 bad[i]);
        expect_error(json, want);
    }
    expect_error("{\"routes\": [{\"prefix\": \"/a\", \"idempotency\": {\"header\": "
                 "\"Content-Length\"}}]}",
                 "config: routes[0].idempotency.header: must not be a hop-by-hop or framing "
                 "header (Content-Length)");
    expect_error("{\"routes\": [{\"prefix\": \"/a\", \"idempotency\": {\"scope_headers\": "
                 "[\"Connection\"]}}]}",
                 "config: routes[0].idempotency.scope_headers[0]: must not name a hop-by-hop "
                 "or framing header (Connection)");
    struct cfg c;
    /* near misses are fine */
    load_ok(&c, "{\"idempotency\": {\"header\": \"X-Connection-Key\", \"scope_headers\": "
                "[\"Proxy\", \"TEA\", \"Authorization\"]}}");
    cfg_free(&c);
}

static void test_shipped_configs_pass_cross_checks(void **state)
{
    (void)state;
    static const char *const files[] = {"config/idemgate.json", "config/sidecar.json",
                                        "config/gateway.json", "config/container.json"};
    for (size_t i = 0; i < sizeof files / sizeof files[0]; i++) {
        char path[1024];
        source_path(path, sizeof path, files[i]);
        struct cfg_flags fl = {.config_file = path};
        struct cfg c;
        if (cfg_load(&c, &fl, err, sizeof err) != 0) fail_msg("%s: %s", files[i], err);
        cfg_free(&c);
    }
}

/* ---------------------------------------------------------------- TLS */

static void test_tls_pair(void **state)
{
    (void)state;
    expect_error("{\"tls\": {\"cert_file\": \"/c.pem\"}}",
                 "config: tls.key_file: is required when tls.cert_file is set");
    expect_error("{\"tls\": {\"key_file\": \"/k.pem\", \"cert_file\": \"\"}}",
                 "config: tls.cert_file: is required when tls.key_file is set");
    /* both files are loaded (exit 2 at -t); the good pair and a mismatch
     * are in tests/unit/net/test_tls.c and tests/integration/test_tls.py */
    expect_error("{\"tls\": {\"cert_file\": \"/nonexistent/c.pem\", \"key_file\": \"/k.pem\"}}",
                 "config: tls.cert_file: cannot load /nonexistent/c.pem: No such file or "
                 "directory");
    char cert[64], json[512];
    write_file(cert, sizeof cert, CA_PEM);
    snprintf(json, sizeof json,
             "{\"tls\": {\"cert_file\": \"%s\", \"key_file\": \"/nonexistent/k.pem\"}}", cert);
    expect_error(json, "config: tls.key_file: cannot load /nonexistent/k.pem: No such file or "
                       "directory");
    unlink(cert);
}

static void test_upstream_tls(void **state)
{
    (void)state;
    struct cfg c;
    load_ok(&c, "{\"upstream_tls\": {\"ca_file\": \"/ca.pem\", \"verify\": false, "
                "\"server_name\": \"api.internal\"}}");
    assert_string_equal(c.upstream_tls.ca_file, "/ca.pem");
    assert_false(c.upstream_tls.verify);
    assert_string_equal(c.upstream_tls.server_name, "api.internal");
    cfg_free(&c);
}

/* ---------------------------------------------------------------- routes */

static void test_routes_shape_errors(void **state)
{
    (void)state;
    expect_error("{\"routes\": {}}", "config: routes: must be an array of objects");
    expect_error("{\"routes\": [\"/a\"]}", "config: routes[0]: must be an object");
    expect_error("{\"routes\": [{\"upstream\": \"http://a\"}]}",
                 "config: routes[0].prefix: is required");
    expect_error("{\"routes\": [{\"prefix\": \"v1\"}]}",
                 "config: routes[0].prefix: must be a path starting with /");
    expect_error("{\"routes\": [{\"prefix\": 1}]}",
                 "config: routes[0].prefix: must be a path starting with /");
    expect_error("{\"routes\": [{\"prefix\": \"/a?b\"}]}",
                 "config: routes[0].prefix: must be a path starting with /");
    expect_error("{\"routes\": [{\"prefix\": \"/a\", \"prefix\": \"/b\"}]}",
                 "config: routes[0].prefix: duplicate key");
}

static void test_routes_duplicate_prefix(void **state)
{
    (void)state;
    expect_error("{\"routes\": [{\"prefix\": \"/a\"}, {\"prefix\": \"/b\"}, {\"prefix\": \"/a\"}]}",
                 "config: routes[2].prefix: duplicates routes[0].prefix");
}

static void test_routes_bad_upstream(void **state)
{
    (void)state;
    expect_error("{\"routes\": [{\"prefix\": \"/a\"}, {\"prefix\": \"/b\", \"upstream\": "
                 "\"http://h/x\"}]}",
                 "config: routes[1].upstream: must be an http:// or https:// URL without a path "
                 "(got /x): the client's path is forwarded as it is");
}

static void test_routes_bad_idempotency(void **state)
{
    (void)state;
    expect_error("{\"routes\": [{\"prefix\": \"/a\", \"idempotency\": {\"lock_seconds\": 0}}]}",
                 "config: routes[0].idempotency.lock_seconds: must be an integer >= 1");
    expect_error("{\"routes\": [{\"prefix\": \"/a\", \"idempotency\": {\"enabled\": 0}}]}",
                 "config: routes[0].idempotency.enabled: must be true or false");
    expect_error("{\"routes\": [{\"prefix\": \"/a\", \"idempotency\": true}]}",
                 "config: routes[0].idempotency: must be an object");
    expect_error("{\"routes\": [{\"prefix\": \"/a\", \"idempotency\": {\"methods\": "
                 "[\"get\"]}}]}",
                 "config: routes[0].idempotency.methods: must be upper-case HTTP method tokens");
}

static void test_routes_sorted(void **state)
{
    (void)state;
    struct cfg c;
    load_ok(&c, "{\"routes\": [{\"prefix\": \"/a\"}, {\"prefix\": \"/v1/images\"}, "
                "{\"prefix\": \"/b\"}, {\"prefix\": \"/v1\"}, {\"prefix\": \"/c\"}]}");
    assert_int_equal(c.n_routes, 5);
    assert_string_equal(c.routes[0].prefix, "/v1/images");
    assert_string_equal(c.routes[1].prefix, "/v1");
    assert_string_equal(c.routes[2].prefix, "/a");
    assert_string_equal(c.routes[3].prefix, "/b");
    assert_string_equal(c.routes[4].prefix, "/c");
    cfg_free(&c);
    load_ok(&c, "{\"routes\": []}");
    assert_int_equal(c.n_routes, 0);
    cfg_free(&c);
}

static void test_route_upstream_default(void **state)
{
    (void)state;
    struct cfg c;
    load_ok(&c, "{\"routes\": [{\"prefix\": \"/x\"}], \"upstream\": \"https://h:1\"}");
    assert_true(c.routes[0].upstream.servers[0].url.tls);
    assert_string_equal(c.routes[0].upstream.servers[0].url.host, "h");
    assert_int_equal(c.routes[0].upstream.servers[0].url.port, 1);
    assert_string_equal(c.routes[0].upstream.servers[0].url.text, "https://h:1");
    assert_ptr_not_equal(c.routes[0].upstream.servers[0].url.host, c.upstream.servers[0].url.host);
    cfg_free(&c);
    load_ok(&c, "{\"routes\": [{\"prefix\": \"/x\", \"upstream\": \"http://[::1]:81\"}]}");
    assert_string_equal(c.routes[0].upstream.servers[0].url.host, "::1");
    assert_int_equal(c.routes[0].upstream.servers[0].url.port, 81);
    assert_int_equal(c.upstream.servers[0].url.port, 9000);
    cfg_free(&c);
}

static void test_route_idem_override(void **state)
{
    (void)state;
    struct cfg c;
    /* routes come before idempotency in the file: inheritance must not
     * depend on key order */
    load_ok(&c, "{\"routes\": [{\"prefix\": \"/p\", \"idempotency\": {\"ttl_seconds\": 60, "
                "\"methods\": [\"PUT\"]}}], \"idempotency\": {\"ttl_seconds\": 100, "
                "\"lock_seconds\": 7, \"header\": \"X-Key\"}}");
    const struct cfg_idem *m = &c.routes[0].idem;
    assert_true(m->enabled);
    assert_int_equal(m->ttl_seconds, 60);
    assert_int_equal(m->lock_seconds, 7);
    assert_string_equal(m->header, "X-Key");
    assert_int_equal(m->methods.n, 1);
    assert_string_equal(m->methods.v[0], "PUT");
    assert_int_equal(c.idem.ttl_seconds, 100);
    assert_int_equal(c.idem.methods.n, 2);
    assert_int_equal(m->scope_headers.n, 2);
    assert_int_equal(m->max_cached_response_bytes, 1048576);
    cfg_free(&c);
}

static void test_route_disabled(void **state)
{
    (void)state;
    struct cfg c;
    load_ok(&c, "{\"routes\": [{\"prefix\": \"/off\", \"idempotency\": {\"enabled\": false}}, "
                "{\"prefix\": \"/on\", \"idempotency\": {\"enabled\": true}}]}");
    const struct cfg_route *r = cfg_route_for(&c, "/off/x", 6);
    assert_non_null(r);
    assert_false(r->idem.enabled);
    assert_int_equal(r->idem.ttl_seconds, 86400);
    r = cfg_route_for(&c, "/on", 3);
    assert_non_null(r);
    assert_true(r->idem.enabled);
    assert_true(c.idem.enabled);
    cfg_free(&c);
}

static void test_route_for(void **state)
{
    (void)state;
    struct cfg c;
    load_ok(&c, "{\"routes\": [{\"prefix\": \"/v1\"}, {\"prefix\": \"/v1/images\"}, "
                "{\"prefix\": \"/\"}]}");
    const char *p = "/v1/images/42";
    assert_string_equal(cfg_route_for(&c, p, strlen(p))->prefix, "/v1/images");
    p = "/v1/imagesX";
    assert_string_equal(cfg_route_for(&c, p, strlen(p))->prefix, "/v1/images");
    p = "/v1/orders";
    assert_string_equal(cfg_route_for(&c, p, strlen(p))->prefix, "/v1");
    p = "/v1?x=/v1/images";
    assert_string_equal(cfg_route_for(&c, p, strlen(p))->prefix, "/v1");
    p = "/v1/im?ages";
    assert_string_equal(cfg_route_for(&c, p, strlen(p))->prefix, "/v1");
    p = "/other";
    assert_string_equal(cfg_route_for(&c, p, strlen(p))->prefix, "/");
    /* only len bytes count */
    p = "/v1/images";
    assert_string_equal(cfg_route_for(&c, p, 5)->prefix, "/v1");
    cfg_free(&c);
    load_ok(&c, "{\"routes\": [{\"prefix\": \"/api\"}]}");
    assert_null(cfg_route_for(&c, "/ap", 3));
    assert_null(cfg_route_for(&c, "/apix", 3)); /* bytes past len never count */
    assert_non_null(cfg_route_for(&c, "/apix", 4));
    assert_null(cfg_route_for(&c, "/x", 2));
    assert_null(cfg_route_for(&c, "", 0));
    cfg_free(&c);
    load_ok(&c, "{}");
    assert_null(cfg_route_for(&c, "/api", 4));
    cfg_free(&c);
}

static void test_covers_method(void **state)
{
    (void)state;
    struct cfg c;
    load_ok(&c, "{}");
    assert_true(cfg_idem_covers_method(&c.idem, "POST", 4));
    assert_true(cfg_idem_covers_method(&c.idem, "PATCH", 5));
    assert_false(cfg_idem_covers_method(&c.idem, "post", 4));
    assert_false(cfg_idem_covers_method(&c.idem, "GET", 3));
    assert_false(cfg_idem_covers_method(&c.idem, "POSTX", 5));
    assert_true(cfg_idem_covers_method(&c.idem, "POSTX", 4)); /* only len bytes count */
    assert_false(cfg_idem_covers_method(&c.idem, "POS", 3));
    assert_false(cfg_idem_covers_method(&c.idem, "", 0));
    cfg_free(&c);
}

/* ---------------------------------------------------------------- env */

static void test_env_overrides_file(void **state)
{
    (void)state;
    setenv("IDEMGATE_LISTEN", "127.0.0.1:7000", 1);
    setenv("IDEMGATE_WORKERS", "3", 1);
    setenv("IDEMGATE_STORE", "memory", 1);
    setenv("IDEMGATE_LOG_LEVEL", "debug", 1);
    const char *json = "{\"listen\": \"0.0.0.0:1\", \"workers\": 9, \"store\": \"redis\"}";
    struct cfg c;
    assert_int_equal(cfg_load_json(&c, json, strlen(json), true, NULL, err, sizeof err), 0);
    assert_string_equal(c.listen.host, "127.0.0.1");
    assert_int_equal(c.listen.port, 7000);
    assert_int_equal(c.workers, 3);
    assert_int_equal(c.store, CFG_STORE_MEMORY);
    assert_int_equal(c.log_level, CFG_LOG_DEBUG);
    cfg_free(&c);
    /* use_env false ignores them */
    assert_int_equal(cfg_load_json(&c, json, strlen(json), false, NULL, err, sizeof err), 0);
    assert_int_equal(c.workers, 9);
    assert_int_equal(c.listen.port, 1);
    cfg_free(&c);
    clear_env(NULL);
}

static void test_env_errors(void **state)
{
    (void)state;
    static const struct {
        const char *name, *value, *want;
    } cases[] = {
        {"IDEMGATE_WORKERS", "-1", "env IDEMGATE_WORKERS: must be an integer >= 0"},
        {"IDEMGATE_WORKERS", "two", "env IDEMGATE_WORKERS: must be an integer >= 0"},
        {"IDEMGATE_WORKERS", "2000", "env IDEMGATE_WORKERS: must be an integer <= 1024"},
        {"IDEMGATE_LISTEN", "8080", "env IDEMGATE_LISTEN: must be host:port"},
        {"IDEMGATE_UPSTREAM", "tcp://x",
         "env IDEMGATE_UPSTREAM: must be an http:// or https:// URL with a host"},
        {"IDEMGATE_STORE", "disk", "env IDEMGATE_STORE: must be redis, memory or lmdb"},
        {"IDEMGATE_REDIS_URL", "redis://h/x99",
         "env IDEMGATE_REDIS_URL: must be redis[s]://[[user]:password@]host[:port][/db] or "
         "unix:///path"},
        {"IDEMGATE_ADMIN_LISTEN", "on", "env IDEMGATE_ADMIN_LISTEN: must be host:port or off"},
        {"IDEMGATE_LOG_LEVEL", "INFO",
         "env IDEMGATE_LOG_LEVEL: must be debug, info, warn or error"},
        {"IDEMPOTENCY_TTL_SECONDS", "0", "env IDEMPOTENCY_TTL_SECONDS: must be an integer >= 1"},
        {"IDEMPOTENCY_TTL_SECONDS", "1.5", "env IDEMPOTENCY_TTL_SECONDS: must be an integer >= 1"},
        {"IDEMPOTENCY_TTL_SECONDS", "99999999999999999999999",
         "env IDEMPOTENCY_TTL_SECONDS: must be an integer <= 31536000"},
        {"IDEMPOTENCY_TTL_SECONDS", " 60", "env IDEMPOTENCY_TTL_SECONDS: must be an integer >= 1"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        setenv(cases[i].name, cases[i].value, 1);
        expect_error_with("{}", true, NULL, cases[i].want);
        unsetenv(cases[i].name);
    }
}

static void test_env_ttl_and_secret_inherited(void **state)
{
    (void)state;
    setenv("IDEMPOTENCY_TTL_SECONDS", "3600", 1);
    setenv("IDEMGATE_SCOPE_SECRET", "k3y", 1);
    const char *json = "{\"idempotency\": {\"ttl_seconds\": 10}, \"routes\": ["
                       "{\"prefix\": \"/a\"}, {\"prefix\": \"/bb\", \"idempotency\": "
                       "{\"ttl_seconds\": 20, \"scope_secret\": \"other\"}}]}";
    struct cfg c;
    assert_int_equal(cfg_load_json(&c, json, strlen(json), true, NULL, err, sizeof err), 0);
    assert_int_equal(c.idem.ttl_seconds, 3600);
    assert_string_equal(c.idem.scope_secret, "k3y");
    const struct cfg_route *a = cfg_route_for(&c, "/a", 2);
    const struct cfg_route *b = cfg_route_for(&c, "/bb", 3);
    assert_int_equal(a->idem.ttl_seconds, 3600);
    assert_string_equal(a->idem.scope_secret, "k3y");
    assert_int_equal(b->idem.ttl_seconds, 20);
    assert_string_equal(b->idem.scope_secret, "other");
    cfg_free(&c);
    clear_env(NULL);
}

static void test_env_upstream_is_route_default(void **state)
{
    (void)state;
    setenv("IDEMGATE_UPSTREAM", "http://envhost:8000", 1);
    const char *json = "{\"upstream\": \"http://filehost:1\", \"routes\": [{\"prefix\": \"/a\"}]}";
    struct cfg c;
    assert_int_equal(cfg_load_json(&c, json, strlen(json), true, NULL, err, sizeof err), 0);
    assert_string_equal(c.upstream.servers[0].url.host, "envhost");
    assert_string_equal(c.routes[0].upstream.servers[0].url.host, "envhost");
    assert_int_equal(c.routes[0].upstream.servers[0].url.port, 8000);
    cfg_free(&c);
    clear_env(NULL);
}

static void test_env_admin_off_and_redis(void **state)
{
    (void)state;
    setenv("IDEMGATE_ADMIN_LISTEN", "off", 1);
    setenv("IDEMGATE_REDIS_URL", "unix:///tmp/r.sock", 1);
    struct cfg c;
    assert_int_equal(cfg_load_json(&c, "{}", 2, true, NULL, err, sizeof err), 0);
    assert_false(c.admin_enabled);
    assert_true(c.redis.unix_socket);
    assert_string_equal(c.redis.host, "/tmp/r.sock");
    assert_string_equal(c.redis.url, "unix:///tmp/r.sock");
    cfg_free(&c);
    clear_env(NULL);
}

static void test_env_empty_is_unset(void **state)
{
    (void)state;
    setenv("IDEMGATE_WORKERS", "", 1);
    setenv("IDEMGATE_LISTEN", "", 1);
    struct cfg c;
    const char *json = "{\"workers\": 5}";
    assert_int_equal(cfg_load_json(&c, json, strlen(json), true, NULL, err, sizeof err), 0);
    assert_int_equal(c.workers, 5);
    assert_string_equal(c.listen.text, "0.0.0.0:8080");
    cfg_free(&c);
    clear_env(NULL);
}

static void test_env_applies_without_file(void **state)
{
    (void)state;
    setenv("IDEMGATE_WORKERS", "2", 1);
    struct cfg c;
    assert_int_equal(cfg_load(&c, NULL, err, sizeof err), 0);
    assert_int_equal(c.workers, 2);
    cfg_free(&c);
    clear_env(NULL);
}

/* ---------------------------------------------------------------- flags */

static void test_flags_override_env_and_file(void **state)
{
    (void)state;
    setenv("IDEMGATE_LISTEN", "127.0.0.1:7000", 1);
    setenv("IDEMGATE_WORKERS", "3", 1);
    setenv("IDEMGATE_ADMIN_LISTEN", "off", 1);
    struct cfg_flags fl = {.listen = "[::1]:6000",
                           .workers = "4",
                           .upstream = "https://u:4443",
                           .store = "memory",
                           .redis = "redis://r:1/2",
                           .admin = "127.0.0.1:5000"};
    const char *json = "{\"listen\": \"0.0.0.0:1\", \"workers\": 9, \"routes\": [{\"prefix\": "
                       "\"/a\"}]}";
    struct cfg c;
    assert_int_equal(cfg_load_json(&c, json, strlen(json), true, &fl, err, sizeof err), 0);
    assert_string_equal(c.listen.host, "::1");
    assert_int_equal(c.listen.port, 6000);
    assert_int_equal(c.workers, 4);
    assert_true(c.upstream.servers[0].url.tls);
    assert_int_equal(c.upstream.servers[0].url.port, 4443);
    assert_string_equal(c.routes[0].upstream.servers[0].url.host, "u");
    assert_int_equal(c.store, CFG_STORE_MEMORY);
    assert_string_equal(c.redis.host, "r");
    assert_int_equal(c.redis.port, 1);
    assert_int_equal(c.redis.db, 2);
    assert_true(c.admin_enabled);
    assert_int_equal(c.admin_listen.port, 5000);
    cfg_free(&c);
    clear_env(NULL);
}

static void test_flags_errors(void **state)
{
    (void)state;
    struct cfg_flags fl = {.workers = "abc"};
    expect_error_with("{}", false, &fl, "flag --workers: must be an integer >= 0");
    fl = (struct cfg_flags){.workers = "-2"};
    expect_error_with("{}", false, &fl, "flag --workers: must be an integer >= 0");
    fl = (struct cfg_flags){.listen = "nope"};
    expect_error_with("{}", false, &fl, "flag --listen: must be host:port");
    fl = (struct cfg_flags){.upstream = "http://h/p"};
    expect_error_with("{}", false, &fl,
                      "flag --upstream: must be an http:// or https:// URL without a path (got "
                      "/p): the client's path is forwarded as it is");
    fl = (struct cfg_flags){.upstream = "ftp://h"};
    expect_error_with("{}", false, &fl,
                      "flag --upstream: must be an http:// or https:// URL with a host");
    fl = (struct cfg_flags){.store = "Redis"};
    expect_error_with("{}", false, &fl, "flag --store: must be redis, memory or lmdb");
    fl = (struct cfg_flags){.redis = "127.0.0.1:6379"};
    expect_error_with("{}", false, &fl,
                      "flag --redis: must be redis[s]://[[user]:password@]host[:port][/db] or "
                      "unix:///path");
    fl = (struct cfg_flags){.admin = ""};
    expect_error_with("{}", false, &fl, "flag --admin: must be host:port or off");
}

static void test_flag_admin_off(void **state)
{
    (void)state;
    struct cfg_flags fl = {.admin = "off"};
    struct cfg c;
    assert_int_equal(cfg_load(&c, &fl, err, sizeof err), 0);
    assert_false(c.admin_enabled);
    cfg_free(&c);
}

static void test_flags_with_file(void **state)
{
    (void)state;
    char path[64];
    write_file(path, sizeof path, "{\"workers\": 6, \"listen\": \"127.0.0.1:1\"}");
    struct cfg_flags fl = {.config_file = path, .workers = "8"};
    struct cfg c;
    assert_int_equal(cfg_load(&c, &fl, err, sizeof err), 0);
    assert_int_equal(c.workers, 8);
    assert_int_equal(c.listen.port, 1);
    cfg_free(&c);
    unlink(path);
}

/* ---------------------------------------------------------------- misc */

static void test_free_tolerant(void **state)
{
    (void)state;
    struct cfg c;
    memset(&c, 0, sizeof c);
    cfg_free(NULL);
    cfg_free(&c);
    cfg_free(&c);
    assert_true(zeroed(&c));
}

static void test_error_on_later_route_frees_all(void **state)
{
    (void)state;
    /* built routes, lists and strings all exist when the third route fails
     * (the ASan build checks that nothing leaks) */
    expect_error("{\"idempotency\": {\"methods\": [\"POST\"]}, \"redis\": {\"nodes\": "
                 "[\"a:1\"]}, \"routes\": [{\"prefix\": \"/a\", \"upstream\": \"http://x\"}, "
                 "{\"prefix\": \"/b\", \"idempotency\": {\"scope_headers\": [\"A\"]}}, "
                 "{\"prefix\": \"/c\", \"idempotency\": {\"header\": \"\"}}]}",
                 "config: routes[2].idempotency.header: must be a valid HTTP header name");
}

static void test_small_error_buffer(void **state)
{
    (void)state;
    char small[12];
    memset(small, 'x', sizeof small);
    struct cfg c;
    const char *json = "{\"idempotency\": {\"lock_seconds\": 0}}";
    assert_int_equal(cfg_load_json(&c, json, strlen(json), false, NULL, small, sizeof small), -1);
    assert_int_equal(strlen(small), sizeof small - 1);
    assert_memory_equal(small, "config: ide", sizeof small);
    assert_int_equal(cfg_load_json(&c, json, strlen(json), false, NULL, NULL, 0), -1);
}

static void test_set_twice_no_leak(void **state)
{
    (void)state;
    /* file value, then env, then flag replace the same string each time */
    setenv("IDEMGATE_UPSTREAM", "http://e:2", 1);
    setenv("IDEMGATE_REDIS_URL", "redis://:pw@e:2/1", 1);
    struct cfg_flags fl = {.upstream = "http://f:3", .redis = "redis://:pw2@f:3/2"};
    const char *json = "{\"upstream\": \"http://j:1\", \"redis\": {\"url\": \"redis://:p@j/0\"}}";
    struct cfg c;
    assert_int_equal(cfg_load_json(&c, json, strlen(json), true, &fl, err, sizeof err), 0);
    assert_string_equal(c.upstream.servers[0].url.host, "f");
    assert_string_equal(c.redis.password, "pw2");
    assert_int_equal(c.redis.db, 2);
    cfg_free(&c);
    clear_env(NULL);
}

static void test_numbers_as_exponents(void **state)
{
    (void)state;
    struct cfg c;
    load_ok(&c, "{\"idempotency\": {\"ttl_seconds\": 3.6e3}, \"workers\": -0}");
    assert_int_equal(c.idem.ttl_seconds, 3600);
    cfg_free(&c);
}

/* ---------------------------------------------------------------- -T */

/* load -> dump -> load gives an equal struct; the dump of the dump is the
 * same text. */
static void round_trip(const char *json)
{
    struct cfg a, b;
    load_ok(&a, json);
    char *text = cfg_dump_json(&a, false);
    if (load(&b, text) != 0) fail_msg("dump does not load: %s\n%s", err, text);
    assert_cfg_eq(&a, &b);
    char *again = cfg_dump_json(&b, false);
    assert_string_equal(text, again);
    assert_int_equal(text[strlen(text) - 1], '\n');
    free(again);
    free(text);
    cfg_free(&a);
    cfg_free(&b);
}

static void test_dump_round_trip(void **state)
{
    (void)state;
    round_trip("{}");
    round_trip("{\"store\": \"memory\", \"workers\": 3, \"admin\": {\"listen\": \"off\"}, "
               "\"error_format\": \"problem\", \"memory\": {\"max_bytes\": 68719476736}, "
               "\"limits\": {\"max_request_body_bytes\": 4294967296}, "
               "\"log\": {\"level\": \"warn\", \"access\": false}}");
    round_trip("{\"redis\": {\"mode\": \"sentinel\", \"nodes\": [\"[::1]:26379\", \"s2:26379\"], "
               "\"master_name\": \"m\", \"url\": \"rediss://u:p%40ss@h:6380/3\", "
               "\"tls\": {\"verify\": false, \"server_name\": \"r.internal\"}}, "
               "\"upstream_tls\": {\"ca_file\": \"/ca.pem\"}}");
    round_trip("{\"redis\": {\"url\": \"unix:///run/redis.sock\"}}");
    round_trip("{\"upstream\": \"https://api:8443\", \"idempotency\": {\"scope_secret\": \"s\", "
               "\"methods\": [], \"mismatch_status\": 422}, \"routes\": ["
               "{\"prefix\": \"/a\", \"upstream\": \"http://10.0.0.1:81\"}, "
               "{\"prefix\": \"/a/longer\", \"idempotency\": {\"enabled\": false, "
               "\"ttl_seconds\": 5, \"scope_secret\": \"t\", \"required\": true, "
               "\"methods\": [\"PUT\"]}}]}");
}

static void test_dump_redacts(void **state)
{
    (void)state;
    struct cfg c;
    load_ok(&c, "{\"redis\": {\"url\": \"redis://app:hunter2@h:1/0\"}, \"idempotency\": "
                "{\"scope_secret\": \"hmac-k\"}, \"routes\": [{\"prefix\": \"/r\", "
                "\"idempotency\": {\"scope_secret\": \"route-k\"}}]}");
    char *text = cfg_dump_json(&c, true);
    assert_null(strstr(text, "hunter2"));
    assert_null(strstr(text, "hmac-k"));
    assert_null(strstr(text, "route-k"));
    assert_non_null(strstr(text, "\"redis://app:<redacted>@h:1/0\""));
    assert_non_null(strstr(text, "\"scope_secret\": \"<redacted>\""));
    /* refused until the secrets are put back, naming the first */
    struct cfg d;
    assert_int_equal(load(&d, text), -1);
    assert_string_equal(err, "config: redis.url: holds the redacted value of -T; put the secret "
                             "back");
    free(text);
    cfg_free(&c);
    /* a password of the default user; nothing to redact: unchanged */
    load_ok(&c, "{\"redis\": {\"url\": \"redis://:pw@h\"}}");
    text = cfg_dump_json(&c, true);
    assert_non_null(strstr(text, "\"redis://:<redacted>@h\""));
    free(text);
    cfg_free(&c);
    load_ok(&c, "{\"redis\": {\"url\": \"redis://h\"}}");
    text = cfg_dump_json(&c, true);
    assert_null(strstr(text, "<redacted>"));
    free(text);
    cfg_free(&c);
    expect_error("{\"idempotency\": {\"scope_secret\": \"<redacted>\"}}",
                 "config: idempotency.scope_secret: holds the redacted value of -T; put the "
                 "secret back");
    expect_error("{\"routes\": [{\"prefix\": \"/x\", \"idempotency\": {\"scope_secret\": "
                 "\"<redacted>\"}}]}",
                 "config: routes[/x].idempotency.scope_secret: holds the redacted value of -T; "
                 "put the secret back");
}

/* What a reload compares: the options marked RESTART, and whether the
 * Redis settings changed (new store connections). */
static void test_reload_comparisons(void **state)
{
    (void)state;
    struct cfg a, b;
    char keys[256];
    load_ok(&a, "{\"listen\": \"127.0.0.1:8080\", \"redis\": {\"url\": \"redis://h:1\"}}");
    load_ok(&b, "{\"listen\": \"127.0.0.1:8080\", \"redis\": {\"url\": \"redis://h:1\"}, "
                "\"idempotency\": {\"ttl_seconds\": 5}, \"log\": {\"level\": \"warn\"}}");
    assert_int_equal(cfg_restart_changes(&a, &b, keys, sizeof keys), 0);
    assert_string_equal(keys, "");
    assert_true(cfg_section_equal(&a, &b, "redis"));
    assert_false(cfg_section_equal(&a, &b, "idempotency"));
    cfg_free(&b);
    load_ok(&b, "{\"listen\": \"127.0.0.1:8081\", \"workers\": 3, \"store\": \"memory\", "
                "\"admin\": {\"listen\": \"off\"}, \"redis\": {\"url\": \"redis://h:1\", "
                "\"tls\": {\"verify\": false}}}");
    assert_int_equal(cfg_restart_changes(&a, &b, keys, sizeof keys), 4);
    assert_string_equal(keys, "listen, workers, store, admin.listen");
    /* redis.tls is part of the redis settings */
    assert_false(cfg_section_equal(&a, &b, "redis"));
    /* a short buffer: the count stays right, the text is cut cleanly */
    assert_int_equal(cfg_restart_changes(&a, &b, keys, 10), 4);
    assert_true(strlen(keys) < 10);
    cfg_free(&a);
    cfg_free(&b);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_defaults_match_spec),
        cmocka_unit_test(test_default_file_equals_builtin),
        cmocka_unit_test(test_no_file_is_defaults),
        cmocka_unit_test(test_example_sidecar),
        cmocka_unit_test(test_example_gateway),
        cmocka_unit_test(test_invalid_json_line),
        cmocka_unit_test(test_trailing_garbage),
        cmocka_unit_test(test_embedded_nul),
        cmocka_unit_test(test_top_level_not_object),
        cmocka_unit_test(test_file_errors),
        cmocka_unit_test(test_file_invalid_json_names_file),
        cmocka_unit_test(test_file_key_error),
        cmocka_unit_test(test_unknown_keys),
        cmocka_unit_test(test_enabled_not_global),
        cmocka_unit_test(test_unknown_route_keys),
        cmocka_unit_test(test_duplicate_key),
        cmocka_unit_test(test_section_not_object),
        cmocka_unit_test(test_control_chars_in_key),
        cmocka_unit_test(test_int_fraction),
        cmocka_unit_test(test_int_wrong_type),
        cmocka_unit_test(test_int_below_min),
        cmocka_unit_test(test_int_above_max),
        cmocka_unit_test(test_workers),
        cmocka_unit_test(test_ttl_range),
        cmocka_unit_test(test_key_max_length_range),
        cmocka_unit_test(test_wait_max_ms_range),
        cmocka_unit_test(test_redis_int_ranges),
        cmocka_unit_test(test_u64_ranges),
        cmocka_unit_test(test_memory_max_bytes),
        cmocka_unit_test(test_memory_max_scope_bytes),
        cmocka_unit_test(test_max_header_bytes_range),
        cmocka_unit_test(test_limits_ranges),
        cmocka_unit_test(test_mismatch_status),
        cmocka_unit_test(test_bool_type),
        cmocka_unit_test(test_string_type),
        cmocka_unit_test(test_enums),
        cmocka_unit_test(test_unknown_outcome),
        cmocka_unit_test(test_cross_timeout_vs_lock),
        cmocka_unit_test(test_cross_required_needs_methods),
        cmocka_unit_test(test_cross_hop_by_hop_headers),
        cmocka_unit_test(test_shipped_configs_pass_cross_checks),
        cmocka_unit_test(test_enum_values),
        cmocka_unit_test(test_header_token),
        cmocka_unit_test(test_methods),
        cmocka_unit_test(test_header_lists),
        cmocka_unit_test(test_listen_ipv6),
        cmocka_unit_test(test_listen_forms),
        cmocka_unit_test(test_listen_bad),
        cmocka_unit_test(test_admin_listen),
        cmocka_unit_test(test_upstream_good),
        cmocka_unit_test(test_upstream_bad),
        cmocka_unit_test(test_upstream_group),
        cmocka_unit_test(test_upstream_group_bad),
        cmocka_unit_test(test_redis_url_tcp),
        cmocka_unit_test(test_redis_url_tls),
        cmocka_unit_test(test_redis_tls_section),
        cmocka_unit_test(test_redis_tls_ca_file),
        cmocka_unit_test(test_redis_url_unix),
        cmocka_unit_test(test_redis_url_bad),
        cmocka_unit_test(test_redis_cluster),
        cmocka_unit_test(test_redis_nodes_bad),
        cmocka_unit_test(test_redis_sentinel),
        cmocka_unit_test(test_key_prefix),
        cmocka_unit_test(test_tls_pair),
        cmocka_unit_test(test_dump_round_trip),
        cmocka_unit_test(test_dump_redacts),
        cmocka_unit_test(test_upstream_tls),
        cmocka_unit_test(test_routes_shape_errors),
        cmocka_unit_test(test_routes_duplicate_prefix),
        cmocka_unit_test(test_routes_bad_upstream),
        cmocka_unit_test(test_routes_bad_idempotency),
        cmocka_unit_test(test_routes_sorted),
        cmocka_unit_test(test_route_upstream_default),
        cmocka_unit_test(test_route_idem_override),
        cmocka_unit_test(test_route_disabled),
        cmocka_unit_test(test_route_for),
        cmocka_unit_test(test_covers_method),
        cmocka_unit_test(test_env_overrides_file),
        cmocka_unit_test(test_env_errors),
        cmocka_unit_test(test_env_ttl_and_secret_inherited),
        cmocka_unit_test(test_env_upstream_is_route_default),
        cmocka_unit_test(test_env_admin_off_and_redis),
        cmocka_unit_test(test_env_empty_is_unset),
        cmocka_unit_test(test_env_applies_without_file),
        cmocka_unit_test(test_flags_override_env_and_file),
        cmocka_unit_test(test_flags_errors),
        cmocka_unit_test(test_flag_admin_off),
        cmocka_unit_test(test_flags_with_file),
        cmocka_unit_test(test_free_tolerant),
        cmocka_unit_test(test_error_on_later_route_frees_all),
        cmocka_unit_test(test_small_error_buffer),
        cmocka_unit_test(test_set_twice_no_leak),
        cmocka_unit_test(test_numbers_as_exponents),
        cmocka_unit_test(test_reload_comparisons),
    };
    clear_env(NULL);
    return cmocka_run_group_tests(tests, clear_env, NULL);
}
