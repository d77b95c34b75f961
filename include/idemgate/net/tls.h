/* tls.h — one configuration's OpenSSL contexts (docs/configuration.md).
 *
 * A struct tls_set holds a server context when tls.cert_file/tls.key_file
 * are set (HTTPS from clients), a client context when any upstream is
 * https:// (verified against upstream_tls), a Redis context when the store
 * is redis and redis.url is rediss:// (verified against redis.tls). A set
 * belongs to one configuration generation (proxy/gen.h): built with it,
 * freed with it, only read in between (an SSL_CTX is safe to share between
 * threads once set up: loops call tls_*_new concurrently). A reload builds
 * a new set; SSL objects made from the old one keep their context alive
 * (OpenSSL counts references), so connections opened before a reload
 * keep working. Per-connection SSL objects are owned by the caller, which
 * hands them to a conn (conn_set_tls takes ownership) or frees them with
 * SSL_free. */
#ifndef IDEMGATE_TLS_H
#define IDEMGATE_TLS_H

#include <stdbool.h>
#include <stddef.h>

struct cfg;
struct cfg_url;
struct ssl_st;
struct ssl_session_st;
struct tls_set;

/* Builds the contexts cfg needs (cfg is borrowed and must outlive the
 * set). Returns the set, or NULL after writing why into err ("cannot read
 * the TLS key /x.pem: ..."). */
struct tls_set *tls_set_new(const struct cfg *cfg, char *err, size_t errlen);
/* Frees the set (NULL is fine). SSL objects made from it stay valid. */
void tls_set_free(struct tls_set *t);

/* True when t serves clients over TLS (false for NULL). */
bool tls_server_enabled(const struct tls_set *t);
/* A new server-side SSL in accept state, or NULL (out of memory, or TLS
 * not configured). Caller owns it (conn_set_tls takes it over). */
struct ssl_st *tls_server_new(const struct tls_set *t);

/* A new client-side SSL for an https upstream: SNI, hostname or IP
 * verification against upstream_tls.server_name or url->host (unless
 * upstream_tls.verify is false), ALPN http/1.1. When *session_slot holds a
 * session it is offered for resumption; sessions the server issues replace
 * it (the slot owns its reference, freed with SSL_SESSION_free by its
 * owner; the slot is borrowed and must outlive the SSL, and is only touched
 * on the thread that reads the connection). Returns NULL when t has no
 * client context or out of memory. */
struct ssl_st *tls_client_new(const struct tls_set *t, const struct cfg_url *url,
                              struct ssl_session_st **session_slot);

/* True when t has the Redis context (store redis, rediss:// url). */
bool tls_redis_enabled(const struct tls_set *t);

/* A new client-side SSL in connect state for one Redis connection to host:
 * the url's host, a cluster node's (a seed, or one CLUSTER SLOTS or a
 * MOVED/ASK names), a sentinel's, or the master's a sentinel names; an
 * IPv6 literal without brackets. SNI is redis.tls.server_name, else host,
 * and none when that is an IP literal. With redis.tls.verify (the default)
 * the chain is verified against redis.tls.ca_file (the system store when
 * empty) and the certificate must match that name (DNS SAN/CN, no partial
 * wildcards) or that IP address (IP SAN), exactly as for an https
 * upstream; a failure shows in conn_handshake's why ("certificate verify
 * failed: ..."). No ALPN, no session resumption. Safe to call from any
 * thread. host is borrowed for the call (OpenSSL copies the names).
 * Returns NULL when t has no Redis context (not rediss://) or out of
 * memory; else the caller owns the SSL (conn_set_tls takes it over). */
struct ssl_st *tls_redis_new(const struct tls_set *t, const char *host);

/* Whether path is a CA bundle a client context can load: a regular file
 * holding at least one PEM certificate (the same loader tls_set_new uses).
 * Returns 0, or -1 after writing why into why (whylen bytes, NUL-
 * terminated): "No such file or directory", "not a regular file", "no
 * certificate or crl found", ... The config calls it for -t and at load,
 * so a bad redis.tls.ca_file is a configuration error (exit 2). Builds a
 * throwaway context: any thread, no state. path is borrowed. */
int tls_check_ca_file(const char *path, char *why, size_t whylen);

/* What tls_check_server_pair found wrong, if anything. */
enum tls_pair { TLS_PAIR_OK, TLS_PAIR_CERT, TLS_PAIR_KEY, TLS_PAIR_MISMATCH };

/* Whether the server context would load: cert a readable regular file
 * holding a PEM chain, key a readable regular file holding its unencrypted
 * PEM key, the two a pair (the loaders tls_set_new uses). TLS_PAIR_CERT and
 * TLS_PAIR_KEY write why ("No such file or directory", "Permission
 * denied", "not a regular file", OpenSSL's reason); TLS_PAIR_MISMATCH
 * writes OpenSSL's reason. The config calls it for -t and at load, so a
 * bad tls block is a configuration error (exit 2). Builds a throwaway
 * context: any thread, no state. cert and key are borrowed. */
enum tls_pair tls_check_server_pair(const char *cert, const char *key, char *why, size_t whylen);

#endif
