/* test_target.c — request-target normalization and Host syntax
 * (docs/requests.md, docs/headers.md): every spelling of a path maps to one target. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "idemgate/http/target.h"

/* Normalizes s; returns the result (static) or NULL when refused. */
static const char *norm(const char *s)
{
    static char out[1024];
    const char *auth;
    size_t auth_len;
    long n = target_normalize(s, strlen(s), out, &auth, &auth_len);
    if (n < 0) return NULL;
    assert_true((size_t)n <= strlen(s) + 1);
    out[n] = '\0';
    return out;
}

static void expect(const char *in, const char *want)
{
    const char *got = norm(in);
    if (!want) {
        if (got) fail_msg("%s: expected refusal, got %s", in, got);
        return;
    }
    if (!got) fail_msg("%s: refused, expected %s", in, want);
    if (strcmp(got, want) != 0) fail_msg("%s: got %s, expected %s", in, got, want);
    /* normalizing twice changes nothing, and the fast check agrees */
    char again[1024];
    snprintf(again, sizeof(again), "%s", got);
    assert_string_equal(norm(again), again);
}

static void test_bypass_spellings_of_one_path(void **state)
{
    (void)state;
    expect("/req", "/req");
    expect("/%72eq", "/req");
    expect("/%72%65%71", "/req");
    expect("//req", "/req");
    expect("///req//", "/req/");
    expect("/./req", "/req");
    expect("/x/../req", "/req");
    expect("/x/%2e%2e/req", "/req");
    expect("/x/%2E./req", "/req");
    expect("http://a/req", "/req");
    expect("HTTP://a:8080/req?x=1", "/req?x=1");
    expect("https://a/./req", "/req");
}

static void test_dot_segments(void **state)
{
    (void)state;
    expect("/", "/");
    expect("/a/b/..", "/a/");
    expect("/a/b/.", "/a/b/");
    expect("/a/./b/../../c", "/c");
    expect("/..", NULL);
    expect("/a/../..", NULL);
    expect("/a/../../b", NULL);
    expect("/%2e%2e/etc", NULL);
    expect("/.well-known/x", "/.well-known/x");
    expect("/a..b/..c", "/a..b/..c");
    expect("/...", "/...");
}

static void test_escapes(void **state)
{
    (void)state;
    expect("/a%2Fb", "/a%2Fb"); /* an encoded slash stays encoded */
    expect("/a%2fb", "/a%2Fb"); /* with upper-case hex */
    expect("/%7E%5F%2D%2E", "/~_-.");
    expect("/%20x", "/%20x");
    expect("/%00", "/%00");
    expect("/%", NULL);
    expect("/%4", NULL);
    expect("/%zz", NULL);
    expect("/a%2", NULL);
    /* the query is kept as sent */
    expect("/a?%72=//./..", "/a?%72=//./..");
    expect("//a?b", "/a?b");
    expect("/a#frag", NULL);
    expect("/a?b#frag", NULL);
}

static void test_absolute_form(void **state)
{
    (void)state;
    const char *auth;
    size_t len;
    char out[64];
    const char *t = "http://api.example:81/v1?q";
    long n = target_normalize(t, strlen(t), out, &auth, &len);
    assert_int_equal(n, 5);
    assert_memory_equal(out, "/v1?q", 5);
    assert_int_equal(len, strlen("api.example:81"));
    assert_memory_equal(auth, "api.example:81", len);
    expect("http://a", "/");
    expect("http://a?x", "/?x");
    expect("http://user:secret@host/x", NULL);
    expect("http://@host/x", NULL);
    expect("ftp://host/x", NULL);
    expect("http:///x", NULL);
    expect("http://ho st/x", NULL);
    expect("x", NULL);
    expect("*", NULL);
    expect("", NULL);
    t = "/v1";
    target_normalize(t, 3, out, &auth, &len);
    assert_null(auth);
}

static void test_fast_check(void **state)
{
    (void)state;
    assert_true(target_is_normal("/v1/charges", 11));
    assert_true(target_is_normal("/v1?a=%20//./", 13));
    assert_false(target_is_normal("/v1/%41", 7));
    assert_false(target_is_normal("//v1", 4));
    assert_false(target_is_normal("/./v1", 5));
    assert_false(target_is_normal("/v1#x", 5));
    assert_false(target_is_normal("/v1?x#y", 7));
    assert_false(target_is_normal("http://a/", 9));
    assert_false(target_is_normal("", 0));
}

static bool host(const char *s)
{
    return target_host_valid(s, strlen(s));
}

static void test_host(void **state)
{
    (void)state;
    assert_true(host("example.com"));
    assert_true(host("example.com:8080"));
    assert_true(host("127.0.0.1:1"));
    assert_true(host("[::1]"));
    assert_true(host("[::1]:65535"));
    assert_true(host("a-b_c~d"));
    assert_true(host("xn--bcher-kva.example"));
    assert_false(host(""));
    assert_false(host(":80"));
    assert_false(host("a:"));
    assert_false(host("a:65536"));
    assert_false(host("a:123456"));
    assert_false(host("a:8x"));
    assert_false(host("a b"));
    assert_false(host("a/b"));
    assert_false(host("a@b"));
    assert_false(host("../etc"));
    assert_false(host("a..b"));
    assert_false(host("[::1"));
    assert_false(host("[::1]x"));
    assert_false(host("[]"));
    assert_false(host("a\"b"));
    char big[300];
    memset(big, 'a', sizeof(big) - 1);
    big[sizeof(big) - 1] = '\0';
    assert_false(host(big));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_bypass_spellings_of_one_path),
        cmocka_unit_test(test_dot_segments),
        cmocka_unit_test(test_escapes),
        cmocka_unit_test(test_absolute_form),
        cmocka_unit_test(test_fast_check),
        cmocka_unit_test(test_host),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
