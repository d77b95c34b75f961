/* test_record.c — unit tests for the stored-response encoding (record.c):
 * round trips, the incremental writer, and the decoder's refusals. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "idemgate/core/buf.h"
#include "idemgate/idem/record.h"

#define NO_MAX ((size_t)-1)

static const uint8_t test_fp[16] = {0x00, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77,
                                    0x88, 0x99, 0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0xff};

/* Builds a record with n headers "h<i>: v<i>" and the given body; the
 * header strings live in names/values (caller-sized). */
static void make_record(struct record *r, size_t n, char (*names)[16], char (*values)[16],
                        const uint8_t *body, size_t body_len)
{
    memset(r, 0, sizeof(*r));
    r->status = 201;
    r->created_ms = 1700000000123ull;
    memcpy(r->fp, test_fp, 16);
    r->n_headers = n;
    for (size_t i = 0; i < n; i++) {
        snprintf(names[i], 16, "h%u", (unsigned)(i % 1000));
        snprintf(values[i], 16, "v%u", (unsigned)(i * 7 % 10000));
        r->headers[i].name = names[i];
        r->headers[i].name_len = strlen(names[i]);
        r->headers[i].value = values[i];
        r->headers[i].value_len = strlen(values[i]);
    }
    r->body = body;
    r->body_len = body_len;
}

static void assert_records_equal(const struct record *a, const struct record *b)
{
    assert_int_equal(a->status, b->status);
    assert_true(a->created_ms == b->created_ms);
    assert_memory_equal(a->fp, b->fp, 16);
    assert_int_equal(a->n_headers, b->n_headers);
    for (size_t i = 0; i < a->n_headers; i++) {
        assert_int_equal(a->headers[i].name_len, b->headers[i].name_len);
        assert_int_equal(a->headers[i].value_len, b->headers[i].value_len);
        if (a->headers[i].name_len)
            assert_memory_equal(a->headers[i].name, b->headers[i].name, a->headers[i].name_len);
        if (a->headers[i].value_len)
            assert_memory_equal(a->headers[i].value, b->headers[i].value, a->headers[i].value_len);
    }
    assert_true(a->body_len == b->body_len);
    if (a->body_len) assert_memory_equal(a->body, b->body, (size_t)a->body_len);
}

/* Encodes r, decodes it back, compares, and checks re-encoding is
 * byte-identical. */
static void round_trip(const struct record *r)
{
    struct buf b, b2;
    buf_init(&b);
    buf_init(&b2);
    assert_int_equal(record_encode(r, &b), 0);
    struct record *d = malloc(sizeof(*d));
    assert_non_null(d);
    assert_int_equal(record_decode((const uint8_t *)buf_data(&b), buf_size(&b), NO_MAX, d), 0);
    assert_records_equal(r, d);
    assert_int_equal(record_encode(d, &b2), 0);
    assert_int_equal(buf_size(&b), buf_size(&b2));
    assert_memory_equal(buf_data(&b), buf_data(&b2), buf_size(&b));
    free(d);
    buf_free(&b);
    buf_free(&b2);
}

static void test_round_trip_no_headers(void **state)
{
    (void)state;
    struct record r;
    make_record(&r, 0, NULL, NULL, (const uint8_t *)"hello", 5);
    round_trip(&r);
}

static void test_round_trip_many_headers(void **state)
{
    (void)state;
    static char names[RECORD_MAX_HEADERS][16], values[RECORD_MAX_HEADERS][16];
    struct record r;
    make_record(&r, RECORD_MAX_HEADERS, names, values, (const uint8_t *)"x", 1);
    round_trip(&r);
}

static void test_round_trip_empty_body(void **state)
{
    (void)state;
    char names[3][16], values[3][16];
    struct record r;
    make_record(&r, 3, names, values, NULL, 0);
    round_trip(&r);
}

static void test_round_trip_empty_header_name_and_value(void **state)
{
    (void)state;
    struct record r;
    make_record(&r, 0, NULL, NULL, NULL, 0);
    r.n_headers = 2;
    r.headers[0] = (struct record_header){"", 0, "", 0};
    r.headers[1] = (struct record_header){"X-Empty", 7, "", 0};
    round_trip(&r);
}

static void test_round_trip_binary_body(void **state)
{
    (void)state;
    uint8_t body[512];
    for (size_t i = 0; i < sizeof(body); i++)
        body[i] = (uint8_t)(i * 31);
    body[0] = body[100] = body[511] = 0;
    struct record r;
    make_record(&r, 0, NULL, NULL, body, sizeof(body));
    r.status = 100;
    r.created_ms = UINT64_MAX;
    round_trip(&r);
    r.status = 599;
    r.created_ms = 0;
    round_trip(&r);
}

static void test_round_trip_1mb_body(void **state)
{
    (void)state;
    size_t n = 1024 * 1024;
    uint8_t *body = malloc(n);
    assert_non_null(body);
    for (size_t i = 0; i < n; i++)
        body[i] = (uint8_t)(i ^ (i >> 8));
    char names[2][16], values[2][16];
    struct record r;
    make_record(&r, 2, names, values, body, n);
    round_trip(&r);
    free(body);
}

/* The exact layout from record.h, byte by byte. */
static void test_encoding_layout(void **state)
{
    (void)state;
    struct record r;
    make_record(&r, 0, NULL, NULL, (const uint8_t *)"ok", 2);
    r.status = 0x0102;
    r.created_ms = 0x0102030405060708ull;
    r.n_headers = 1;
    r.headers[0] = (struct record_header){"A", 1, "bc", 2};
    struct buf b;
    buf_init(&b);
    assert_int_equal(record_encode(&r, &b), 0);
    static const uint8_t want_head[] = {'I', 'G', 'R', 1, 0x01, 0x02, 1, 2, 3, 4, 5, 6, 7, 8};
    static const uint8_t want_tail[] = {0, 1, 0, 1, 'A', 0, 0, 0, 2,   'b', 'c',
                                        0, 0, 0, 0, 0,   0, 0, 2, 'o', 'k'};
    assert_int_equal(buf_size(&b), sizeof(want_head) + 16 + sizeof(want_tail));
    const uint8_t *p = (const uint8_t *)buf_data(&b);
    assert_memory_equal(p, want_head, sizeof(want_head));
    assert_memory_equal(p + sizeof(want_head), test_fp, 16);
    assert_memory_equal(p + sizeof(want_head) + 16, want_tail, sizeof(want_tail));
    buf_free(&b);
}

/* Writer output is what record_encode produces, including when the buffer
 * already holds consumed and unread bytes before the record. */
static void test_writer_matches_encode(void **state)
{
    (void)state;
    char names[4][16], values[4][16];
    struct record r;
    uint8_t body[3000];
    memset(body, 'z', sizeof(body));
    make_record(&r, 4, names, values, body, sizeof(body));

    struct buf want, out;
    buf_init(&want);
    buf_init(&out);
    assert_int_equal(record_encode(&r, &want), 0);

    buf_append(&out, "0123456789", 10);
    buf_consume(&out, 8); /* off > 0: a later growth may compact */
    struct record_writer w;
    record_begin(&w, &out, r.status, r.created_ms, r.fp);
    for (size_t i = 0; i < r.n_headers; i++)
        assert_int_equal(record_add_header(&w, r.headers[i].name, r.headers[i].name_len,
                                           r.headers[i].value, r.headers[i].value_len),
                         0);
    record_begin_body(&w);
    for (size_t i = 0; i < sizeof(body); i += 100)
        buf_append(&out, body + i, 100);
    record_end(&w);

    assert_int_equal(buf_size(&out), 2 + buf_size(&want));
    assert_memory_equal(buf_data(&out), "89", 2);
    assert_memory_equal(buf_data(&out) + 2, buf_data(&want), buf_size(&want));
    buf_free(&want);
    buf_free(&out);
}

static void test_writer_refuses_header_201(void **state)
{
    (void)state;
    struct buf out;
    buf_init(&out);
    struct record_writer w;
    record_begin(&w, &out, 200, 1, test_fp);
    for (int i = 0; i < RECORD_MAX_HEADERS; i++)
        assert_int_equal(record_add_header(&w, "n", 1, "v", 1), 0);
    size_t before = buf_size(&out);
    assert_int_equal(record_add_header(&w, "n", 1, "v", 1), -1);
    assert_int_equal(buf_size(&out), before);
    record_begin_body(&w);
    record_end(&w);
    struct record *d = malloc(sizeof(*d));
    assert_non_null(d);
    assert_int_equal(record_decode((const uint8_t *)buf_data(&out), buf_size(&out), NO_MAX, d), 0);
    assert_int_equal(d->n_headers, RECORD_MAX_HEADERS);
    free(d);
    buf_free(&out);
}

static void test_writer_refuses_long_name(void **state)
{
    (void)state;
    size_t n = 65536;
    char *name = malloc(n);
    assert_non_null(name);
    memset(name, 'a', n);
    struct buf out;
    buf_init(&out);
    struct record_writer w;
    record_begin(&w, &out, 200, 1, test_fp);
    size_t before = buf_size(&out);
    assert_int_equal(record_add_header(&w, name, n, "v", 1), -1);
    assert_int_equal(buf_size(&out), before);
    assert_int_equal(record_add_header(&w, name, n - 1, "v", 1), 0);
    record_begin_body(&w);
    record_end(&w);
    struct record d;
    assert_int_equal(record_decode((const uint8_t *)buf_data(&out), buf_size(&out), NO_MAX, &d), 0);
    assert_int_equal(d.n_headers, 1);
    assert_int_equal(d.headers[0].name_len, n - 1);
    free(name);
    buf_free(&out);
}

static void test_encode_refuses_invalid(void **state)
{
    (void)state;
    struct record r;
    struct buf out;
    buf_init(&out);
    make_record(&r, 0, NULL, NULL, NULL, 0);
    r.status = 99;
    assert_int_equal(record_encode(&r, &out), -1);
    r.status = 600;
    assert_int_equal(record_encode(&r, &out), -1);
    r.status = 200;
    r.n_headers = RECORD_MAX_HEADERS + 1;
    assert_int_equal(record_encode(&r, &out), -1);
    assert_int_equal(buf_size(&out), 0);
    buf_free(&out);
}

/* A small valid encoding with headers and a body, for the refusal tests. */
static void sample_blob(struct buf *b)
{
    char names[3][16], values[3][16];
    struct record r;
    make_record(&r, 3, names, values, (const uint8_t *)"body\0bytes", 10);
    buf_init(b);
    assert_int_equal(record_encode(&r, b), 0);
}

static void test_decode_rejects_every_truncation(void **state)
{
    (void)state;
    struct buf b;
    sample_blob(&b);
    struct record d;
    size_t len = buf_size(&b);
    for (size_t n = 0; n < len; n++) {
        /* A copy of exactly n bytes, so ASan catches any read past it. */
        uint8_t *p = malloc(n ? n : 1);
        assert_non_null(p);
        memcpy(p, buf_data(&b), n);
        assert_int_equal(record_decode(p, n, NO_MAX, &d), -1);
        free(p);
    }
    assert_int_equal(record_decode((const uint8_t *)buf_data(&b), len, NO_MAX, &d), 0);
    buf_free(&b);
}

static void test_decode_rejects_trailing_byte(void **state)
{
    (void)state;
    struct buf b;
    sample_blob(&b);
    struct record d;
    buf_append(&b, "", 1);
    assert_int_equal(record_decode((const uint8_t *)buf_data(&b), buf_size(&b), NO_MAX, &d), -1);
    buf_free(&b);
}

static void test_decode_rejects_bad_magic_and_version(void **state)
{
    (void)state;
    struct buf b;
    sample_blob(&b);
    struct record d;
    uint8_t *p = (uint8_t *)b.p + b.off;
    for (size_t i = 0; i < 4; i++) {
        static const uint8_t flips[] = {0x01, 0x20, 0x80, 0xff};
        for (size_t f = 0; f < sizeof(flips); f++) {
            p[i] ^= flips[f];
            assert_int_equal(record_decode(p, buf_size(&b), NO_MAX, &d), -1);
            p[i] ^= flips[f];
        }
    }
    p[3] = 0;
    assert_int_equal(record_decode(p, buf_size(&b), NO_MAX, &d), -1);
    p[3] = 2;
    assert_int_equal(record_decode(p, buf_size(&b), NO_MAX, &d), -1);
    p[3] = RECORD_VERSION;
    assert_int_equal(record_decode(p, buf_size(&b), NO_MAX, &d), 0);
    buf_free(&b);
}

static void set_status(uint8_t *p, unsigned status)
{
    p[4] = (uint8_t)(status >> 8);
    p[5] = (uint8_t)status;
}

static void test_decode_status_bounds(void **state)
{
    (void)state;
    struct buf b;
    sample_blob(&b);
    struct record d;
    uint8_t *p = (uint8_t *)b.p + b.off;
    static const unsigned bad[] = {0, 99, 600, 0xffff};
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        set_status(p, bad[i]);
        assert_int_equal(record_decode(p, buf_size(&b), NO_MAX, &d), -1);
    }
    set_status(p, 100);
    assert_int_equal(record_decode(p, buf_size(&b), NO_MAX, &d), 0);
    assert_int_equal(d.status, 100);
    set_status(p, 599);
    assert_int_equal(record_decode(p, buf_size(&b), NO_MAX, &d), 0);
    assert_int_equal(d.status, 599);
    buf_free(&b);
}

static void test_decode_rejects_header_count_over_max(void **state)
{
    (void)state;
    struct buf b;
    buf_init(&b);
    struct record r;
    make_record(&r, 0, NULL, NULL, NULL, 0);
    assert_int_equal(record_encode(&r, &b), 0);
    /* Hand-build 201 empty headers after the fixed part. */
    struct buf big;
    buf_init(&big);
    size_t fixed = 3 + 1 + 2 + 8 + 16;
    buf_append(&big, buf_data(&b), fixed);
    uint8_t count[2] = {0, RECORD_MAX_HEADERS + 1};
    buf_append(&big, count, 2);
    static const uint8_t empty_header[6] = {0};
    for (int i = 0; i < RECORD_MAX_HEADERS + 1; i++)
        buf_append(&big, empty_header, 6);
    static const uint8_t no_body[8] = {0};
    buf_append(&big, no_body, 8);
    struct record *d = malloc(sizeof(*d));
    assert_non_null(d);
    uint8_t *p = (uint8_t *)big.p + big.off;
    assert_int_equal(record_decode(p, buf_size(&big), NO_MAX, d), -1);
    /* The same bytes minus one header and with count 200 are fine. */
    p[fixed + 1] = RECORD_MAX_HEADERS;
    memmove(p + fixed + 2 + 6 * RECORD_MAX_HEADERS, p + fixed + 2 + 6 * (RECORD_MAX_HEADERS + 1),
            8);
    assert_int_equal(record_decode(p, buf_size(&big) - 6, NO_MAX, d), 0);
    assert_int_equal(d->n_headers, RECORD_MAX_HEADERS);
    free(d);
    buf_free(&b);
    buf_free(&big);
}

static void test_decode_max_len(void **state)
{
    (void)state;
    struct buf b;
    sample_blob(&b);
    struct record d;
    const uint8_t *p = (const uint8_t *)buf_data(&b);
    size_t len = buf_size(&b);
    assert_int_equal(record_decode(p, len, len - 1, &d), -1);
    assert_int_equal(record_decode(p, len, 0, &d), -1);
    assert_int_equal(record_decode(p, len, len, &d), 0);
    buf_free(&b);
}

/* Lengths near 2^64 / 2^32 must be refused, not wrap an offset. */
static void test_decode_rejects_huge_lengths(void **state)
{
    (void)state;
    struct buf b;
    sample_blob(&b);
    struct record d;
    uint8_t *p = (uint8_t *)b.p + b.off;
    size_t len = buf_size(&b);
    size_t body_len_off = len - 10 - 8;
    memset(p + body_len_off, 0xff, 8);
    assert_int_equal(record_decode(p, len, NO_MAX, &d), -1);
    p[body_len_off] = 0x80;
    assert_int_equal(record_decode(p, len, NO_MAX, &d), -1);
    buf_free(&b);

    sample_blob(&b);
    p = (uint8_t *)b.p + b.off;
    size_t first_value_len_off = 3 + 1 + 2 + 8 + 16 + 2 + 2 + 2; /* name "h0" */
    memset(p + first_value_len_off, 0xff, 4);
    assert_int_equal(record_decode(p, len, NO_MAX, &d), -1);
    buf_free(&b);

    sample_blob(&b);
    p = (uint8_t *)b.p + b.off;
    size_t first_name_len_off = 3 + 1 + 2 + 8 + 16 + 2;
    memset(p + first_name_len_off, 0xff, 2);
    assert_int_equal(record_decode(p, len, NO_MAX, &d), -1);
    buf_free(&b);
}

static void test_decode_slices_point_into_blob(void **state)
{
    (void)state;
    struct buf b;
    sample_blob(&b);
    struct record d;
    const uint8_t *p = (const uint8_t *)buf_data(&b);
    size_t len = buf_size(&b);
    assert_int_equal(record_decode(p, len, NO_MAX, &d), 0);
    for (size_t i = 0; i < d.n_headers; i++) {
        assert_true((const uint8_t *)d.headers[i].name >= p);
        assert_true((const uint8_t *)d.headers[i].value + d.headers[i].value_len <= p + len);
    }
    assert_ptr_equal(d.body + d.body_len, p + len);
    assert_int_equal(d.body_len, 10);
    assert_memory_equal(d.body, "body\0bytes", 10);
    buf_free(&b);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_round_trip_no_headers),
        cmocka_unit_test(test_round_trip_many_headers),
        cmocka_unit_test(test_round_trip_empty_body),
        cmocka_unit_test(test_round_trip_empty_header_name_and_value),
        cmocka_unit_test(test_round_trip_binary_body),
        cmocka_unit_test(test_round_trip_1mb_body),
        cmocka_unit_test(test_encoding_layout),
        cmocka_unit_test(test_writer_matches_encode),
        cmocka_unit_test(test_writer_refuses_header_201),
        cmocka_unit_test(test_writer_refuses_long_name),
        cmocka_unit_test(test_encode_refuses_invalid),
        cmocka_unit_test(test_decode_rejects_every_truncation),
        cmocka_unit_test(test_decode_rejects_trailing_byte),
        cmocka_unit_test(test_decode_rejects_bad_magic_and_version),
        cmocka_unit_test(test_decode_status_bounds),
        cmocka_unit_test(test_decode_rejects_header_count_over_max),
        cmocka_unit_test(test_decode_max_len),
        cmocka_unit_test(test_decode_rejects_huge_lengths),
        cmocka_unit_test(test_decode_slices_point_into_blob),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
