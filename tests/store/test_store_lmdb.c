/* test_store_lmdb.c — the LMDB store's own cases (the contract is in
 * test_store.c): records survive closing and reopening the environment;
 * two environments opened on one path (as two processes would) and a
 * forked process see each other's locks and limits; the bounds and the
 * eviction order (a scope's own oldest first, then the largest scope's,
 * never a lock); the expiry sweep; long keys; and the environments it
 * refuses (not an LMDB file, a path under a file, data above max_bytes,
 * another program's databases); writes issued together (one transaction)
 * and a completion queued when its store is freed. Each case has a fresh directory; every
 * wait is bounded. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include "idemgate/store/store.h"
#include "store_testlib.h"

#include <event2/event.h>
#include <fcntl.h>
#include <lmdb.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

struct ctx {
    struct event_base *base;
    struct event *tick;
    char dir[64];
    struct store_lmdb_env *env;
    struct store *st;
};

static struct store_lmdb_env *open_env(const char *dir, uint64_t max_bytes, uint64_t scope_bytes)
{
    struct store_lmdb_opts o = {dir, max_bytes, scope_bytes, false};
    struct store_lmdb_env *env = NULL;
    char err[512];
    if (store_lmdb_env_open(&o, &env, err, sizeof(err)) < 0) fprintf(stderr, "%s\n", err);
    return env;
}

static int setup(void **state)
{
    struct ctx *c = calloc(1, sizeof(*c));
    c->base = event_base_new();
    c->tick = stl_tick_new(c->base);
    snprintf(c->dir, sizeof(c->dir), "/tmp/idemgate-test-lmdb-XXXXXX");
    if (!mkdtemp(c->dir)) return -1;
    c->env = open_env(c->dir, 16u << 20, 0);
    if (!c->env) return -1;
    c->st = store_lmdb_new(c->base, c->env);
    *state = c;
    return 0;
}

static void close_store(struct ctx *c)
{
    store_free(c->st);
    c->st = NULL;
    store_lmdb_env_free(c->env);
    c->env = NULL;
}

/* Reopens the environment with these bounds. */
static void reopen(struct ctx *c, uint64_t max_bytes, uint64_t scope_bytes)
{
    close_store(c);
    c->env = open_env(c->dir, max_bytes, scope_bytes);
    assert_non_null(c->env);
    c->st = store_lmdb_new(c->base, c->env);
}

static int teardown(void **state)
{
    struct ctx *c = *state;
    close_store(c);
    event_free(c->tick);
    event_base_free(c->base);
    char cmd[128];
    snprintf(cmd, sizeof(cmd), "rm -rf %s", c->dir);
    if (system(cmd) != 0) fprintf(stderr, "cannot remove %s\n", c->dir);
    free(c);
    return 0;
}

static enum store_acquire_state acquire(struct ctx *c, struct store *st, const char *skey,
                                        const uint8_t *fp, const char *token, uint32_t lock_ms)
{
    struct acq_res res;
    return stl_acquire(c->base, st, skey, fp, token, lock_ms, &res);
}

static void put_record(struct ctx *c, const char *skey, size_t len, uint32_t ttl)
{
    uint8_t rec[8192];
    memset(rec, 'r', sizeof(rec));
    assert_true(len <= sizeof(rec));
    assert_int_equal(acquire(c, c->st, skey, FP_1, TOKEN_A, 30000), STORE_ACQ_LOCKED);
    assert_int_equal(stl_complete(c->base, c->st, skey, TOKEN_A, rec, len, ttl), 1);
}

struct state_res {
    bool done;
    enum store_acquire_state state;
};

static void state_cb(void *arg, const struct store_acquire_reply *r)
{
    struct state_res *res = arg;
    res->done = true;
    res->state = r->state;
}

/* Whether skey holds a completed record (of any size). */
static bool has_record(struct ctx *c, const char *skey)
{
    struct state_res res = {0};
    struct store_acquire_req req = {skey, strlen(skey), FP_1, TOKEN_B, 30000, NULL, NULL, 0};
    store_acquire(c->st, &req, state_cb, &res);
    stl_run_until(c->base, &res.done, WAIT_MS);
    assert_true(res.done);
    if (res.state == STORE_ACQ_LOCKED) stl_release(c->base, c->st, skey, TOKEN_B);
    return res.state == STORE_ACQ_COMPLETED;
}

/* ---- durability and sharing ---- */

static void test_records_survive_reopen(void **state)
{
    struct ctx *c = *state;
    const uint8_t rec[] = "HTTP record \0 with a NUL";
    assert_int_equal(acquire(c, c->st, "s:done", FP_1, TOKEN_A, 30000), STORE_ACQ_LOCKED);
    assert_int_equal(stl_complete(c->base, c->st, "s:done", TOKEN_A, rec, sizeof(rec), 60), 1);
    assert_int_equal(acquire(c, c->st, "s:lock", FP_1, TOKEN_A, 30000), STORE_ACQ_LOCKED);
    reopen(c, 16u << 20, 0);
    struct acq_res res;
    assert_int_equal(stl_acquire(c->base, c->st, "s:done", FP_1, TOKEN_B, 1000, &res),
                     STORE_ACQ_COMPLETED);
    assert_int_equal(res.rec_len, sizeof(rec));
    assert_memory_equal(res.rec, rec, sizeof(rec));
    assert_int_equal(acquire(c, c->st, "s:lock", FP_1, TOKEN_B, 1000), STORE_ACQ_IN_PROGRESS);
    /* the owner's token still completes it after the restart */
    assert_int_equal(stl_complete(c->base, c->st, "s:lock", TOKEN_A, rec, 3, 60), 1);
    struct store_lmdb_stats st;
    store_lmdb_stats(c->env, &st);
    assert_int_equal(st.completed, 2);
    assert_int_equal(st.locks, 0);
}

/* Writes issued before the loop runs share one transaction: each sees the
 * ones before it (two acquires of one new key: one lock, one 409), each
 * gets its own answer, and what the caller lent may change after the
 * call (the store copied it). */
static void test_writes_issued_together(void **state)
{
    struct ctx *c = *state;
    struct acq_res a[4];
    memset(a, 0, sizeof(a));
    const char *keys[4] = {"s:t1", "s:t2", "s:t3", "s:t1"};
    char skey[16];
    for (int i = 0; i < 4; i++) {
        snprintf(skey, sizeof(skey), "%s", keys[i]);
        store_acquire(c->st,
                      &(struct store_acquire_req){skey, strlen(skey), FP_1,
                                                  i == 3 ? TOKEN_B : TOKEN_A, 30000, NULL, NULL, 0},
                      acq_cb, &a[i]);
        memset(skey, 'x', sizeof(skey)); /* lent for the call only */
    }
    for (int i = 0; i < 4; i++) {
        stl_run_until(c->base, &a[i].done, WAIT_MS);
        assert_true(a[i].done);
        assert_int_equal(a[i].calls, 1);
    }
    assert_int_equal(a[0].state, STORE_ACQ_LOCKED);
    assert_int_equal(a[1].state, STORE_ACQ_LOCKED);
    assert_int_equal(a[2].state, STORE_ACQ_LOCKED);
    assert_int_equal(a[3].state, STORE_ACQ_IN_PROGRESS);
    uint8_t rec[64];
    struct done_res d[3];
    memset(d, 0, sizeof(d));
    for (int i = 0; i < 3; i++) {
        memset(rec, 'a' + i, sizeof(rec));
        store_complete(c->st, keys[i], strlen(keys[i]), TOKEN_A, rec, sizeof(rec), 60, done_cb,
                       &d[i]);
        memset(rec, 'z', sizeof(rec));
    }
    for (int i = 0; i < 3; i++) {
        stl_run_until(c->base, &d[i].done, WAIT_MS);
        assert_int_equal(d[i].status, 1);
    }
    for (int i = 0; i < 3; i++) {
        struct acq_res r;
        assert_int_equal(stl_acquire(c->base, c->st, keys[i], FP_1, TOKEN_B, 1000, &r),
                         STORE_ACQ_COMPLETED);
        assert_int_equal(r.rec_len, sizeof(rec));
        memset(rec, 'a' + i, sizeof(rec));
        assert_memory_equal(r.rec, rec, sizeof(rec));
    }
}

/* A completion still queued when its store is freed (a worker stopping)
 * is written, not lost: the record is there after a reopen. */
static void test_free_writes_what_is_queued(void **state)
{
    struct ctx *c = *state;
    assert_int_equal(acquire(c, c->st, "s:last", FP_1, TOKEN_A, 30000), STORE_ACQ_LOCKED);
    struct done_res d = {0};
    store_complete(c->st, "s:last", 6, TOKEN_A, (const uint8_t *)"kept", 4, 60, done_cb, &d);
    reopen(c, 16u << 20, 0); /* frees the store before its loop ran again */
    assert_false(d.done);
    struct acq_res r;
    assert_int_equal(stl_acquire(c->base, c->st, "s:last", FP_1, TOKEN_B, 1000, &r),
                     STORE_ACQ_COMPLETED);
    assert_memory_equal(r.rec, "kept", 4);
}

static void test_two_environments_share(void **state)
{
    struct ctx *c = *state;
    struct store_lmdb_env *other = open_env(c->dir, 16u << 20, 0);
    assert_non_null(other);
    struct store *st2 = store_lmdb_new(c->base, other);
    assert_int_equal(acquire(c, c->st, "s:k", FP_1, TOKEN_A, 30000), STORE_ACQ_LOCKED);
    assert_int_equal(acquire(c, st2, "s:k", FP_1, TOKEN_B, 30000), STORE_ACQ_IN_PROGRESS);
    assert_int_equal(acquire(c, st2, "s:k", FP_2, TOKEN_B, 30000), STORE_ACQ_MISMATCH);
    assert_int_equal(stl_release(c->base, st2, "s:k", TOKEN_B), 0); /* fenced */
    assert_int_equal(stl_complete(c->base, c->st, "s:k", TOKEN_A, (const uint8_t *)"ok", 2, 60), 1);
    struct acq_res res;
    assert_int_equal(stl_acquire(c->base, st2, "s:k", FP_1, TOKEN_B, 1000, &res),
                     STORE_ACQ_COMPLETED);
    assert_memory_equal(res.rec, "ok", 2);
    /* one rate limit for both */
    for (int i = 0; i < 3; i++)
        assert_int_equal(
            stl_limit(c->base, i % 2 ? st2 : c->st, "rl", TOKEN_A, 3, 60000, 0, false, 0).verdict,
            STORE_LIMIT_ALLOWED);
    assert_int_equal(stl_limit(c->base, st2, "rl", TOKEN_A, 3, 60000, 0, false, 0).verdict,
                     STORE_LIMIT_RATE);
    store_free(st2);
    store_lmdb_env_free(other);
}

/* The child opens the path itself (after fork, as another process does)
 * and exits with the state it got. */
static void test_forked_process_sees_lock(void **state)
{
    struct ctx *c = *state;
    assert_int_equal(acquire(c, c->st, "s:forked", FP_1, TOKEN_A, 30000), STORE_ACQ_LOCKED);
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        alarm(10);
        struct event_base *base = event_base_new();
        struct event *tick = stl_tick_new(base);
        struct store_lmdb_env *env = open_env(c->dir, 16u << 20, 0);
        if (!env) _exit(100);
        struct store *st = store_lmdb_new(base, env);
        struct acq_res res;
        enum store_acquire_state s = stl_acquire(base, st, "s:forked", FP_1, TOKEN_B, 1000, &res);
        enum store_acquire_state s2 = stl_acquire(base, st, "s:child", FP_1, TOKEN_B, 30000, &res);
        store_free(st);
        store_lmdb_env_free(env);
        event_free(tick);
        event_base_free(base);
        _exit(s == STORE_ACQ_IN_PROGRESS && s2 == STORE_ACQ_LOCKED ? 0 : 10 + (int)s);
    }
    int status = 0;
    assert_int_equal(waitpid(pid, &status, 0), pid);
    assert_true(WIFEXITED(status));
    assert_int_equal(WEXITSTATUS(status), 0);
    /* and the child's lock is seen here */
    assert_int_equal(acquire(c, c->st, "s:child", FP_1, TOKEN_A, 1000), STORE_ACQ_IN_PROGRESS);
}

static void test_long_keys(void **state)
{
    struct ctx *c = *state;
    char a[1200], b[1200];
    memset(a, 'k', sizeof(a) - 1);
    a[sizeof(a) - 1] = '\0';
    memcpy(a, "scope:", 6);
    memcpy(b, a, sizeof(a));
    b[sizeof(b) - 2] = 'z'; /* differs only past the cut */
    assert_int_equal(acquire(c, c->st, a, FP_1, TOKEN_A, 30000), STORE_ACQ_LOCKED);
    assert_int_equal(acquire(c, c->st, b, FP_1, TOKEN_A, 30000), STORE_ACQ_LOCKED);
    assert_int_equal(acquire(c, c->st, a, FP_1, TOKEN_B, 30000), STORE_ACQ_IN_PROGRESS);
    struct store_key_info k;
    store_lmdb_key(c->env, b, strlen(b), false, true, &k);
    assert_int_equal(k.found, 1);
    assert_int_equal(k.skey_len, strlen(b));
    assert_memory_equal(k.skey, b, k.skey_len);
    store_key_info_free(&k);
    assert_int_equal(acquire(c, c->st, b, FP_1, TOKEN_B, 30000), STORE_ACQ_LOCKED);
}

/* ---- expiry ---- */

static void test_sweep_reclaims(void **state)
{
    struct ctx *c = *state;
    char k[32];
    for (int i = 0; i < 50; i++) {
        snprintf(k, sizeof(k), "sw:%d", i);
        put_record(c, k, 100, 1);
    }
    assert_int_equal(acquire(c, c->st, "sw:lock", FP_1, TOKEN_A, 300), STORE_ACQ_LOCKED);
    assert_int_equal(acquire(c, c->st, "keep:1", FP_1, TOKEN_A, 60000), STORE_ACQ_LOCKED);
    struct store_lmdb_stats st;
    store_lmdb_stats(c->env, &st);
    assert_int_equal(st.entries, 52);
    /* no operation touches them: the timer's sweep does (every second) */
    uint64_t end = now_ms() + 6000;
    do {
        stl_run_for(c->base, 200);
        store_lmdb_stats(c->env, &st);
    } while (st.entries > 1 && now_ms() < end);
    assert_int_equal(st.entries, 1);
    assert_int_equal(st.expired, 51);
    assert_int_equal(st.scopes, 1);
    assert_int_equal(store_lmdb_scope_bytes(c->env, "sw", 2), 0);
}

/* ---- bounds and eviction ---- */

static void test_scope_bound_evicts_own_oldest(void **state)
{
    struct ctx *c = *state;
    reopen(c, 16u << 20, 16384);
    char k[32];
    put_record(c, "other:1", 2000, 60);
    for (int i = 0; i < 20; i++) {
        snprintf(k, sizeof(k), "capped:%d", i);
        put_record(c, k, 2000, 60);
        assert_true(store_lmdb_scope_bytes(c->env, "capped", 6) <= 16384);
    }
    assert_true(has_record(c, "capped:19"));
    assert_false(has_record(c, "capped:0"));
    assert_true(has_record(c, "other:1")); /* another scope is never touched */
    /* oldest first: what is left is a run of the newest */
    bool seen = false;
    for (int i = 0; i < 20; i++) {
        snprintf(k, sizeof(k), "capped:%d", i);
        bool has = has_record(c, k);
        if (seen) assert_true(has);
        seen |= has;
    }
    struct store_lmdb_stats st;
    store_lmdb_stats(c->env, &st);
    assert_true(st.evictions > 0);
}

static void test_scope_full_of_locks(void **state)
{
    struct ctx *c = *state;
    reopen(c, 16u << 20, 4096);
    char k[32];
    int locked = 0;
    for (int i = 0; i < 40; i++) {
        snprintf(k, sizeof(k), "locker:%d", i);
        enum store_acquire_state s = acquire(c, c->st, k, FP_1, TOKEN_A, 30000);
        if (s == STORE_ACQ_LOCKED)
            locked++;
        else
            assert_int_equal(s, STORE_ACQ_ERROR);
    }
    assert_true(locked > 0 && locked < 40);
    assert_int_equal(acquire(c, c->st, "free:1", FP_1, TOKEN_A, 30000), STORE_ACQ_LOCKED);
    /* a lock whose record does not fit stays a lock */
    uint8_t big[5000] = {0};
    snprintf(k, sizeof(k), "locker:%d", 0);
    assert_int_equal(stl_complete(c->base, c->st, k, TOKEN_A, big, sizeof(big), 60), -1);
    assert_int_equal(acquire(c, c->st, k, FP_1, TOKEN_B, 30000), STORE_ACQ_IN_PROGRESS);
    struct store_lmdb_stats st;
    store_lmdb_stats(c->env, &st);
    assert_true(st.refused > 0);
}

/* Past the store's bound the scope holding the most bytes loses its
 * oldest record; locks are never evicted; when only locks are left new
 * keys are refused. */
static void test_largest_scope_first_and_locks_kept(void **state)
{
    struct ctx *c = *state;
    reopen(c, 1u << 20, 0); /* a budget of 512 KiB */
    char k[32];
    for (int i = 0; i < 10; i++) {
        snprintf(k, sizeof(k), "small:%d", i);
        put_record(c, k, 1000, 600);
    }
    for (int i = 0; i < 5; i++) {
        snprintf(k, sizeof(k), "locks:%d", i);
        assert_int_equal(acquire(c, c->st, k, FP_1, TOKEN_A, 60000), STORE_ACQ_LOCKED);
    }
    for (int i = 0; i < 200; i++) {
        snprintf(k, sizeof(k), "big:%d", i);
        put_record(c, k, 8000, 600);
    }
    struct store_lmdb_stats st;
    store_lmdb_stats(c->env, &st);
    assert_true(st.bytes <= (1u << 20) / 2);
    assert_true(st.evictions > 0);
    for (int i = 0; i < 10; i++) {
        snprintf(k, sizeof(k), "small:%d", i);
        assert_true(has_record(c, k));
    }
    for (int i = 0; i < 5; i++) {
        snprintf(k, sizeof(k), "locks:%d", i);
        assert_int_equal(acquire(c, c->st, k, FP_1, TOKEN_B, 60000), STORE_ACQ_IN_PROGRESS);
    }
    assert_true(has_record(c, "big:199"));
    assert_false(has_record(c, "big:0"));
    /* only locks: fill with them until refused, nothing else evicted */
    int i = 0;
    for (; i < 20000; i++) {
        snprintf(k, sizeof(k), "fill:%d", i);
        if (acquire(c, c->st, k, FP_1, TOKEN_A, 60000) != STORE_ACQ_LOCKED) break;
    }
    assert_true(i < 20000);
    assert_int_equal(acquire(c, c->st, "fill:new", FP_1, TOKEN_A, 60000), STORE_ACQ_ERROR);
    store_lmdb_stats(c->env, &st);
    assert_int_equal(st.completed, 0); /* every record went before a lock was refused */
    assert_true(st.refused > 0);
}

/* ---- refused environments ---- */

static void test_refused_environments(void **state)
{
    struct ctx *c = *state;
    char path[128], err[512];
    struct store_lmdb_env *env = NULL;
    /* a path under a regular file */
    snprintf(path, sizeof(path), "%s/file", c->dir);
    int fd = open(path, O_CREAT | O_WRONLY, 0600);
    assert_true(fd >= 0);
    close(fd);
    snprintf(path, sizeof(path), "%s/file/sub", c->dir);
    struct store_lmdb_opts o = {path, 1u << 20, 0, false};
    assert_int_equal(store_lmdb_env_open(&o, &env, err, sizeof(err)), -1);
    assert_non_null(strstr(err, "lmdb.path"));
    assert_int_equal(store_lmdb_check_path(path, err, sizeof(err)), -1);
    /* a data.mdb that is not LMDB's */
    snprintf(path, sizeof(path), "%s/junk", c->dir);
    mkdir(path, 0700);
    char file[160];
    snprintf(file, sizeof(file), "%s/data.mdb", path);
    fd = open(file, O_CREAT | O_WRONLY, 0600);
    assert_true(fd >= 0);
    char junk[8192];
    memset(junk, 'x', sizeof(junk));
    assert_int_equal(write(fd, junk, sizeof(junk)), (ssize_t)sizeof(junk));
    close(fd);
    o.path = path;
    assert_int_equal(store_lmdb_env_open(&o, &env, err, sizeof(err)), -1);
    assert_non_null(strstr(err, "lmdb.path"));
    assert_non_null(strstr(err, "not an LMDB file"));
    /* another program's LMDB */
    snprintf(path, sizeof(path), "%s/foreign", c->dir);
    mkdir(path, 0700);
    MDB_env *me;
    MDB_txn *t;
    MDB_dbi dbi;
    assert_int_equal(mdb_env_create(&me), 0);
    assert_int_equal(mdb_env_open(me, path, 0, 0600), 0);
    assert_int_equal(mdb_txn_begin(me, NULL, 0, &t), 0);
    assert_int_equal(mdb_dbi_open(t, NULL, 0, &dbi), 0);
    MDB_val k = {5, "hello"}, v = {5, "world"};
    assert_int_equal(mdb_put(t, dbi, &k, &v, 0), 0);
    assert_int_equal(mdb_txn_commit(t), 0);
    mdb_env_close(me);
    o.path = path;
    assert_int_equal(store_lmdb_env_open(&o, &env, err, sizeof(err)), -1);
    assert_non_null(strstr(err, "another program"));
    /* data above max_bytes: fill 4 MiB, reopen with 1 MiB */
    reopen(c, 8u << 20, 0);
    char key[32];
    for (int i = 0; i < 600; i++) {
        snprintf(key, sizeof(key), "fill:%d", i);
        put_record(c, key, 6000, 600);
    }
    close_store(c);
    o.path = c->dir;
    o.max_bytes = 1u << 20;
    assert_int_equal(store_lmdb_env_open(&o, &env, err, sizeof(err)), -1);
    assert_non_null(strstr(err, "lmdb.max_bytes"));
    assert_null(env);
    reopen(c, 8u << 20, 0); /* for teardown */
}

int main(void)
{
    signal(SIGPIPE, SIG_IGN);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_records_survive_reopen, setup, teardown),
        cmocka_unit_test_setup_teardown(test_writes_issued_together, setup, teardown),
        cmocka_unit_test_setup_teardown(test_free_writes_what_is_queued, setup, teardown),
        cmocka_unit_test_setup_teardown(test_two_environments_share, setup, teardown),
        cmocka_unit_test_setup_teardown(test_forked_process_sees_lock, setup, teardown),
        cmocka_unit_test_setup_teardown(test_long_keys, setup, teardown),
        cmocka_unit_test_setup_teardown(test_sweep_reclaims, setup, teardown),
        cmocka_unit_test_setup_teardown(test_scope_bound_evicts_own_oldest, setup, teardown),
        cmocka_unit_test_setup_teardown(test_scope_full_of_locks, setup, teardown),
        cmocka_unit_test_setup_teardown(test_largest_scope_first_and_locks_kept, setup, teardown),
        cmocka_unit_test_setup_teardown(test_refused_environments, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
