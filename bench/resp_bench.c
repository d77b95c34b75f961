/* resp_bench.c — our RESP parser (src/store/redis/resp.c) against hiredis
 * 0.14's redisReader on the replies the Redis store sees most: a 300-byte
 * bulk string (a stored record), nil, :1, an array of 2. Not a test; built
 * only on request:
 *
 *   cmake --build build --target resp_bench
 *   build/resp_bench [ITERATIONS] [ours|hiredis|both]
 *   valgrind --tool=callgrind --callgrind-out-file=/dev/null \
 *     --toggle-collect='run_*' build/resp_bench 100000 ours [0-3]
 *
 * One reply at a time, as a connection gets them: ours parses bytes
 * already in the connection's buffer (nothing copied, nodes in a reused
 * arena); hiredis's reader is fed the bytes (copied into its buffer),
 * builds a redisReply (malloc per reply and per string), which is freed.
 * Prints ns/reply per reply and over all four; with callgrind, the
 * "Collected" instruction count divided by 4 x ITERATIONS (ITERATIONS with
 * a reply index: 0 bulk300, 1 nil, 2 :1, 3 array2) is instructions per
 * reply. */
#include <hiredis/hiredis.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "resp.h"

struct sample {
    const char *name;
    char *p;
    size_t n;
};

static struct sample samples[4];
static volatile size_t sink;

static void make_samples(void)
{
    static char bulk[6 + 300 + 2];
    memcpy(bulk, "$300\r\n", 6);
    memset(bulk + 6, 'r', 300);
    memcpy(bulk + 306, "\r\n", 2);
    samples[0] = (struct sample){"bulk300", bulk, sizeof(bulk)};
    samples[1] = (struct sample){"nil", "$-1\r\n", 5};
    samples[2] = (struct sample){":1", ":1\r\n", 4};
    samples[3] = (struct sample){"array2", "*2\r\n$3\r\nfoo\r\n:1\r\n", 17};
}

__attribute__((noinline)) static void run_ours(const struct sample *s, int nsamples, long iters)
{
    struct resp_arena a;
    resp_arena_init(&a);
    size_t acc = 0;
    for (long i = 0; i < iters; i++)
        for (int k = 0; k < nsamples; k++) {
            struct rreply *r;
            size_t consumed;
            if (resp_parse(s[k].p, s[k].n, &a, &r, &consumed) != 1) abort();
            acc += consumed + (size_t)r->type;
        }
    resp_arena_free(&a);
    sink += acc;
}

__attribute__((noinline)) static void run_hiredis(const struct sample *s, int nsamples, long iters)
{
    redisReader *rd = redisReaderCreate();
    size_t acc = 0;
    for (long i = 0; i < iters; i++)
        for (int k = 0; k < nsamples; k++) {
            void *reply;
            if (redisReaderFeed(rd, s[k].p, s[k].n) != REDIS_OK) abort();
            if (redisReaderGetReply(rd, &reply) != REDIS_OK || !reply) abort();
            acc += (size_t)((redisReply *)reply)->type;
            freeReplyObject(reply);
        }
    redisReaderFree(rd);
    sink += acc;
}

static double now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e9 + ts.tv_nsec;
}

static void bench(const char *who, void (*run)(const struct sample *, int, long), long iters)
{
    run(samples, 4, iters / 10 + 1); /* warm up */
    for (int k = 0; k < 4; k++) {
        double t0 = now_ns();
        run(&samples[k], 1, iters);
        printf("%-8s %-8s %7.1f ns/reply\n", who, samples[k].name, (now_ns() - t0) / iters);
    }
    double t0 = now_ns();
    run(samples, 4, iters);
    printf("%-8s %-8s %7.1f ns/reply\n", who, "all 4", (now_ns() - t0) / (4.0 * iters));
}

int main(int argc, char **argv)
{
    long iters = argc > 1 ? atol(argv[1]) : 1000000;
    const char *which = argc > 2 ? argv[2] : "both";
    /* For callgrind: one pass over all four replies, or over one (0..3). */
    int only = argc > 3 ? atoi(argv[3]) : -1;
    const struct sample *s = only >= 0 && only < 4 ? &samples[only] : samples;
    int ns = only >= 0 && only < 4 ? 1 : 4;
    make_samples();
    if (!strcmp(which, "ours")) {
        run_ours(s, ns, iters);
        return 0;
    }
    if (!strcmp(which, "hiredis")) {
        run_hiredis(s, ns, iters);
        return 0;
    }
    bench("ours", run_ours, iters);
    bench("hiredis", run_hiredis, iters);
    return 0;
}
