/* tls.h — the process's OpenSSL contexts (SPEC section 6).
 *
 * One server context when tls.cert_file/tls.key_file are set (HTTPS from
 * clients), one client context when any upstream is https:// (verified
 * against upstream_tls). Both are built by tls_init before the workers
 * start and only read afterwards (an SSL_CTX is safe to share between
 * threads once set up). tls_init/tls_free own them; per-connection SSL
 * objects are made here and handed to a conn (conn_set_tls takes
 * ownership). */
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

#endif
