/* test_listen.c — the address claims (net/listen.h) inside one process:
 * the kernel refuses a second bind of an abstract name within a process as
 * it does across processes, so one test can play several idemgates. Claims
 * are names only (no TCP socket is bound); ports 1..99 keep them apart from
 * any real idemgate on this host. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#include <cmocka.h>

#include "idemgate/net/listen.h"

static const char *const kinds[] = {"memory", "redis", "lmdb", NULL};
static const struct listen_store_id memory = {"memory", NULL, true};
static const struct listen_store_id redis = {"redis", NULL, false};

static struct sockaddr_storage addr(const char *host, int port)
{
    struct sockaddr_storage ss;
    socklen_t sl;
    char err[128], text[64];
    snprintf(text, sizeof(text), "%s:%d", host, port);
    assert_int_equal(listen_resolve(host, port, text, &ss, &sl, err, sizeof(err)), 0);
    return ss;
}

static struct listen_claim *take(const char *host, int port, const struct listen_store_id *id,
                                 char *err, size_t errlen)
{
    struct sockaddr_storage ss = addr(host, port);
    err[0] = '\0';
    struct listen_claim *c = listen_claim_take((struct sockaddr *)&ss, id, kinds, err, errlen);
    listen_claim_settled(c);
    return c;
}

static void refused(const char *host, int port, const struct listen_store_id *id, const char *why)
{
    char err[256];
    struct listen_claim *c = take(host, port, id, err, sizeof(err));
    assert_null(c);
    assert_string_equal(err, why);
}

static struct listen_claim *taken(const char *host, int port, const struct listen_store_id *id)
{
    char err[256];
    struct listen_claim *c = take(host, port, id, err, sizeof(err));
    if (!c) fail_msg("refused: %s", err);
    return c;
}

static void test_memory_is_exclusive(void **state)
{
    (void)state;
    struct listen_claim *m = taken("127.0.0.1", 11, &memory);
    refused("127.0.0.1", 11, &memory, "held by another idemgate using the memory store");
    refused("127.0.0.1", 11, &redis, "held by another idemgate using the memory store");
    listen_claim_free(m); /* the process exits: its claim goes with it */
    struct listen_claim *r = taken("127.0.0.1", 11, &redis);
    listen_claim_free(r);
}

static void test_redis_shares_with_redis_only(void **state)
{
    (void)state;
    struct listen_claim *a = taken("127.0.0.1", 12, &redis);
    struct listen_claim *b = taken("127.0.0.1", 12, &redis);
    refused("127.0.0.1", 12, &memory, "held by another idemgate using the redis store");
    listen_claim_free(a);
    refused("127.0.0.1", 12, &memory, "held by another idemgate using the redis store");
    listen_claim_free(b);
    listen_claim_free(taken("127.0.0.1", 12, &memory));
}

static void test_wildcard_overlaps(void **state)
{
    (void)state;
    struct listen_claim *m = taken("127.0.0.1", 13, &memory);
    refused("0.0.0.0", 13, &redis, "held by another idemgate using the memory store");
    /* another specific address on the same port does not overlap */
    struct listen_claim *m2 = taken("127.0.0.2", 13, &memory);
    listen_claim_free(m);
    listen_claim_free(m2);

    struct listen_claim *w = taken("0.0.0.0", 14, &memory);
    refused("127.0.0.1", 14, &redis, "held by another idemgate using the memory store");
    refused("0.0.0.0", 14, &redis, "held by another idemgate using the memory store");
    listen_claim_free(w);

    struct listen_claim *r = taken("0.0.0.0", 15, &redis);
    struct listen_claim *r2 = taken("127.0.0.1", 15, &redis);
    refused("127.0.0.2", 15, &memory, "held by another idemgate using the redis store");
    listen_claim_free(r);
    listen_claim_free(r2);
}

static void test_families_apart(void **state)
{
    (void)state;
    /* IPv6 listeners are V6ONLY: [::]:P and 0.0.0.0:P are two addresses */
    struct listen_claim *v4 = taken("0.0.0.0", 16, &memory);
    struct listen_claim *v6 = taken("::", 16, &memory);
    refused("::1", 16, &redis, "held by another idemgate using the memory store");
    listen_claim_free(v4);
    listen_claim_free(v6);
}

static void test_detail_must_match(void **state)
{
    (void)state;
    struct listen_store_id a = {"lmdb", "/var/lib/idemgate", false};
    struct listen_store_id a2 = {"lmdb", "/var/lib/idemgate", false};
    struct listen_store_id b = {"lmdb", "/srv/other", false};
    struct listen_claim *c1 = taken("127.0.0.1", 17, &a);
    struct listen_claim *c2 = taken("127.0.0.1", 17, &a2);
    refused("127.0.0.1", 17, &b, "held by another idemgate using another lmdb store");
    refused("127.0.0.1", 17, &redis, "held by another idemgate using the lmdb store");
    refused("127.0.0.1", 17, &memory, "held by another idemgate using the lmdb store");
    listen_claim_free(c1);
    listen_claim_free(c2);
}

static void test_unknown_kind_still_counts(void **state)
{
    (void)state;
    /* a newer binary's store, which this one cannot name */
    struct listen_store_id future = {"future", NULL, false};
    struct listen_claim *f = taken("127.0.0.1", 18, &future);
    refused("127.0.0.1", 18, &redis, "held by another idemgate using another store");
    listen_claim_free(f);
}

static void test_slots_run_out(void **state)
{
    (void)state;
    struct listen_claim *c[LISTEN_CLAIM_SLOTS];
    for (int i = 0; i < LISTEN_CLAIM_SLOTS; i++)
        c[i] = taken("127.0.0.1", 19, &redis);
    char why[64];
    snprintf(why, sizeof(why), "%d idemgate processes already share it", LISTEN_CLAIM_SLOTS);
    refused("127.0.0.1", 19, &redis, why);
    listen_claim_free(c[3]); /* a gap: the next one takes it */
    c[3] = taken("127.0.0.1", 19, &redis);
    for (int i = 0; i < LISTEN_CLAIM_SLOTS; i++)
        listen_claim_free(c[i]);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_memory_is_exclusive),
        cmocka_unit_test(test_redis_shares_with_redis_only),
        cmocka_unit_test(test_wildcard_overlaps),
        cmocka_unit_test(test_families_apart),
        cmocka_unit_test(test_detail_must_match),
        cmocka_unit_test(test_unknown_kind_still_counts),
        cmocka_unit_test(test_slots_run_out),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
