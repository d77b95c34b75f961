/* checks.c — the rules that tie several keys together (docs/configuration.md),
 * checked after every source has been applied.
 *
 * Owns: one idempotency policy's rules (the global one and each route's:
 * a lock that outlives a Redis round trip, required with no methods, key
 * and scope headers that a proxy consumes), and the rules across sections
 * (Redis modes and their nodes, TLS certificate and key, a rediss://
 * store's CA bundle, loaded here through net/tls.h so that -t refuses what
 * tls_set_new would). Does not own: the check of each value on its own
 * (values.c). Reads a struct cfg, changes nothing. */
#include "internal.h"

#include "idemgate/net/tls.h"

#include <stdio.h>
#include <strings.h>

/* Hop-by-hop and framing headers: a proxy consumes or rewrites them, so a
 * key or a scope read from one is not what the client meant to send. */
static bool is_hop_or_framing(const char *name)
{
    static const char *const names[] = {"Connection",        "Keep-Alive", "TE",
                                        "Trailer",           "Upgrade",    "Content-Length",
                                        "Transfer-Encoding", NULL};
    if (cfg_prefix_ci(name, "Proxy-")) return true;
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
        return cfg_fail(e, "config: redis.timeout_ms",
                        "must be below two thirds of %s.lock_seconds (at most %lld with "
                        "lock_seconds %d)",
                        path, (lock_ms * 2 - 1) / 3, m->lock_seconds);
    }
    cfg_where_key(where, path, "lock_seconds");
    return cfg_fail(e, where,
                    "must be more than 1.5 times redis.timeout_ms (at least %lld with %lld ms)",
                    timeout * 3 / 2000 + 1, timeout);
}

/* The rules of docs/configuration.md that tie one idempotency policy's keys
 * together; path is "idempotency" or "routes[i].idempotency". A route with
 * the engine off is not checked: none of its keys is used. */
int cfg_check_idem_policy(const struct cfg *c, const struct cfg_idem *m, const char *path,
                          bool is_route, struct cfg_err *e)
{
    char where[CFG_WHERE_LEN];
    if (!m->enabled) return 0;
    if (check_lock_vs_timeout(c, m, path, is_route, e) < 0) return -1;
    if (m->required && m->methods.n == 0) {
        cfg_where_key(where, path, "required");
        return cfg_fail(e, where, "cannot be true when methods is empty");
    }
    if (is_hop_or_framing(m->header)) {
        cfg_where_key(where, path, "header");
        return cfg_fail(e, where, "must not be a hop-by-hop or framing header (%s)", m->header);
    }
    for (size_t i = 0; i < m->scope_headers.n; i++) {
        if (!is_hop_or_framing(m->scope_headers.v[i])) continue;
        char key[48];
        snprintf(key, sizeof key, "scope_headers[%zu]", i);
        cfg_where_key(where, path, key);
        return cfg_fail(e, where, "must not name a hop-by-hop or framing header (%s)",
                        m->scope_headers.v[i]);
    }
    return 0;
}

/* The client-facing certificate and key, loaded as tls_set_new will: each
 * file readable, then the pair matching. */
static int cfg_check_server_tls(const struct cfg *c, struct cfg_err *e)
{
    char why[256];
    const char *cert = c->tls_cert_file, *key = c->tls_key_file;
    switch (tls_check_server_pair(cert, key, why, sizeof why)) {
    case TLS_PAIR_OK:
        return 0;
    case TLS_PAIR_CERT:
        return cfg_fail(e, "config: tls.cert_file", "cannot load %s: %s", cert, why);
    case TLS_PAIR_KEY:
        return cfg_fail(e, "config: tls.key_file", "cannot load %s: %s", key, why);
    case TLS_PAIR_MISMATCH:
        return cfg_fail(e, "config: tls.key_file", "%s does not match the certificate in %s", key,
                        cert);
    }
    return 0;
}

/* Rules across keys, checked once every source has been applied. */
int cfg_check_cross(const struct cfg *c, struct cfg_err *e)
{
    const struct cfg_redis *r = &c->redis;
    const char *mode = cfg_mode_names[r->mode];
    if (r->mode != CFG_REDIS_STANDALONE && r->nodes.n == 0)
        return cfg_fail(e, "config: redis.nodes",
                        "must list at least one host:port when mode is %s", mode);
    if (r->mode == CFG_REDIS_SENTINEL && !r->master_name)
        return cfg_fail(e, "config: redis.master_name", "is required when mode is sentinel");
    if (c->tls_cert_file && !c->tls_key_file)
        return cfg_fail(e, "config: tls.key_file", "is required when tls.cert_file is set");
    if (c->tls_key_file && !c->tls_cert_file)
        return cfg_fail(e, "config: tls.cert_file", "is required when tls.key_file is set");
    if (c->tls_cert_file && cfg_check_server_tls(c, e) < 0) return -1;
    if (cfg_check_redacted(c, e) < 0) return -1;
    if (c->store == CFG_STORE_LMDB && !c->lmdb_path[0])
        return cfg_fail(e, "config: lmdb.path", "must name a directory");
    /* Read only when the store will read it: redis store, rediss://, and
     * verify (without it, tls_set_new never opens the file). */
    const struct cfg_tls_client *t = &r->tls_client;
    if (c->store == CFG_STORE_REDIS && r->tls && t->verify && t->ca_file) {
        char why[256];
        if (tls_check_ca_file(t->ca_file, why, sizeof why) < 0)
            return cfg_fail(e, "config: redis.tls.ca_file", "cannot load %s: %s", t->ca_file, why);
    }
    return 0;
}
