/* store_bench.c — a micro-benchmark of the memory store (src/store/memory/)
 * through the store API, callbacks and event loop included: the bytes one
 * stored record costs (from the store's own accounting and from the RSS
 * delta), and acquire / complete / replay operations per second with 1 and
 * 2 worker threads sharing one table; then a full store evicting, with one
 * scope and with keys spread over many scopes (credentials), where every
 * eviction goes through the heap of scopes. Prints numbers; asserts
 * nothing.
 *
 * Usage: store_bench [records (default 100000)] [record bytes (default 200)]
 *        store_bench lmdb DIR [records] [record bytes]: the same three
 *        operations on the memory store and on an LMDB store in DIR (sync
 *        "os", then "fsync" on a tenth of the records), one thread. */
#include "idemgate/store/store.h"

#include <event2/event.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define BATCH 64 /* operations in flight per loop turn */

static const char TOKEN[STORE_TOKEN_LEN + 1] = "0123456789abcdef0123456789abcdef";
static const uint8_t FP[STORE_FP_LEN] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16};

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static long rss_kib(void)
{
    FILE *f = fopen("/proc/self/status", "r");
    char line[256];
    long kib = -1;
    if (!f) return -1;
    while (fgets(line, sizeof(line), f))
        if (strncmp(line, "VmRSS:", 6) == 0) kib = strtol(line + 6, NULL, 10);
    fclose(f);
    return kib;
}

/* A realistic skey: 64 hex chars of scope, ':', a 36-char UUID-like key;
 * with scopes > 1, key i is in scope i % scopes. */
static size_t make_skey(char *out, size_t n, int thread, long i, long scopes)
{
    return (size_t)snprintf(out, n,
                            "5f0c9a1be2d34c7f8a6b0e91d2c3f4a5b6c7d8e9f0a1b2c3d4e5f6a7%08lx:"
                            "%08x-0000-4000-8000-%012lx",
                            scopes > 1 ? i % scopes : 0xb8c9d0e1L, (unsigned)thread, i);
}

struct pending {
    int left;
    int bad;
};

static void acq_cb(void *arg, const struct store_acquire_reply *r)
{
    struct pending *p = arg;
    p->left--;
    if (r->state == STORE_ACQ_ERROR) p->bad++;
}

static void done_cb(void *arg, int status)
{
    struct pending *p = arg;
    p->left--;
    if (status != 1) p->bad++;
}

/* PH_CYCLE: each batch is acquired, then completed (2 operations a key). */
enum phase { PH_ACQUIRE, PH_COMPLETE, PH_REPLAY, PH_CYCLE };

struct worker {
    struct store_memory_shared *sh;
    struct store_lmdb_env *lenv; /* set: the LMDB store instead */
    int id;
    long n;
    size_t rec_len;
    enum phase phase;
    long scopes;
    int bad;
};

/* Issues keys [i, i + BATCH) of one kind and waits for every answer. */
static void batch(struct worker *w, struct store *st, struct event_base *base, const uint8_t *rec,
                  long i, bool complete)
{
    char k[160];
    struct pending p = {0, 0};
    for (long j = i; j < i + BATCH && j < w->n; j++) {
        size_t kl = make_skey(k, sizeof(k), w->id, j, w->scopes);
        p.left++;
        if (complete)
            store_complete(st, k, kl, TOKEN, rec, w->rec_len, 86400, done_cb, &p);
        else
            store_acquire(st, &(struct store_acquire_req){k, kl, FP, TOKEN, 30000, NULL, NULL, 0},
                          acq_cb, &p);
    }
    while (p.left > 0)
        event_base_loop(base, EVLOOP_ONCE);
    w->bad += p.bad;
}

/* Runs one phase over this worker's keys, BATCH operations at a time. */
static void *worker_run(void *arg)
{
    struct worker *w = arg;
    struct event_base *base = event_base_new();
    struct store *st =
        w->lenv ? store_lmdb_new(base, w->lenv) : store_memory_new(base, w->sh, 1000);
    uint8_t *rec = malloc(w->rec_len ? w->rec_len : 1);
    memset(rec, 'r', w->rec_len);
    for (long i = 0; i < w->n; i += BATCH) {
        if (w->phase != PH_COMPLETE) batch(w, st, base, rec, i, false);
        if (w->phase == PH_COMPLETE || w->phase == PH_CYCLE) batch(w, st, base, rec, i, true);
    }
    free(rec);
    store_free(st);
    event_base_free(base);
    return NULL;
}

/* One phase on nthreads workers; returns operations per second. */
static double run_phase_scoped(struct store_memory_shared *sh, int nthreads, long n, size_t rec_len,
                               enum phase ph, int id_base, long scopes)
{
    struct worker w[8];
    pthread_t th[8];
    double t0 = now_s();
    for (int i = 0; i < nthreads; i++) {
        w[i] = (struct worker){sh, NULL, id_base + i, n / nthreads, rec_len, ph, scopes, 0};
        if (pthread_create(&th[i], NULL, worker_run, &w[i]) != 0) abort();
    }
    int bad = 0;
    for (int i = 0; i < nthreads; i++) {
        pthread_join(th[i], NULL);
        bad += w[i].bad;
    }
    double dt = now_s() - t0;
    if (bad) fprintf(stderr, "store_bench: %d operations did not succeed\n", bad);
    return (double)(n / nthreads * nthreads) * (ph == PH_CYCLE ? 2 : 1) / dt;
}

static double run_phase(struct store_memory_shared *sh, int nthreads, long n, size_t rec_len,
                        enum phase ph, int id_base)
{
    return run_phase_scoped(sh, nthreads, n, rec_len, ph, id_base, 1);
}

static void bench_threads(int nthreads, long n, size_t rec_len)
{
    struct store_memory_shared *sh = store_memory_shared_new("idem:", 0);
    double a = run_phase(sh, nthreads, n, rec_len, PH_ACQUIRE, 100);
    double c = run_phase(sh, nthreads, n, rec_len, PH_COMPLETE, 100);
    double r = run_phase(sh, nthreads, n, rec_len, PH_REPLAY, 100);
    printf("%d thread(s): acquire (new key) %9.0f ops/s   complete %9.0f ops/s   "
           "acquire (replay) %9.0f ops/s\n",
           nthreads, a, c, r);
    store_memory_shared_free(sh);
}

/* Steady state of a full store: every new record evicts the oldest of
 * the largest scope. */
static void bench_evicting(long n, size_t rec_len, long scopes)
{
    struct store_memory_shared *sh = store_memory_shared_new("idem:", 8u << 20);
    run_phase_scoped(sh, 1, n, rec_len, PH_CYCLE, 200, scopes);
    double ops = run_phase_scoped(sh, 1, n, rec_len, PH_CYCLE, 300, scopes);
    struct store_memory_stats st;
    store_memory_shared_stats(sh, &st);
    printf("1 thread, full 8 MiB store, %6ld scope(s): acquire+complete %9.0f ops/s   "
           "(%llu evictions, %zu scopes, %llu bytes used)\n",
           scopes, ops, (unsigned long long)st.evictions, st.scopes, (unsigned long long)st.bytes);
    store_memory_shared_free(sh);
}

/* One thread's acquire (new keys), complete, acquire (replays) on the
 * LMDB store in dir, next to the memory store's. */
static void lmdb_phases(const char *name, struct store_lmdb_env *env, long n, size_t rec_len)
{
    double r[3];
    enum phase ph[3] = {PH_ACQUIRE, PH_COMPLETE, PH_REPLAY};
    for (int i = 0; i < 3; i++) {
        struct worker w = {NULL, env, 400, n, rec_len, ph[i], 1, 0};
        double t0 = now_s();
        worker_run(&w);
        r[i] = (double)n / (now_s() - t0);
        if (w.bad) fprintf(stderr, "store_bench: %d operations did not succeed\n", w.bad);
    }
    printf("%-12s acquire (new key) %9.0f ops/s   complete %9.0f ops/s   acquire (replay) %9.0f "
           "ops/s\n",
           name, r[0], r[1], r[2]);
}

static int bench_lmdb(const char *dir, long n, size_t rec_len)
{
    bench_threads(1, n, rec_len);
    for (int fsync = 0; fsync < 2; fsync++) {
        char path[512], err[512];
        snprintf(path, sizeof(path), "%s/%s", dir, fsync ? "fsync" : "os");
        struct store_lmdb_opts o = {path, 1ull << 30, 0, fsync == 1};
        struct store_lmdb_env *env;
        if (store_lmdb_env_open(&o, &env, err, sizeof(err)) < 0) {
            fprintf(stderr, "store_bench: %s\n", err);
            return 1;
        }
        lmdb_phases(fsync ? "lmdb fsync:" : "lmdb os:", env, fsync ? n / 10 : n, rec_len);
        store_lmdb_env_free(env);
    }
    return 0;
}

int main(int argc, char **argv)
{
    if (argc > 2 && strcmp(argv[1], "lmdb") == 0)
        return bench_lmdb(argv[2], argc > 3 ? atol(argv[3]) : 100000,
                          argc > 4 ? (size_t)atol(argv[4]) : 200);
    long n = argc > 1 ? atol(argv[1]) : 100000;
    size_t rec_len = argc > 2 ? (size_t)atol(argv[2]) : 200;
    if (n <= 0) n = 100000;

    /* bytes per record: n completed records of rec_len bytes */
    struct store_memory_shared *sh = store_memory_shared_new("idem:", 0);
    struct store_memory_stats before, after;
    store_memory_shared_stats(sh, &before);
    long rss0 = rss_kib();
    run_phase(sh, 1, n, rec_len, PH_ACQUIRE, 0);
    run_phase(sh, 1, n, rec_len, PH_COMPLETE, 0);
    long rss1 = rss_kib();
    store_memory_shared_stats(sh, &after);
    char k[160];
    size_t key_len = make_skey(k, sizeof(k), 0, 0, 1) + strlen("idem:{}");
    printf("%ld records, %zu-byte record, %zu-byte key:\n", n, rec_len, key_len);
    printf("  accounted: %.1f bytes/record (entries %.1f + table %.1f); %zu buckets\n",
           (double)(after.bytes - before.bytes) / (double)n,
           (double)(after.entry_bytes - before.entry_bytes) / (double)n,
           (double)((after.bytes - after.entry_bytes) - (before.bytes - before.entry_bytes)) /
               (double)n,
           after.buckets);
    printf("  RSS delta: %.1f bytes/record (%ld KiB -> %ld KiB)\n",
           (double)(rss1 - rss0) * 1024.0 / (double)n, rss0, rss1);
    store_memory_shared_free(sh);

    bench_threads(1, n, rec_len);
    bench_threads(2, n, rec_len);
    bench_evicting(n, rec_len, 1);
    bench_evicting(n, rec_len, 10000);
    return 0;
}
