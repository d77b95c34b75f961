/* test_tls.c — the Redis client context (net/tls.h): tls_redis_new
 * against idemgate's own server context, the two SSLs joined by an
 * in-memory BIO pair (no socket, no process). The certificates below are
 * a throwaway CA, a server certificate it signed for IP 127.0.0.1 and DNS
 * localhost (valid until 2126), and an unrelated CA; made once with the
 * openssl CLI (EC P-256) and never trusted anywhere else. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmocka.h>
#include <openssl/bio.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509_vfy.h>

#include "idemgate/config/config.h"
#include "idemgate/net/tls.h"

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

static const char WRONG_CA_PEM[] =
    "-----BEGIN CERTIFICATE-----\n"
    "MIIBmDCCAT2gAwIBAgIUKoBtAexZhhhjFAQeKDo69TeL2fcwCgYIKoZIzj0EAwIw\n"
    "IDEeMBwGA1UEAwwVaWRlbWdhdGUgdW5yZWxhdGVkIENBMCAXDTI2MTIwNzE4MDMy\n"
    "MVoYDzIxMjYxMTEzMTgwMzIxWjAgMR4wHAYDVQQDDBVpZGVtZ2F0ZSB1bnJlbGF0\n"
    "ZWQgQ0EwWTATBgcqhkjOPQIBBggqhkjOPQMBBwNCAAR/mpBQmDiOR3gsspvoKtEQ\n"
    "1slfKhV1i5vKgEoFFfFB4b8VfmcDehy9o8lAeg+7mJylv6+n7Oyot+RZY3h1zk1u\n"
    "o1MwUTAdBgNVHQ4EFgQUH1OIDBro1QffTuaYW0PSljX9CvMwHwYDVR0jBBgwFoAU\n"
    "H1OIDBro1QffTuaYW0PSljX9CvMwDwYDVR0TAQH/BAUwAwEB/zAKBggqhkjOPQQD\n"
    "AgNJADBGAiEA45UJ/yIq3/YhVAePKMDCPhBtKPksplrvSN08oRa2lmwCIQC5ZfoV\n"
    "aT0CNHZPnbN02lMxNub/YFeSPXlhDEx2XV8n+A==\n"
    "-----END CERTIFICATE-----\n";

static const char SERVER_PEM[] =
    "-----BEGIN CERTIFICATE-----\n"
    "MIIBvzCCAWagAwIBAgIUKEpa8tg/AVRk4yYSwt1YmEu8iQkwCgYIKoZIzj0EAwIw\n"
    "GzEZMBcGA1UEAwwQaWRlbWdhdGUgdGVzdCBDQTAgFw0yNjEyMDcxODAzMjFaGA8y\n"
    "MTI2MTExMzE4MDMyMVowFDESMBAGA1UEAwwJbG9jYWxob3N0MFkwEwYHKoZIzj0C\n"
    "AQYIKoZIzj0DAQcDQgAEaEpuNULmxUJJyLssQwpNm0Wuhc07g+hy5pRZxeaWleio\n"
    "GAFI4SLTnJGOyrExMD/49XMOosIQ4t2bzbJwO3EKtqOBjDCBiTAaBgNVHREEEzAR\n"
    "hwR/AAABgglsb2NhbGhvc3QwCQYDVR0TBAIwADALBgNVHQ8EBAMCB4AwEwYDVR0l\n"
    "BAwwCgYIKwYBBQUHAwEwHQYDVR0OBBYEFCm2Up6OZXTXZU2YatAXuuaxIlcDMB8G\n"
    "A1UdIwQYMBaAFMDjvgojTPdwf3gGFayMB2yf7CekMAoGCCqGSM49BAMCA0cAMEQC\n"
    "IAJhAo3P68QLbaOMJXfMVD9SCaEL3H3qYOkv9DQAfFxDAiBLO4O1sZDAUp0dbGLQ\n"
    "kTgAyJdjpiCnwmdahOMtBQDymw==\n"
    "-----END CERTIFICATE-----\n";

static const char SERVER_KEY[] =
    "-----BEGIN PRIVATE KEY-----\n"
    "MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgELGS4yDbNmGF6P+j\n"
    "DNzIpBaKr5yM7TKp1XzgWtCWl6uhRANCAARoSm41QubFQknIuyxDCk2bRa6FzTuD\n"
    "6HLmlFnF5paV6KgYAUjhItOckY7KsTEwP/j1cw6iwhDi3ZvNsnA7cQq2\n"
    "-----END PRIVATE KEY-----\n";

static char dir[64], ca_path[128], wrong_path[128], cert_path[128], key_path[128], junk_path[128];

static void put(char *path, size_t n, const char *name, const char *text)
{
    snprintf(path, n, "%s/%s", dir, name);
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    assert_int_equal(fputs(text, f) >= 0, 1);
    assert_int_equal(fclose(f), 0);
}

static int setup(void **state)
{
    (void)state;
    snprintf(dir, sizeof dir, "/tmp/idemgate-test-tls-XXXXXX");
    if (!mkdtemp(dir)) return -1;
    put(ca_path, sizeof ca_path, "ca.pem", CA_PEM);
    put(wrong_path, sizeof wrong_path, "wrong-ca.pem", WRONG_CA_PEM);
    put(cert_path, sizeof cert_path, "server.pem", SERVER_PEM);
    put(key_path, sizeof key_path, "server.key", SERVER_KEY);
    put(junk_path, sizeof junk_path, "junk.pem", "not a certificate\n");
    return 0;
}

static int teardown(void **state)
{
    (void)state;
    const char *files[] = {ca_path, wrong_path, cert_path, key_path, junk_path};
    for (size_t i = 0; i < sizeof files / sizeof files[0]; i++)
        unlink(files[i]);
    rmdir(dir);
    return 0;
}

/* A config with the server context (our certificate) and a rediss:// store
 * verified as given; its TLS contexts built into ts. */
static struct tls_set *ts;

static void init(struct cfg *c, const char *url, const char *ca, bool verify,
                 const char *server_name)
{
    char json[1024], err[512];
    snprintf(json, sizeof json,
             "{\"store\": \"redis\", \"redis\": {\"url\": \"%s\", \"tls\": {\"ca_file\": \"%s\", "
             "\"verify\": %s, \"server_name\": \"%s\"}}, \"tls\": {\"cert_file\": \"%s\", "
             "\"key_file\": \"%s\"}}",
             url, ca, verify ? "true" : "false", server_name, cert_path, key_path);
    if (cfg_load_json(c, json, strlen(json), false, NULL, err, sizeof err) != 0)
        fail_msg("cfg: %s", err);
    ts = tls_set_new(c, err, sizeof err);
    if (!ts) fail_msg("tls_set_new: %s", err);
}

/* Drives both ends until both finish or one fails: 0, or -1. */
static int handshake(SSL *client, SSL *server)
{
    BIO *cb, *sb;
    assert_int_equal(BIO_new_bio_pair(&cb, 0, &sb, 0), 1);
    SSL_set_bio(client, cb, cb);
    SSL_set_bio(server, sb, sb);
    for (int i = 0; i < 64; i++) {
        int rc = SSL_do_handshake(client), rs = SSL_do_handshake(server);
        if (rc == 1 && rs == 1) return 0;
        int ec = rc == 1 ? SSL_ERROR_NONE : SSL_get_error(client, rc);
        int es = rs == 1 ? SSL_ERROR_NONE : SSL_get_error(server, rs);
        if ((ec != SSL_ERROR_NONE && ec != SSL_ERROR_WANT_READ && ec != SSL_ERROR_WANT_WRITE) ||
            (es != SSL_ERROR_NONE && es != SSL_ERROR_WANT_READ && es != SSL_ERROR_WANT_WRITE))
            break;
    }
    ERR_clear_error();
    return -1;
}

/* One connection to host: the handshake's result, the client's verify
 * result and the SNI the server saw ("" when none). */
static int connect_to(const char *host, long *verify, char *sni, size_t n)
{
    SSL *client = tls_redis_new(ts, host);
    SSL *server = tls_server_new(ts);
    assert_non_null(client);
    assert_non_null(server);
    int rc = handshake(client, server);
    *verify = SSL_get_verify_result(client);
    const char *name = SSL_get_servername(server, TLSEXT_NAMETYPE_host_name);
    snprintf(sni, n, "%s", name ? name : "");
    SSL_free(client);
    SSL_free(server);
    return rc;
}

static void test_verified_by_ip_and_name(void **state)
{
    (void)state;
    struct cfg c;
    long v;
    char sni[256];
    init(&c, "rediss://127.0.0.1:6390", ca_path, true, "");
    assert_true(tls_redis_enabled(ts));
    /* an IP literal: checked against the IP SAN, never sent as SNI */
    assert_int_equal(connect_to("127.0.0.1", &v, sni, sizeof sni), 0);
    assert_int_equal(v, X509_V_OK);
    assert_string_equal(sni, "");
    /* a name (a cluster node or a sentinel's master may be one) */
    assert_int_equal(connect_to("localhost", &v, sni, sizeof sni), 0);
    assert_int_equal(v, X509_V_OK);
    assert_string_equal(sni, "localhost");
    /* a host the certificate does not name */
    assert_int_equal(connect_to("127.0.0.2", &v, sni, sizeof sni), -1);
    assert_int_equal(v, X509_V_ERR_IP_ADDRESS_MISMATCH);
    assert_int_equal(connect_to("redis.example", &v, sni, sizeof sni), -1);
    assert_int_equal(v, X509_V_ERR_HOSTNAME_MISMATCH);
    tls_set_free(ts);
    ts = NULL;
    cfg_free(&c);
}

static void test_server_name_replaces_host(void **state)
{
    (void)state;
    struct cfg c;
    long v;
    char sni[256];
    init(&c, "rediss://10.0.0.1", ca_path, true, "localhost");
    assert_int_equal(connect_to("10.0.0.7", &v, sni, sizeof sni), 0);
    assert_string_equal(sni, "localhost");
    tls_set_free(ts);
    ts = NULL;
    cfg_free(&c);
    init(&c, "rediss://127.0.0.1", ca_path, true, "redis.internal");
    assert_int_equal(connect_to("127.0.0.1", &v, sni, sizeof sni), -1);
    assert_int_equal(v, X509_V_ERR_HOSTNAME_MISMATCH);
    assert_string_equal(sni, "redis.internal");
    tls_set_free(ts);
    ts = NULL;
    cfg_free(&c);
}

static void test_wrong_ca(void **state)
{
    (void)state;
    struct cfg c;
    long v;
    char sni[256];
    init(&c, "rediss://127.0.0.1", wrong_path, true, "");
    assert_int_equal(connect_to("127.0.0.1", &v, sni, sizeof sni), -1);
    assert_int_equal(v, X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY);
    tls_set_free(ts);
    ts = NULL;
    cfg_free(&c);
    /* verify false: any certificate, any name */
    init(&c, "rediss://127.0.0.1", wrong_path, false, "redis.internal");
    assert_int_equal(connect_to("127.0.0.1", &v, sni, sizeof sni), 0);
    tls_set_free(ts);
    ts = NULL;
    cfg_free(&c);
}

static void test_no_context_without_rediss(void **state)
{
    (void)state;
    struct cfg c;
    init(&c, "redis://127.0.0.1", ca_path, true, "");
    assert_false(tls_redis_enabled(ts));
    assert_null(tls_redis_new(ts, "127.0.0.1"));
    tls_set_free(ts);
    ts = NULL;
    cfg_free(&c);
    /* the memory store never talks to Redis */
    char err[256];
    const char *json = "{\"store\": \"memory\", \"redis\": {\"url\": \"rediss://h\"}}";
    assert_int_equal(cfg_load_json(&c, json, strlen(json), false, NULL, err, sizeof err), 0);
    ts = tls_set_new(&c, err, sizeof err);
    assert_non_null(ts);
    assert_false(tls_redis_enabled(ts));
    tls_set_free(ts);
    ts = NULL;
    assert_false(tls_redis_enabled(ts));
    cfg_free(&c);
}

static void test_check_ca_file(void **state)
{
    (void)state;
    char why[256], missing[160];
    assert_int_equal(tls_check_ca_file(ca_path, why, sizeof why), 0);
    assert_int_equal(tls_check_ca_file(wrong_path, why, sizeof why), 0);
    snprintf(missing, sizeof missing, "%s/none.pem", dir);
    assert_int_equal(tls_check_ca_file(missing, why, sizeof why), -1);
    assert_string_equal(why, "No such file or directory");
    assert_int_equal(tls_check_ca_file(dir, why, sizeof why), -1);
    assert_string_equal(why, "not a regular file");
    assert_int_equal(tls_check_ca_file("/dev/zero", why, sizeof why), -1);
    assert_string_equal(why, "not a regular file");
    assert_int_equal(tls_check_ca_file(junk_path, why, sizeof why), -1);
    assert_non_null(strstr(why, "no certificate"));
    assert_int_equal(ERR_peek_error(), 0); /* the queue is left empty */
}

static void test_init_fails_on_bad_ca(void **state)
{
    (void)state;
    /* what cfg_load refuses; tls_set_new still says why if the file went bad
     * in between */
    struct cfg c;
    char err[512];
    const char *json = "{\"redis\": {\"url\": \"rediss://h\"}}";
    assert_int_equal(cfg_load_json(&c, json, strlen(json), false, NULL, err, sizeof err), 0);
    free(c.redis.tls_client.ca_file);
    c.redis.tls_client.ca_file = strdup(junk_path);
    assert_null(tls_set_new(&c, err, sizeof err));
    assert_non_null(strstr(err, "cannot read the Redis CA "));
    assert_non_null(strstr(err, "junk.pem: no certificate"));
    cfg_free(&c);
}

static void test_check_server_pair(void **state)
{
    (void)state;
    char why[256], missing[160];
    snprintf(missing, sizeof missing, "%s/none.pem", dir);
    assert_int_equal(tls_check_server_pair(cert_path, key_path, why, sizeof why), TLS_PAIR_OK);
    assert_int_equal(tls_check_server_pair(missing, key_path, why, sizeof why), TLS_PAIR_CERT);
    assert_string_equal(why, "No such file or directory");
    assert_int_equal(tls_check_server_pair(dir, key_path, why, sizeof why), TLS_PAIR_CERT);
    assert_string_equal(why, "not a regular file");
    assert_int_equal(tls_check_server_pair(junk_path, key_path, why, sizeof why), TLS_PAIR_CERT);
    assert_int_equal(tls_check_server_pair(cert_path, missing, why, sizeof why), TLS_PAIR_KEY);
    assert_string_equal(why, "No such file or directory");
    assert_int_equal(tls_check_server_pair(cert_path, "/dev/zero", why, sizeof why), TLS_PAIR_KEY);
    assert_string_equal(why, "not a regular file");
    assert_int_equal(tls_check_server_pair(cert_path, junk_path, why, sizeof why), TLS_PAIR_KEY);
    /* the CA's certificate with the server's key */
    assert_int_equal(tls_check_server_pair(ca_path, key_path, why, sizeof why), TLS_PAIR_MISMATCH);
    assert_int_equal(ERR_peek_error(), 0); /* the queue is left empty */
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_verified_by_ip_and_name),
        cmocka_unit_test(test_server_name_replaces_host),
        cmocka_unit_test(test_wrong_ca),
        cmocka_unit_test(test_no_context_without_rediss),
        cmocka_unit_test(test_check_ca_file),
        cmocka_unit_test(test_init_fails_on_bad_ca),
        cmocka_unit_test(test_check_server_pair),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
