/* tls.c — one configuration's OpenSSL contexts (struct tls_set): the server one (HTTPS from
 * clients, tls.cert_file/key_file), the upstream client one (https://
 * upstreams, upstream_tls.*) and the Redis client one (a rediss:// store,
 * redis.tls.*), and the per-connection SSL objects made from them. Both
 * client contexts are built, and their SSL objects verified, by the same
 * helpers (tls_client_ctx_new, tls_client_ssl_new) from a struct
 * cfg_tls_client. Owns the contexts; does not own the SSL objects it hands
 * out (a conn does) nor the sockets (conn.c drives reads, writes and
 * handshakes). */
#include "idemgate/net/tls.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>

#include "idemgate/config/config.h"

/* A set is built (tls_set_new) before the loops use it, then only read (SSL_new is thread-safe
 * on a context nobody changes). */
struct tls_set {
    const struct cfg *cfg; /* borrowed: the names and verify settings */
    SSL_CTX *server;       /* tls.cert_file/key_file */
    SSL_CTX *client;       /* https:// upstreams */
    SSL_CTX *redis;        /* a rediss:// store */
};

/* ALPN wire format: length-prefixed names. */
static const unsigned char tls_alpn_http11[] = "\x08http/1.1";
static const unsigned char tls_alpn_h2[] = "\x02h2\x08http/1.1"; /* ours, first preferred */

/* Joins the reasons queued in OpenSSL's error queue (and empties it). */
static void tls_err_text(char *out, size_t n)
{
    size_t used = 0;
    out[0] = '\0';
    unsigned long e;
    while ((e = ERR_get_error()) != 0) {
        char one[256];
        const char *r = ERR_reason_error_string(e);
        if (!r) {
            ERR_error_string_n(e, one, sizeof(one));
            r = one;
        }
        int w = snprintf(out + used, n - used, "%s%s", used ? ": " : "", r);
        if (w < 0 || (size_t)w >= n - used) break;
        used += (size_t)w;
    }
    if (used == 0) snprintf(out, n, "unknown error");
    ERR_clear_error();
}

/* An encrypted key must fail to load, not prompt on the terminal. */
static int tls_no_password(char *buf, int size, int rwflag, void *u)
{
    (void)buf;
    (void)size;
    (void)rwflag;
    (void)u;
    return 0;
}

/* arg: the set's configuration; h2 is offered while http2.enabled. */
static int tls_alpn_select(SSL *ssl, const unsigned char **out, unsigned char *outlen,
                           const unsigned char *in, unsigned int inlen, void *arg)
{
    (void)ssl;
    const struct cfg *cfg = arg;
    bool h2 = cfg->http2.enabled;
    const unsigned char *ours = h2 ? tls_alpn_h2 : tls_alpn_http11;
    unsigned int ours_len = h2 ? sizeof(tls_alpn_h2) - 1 : sizeof(tls_alpn_http11) - 1;
    unsigned char *sel = NULL;
    if (SSL_select_next_proto(&sel, outlen, ours, ours_len, in, inlen) != OPENSSL_NPN_NEGOTIATED)
        return SSL_TLSEXT_ERR_NOACK; /* the client may still speak HTTP/1.1 */
    *out = sel;
    return SSL_TLSEXT_ERR_OK;
}

/* Settings both sides share: TLS 1.2+, no renegotiation (a write never
 * has to read), writes of a buffer that may move and be longer on retry,
 * and an EOF without close_notify read as an EOF (common with HTTP
 * servers; bodies are framed by HTTP anyway). */
static SSL_CTX *tls_ctx_new(const SSL_METHOD *method)
{
    SSL_CTX *ctx = SSL_CTX_new(method);
    if (!ctx) return NULL;
    SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION);
    SSL_CTX_set_options(ctx, SSL_OP_NO_RENEGOTIATION | SSL_OP_IGNORE_UNEXPECTED_EOF |
                                 SSL_OP_NO_COMPRESSION);
    SSL_CTX_set_mode(ctx, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER |
                              SSL_MODE_RELEASE_BUFFERS);
    return ctx;
}

/* A file the loaders may open: one that opens for reading and is a
 * regular file (a FIFO or a device named by mistake must not block, or
 * feed, a loader). Returns 1, or 0 with why filled. */
static int tls_file_ok(const char *path, char *why, size_t whylen)
{
    int fd = open(path, O_RDONLY | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0) {
        snprintf(why, whylen, "%s", strerror(errno));
        return 0;
    }
    struct stat st;
    int ok = fstat(fd, &st) == 0 && S_ISREG(st.st_mode);
    close(fd);
    if (!ok) snprintf(why, whylen, "not a regular file");
    return ok;
}

/* Loads the certificate chain and the key into a server context and checks
 * that they match; why says what failed (TLS_PAIR_CERT, TLS_PAIR_KEY). */
static enum tls_pair tls_use_pair(SSL_CTX *ctx, const char *cert, const char *key, char *why,
                                  size_t whylen)
{
    SSL_CTX_set_default_passwd_cb(ctx, tls_no_password);
    if (!tls_file_ok(cert, why, whylen)) return TLS_PAIR_CERT;
    if (SSL_CTX_use_certificate_chain_file(ctx, cert) != 1) {
        tls_err_text(why, whylen);
        return TLS_PAIR_CERT;
    }
    if (!tls_file_ok(key, why, whylen)) return TLS_PAIR_KEY;
    if (SSL_CTX_use_PrivateKey_file(ctx, key, SSL_FILETYPE_PEM) != 1) {
        unsigned long e = ERR_peek_last_error();
        bool mismatch =
            ERR_GET_LIB(e) == ERR_LIB_X509 && ERR_GET_REASON(e) == X509_R_KEY_VALUES_MISMATCH;
        tls_err_text(why, whylen);
        return mismatch ? TLS_PAIR_MISMATCH : TLS_PAIR_KEY;
    }
    if (SSL_CTX_check_private_key(ctx) != 1) {
        tls_err_text(why, whylen);
        return TLS_PAIR_MISMATCH;
    }
    return TLS_PAIR_OK;
}

static int tls_server_init(struct tls_set *t, const struct cfg *cfg, char *err, size_t errlen)
{
    char why[512];
    SSL_CTX *ctx = tls_ctx_new(TLS_server_method());
    if (!ctx) {
        tls_err_text(why, sizeof(why));
        snprintf(err, errlen, "cannot create a TLS context: %s", why);
        return -1;
    }
    const char *cert = cfg->tls_cert_file, *key = cfg->tls_key_file;
    switch (tls_use_pair(ctx, cert, key, why, sizeof(why))) {
    case TLS_PAIR_OK:
        break;
    case TLS_PAIR_CERT:
        snprintf(err, errlen, "cannot read the TLS certificate %s: %s", cert, why);
        SSL_CTX_free(ctx);
        return -1;
    case TLS_PAIR_KEY:
        snprintf(err, errlen, "cannot read the TLS key %s: %s", key, why);
        SSL_CTX_free(ctx);
        return -1;
    case TLS_PAIR_MISMATCH:
        snprintf(err, errlen, "the TLS key %s does not match the certificate %s", key, cert);
        SSL_CTX_free(ctx);
        return -1;
    }
    static const unsigned char sid_ctx[] = "idemgate";
    SSL_CTX_set_session_id_context(ctx, sid_ctx, sizeof(sid_ctx) - 1);
    SSL_CTX_set_num_tickets(ctx, 1);
    SSL_CTX_set_alpn_select_cb(ctx, tls_alpn_select, (void *)cfg);
    t->server = ctx;
    return 0;
}

enum tls_pair tls_check_server_pair(const char *cert, const char *key, char *why, size_t whylen)
{
    SSL_CTX *ctx = tls_ctx_new(TLS_server_method());
    if (!ctx) {
        tls_err_text(why, whylen);
        return TLS_PAIR_CERT;
    }
    enum tls_pair r = tls_use_pair(ctx, cert, key, why, whylen);
    SSL_CTX_free(ctx);
    return r;
}

/* A server issued a session (TLS 1.3: after the handshake, read with the
 * response): it replaces the pool's slot, which keeps our reference. */
static int tls_client_new_session(SSL *ssl, SSL_SESSION *sess)
{
    SSL_SESSION **slot = SSL_get_app_data(ssl);
    if (!slot) return 0;
    if (*slot) SSL_SESSION_free(*slot);
    *slot = sess;
    return 1;
}

static bool tls_any_https(const struct cfg *cfg)
{
    /* A group has one scheme: its first server says it. */
    if (cfg->upstream.n && cfg->upstream.servers[0].url.tls) return true;
    for (size_t i = 0; i < cfg->n_routes; i++)
        if (cfg->routes[i].upstream.n && cfg->routes[i].upstream.servers[0].url.tls) return true;
    return false;
}

/* Loads a CA bundle into ctx's store. Only a regular file: a FIFO or a
 * device named by mistake must not block (or feed) the loader. Returns 1,
 * or 0 with why filled. */
static int tls_load_ca(SSL_CTX *ctx, const char *path, char *why, size_t whylen)
{
    struct stat st;
    if (stat(path, &st) != 0) {
        snprintf(why, whylen, "%s", strerror(errno));
        return 0;
    }
    if (!S_ISREG(st.st_mode)) {
        snprintf(why, whylen, "not a regular file");
        return 0;
    }
    if (SSL_CTX_load_verify_locations(ctx, path, NULL) != 1) {
        tls_err_text(why, whylen);
        return 0;
    }
    return 1;
}

/* A client context verifying servers as t says: the chain against
 * t->ca_file (the system store when NULL) unless t->verify is false. what
 * names the CA in the message ("upstream CA", "Redis CA"). Returns NULL
 * with err filled ("cannot read the Redis CA /x.pem: ..."). */
static SSL_CTX *tls_client_ctx_new(const struct cfg_tls_client *t, const char *what, char *err,
                                   size_t errlen)
{
    char why[512];
    SSL_CTX *ctx = tls_ctx_new(TLS_client_method());
    if (!ctx) {
        tls_err_text(why, sizeof(why));
        snprintf(err, errlen, "cannot create a TLS context: %s", why);
        return NULL;
    }
    if (t->verify) {
        SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, NULL);
        int ok = 1;
        if (t->ca_file) {
            ok = tls_load_ca(ctx, t->ca_file, why, sizeof(why));
        } else if (SSL_CTX_set_default_verify_paths(ctx) != 1) {
            tls_err_text(why, sizeof(why));
            ok = 0;
        }
        if (!ok) {
            snprintf(err, errlen, "cannot read the %s %s: %s", what,
                     t->ca_file ? t->ca_file : "(system default)", why);
            SSL_CTX_free(ctx);
            return NULL;
        }
    } else {
        SSL_CTX_set_verify(ctx, SSL_VERIFY_NONE, NULL);
    }
    return ctx;
}

static int tls_client_init(struct tls_set *t, const struct cfg *cfg, char *err, size_t errlen)
{
    SSL_CTX *ctx = tls_client_ctx_new(&cfg->upstream_tls, "upstream CA", err, errlen);
    if (!ctx) return -1;
    SSL_CTX_set_alpn_protos(ctx, tls_alpn_http11, sizeof(tls_alpn_http11) - 1);
    SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_CLIENT | SSL_SESS_CACHE_NO_INTERNAL_STORE);
    SSL_CTX_sess_set_new_cb(ctx, tls_client_new_session);
    t->client = ctx;
    return 0;
}

/* True when the store connects to Redis over TLS (rediss://). */
static bool tls_redis_wanted(const struct cfg *cfg)
{
    return cfg->store == CFG_STORE_REDIS && cfg->redis.tls;
}

/* The Redis context: no ALPN (Redis has no protocol id), no session
 * resumption (its connections are long-lived and few). */
static int tls_redis_init(struct tls_set *t, const struct cfg *cfg, char *err, size_t errlen)
{
    SSL_CTX *ctx = tls_client_ctx_new(&cfg->redis.tls_client, "Redis CA", err, errlen);
    if (!ctx) return -1;
    t->redis = ctx;
    return 0;
}

int tls_check_ca_file(const char *path, char *why, size_t whylen)
{
    SSL_CTX *ctx = tls_ctx_new(TLS_client_method());
    if (!ctx) {
        tls_err_text(why, whylen);
        return -1;
    }
    int ok = tls_load_ca(ctx, path, why, whylen);
    SSL_CTX_free(ctx);
    return ok == 1 ? 0 : -1;
}

struct tls_set *tls_set_new(const struct cfg *cfg, char *err, size_t errlen)
{
    struct tls_set *t = calloc(1, sizeof(*t));
    if (!t) abort();
    t->cfg = cfg;
    if ((cfg->tls_cert_file && cfg->tls_key_file && tls_server_init(t, cfg, err, errlen) < 0) ||
        (tls_any_https(cfg) && tls_client_init(t, cfg, err, errlen) < 0) ||
        (tls_redis_wanted(cfg) && tls_redis_init(t, cfg, err, errlen) < 0)) {
        tls_set_free(t);
        return NULL;
    }
    return t;
}

void tls_set_free(struct tls_set *t)
{
    if (!t) return;
    SSL_CTX_free(t->server);
    SSL_CTX_free(t->client);
    SSL_CTX_free(t->redis);
    free(t);
}

bool tls_server_enabled(const struct tls_set *t)
{
    return t && t->server != NULL;
}

SSL *tls_server_new(const struct tls_set *t)
{
    if (!tls_server_enabled(t)) return NULL;
    SSL *ssl = SSL_new(t->server);
    if (ssl) SSL_set_accept_state(ssl);
    return ssl;
}

static bool tls_is_ip(const char *s)
{
    unsigned char a[16];
    return inet_pton(AF_INET, s, a) == 1 || inet_pton(AF_INET6, s, a) == 1;
}

/* A client SSL from ctx in connect state for a connection to host: SNI
 * and, with t->verify, the certificate's name (or IP address) checked
 * against t->server_name, else host. An IP literal is never sent as SNI
 * (RFC 6066) but is checked against the certificate's IP SANs. NULL when
 * out of memory (or a name OpenSSL refuses). */
static SSL *tls_client_ssl_new(SSL_CTX *ctx, const struct cfg_tls_client *t, const char *host)
{
    SSL *ssl = SSL_new(ctx);
    if (!ssl) return NULL;
    SSL_set_connect_state(ssl);
    const char *name = t->server_name ? t->server_name : host;
    bool ip = tls_is_ip(name);
    int ok = 1;
    if (!ip) ok = (int)SSL_set_tlsext_host_name(ssl, name); /* SNI never carries an address */
    if (ok == 1 && t->verify) {
        SSL_set_hostflags(ssl, X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS);
        ok = ip ? X509_VERIFY_PARAM_set1_ip_asc(SSL_get0_param(ssl), name)
                : SSL_set1_host(ssl, name);
    }
    if (ok != 1) {
        ERR_clear_error();
        SSL_free(ssl);
        return NULL;
    }
    return ssl;
}

SSL *tls_client_new(const struct tls_set *t, const struct cfg_url *url, SSL_SESSION **session_slot)
{
    if (!t || !t->client) return NULL;
    SSL *ssl = tls_client_ssl_new(t->client, &t->cfg->upstream_tls, url->host);
    if (!ssl) return NULL;
    SSL_set_app_data(ssl, session_slot);
    if (session_slot && *session_slot && SSL_SESSION_is_resumable(*session_slot))
        SSL_set_session(ssl, *session_slot);
    return ssl;
}

bool tls_redis_enabled(const struct tls_set *t)
{
    return t && t->redis != NULL;
}

SSL *tls_redis_new(const struct tls_set *t, const char *host)
{
    if (!tls_redis_enabled(t)) return NULL;
    return tls_client_ssl_new(t->redis, &t->cfg->redis.tls_client, host);
}
