/* tls.h — the process's OpenSSL contexts (docs/configuration.md).
 *
 * One server context when tls.cert_file/tls.key_file are set (HTTPS from
 * clients), one client context when any upstream is https:// (verified
 * against upstream_tls), one Redis context when the store is redis and
 * redis.url is rediss:// (verified against redis.tls). All are built by
 * tls_init before the workers start, freed by tls_free after they have
 * stopped, and only read in between (an SSL_CTX is safe to share between
 * threads once set up: workers call tls_*_new concurrently). tls_init and
 * tls_free own the contexts; per-connection SSL objects are made here and
 * owned by the caller, which hands them to a conn (conn_set_tls takes
 * ownership) or frees them with SSL_free. An SSL object holds a reference
 * to its context, but must still be freed before tls_free runs. */
#ifndef IDEMGATE_TLS_H
#define IDEMGATE_TLS_H

#include <stdbool.h>
#include <stddef.h>

struct cfg;
struct cfg_url;
struct ssl_st;
struct ssl_session_st;

/* Builds the contexts the configuration needs. Returns 0, or -1 after
 * writing why into err ("cannot read the TLS key /x.pem: ..."). */
int tls_init(const struct cfg *cfg, char *err, size_t errlen);
/* Frees the contexts. Idempotent. */
void tls_free(void);

/* True when clients are served over TLS. */
bool tls_server_enabled(void);
/* A new server-side SSL in accept state, or NULL (out of memory, or TLS
 * not configured). Caller owns it (conn_set_tls takes it over). */
struct ssl_st *tls_server_new(void);

/* A new client-side SSL for an https upstream: SNI, hostname or IP
 * verification against upstream_tls.server_name or url->host (unless
 * upstream_tls.verify is false), ALPN http/1.1. When *session_slot holds a
 * session it is offered for resumption; sessions the server issues replace
 * it (the slot owns its reference, freed with SSL_SESSION_free by its
 * owner; the slot is borrowed and must outlive the SSL, and is only touched
 * on the thread that reads the connection). Returns NULL when the client
 * context is missing or out of memory. */
struct ssl_st *tls_client_new(const struct cfg *cfg, const struct cfg_url *url,
                              struct ssl_session_st **session_slot);

/* True when tls_init made the Redis context (store redis, rediss:// url). */
bool tls_redis_enabled(void);

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
 * thread. cfg and host are borrowed for the call (OpenSSL copies the
 * names). Returns NULL when the Redis context is missing (not rediss://)
 * or out of memory; else the caller owns the SSL (conn_set_tls takes it
 * over). */
struct ssl_st *tls_redis_new(const struct cfg *cfg, const char *host);

/* Whether path is a CA bundle a client context can load: a regular file
 * holding at least one PEM certificate (the same loader tls_init uses).
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
 * PEM key, the two a pair (the loaders tls_init uses). TLS_PAIR_CERT and
 * TLS_PAIR_KEY write why ("No such file or directory", "Permission
 * denied", "not a regular file", OpenSSL's reason); TLS_PAIR_MISMATCH
 * writes OpenSSL's reason. The config calls it for -t and at load, so a
 * bad tls block is a configuration error (exit 2). Builds a throwaway
 * context: any thread, no state. cert and key are borrowed. */
enum tls_pair tls_check_server_pair(const char *cert, const char *key, char *why, size_t whylen);

#endif
