/* test_store.c — the store contract, run against the three backends
 * (memory, a real redis-server started on a free 127.0.0.1 port, and LMDB
 * in a fresh directory per test; LMDB's own cases are in
 * test_store_lmdb.c), plus the Redis
 * backend's own cases: key layout, NOSCRIPT reload, Redis killed and
 * restarted, a stuck server (SIGSTOP) hitting the deadline, WAIT with too
 * few replicas, unix socket, AUTH and SELECT; and the memory backend's
 * own: its bound, eviction order, per-scope limits (max_scope_bytes, the
 * largest scope first, locks never), and its bookkeeping freed. Every wait drives a real
 * event_base and is bounded in time. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include "idemgate/core/buf.h"
#include "idemgate/config/config.h"
#include "idemgate/core/metrics.h"
#include "idemgate/net/tls.h"
#include "idemgate/store/store.h"
#include "store_testlib.h"

#include <event2/event.h>
#include <fcntl.h>
#include <hiredis/hiredis.h>
#include <pthread.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>

/* ---- the redis-server under test ---- */

static pid_t redis_pid = -1;
static int redis_port;
static char redis_dir[64];
static char redis_sock[128];

static redisContext *redis_sync(void)
{
    struct timeval tv = {1, 0};
    redisContext *c = redisConnectWithTimeout("127.0.0.1", redis_port, tv);
    if (c && c->err) {
        redisFree(c);
        return NULL;
    }
    return c;
}

static bool redis_answers(void)
{
    redisContext *c = redis_sync();
    if (!c) return false;
    redisReply *r = redisCommand(c, "PING");
    bool ok = r && r->type == REDIS_REPLY_STATUS;
    if (r) freeReplyObject(r);
    redisFree(c);
    return ok;
}

static int redis_start(void)
{
    char port[16];
    snprintf(port, sizeof(port), "%d", redis_port);
    pid_t pid = fork();
    if (pid < 0) return -1;
    if (pid == 0) {
        int devnull = open("/dev/null", O_RDWR);
        dup2(devnull, 1);
        dup2(devnull, 2);
        execlp("redis-server", "redis-server", "--port", port, "--save", "", "--appendonly", "no",
               "--bind", "127.0.0.1", "--unixsocket", redis_sock, "--unixsocketperm", "700",
               "--dir", redis_dir, (char *)NULL);
        _exit(127);
    }
    redis_pid = pid;
    uint64_t end = now_ms() + 10000;
    while (now_ms() < end) {
        if (redis_answers()) return 0;
        usleep(20000);
    }
    return -1;
}

static void redis_stop(void)
{
    stop_pid(&redis_pid);
}

static int group_setup(void **state)
{
    (void)state;
    snprintf(redis_dir, sizeof(redis_dir), "/tmp/idemgate-test-store-XXXXXX");
    if (!mkdtemp(redis_dir)) return -1;
    snprintf(redis_sock, sizeof(redis_sock), "%s/redis.sock", redis_dir);
    redis_port = free_port();
    if (redis_port <= 0) return -1;
    return redis_start();
}

static int group_teardown(void **state)
{
    (void)state;
    redis_stop();
    unlink(redis_sock);
    rmdir(redis_dir);
    return 0;
}

/* ---- per-test fixture: one event_base, one store ---- */

struct backend {
    const char *name;
    bool redis;
    bool lmdb;
    bool fsync; /* lmdb.sync "fsync": the writer thread's group commits */
};

static const struct backend be_memory = {"memory", false, false, false};
static const struct backend be_redis = {"redis", true, false, false};
static const struct backend be_lmdb = {"lmdb", false, true, false};
static const struct backend be_lmdb_fsync = {"lmdb-fsync", false, true, true};

struct ctx {
    const struct backend *be;
    struct event_base *base;
    struct event *tick; /* wakes the loop so that every wait stays bounded */
    struct cfg cfg;
    struct store_memory_shared *sh;
    struct store *st;
    struct tls_set *tls;         /* rediss:// cases only */
    struct store_lmdb_env *lmdb; /* the LMDB cases: in lmdb_dir */
    char lmdb_dir[64];
};

static void fill_cfg(struct cfg *c)
{
    memset(c, 0, sizeof(*c));
    c->store = CFG_STORE_REDIS;
    c->redis.mode = CFG_REDIS_STANDALONE;
    c->redis.host = "127.0.0.1";
    c->redis.port = redis_port;
    c->redis.key_prefix = PREFIX;
    c->redis.timeout_ms = 1000;
}

static struct store *ctx_new_store(struct ctx *c)
{
    if (c->be->redis) return store_redis_new(c->base, &c->cfg, c->tls);
    if (c->be->lmdb) return store_lmdb_new(c->base, c->lmdb);
    return store_memory_new(c->base, c->sh, c->cfg.redis.timeout_ms);
}

static int ctx_setup(void **state)
{
    struct ctx *c = calloc(1, sizeof(*c));
    c->be = *state;
    c->base = event_base_new();
    c->tick = stl_tick_new(c->base);
    fill_cfg(&c->cfg);
    c->sh = store_memory_shared_new(PREFIX, 0);
    if (c->be->lmdb) {
        snprintf(c->lmdb_dir, sizeof(c->lmdb_dir), "/tmp/idemgate-test-lmdb-XXXXXX");
        if (!mkdtemp(c->lmdb_dir)) return -1;
        struct store_lmdb_opts o = {c->lmdb_dir, 64u << 20, 0, c->be->fsync};
        char err[256];
        if (store_lmdb_env_open(&o, &c->lmdb, err, sizeof(err)) < 0) {
            fprintf(stderr, "%s\n", err);
            return -1;
        }
    }
    c->st = ctx_new_store(c);
    *state = c;
    return 0;
}

static int ctx_teardown(void **state)
{
    struct ctx *c = *state;
    store_free(c->st);
    store_memory_shared_free(c->sh);
    if (c->lmdb) {
        store_lmdb_env_free(c->lmdb);
        char cmd[128];
        snprintf(cmd, sizeof(cmd), "rm -rf %s", c->lmdb_dir);
        if (system(cmd) != 0) fprintf(stderr, "cannot remove %s\n", c->lmdb_dir);
    }
    event_free(c->tick);
    event_base_free(c->base);
    free(c);
    return 0;
}

static void run_until(struct ctx *c, const bool *done, int max_ms)
{
    stl_run_until(c->base, done, max_ms);
}

static void run_for(struct ctx *c, int ms)
{
    stl_run_for(c->base, ms);
}

/* ---- operations, driven to their answer (store_testlib) ---- */

static enum store_acquire_state acquire_full(struct ctx *c, struct store *st, const char *skey,
                                             const uint8_t *fp, const char *token, uint32_t lock_ms,
                                             struct acq_res *res)
{
    return stl_acquire(c->base, st, skey, fp, token, lock_ms, res);
}

static enum store_acquire_state acquire(struct ctx *c, const char *skey, const uint8_t *fp,
                                        const char *token, uint32_t lock_ms)
{
    struct acq_res res;
    return stl_acquire(c->base, c->st, skey, fp, token, lock_ms, &res);
}

static int complete(struct ctx *c, const char *skey, const char *token, const uint8_t *rec,
                    size_t len, uint32_t ttl)
{
    return stl_complete(c->base, c->st, skey, token, rec, len, ttl);
}

static int release(struct ctx *c, const char *skey, const char *token)
{
    return stl_release(c->base, c->st, skey, token);
}

static int renew(struct ctx *c, const char *skey, const char *token, uint32_t lock_ms)
{
    return stl_renew(c->base, c->st, skey, token, lock_ms);
}

static int ping(struct ctx *c)
{
    return stl_ping(c->base, c->st);
}

/* A binary record with NULs and every byte value. */
static size_t make_record(uint8_t *buf)
{
    for (size_t i = 0; i < 600; i++)
        buf[i] = (uint8_t)(i * 7);
    buf[0] = 0;
    buf[599] = 0;
    return 600;
}

/* ---- the contract, both backends ---- */

static void test_acquire_states(void **state)
{
    struct ctx *c = *state;
    char k[64];
    unique_skey(k, sizeof(k), "states");
    assert_int_equal(acquire(c, k, FP_1, TOKEN_A, 10000), STORE_ACQ_LOCKED);
    assert_int_equal(acquire(c, k, FP_1, TOKEN_B, 10000), STORE_ACQ_IN_PROGRESS);
    assert_int_equal(acquire(c, k, FP_2, TOKEN_B, 10000), STORE_ACQ_MISMATCH);
    /* the owner asking again is still "in progress", not a second lock */
    assert_int_equal(acquire(c, k, FP_1, TOKEN_A, 10000), STORE_ACQ_IN_PROGRESS);
}

static void test_scopes_are_independent(void **state)
{
    struct ctx *c = *state;
    char k1[64], k2[64];
    unique_skey(k1, sizeof(k1), "same-key");
    unique_skey(k2, sizeof(k2), "same-key");
    assert_int_equal(acquire(c, k1, FP_1, TOKEN_A, 10000), STORE_ACQ_LOCKED);
    assert_int_equal(acquire(c, k2, FP_2, TOKEN_B, 10000), STORE_ACQ_LOCKED);
}

static void test_complete_and_replay(void **state)
{
    struct ctx *c = *state;
    char k[64];
    uint8_t rec[600];
    size_t n = make_record(rec);
    unique_skey(k, sizeof(k), "complete");
    assert_int_equal(acquire(c, k, FP_1, TOKEN_A, 10000), STORE_ACQ_LOCKED);
    assert_int_equal(complete(c, k, TOKEN_B, rec, n, 60), 0);
    assert_int_equal(acquire(c, k, FP_1, TOKEN_B, 10000), STORE_ACQ_IN_PROGRESS);
    assert_int_equal(complete(c, k, TOKEN_A, rec, n, 60), 1);

    struct acq_res res;
    assert_int_equal(acquire_full(c, c->st, k, FP_1, TOKEN_B, 10000, &res), STORE_ACQ_COMPLETED);
    assert_int_equal(res.rec_len, n);
    assert_memory_equal(res.rec, rec, n);
    assert_int_equal(acquire(c, k, FP_2, TOKEN_B, 10000), STORE_ACQ_MISMATCH);

    /* a completed record has no owner any more */
    assert_int_equal(complete(c, k, TOKEN_A, rec, n, 60), 0);
    assert_int_equal(release(c, k, TOKEN_A), 0);
    assert_int_equal(renew(c, k, TOKEN_A, 10000), 0);
    assert_int_equal(acquire(c, k, FP_1, TOKEN_B, 10000), STORE_ACQ_COMPLETED);
}

static void test_empty_record(void **state)
{
    struct ctx *c = *state;
    char k[64];
    unique_skey(k, sizeof(k), "empty");
    assert_int_equal(acquire(c, k, FP_1, TOKEN_A, 10000), STORE_ACQ_LOCKED);
    assert_int_equal(complete(c, k, TOKEN_A, (const uint8_t *)"", 0, 60), 1);
    struct acq_res res;
    assert_int_equal(acquire_full(c, c->st, k, FP_1, TOKEN_B, 10000, &res), STORE_ACQ_COMPLETED);
    assert_int_equal(res.rec_len, 0);
}

static void test_release(void **state)
{
    struct ctx *c = *state;
    char k[64];
    unique_skey(k, sizeof(k), "release");
    assert_int_equal(release(c, k, TOKEN_A), 0); /* absent */
    assert_int_equal(acquire(c, k, FP_1, TOKEN_A, 10000), STORE_ACQ_LOCKED);
    assert_int_equal(release(c, k, TOKEN_B), 0);
    assert_int_equal(acquire(c, k, FP_1, TOKEN_B, 10000), STORE_ACQ_IN_PROGRESS);
    assert_int_equal(release(c, k, TOKEN_A), 1);
    assert_int_equal(release(c, k, TOKEN_A), 0);
    /* free again: anyone, any fingerprint */
    assert_int_equal(acquire(c, k, FP_2, TOKEN_B, 10000), STORE_ACQ_LOCKED);
}

static void test_renew(void **state)
{
    struct ctx *c = *state;
    char k[64];
    unique_skey(k, sizeof(k), "renew");
    assert_int_equal(renew(c, k, TOKEN_A, 10000), 0); /* absent */
    assert_int_equal(acquire(c, k, FP_1, TOKEN_A, 300), STORE_ACQ_LOCKED);
    assert_int_equal(renew(c, k, TOKEN_B, 10000), 0);
    assert_int_equal(renew(c, k, TOKEN_A, 20000), 1);
    /* the renewed lock outlives its first expiry by far */
    run_for(c, 600);
    assert_int_equal(acquire(c, k, FP_1, TOKEN_B, 10000), STORE_ACQ_IN_PROGRESS);
}

static void test_lock_expiry(void **state)
{
    struct ctx *c = *state;
    char k[64];
    unique_skey(k, sizeof(k), "lock-expiry");
    assert_int_equal(acquire(c, k, FP_1, TOKEN_A, 200), STORE_ACQ_LOCKED);
    run_for(c, 400);
    assert_int_equal(acquire(c, k, FP_2, TOKEN_B, 10000), STORE_ACQ_LOCKED);
    /* the dead owner can no longer touch it */
    assert_int_equal(complete(c, k, TOKEN_A, (const uint8_t *)"x", 1, 60), 0);
    assert_int_equal(renew(c, k, TOKEN_A, 1000), 0);
    assert_int_equal(release(c, k, TOKEN_A), 0);
}

static void test_ttl_expiry(void **state)
{
    struct ctx *c = *state;
    char k[64];
    unique_skey(k, sizeof(k), "ttl-expiry");
    assert_int_equal(acquire(c, k, FP_1, TOKEN_A, 10000), STORE_ACQ_LOCKED);
    assert_int_equal(complete(c, k, TOKEN_A, (const uint8_t *)"rec", 3, 1), 1);
    assert_int_equal(acquire(c, k, FP_1, TOKEN_B, 10000), STORE_ACQ_COMPLETED);
    run_for(c, 1600);
    assert_int_equal(acquire(c, k, FP_2, TOKEN_B, 10000), STORE_ACQ_LOCKED);
}

static void test_ping(void **state)
{
    struct ctx *c = *state;
    assert_int_equal(ping(c), 1);
}

static void test_never_synchronous(void **state)
{
    struct ctx *c = *state;
    char k[64];
    unique_skey(k, sizeof(k), "sync");
    struct acq_res a;
    struct done_res d[4];
    memset(&a, 0, sizeof(a));
    memset(d, 0, sizeof(d));
    in_call = true;
    store_acquire(c->st,
                  &(struct store_acquire_req){k, strlen(k), FP_1, TOKEN_A, 10000, NULL, NULL, 0},
                  acq_cb, &a);
    store_renew(c->st, k, strlen(k), TOKEN_A, 10000, done_cb, &d[0]);
    store_complete(c->st, k, strlen(k), TOKEN_A, (const uint8_t *)"r", 1, 60, done_cb, &d[1]);
    store_release(c->st, k, strlen(k), TOKEN_A, done_cb, &d[2]);
    store_ping(c->st, done_cb, &d[3]);
    in_call = false;
    assert_false(a.done);
    for (int i = 0; i < 4; i++)
        assert_false(d[i].done);
    run_until(c, &d[3].done, WAIT_MS);
    run_until(c, &d[2].done, WAIT_MS);
    assert_true(a.done && !a.sync && a.state == STORE_ACQ_LOCKED);
    assert_true(d[0].done && d[0].status == 1);
    assert_true(d[1].done && d[1].status == 1);
    assert_true(d[2].done && d[2].status == 0); /* completed: nothing to release */
    assert_true(d[3].done && d[3].status == 1);
}

/* Arguments are copied by the call: the caller's buffers may change right
 * after it returns. */
static void test_arguments_copied(void **state)
{
    struct ctx *c = *state;
    char k[64], kcopy[64];
    unique_skey(k, sizeof(k), "copied");
    memcpy(kcopy, k, sizeof(k));
    uint8_t fp[STORE_FP_LEN];
    char tok[STORE_TOKEN_LEN];
    memcpy(fp, FP_1, sizeof(fp));
    memcpy(tok, TOKEN_A, sizeof(tok));
    struct acq_res a = {0};
    store_acquire(c->st, &(struct store_acquire_req){k, strlen(k), fp, tok, 10000, NULL, NULL, 0},
                  acq_cb, &a);
    memset(k, 'z', strlen(k));
    memset(fp, 0xee, sizeof(fp));
    memset(tok, 'q', sizeof(tok));
    run_until(c, &a.done, WAIT_MS);
    assert_int_equal(a.state, STORE_ACQ_LOCKED);
    assert_int_equal(acquire(c, kcopy, FP_1, TOKEN_B, 10000), STORE_ACQ_IN_PROGRESS);
    assert_int_equal(release(c, kcopy, TOKEN_A), 1);
}

static void never_cb(void *arg, const struct store_acquire_reply *r)
{
    (void)r;
    *(bool *)arg = true;
}

/* Freeing a store with operations in flight drops their callbacks (and
 * leaks nothing: ASan/valgrind). */
static void test_free_drops_inflight(void **state)
{
    struct ctx *c = *state;
    char k[64];
    unique_skey(k, sizeof(k), "free-inflight");
    bool called = false;
    struct store *st = ctx_new_store(c);
    run_for(c, 100);
    for (int i = 0; i < 3; i++)
        store_acquire(
            st, &(struct store_acquire_req){k, strlen(k), FP_1, TOKEN_A, 10000, NULL, NULL, 0},
            never_cb, &called);
    store_free(st);
    run_for(c, 300);
    assert_false(called);
}

struct free_in_cb {
    struct store *st;
    int calls;
};

static void free_in_cb(void *arg, const struct store_acquire_reply *r)
{
    (void)r;
    struct free_in_cb *f = arg;
    f->calls++;
    if (f->st) {
        store_free(f->st);
        f->st = NULL;
    }
}

/* A store freed from inside one of its own callbacks, with another op
 * still pending: no crash, no further callback. */
static void test_free_inside_callback(void **state)
{
    struct ctx *c = *state;
    char k[64];
    unique_skey(k, sizeof(k), "free-in-cb");
    struct free_in_cb f = {.st = ctx_new_store(c)};
    store_acquire(f.st,
                  &(struct store_acquire_req){k, strlen(k), FP_1, TOKEN_A, 10000, NULL, NULL, 0},
                  free_in_cb, &f);
    store_acquire(f.st,
                  &(struct store_acquire_req){k, strlen(k), FP_1, TOKEN_B, 10000, NULL, NULL, 0},
                  free_in_cb, &f);
    uint64_t end = now_ms() + WAIT_MS;
    while (f.calls == 0 && now_ms() < end)
        event_base_loop(c->base, EVLOOP_ONCE);
    run_for(c, 200);
    assert_int_equal(f.calls, 1);
    assert_null(f.st);
}

/* ---- the contract: limits (store_limit), both backends ---- */

static const char TOKEN_C[STORE_TOKEN_LEN + 1] = "cccccccccccccccccccccccccccccccc";

/* A scope never used before by this process (nor by another pid). */
static void unique_scope(char *out, size_t n, const char *what)
{
    char k[64];
    unique_skey(k, sizeof(k), what);
    snprintf(out, n, "rl-%s", k);
}

static struct store_limit_reply lim_rate(struct ctx *c, struct store *st, const char *scope,
                                         uint32_t requests, uint32_t window_ms)
{
    return stl_limit(c->base, st, scope, TOKEN_A, requests, window_ms, 0, false, 0);
}

static struct store_limit_reply lim_slot(struct ctx *c, struct store *st, const char *scope,
                                         const char *token, uint32_t concurrent, uint32_t lease_ms)
{
    return stl_limit(c->base, st, scope, token, 0, 1000, concurrent, true, lease_ms);
}

/* 10 a second (T = 100 ms): a burst of 10 passes, counting down; the 11th
 * waits for at most T; refused requests are not counted; after the wait
 * one (and only one) more passes. */
static void test_limit_rate_burst(void **state)
{
    struct ctx *c = *state;
    char s[96];
    unique_scope(s, sizeof(s), "burst");
    for (uint32_t i = 0; i < 10; i++) {
        struct store_limit_reply r = lim_rate(c, c->st, s, 10, 1000);
        assert_int_equal(r.verdict, STORE_LIMIT_ALLOWED);
        assert_int_equal(r.remaining, 9 - i);
        assert_true(r.reset_ms > 0 && r.reset_ms <= (i + 1) * 100);
        assert_int_equal(r.retry_ms, 0);
    }
    struct store_limit_reply r = lim_rate(c, c->st, s, 10, 1000);
    assert_int_equal(r.verdict, STORE_LIMIT_RATE);
    assert_int_equal(r.remaining, 0);
    assert_true(r.retry_ms > 0 && r.retry_ms <= 100);
    assert_true(r.reset_ms > 0 && r.reset_ms <= 1000);
    /* refused ones count for nothing: the wait does not grow */
    uint32_t retry = r.retry_ms;
    for (int i = 0; i < 3; i++) {
        r = lim_rate(c, c->st, s, 10, 1000);
        assert_int_equal(r.verdict, STORE_LIMIT_RATE);
        assert_true(r.retry_ms > 0 && r.retry_ms <= retry);
        retry = r.retry_ms;
    }
    run_for(c, (int)retry + 10);
    r = lim_rate(c, c->st, s, 10, 1000);
    assert_int_equal(r.verdict, STORE_LIMIT_ALLOWED);
    assert_int_equal(r.remaining, 0);
    r = lim_rate(c, c->st, s, 10, 1000);
    assert_int_equal(r.verdict, STORE_LIMIT_RATE);
    assert_true(r.retry_ms > 0 && r.retry_ms <= 100);
}

/* Two slots: two tokens get one each, a third waits until one is given
 * back; giving back twice, or what was never taken, finds nothing. */
static void test_limit_concurrency(void **state)
{
    struct ctx *c = *state;
    char s[96];
    unique_scope(s, sizeof(s), "slots");
    assert_int_equal(stl_limit_release(c->base, c->st, s, TOKEN_A), 0);
    assert_int_equal(stl_limit_renew(c->base, c->st, s, TOKEN_A, 1000), 0);
    assert_int_equal(lim_slot(c, c->st, s, TOKEN_A, 2, 10000).verdict, STORE_LIMIT_ALLOWED);
    assert_int_equal(lim_slot(c, c->st, s, TOKEN_B, 2, 10000).verdict, STORE_LIMIT_ALLOWED);
    struct store_limit_reply r = lim_slot(c, c->st, s, TOKEN_C, 2, 10000);
    assert_int_equal(r.verdict, STORE_LIMIT_CONCURRENCY);
    assert_int_equal(r.remaining, 0); /* no rate limit: nothing to count */
    assert_int_equal(r.reset_ms, 0);
    assert_int_equal(stl_limit_release(c->base, c->st, s, TOKEN_C), 0);
    assert_int_equal(stl_limit_release(c->base, c->st, s, TOKEN_A), 1);
    assert_int_equal(stl_limit_release(c->base, c->st, s, TOKEN_A), 0);
    assert_int_equal(lim_slot(c, c->st, s, TOKEN_C, 2, 10000).verdict, STORE_LIMIT_ALLOWED);
    assert_int_equal(lim_slot(c, c->st, s, TOKEN_A, 2, 10000).verdict, STORE_LIMIT_CONCURRENCY);
    /* without take_slot, only the rate is checked: no slot needed */
    r = stl_limit(c->base, c->st, s, TOKEN_A, 0, 1000, 2, false, 10000);
    assert_int_equal(r.verdict, STORE_LIMIT_ALLOWED);
    assert_int_equal(stl_limit_release(c->base, c->st, s, TOKEN_B), 1);
    assert_int_equal(stl_limit_release(c->base, c->st, s, TOKEN_C), 1);
}

/* A request refused for want of a slot still counts against the rate. */
static void test_limit_concurrency_counts_rate(void **state)
{
    struct ctx *c = *state;
    char s[96];
    unique_scope(s, sizeof(s), "slots-rate");
    struct store_limit_reply r = stl_limit(c->base, c->st, s, TOKEN_A, 3, 60000, 1, true, 10000);
    assert_int_equal(r.verdict, STORE_LIMIT_ALLOWED);
    assert_int_equal(r.remaining, 2);
    r = stl_limit(c->base, c->st, s, TOKEN_B, 3, 60000, 1, true, 10000);
    assert_int_equal(r.verdict, STORE_LIMIT_CONCURRENCY);
    assert_int_equal(r.remaining, 1);
    assert_true(r.reset_ms > 0 && r.reset_ms <= 40000);
    r = stl_limit(c->base, c->st, s, TOKEN_B, 3, 60000, 1, true, 10000);
    assert_int_equal(r.verdict, STORE_LIMIT_CONCURRENCY);
    assert_int_equal(r.remaining, 0);
    assert_int_equal(stl_limit_release(c->base, c->st, s, TOKEN_A), 1);
    /* a free slot, but the rate is spent: no slot taken */
    r = stl_limit(c->base, c->st, s, TOKEN_B, 3, 60000, 1, true, 10000);
    assert_int_equal(r.verdict, STORE_LIMIT_RATE);
    assert_true(r.retry_ms > 19000 && r.retry_ms <= 20000);
    assert_int_equal(stl_limit_release(c->base, c->st, s, TOKEN_B), 0);
}

/* A slot not renewed frees itself when its lease lapses; its owner can
 * then neither renew nor give it back. */
static void test_limit_lease_expiry(void **state)
{
    struct ctx *c = *state;
    char s[96];
    unique_scope(s, sizeof(s), "lease");
    assert_int_equal(lim_slot(c, c->st, s, TOKEN_A, 1, 200).verdict, STORE_LIMIT_ALLOWED);
    assert_int_equal(lim_slot(c, c->st, s, TOKEN_B, 1, 200).verdict, STORE_LIMIT_CONCURRENCY);
    run_for(c, 400);
    assert_int_equal(stl_limit_renew(c->base, c->st, s, TOKEN_A, 10000), 0);
    assert_int_equal(stl_limit_release(c->base, c->st, s, TOKEN_A), 0);
    assert_int_equal(lim_slot(c, c->st, s, TOKEN_B, 1, 10000).verdict, STORE_LIMIT_ALLOWED);
    assert_int_equal(stl_limit_release(c->base, c->st, s, TOKEN_B), 1);
}

/* A renewed slot outlives its first lease. */
static void test_limit_renew(void **state)
{
    struct ctx *c = *state;
    char s[96];
    unique_scope(s, sizeof(s), "lease-renew");
    assert_int_equal(lim_slot(c, c->st, s, TOKEN_A, 1, 300).verdict, STORE_LIMIT_ALLOWED);
    assert_int_equal(stl_limit_renew(c->base, c->st, s, TOKEN_B, 10000), 0);
    assert_int_equal(stl_limit_renew(c->base, c->st, s, TOKEN_A, 10000), 1);
    run_for(c, 600);
    assert_int_equal(lim_slot(c, c->st, s, TOKEN_B, 1, 300).verdict, STORE_LIMIT_CONCURRENCY);
    assert_int_equal(stl_limit_release(c->base, c->st, s, TOKEN_A), 1);
    assert_int_equal(lim_slot(c, c->st, s, TOKEN_B, 1, 300).verdict, STORE_LIMIT_ALLOWED);
}

static void test_limit_scopes_are_independent(void **state)
{
    struct ctx *c = *state;
    char s1[96], s2[96];
    unique_scope(s1, sizeof(s1), "indep");
    unique_scope(s2, sizeof(s2), "indep");
    assert_int_equal(lim_rate(c, c->st, s1, 1, 60000).verdict, STORE_LIMIT_ALLOWED);
    assert_int_equal(lim_rate(c, c->st, s1, 1, 60000).verdict, STORE_LIMIT_RATE);
    assert_int_equal(lim_rate(c, c->st, s2, 1, 60000).verdict, STORE_LIMIT_ALLOWED);
    assert_int_equal(lim_slot(c, c->st, s1, TOKEN_A, 1, 10000).verdict, STORE_LIMIT_ALLOWED);
    assert_int_equal(lim_slot(c, c->st, s2, TOKEN_B, 1, 10000).verdict, STORE_LIMIT_ALLOWED);
    assert_int_equal(stl_limit_release(c->base, c->st, s2, TOKEN_A), 0);
    assert_int_equal(stl_limit_release(c->base, c->st, s1, TOKEN_A), 1);
    assert_int_equal(stl_limit_release(c->base, c->st, s2, TOKEN_B), 1);
}

/* Both limits off: allowed, nothing counted; a scope past 200 bytes is a
 * store error. */
static void test_limit_off_and_long_scope(void **state)
{
    struct ctx *c = *state;
    char s[96];
    unique_scope(s, sizeof(s), "off");
    for (int i = 0; i < 3; i++) {
        struct store_limit_reply r = stl_limit(c->base, c->st, s, TOKEN_A, 0, 1000, 0, true, 100);
        assert_int_equal(r.verdict, STORE_LIMIT_ALLOWED);
        assert_int_equal(r.remaining, 0);
        assert_int_equal(r.reset_ms, 0);
        assert_int_equal(r.retry_ms, 0);
    }
    assert_int_equal(stl_limit_release(c->base, c->st, s, TOKEN_A), 0);
    char big[202];
    memset(big, 'x', 201);
    big[201] = '\0';
    assert_int_equal(lim_rate(c, c->st, big, 10, 1000).verdict, STORE_LIMIT_ERROR);
    assert_int_equal(stl_limit_release(c->base, c->st, big, TOKEN_A), -1);
    assert_int_equal(stl_limit_renew(c->base, c->st, big, TOKEN_A, 100), -1);
    big[200] = '\0'; /* 200 bytes: fine */
    assert_int_equal(lim_rate(c, c->st, big, 10, 1000).verdict, STORE_LIMIT_ALLOWED);
}

/* Two instances (two stores on one Redis, or two workers on one memory
 * table) hold one limit between them. */
static void test_limit_shared_by_two_stores(void **state)
{
    struct ctx *c = *state;
    char s[96];
    unique_scope(s, sizeof(s), "shared");
    struct store *other = ctx_new_store(c);
    struct store *st[2] = {c->st, other};
    for (uint32_t i = 0; i < 4; i++) {
        struct store_limit_reply r = lim_rate(c, st[i % 2], s, 4, 60000);
        assert_int_equal(r.verdict, STORE_LIMIT_ALLOWED);
        assert_int_equal(r.remaining, 3 - i);
    }
    assert_int_equal(lim_rate(c, st[0], s, 4, 60000).verdict, STORE_LIMIT_RATE);
    assert_int_equal(lim_rate(c, st[1], s, 4, 60000).verdict, STORE_LIMIT_RATE);
    assert_int_equal(lim_slot(c, st[0], s, TOKEN_A, 1, 10000).verdict, STORE_LIMIT_ALLOWED);
    assert_int_equal(lim_slot(c, st[1], s, TOKEN_B, 1, 10000).verdict, STORE_LIMIT_CONCURRENCY);
    assert_int_equal(stl_limit_renew(c->base, st[1], s, TOKEN_A, 10000), 1);
    assert_int_equal(stl_limit_release(c->base, st[1], s, TOKEN_A), 1);
    assert_int_equal(lim_slot(c, st[1], s, TOKEN_B, 1, 10000).verdict, STORE_LIMIT_ALLOWED);
    store_free(other);
}

/* ---- memory only ---- */

struct race {
    struct store_memory_shared *sh;
    const char *skey;
    int locked;
    int in_progress;
};

static void *race_thread(void *arg)
{
    struct race *r = arg;
    struct event_base *base = event_base_new();
    struct store *st = store_memory_new(base, r->sh, 1000);
    int mine_locked = 0, mine_busy = 0;
    for (int i = 0; i < 50; i++) {
        struct acq_res a = {0};
        char tok[STORE_TOKEN_LEN];
        memset(tok, 'a' + (i % 26), sizeof(tok));
        store_acquire(
            st,
            &(struct store_acquire_req){r->skey, strlen(r->skey), FP_1, tok, 10000, NULL, NULL, 0},
            acq_cb, &a);
        while (!a.done)
            event_base_loop(base, EVLOOP_ONCE);
        mine_locked += a.state == STORE_ACQ_LOCKED;
        mine_busy += a.state == STORE_ACQ_IN_PROGRESS;
    }
    store_free(st);
    event_base_free(base);
    __atomic_add_fetch(&r->locked, mine_locked, __ATOMIC_SEQ_CST);
    __atomic_add_fetch(&r->in_progress, mine_busy, __ATOMIC_SEQ_CST);
    return NULL;
}

/* Many workers, one shared table, one key: exactly one lock. */
static void test_memory_shared_across_threads(void **state)
{
    struct ctx *c = *state;
    char k[64];
    unique_skey(k, sizeof(k), "race");
    struct race r = {.sh = c->sh, .skey = k};
    pthread_t th[4];
    for (int i = 0; i < 4; i++)
        assert_int_equal(pthread_create(&th[i], NULL, race_thread, &r), 0);
    for (int i = 0; i < 4; i++)
        pthread_join(th[i], NULL);
    assert_int_equal(r.locked, 1);
    assert_int_equal(r.in_progress, 4 * 50 - 1);
    /* and the worker of this test sees the same table */
    assert_int_equal(acquire(c, k, FP_2, TOKEN_B, 10000), STORE_ACQ_MISMATCH);
}

/* Many short-lived keys: expired entries are swept, not kept forever. */
static void test_memory_many_keys(void **state)
{
    struct ctx *c = *state;
    char k[64];
    for (int i = 0; i < 500; i++) {
        unique_skey(k, sizeof(k), "many");
        assert_int_equal(acquire(c, k, FP_1, TOKEN_A, i % 2 ? 1 : 60000), STORE_ACQ_LOCKED);
    }
    run_for(c, 20);
    for (int i = 0; i < 500; i++) {
        unique_skey(k, sizeof(k), "many2");
        assert_int_equal(acquire(c, k, FP_1, TOKEN_A, 1), STORE_ACQ_LOCKED);
    }
}

/* ---- memory only: the bound, eviction, reclaim ---- */

/* Replaces the fixture's unlimited table with one bounded by max_bytes. */
static void use_bounded(struct ctx *c, uint64_t max_bytes)
{
    store_free(c->st);
    store_memory_shared_free(c->sh);
    c->sh = store_memory_shared_new(PREFIX, max_bytes);
    c->st = ctx_new_store(c);
}

static struct store_memory_stats mstats(struct ctx *c)
{
    struct store_memory_stats st;
    store_memory_shared_stats(c->sh, &st);
    return st;
}

/* Fixed-width keys, so that every entry costs the same. */
static void mem_skey(char *out, size_t n, const char *what, int i)
{
    snprintf(out, n, "memscope:%s-%06d", what, i);
}

static void fill_record(uint8_t *rec, size_t n, int seed)
{
    for (size_t i = 0; i < n; i++)
        rec[i] = (uint8_t)(seed + (int)i * 13);
}

/* Locks then completes key i with a 1000-byte record. */
static void put_record(struct ctx *c, const char *what, int i, uint32_t ttl)
{
    char k[64];
    uint8_t rec[1000];
    mem_skey(k, sizeof(k), what, i);
    fill_record(rec, sizeof(rec), i);
    assert_int_equal(acquire(c, k, FP_1, TOKEN_A, 10000), STORE_ACQ_LOCKED);
    assert_int_equal(complete(c, k, TOKEN_A, rec, sizeof(rec), ttl), 1);
}

static void test_memory_evicts_oldest_first(void **state)
{
    struct ctx *c = *state;
    use_bounded(c, 32 * 1024);
    const int n = 80;
    for (int i = 0; i < n; i++) {
        put_record(c, "fifo", i, 600);
        assert_true(mstats(c).bytes <= 32 * 1024);
    }
    struct store_memory_stats st = mstats(c);
    assert_true(st.completed > 10 && st.completed < (size_t)n);
    assert_int_equal(st.locks, 0);
    assert_true(st.evictions == (uint64_t)n - st.completed);
    int first_kept = n - (int)st.completed;
    char k[64];
    /* the newest ones are all there, intact */
    for (int i = first_kept; i < n; i++) {
        struct acq_res res;
        uint8_t rec[1000];
        mem_skey(k, sizeof(k), "fifo", i);
        fill_record(rec, sizeof(rec), i);
        assert_int_equal(acquire_full(c, c->st, k, FP_1, TOKEN_B, 10000, &res),
                         STORE_ACQ_COMPLETED);
        assert_int_equal(res.rec_len, sizeof(rec));
        assert_memory_equal(res.rec, rec, sizeof(rec));
    }
    /* and exactly the oldest ones are gone */
    for (int i = 0; i < first_kept; i++) {
        mem_skey(k, sizeof(k), "fifo", i);
        assert_int_equal(acquire(c, k, FP_1, TOKEN_B, 10000), STORE_ACQ_LOCKED);
        assert_int_equal(release(c, k, TOKEN_B), 1);
    }
}

/* A replay does not refresh a record: the order is the completion order. */
static void test_memory_replay_does_not_reorder(void **state)
{
    struct ctx *c = *state;
    use_bounded(c, 32 * 1024);
    int i = 0;
    while (mstats(c).evictions == 0 && i < 1000)
        put_record(c, "order", i++, 600);
    /* key 1 is now the oldest: replaying it does not save it */
    char k[64];
    mem_skey(k, sizeof(k), "order", 1);
    assert_int_equal(acquire(c, k, FP_1, TOKEN_B, 10000), STORE_ACQ_COMPLETED);
    put_record(c, "order", i++, 600);
    assert_int_equal(acquire(c, k, FP_1, TOKEN_B, 10000), STORE_ACQ_LOCKED);
}

static void test_memory_locks_never_evicted(void **state)
{
    struct ctx *c = *state;
    use_bounded(c, 32 * 1024);
    char lock1[64], lock2[64];
    mem_skey(lock1, sizeof(lock1), "lock", 1);
    mem_skey(lock2, sizeof(lock2), "lock", 2);
    assert_int_equal(acquire(c, lock1, FP_1, TOKEN_A, 60000), STORE_ACQ_LOCKED);
    for (int i = 0; i < 40; i++)
        put_record(c, "around-locks", i, 600);
    assert_int_equal(acquire(c, lock2, FP_1, TOKEN_A, 60000), STORE_ACQ_LOCKED);
    for (int i = 40; i < 120; i++)
        put_record(c, "around-locks", i, 600);
    struct store_memory_stats st = mstats(c);
    assert_true(st.evictions > 80);
    assert_int_equal(st.locks, 2);
    assert_true(st.bytes <= 32 * 1024);
    assert_int_equal(acquire(c, lock1, FP_1, TOKEN_B, 10000), STORE_ACQ_IN_PROGRESS);
    assert_int_equal(acquire(c, lock2, FP_2, TOKEN_B, 10000), STORE_ACQ_MISMATCH);
    /* the owner still completes it (evicting others to make room) */
    uint8_t rec[1000];
    fill_record(rec, sizeof(rec), 7);
    assert_int_equal(complete(c, lock1, TOKEN_A, rec, sizeof(rec), 600), 1);
    assert_int_equal(acquire(c, lock1, FP_1, TOKEN_B, 10000), STORE_ACQ_COMPLETED);
    assert_int_equal(renew(c, lock2, TOKEN_A, 60000), 1);
    assert_int_equal(release(c, lock2, TOKEN_A), 1);
}

static void test_memory_full_of_locks(void **state)
{
    struct ctx *c = *state;
    use_bounded(c, 16 * 1024);
    put_record(c, "before-locks", 0, 600);
    char k[64];
    int locked = 0;
    enum store_acquire_state s = STORE_ACQ_LOCKED;
    while (s == STORE_ACQ_LOCKED && locked < 2000) {
        mem_skey(k, sizeof(k), "only-locks", locked);
        s = acquire(c, k, FP_1, TOKEN_A, 60000);
        if (s == STORE_ACQ_LOCKED) locked++;
        assert_true(mstats(c).bytes <= 16 * 1024);
    }
    assert_int_equal(s, STORE_ACQ_ERROR);
    assert_true(locked > 10 && locked < 2000);
    struct store_memory_stats st = mstats(c);
    assert_int_equal(st.locks, (size_t)locked);
    assert_int_equal(st.completed, 0); /* the record made room for locks */
    assert_true(st.refused >= 1);
    assert_true(st.bytes <= 16 * 1024);
    /* refused again, and nothing was taken from the locks */
    mem_skey(k, sizeof(k), "one-more", 0);
    assert_int_equal(acquire(c, k, FP_1, TOKEN_A, 60000), STORE_ACQ_ERROR);
    for (int i = 0; i < locked; i++) {
        mem_skey(k, sizeof(k), "only-locks", i);
        assert_int_equal(acquire(c, k, FP_1, TOKEN_B, 10000), STORE_ACQ_IN_PROGRESS);
    }
    /* a record that does not fit: -1, and the key stays locked */
    uint8_t rec[1000];
    fill_record(rec, sizeof(rec), 1);
    mem_skey(k, sizeof(k), "only-locks", 0);
    assert_int_equal(complete(c, k, TOKEN_A, rec, sizeof(rec), 600), -1);
    assert_int_equal(acquire(c, k, FP_1, TOKEN_B, 10000), STORE_ACQ_IN_PROGRESS);
    /* giving locks back makes room again */
    for (int i = 0; i < 3; i++) {
        mem_skey(k, sizeof(k), "only-locks", i);
        assert_int_equal(release(c, k, TOKEN_A), 1);
    }
    mem_skey(k, sizeof(k), "one-more", 0);
    assert_int_equal(acquire(c, k, FP_1, TOKEN_A, 60000), STORE_ACQ_LOCKED);
}

/* Waits (bounded) until the table holds nothing and has shrunk back. */
static bool wait_empty(struct ctx *c, int max_ms)
{
    uint64_t end = now_ms() + (uint64_t)max_ms;
    while (now_ms() < end) {
        struct store_memory_stats st = mstats(c);
        if (st.entries == 0 && st.buckets == 64) return true;
        run_for(c, 50);
    }
    return false;
}

/* Everything released or expired: the accounting returns to the empty
 * table, the table shrinks back, without any further request (the
 * store's own timer does it, a bounded slice at a time). */
static void test_memory_accounting_returns_to_zero(void **state)
{
    struct ctx *c = *state;
    use_bounded(c, 64ull * 1024 * 1024);
    struct store_memory_stats empty = mstats(c);
    assert_int_equal(empty.entries, 0);
    assert_int_equal(empty.entry_bytes, 0);
    char k[64];
    uint8_t rec[1000];
    fill_record(rec, sizeof(rec), 3);
    for (int i = 0; i < 3000; i++) {
        mem_skey(k, sizeof(k), "zero", i);
        assert_int_equal(acquire(c, k, FP_1, TOKEN_A, i % 3 == 0 ? 200 : 60000), STORE_ACQ_LOCKED);
        if (i % 3 == 1) assert_int_equal(complete(c, k, TOKEN_A, rec, (size_t)i % 1000, 1), 1);
    }
    struct store_memory_stats full = mstats(c);
    assert_true(full.entries > 2000);
    assert_true(full.buckets >= 4096);
    assert_true(full.entry_bytes > 2000 * (uint64_t)sizeof(void *) * 8);
    for (int i = 2; i < 3000; i += 3) {
        mem_skey(k, sizeof(k), "zero", i);
        assert_int_equal(release(c, k, TOKEN_A), 1);
    }
    assert_true(wait_empty(c, 15000));
    struct store_memory_stats st = mstats(c);
    assert_int_equal(st.entry_bytes, 0);
    assert_int_equal(st.bytes, empty.bytes);
    assert_true(st.expired >= 2000);
    assert_int_equal(st.evictions, 0);
}

/* Thousands of inserts of mixed sizes, locks that die, records that
 * expire: the bound holds after every operation, and the newest record
 * is always there. */
static void test_memory_bound_respected(void **state)
{
    struct ctx *c = *state;
    const uint64_t max = 64 * 1024;
    use_bounded(c, max);
    char k[64];
    uint8_t rec[1000];
    srand(42);
    for (int i = 0; i < 6000; i++) {
        mem_skey(k, sizeof(k), "bound", i);
        uint32_t lock_ms = i % 5 == 0 ? 1 : 60000;
        assert_int_equal(acquire(c, k, FP_1, TOKEN_A, lock_ms), STORE_ACQ_LOCKED);
        assert_true(mstats(c).bytes <= max);
        if (i % 5 == 0) continue; /* a lock left to die */
        size_t n = (size_t)rand() % sizeof(rec);
        fill_record(rec, n, i);
        assert_int_equal(complete(c, k, TOKEN_A, rec, n, i % 2 ? 1 : 600), 1);
        assert_true(mstats(c).bytes <= max);
        struct acq_res res;
        assert_int_equal(acquire_full(c, c->st, k, FP_1, TOKEN_B, 10000, &res),
                         STORE_ACQ_COMPLETED);
        assert_int_equal(res.rec_len, n);
        if (n) assert_memory_equal(res.rec, rec, n);
    }
    struct store_memory_stats st = mstats(c);
    assert_true(st.evictions > 1000);
    assert_true(st.bytes <= max);
    assert_true(st.completed > 0);
}

/* Keys stay findable while the table grows and shrinks (lookups span
 * both tables during an incremental rehash). */
static void test_memory_rehash_keeps_keys(void **state)
{
    struct ctx *c = *state;
    char k[64];
    for (int i = 0; i < 5000; i++) {
        mem_skey(k, sizeof(k), "rehash", i);
        assert_int_equal(acquire(c, k, FP_1, TOKEN_A, 60000), STORE_ACQ_LOCKED);
        if (i % 97 == 0) {
            for (int j = 0; j <= i; j += 13) {
                mem_skey(k, sizeof(k), "rehash", j);
                assert_int_equal(acquire(c, k, FP_1, TOKEN_B, 60000), STORE_ACQ_IN_PROGRESS);
            }
        }
    }
    assert_true(mstats(c).buckets >= 8192);
    /* release all but every 50th key: the table shrinks under them */
    for (int i = 0; i < 5000; i++) {
        if (i % 50 == 0) continue;
        mem_skey(k, sizeof(k), "rehash", i);
        assert_int_equal(release(c, k, TOKEN_A), 1);
    }
    uint64_t end = now_ms() + 10000;
    while (mstats(c).buckets > 1024 && now_ms() < end)
        run_for(c, 50);
    assert_true(mstats(c).buckets <= 1024); /* at most 8 slots per entry */
    assert_int_equal(mstats(c).entries, 100);
    for (int i = 0; i < 5000; i += 50) {
        mem_skey(k, sizeof(k), "rehash", i);
        assert_int_equal(acquire(c, k, FP_1, TOKEN_B, 60000), STORE_ACQ_IN_PROGRESS);
    }
}

struct bounded_worker {
    struct store_memory_shared *sh;
    int id;
    int locked, completed, refused;
};

static void *bounded_thread(void *arg)
{
    struct bounded_worker *w = arg;
    struct event_base *base = event_base_new();
    struct store *st = store_memory_new(base, w->sh, 1000);
    uint8_t rec[700];
    memset(rec, w->id, sizeof(rec));
    for (int i = 0; i < 3000; i++) {
        char k[64];
        snprintf(k, sizeof(k), "memscope:thread%d-%06d", w->id, i);
        struct acq_res a = {0};
        store_acquire(
            st, &(struct store_acquire_req){k, strlen(k), FP_1, TOKEN_A, 60000, NULL, NULL, 0},
            acq_cb, &a);
        while (!a.done)
            event_base_loop(base, EVLOOP_ONCE);
        if (a.state != STORE_ACQ_LOCKED) continue;
        w->locked++;
        struct done_res d = {0};
        store_complete(st, k, strlen(k), TOKEN_A, rec, sizeof(rec), 600, done_cb, &d);
        while (!d.done)
            event_base_loop(base, EVLOOP_ONCE);
        w->completed += d.status == 1;
        w->refused += d.status == -1;
    }
    store_free(st);
    event_base_free(base);
    return NULL;
}

/* Four workers filling one bounded table: every key locks and completes
 * (there are records to evict), and the bound holds. */
static void test_memory_bounded_threads(void **state)
{
    struct ctx *c = *state;
    const uint64_t max = 128 * 1024;
    use_bounded(c, max);
    struct bounded_worker w[4];
    pthread_t th[4];
    for (int i = 0; i < 4; i++) {
        w[i] = (struct bounded_worker){.sh = c->sh, .id = i};
        assert_int_equal(pthread_create(&th[i], NULL, bounded_thread, &w[i]), 0);
    }
    for (int i = 0; i < 4; i++)
        pthread_join(th[i], NULL);
    for (int i = 0; i < 4; i++) {
        assert_int_equal(w[i].locked, 3000);
        assert_int_equal(w[i].completed, 3000);
    }
    struct store_memory_stats st = mstats(c);
    assert_true(st.bytes <= max);
    assert_int_equal(st.locks, 0);
    assert_true(st.evictions == 12000 - st.completed);
}

/* ---- memory only: scopes (one credential never pushes another out) ---- */

/* Replaces the fixture's table with one bounded by max_bytes in all and
 * max_scope_bytes per scope. */
static void use_scoped(struct ctx *c, uint64_t max_bytes, uint64_t max_scope_bytes)
{
    store_free(c->st);
    store_memory_shared_free(c->sh);
    c->sh = store_memory_shared_new_bounded(PREFIX, max_bytes, max_scope_bytes);
    c->st = ctx_new_store(c);
}

static uint64_t scope_bytes(struct ctx *c, const char *scope)
{
    return store_memory_shared_scope_bytes(c->sh, scope, strlen(scope));
}

/* Fixed-width keys: every record of one size costs the same. */
static void scoped_skey(char *out, size_t n, const char *scope, int i)
{
    snprintf(out, n, "%s:key-%06d", scope, i);
}

/* Locks then completes key i of scope with a len-byte record. */
static void put_scoped(struct ctx *c, const char *scope, int i, size_t len)
{
    char k[128];
    uint8_t rec[1000];
    assert_true(len <= sizeof(rec));
    scoped_skey(k, sizeof(k), scope, i);
    fill_record(rec, len, i);
    assert_int_equal(acquire(c, k, FP_1, TOKEN_A, 60000), STORE_ACQ_LOCKED);
    assert_int_equal(complete(c, k, TOKEN_A, rec, len, 600), 1);
}

/* True when key i of scope still holds its record. An evicted key is then
 * locked for a moment and released (which may evict again: check the kept
 * ones first). */
static bool scoped_kept(struct ctx *c, const char *scope, int i)
{
    char k[128];
    scoped_skey(k, sizeof(k), scope, i);
    enum store_acquire_state s = acquire(c, k, FP_1, TOKEN_B, 10000);
    if (s == STORE_ACQ_COMPLETED) return true;
    assert_int_equal(s, STORE_ACQ_LOCKED);
    assert_int_equal(release(c, k, TOKEN_B), 1);
    return false;
}

/* idemgate_store_evictions_total as /metrics renders it. */
static unsigned long long metric_evictions(void)
{
    struct buf b;
    buf_init(&b);
    metrics_render(&b);
    const char *name = "\nidemgate_store_evictions_total ";
    const char *p = memmem(buf_data(&b), buf_size(&b), name, strlen(name));
    assert_non_null(p);
    unsigned long long n = strtoull(p + strlen(name), NULL, 10);
    buf_free(&b);
    return n;
}

/* Past max_scope_bytes a scope loses its own oldest records, although the
 * store has room; another scope is never touched; every eviction is
 * counted, in the stats and on /metrics. */
static void test_memory_scope_cap(void **state)
{
    struct ctx *c = *state;
    const uint64_t cap = 16 * 1024;
    use_scoped(c, 1024 * 1024, cap);
    put_scoped(c, "victim", 0, 1000);
    uint64_t victim = scope_bytes(c, "victim");
    assert_true(victim > 1000);
    unsigned long long m0 = metric_evictions();
    const int n = 60;
    for (int i = 0; i < n; i++) {
        put_scoped(c, "capped", i, 1000);
        assert_true(scope_bytes(c, "capped") <= cap);
    }
    struct store_memory_stats st = mstats(c);
    int kept = (int)st.completed - 1;
    assert_true(kept > 5 && kept < n);
    assert_true(st.evictions == (uint64_t)(n - kept));
    assert_true(metric_evictions() - m0 == st.evictions);
    assert_true(st.bytes < 64 * 1024); /* far from max_bytes */
    assert_int_equal(st.scopes, 2);
    assert_true(scope_bytes(c, "victim") == victim);
    for (int i = n - kept; i < n; i++)
        assert_true(scoped_kept(c, "capped", i));
    assert_true(scoped_kept(c, "victim", 0));
    for (int i = 0; i < n - kept; i++)
        assert_false(scoped_kept(c, "capped", i));
    assert_true(scoped_kept(c, "victim", 0));
}

/* Locks count against their scope and are never evicted: a scope full of
 * its own locks is refused (its record went first), and nothing of
 * another scope is taken for it. */
static void test_memory_scope_full_of_locks(void **state)
{
    struct ctx *c = *state;
    const uint64_t cap = 8 * 1024;
    use_scoped(c, 1024 * 1024, cap);
    put_scoped(c, "other", 0, 1000);
    put_scoped(c, "locker", 0, 1000);
    char k[128];
    int locked = 0;
    enum store_acquire_state s = STORE_ACQ_LOCKED;
    while (s == STORE_ACQ_LOCKED && locked < 1000) {
        scoped_skey(k, sizeof(k), "locker", locked + 1);
        s = acquire(c, k, FP_1, TOKEN_A, 60000);
        if (s == STORE_ACQ_LOCKED) locked++;
        assert_true(scope_bytes(c, "locker") <= cap);
    }
    assert_int_equal(s, STORE_ACQ_ERROR);
    assert_true(locked > 5 && locked < 1000);
    struct store_memory_stats st = mstats(c);
    assert_int_equal(st.evictions, 1); /* locker's own record, and only it */
    assert_int_equal(st.locks, (size_t)locked);
    assert_true(st.refused >= 1);
    for (int i = 1; i <= locked; i++) {
        scoped_skey(k, sizeof(k), "locker", i);
        assert_int_equal(acquire(c, k, FP_1, TOKEN_B, 10000), STORE_ACQ_IN_PROGRESS);
    }
    /* a record that does not fit its scope: -1, the key stays locked */
    uint8_t rec[1000];
    fill_record(rec, sizeof(rec), 1);
    scoped_skey(k, sizeof(k), "locker", 1);
    assert_int_equal(complete(c, k, TOKEN_A, rec, sizeof(rec), 600), -1);
    assert_int_equal(acquire(c, k, FP_1, TOKEN_B, 10000), STORE_ACQ_IN_PROGRESS);
    assert_int_equal(mstats(c).evictions, 1);
    /* another scope still works, and kept its record */
    assert_true(scoped_kept(c, "other", 0));
    put_scoped(c, "other", 1, 1000);
    /* locks given back make room in that scope again */
    for (int i = 1; i <= 3; i++) {
        scoped_skey(k, sizeof(k), "locker", i);
        assert_int_equal(release(c, k, TOKEN_A), 1);
    }
    scoped_skey(k, sizeof(k), "locker", 5000);
    assert_int_equal(acquire(c, k, FP_1, TOKEN_A, 60000), STORE_ACQ_LOCKED);
}

/* A full store takes records from the scope holding the most bytes: the
 * small scope's records, although the oldest of all, stay while the big
 * one fills the store (the attack); then the small scope filling
 * up takes only from the big one, the big one's oldest first. */
static void test_memory_largest_scope_first(void **state)
{
    struct ctx *c = *state;
    use_scoped(c, 64 * 1024, 0);
    const int old = 4;
    for (int j = 0; j < old; j++)
        put_scoped(c, "small", j, 1000);
    uint64_t small = scope_bytes(c, "small");
    int nb = 0;
    while (mstats(c).evictions < 30 && nb < 1000) {
        put_scoped(c, "big", nb++, 1000);
        assert_true(scope_bytes(c, "small") == small);
        assert_true(mstats(c).bytes <= 64 * 1024);
    }
    int big_kept = (int)mstats(c).completed - old;
    assert_true(big_kept > 20);
    uint64_t big = scope_bytes(c, "big");
    const int ns = old + big_kept / 4;
    for (int j = old; j < ns; j++) {
        put_scoped(c, "small", j, 1000);
        assert_true(scope_bytes(c, "small") > small); /* never lost one */
        assert_true(scope_bytes(c, "big") < big);     /* paid for it */
        small = scope_bytes(c, "small");
        big = scope_bytes(c, "big");
        assert_true(mstats(c).bytes <= 64 * 1024);
    }
    struct store_memory_stats st = mstats(c);
    int kept = (int)st.completed - ns;
    for (int j = 0; j < ns; j++)
        assert_true(scoped_kept(c, "small", j));
    for (int i = nb - kept; i < nb; i++)
        assert_true(scoped_kept(c, "big", i));
    assert_false(scoped_kept(c, "big", 0));
}

/* Many scopes of different appetites, one size of record: whenever a
 * scope loses a record to make room for another's, it held the most bytes
 * at that moment, so it ends within one record of every scope left
 * untouched. */
static void test_memory_evicts_from_largest_randomized(void **state)
{
    struct ctx *c = *state;
    const uint64_t max = 48 * 1024;
    use_scoped(c, max, 0);
    enum { NS = 8 };
    char names[NS][8];
    for (int s = 0; s < NS; s++)
        snprintf(names[s], sizeof(names[s]), "s%d", s);
    /* what one record costs its scope */
    put_scoped(c, names[0], 0, 500);
    uint64_t one = scope_bytes(c, names[0]);
    put_scoped(c, names[0], 1, 500);
    uint64_t cost = scope_bytes(c, names[0]) - one;
    assert_true(cost > 500);
    srand(7);
    int losses = 0;
    for (int step = 2; step < 3000; step++) {
        int r = rand() % (NS * (NS + 1) / 2), s = 0;
        while (r >= s + 1) {
            r -= s + 1;
            s++;
        }
        uint64_t before[NS], after[NS];
        for (int x = 0; x < NS; x++)
            before[x] = scope_bytes(c, names[x]);
        put_scoped(c, names[s], step, 500);
        for (int x = 0; x < NS; x++)
            after[x] = scope_bytes(c, names[x]);
        assert_true(mstats(c).bytes <= max);
        for (int x = 0; x < NS; x++) {
            if (x == s || after[x] >= before[x]) continue;
            losses++;
            for (int y = 0; y < NS; y++)
                if (y != s && y != x && after[y] == before[y])
                    assert_true(after[x] + cost >= after[y]);
        }
    }
    assert_true(losses > 100);
    assert_true(mstats(c).scopes <= NS);
}

/* Thousands of invented scopes, each holding a lock or a record for a
 * while: once all are released or expired, no bookkeeping is left and
 * the accounting is back to the empty table's. */
static void test_memory_scope_bookkeeping_freed(void **state)
{
    struct ctx *c = *state;
    use_scoped(c, 64ull * 1024 * 1024, 1024 * 1024);
    struct store_memory_stats empty = mstats(c);
    assert_int_equal(empty.scopes, 0);
    char k[128], scope[32];
    uint8_t rec[300];
    fill_record(rec, sizeof(rec), 5);
    const int n = 3000;
    for (int i = 0; i < n; i++) {
        snprintf(scope, sizeof(scope), "invented-%05d", i);
        scoped_skey(k, sizeof(k), scope, 0);
        assert_int_equal(acquire(c, k, FP_1, TOKEN_A, i % 3 == 0 ? 200 : 60000), STORE_ACQ_LOCKED);
        if (i % 3 == 1) assert_int_equal(complete(c, k, TOKEN_A, rec, sizeof(rec), 1), 1);
    }
    /* an skey without ':' is a scope of its own */
    assert_int_equal(acquire(c, "no-colon", FP_1, TOKEN_A, 60000), STORE_ACQ_LOCKED);
    assert_true(scope_bytes(c, "no-colon") > 0);
    struct store_memory_stats full = mstats(c);
    assert_int_equal(full.scopes, (size_t)n + 1);
    assert_true(full.scope_bytes >= (uint64_t)n * 13);
    assert_true(scope_bytes(c, "invented-00002") > 0);
    assert_int_equal(release(c, "no-colon", TOKEN_A), 1);
    assert_true(scope_bytes(c, "no-colon") == 0);
    for (int i = 2; i < n; i += 3) {
        snprintf(scope, sizeof(scope), "invented-%05d", i);
        scoped_skey(k, sizeof(k), scope, 0);
        assert_int_equal(release(c, k, TOKEN_A), 1);
    }
    assert_true(scope_bytes(c, "invented-00002") == 0);
    uint64_t end = now_ms() + 15000;
    struct store_memory_stats st = mstats(c);
    while ((st.entries || st.scopes || st.bytes != empty.bytes) && now_ms() < end) {
        run_for(c, 50);
        st = mstats(c);
    }
    assert_int_equal(st.entries, 0);
    assert_int_equal(st.scopes, 0);
    assert_true(st.scope_bytes == 0);
    assert_true(st.bytes == empty.bytes);
    assert_int_equal(st.evictions, 0);
}

/* ---- memory only: limits ---- */

/* Limits are charged to the store and given back once they lapse (the
 * store's own timer, no request needed); when locks leave no room for a
 * new one, the limit is a store error and nothing is taken from them. */
static void test_memory_limit_accounting(void **state)
{
    struct ctx *c = *state;
    use_bounded(c, 64ull * 1024 * 1024);
    struct store_memory_stats empty = mstats(c);
    char s[64];
    for (int i = 0; i < 300; i++) {
        snprintf(s, sizeof(s), "acct-%04d", i);
        struct store_limit_reply r = stl_limit(c->base, c->st, s, TOKEN_A, 10, 1000, 2, true, 200);
        assert_int_equal(r.verdict, STORE_LIMIT_ALLOWED);
    }
    struct store_memory_stats full = mstats(c);
    assert_true(full.bytes > empty.bytes + 300 * 64);
    assert_int_equal(full.entries, 0); /* not entries of the key table */
    /* the rate states lapse after 100 ms, the leases after 200 ms */
    uint64_t end = now_ms() + 5000;
    while (mstats(c).bytes != empty.bytes + 64 * sizeof(void *) && now_ms() < end)
        run_for(c, 50);
    assert_int_equal(mstats(c).bytes, empty.bytes + 64 * sizeof(void *));

    use_bounded(c, 16 * 1024);
    char k[64];
    int locked = 0;
    while (locked < 2000) {
        mem_skey(k, sizeof(k), "limit-locks", locked);
        if (acquire(c, k, FP_1, TOKEN_A, 60000) != STORE_ACQ_LOCKED) break;
        locked++;
    }
    assert_true(locked > 10 && locked < 2000);
    struct store_limit_reply r =
        stl_limit(c->base, c->st, "full", TOKEN_A, 10, 1000, 2, true, 1000);
    assert_int_equal(r.verdict, STORE_LIMIT_ERROR);
    /* both limits off: nothing to store, no room needed */
    r = stl_limit(c->base, c->st, "full", TOKEN_A, 0, 1000, 0, true, 1000);
    assert_int_equal(r.verdict, STORE_LIMIT_ALLOWED);
    assert_int_equal(mstats(c).locks, (size_t)locked);
    for (int i = 0; i < 20; i++) {
        mem_skey(k, sizeof(k), "limit-locks", i);
        assert_int_equal(release(c, k, TOKEN_A), 1);
    }
    r = stl_limit(c->base, c->st, "full", TOKEN_A, 10, 1000, 2, true, 1000);
    assert_int_equal(r.verdict, STORE_LIMIT_ALLOWED);
    assert_true(mstats(c).bytes <= 16 * 1024);
}

/* ---- redis only ---- */

static redisReply *sync_cmd(redisContext *rc, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    redisReply *r = redisvCommand(rc, fmt, ap);
    va_end(ap);
    assert_non_null(r);
    return r;
}

static long long sync_int(redisContext *rc, const char *fmt, const char *arg)
{
    redisReply *r = sync_cmd(rc, fmt, arg);
    assert_int_equal(r->type, REDIS_REPLY_INTEGER);
    long long v = r->integer;
    freeReplyObject(r);
    return v;
}

/* The value at a key: "IG1", state, token, fingerprint, created-at (8
 * bytes), record (the layout in src/store/redis/redis_internal.h). */
static void assert_value(redisContext *rc, const char *full, char state, const char *token,
                         const uint8_t *fp, const char *record, size_t record_len)
{
    redisReply *r = sync_cmd(rc, "GET %s", full);
    assert_int_equal(r->type, REDIS_REPLY_STRING);
    assert_int_equal(r->len, 60 + record_len);
    assert_memory_equal(r->str, "IG1", 3);
    assert_int_equal(r->str[3], state);
    assert_memory_equal(r->str + 4, token, STORE_TOKEN_LEN);
    assert_memory_equal(r->str + 36, fp, STORE_FP_LEN);
    uint64_t created = 0;
    for (int i = 0; i < 8; i++)
        created = created << 8 | (uint8_t)r->str[52 + i];
    uint64_t now = (uint64_t)time(NULL) * 1000;
    assert_true(created + 60000 > now && created < now + 60000);
    if (record_len) assert_memory_equal(r->str + 60, record, record_len);
    freeReplyObject(r);
}

static void test_redis_key_layout(void **state)
{
    struct ctx *c = *state;
    char k[64], full[128];
    unique_skey(k, sizeof(k), "layout");
    snprintf(full, sizeof(full), PREFIX "{%s}", k);
    assert_int_equal(acquire(c, k, FP_1, TOKEN_A, 10000), STORE_ACQ_LOCKED);
    redisContext *rc = redis_sync();
    assert_non_null(rc);
    assert_int_equal(sync_int(rc, "EXISTS %s", full), 1);
    assert_value(rc, full, 'p', TOKEN_A, FP_1, NULL, 0);
    long long pttl = sync_int(rc, "PTTL %s", full);
    assert_true(pttl > 0 && pttl <= 10000);
    /* nothing else was written */
    char pattern[128];
    snprintf(pattern, sizeof(pattern), PREFIX "*%s*", k);
    redisReply *r = sync_cmd(rc, "KEYS %s", pattern);
    assert_int_equal(r->elements, 1);
    freeReplyObject(r);

    assert_int_equal(complete(c, k, TOKEN_A, (const uint8_t *)"R\0x", 3, 100), 1);
    assert_value(rc, full, 'c', TOKEN_A, FP_1, "R\0x", 3);
    long long ttl = sync_int(rc, "TTL %s", full);
    assert_true(ttl > 0 && ttl <= 100);
    redisFree(rc);
}

/* calls of one command since the last CONFIG RESETSTAT (INFO
 * commandstats; commands run inside a script count too). */
static long long cmd_calls(redisContext *rc, const char *cmd)
{
    redisReply *r = sync_cmd(rc, "INFO commandstats");
    char key[64];
    snprintf(key, sizeof(key), "cmdstat_%s:calls=", cmd);
    const char *p = r->type == REDIS_REPLY_STRING ? strstr(r->str, key) : NULL;
    long long n = p ? atoll(p + strlen(key)) : 0;
    freeReplyObject(r);
    return n;
}

/* On Redis 7.0+ an acquire is one native SET NX PX GET, whatever it
 * finds: a new key, a lock, a record, a mismatch. No script runs. */
static void test_redis_acquire_is_one_command(void **state)
{
    struct ctx *c = *state;
    char k[64];
    unique_skey(k, sizeof(k), "onecmd");
    assert_int_equal(ping(c), 1); /* connected: the server's version is known */
    redisContext *rc = redis_sync();
    assert_non_null(rc);
    freeReplyObject(sync_cmd(rc, "CONFIG RESETSTAT"));
    assert_int_equal(acquire(c, k, FP_1, TOKEN_A, 10000), STORE_ACQ_LOCKED);
    assert_int_equal(acquire(c, k, FP_1, TOKEN_B, 10000), STORE_ACQ_IN_PROGRESS);
    assert_int_equal(acquire(c, k, FP_2, TOKEN_B, 10000), STORE_ACQ_MISMATCH);
    assert_int_equal(cmd_calls(rc, "set"), 3);
    assert_int_equal(cmd_calls(rc, "evalsha"), 0);
    assert_int_equal(complete(c, k, TOKEN_A, (const uint8_t *)"rec", 3, 60), 1);
    freeReplyObject(sync_cmd(rc, "CONFIG RESETSTAT"));
    struct acq_res a;
    assert_int_equal(acquire_full(c, c->st, k, FP_1, TOKEN_B, 10000, &a), STORE_ACQ_COMPLETED);
    assert_int_equal(a.rec_len, 3);
    assert_memory_equal(a.rec, "rec", 3);
    assert_int_equal(acquire(c, k, FP_2, TOKEN_B, 10000), STORE_ACQ_MISMATCH);
    assert_int_equal(cmd_calls(rc, "set"), 2);
    assert_int_equal(cmd_calls(rc, "evalsha"), 0);
    redisFree(rc);
}

/* A server whose version idemgate cannot read (INFO refused by an ACL:
 * what an older server looks like to it) is served by the acquire
 * script, with the same answers. */
static void test_redis_acquire_script_without_version(void **state)
{
    struct ctx *c = *state;
    redisContext *rc = redis_sync();
    assert_non_null(rc);
    freeReplyObject(sync_cmd(rc, "ACL SETUSER noinfo on >pw ~* &* +@all -info"));
    store_free(c->st);
    c->cfg.redis.username = "noinfo";
    c->cfg.redis.password = "pw";
    c->st = ctx_new_store(c);
    assert_int_equal(ping(c), 1);
    char k[64];
    unique_skey(k, sizeof(k), "script");
    freeReplyObject(sync_cmd(rc, "CONFIG RESETSTAT"));
    assert_int_equal(acquire(c, k, FP_1, TOKEN_A, 10000), STORE_ACQ_LOCKED);
    assert_int_equal(acquire(c, k, FP_1, TOKEN_B, 10000), STORE_ACQ_IN_PROGRESS);
    assert_int_equal(acquire(c, k, FP_2, TOKEN_B, 10000), STORE_ACQ_MISMATCH);
    assert_int_equal(cmd_calls(rc, "evalsha"), 3);
    assert_int_equal(complete(c, k, TOKEN_A, (const uint8_t *)"rec", 3, 60), 1);
    struct acq_res a;
    assert_int_equal(acquire_full(c, c->st, k, FP_1, TOKEN_B, 10000, &a), STORE_ACQ_COMPLETED);
    assert_int_equal(a.rec_len, 3);
    assert_memory_equal(a.rec, "rec", 3);
    store_free(c->st);
    c->st = NULL;
    freeReplyObject(sync_cmd(rc, "ACL DELUSER noinfo"));
    c->cfg.redis.username = NULL;
    c->cfg.redis.password = NULL;
    c->st = ctx_new_store(c);
    redisFree(rc);
}

/* The acquire script of the idemgates before this layout (a hash s t f r),
 * as they send it. */
static const char old_acquire[] = "local v = redis.call('HMGET', KEYS[1], 's', 'f')\n"
                                  "if not v[1] then\n"
                                  "  redis.call('HSET', KEYS[1], 's', 'p', 't', ARGV[2], 'f', "
                                  "ARGV[1])\n"
                                  "  redis.call('PEXPIRE', KEYS[1], ARGV[3])\n"
                                  "  return {0}\n"
                                  "end\n"
                                  "if v[2] ~= ARGV[1] then return {2} end\n"
                                  "if v[1] == 'c' then\n"
                                  "  return {3, redis.call('HGET', KEYS[1], 'r')}\n"
                                  "end\n"
                                  "return {1}\n";

/* Old and new instances on one key_prefix (a rolling upgrade): a new one
 * reads the keys an old one wrote (replay, 409, mismatch) and never
 * writes over them; an old one gets an error (503) on a key a new one
 * wrote. Neither runs a key twice. */
static void test_redis_older_layout(void **state)
{
    struct ctx *c = *state;
    redisContext *rc = redis_sync();
    assert_non_null(rc);
    char k[64], full[128];
    unique_skey(k, sizeof(k), "oldc");
    snprintf(full, sizeof(full), PREFIX "{%s}", k);
    redisReply *r = redisCommand(rc, "HSET %s s c f %b r %b", full, FP_1, (size_t)STORE_FP_LEN,
                                 "old\0rec", (size_t)7);
    assert_non_null(r);
    freeReplyObject(r);
    freeReplyObject(sync_cmd(rc, "EXPIRE %s 60", full));
    struct acq_res a;
    assert_int_equal(acquire_full(c, c->st, k, FP_1, TOKEN_B, 10000, &a), STORE_ACQ_COMPLETED);
    assert_int_equal(a.rec_len, 7);
    assert_memory_equal(a.rec, "old\0rec", 7);
    assert_int_equal(acquire(c, k, FP_2, TOKEN_B, 10000), STORE_ACQ_MISMATCH);

    unique_skey(k, sizeof(k), "oldp");
    snprintf(full, sizeof(full), PREFIX "{%s}", k);
    r = redisCommand(rc, "HSET %s s p t %s f %b", full, TOKEN_A, FP_1, (size_t)STORE_FP_LEN);
    assert_non_null(r);
    freeReplyObject(r);
    freeReplyObject(sync_cmd(rc, "EXPIRE %s 60", full));
    assert_int_equal(acquire(c, k, FP_1, TOKEN_B, 10000), STORE_ACQ_IN_PROGRESS);
    assert_int_equal(acquire(c, k, FP_2, TOKEN_B, 10000), STORE_ACQ_MISMATCH);
    /* the old owner's lock is not ours to touch, even with its token (an
     * error: the scripts of this layout meet a hash) */
    assert_int_equal(renew(c, k, TOKEN_A, 10000), -1);
    assert_int_equal(complete(c, k, TOKEN_A, (const uint8_t *)"x", 1, 60), -1);
    assert_int_equal(release(c, k, TOKEN_A), -1);
    r = sync_cmd(rc, "HGET %s s", full);
    assert_int_equal(r->type, REDIS_REPLY_STRING);
    assert_string_equal(r->str, "p");
    freeReplyObject(r);

    /* an old instance on a key this one locked: an error, nothing taken */
    unique_skey(k, sizeof(k), "newp");
    snprintf(full, sizeof(full), PREFIX "{%s}", k);
    assert_int_equal(acquire(c, k, FP_1, TOKEN_A, 10000), STORE_ACQ_LOCKED);
    r = redisCommand(rc, "EVAL %s 1 %s %b %s 10000", old_acquire, full, FP_1, (size_t)STORE_FP_LEN,
                     TOKEN_B);
    assert_non_null(r);
    assert_int_equal(r->type, REDIS_REPLY_ERROR);
    assert_non_null(strstr(r->str, "WRONGTYPE"));
    freeReplyObject(r);
    assert_value(rc, full, 'p', TOKEN_A, FP_1, NULL, 0);
    redisFree(rc);
}

static void test_redis_noscript_reload(void **state)
{
    struct ctx *c = *state;
    char k[64];
    unique_skey(k, sizeof(k), "noscript");
    assert_int_equal(ping(c), 1);
    redisContext *rc = redis_sync();
    assert_non_null(rc);
    freeReplyObject(sync_cmd(rc, "SCRIPT FLUSH"));
    assert_int_equal(acquire(c, k, FP_1, TOKEN_A, 10000), STORE_ACQ_LOCKED);
    freeReplyObject(sync_cmd(rc, "SCRIPT FLUSH"));
    assert_int_equal(renew(c, k, TOKEN_A, 10000), 1);
    freeReplyObject(sync_cmd(rc, "SCRIPT FLUSH"));
    assert_int_equal(complete(c, k, TOKEN_A, (const uint8_t *)"x", 1, 60), 1);
    freeReplyObject(sync_cmd(rc, "SCRIPT FLUSH"));
    assert_int_equal(acquire(c, k, FP_1, TOKEN_B, 10000), STORE_ACQ_COMPLETED);
    redisFree(rc);
}

/* Polls ping until the store answers again (bounded). */
static bool wait_store_up(struct ctx *c, int max_ms)
{
    uint64_t end = now_ms() + (uint64_t)max_ms;
    while (now_ms() < end) {
        struct done_res res = {0};
        store_ping(c->st, done_cb, &res);
        run_until(c, &res.done, WAIT_MS);
        if (res.status == 1) return true;
        run_for(c, 50);
    }
    return false;
}

static void test_redis_killed_and_restarted(void **state)
{
    struct ctx *c = *state;
    char k[64];
    unique_skey(k, sizeof(k), "restart");
    assert_int_equal(acquire(c, k, FP_1, TOKEN_A, 10000), STORE_ACQ_LOCKED);
    redis_stop();
    /* every operation answers with an error while Redis is gone */
    assert_int_equal(acquire(c, k, FP_1, TOKEN_A, 10000), STORE_ACQ_ERROR);
    assert_int_equal(release(c, k, TOKEN_A), -1);
    assert_int_equal(ping(c), -1);
    run_for(c, 300); /* reconnect attempts fail meanwhile */
    assert_int_equal(acquire(c, k, FP_1, TOKEN_A, 10000), STORE_ACQ_ERROR);
    assert_int_equal(complete(c, k, TOKEN_A, (const uint8_t *)"x", 1, 60), -1);
    assert_int_equal(renew(c, k, TOKEN_A, 1000), -1);

    assert_int_equal(redis_start(), 0);
    assert_true(wait_store_up(c, 10000));
    /* the same store works again (a fresh server: the key is gone) */
    assert_int_equal(acquire(c, k, FP_1, TOKEN_A, 10000), STORE_ACQ_LOCKED);
    assert_int_equal(acquire(c, k, FP_1, TOKEN_B, 10000), STORE_ACQ_IN_PROGRESS);
}

/* INFO stats total_connections_received, read over a fresh connection. */
static long long redis_total_connections(void)
{
    redisContext *rc = redis_sync();
    assert_non_null(rc);
    redisReply *r = sync_cmd(rc, "INFO stats");
    assert_int_equal(r->type, REDIS_REPLY_STRING);
    const char *p = strstr(r->str, "total_connections_received:");
    assert_non_null(p);
    long long n = atoll(p + strlen("total_connections_received:"));
    freeReplyObject(r);
    redisFree(rc);
    return n;
}

static void test_redis_deadline_on_stuck_server(void **state)
{
    struct ctx *c = *state;
    store_free(c->st);
    c->cfg.redis.timeout_ms = 200;
    c->st = ctx_new_store(c);
    assert_true(wait_store_up(c, 5000));
    char k[64];
    unique_skey(k, sizeof(k), "stuck");
    long long conns_before = redis_total_connections();

    assert_int_equal(kill(redis_pid, SIGSTOP), 0);
    struct acq_res a;
    assert_int_equal(acquire_full(c, c->st, k, FP_1, TOKEN_A, 10000, &a), STORE_ACQ_ERROR);
    struct done_res d = {0};
    store_renew(c->st, k, strlen(k), TOKEN_A, 1000, done_cb, &d);
    run_until(c, &d.done, WAIT_MS);
    assert_int_equal(d.status, -1);
    assert_int_equal(kill(redis_pid, SIGCONT), 0);
    /* late replies (if any) arrive now and must be dropped */
    run_for(c, 500);
    assert_int_equal(a.calls, 1);
    assert_int_equal(d.calls, 1);
    assert_true(wait_store_up(c, 10000));
    /* the stuck connection was given up for a new one (the +1 is the
     * connection that reads the counter) */
    assert_true(redis_total_connections() >= conns_before + 2);
    /* the timed-out acquire did not leave a lock behind once answered:
     * either it never ran, or its late LOCKED answer was given back; in
     * both cases the key is free or becomes free at lock expiry */
    char k2[64];
    unique_skey(k2, sizeof(k2), "after-stuck");
    assert_int_equal(acquire(c, k2, FP_1, TOKEN_A, 10000), STORE_ACQ_LOCKED);
}

static void test_redis_wait_replicas_unmet(void **state)
{
    struct ctx *c = *state;
    store_free(c->st);
    c->cfg.redis.wait_replicas = 1;
    c->cfg.redis.timeout_ms = 400;
    c->st = ctx_new_store(c);
    char k[64], full[128];
    unique_skey(k, sizeof(k), "wait");
    snprintf(full, sizeof(full), PREFIX "{%s}", k);
    assert_int_equal(acquire(c, k, FP_1, TOKEN_A, 10000), STORE_ACQ_ERROR);
    redisContext *rc = redis_sync();
    assert_non_null(rc);
    assert_int_equal(sync_int(rc, "EXISTS %s", full), 0);
    redisFree(rc);
    /* other operations are not affected by wait_replicas */
    assert_int_equal(ping(c), 1);
    assert_int_equal(release(c, k, TOKEN_A), 0);
}

static void test_redis_unix_socket(void **state)
{
    struct ctx *c = *state;
    store_free(c->st);
    c->cfg.redis.unix_socket = true;
    c->cfg.redis.host = redis_sock;
    c->st = ctx_new_store(c);
    char k[64];
    unique_skey(k, sizeof(k), "unix");
    assert_int_equal(acquire(c, k, FP_1, TOKEN_A, 10000), STORE_ACQ_LOCKED);
    assert_int_equal(acquire(c, k, FP_2, TOKEN_A, 10000), STORE_ACQ_MISMATCH);
}

static void test_redis_auth_and_select(void **state)
{
    struct ctx *c = *state;
    redisContext *rc = redis_sync();
    assert_non_null(rc);
    freeReplyObject(sync_cmd(rc, "CONFIG SET requirepass %s", "s3cret"));

    store_free(c->st);
    c->cfg.redis.password = "s3cret";
    c->cfg.redis.db = 3;
    c->st = ctx_new_store(c);
    char k[64], full[128];
    unique_skey(k, sizeof(k), "auth");
    snprintf(full, sizeof(full), PREFIX "{%s}", k);
    assert_int_equal(acquire(c, k, FP_1, TOKEN_A, 10000), STORE_ACQ_LOCKED);

    /* a wrong password: errors, not a hang */
    struct cfg bad;
    fill_cfg(&bad);
    bad.redis.password = "wrong";
    bad.redis.timeout_ms = 300;
    struct store *st_bad = store_redis_new(c->base, &bad, NULL);
    struct acq_res a;
    assert_int_equal(acquire_full(c, st_bad, k, FP_1, TOKEN_A, 10000, &a), STORE_ACQ_ERROR);
    store_free(st_bad);

    freeReplyObject(sync_cmd(rc, "SELECT 3"));
    assert_int_equal(sync_int(rc, "EXISTS %s", full), 1);
    freeReplyObject(sync_cmd(rc, "SELECT 0"));
    assert_int_equal(sync_int(rc, "EXISTS %s", full), 0);
    freeReplyObject(sync_cmd(rc, "CONFIG SET requirepass %s", ""));
    redisFree(rc);
}

static void test_redis_down_at_start(void **state)
{
    struct ctx *c = *state;
    store_free(c->st);
    c->cfg.redis.port = free_port(); /* nobody listens there */
    c->st = ctx_new_store(c);
    char k[64];
    unique_skey(k, sizeof(k), "down");
    assert_int_equal(acquire(c, k, FP_1, TOKEN_A, 10000), STORE_ACQ_ERROR);
    run_for(c, 300);
    assert_int_equal(acquire(c, k, FP_1, TOKEN_A, 10000), STORE_ACQ_ERROR);
    assert_int_equal(ping(c), -1);
}

/* The limit keys: the rate state and the slots zset under one hash tag,
 * each expiring by itself; the limit scripts reloaded after NOSCRIPT. */
static void test_redis_limit_keys(void **state)
{
    struct ctx *c = *state;
    char s[96], rate[160], slots[160];
    unique_scope(s, sizeof(s), "keys");
    snprintf(rate, sizeof(rate), PREFIX "{rl:%s}", s);
    snprintf(slots, sizeof(slots), PREFIX "{rl:%s}:s", s);
    redisContext *rc = redis_sync();
    assert_non_null(rc);
    struct store_limit_reply r = stl_limit(c->base, c->st, s, TOKEN_A, 10, 1000, 2, true, 5000);
    assert_int_equal(r.verdict, STORE_LIMIT_ALLOWED);
    redisReply *t = sync_cmd(rc, "TYPE %s", rate);
    assert_string_equal(t->str, "string");
    freeReplyObject(t);
    long long pttl = sync_int(rc, "PTTL %s", rate);
    assert_true(pttl > 0 && pttl <= 100); /* until the whole allowance is back */
    t = sync_cmd(rc, "TYPE %s", slots);
    assert_string_equal(t->str, "zset");
    freeReplyObject(t);
    pttl = sync_int(rc, "PTTL %s", slots);
    assert_true(pttl > 0 && pttl <= 5000);
    t = sync_cmd(rc,
                 "ZSCORE %s "
                 "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
                 slots);
    assert_int_equal(t->type, REDIS_REPLY_STRING);
    freeReplyObject(t);
    char pattern[160];
    snprintf(pattern, sizeof(pattern), PREFIX "*%s*", s);
    t = sync_cmd(rc, "KEYS %s", pattern);
    assert_int_equal(t->elements, 2);
    freeReplyObject(t);

    freeReplyObject(sync_cmd(rc, "SCRIPT FLUSH"));
    r = stl_limit(c->base, c->st, s, TOKEN_B, 10, 1000, 2, true, 5000);
    assert_int_equal(r.verdict, STORE_LIMIT_ALLOWED);
    assert_int_equal(r.remaining, 8);
    freeReplyObject(sync_cmd(rc, "SCRIPT FLUSH"));
    assert_int_equal(stl_limit_renew(c->base, c->st, s, TOKEN_A, 5000), 1);
    freeReplyObject(sync_cmd(rc, "SCRIPT FLUSH"));
    assert_int_equal(stl_limit_release(c->base, c->st, s, TOKEN_A), 1);
    assert_int_equal(stl_limit_release(c->base, c->st, s, TOKEN_B), 1);
    assert_int_equal(sync_int(rc, "EXISTS %s", slots), 0); /* no lease left: gone */
    redisFree(rc);
}

/* Redis unreachable: every limit operation answers an error, never
 * silence (both limits off included: it is still one script). */
static void test_redis_limit_down(void **state)
{
    struct ctx *c = *state;
    store_free(c->st);
    c->cfg.redis.port = free_port(); /* nobody listens there */
    c->cfg.redis.timeout_ms = 300;
    c->st = ctx_new_store(c);
    char s[96];
    unique_scope(s, sizeof(s), "down");
    struct store_limit_reply r = stl_limit(c->base, c->st, s, TOKEN_A, 10, 1000, 2, true, 1000);
    assert_int_equal(r.verdict, STORE_LIMIT_ERROR);
    assert_int_equal(r.remaining, 0);
    assert_int_equal(r.reset_ms, 0);
    assert_int_equal(r.retry_ms, 0);
    assert_int_equal(stl_limit(c->base, c->st, s, TOKEN_A, 0, 1000, 0, false, 0).verdict,
                     STORE_LIMIT_ERROR);
    assert_int_equal(stl_limit_release(c->base, c->st, s, TOKEN_A), -1);
    assert_int_equal(stl_limit_renew(c->base, c->st, s, TOKEN_A, 1000), -1);
}

/* ---- rediss:// with replies that arrive a few bytes at a time ---- */

/* A TCP proxy that hands the server's bytes to the client 64 at a time, so
 * that TLS records arrive in pieces (as over a real network, where a 16 KB
 * record spans many segments). */
struct chop_proxy {
    int lfd;
    int up_port;
};

static void *chop_proxy_run(void *arg)
{
    struct chop_proxy *p = arg;
    for (;;) {
        int cfd = accept(p->lfd, NULL, NULL);
        if (cfd < 0) return NULL;
        int ufd = socket(AF_INET, SOCK_STREAM, 0);
        struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)p->up_port)};
        a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        if (connect(ufd, (struct sockaddr *)&a, sizeof(a)) < 0) {
            close(cfd);
            close(ufd);
            continue;
        }
        struct pollfd pf[2] = {{.fd = cfd, .events = POLLIN}, {.fd = ufd, .events = POLLIN}};
        static char b[65536];
        for (;;) {
            if (poll(pf, 2, -1) < 0) break;
            ssize_t n;
            if (pf[0].revents) {
                if ((n = read(cfd, b, sizeof(b))) <= 0 || write(ufd, b, (size_t)n) != n) break;
            }
            if (pf[1].revents) {
                if ((n = read(ufd, b, sizeof(b))) <= 0) break;
                for (ssize_t o = 0; o < n; o += 64) {
                    size_t k = (size_t)(n - o < 64 ? n - o : 64);
                    if (write(cfd, b + o, k) != (ssize_t)k) break;
                    usleep(1000);
                }
            }
        }
        close(cfd);
        close(ufd);
    }
}

static pid_t tls_redis_pid = -1;

static void on_alarm(int sig)
{
    (void)sig;
    if (tls_redis_pid > 0) kill(tls_redis_pid, SIGKILL);
    if (redis_pid > 0) kill(redis_pid, SIGKILL);
    static const char msg[] = "test_redis_tls_fragmented_records: the event loop is stuck\n";
    if (write(2, msg, sizeof(msg) - 1) < 0) _exit(1);
    _exit(1);
}

/* A TLS record that arrives in pieces leaves SSL_has_pending true while
 * SSL_read says WANT_READ: the read loop must wait for the next edge, not
 * spin. */
static void test_redis_tls_fragmented_records(void **state)
{
    struct ctx *c = *state;
    char cmd[1024];
    snprintf(cmd, sizeof(cmd),
             "openssl req -x509 -newkey rsa:2048 -nodes -keyout %s/k.pem -out %s/c.pem "
             "-subj /CN=127.0.0.1 -days 1 >/dev/null 2>&1",
             redis_dir, redis_dir);
    if (system(cmd) != 0) skip();
    int tls_port = free_port();
    char port_s[16], cert[128], key[128];
    snprintf(port_s, sizeof(port_s), "%d", tls_port);
    snprintf(cert, sizeof(cert), "%s/c.pem", redis_dir);
    snprintf(key, sizeof(key), "%s/k.pem", redis_dir);
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        int devnull = open("/dev/null", O_RDWR);
        dup2(devnull, 1);
        dup2(devnull, 2);
        execlp("redis-server", "redis-server", "--port", "0", "--tls-port", port_s,
               "--tls-cert-file", cert, "--tls-key-file", key, "--tls-ca-cert-file", cert,
               "--tls-auth-clients", "no", "--save", "", "--appendonly", "no", "--bind",
               "127.0.0.1", "--dir", redis_dir, (char *)NULL);
        _exit(127);
    }
    tls_redis_pid = pid;
    bool up = false;
    for (int i = 0; i < 200 && !up; i++) {
        int fd = socket(AF_INET, SOCK_STREAM, 0);
        struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)tls_port)};
        a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        up = connect(fd, (struct sockaddr *)&a, sizeof(a)) == 0;
        close(fd);
        if (!up) usleep(20000);
    }
    if (!up) {
        stop_pid(&pid);
        skip(); /* a redis-server without TLS */
    }

    static struct chop_proxy px;
    px.up_port = tls_port;
    px.lfd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in la = {.sin_family = AF_INET};
    la.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t ll = sizeof(la);
    assert_int_equal(bind(px.lfd, (struct sockaddr *)&la, sizeof(la)), 0);
    assert_int_equal(listen(px.lfd, 4), 0);
    assert_int_equal(getsockname(px.lfd, (struct sockaddr *)&la, &ll), 0);
    pthread_t th;
    assert_int_equal(pthread_create(&th, NULL, chop_proxy_run, &px), 0);

    store_free(c->st);
    c->cfg.redis.tls = true;
    c->cfg.redis.tls_client.verify = false;
    c->cfg.redis.port = ntohs(la.sin_port);
    c->cfg.redis.timeout_ms = 5000;
    char err[256];
    c->tls = tls_set_new(&c->cfg, err, sizeof(err));
    assert_non_null(c->tls);
    c->st = ctx_new_store(c);

    signal(SIGALRM, on_alarm);
    alarm(30);
    char k[64];
    unique_skey(k, sizeof(k), "tlsfrag");
    uint8_t rec[1000];
    memset(rec, 'r', sizeof(rec));
    assert_int_equal(acquire(c, k, FP_1, TOKEN_A, 10000), STORE_ACQ_LOCKED);
    assert_int_equal(complete(c, k, TOKEN_A, rec, sizeof(rec), 60), 1);
    struct acq_res a;
    assert_int_equal(acquire_full(c, c->st, k, FP_1, TOKEN_B, 10000, &a), STORE_ACQ_COMPLETED);
    assert_int_equal(a.rec_len, sizeof(rec));
    alarm(0);

    store_free(c->st);
    c->st = NULL;
    tls_set_free(c->tls);
    c->tls = NULL;
    shutdown(px.lfd, SHUT_RDWR);
    close(px.lfd);
    pthread_join(th, NULL);
    stop_pid(&pid);
    tls_redis_pid = -1;
    c->st = store_memory_new(c->base, c->sh, 1000); /* for ctx_teardown */
}

/* Every backend (the name kept from when there were two). */
#define BOTH(f)                                                                                    \
    cmocka_unit_test_prestate_setup_teardown(f, ctx_setup, ctx_teardown, (void *)&be_memory),      \
        cmocka_unit_test_prestate_setup_teardown(f, ctx_setup, ctx_teardown, (void *)&be_redis),   \
        cmocka_unit_test_prestate_setup_teardown(f, ctx_setup, ctx_teardown, (void *)&be_lmdb),    \
        cmocka_unit_test_prestate_setup_teardown(f, ctx_setup, ctx_teardown,                       \
                                                 (void *)&be_lmdb_fsync)
#define MEMORY(f)                                                                                  \
    cmocka_unit_test_prestate_setup_teardown(f, ctx_setup, ctx_teardown, (void *)&be_memory)
#define REDIS(f)                                                                                   \
    cmocka_unit_test_prestate_setup_teardown(f, ctx_setup, ctx_teardown, (void *)&be_redis)

int main(void)
{
    signal(SIGPIPE, SIG_IGN);
    const struct CMUnitTest tests[] = {
        BOTH(test_acquire_states),
        BOTH(test_scopes_are_independent),
        BOTH(test_complete_and_replay),
        BOTH(test_empty_record),
        BOTH(test_release),
        BOTH(test_renew),
        BOTH(test_lock_expiry),
        BOTH(test_ttl_expiry),
        BOTH(test_ping),
        BOTH(test_never_synchronous),
        BOTH(test_arguments_copied),
        BOTH(test_free_drops_inflight),
        BOTH(test_free_inside_callback),
        BOTH(test_limit_rate_burst),
        BOTH(test_limit_concurrency),
        BOTH(test_limit_concurrency_counts_rate),
        BOTH(test_limit_lease_expiry),
        BOTH(test_limit_renew),
        BOTH(test_limit_scopes_are_independent),
        BOTH(test_limit_off_and_long_scope),
        BOTH(test_limit_shared_by_two_stores),
        MEMORY(test_memory_shared_across_threads),
        MEMORY(test_memory_many_keys),
        MEMORY(test_memory_evicts_oldest_first),
        MEMORY(test_memory_replay_does_not_reorder),
        MEMORY(test_memory_locks_never_evicted),
        MEMORY(test_memory_full_of_locks),
        MEMORY(test_memory_accounting_returns_to_zero),
        MEMORY(test_memory_bound_respected),
        MEMORY(test_memory_rehash_keeps_keys),
        MEMORY(test_memory_bounded_threads),
        MEMORY(test_memory_scope_cap),
        MEMORY(test_memory_scope_full_of_locks),
        MEMORY(test_memory_largest_scope_first),
        MEMORY(test_memory_evicts_from_largest_randomized),
        MEMORY(test_memory_scope_bookkeeping_freed),
        MEMORY(test_memory_limit_accounting),
        REDIS(test_redis_key_layout),
        REDIS(test_redis_acquire_is_one_command),
        REDIS(test_redis_acquire_script_without_version),
        REDIS(test_redis_older_layout),
        REDIS(test_redis_noscript_reload),
        REDIS(test_redis_unix_socket),
        REDIS(test_redis_auth_and_select),
        REDIS(test_redis_wait_replicas_unmet),
        REDIS(test_redis_down_at_start),
        REDIS(test_redis_limit_keys),
        REDIS(test_redis_limit_down),
        REDIS(test_redis_deadline_on_stuck_server),
        REDIS(test_redis_killed_and_restarted),
        REDIS(test_redis_tls_fragmented_records),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
