/* test_log.c — JSON log line building: string escaping (quotes,
 * backslashes, control bytes, DEL, bytes >= 0x80), integers, the ts shape. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <cmocka.h>

#include "idemgate/core/buf.h"
#include "idemgate/core/log.h"

static void expect_json(const char *in, size_t n, const char *want)
{
    struct buf b;
    buf_init(&b);
    buf_append_json_str(&b, in, n);
    assert_int_equal(buf_size(&b), strlen(want));
    assert_memory_equal(buf_data(&b), want, strlen(want));
    buf_free(&b);
}

static void test_json_escaping(void **state)
{
    (void)state;
    expect_json("", 0, "");
    expect_json("plain text", 10, "plain text");
    expect_json("a\"b\\c", 5, "a\\\"b\\\\c");
    expect_json("\x01x\x1f", 3, "\\u0001x\\u001f");
    expect_json("\x7f\x80\xff", 3, "\\u007f\\u0080\\u00ff");
    expect_json("end\"", 4, "end\\\"");
    expect_json("\"start", 6, "\\\"start");
    const char nul[] = {'a', 0, 'b'};
    expect_json(nul, 3, "a\\u0000b");
}

static void test_line_fields(void **state)
{
    (void)state;
    struct buf b;
    buf_init(&b);
    log_line_begin(&b, LOG_WARN);
    log_kv_int(&b, "neg", -42);
    log_kv_int(&b, "zero", 0);
    log_kv_int(&b, "big", 9007199254740993LL);
    log_kv_str(&b, "s", "x\"y", 3);
    const char *p = buf_data(&b);
    size_t n = buf_size(&b);
    /* {"ts":"YYYY-MM-DDTHH:MM:SS.mmmZ","level":"warn",... */
    assert_true(n > 40);
    assert_memory_equal(p, "{\"ts\":\"", 7);
    assert_int_equal(p[7 + 10], 'T');
    assert_int_equal(p[7 + 19], '.');
    assert_int_equal(p[7 + 23], 'Z');
    const char *rest = ",\"level\":\"warn\",\"neg\":-42,\"zero\":0,\"big\":9007199254740993,"
                       "\"s\":\"x\\\"y\"";
    assert_int_equal(n - 32, strlen(rest));
    assert_memory_equal(p + 32, rest, strlen(rest));
    buf_free(&b);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_json_escaping),
        cmocka_unit_test(test_line_fields),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
