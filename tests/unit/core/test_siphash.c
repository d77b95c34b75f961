/* test_siphash.c — SipHash-2-4 (siphash.c) against the test vector of the
 * SipHash paper (appendix A: key 00 01 .. 0f, the 15-byte message
 * 00 01 .. 0e); SipHash-1-3, the same code with other round counts,
 * against values of another implementation (CPython 3.11's hash() of
 * bytes is SipHash-1-3, with the all-zero key under PYTHONHASHSEED=0); and
 * the properties the memory store relies on: every length's tail handled,
 * and the key changes everything. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include "idemgate/core/siphash.h"

#include <stdint.h>
#include <string.h>

static void seq(uint8_t *out, size_t n)
{
    for (size_t i = 0; i < n; i++)
        out[i] = (uint8_t)i;
}

static void test_paper_vector(void **state)
{
    (void)state;
    uint8_t key[SIPHASH_KEY_LEN], msg[15];
    seq(key, sizeof(key));
    seq(msg, sizeof(msg));
    assert_true(siphash24(key, msg, sizeof(msg)) == 0xa129ca6149be45e5ULL);
}

/* Printed by: PYTHONHASHSEED=0 python3 -c 'print(hash(b"abc") % 2**64)'
 * (CPython 3.11, sys.hash_info.algorithm == "siphash13"). */
static void test_siphash13_cross_check(void **state)
{
    (void)state;
    static const uint8_t zero[SIPHASH_KEY_LEN] = {0};
    static const struct {
        const char *msg;
        uint64_t h;
    } v[] = {
        {"a", 4644417185603328019ULL},
        {"abc", 13851880170939887858ULL},
        {"12345678", 3785724242978802311ULL},
        {"idem:{anonymous:order-1}", 13606907021863652117ULL},
        {"0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdefX",
         7727126501230072440ULL},
    };
    for (size_t i = 0; i < sizeof(v) / sizeof(v[0]); i++)
        assert_true(siphash13(zero, v[i].msg, strlen(v[i].msg)) == v[i].h);
    uint8_t msg[15];
    seq(msg, sizeof(msg));
    assert_true(siphash13(zero, msg, sizeof(msg)) == 17514137373579004394ULL);
}

/* Every length from 0 to 64 hashes differently from its neighbours, and
 * bytes past len are never read (they differ between the two buffers). */
static void test_lengths_and_tails(void **state)
{
    (void)state;
    uint8_t key[SIPHASH_KEY_LEN], a[80], b[80];
    seq(key, sizeof(key));
    seq(a, sizeof(a));
    seq(b, sizeof(b));
    uint64_t prev = siphash24(key, NULL, 0);
    for (size_t n = 1; n <= 64; n++) {
        memset(b + n, 0xee, sizeof(b) - n);
        uint64_t h = siphash24(key, a, n);
        assert_true(h == siphash24(key, b, n));
        assert_true(siphash13(key, a, n) == siphash13(key, b, n));
        assert_true(h != prev);
        prev = h;
        seq(b, sizeof(b));
    }
    /* a message and the same message with a zero byte appended differ
     * (the length is in the last word) */
    uint8_t z[9] = {1, 2, 3, 4, 5, 6, 7, 0, 0};
    assert_true(siphash24(key, z, 7) != siphash24(key, z, 8));
    assert_true(siphash24(key, z, 8) != siphash24(key, z, 9));
}

/* siphash13_split gives both hashes, for every split of every length. */
static void test_siphash13_split(void **state)
{
    (void)state;
    uint8_t key[SIPHASH_KEY_LEN], msg[80];
    seq(key, sizeof(key));
    for (size_t i = 0; i < sizeof(msg); i++)
        msg[i] = (uint8_t)(i * 37 + 11);
    for (size_t len = 0; len <= sizeof(msg); len++) {
        for (size_t split = 0; split <= len; split++) {
            uint64_t head = 0;
            assert_true(siphash13_split(key, msg, len, split, &head) == siphash13(key, msg, len));
            assert_true(head == siphash13(key, msg, split));
        }
    }
    uint64_t head = 0; /* a split past the end is the end */
    assert_true(siphash13_split(key, msg, 16, 40, &head) == siphash13(key, msg, 16));
    assert_true(head == siphash13(key, msg, 16));
}

static void test_key_matters(void **state)
{
    (void)state;
    uint8_t k1[SIPHASH_KEY_LEN], k2[SIPHASH_KEY_LEN];
    seq(k1, sizeof(k1));
    seq(k2, sizeof(k2));
    k2[15] ^= 0x80;
    const char *m = "idem:{anonymous:order-1}";
    assert_true(siphash24(k1, m, strlen(m)) != siphash24(k2, m, strlen(m)));
    assert_true(siphash13(k1, m, strlen(m)) != siphash13(k2, m, strlen(m)));
    k2[15] ^= 0x80;
    k2[0] ^= 1;
    assert_true(siphash24(k1, m, strlen(m)) != siphash24(k2, m, strlen(m)));
    assert_true(siphash13(k1, m, strlen(m)) != siphash13(k2, m, strlen(m)));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_paper_vector),    cmocka_unit_test(test_siphash13_cross_check),
        cmocka_unit_test(test_siphash13_split), cmocka_unit_test(test_lengths_and_tails),
        cmocka_unit_test(test_key_matters),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
