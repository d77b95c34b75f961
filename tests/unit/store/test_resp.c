/* test_resp.c — the RESP2 parser and command writer (src/store/redis/resp.c):
 * every reply type, nil, empty bulk and array, nested arrays, the limits
 * (line length, bulk length, element count, nesting depth, long long),
 * protocol errors, a stream of replies fed in pieces of every size and
 * split at every byte (the same replies every time), the arena (no heap
 * for small replies, heap chunks freed by the next parse), and the exact
 * bytes of written commands. Every parse reads from a copy of exactly n
 * bytes, so ASan sees a read past the end. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include "store/redis/resp.h"

#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define S(lit) lit, sizeof(lit) - 1

static struct resp_arena arena;

static int setup(void **state)
{
    (void)state;
    resp_arena_init(&arena);
    return 0;
}

static int teardown(void **state)
{
    (void)state;
    resp_arena_free(&arena);
    return 0;
}

/* resp_parse on a heap copy of exactly n bytes; *copy is that copy (the
 * reply's strings point into it; the caller frees it). */
static int parse_copy(const char *in, size_t n, struct rreply **r, size_t *consumed, char **copy)
{
    *copy = malloc(n ? n : 1);
    assert_non_null(*copy);
    if (n) memcpy(*copy, in, n);
    return resp_parse(*copy, n, &arena, r, consumed);
}

static int parse_rc(const char *in, size_t n)
{
    struct rreply *r;
    size_t consumed = 99;
    char *copy;
    int rc = parse_copy(in, n, &r, &consumed, &copy);
    if (rc != 1) {
        assert_null(r);
        assert_int_equal(consumed, 0);
    }
    free(copy);
    return rc;
}

/* A reply as text, for comparing whole trees. */
static void dump(const struct rreply *r, struct buf *b)
{
    switch (r->type) {
    case RREPLY_STRING:
        buf_printf(b, "$%zu:", r->len);
        buf_append(b, r->str, r->len);
        break;
    case RREPLY_STATUS:
        buf_append_str(b, "+");
        buf_append(b, r->str, r->len);
        break;
    case RREPLY_ERROR:
        buf_append_str(b, "-");
        buf_append(b, r->str, r->len);
        break;
    case RREPLY_INTEGER:
        buf_printf(b, ":%lld", r->integer);
        break;
    case RREPLY_NIL:
        buf_append_str(b, "nil");
        break;
    case RREPLY_ARRAY:
        buf_printf(b, "[%zu", r->elements);
        for (size_t k = 0; k < r->elements; k++) {
            buf_append_str(b, " ");
            dump(&r->element[k], b);
        }
        buf_append_str(b, "]");
        break;
    default:
        fail_msg("bad type %d", (int)r->type);
    }
}

/* Parses one complete reply that takes all n bytes; returns its dump. */
static void expect_reply(const char *in, size_t n, const char *want)
{
    struct rreply *r;
    size_t consumed;
    char *copy;
    assert_int_equal(parse_copy(in, n, &r, &consumed, &copy), 1);
    assert_int_equal(consumed, n);
    struct buf b;
    buf_init(&b);
    dump(r, &b);
    buf_append(&b, "", 1);
    assert_string_equal(buf_data(&b), want);
    buf_free(&b);
    free(copy);
    /* Every proper prefix is incomplete, with a need past its end. */
    for (size_t k = 0; k < n; k++) {
        assert_int_equal(parse_rc(in, k), 0);
        assert_true(arena.need > k && arena.need <= n);
    }
}

static void test_scalars(void **state)
{
    (void)state;
    expect_reply(S("+OK\r\n"), "+OK");
    expect_reply(S("+\r\n"), "+");
    expect_reply(S("-ERR wrong\r\n"), "-ERR wrong");
    expect_reply(S("-MOVED 3999 127.0.0.1:6381\r\n"), "-MOVED 3999 127.0.0.1:6381");
    expect_reply(S(":0\r\n"), ":0");
    expect_reply(S(":1\r\n"), ":1");
    expect_reply(S(":-42\r\n"), ":-42");
    expect_reply(S(":9223372036854775807\r\n"), ":9223372036854775807");
    expect_reply(S(":-9223372036854775808\r\n"), ":-9223372036854775808");
    expect_reply(S("$5\r\nhello\r\n"), "$5:hello");
    expect_reply(S("$0\r\n\r\n"), "$0:");
    expect_reply(S("$-1\r\n"), "nil");
    expect_reply(S("*-1\r\n"), "nil");
    expect_reply(S("*0\r\n"), "[0]");
}

static void test_fields(void **state)
{
    (void)state;
    struct rreply *r;
    size_t consumed;
    char *copy;
    /* Binary-safe, zero-copy: CR, LF and NUL inside a bulk string. */
    assert_int_equal(parse_copy(S("$5\r\na\r\n\0b\r\n+X"), &r, &consumed, &copy), 1);
    assert_int_equal(consumed, 11);
    assert_int_equal(r->type, RREPLY_STRING);
    assert_ptr_equal(r->str, copy + 4);
    assert_int_equal(r->len, 5);
    assert_memory_equal(r->str, "a\r\n\0b", 5);
    free(copy);

    assert_int_equal(parse_copy(S(":-7\r\n"), &r, &consumed, &copy), 1);
    assert_int_equal(r->type, RREPLY_INTEGER);
    assert_true(r->integer == -7);
    assert_null(r->str);
    assert_int_equal(r->elements, 0);
    assert_null(r->element);
    free(copy);

    assert_int_equal(parse_copy(S("$-1\r\n"), &r, &consumed, &copy), 1);
    assert_int_equal(r->type, RREPLY_NIL);
    assert_null(r->str);
    assert_int_equal(r->len, 0);
    free(copy);

    assert_int_equal(parse_copy(S("*0\r\n"), &r, &consumed, &copy), 1);
    assert_int_equal(r->type, RREPLY_ARRAY);
    assert_int_equal(r->elements, 0);
    assert_null(r->element);
    free(copy);

    assert_int_equal(parse_copy(S("-ERR x\r\n"), &r, &consumed, &copy), 1);
    assert_int_equal(r->type, RREPLY_ERROR);
    assert_ptr_equal(r->str, copy + 1);
    assert_int_equal(r->len, 5);
    free(copy);
}

static void test_arrays(void **state)
{
    (void)state;
    expect_reply(S("*2\r\n$3\r\nfoo\r\n:1\r\n"), "[2 $3:foo :1]");
    expect_reply(S("*3\r\n$-1\r\n*0\r\n$0\r\n\r\n"), "[3 nil [0] $0:]");
    /* ROLE from a master, a sentinel's get-master-addr-by-name, a message. */
    expect_reply(S("*3\r\n$6\r\nmaster\r\n:3129659\r\n*1\r\n*3\r\n$9\r\n127.0.0.1\r\n"
                   "$4\r\n9001\r\n$7\r\n3129242\r\n"),
                 "[3 $6:master :3129659 [1 [3 $9:127.0.0.1 $4:9001 $7:3129242]]]");
    expect_reply(S("*2\r\n$9\r\n127.0.0.1\r\n$4\r\n6379\r\n"), "[2 $9:127.0.0.1 $4:6379]");
    expect_reply(S("*3\r\n$7\r\nmessage\r\n$2\r\nch\r\n$2\r\nhi\r\n"),
                 "[3 $7:message $2:ch $2:hi]");
    /* CLUSTER SLOTS: arrays of arrays of arrays. */
    expect_reply(S("*2\r\n"
                   "*3\r\n:0\r\n:8191\r\n*3\r\n$9\r\n127.0.0.1\r\n:7000\r\n$3\r\nid1\r\n"
                   "*4\r\n:8192\r\n:16383\r\n*3\r\n$9\r\n127.0.0.1\r\n:7001\r\n$3\r\nid2\r\n"
                   "*3\r\n$9\r\n127.0.0.1\r\n:7004\r\n$3\r\nid5\r\n"),
                 "[2 [3 :0 :8191 [3 $9:127.0.0.1 :7000 $3:id1]] "
                 "[4 :8192 :16383 [3 $9:127.0.0.1 :7001 $3:id2] [3 $9:127.0.0.1 :7004 $3:id5]]]");
    expect_reply(S("*1\r\n*-1\r\n"), "[1 nil]");
    expect_reply(S("*2\r\n+OK\r\n-ERR no\r\n"), "[2 +OK -ERR no]");
}

static void test_depth_limit(void **state)
{
    (void)state;
    char in[128];
    size_t n = 0;
    for (int k = 0; k < RESP_MAX_DEPTH; k++)
        n += (size_t)sprintf(in + n, "*1\r\n");
    n += (size_t)sprintf(in + n, ":1\r\n");
    expect_reply(in, n, "[1 [1 [1 [1 [1 [1 [1 :1]]]]]]]");
    /* One more array level is an error, whatever follows. */
    n = 0;
    for (int k = 0; k < RESP_MAX_DEPTH + 1; k++)
        n += (size_t)sprintf(in + n, "*1\r\n");
    assert_int_equal(parse_rc(in, n), -1);
    n += (size_t)sprintf(in + n, ":1\r\n");
    assert_int_equal(parse_rc(in, n), -1);
    n = 0;
    for (int k = 0; k < RESP_MAX_DEPTH; k++)
        n += (size_t)sprintf(in + n, "*1\r\n");
    n += (size_t)sprintf(in + n, "*0\r\n");
    assert_int_equal(parse_rc(in, n), -1);
}

static void test_errors(void **state)
{
    (void)state;
    static const struct {
        const char *in;
        const char *why;
    } bad[] = {
        {"!3\r\nabc\r\n", "type byte (RESP3 blob error)"},
        {"%1\r\n:1\r\n:2\r\n", "type byte (RESP3 map)"},
        {"_\r\n", "type byte (RESP3 null)"},
        {"x", "type byte"},
        {"\r\n", "type byte"},
        {"*2\r\n:1\r\n?xx", "type byte inside an array"},
        {"$abc\r\n", "bulk length not a number"},
        {"$\r\n", "empty bulk length"},
        {"$-\r\n", "bare minus"},
        {"$1x\r\n", "junk after the length"},
        {"$ 1\r\n", "space before the length"},
        {"$+1\r\n", "plus sign"},
        {"$-2\r\n", "negative bulk length other than -1"},
        {"*-2\r\n", "negative array count other than -1"},
        {"$-9223372036854775808\r\n", "very negative length"},
        {"$536870913\r\n", "bulk over 512 MB"},
        {"*1048577\r\n", "more than 1M elements"},
        {"$3\r\nabcX\r\n", "bulk not followed by CRLF"},
        {"$3\r\nabc\rX", "bulk followed by CR alone"},
        {"$3\r\nab\r\n\r\n", "bulk shorter than its length"},
        {"+OK\rX\r\n", "CR without LF in a status"},
        {"-ERR\rX", "CR without LF in an error"},
        {":12\nx", "LF without CR"},
        {":1\r\r\n", "CR CR"},
        {":\r\n", "empty integer"},
        {":-\r\n", "bare minus integer"},
        {":1 \r\n", "space in an integer"},
        {":1.5\r\n", "not an integer"},
        {":12345678901234567890\r\n", "20 digits"},
        {":00000000000000000001\r\n", "20 digits, leading zeros"},
        {":123456789012345678901234567890", "overlong integer, no CRLF yet"},
        {":9223372036854775808\r\n", "LLONG_MAX + 1"},
        {":-9223372036854775809\r\n", "LLONG_MIN - 1"},
        {":99999999999999999999\r\n", "over 2^64"},
        {"*1\r\n*1\r\n$-5\r\n", "error deep inside"},
    };
    for (size_t k = 0; k < sizeof(bad) / sizeof(bad[0]); k++) {
        int rc = parse_rc(bad[k].in, strlen(bad[k].in));
        if (rc != -1) fail_msg("%s: %s gave %d", bad[k].why, bad[k].in, rc);
    }
}

static void test_lines_and_limits(void **state)
{
    (void)state;
    /* A status line of RESP_MAX_LINE bytes is fine; one byte more is an
     * error as soon as it is seen, CRLF or not. */
    size_t n = 1 + RESP_MAX_LINE + 2;
    char *in = malloc(n + 1);
    assert_non_null(in);
    in[0] = '+';
    memset(in + 1, 'a', RESP_MAX_LINE);
    memcpy(in + 1 + RESP_MAX_LINE, "\r\n", 2);
    assert_int_equal(parse_rc(in, n), 1);
    assert_int_equal(parse_rc(in, 1 + RESP_MAX_LINE), 0);
    in[1 + RESP_MAX_LINE] = 'a';
    assert_int_equal(parse_rc(in, 2 + RESP_MAX_LINE), -1);
    free(in);

    /* The largest bulk and array headers wait for their bytes, with a need
     * that counts them, and allocate nothing. */
    assert_int_equal(parse_rc(S("$536870912\r\n")), 0);
    assert_true(arena.need == 12 + 536870912ULL + 2);
    assert_int_equal(parse_rc(S("$536870912\r\nabc")), 0);
    assert_true(arena.need == 12 + 536870912ULL + 2);
    assert_int_equal(parse_rc(S("*1048576\r\n")), 0);
    assert_true(arena.need == 10 + 3 * 1048576ULL);
    assert_null(arena.heap);
    /* Three elements take at least 9 bytes after the header. */
    assert_int_equal(parse_rc(S("*3\r\n:1\r\n")), 0);
    assert_true(arena.need == 4 + 9);
}

/* Many elements: heap chunks, freed by the next parse. */
static void test_arena(void **state)
{
    (void)state;
    struct buf in, want;
    buf_init(&in);
    buf_init(&want);
    /* 300 arrays of 2: 301 nodes + 1 root, past the inline ones. */
    buf_printf(&in, "*300\r\n");
    buf_printf(&want, "[300");
    for (int k = 0; k < 300; k++) {
        buf_printf(&in, "*2\r\n:%d\r\n$1\r\n%c\r\n", k, 'a' + k % 26);
        buf_printf(&want, " [2 :%d $1:%c]", k, 'a' + k % 26);
    }
    buf_append_str(&want, "]");
    buf_append(&want, "", 1);
    struct rreply *r;
    size_t consumed;
    assert_int_equal(resp_parse(buf_data(&in), buf_size(&in), &arena, &r, &consumed), 1);
    assert_int_equal(consumed, buf_size(&in));
    assert_non_null(arena.heap);
    struct buf got;
    buf_init(&got);
    dump(r, &got);
    buf_append(&got, "", 1);
    assert_string_equal(buf_data(&got), buf_data(&want));
    /* A small reply: inline again, no heap. */
    assert_int_equal(resp_parse(S("*2\r\n:1\r\n:2\r\n"), &arena, &r, &consumed), 1);
    assert_null(arena.heap);
    assert_true(r >= arena.inline_nodes && r < arena.inline_nodes + RESP_ARENA_INLINE);
    assert_true(r->element >= arena.inline_nodes &&
                r->element + 2 <= arena.inline_nodes + RESP_ARENA_INLINE);
    /* The inline nodes are enough for 31 elements. */
    buf_reset(&in);
    buf_printf(&in, "*%d\r\n", RESP_ARENA_INLINE - 1);
    for (int k = 0; k < RESP_ARENA_INLINE - 1; k++)
        buf_printf(&in, ":%d\r\n", k);
    assert_int_equal(resp_parse(buf_data(&in), buf_size(&in), &arena, &r, &consumed), 1);
    assert_null(arena.heap);
    assert_int_equal(r->elements, RESP_ARENA_INLINE - 1);
    assert_true(r->element[RESP_ARENA_INLINE - 2].integer == RESP_ARENA_INLINE - 2);
    buf_free(&in);
    buf_free(&want);
    buf_free(&got);
}

/* A stream of replies of every kind. */
static const char stream[] = "+OK\r\n"
                             "$5\r\nhello\r\n"
                             "$-1\r\n"
                             ":1\r\n"
                             "*2\r\n$3\r\nfoo\r\n:-12\r\n"
                             "$0\r\n\r\n"
                             "*0\r\n"
                             "-ERR boom\r\n"
                             "*-1\r\n"
                             "*1\r\n*2\r\n*1\r\n:9\r\n$2\r\n\r\n\r\n"
                             ":9223372036854775807\r\n"
                             "*3\r\n$7\r\nmessage\r\n$2\r\nch\r\n$4\r\nbody\r\n";

/* Feeds src in pieces (the first at split, then chunk bytes at a time),
 * consuming every complete reply as a connection would; returns the
 * dumps of all replies, one line each. Each parse sees an exact copy of
 * the bytes pending. */
static void feed(const char *src, size_t n, size_t split, size_t chunk, struct buf *dumps)
{
    struct buf pending;
    buf_init(&pending);
    size_t fed = 0;
    while (fed < n) {
        size_t take = fed == 0 && split ? split : chunk;
        if (take > n - fed) take = n - fed;
        buf_append(&pending, src + fed, take);
        fed += take;
        for (;;) {
            struct rreply *r;
            size_t consumed;
            char *copy;
            int rc = parse_copy(buf_data(&pending), buf_size(&pending), &r, &consumed, &copy);
            assert_int_not_equal(rc, -1);
            if (rc == 0) {
                assert_true(arena.need > buf_size(&pending));
                free(copy);
                break;
            }
            assert_true(consumed > 0 && consumed <= buf_size(&pending));
            dump(r, dumps);
            buf_append_str(dumps, "\n");
            free(copy);
            buf_consume(&pending, consumed);
        }
    }
    assert_int_equal(buf_size(&pending), 0);
    buf_free(&pending);
}

static void test_split_everywhere(void **state)
{
    (void)state;
    size_t n = sizeof(stream) - 1;
    struct buf ref;
    buf_init(&ref);
    feed(stream, n, 0, n, &ref);
    buf_append(&ref, "", 1);
    assert_string_equal(buf_data(&ref), "+OK\n$5:hello\nnil\n:1\n[2 $3:foo :-12]\n$0:\n[0]\n"
                                        "-ERR boom\nnil\n[1 [2 [1 :9] $2:\r\n]]\n"
                                        ":9223372036854775807\n[3 $7:message $2:ch $4:body]\n");
    for (size_t chunk = 1; chunk <= n; chunk++) {
        struct buf got;
        buf_init(&got);
        feed(stream, n, 0, chunk, &got);
        buf_append(&got, "", 1);
        assert_string_equal(buf_data(&got), buf_data(&ref));
        buf_free(&got);
    }
    for (size_t split = 1; split < n; split++) {
        struct buf got;
        buf_init(&got);
        feed(stream, n, split, n, &got);
        buf_append(&got, "", 1);
        assert_string_equal(buf_data(&got), buf_data(&ref));
        buf_free(&got);
    }
    buf_free(&ref);
}

static void expect_command(int argc, const char **argv, const size_t *lens, const char *want,
                           size_t want_len)
{
    assert_int_equal(resp_command_len(argc, argv, lens), want_len);
    struct buf b;
    buf_init(&b);
    buf_append_str(&b, "xy");
    buf_consume(&b, 1); /* appends after unread bytes */
    resp_append_command(&b, argc, argv, lens);
    assert_int_equal(buf_size(&b), 1 + want_len);
    assert_memory_equal(buf_data(&b), "y", 1);
    assert_memory_equal(buf_data(&b) + 1, want, want_len);
    /* It parses back as an array of bulk strings, the arguments. */
    struct rreply *r;
    size_t consumed;
    assert_int_equal(resp_parse(buf_data(&b) + 1, want_len, &arena, &r, &consumed), 1);
    assert_int_equal(consumed, want_len);
    assert_int_equal(r->type, RREPLY_ARRAY);
    assert_int_equal(r->elements, (size_t)argc);
    for (int k = 0; k < argc; k++) {
        size_t len = lens ? lens[k] : strlen(argv[k]);
        assert_int_equal(r->element[k].type, RREPLY_STRING);
        assert_int_equal(r->element[k].len, len);
        if (len) assert_memory_equal(r->element[k].str, argv[k], len);
    }
    buf_free(&b);
}

static void test_writer(void **state)
{
    (void)state;
    const char *set[] = {"SET", "key", "value"};
    expect_command(3, set, NULL, S("*3\r\n$3\r\nSET\r\n$3\r\nkey\r\n$5\r\nvalue\r\n"));
    expect_command(0, NULL, NULL, S("*0\r\n"));
    /* Binary arguments with lens: NUL, CRLF, an empty one. */
    const char *bin[] = {"EVALSHA", "a\0b", "\r\n", ""};
    const size_t bin_lens[] = {7, 3, 2, 0};
    expect_command(4, bin, bin_lens,
                   S("*4\r\n$7\r\nEVALSHA\r\n$3\r\na\0b\r\n$2\r\n\r\n\r\n$0\r\n\r\n"));
    /* Two- and three-digit lengths and counts. */
    char ten[10], hundred[100], thousand[1000];
    memset(ten, 't', sizeof(ten));
    memset(hundred, 'h', sizeof(hundred));
    memset(thousand, 'k', sizeof(thousand));
    const char *big[] = {ten, hundred, thousand};
    const size_t big_lens[] = {10, 100, 1000};
    struct buf want;
    buf_init(&want);
    buf_append_str(&want, "*3\r\n$10\r\n");
    buf_append(&want, ten, 10);
    buf_append_str(&want, "\r\n$100\r\n");
    buf_append(&want, hundred, 100);
    buf_append_str(&want, "\r\n$1000\r\n");
    buf_append(&want, thousand, 1000);
    buf_append_str(&want, "\r\n");
    expect_command(3, big, big_lens, buf_data(&want), buf_size(&want));
    buf_reset(&want);
    const char *many[12];
    buf_append_str(&want, "*12\r\n");
    for (int k = 0; k < 12; k++) {
        many[k] = "x";
        buf_append_str(&want, "$1\r\nx\r\n");
    }
    expect_command(12, many, NULL, buf_data(&want), buf_size(&want));
    buf_free(&want);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_scalars), cmocka_unit_test(test_fields),
        cmocka_unit_test(test_arrays),  cmocka_unit_test(test_depth_limit),
        cmocka_unit_test(test_errors),  cmocka_unit_test(test_lines_and_limits),
        cmocka_unit_test(test_arena),   cmocka_unit_test(test_split_everywhere),
        cmocka_unit_test(test_writer),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
