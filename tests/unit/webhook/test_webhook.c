/* test_webhook.c — unit tests for webhook/ (a delivery's signature and
 * key) and core/base64, with the wall clock faked: the Standard Webhooks
 * test vector, rotation, several signatures, tolerance both ways, the
 * hmac-sha256 scheme in hex and base64 with a prefix, JSON pointers
 * (escapes, arrays, integers, absent members, non-JSON bodies), and the
 * config's webhook errors (each names its key). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "idemgate/config/config.h"
#include "idemgate/core/base64.h"
#include "idemgate/core/clock.h"
#include "idemgate/http/http1.h"
#include "idemgate/webhook/webhook.h"

/* The Standard Webhooks reference vector (its libraries' own tests). */
#define VEC_SECRET "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
#define VEC_ID "msg_p5jXN8AQM9LWM0D4loKWxJek"
#define VEC_TS 1614265330
#define VEC_BODY "{\"test\": 2432232314}"
#define VEC_SIG "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="

static char err[512];
static int64_t wall = VEC_TS;
static char raw[8192];
static struct http1_head head;

static const struct cfg_webhook *load_route(struct cfg *c, const char *webhook)
{
    char json[2048];
    snprintf(json, sizeof json, "{\"routes\": [{\"prefix\": \"/h\", \"webhook\": %s}]}", webhook);
    if (cfg_load_json(c, json, strlen(json), false, NULL, err, sizeof err) != 0)
        fail_msg("load failed: %s", err);
    return &c->routes[0].webhook;
}

static void load_fails(const char *webhook, const char *expect)
{
    char json[2048];
    struct cfg c;
    snprintf(json, sizeof json, "{\"routes\": [{\"prefix\": \"/h\", \"webhook\": %s}]}", webhook);
    assert_int_equal(cfg_load_json(&c, json, strlen(json), false, NULL, err, sizeof err), -1);
    if (!strstr(err, expect)) fail_msg("error %s lacks %s", err, expect);
}

/* A request with the given header lines ("Name: value\r\n" each). */
static const struct http1_head *request(const char *headers, const char *body)
{
    snprintf(raw, sizeof raw, "POST /h HTTP/1.1\r\nHost: x\r\nContent-Length: %zu\r\n%s\r\n%s",
             strlen(body), headers, body);
    assert_true(http1_parse_request(raw, strlen(raw), 65536, &head) > 0);
    return &head;
}

static bool std_verify(const struct cfg_webhook *w, const char *id, long long ts, const char *sig,
                       const char *body)
{
    char h[1024];
    snprintf(h, sizeof h, "webhook-id: %s\r\nwebhook-timestamp: %lld\r\nwebhook-signature: %s\r\n",
             id, ts, sig);
    return webhook_verify(w, request(h, body), body, strlen(body));
}

static int setup(void **state)
{
    (void)state;
    wall = VEC_TS;
    clock_set_fake_wall(&wall);
    return 0;
}

static int teardown(void **state)
{
    (void)state;
    clock_set_fake_wall(NULL);
    return 0;
}

static void test_standard_vector(void **state)
{
    (void)state;
    struct cfg c;
    const struct cfg_webhook *w = load_route(&c, "{\"secrets\": [\"" VEC_SECRET "\"]}");
    assert_true(std_verify(w, VEC_ID, VEC_TS, VEC_SIG, VEC_BODY));
    /* the body, the id or the timestamp changed: another content */
    assert_false(std_verify(w, VEC_ID, VEC_TS, VEC_SIG, "{\"test\": 2432232315}"));
    assert_false(std_verify(w, "msg_other", VEC_TS, VEC_SIG, VEC_BODY));
    assert_false(std_verify(w, VEC_ID, VEC_TS + 1, VEC_SIG, VEC_BODY));
    /* several signatures: one valid among others; other versions ignored */
    assert_true(std_verify(w, VEC_ID, VEC_TS, "v1,Zm9v v2,abc " VEC_SIG, VEC_BODY));
    assert_false(std_verify(w, VEC_ID, VEC_TS,
                            "v1a,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=", VEC_BODY));
    assert_false(std_verify(w, VEC_ID, VEC_TS, "v1,", VEC_BODY));
    assert_false(
        std_verify(w, VEC_ID, VEC_TS, "g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=", VEC_BODY));
    cfg_free(&c);
}

static void test_standard_rotation_and_secret_forms(void **state)
{
    (void)state;
    struct cfg c;
    /* the old secret first, the new one without its whsec_ prefix */
    const struct cfg_webhook *w = load_route(&c, "{\"secrets\": [\"whsec_c2VjcmV0LW9sZA==\", "
                                                 "\"MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\"]}");
    assert_true(std_verify(w, VEC_ID, VEC_TS, VEC_SIG, VEC_BODY));
    cfg_free(&c);
    w = load_route(&c, "{\"secrets\": [\"whsec_c2VjcmV0LW9sZA==\"]}");
    assert_false(std_verify(w, VEC_ID, VEC_TS, VEC_SIG, VEC_BODY));
    cfg_free(&c);
    setenv("WH_TEST_SECRET", VEC_SECRET, 1);
    w = load_route(&c, "{\"secrets\": [\"env:WH_TEST_SECRET\"]}");
    assert_true(std_verify(w, VEC_ID, VEC_TS, VEC_SIG, VEC_BODY));
    cfg_free(&c);
    unsetenv("WH_TEST_SECRET");
}

static void test_standard_tolerance(void **state)
{
    (void)state;
    struct cfg c;
    const struct cfg_webhook *w =
        load_route(&c, "{\"secrets\": [\"" VEC_SECRET "\"], \"tolerance_seconds\": 60}");
    wall = VEC_TS + 60;
    assert_true(std_verify(w, VEC_ID, VEC_TS, VEC_SIG, VEC_BODY));
    wall = VEC_TS + 61; /* stale */
    assert_false(std_verify(w, VEC_ID, VEC_TS, VEC_SIG, VEC_BODY));
    wall = VEC_TS - 60;
    assert_true(std_verify(w, VEC_ID, VEC_TS, VEC_SIG, VEC_BODY));
    wall = VEC_TS - 61; /* from the future */
    assert_false(std_verify(w, VEC_ID, VEC_TS, VEC_SIG, VEC_BODY));
    wall = VEC_TS;
    /* a timestamp that is not decimal seconds */
    const char *body = VEC_BODY;
    const char *bad[] = {"webhook-timestamp: 1614265330.0\r\n", "webhook-timestamp: -1\r\n",
                         "webhook-timestamp: \r\n"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        char h[512];
        snprintf(h, sizeof h, "webhook-id: " VEC_ID "\r\n%swebhook-signature: " VEC_SIG "\r\n",
                 bad[i]);
        assert_false(webhook_verify(w, request(h, body), body, strlen(body)));
    }
    cfg_free(&c);
}

static void test_standard_missing_or_repeated_headers(void **state)
{
    (void)state;
    struct cfg c;
    const struct cfg_webhook *w = load_route(&c, "{\"secrets\": [\"" VEC_SECRET "\"]}");
    const char *body = VEC_BODY;
    const char *cases[] = {
        "webhook-timestamp: 1614265330\r\nwebhook-signature: " VEC_SIG "\r\n",
        "webhook-id: " VEC_ID "\r\nwebhook-signature: " VEC_SIG "\r\n",
        "webhook-id: " VEC_ID "\r\nwebhook-timestamp: 1614265330\r\n",
        "webhook-id: " VEC_ID "\r\nwebhook-id: " VEC_ID "\r\nwebhook-timestamp: "
        "1614265330\r\nwebhook-signature: " VEC_SIG "\r\n",
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++)
        assert_false(webhook_verify(w, request(cases[i], body), body, strlen(body)));
    cfg_free(&c);
}

/* HMAC-SHA256("It's a Secret to Everybody", "Hello, World!"): GitHub's
 * documented example. */
#define GH_HEX "757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"
#define GH_B64 "dXEH6g6yUJ/CESIczphLijdXC211hsIsRvQ3nIsEPhc="

static bool hmac_verify(const struct cfg_webhook *w, const char *value, const char *body)
{
    char h[512];
    snprintf(h, sizeof h, "X-Hub-Signature-256: %s\r\n", value);
    return webhook_verify(w, request(h, body), body, strlen(body));
}

static void test_hmac_scheme(void **state)
{
    (void)state;
    struct cfg c;
    const struct cfg_webhook *w =
        load_route(&c, "{\"signature\": \"hmac-sha256\", \"header\": \"X-Hub-Signature-256\", "
                       "\"prefix\": \"sha256=\", \"secrets\": [\"old\", \"It's a Secret to "
                       "Everybody\"], \"key\": \"header:X-GitHub-Delivery\"}");
    assert_true(hmac_verify(w, "sha256=" GH_HEX, "Hello, World!"));
    assert_false(hmac_verify(w, "sha256=" GH_HEX, "Hello, World?"));
    assert_false(hmac_verify(w, GH_HEX, "Hello, World!"));         /* no prefix */
    assert_false(hmac_verify(w, "sha1=" GH_HEX, "Hello, World!")); /* another prefix */
    assert_false(hmac_verify(w, "sha256=" GH_HEX "00", "Hello, World!"));
    char upper[80] = "sha256=";
    for (const char *p = GH_HEX; *p; p++)
        upper[strlen(upper)] = (char)(*p >= 'a' && *p <= 'f' ? *p - 32 : *p);
    assert_true(hmac_verify(w, upper, "Hello, World!"));
    cfg_free(&c);
    w = load_route(&c, "{\"signature\": \"hmac-sha256\", \"header\": \"X-Hub-Signature-256\", "
                       "\"encoding\": \"base64\", \"secrets\": [\"It's a Secret to Everybody\"], "
                       "\"key\": \"json:/id\"}");
    assert_true(hmac_verify(w, GH_B64, "Hello, World!"));
    assert_false(hmac_verify(w, GH_HEX, "Hello, World!"));
    assert_false(webhook_verify(w, request("", "Hello, World!"), "Hello, World!", 13));
    cfg_free(&c);
    w = load_route(&c, "{\"signature\": \"none\", \"key\": \"json:/id\"}");
    assert_true(webhook_verify(w, request("", "x"), "x", 1));
    cfg_free(&c);
}

static enum webhook_key_status key_of(const struct cfg_webhook *w, const char *body, char *out)
{
    char buf[WEBHOOK_KEY_MAX + 1];
    const char *k = NULL;
    size_t n = 0;
    enum webhook_key_status st =
        webhook_key(w, request("X-Event: ev-1\r\n", body), body, strlen(body), buf, &k, &n);
    if (st == WEBHOOK_KEY_OK) snprintf(out, 128, "%.*s", (int)n, k);
    return st;
}

static void test_key_sources(void **state)
{
    (void)state;
    struct cfg c;
    char out[128];
    const struct cfg_webhook *w =
        load_route(&c, "{\"signature\": \"none\", \"key\": \"json:/a~1b/c~0d\"}");
    assert_int_equal(key_of(w, "{\"a/b\": {\"c~d\": \"k1\"}}", out), WEBHOOK_KEY_OK);
    assert_string_equal(out, "k1");
    assert_int_equal(key_of(w, "{\"a/b\": {\"c~d\": 42}}", out), WEBHOOK_KEY_OK);
    assert_string_equal(out, "42");
    assert_int_equal(key_of(w, "{\"a/b\": {\"c~d\": 4.5}}", out), WEBHOOK_KEY_INVALID);
    /* Integers up to 2^53 - 1 are keys; beyond that, however large, refused (the
     * range is checked before any conversion: 1e300 found by fuzz_webhook). */
    assert_int_equal(key_of(w, "{\"a/b\": {\"c~d\": 9007199254740991}}", out), WEBHOOK_KEY_OK);
    assert_string_equal(out, "9007199254740991");
    assert_int_equal(key_of(w, "{\"a/b\": {\"c~d\": -9007199254740991}}", out), WEBHOOK_KEY_OK);
    assert_string_equal(out, "-9007199254740991");
    assert_int_equal(key_of(w, "{\"a/b\": {\"c~d\": 9007199254740993}}", out), WEBHOOK_KEY_INVALID);
    assert_int_equal(key_of(w, "{\"a/b\": {\"c~d\": 1e300}}", out), WEBHOOK_KEY_INVALID);
    assert_int_equal(key_of(w, "{\"a/b\": {\"c~d\": -6.6e115}}", out), WEBHOOK_KEY_INVALID);
    assert_int_equal(key_of(w, "{\"a/b\": {\"c~d\": 1e400}}", out), WEBHOOK_KEY_INVALID);
    assert_int_equal(key_of(w, "{\"a/b\": {\"c~d\": null}}", out), WEBHOOK_KEY_INVALID);
    assert_int_equal(key_of(w, "{\"a/b\": {\"c~d\": {}}}", out), WEBHOOK_KEY_INVALID);
    assert_int_equal(key_of(w, "{\"a/b\": {}}", out), WEBHOOK_KEY_INVALID);
    assert_int_equal(key_of(w, "not json", out), WEBHOOK_KEY_INVALID);
    assert_int_equal(key_of(w, "", out), WEBHOOK_KEY_INVALID);
    cfg_free(&c);
    w = load_route(&c, "{\"signature\": \"none\", \"key\": \"json:/events/1/id\"}");
    assert_int_equal(key_of(w, "{\"events\": [{\"id\": \"a\"}, {\"id\": \"b\"}]}", out),
                     WEBHOOK_KEY_OK);
    assert_string_equal(out, "b");
    assert_int_equal(key_of(w, "{\"events\": [{\"id\": \"a\"}]}", out), WEBHOOK_KEY_INVALID);
    cfg_free(&c);
    w = load_route(&c, "{\"signature\": \"none\", \"key\": \"json:/events/01/id\"}");
    assert_int_equal(key_of(w, "{\"events\": [{\"id\": \"a\"}, {\"id\": \"b\"}]}", out),
                     WEBHOOK_KEY_INVALID);
    cfg_free(&c);
    w = load_route(&c, "{\"signature\": \"none\", \"key\": \"header:X-Event\"}");
    assert_int_equal(key_of(w, "{}", out), WEBHOOK_KEY_OK);
    assert_string_equal(out, "ev-1");
    cfg_free(&c);
    w = load_route(&c, "{\"signature\": \"none\", \"key\": \"header:X-Other\"}");
    assert_int_equal(key_of(w, "{}", out), WEBHOOK_KEY_ABSENT);
    cfg_free(&c);
    /* standard: the default is the webhook-id header */
    w = load_route(&c, "{\"secrets\": [\"" VEC_SECRET "\"]}");
    assert_false(w->key_json);
    assert_string_equal(w->key_source, "webhook-id");
    cfg_free(&c);
}

static void test_config_errors(void **state)
{
    (void)state;
    load_fails("{}", "routes[0].webhook.secrets: is required");
    load_fails("{\"signature\": \"hmac-sha256\", \"secrets\": [\"s\"], \"key\": \"header:X\"}",
               "routes[0].webhook.header: is required with signature hmac-sha256");
    load_fails("{\"signature\": \"hmac-sha256\", \"header\": \"X-S\", \"secrets\": [\"s\"]}",
               "routes[0].webhook.key: is required with signature hmac-sha256");
    load_fails("{\"secrets\": [\"" VEC_SECRET "\"], \"key\": \"body:/x\"}",
               "routes[0].webhook.key: must be \"header:NAME\" or \"json:/pointer\"");
    load_fails("{\"secrets\": [\"" VEC_SECRET "\"], \"key\": \"json:x\"}",
               "routes[0].webhook.key: must be");
    load_fails("{\"secrets\": [\"whsec_not base64!\"]}",
               "routes[0].webhook.secrets[0]: must be whsec_ followed by base64");
    unsetenv("WH_UNSET_SECRET");
    load_fails("{\"secrets\": [\"env:WH_UNSET_SECRET\"]}",
               "routes[0].webhook.secrets[0]: environment variable WH_UNSET_SECRET is not set");
    load_fails("{\"secrets\": [\"\"]}", "routes[0].webhook.secrets: must not hold an empty string");
    load_fails("{\"secrets\": \"s\"}", "routes[0].webhook.secrets: must be an array of strings");
    load_fails("{\"signature\": \"md5\"}",
               "routes[0].webhook.signature: must be standard, hmac-sha256 or none");
    load_fails("{\"secrets\": [\"" VEC_SECRET "\"], \"tolerance_seconds\": 0}",
               "routes[0].webhook.tolerance_seconds");
    load_fails("{\"secrets\": [\"" VEC_SECRET "\"], \"colour\": 1}",
               "routes[0].webhook.colour: unknown key");
    load_fails("[]", "routes[0].webhook: must be an object");
}

static void test_dump_redacts_secrets(void **state)
{
    (void)state;
    struct cfg c;
    setenv("WH_TEST_SECRET", "s3cr3t", 1);
    load_route(&c,
               "{\"signature\": \"hmac-sha256\", \"header\": \"X-S\", \"key\": \"header:X-Id\", "
               "\"secrets\": [\"literal-secret\", \"env:WH_TEST_SECRET\"]}");
    char *text = cfg_dump_json(&c, true);
    assert_null(strstr(text, "literal-secret"));
    assert_null(strstr(text, "s3cr3t"));
    assert_non_null(strstr(text, "env:WH_TEST_SECRET"));
    assert_non_null(strstr(text, CFG_DUMP_REDACTED));
    struct cfg again;
    assert_int_equal(cfg_load_json(&again, text, strlen(text), false, NULL, err, sizeof err), -1);
    assert_non_null(strstr(err, "holds the redacted value of -T"));
    free(text);
    text = cfg_dump_json(&c, false);
    assert_int_equal(cfg_load_json(&again, text, strlen(text), false, NULL, err, sizeof err), 0);
    assert_int_equal(again.routes[0].webhook.n_keys, 2);
    assert_memory_equal(again.routes[0].webhook.keys[1].v, "s3cr3t", 6);
    cfg_free(&again);
    free(text);
    cfg_free(&c);
    unsetenv("WH_TEST_SECRET");
}

static void test_base64(void **state)
{
    (void)state;
    uint8_t out[64];
    char enc[BASE64_ENCODED_LEN(64)];
    const char *vec[][2] = {{"", ""},
                            {"f", "Zg=="},
                            {"fo", "Zm8="},
                            {"foo", "Zm9v"},
                            {"foob", "Zm9vYg=="},
                            {"fooba", "Zm9vYmE="},
                            {"foobar", "Zm9vYmFy"}};
    for (size_t i = 0; i < sizeof vec / sizeof vec[0]; i++) {
        size_t n = strlen(vec[i][0]);
        assert_int_equal(base64_encode((const uint8_t *)vec[i][0], n, enc), strlen(vec[i][1]));
        assert_string_equal(enc, vec[i][1]);
        assert_int_equal(base64_decode(vec[i][1], strlen(vec[i][1]), out, sizeof out), (long)n);
        assert_memory_equal(out, vec[i][0], n);
    }
    assert_int_equal(base64_decode("Zm8", 3, out, sizeof out), 2); /* padding optional */
    assert_int_equal(base64_decode("Z", 1, out, sizeof out), -1);
    assert_int_equal(base64_decode("Zm=8", 4, out, sizeof out), -1);
    assert_int_equal(base64_decode("Zm9v!", 5, out, sizeof out), -1);
    assert_int_equal(base64_decode("Zm9", 3, out, sizeof out), -1); /* non-zero spare bits */
    assert_int_equal(base64_decode("Zm9vYmFy", 8, out, 5), -1);     /* does not fit */
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_standard_vector, setup, teardown),
        cmocka_unit_test_setup_teardown(test_standard_rotation_and_secret_forms, setup, teardown),
        cmocka_unit_test_setup_teardown(test_standard_tolerance, setup, teardown),
        cmocka_unit_test_setup_teardown(test_standard_missing_or_repeated_headers, setup, teardown),
        cmocka_unit_test_setup_teardown(test_hmac_scheme, setup, teardown),
        cmocka_unit_test_setup_teardown(test_key_sources, setup, teardown),
        cmocka_unit_test(test_config_errors),
        cmocka_unit_test(test_dump_redacts_secrets),
        cmocka_unit_test(test_base64),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
