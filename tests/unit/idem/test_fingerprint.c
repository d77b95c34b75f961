/* test_fingerprint.c — unit tests for fingerprint.c: the request
 * fingerprint, the credential scope and Idempotency-Key validation. */
#include <setjmp.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>
#include <xxhash.h>

#include "idemgate/idem/fingerprint.h"

/* ---- fingerprint ---------------------------------------------------- */

/* A mutable request with up to 4 fingerprint headers. */
struct req {
    const char *method;
    const char *target;
    size_t n;
    const char *values[4];
    size_t lens[4];
    bool present[4];
    const char *body;
    size_t body_len;
};

static struct req base_req(void)
{
    struct req r = {
        .method = "POST",
        .target = "/v1/payments?x=1",
        .n = 2,
        .values = {"application/json", "abc"},
        .lens = {16, 3},
        .present = {true, true},
        .body = "{\"amount\":10}",
        .body_len = 13,
    };
    return r;
}

static void fp_of(const struct req *r, uint8_t out[FP_LEN])
{
    struct fp_input in = {
        .method = r->method,
        .method_len = strlen(r->method),
        .target = r->target,
        .target_len = strlen(r->target),
        .n_headers = r->n,
        .header_values = r->values,
        .header_lens = r->lens,
        .present = r->present,
        .body = (const uint8_t *)r->body,
        .body_len = r->body_len,
    };
    fp_compute(&in, out);
}

static void assert_fp_differs(const struct req *a, const struct req *b)
{
    uint8_t fa[FP_LEN], fb[FP_LEN];
    fp_of(a, fa);
    fp_of(b, fb);
    assert_memory_not_equal(fa, fb, FP_LEN);
}

static void test_fp_equal_inputs_equal(void **state)
{
    (void)state;
    struct req a = base_req(), b = base_req();
    /* Same bytes at other addresses. */
    char method[] = "POST", body[] = "{\"amount\":10}";
    b.method = method;
    b.body = body;
    uint8_t fa[FP_LEN], fb[FP_LEN];
    fp_of(&a, fa);
    fp_of(&b, fb);
    assert_memory_equal(fa, fb, FP_LEN);
}

static void test_fp_method_changes_it(void **state)
{
    (void)state;
    struct req a = base_req(), b = base_req();
    b.method = "PUT";
    assert_fp_differs(&a, &b);
}

static void test_fp_target_changes_it(void **state)
{
    (void)state;
    struct req a = base_req(), b = base_req();
    b.target = "/v1/payments?x=2";
    assert_fp_differs(&a, &b);
}

static void test_fp_each_header_changes_it(void **state)
{
    (void)state;
    struct req a = base_req();
    for (size_t i = 0; i < a.n; i++) {
        struct req b = base_req();
        b.values[i] = "other";
        b.lens[i] = 5;
        assert_fp_differs(&a, &b);
    }
}

static void test_fp_absent_differs_from_empty(void **state)
{
    (void)state;
    struct req a = base_req(), b = base_req();
    a.values[1] = "";
    a.lens[1] = 0;
    b.values[1] = NULL;
    b.lens[1] = 0;
    b.present[1] = false;
    assert_fp_differs(&a, &b);
}

static void test_fp_absent_ignores_value(void **state)
{
    (void)state;
    struct req a = base_req(), b = base_req();
    a.present[0] = b.present[0] = false;
    a.values[0] = NULL;
    a.lens[0] = 0;
    uint8_t fa[FP_LEN], fb[FP_LEN];
    fp_of(&a, fa);
    fp_of(&b, fb);
    assert_memory_equal(fa, fb, FP_LEN);
}

static void test_fp_body_changes_it(void **state)
{
    (void)state;
    struct req a = base_req(), b = base_req();
    b.body = "{\"amount\":11}";
    assert_fp_differs(&a, &b);
    b = base_req();
    b.body_len = 0;
    assert_fp_differs(&a, &b);
}

static void test_fp_binary_body_with_nul(void **state)
{
    (void)state;
    struct req a = base_req(), b = base_req();
    a.body = "ab\0c";
    a.body_len = 4;
    b.body = "ab\0d";
    b.body_len = 4;
    assert_fp_differs(&a, &b);
}

static void test_fp_no_ambiguity_method_target(void **state)
{
    (void)state;
    struct req a = base_req(), b = base_req();
    a.method = "PO";
    a.target = "ST/x";
    b.method = "POS";
    b.target = "T/x";
    assert_fp_differs(&a, &b);
}

static void test_fp_no_ambiguity_header_body(void **state)
{
    (void)state;
    struct req a = base_req(), b = base_req();
    /* The body's bytes moved into the last header. */
    a.values[1] = "abc";
    a.lens[1] = 3;
    a.body = "xyz";
    a.body_len = 3;
    b.values[1] = "abcxyz";
    b.lens[1] = 6;
    b.body = "";
    b.body_len = 0;
    assert_fp_differs(&a, &b);
}

static void test_fp_no_ambiguity_between_headers(void **state)
{
    (void)state;
    struct req a = base_req(), b = base_req();
    a.values[0] = "ab";
    a.lens[0] = 2;
    a.values[1] = "c";
    a.lens[1] = 1;
    b.values[0] = "a";
    b.lens[0] = 1;
    b.values[1] = "bc";
    b.lens[1] = 2;
    assert_fp_differs(&a, &b);
}

static void test_fp_no_ambiguity_header_count(void **state)
{
    (void)state;
    /* One header absent vs no header configured at all. */
    struct req a = base_req(), b = base_req();
    a.n = 0;
    b.n = 1;
    b.present[0] = false;
    assert_fp_differs(&a, &b);
}

static void test_fp_incremental_equals_compute(void **state)
{
    (void)state;
    struct req r = base_req();
    r.present[1] = false;
    uint8_t want[FP_LEN], got[FP_LEN];
    fp_of(&r, want);
    struct fp_state *st = fp_begin();
    fp_part(st, "POST", 4);
    fp_part(st, r.target, strlen(r.target));
    fp_flag(st, true);
    fp_part(st, r.values[0], r.lens[0]);
    fp_flag(st, false);
    fp_part(st, NULL, 0);
    fp_part(st, r.body, r.body_len);
    fp_end(st, got);
    assert_memory_equal(want, got, FP_LEN);
}

static void put_be64(uint8_t *p, uint64_t v)
{
    for (int i = 0; i < 8; i++)
        p[i] = (uint8_t)(v >> (8 * (7 - i)));
}

/* The documented encoding, hashed one-shot with the library's own
 * canonical (big-endian) form: pins the byte layout and output order. */
static void test_fp_matches_documented_encoding(void **state)
{
    (void)state;
    struct req r = base_req();
    r.n = 1;
    r.values[0] = "text/plain";
    r.lens[0] = 10;
    uint8_t enc[256];
    size_t n = 0;
    const char *parts[] = {r.method, r.target};
    for (int i = 0; i < 2; i++) {
        put_be64(enc + n, strlen(parts[i]));
        memcpy(enc + n + 8, parts[i], strlen(parts[i]));
        n += 8 + strlen(parts[i]);
    }
    enc[n++] = 1;
    put_be64(enc + n, 10);
    memcpy(enc + n + 8, "text/plain", 10);
    n += 18;
    put_be64(enc + n, r.body_len);
    memcpy(enc + n + 8, r.body, r.body_len);
    n += 8 + r.body_len;

    XXH128_canonical_t want;
    XXH128_canonicalFromHash(&want, XXH3_128bits(enc, n));
    uint8_t got[FP_LEN];
    fp_of(&r, got);
    assert_memory_equal(got, &want, FP_LEN);
}

/* Fingerprints are stored, so the function must never change across
 * versions: frozen known answers (produced by this code, cross-checked
 * against the one-shot hash by the test above). */
static void test_fp_known_answers(void **state)
{
    (void)state;
    static const uint8_t want_empty[FP_LEN] = {0x10, 0xe4, 0x5c, 0x7c, 0xe2, 0x29, 0x23, 0x20,
                                               0x74, 0x3d, 0xf9, 0x4e, 0xe4, 0xc7, 0x8a, 0x2a};
    static const uint8_t want_req[FP_LEN] = {0xa4, 0xff, 0x35, 0x10, 0x6d, 0x59, 0x78, 0x8a,
                                             0x15, 0x88, 0xa8, 0x71, 0xe0, 0x25, 0x4e, 0x2b};
    struct fp_input in = {"", 0, "", 0, 0, NULL, NULL, NULL, NULL, 0};
    uint8_t got[FP_LEN];
    fp_compute(&in, got);
    assert_memory_equal(got, want_empty, FP_LEN);
    uint8_t zeros[24] = {0}; /* three empty parts, one shot */
    XXH128_canonical_t one_shot;
    XXH128_canonicalFromHash(&one_shot, XXH3_128bits(zeros, sizeof(zeros)));
    assert_memory_equal(&one_shot, want_empty, FP_LEN);

    struct req r = base_req();
    r.present[1] = false;
    fp_of(&r, got);
    assert_memory_equal(got, want_req, FP_LEN);
}

/* ---- scope ---------------------------------------------------------- */

static void test_scope_sha256_known_answer(void **state)
{
    (void)state;
    char out[SCOPE_HEX_LEN + 1];
    /* printf %s 'Bearer abc123' | openssl dgst -sha256 */
    scope_hash("", 0, "Bearer abc123", 13, out);
    assert_string_equal(out, "c84d069b7e1ea6892cf9bbcfd322631d51e55ca33e3d38addafc3a7c9b25210c");
    scope_hash(NULL, 0, "", 0, out);
    assert_string_equal(out, "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
}

static void test_scope_hmac_known_answer(void **state)
{
    (void)state;
    char out[SCOPE_HEX_LEN + 1];
    /* printf %s 'Bearer abc123' | openssl dgst -sha256 -hmac s3cret */
    scope_hash("s3cret", 6, "Bearer abc123", 13, out);
    assert_string_equal(out, "effd69aceeb28d43369fb27c3a2278a555ea70ecf5ef67fe5e30d518fe77f5ef");
    /* RFC 4231 test case 2 */
    scope_hash("Jefe", 4, "what do ya want for nothing?", 28, out);
    assert_string_equal(out, "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843");
}

static void test_scope_secret_changes_it(void **state)
{
    (void)state;
    char a[SCOPE_HEX_LEN + 1], b[SCOPE_HEX_LEN + 1], c[SCOPE_HEX_LEN + 1];
    scope_hash("s3cret", 6, "Bearer abc123", 13, a);
    scope_hash("other", 5, "Bearer abc123", 13, b);
    scope_hash("", 0, "Bearer abc123", 13, c);
    assert_string_not_equal(a, b);
    assert_string_not_equal(a, c);
    assert_string_equal(b, "f42574b1e414558c8bfb120e2a96cbc32935bba195631da91a52801eb4925162");
}

static void test_scope_credential_changes_it(void **state)
{
    (void)state;
    char a[SCOPE_HEX_LEN + 1], b[SCOPE_HEX_LEN + 1];
    scope_hash("k", 1, "Bearer abc123", 13, a);
    scope_hash("k", 1, "Bearer abc124", 13, b);
    assert_string_not_equal(a, b);
    assert_int_equal(strlen(a), SCOPE_HEX_LEN);
}

/* ---- Idempotency-Key ------------------------------------------------ */

#define KEY_MAX 255

/* Parses in[0..n) into a buffer of exactly n + 1 bytes (so ASan catches an
 * overrun); on success *key (caller frees) holds it. */
static int parse_n(const char *in, size_t n, size_t max_len, char **key, size_t *key_len)
{
    char *out = malloc(n + 1);
    assert_non_null(out);
    int rc = idem_key_parse(in, n, max_len, out, key_len);
    if (rc == 0) {
        assert_int_equal(strlen(out), *key_len);
        *key = out;
    } else {
        assert_int_equal(*key_len, 0);
        free(out);
        *key = NULL;
    }
    return rc;
}

static void assert_key(const char *in, const char *want)
{
    char *key;
    size_t len;
    assert_int_equal(parse_n(in, strlen(in), KEY_MAX, &key, &len), 0);
    assert_int_equal(len, strlen(want));
    assert_string_equal(key, want);
    free(key);
}

static void assert_key_invalid_n(const char *in, size_t n, size_t max_len)
{
    char *key;
    size_t len;
    assert_int_equal(parse_n(in, n, max_len, &key, &len), -1);
}

static void assert_key_invalid(const char *in)
{
    assert_key_invalid_n(in, strlen(in), KEY_MAX);
}

static void test_key_plain_valid(void **state)
{
    (void)state;
    assert_key("8e03978e-40d5-43e8-bc93-6894a57f9324", "8e03978e-40d5-43e8-bc93-6894a57f9324");
    assert_key("a", "a");
    assert_key("!~", "!~");
    assert_key("ab\"cd", "ab\"cd"); /* a quote not first: plain visible ASCII */
    assert_key("abc\\", "abc\\");
}

static void test_key_quoted_unquoted(void **state)
{
    (void)state;
    assert_key("\"abc\"", "abc");
    assert_key("\"8e03978e-40d5-43e8-bc93-6894a57f9324\"", "8e03978e-40d5-43e8-bc93-6894a57f9324");
}

static void test_key_quoted_equals_plain(void **state)
{
    (void)state;
    char *a, *b;
    size_t la, lb;
    assert_int_equal(parse_n("\"abc\"", 5, KEY_MAX, &a, &la), 0);
    assert_int_equal(parse_n("abc", 3, KEY_MAX, &b, &lb), 0);
    assert_int_equal(la, lb);
    assert_memory_equal(a, b, la);
    free(a);
    free(b);
}

static void test_key_escapes(void **state)
{
    (void)state;
    assert_key("\"a\\\"b\"", "a\"b");
    assert_key("\"a\\\\b\"", "a\\b");
    assert_key("\"\\\\\"", "\\");
    assert_key("\"\\\"\"", "\"");
}

static void test_key_invalid_empty(void **state)
{
    (void)state;
    assert_key_invalid("");
    assert_key_invalid("\"\"");
}

static void test_key_length_boundary(void **state)
{
    (void)state;
    char in[KEY_MAX + 3];
    memset(in, 'k', sizeof(in));
    char *key;
    size_t len;
    assert_int_equal(parse_n(in, KEY_MAX, KEY_MAX, &key, &len), 0);
    assert_int_equal(len, KEY_MAX);
    free(key);
    assert_key_invalid_n(in, KEY_MAX + 1, KEY_MAX);
    assert_key_invalid_n(in, 2, 1);
}

static void test_key_quoted_length_boundary(void **state)
{
    (void)state;
    /* The limit applies to the unquoted key, not the header value. */
    char in[KEY_MAX + 3];
    memset(in, 'k', sizeof(in));
    in[0] = '"';
    in[KEY_MAX + 1] = '"';
    char *key;
    size_t len;
    assert_int_equal(parse_n(in, KEY_MAX + 2, KEY_MAX, &key, &len), 0);
    assert_int_equal(len, KEY_MAX);
    free(key);
    assert_key_invalid_n(in, KEY_MAX + 2, KEY_MAX - 1);
}

static void test_key_invalid_bytes(void **state)
{
    (void)state;
    assert_key_invalid("a b");
    assert_key_invalid(" ab");
    assert_key_invalid("a\tb");
    assert_key_invalid("a\x7f");
    assert_key_invalid("a\x80");
    assert_key_invalid("\xff");
    assert_key_invalid_n("a\0b", 3, KEY_MAX);
    assert_key_invalid("a\r\n");
}

static void test_key_invalid_bytes_quoted(void **state)
{
    (void)state;
    assert_key_invalid("\"a b\""); /* legal sf-string, but a space is no key byte */
    assert_key_invalid("\"a\tb\"");
    assert_key_invalid("\"a\x7f\"");
    assert_key_invalid("\"a\x80\"");
    assert_key_invalid_n("\"a\0b\"", 5, KEY_MAX);
}

static void test_key_invalid_quoting(void **state)
{
    (void)state;
    assert_key_invalid("\"");         /* bare quote */
    assert_key_invalid("\"abc");      /* unterminated */
    assert_key_invalid("\"abc\\\"");  /* closing quote escaped */
    assert_key_invalid("\"a\\nb\"");  /* bad escape */
    assert_key_invalid("\"a\\x\"");   /* bad escape */
    assert_key_invalid("\"ab\"cd\""); /* quote in the middle */
    assert_key_invalid("\"ab\"cd");   /* text after the closing quote */
    assert_key_invalid("\"abc\" ");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_fp_equal_inputs_equal),
        cmocka_unit_test(test_fp_method_changes_it),
        cmocka_unit_test(test_fp_target_changes_it),
        cmocka_unit_test(test_fp_each_header_changes_it),
        cmocka_unit_test(test_fp_absent_differs_from_empty),
        cmocka_unit_test(test_fp_absent_ignores_value),
        cmocka_unit_test(test_fp_body_changes_it),
        cmocka_unit_test(test_fp_binary_body_with_nul),
        cmocka_unit_test(test_fp_no_ambiguity_method_target),
        cmocka_unit_test(test_fp_no_ambiguity_header_body),
        cmocka_unit_test(test_fp_no_ambiguity_between_headers),
        cmocka_unit_test(test_fp_no_ambiguity_header_count),
        cmocka_unit_test(test_fp_incremental_equals_compute),
        cmocka_unit_test(test_fp_matches_documented_encoding),
        cmocka_unit_test(test_fp_known_answers),
        cmocka_unit_test(test_scope_sha256_known_answer),
        cmocka_unit_test(test_scope_hmac_known_answer),
        cmocka_unit_test(test_scope_secret_changes_it),
        cmocka_unit_test(test_scope_credential_changes_it),
        cmocka_unit_test(test_key_plain_valid),
        cmocka_unit_test(test_key_quoted_unquoted),
        cmocka_unit_test(test_key_quoted_equals_plain),
        cmocka_unit_test(test_key_escapes),
        cmocka_unit_test(test_key_invalid_empty),
        cmocka_unit_test(test_key_length_boundary),
        cmocka_unit_test(test_key_quoted_length_boundary),
        cmocka_unit_test(test_key_invalid_bytes),
        cmocka_unit_test(test_key_invalid_bytes_quoted),
        cmocka_unit_test(test_key_invalid_quoting),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
