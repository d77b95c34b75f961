/* test_http1.c — unit tests for the HTTP/1.1 head parser, header helpers and
 * chunked decoder (http1.c): every strictness rule, framing decisions, and
 * incremental behaviour at every split point. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "idemgate/http/http1.h"

#define MAX_HEAD 65536

static struct http1_head H;

static long req(const char *s)
{
    return http1_parse_request(s, strlen(s), MAX_HEAD, &H);
}

static long resp(const char *s, bool head_request)
{
    return http1_parse_response(s, strlen(s), MAX_HEAD, head_request, &H);
}

static bool slice_eq(struct http1_slice s, const char *want)
{
    return s.n == strlen(want) && memcmp(s.p, want, s.n) == 0;
}

/* A request with one extra header line (no CRLF) between Host and the end.
 * The buffer is static: H's slices point into it after the call. */
static long req_with(const char *line)
{
    static char b[1024];
    snprintf(b, sizeof(b), "POST /x HTTP/1.1\r\nHost: a\r\n%s\r\n\r\n", line);
    return req(b);
}

static long resp_with(const char *line)
{
    static char b[1024];
    snprintf(b, sizeof(b), "HTTP/1.1 200 OK\r\n%s\r\n\r\n", line);
    return resp(b, false);
}

/* ---- positive request cases ---------------------------------------------- */

static void test_simple_get(void **state)
{
    (void)state;
    const char *s = "GET /a?b=c HTTP/1.1\r\nHost: example.com\r\nX-Pad:  \t v a l \t \r\n"
                    "Empty:\r\n\r\n";
    long n = req(s);
    assert_int_equal(n, (long)strlen(s));
    assert_true(slice_eq(H.method, "GET"));
    assert_true(slice_eq(H.target, "/a?b=c"));
    assert_int_equal(H.minor_version, 1);
    assert_true(H.keep_alive);
    assert_false(H.expect_continue);
    assert_int_equal(H.body, HTTP1_BODY_NONE);
    assert_int_equal(H.n_headers, 3);
    assert_true(slice_eq(H.headers[0].name, "Host"));
    assert_true(slice_eq(H.headers[0].value, "example.com"));
    assert_true(slice_eq(H.headers[1].value, "v a l"));
    assert_true(slice_eq(H.headers[2].name, "Empty"));
    assert_int_equal(H.headers[2].value.n, 0);
    /* zero copy: slices point into the input */
    assert_ptr_equal(H.method.p, s);
    assert_ptr_equal(H.headers[0].name.p, s + 21);
}

static void test_post_content_length(void **state)
{
    (void)state;
    assert_true(req_with("Content-Length: 42") > 0);
    assert_int_equal(H.body, HTTP1_BODY_LENGTH);
    assert_int_equal(H.content_length, 42);
    assert_true(req_with("content-length:  0 ") > 0);
    assert_int_equal(H.body, HTTP1_BODY_LENGTH);
    assert_int_equal(H.content_length, 0);
    assert_true(req_with("Content-Length: 9999999999999999999") > 0);
    assert_int_equal(H.content_length, 9999999999999999999ULL);
}

static void test_chunked_request(void **state)
{
    (void)state;
    assert_true(req_with("Transfer-Encoding: chunked") > 0);
    assert_int_equal(H.body, HTTP1_BODY_CHUNKED);
    assert_true(req_with("transfer-encoding: ChUnKeD") > 0);
    assert_int_equal(H.body, HTTP1_BODY_CHUNKED);
}

static void test_keep_alive_rules(void **state)
{
    (void)state;
    assert_true(req("GET / HTTP/1.1\r\nHost: a\r\n\r\n") > 0);
    assert_true(H.keep_alive);
    assert_true(req("GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n") > 0);
    assert_false(H.keep_alive);
    assert_true(req("GET / HTTP/1.1\r\nHost: a\r\nConnection: x-foo, CLOSE \r\n\r\n") > 0);
    assert_false(H.keep_alive);
    assert_true(req("GET / HTTP/1.1\r\nConnection: x\r\nHost: a\r\nConnection: close\r\n\r\n") > 0);
    assert_false(H.keep_alive);
    assert_true(req("GET / HTTP/1.1\r\nHost: a\r\nConnection: closed\r\n\r\n") > 0);
    assert_true(H.keep_alive);
    assert_true(req("GET / HTTP/1.0\r\n\r\n") > 0);
    assert_int_equal(H.minor_version, 0);
    assert_false(H.keep_alive);
    assert_true(req("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n") > 0);
    assert_true(H.keep_alive);
    assert_true(req("GET / HTTP/1.0\r\nConnection: te,keep-alive\r\n\r\n") > 0);
    assert_true(H.keep_alive);
    assert_true(req("GET / HTTP/1.0\r\nConnection: keep-alive, close\r\n\r\n") > 0);
    assert_false(H.keep_alive);
}

static void test_expect_continue(void **state)
{
    (void)state;
    assert_true(req_with("Expect: 100-Continue") > 0);
    assert_true(H.expect_continue);
    assert_true(req_with("Expect: 200-ok") > 0);
    assert_false(H.expect_continue);
    assert_true(req("POST / HTTP/1.0\r\nExpect: 100-continue\r\n\r\n") > 0);
    assert_false(H.expect_continue); /* RFC 9110 10.1.1: ignored for HTTP/1.0 */
}

static void test_pipelined_not_consumed(void **state)
{
    (void)state;
    const char *a = "GET /1 HTTP/1.1\r\nHost: a\r\n\r\n";
    char b[256];
    snprintf(b, sizeof(b), "%sGET /2 HTTP/1.1\r\nHost: a\r\n\r\n", a);
    assert_int_equal(req(b), (long)strlen(a));
    assert_true(slice_eq(H.target, "/1"));
    /* a body after the head is not consumed either */
    snprintf(b, sizeof(b), "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello");
    assert_int_equal(req(b), (long)strlen(b) - 5);
}

static void test_incomplete_every_prefix(void **state)
{
    (void)state;
    const char *s = "\r\nPOST /p HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nX: y\r\n\r\n";
    size_t len = strlen(s);
    for (size_t i = 0; i < len; i++) {
        char *copy = malloc(i + 1); /* exact size so overreads are caught */
        memcpy(copy, s, i);
        assert_int_equal(http1_parse_request(copy, i, MAX_HEAD, &H), HTTP1_INCOMPLETE);
        free(copy);
    }
    assert_int_equal(req(s), (long)len);
    const char *r = "HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n";
    for (size_t i = 0; i < strlen(r); i++)
        assert_int_equal(http1_parse_response(r, i, MAX_HEAD, false, &H), HTTP1_INCOMPLETE);
}

static void test_max_head_boundary(void **state)
{
    (void)state;
    const char *s = "GET / HTTP/1.1\r\nHost: a\r\n\r\n";
    size_t len = strlen(s);
    assert_int_equal(http1_parse_request(s, len, len, &H), (long)len);
    assert_int_equal(http1_parse_request(s, len, len - 1, &H), HTTP1_ETOOLARGE);
    /* incomplete below the limit, too large once the limit is reached */
    assert_int_equal(http1_parse_request(s, len - 1, len, &H), HTTP1_INCOMPLETE);
    assert_int_equal(http1_parse_request(s, len - 1, len - 1, &H), HTTP1_ETOOLARGE);
    assert_int_equal(http1_parse_request(s, 10, 10, &H), HTTP1_ETOOLARGE);
    assert_int_equal(http1_parse_request(s, 10, 11, &H), HTTP1_INCOMPLETE);
    /* bytes past max_head are not looked at */
    char b[64];
    snprintf(b, sizeof(b), "%sGET", s);
    assert_int_equal(http1_parse_request(b, strlen(b), len, &H), (long)len);
    assert_int_equal(http1_parse_response("HTTP/1.1 200 OK\r\n", 17, 17, false, &H),
                     HTTP1_ETOOLARGE);
}

static size_t build_headers(char *b, size_t cap, int n_extra)
{
    size_t off = (size_t)snprintf(b, cap, "GET / HTTP/1.1\r\nHost: a\r\n");
    for (int i = 0; i < n_extra; i++)
        off += (size_t)snprintf(b + off, cap - off, "X-H%d: %d\r\n", i, i);
    off += (size_t)snprintf(b + off, cap - off, "\r\n");
    return off;
}

static void test_header_count_limit(void **state)
{
    (void)state;
    static char b[8192];
    size_t n = build_headers(b, sizeof(b), HTTP1_MAX_HEADERS - 1);
    assert_int_equal(http1_parse_request(b, n, MAX_HEAD, &H), (long)n);
    assert_int_equal(H.n_headers, HTTP1_MAX_HEADERS);
    assert_true(slice_eq(H.headers[99].name, "X-H98"));
    n = build_headers(b, sizeof(b), HTTP1_MAX_HEADERS);
    assert_int_equal(http1_parse_request(b, n, MAX_HEAD, &H), HTTP1_ETOOMANY);
    /* already known before the head is complete */
    assert_int_equal(http1_parse_request(b, n - 2, MAX_HEAD, &H), HTTP1_ETOOMANY);
}

static void test_leading_crlf(void **state)
{
    (void)state;
    assert_int_equal(req("\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n"), 31);
    assert_true(slice_eq(H.method, "GET"));
    assert_true(req("\r\n\r\n\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n") > 0);
    assert_int_equal(req("\r\n\r\n\r\n\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n"), HTTP1_EBAD);
    assert_int_equal(req("\nGET / HTTP/1.1\r\nHost: a\r\n\r\n"), HTTP1_EBAD);
    assert_int_equal(req("\r\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n"), HTTP1_EBAD);
    assert_int_equal(req("\r\n\r\n"), HTTP1_INCOMPLETE);
    /* responses get no such leniency */
    assert_int_equal(resp("\r\nHTTP/1.1 200 OK\r\n\r\n", false), HTTP1_EBAD);
}

static void test_obs_text_and_tab_in_value(void **state)
{
    (void)state;
    assert_true(req_with("X: a\tb \x80\xff") > 0);
    assert_true(slice_eq(H.headers[1].value, "a\tb \x80\xff"));
    assert_true(req_with("X: !\"#$%&'()*+,-./09:;<=>?@AZ[\\]^_`az{|}~") > 0);
}

/* ---- request rejections -------------------------------------------------- */

static void test_reject_cl_and_te(void **state)
{
    (void)state;
    assert_int_equal(req_with("Content-Length: 5\r\nTransfer-Encoding: chunked"), HTTP1_EBAD);
    assert_int_equal(req_with("Transfer-Encoding: chunked\r\nContent-Length: 5"), HTTP1_EBAD);
    assert_int_equal(resp_with("Transfer-Encoding: chunked\r\nContent-Length: 5"), HTTP1_EBAD);
}

static void test_reject_bad_content_length(void **state)
{
    (void)state;
    assert_int_equal(req_with("Content-Length: 5\r\nContent-Length: 5"), HTTP1_EBAD);
    assert_int_equal(req_with("Content-Length: 5, 5"), HTTP1_EBAD);
    assert_int_equal(req_with("Content-Length: 5,5"), HTTP1_EBAD);
    assert_int_equal(req_with("Content-Length: +5"), HTTP1_EBAD);
    assert_int_equal(req_with("Content-Length: -1"), HTTP1_EBAD);
    assert_int_equal(req_with("Content-Length: 5a"), HTTP1_EBAD);
    assert_int_equal(req_with("Content-Length: 0x5"), HTTP1_EBAD);
    assert_int_equal(req_with("Content-Length: 5 5"), HTTP1_EBAD);
    assert_int_equal(req_with("Content-Length:"), HTTP1_EBAD);
    assert_int_equal(req_with("Content-Length: 10000000000000000000"), HTTP1_EBAD);
    assert_int_equal(req_with("Content-Length: 99999999999999999999999"), HTTP1_EBAD);
    assert_int_equal(resp_with("Content-Length: 1\r\nContent-Length: 1"), HTTP1_EBAD);
    assert_int_equal(resp_with("Content-Length: x"), HTTP1_EBAD);
}

static void test_reject_transfer_encoding(void **state)
{
    (void)state;
    assert_int_equal(req_with("Transfer-Encoding: gzip"), HTTP1_EBAD);
    assert_int_equal(req_with("Transfer-Encoding: chunked, gzip"), HTTP1_EBAD);
    assert_int_equal(req_with("Transfer-Encoding: gzip, chunked"), HTTP1_ENOTIMPL);
    assert_int_equal(req_with("Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked"),
                     HTTP1_ENOTIMPL);
    assert_int_equal(req_with("Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked"),
                     HTTP1_EBAD);
    assert_int_equal(req_with("Transfer-Encoding: chunked, chunked"), HTTP1_EBAD);
    assert_int_equal(req_with("Transfer-Encoding: chunked,"), HTTP1_EBAD);
    assert_int_equal(req_with("Transfer-Encoding: ,chunked"), HTTP1_EBAD);
    assert_int_equal(req_with("Transfer-Encoding:"), HTTP1_EBAD);
    /* A well-formed coding we do not know is 501 (RFC 9110 6.1). */
    assert_int_equal(req_with("Transfer-Encoding: chunkedx"), HTTP1_ENOTIMPL);
    assert_int_equal(req_with("Transfer-Encoding: gzip2"), HTTP1_ENOTIMPL);
    assert_int_equal(req_with("Transfer-Encoding: \"chunked\""), HTTP1_EBAD);
    assert_int_equal(req("POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n"), HTTP1_EBAD);
}

static void test_reject_obs_fold(void **state)
{
    (void)state;
    assert_int_equal(req_with("X: a\r\n b"), HTTP1_EBAD);
    assert_int_equal(req_with("X: a\r\n\tb"), HTTP1_EBAD);
    assert_int_equal(req("GET / HTTP/1.1\r\n Host: a\r\n\r\n"), HTTP1_EBAD);
}

static void test_reject_bare_cr_lf(void **state)
{
    (void)state;
    assert_int_equal(req_with("X: a\rb"), HTTP1_EBAD);
    assert_int_equal(req_with("X: a\r"), HTTP1_EBAD);
    assert_int_equal(req_with("X\r: a"), HTTP1_EBAD);
    assert_int_equal(req("GET /\r HTTP/1.1\r\nHost: a\r\n\r\n"), HTTP1_EBAD);
    assert_int_equal(req("GET / HTTP/1.1\r\r\nHost: a\r\n\r\n"), HTTP1_EBAD);
    assert_int_equal(req_with("X: a\nY: b"), HTTP1_EBAD);
    assert_int_equal(req("GET / HTTP/1.1\nHost: a\r\n\r\n"), HTTP1_EBAD);
    assert_int_equal(req("GET / HTTP/1.1\r\nHost: a\r\n\n"), HTTP1_EBAD);
    assert_int_equal(req("GET / HTTP/1.1\r\nHost: a\n\r\n"), HTTP1_EBAD);
    assert_int_equal(req("GET / HTTP/1.1\n\n"), HTTP1_EBAD);
    /* a bare LF is refused without waiting for the rest of the head */
    assert_int_equal(req("GET / HTTP/1.1\nHo"), HTTP1_EBAD);
    assert_int_equal(resp("HTTP/1.1 200 OK\nX: y\r\n\r\n", false), HTTP1_EBAD);
    assert_int_equal(resp("HTTP/1.1 200 O\rK\r\n\r\n", false), HTTP1_EBAD);
}

static void test_reject_space_before_colon(void **state)
{
    (void)state;
    assert_int_equal(req_with("X-Foo : a"), HTTP1_EBAD);
    assert_int_equal(req_with("X-Foo\t: a"), HTTP1_EBAD);
    assert_int_equal(req("GET / HTTP/1.1\r\nHost : a\r\n\r\n"), HTTP1_EBAD);
    assert_int_equal(resp_with("Content-Length : 5"), HTTP1_EBAD);
}

static void test_reject_bad_header_name(void **state)
{
    (void)state;
    assert_int_equal(req_with(": a"), HTTP1_EBAD);
    assert_int_equal(req_with("X(y): a"), HTTP1_EBAD);
    assert_int_equal(req_with("X/y: a"), HTTP1_EBAD);
    assert_int_equal(req_with("X@y: a"), HTTP1_EBAD);
    assert_int_equal(req_with("H\xc3\xa9: a"), HTTP1_EBAD);
    assert_int_equal(req_with("No-colon"), HTTP1_EBAD);
    assert_int_equal(req_with("X\x01y: a"), HTTP1_EBAD);
    assert_true(req_with("!#$%&'*+-.^_`|~09azAZ: a") > 0);
}

static void test_reject_bad_method(void **state)
{
    (void)state;
    assert_int_equal(req(" / HTTP/1.1\r\nHost: a\r\n\r\n"), HTTP1_EBAD);
    assert_int_equal(req("GE(T / HTTP/1.1\r\nHost: a\r\n\r\n"), HTTP1_EBAD);
    assert_int_equal(req("GE\x01T / HTTP/1.1\r\nHost: a\r\n\r\n"), HTTP1_EBAD);
    assert_int_equal(req("G\xc3\x89T / HTTP/1.1\r\nHost: a\r\n\r\n"), HTTP1_EBAD);
    assert_int_equal(req("GET\t/ HTTP/1.1\r\nHost: a\r\n\r\n"), HTTP1_EBAD);
    assert_true(req("M-SEARCH * HTTP/1.1\r\nHost: a\r\n\r\n") > 0);
    assert_true(slice_eq(H.target, "*"));
}

static void test_reject_value_controls(void **state)
{
    (void)state;
    static const char bad[] = {0x00, 0x01, 0x08, 0x0b, 0x0c, 0x1b, 0x1f, 0x7f};
    for (size_t i = 0; i < sizeof(bad); i++) {
        char b[128];
        int n = snprintf(b, sizeof(b), "GET / HTTP/1.1\r\nHost: a\r\nX: ab");
        b[n + 1] = 'c'; /* "ab" <ctl> "c" */
        b[n] = bad[i];
        memcpy(b + n + 2, "\r\n\r\n", 4);
        assert_int_equal(http1_parse_request(b, (size_t)n + 6, MAX_HEAD, &H), HTTP1_EBAD);
        /* also in a long value, past the word-at-a-time fast path */
        n = snprintf(b, sizeof(b), "GET / HTTP/1.1\r\nHost: a\r\nX: 0123456789abcdefghij");
        b[n - 12] = bad[i];
        memcpy(b + n, "\r\n\r\n", 4);
        assert_int_equal(http1_parse_request(b, (size_t)n + 4, MAX_HEAD, &H), HTTP1_EBAD);
    }
}

static void test_reject_bad_target(void **state)
{
    (void)state;
    assert_int_equal(req("GET /a b HTTP/1.1\r\nHost: a\r\n\r\n"), HTTP1_EBAD);
    assert_int_equal(req("GET  / HTTP/1.1\r\nHost: a\r\n\r\n"), HTTP1_EBAD);
    assert_int_equal(req("GET / HTTP/1.1 \r\nHost: a\r\n\r\n"), HTTP1_EBAD);
    assert_int_equal(req("GET /a\tb HTTP/1.1\r\nHost: a\r\n\r\n"), HTTP1_EBAD);
    assert_int_equal(req("GET /a\x01 HTTP/1.1\r\nHost: a\r\n\r\n"), HTTP1_EBAD);
    assert_int_equal(req("GET /a\x7f HTTP/1.1\r\nHost: a\r\n\r\n"), HTTP1_EBAD);
    assert_int_equal(req("GET /\x80 HTTP/1.1\r\nHost: a\r\n\r\n"), HTTP1_EBAD);
    assert_int_equal(req("GET /\xff HTTP/1.1\r\nHost: a\r\n\r\n"), HTTP1_EBAD);
    assert_int_equal(req("GET /\r\nHost: a\r\n\r\n"), HTTP1_EBAD);
    assert_int_equal(req("GET\r\nHost: a\r\n\r\n"), HTTP1_EBAD);
}

static void test_reject_version(void **state)
{
    (void)state;
    assert_int_equal(req("GET / HTTP/2.0\r\nHost: a\r\n\r\n"), HTTP1_EVERSION);
    assert_int_equal(req("GET / HTTP/0.9\r\nHost: a\r\n\r\n"), HTTP1_EVERSION);
    assert_int_equal(req("GET / HTTP/1.2\r\nHost: a\r\n\r\n"), HTTP1_EVERSION);
    assert_int_equal(req("GET / HTTP/1.10\r\nHost: a\r\n\r\n"), HTTP1_EBAD);
    assert_int_equal(req("GET / http/1.1\r\nHost: a\r\n\r\n"), HTTP1_EBAD);
    assert_int_equal(req("GET / HTTP/1\r\nHost: a\r\n\r\n"), HTTP1_EBAD);
    assert_int_equal(req("GET / HTTP/a.b\r\nHost: a\r\n\r\n"), HTTP1_EBAD);
    assert_int_equal(resp("HTTP/2.0 200 OK\r\n\r\n", false), HTTP1_EVERSION);
    assert_int_equal(resp("HTTP/1.2 200 OK\r\n\r\n", false), HTTP1_EVERSION);
    assert_int_equal(resp("HTTP/1.1200 OK\r\n\r\n", false), HTTP1_EBAD);
    assert_int_equal(resp("HTTP/1 200 OK\r\n\r\n", false), HTTP1_EBAD);
    assert_int_equal(resp("ICY 200 OK\r\n\r\n", false), HTTP1_EBAD);
}

static void test_reject_too_large(void **state)
{
    (void)state;
    static char b[4096];
    size_t n = build_headers(b, sizeof(b), 40);
    assert_int_equal(http1_parse_request(b, n, n - 1, &H), HTTP1_ETOOLARGE);
    assert_int_equal(http1_parse_request(b, n, 100, &H), HTTP1_ETOOLARGE);
    assert_int_equal(http1_parse_request(b, 100, 100, &H), HTTP1_ETOOLARGE);
    assert_int_equal(http1_parse_request(b, 99, 100, &H), HTTP1_INCOMPLETE);
    assert_int_equal(http1_parse_request(b, n, n, &H), (long)n);
}

static void test_host_rules(void **state)
{
    (void)state;
    assert_int_equal(req("GET / HTTP/1.1\r\n\r\n"), HTTP1_EBAD);
    assert_int_equal(req("GET / HTTP/1.1\r\nX: y\r\n\r\n"), HTTP1_EBAD);
    assert_int_equal(req("GET / HTTP/1.1\r\nHost: a\r\nhost: a\r\n\r\n"), HTTP1_EBAD);
    assert_int_equal(req("GET / HTTP/1.0\r\nHost: a\r\nHost: b\r\n\r\n"), HTTP1_EBAD);
    assert_true(req("GET / HTTP/1.0\r\n\r\n") > 0);
    assert_true(req("GET / HTTP/1.1\r\nHOST:\r\n\r\n") > 0);
}

/* ---- responses ----------------------------------------------------------- */

static void test_response_length(void **state)
{
    (void)state;
    const char *s = "HTTP/1.1 200 OK\r\nContent-Length: 12\r\nServer: x\r\n\r\nhello world!";
    assert_int_equal(resp(s, false), (long)strlen(s) - 12);
    assert_int_equal(H.status, 200);
    assert_true(slice_eq(H.reason, "OK"));
    assert_int_equal(H.body, HTTP1_BODY_LENGTH);
    assert_int_equal(H.content_length, 12);
    assert_true(H.keep_alive);
    assert_int_equal(H.n_headers, 2);
}

static void test_response_no_body(void **state)
{
    (void)state;
    assert_true(resp("HTTP/1.1 204 No Content\r\n\r\n", false) > 0);
    assert_int_equal(H.body, HTTP1_BODY_NONE);
    assert_true(H.keep_alive);
    assert_true(resp("HTTP/1.1 304 Not Modified\r\nContent-Length: 100\r\n\r\n", false) > 0);
    assert_int_equal(H.body, HTTP1_BODY_NONE);
    assert_true(resp("HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n", true) > 0);
    assert_int_equal(H.body, HTTP1_BODY_NONE);
    assert_true(resp("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", true) > 0);
    assert_int_equal(H.body, HTTP1_BODY_NONE);
    assert_true(resp("HTTP/1.1 200 OK\r\n\r\n", true) > 0);
    assert_int_equal(H.body, HTTP1_BODY_NONE);
    assert_true(H.keep_alive);
    assert_true(resp("HTTP/1.1 100 Continue\r\n\r\n", false) > 0);
    assert_int_equal(H.status, 100);
    assert_int_equal(H.body, HTTP1_BODY_NONE);
    assert_true(resp("HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n", false) > 0);
    assert_int_equal(H.body, HTTP1_BODY_NONE);
    assert_true(resp("HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n", false) > 0);
    assert_int_equal(H.body, HTTP1_BODY_NONE);
}

static void test_response_chunked_and_close(void **state)
{
    (void)state;
    assert_true(resp_with("Transfer-Encoding: chunked") > 0);
    assert_int_equal(H.body, HTTP1_BODY_CHUNKED);
    assert_true(H.keep_alive);
    assert_true(resp("HTTP/1.1 200 OK\r\nX: y\r\n\r\n", false) > 0);
    assert_int_equal(H.body, HTTP1_BODY_CLOSE);
    assert_false(H.keep_alive);
    /* a final coding other than chunked would reach the client undeclared
     * (and be kept): refused, so the engine treats the answer as lost */
    assert_int_equal(resp_with("Transfer-Encoding: gzip"), HTTP1_ENOTIMPL);
    assert_int_equal(resp_with("Transfer-Encoding: chunked, gzip"), HTTP1_ENOTIMPL);
    assert_int_equal(resp("HTTP/1.1 600 Odd\r\nContent-Length: 0\r\n\r\n", false), HTTP1_EBAD);
    assert_int_equal(resp_with("Content-Length: 2, 2"), HTTP1_EBAD);
    assert_int_equal(resp_with("Transfer-Encoding: gzip, chunked"), HTTP1_ENOTIMPL);
    assert_int_equal(resp_with("Transfer-Encoding: chunked, chunked"), HTTP1_EBAD);
    assert_int_equal(resp("HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", false),
                     HTTP1_EBAD);
}

static void test_request_host_noted(void **state)
{
    (void)state;
    assert_true(req("GET / HTTP/1.1\r\nX: 1\r\nhOsT:  api.example:81 \r\n\r\n") > 0);
    assert_true(slice_eq(H.host, "api.example:81"));
    assert_true(req("GET / HTTP/1.0\r\n\r\n") > 0);
    assert_null(H.host.p);
}

static void test_request_method_case(void **state)
{
    (void)state;
    assert_true(req("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n") > 0);
    assert_true(req("M-SEARCH * HTTP/1.1\r\nHost: a\r\n\r\n") > 0);
    assert_int_equal(req("post / HTTP/1.1\r\nHost: a\r\n\r\n"), HTTP1_EBAD);
    assert_int_equal(req("Post / HTTP/1.1\r\nHost: a\r\n\r\n"), HTTP1_EBAD);
    assert_int_equal(req("POSt / HTTP/1.1\r\nHost: a\r\n\r\n"), HTTP1_EBAD);
}

static void test_response_keep_alive(void **state)
{
    (void)state;
    assert_true(resp("HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n", false) > 0);
    assert_int_equal(H.minor_version, 0);
    assert_false(H.keep_alive);
    assert_true(
        resp("HTTP/1.0 200 OK\r\nContent-Length: 1\r\nConnection: keep-alive\r\n\r\n", false) > 0);
    assert_true(H.keep_alive);
    assert_true(resp("HTTP/1.1 200 OK\r\nContent-Length: 1\r\nConnection: close\r\n\r\n", false) >
                0);
    assert_false(H.keep_alive);
}

static void test_status_line(void **state)
{
    (void)state;
    assert_true(resp("HTTP/1.1 200\r\n\r\n", false) > 0);
    assert_int_equal(H.status, 200);
    assert_int_equal(H.reason.n, 0);
    assert_true(resp("HTTP/1.1 404 \r\n\r\n", false) > 0);
    assert_int_equal(H.status, 404);
    assert_int_equal(H.reason.n, 0);
    assert_true(resp("HTTP/1.1 599 Some \x80 Thing\t\r\n\r\n", false) > 0);
    assert_true(slice_eq(H.reason, "Some \x80 Thing\t"));
    assert_int_equal(resp("HTTP/1.1 099 x\r\n\r\n", false), HTTP1_EBAD);
    assert_int_equal(resp("HTTP/1.1 600 x\r\n\r\n", false), HTTP1_EBAD);
    assert_int_equal(resp("HTTP/1.1 20 OK\r\n\r\n", false), HTTP1_EBAD);
    assert_int_equal(resp("HTTP/1.1 2000 OK\r\n\r\n", false), HTTP1_EBAD);
    assert_int_equal(resp("HTTP/1.1 200OK\r\n\r\n", false), HTTP1_EBAD);
    assert_int_equal(resp("HTTP/1.1 2x0 OK\r\n\r\n", false), HTTP1_EBAD);
    assert_int_equal(resp("HTTP/1.1  200 OK\r\n\r\n", false), HTTP1_EBAD);
    assert_int_equal(resp("HTTP/1.1 200 O\x01K\r\n\r\n", false), HTTP1_EBAD);
    assert_int_equal(resp("HTTP/1.1 200 OK\x7f\r\n\r\n", false), HTTP1_EBAD);
    assert_int_equal(resp("HTTP/1.1 200 OK\r\n X: y\r\n\r\n", false), HTTP1_EBAD);
}

/* ---- helpers ------------------------------------------------------------- */

static void test_find_header_and_ieq(void **state)
{
    (void)state;
    assert_true(req("GET / HTTP/1.1\r\nHost: a\r\nX-A: 1\r\nx-a: 2\r\nX-B: 3\r\n\r\n") > 0);
    size_t count = 99;
    const struct http1_header *hd = http1_find_header(&H, "X-a", &count);
    assert_non_null(hd);
    assert_int_equal(count, 2);
    assert_true(slice_eq(hd->value, "1"));
    assert_null(http1_find_header(&H, "X-C", &count));
    assert_int_equal(count, 0);
    assert_null(http1_find_header(&H, "X-", NULL));
    assert_non_null(http1_find_header(&H, "HOST", NULL));
    struct http1_slice s = {"Content-Type", 12};
    assert_true(http1_slice_ieq(s, "content-TYPE"));
    assert_false(http1_slice_ieq(s, "content-typ"));
    assert_false(http1_slice_ieq(s, "content-types"));
    assert_false(http1_slice_ieq(s, "content_type"));
    struct http1_slice at = {"@", 1}; /* '@' | 0x20 == '`': must not fold */
    assert_false(http1_slice_ieq(at, "`"));
}

static bool hop(const char *name)
{
    size_t i;
    for (i = 0; i < H.n_headers; i++)
        if (slice_eq(H.headers[i].name, name)) return http1_is_hop_by_hop(&H, i);
    fail_msg("no header %s", name);
    return false;
}

static void test_hop_by_hop(void **state)
{
    (void)state;
    assert_true(req("GET / HTTP/1.1\r\nHost: a\r\nConnection: X-Foo ,\tx-bar,,upgrade\r\n"
                    "Keep-Alive: 5\r\nTE: trailers\r\nTrailer: X\r\nUpgrade: ws\r\n"
                    "Proxy-Authorization: b\r\nPROXY-connection: k\r\nProxy: 1\r\n"
                    "X-Foo: 1\r\nX-BAR: 2\r\nX-Baz: 3\r\nContent-Length: 0\r\nX-Fo: 4\r\n"
                    "Connection: x-other\r\nX-Other: 5\r\nTransfer: 6\r\nTEE: 7\r\n\r\n") > 0);
    assert_true(hop("Connection"));
    assert_true(hop("Keep-Alive"));
    assert_true(hop("TE"));
    assert_true(hop("Trailer"));
    assert_true(hop("Upgrade"));
    assert_true(hop("Proxy-Authorization"));
    assert_true(hop("PROXY-connection"));
    assert_true(hop("X-Foo"));
    assert_true(hop("X-BAR"));
    assert_true(hop("X-Other"));
    assert_false(hop("Host"));
    assert_false(hop("Proxy"));
    assert_false(hop("X-Baz"));
    assert_false(hop("X-Fo"));
    assert_false(hop("Content-Length"));
    assert_false(hop("Transfer"));
    assert_false(hop("TEE"));
    assert_false(http1_is_hop_by_hop(&H, H.n_headers));
    assert_true(resp_with("Transfer-Encoding: chunked\r\nX: 1") > 0);
    assert_true(hop("Transfer-Encoding"));
    assert_false(hop("X"));
}

/* ---- chunked ------------------------------------------------------------- */

struct decoded {
    int rc;          /* DONE, MORE or an error */
    size_t consumed; /* bytes used up to DONE / the error / the end */
    char data[4096];
    size_t n;
};

/* Feeds in[0..n) to a fresh decoder cut at the given split offsets. */
static void decode_split(const char *in, size_t n, const size_t *cuts, size_t n_cuts,
                         struct decoded *d)
{
    struct http1_chunked c;
    http1_chunked_init(&c);
    memset(d, 0, sizeof(*d));
    size_t pos = 0;
    for (size_t k = 0; k <= n_cuts; k++) {
        size_t end = k < n_cuts ? cuts[k] : n;
        while (pos < end) {
            size_t used = 12345;
            struct http1_slice data = {NULL, 0};
            int rc = http1_chunked_next(&c, in + pos, end - pos, &used, &data);
            assert_true(used <= end - pos);
            if (rc == HTTP1_CHUNK_DATA) {
                assert_true(data.n > 0);
                assert_true(data.p >= in + pos && data.p + data.n <= in + pos + used);
                assert_true(d->n + data.n <= sizeof(d->data));
                memcpy(d->data + d->n, data.p, data.n);
                d->n += data.n;
                pos += used;
                continue;
            }
            pos += used;
            d->rc = rc;
            d->consumed = pos;
            if (rc != HTTP1_CHUNK_MORE) return;
            assert_int_equal(pos, end);
        }
    }
    d->rc = HTTP1_CHUNK_MORE;
    d->consumed = pos;
}

static void decode_all(const char *in, size_t n, struct decoded *d)
{
    decode_split(in, n, NULL, 0, d);
}

static const char CHUNKED[] = "5\r\nhello\r\n"
                              "1A;name=value;x=\"q\"\r\n"
                              "abcdefghijklmnopqrstuvwxyz\r\n"
                              "00000001 ; ext\r\n!\r\n"
                              "0\r\nTrailer-One: x\r\nT2: \x80y\r\n\r\n"
                              "GET /next";
static const char WANT[] = "helloabcdefghijklmnopqrstuvwxyz!";

static void test_chunked_basic(void **state)
{
    (void)state;
    struct decoded d;
    size_t n = strlen(CHUNKED);
    decode_all(CHUNKED, n, &d);
    assert_int_equal(d.rc, HTTP1_CHUNK_DONE);
    assert_int_equal(d.consumed, n - strlen("GET /next"));
    assert_int_equal(d.n, strlen(WANT));
    assert_memory_equal(d.data, WANT, d.n);

    decode_all("0\r\n\r\n", 5, &d);
    assert_int_equal(d.rc, HTTP1_CHUNK_DONE);
    assert_int_equal(d.consumed, 5);
    assert_int_equal(d.n, 0);
    decode_all("A\r\n0123456789\r\nb\r\n0123456789a\r\n0\r\n\r\n", 37, &d);
    assert_int_equal(d.rc, HTTP1_CHUNK_DONE);
    assert_int_equal(d.n, 21);
}

static void test_chunked_every_split(void **state)
{
    (void)state;
    size_t n = strlen(CHUNKED), done_at = n - strlen("GET /next");
    struct decoded d;
    for (size_t a = 0; a <= n; a++) {
        size_t cuts[1] = {a};
        decode_split(CHUNKED, n, cuts, 1, &d);
        assert_int_equal(d.rc, HTTP1_CHUNK_DONE);
        assert_int_equal(d.consumed, done_at);
        assert_int_equal(d.n, strlen(WANT));
        assert_memory_equal(d.data, WANT, d.n);
    }
    /* every pair of cut points */
    for (size_t a = 0; a <= n; a++)
        for (size_t b = a; b <= n; b++) {
            size_t cuts[2] = {a, b};
            decode_split(CHUNKED, n, cuts, 2, &d);
            assert_int_equal(d.rc, HTTP1_CHUNK_DONE);
            assert_int_equal(d.consumed, done_at);
            assert_memory_equal(d.data, WANT, strlen(WANT));
        }
}

static void test_chunked_byte_at_a_time(void **state)
{
    (void)state;
    size_t n = strlen(CHUNKED);
    size_t cuts[sizeof(CHUNKED)];
    for (size_t i = 0; i < n; i++)
        cuts[i] = i;
    struct decoded d;
    decode_split(CHUNKED, n, cuts, n, &d);
    assert_int_equal(d.rc, HTTP1_CHUNK_DONE);
    assert_int_equal(d.consumed, n - strlen("GET /next"));
    assert_int_equal(d.n, strlen(WANT));
    assert_memory_equal(d.data, WANT, d.n);
}

static void test_chunked_random_splits(void **state)
{
    (void)state;
    /* a bigger body: 50 chunks of varying sizes, fixed seed */
    static char in[3000], want[2000];
    size_t n = 0, wn = 0;
    unsigned seed = 12345;
    for (int k = 0; k < 50; k++) {
        seed = seed * 1103515245u + 12345u;
        size_t sz = 1 + (seed >> 16) % 30;
        n += (size_t)sprintf(in + n, k % 3 ? "%zx\r\n" : "%zX;k=%d\r\n", sz, k);
        for (size_t i = 0; i < sz; i++) {
            char ch = (char)('a' + (k + i) % 26);
            in[n++] = ch;
            want[wn++] = ch;
        }
        in[n++] = '\r';
        in[n++] = '\n';
    }
    n += (size_t)sprintf(in + n, "0\r\n\r\n");
    for (int round = 0; round < 200; round++) {
        size_t cuts[40], nc = 0, at = 0;
        while (nc < 40) {
            seed = seed * 1103515245u + 12345u;
            at += (seed >> 16) % 60;
            if (at > n) break;
            cuts[nc++] = at;
        }
        struct decoded d;
        decode_split(in, n, cuts, nc, &d);
        assert_int_equal(d.rc, HTTP1_CHUNK_DONE);
        assert_int_equal(d.consumed, n);
        assert_int_equal(d.n, wn);
        assert_memory_equal(d.data, want, wn);
    }
}

static int chunk_rc(const char *s)
{
    struct decoded d;
    decode_all(s, strlen(s), &d);
    int rc = d.rc;
    /* the verdict does not depend on how the input is split */
    size_t n = strlen(s);
    size_t cuts[2048];
    assert_true(n < 2048);
    for (size_t i = 0; i < n; i++)
        cuts[i] = i;
    decode_split(s, n, cuts, n, &d);
    assert_int_equal(d.rc, rc);
    return rc;
}

static void test_chunked_rejects(void **state)
{
    (void)state;
    assert_int_equal(chunk_rc("5\nhello\r\n0\r\n\r\n"), HTTP1_EBAD);
    assert_int_equal(chunk_rc("5\r\nhello\n0\r\n\r\n"), HTTP1_EBAD);
    assert_int_equal(chunk_rc("5\r\nhello0\r\n\r\n"), HTTP1_EBAD);
    assert_int_equal(chunk_rc("5\r\nhelloXY0\r\n\r\n"), HTTP1_EBAD);
    assert_int_equal(chunk_rc("5\r\nhello\r\r\n"), HTTP1_EBAD);
    assert_int_equal(chunk_rc("0\r\n\n"), HTTP1_EBAD);
    assert_int_equal(chunk_rc("0\n\r\n"), HTTP1_EBAD);
    assert_int_equal(chunk_rc("0\r\nX: y\n\r\n"), HTTP1_EBAD);
    assert_int_equal(chunk_rc("\r\n"), HTTP1_EBAD);
    assert_int_equal(chunk_rc(";x\r\n"), HTTP1_EBAD);
    assert_int_equal(chunk_rc(" 5\r\nhello\r\n"), HTTP1_EBAD);
    assert_int_equal(chunk_rc("+5\r\nhello\r\n"), HTTP1_EBAD);
    assert_int_equal(chunk_rc("0x5\r\nhello\r\n"), HTTP1_EBAD);
    assert_int_equal(chunk_rc("5 x\r\nhello\r\n"), HTTP1_EBAD);
    assert_int_equal(chunk_rc("5 \r\nhello\r\n"), HTTP1_EBAD);
    assert_int_equal(chunk_rc("g\r\n"), HTTP1_EBAD);
    assert_int_equal(chunk_rc("5;a\x01\r\nhello\r\n"), HTTP1_EBAD);
    assert_int_equal(chunk_rc("5;a\nhello\r\n"), HTTP1_EBAD);
    assert_int_equal(chunk_rc("00000000000000001\r\n"), HTTP1_EBAD); /* 17 digits */
    assert_int_equal(chunk_rc("10000000000000000\r\n"), HTTP1_EBAD);
    assert_int_equal(chunk_rc("0\r\n X: y\r\n\r\n"), HTTP1_EBAD); /* obs-fold in trailer */
    assert_int_equal(chunk_rc("0\r\nX: \x7f\r\n\r\n"), HTTP1_EBAD);
    /* 16 digits is the maximum and fine */
    assert_int_equal(chunk_rc("FFFFFFFFFFFFFFFF\r\nabc"), HTTP1_CHUNK_MORE);
    assert_int_equal(chunk_rc("0000000000000001\r\nx\r\n0\r\n\r\n"), HTTP1_CHUNK_DONE);
    assert_int_equal(chunk_rc("5 ;x\r\nhello\r\n0\r\n\r\n"), HTTP1_CHUNK_DONE);
    assert_int_equal(chunk_rc("5\t; x = y\r\nhello\r\n0\r\n\r\n"), HTTP1_CHUNK_DONE);
    assert_int_equal(chunk_rc("5\r\nhel"), HTTP1_CHUNK_MORE);
}

static void test_chunked_line_limits(void **state)
{
    (void)state;
    static char b[20000];
    /* size line: 1024 bytes including its CRLF is fine, 1025 is not */
    size_t n = (size_t)sprintf(b, "1;");
    memset(b + n, 'x', 1022 - n);
    n = 1022;
    n += (size_t)sprintf(b + n, "\r\nz\r\n0\r\n\r\n");
    struct decoded d;
    decode_all(b, n, &d);
    assert_int_equal(d.rc, HTTP1_CHUNK_DONE);
    n = (size_t)sprintf(b, "1;");
    memset(b + n, 'x', 1023 - n);
    n = 1023;
    n += (size_t)sprintf(b + n, "\r\nz\r\n0\r\n\r\n");
    decode_all(b, n, &d);
    assert_int_equal(d.rc, HTTP1_EBAD);

    /* trailers: bounded at 8 KiB in total */
    n = (size_t)sprintf(b, "0\r\n");
    for (int i = 0; i < 100; i++)
        n += (size_t)sprintf(b + n, "X-T%03d: %060d\r\n", i, i); /* 70 bytes each */
    n += (size_t)sprintf(b + n, "\r\n");
    decode_all(b, n, &d);
    assert_int_equal(d.rc, HTTP1_CHUNK_DONE);
    assert_int_equal(d.consumed, n);
    n = (size_t)sprintf(b, "0\r\n");
    for (int i = 0; i < 120; i++)
        n += (size_t)sprintf(b + n, "X-T%03d: %060d\r\n", i, i);
    n += (size_t)sprintf(b + n, "\r\n");
    decode_all(b, n, &d);
    assert_int_equal(d.rc, HTTP1_EBAD);
}

static void test_chunked_done_and_sticky_error(void **state)
{
    (void)state;
    struct http1_chunked c;
    size_t used;
    struct http1_slice data;
    http1_chunked_init(&c);
    assert_int_equal(http1_chunked_next(&c, "0\r\n\r\nXYZ", 8, &used, &data), HTTP1_CHUNK_DONE);
    assert_int_equal(used, 5);
    assert_int_equal(http1_chunked_next(&c, "XYZ", 3, &used, &data), HTTP1_CHUNK_DONE);
    assert_int_equal(used, 0);

    http1_chunked_init(&c);
    assert_int_equal(http1_chunked_next(&c, "", 0, &used, &data), HTTP1_CHUNK_MORE);
    assert_int_equal(used, 0);
    assert_int_equal(http1_chunked_next(&c, "zz", 2, &used, &data), HTTP1_EBAD);
    assert_int_equal(used, 0);
    assert_int_equal(http1_chunked_next(&c, "0\r\n\r\n", 5, &used, &data), HTTP1_EBAD);

    /* data is returned as soon as it is there, size line and all consumed */
    http1_chunked_init(&c);
    assert_int_equal(http1_chunked_next(&c, "3\r\nab", 5, &used, &data), HTTP1_CHUNK_DATA);
    assert_int_equal(used, 5);
    assert_int_equal(data.n, 2);
    assert_int_equal(c.remaining, 1);
    assert_int_equal(http1_chunked_next(&c, "c\r\n", 3, &used, &data), HTTP1_CHUNK_DATA);
    assert_int_equal(used, 1);
    assert_int_equal(http1_chunked_next(&c, "\r\n", 2, &used, &data), HTTP1_CHUNK_MORE);
    assert_int_equal(used, 2);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_simple_get),
        cmocka_unit_test(test_post_content_length),
        cmocka_unit_test(test_chunked_request),
        cmocka_unit_test(test_keep_alive_rules),
        cmocka_unit_test(test_expect_continue),
        cmocka_unit_test(test_pipelined_not_consumed),
        cmocka_unit_test(test_incomplete_every_prefix),
        cmocka_unit_test(test_max_head_boundary),
        cmocka_unit_test(test_header_count_limit),
        cmocka_unit_test(test_leading_crlf),
        cmocka_unit_test(test_obs_text_and_tab_in_value),
        cmocka_unit_test(test_reject_cl_and_te),
        cmocka_unit_test(test_reject_bad_content_length),
        cmocka_unit_test(test_reject_transfer_encoding),
        cmocka_unit_test(test_reject_obs_fold),
        cmocka_unit_test(test_reject_bare_cr_lf),
        cmocka_unit_test(test_reject_space_before_colon),
        cmocka_unit_test(test_reject_bad_header_name),
        cmocka_unit_test(test_reject_bad_method),
        cmocka_unit_test(test_reject_value_controls),
        cmocka_unit_test(test_reject_bad_target),
        cmocka_unit_test(test_reject_version),
        cmocka_unit_test(test_reject_too_large),
        cmocka_unit_test(test_host_rules),
        cmocka_unit_test(test_response_length),
        cmocka_unit_test(test_response_no_body),
        cmocka_unit_test(test_response_chunked_and_close),
        cmocka_unit_test(test_response_keep_alive),
        cmocka_unit_test(test_status_line),
        cmocka_unit_test(test_find_header_and_ieq),
        cmocka_unit_test(test_hop_by_hop),
        cmocka_unit_test(test_chunked_basic),
        cmocka_unit_test(test_chunked_every_split),
        cmocka_unit_test(test_request_method_case),
        cmocka_unit_test(test_request_host_noted),
        cmocka_unit_test(test_chunked_byte_at_a_time),
        cmocka_unit_test(test_chunked_random_splits),
        cmocka_unit_test(test_chunked_rejects),
        cmocka_unit_test(test_chunked_line_limits),
        cmocka_unit_test(test_chunked_done_and_sticky_error),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
