/* test_store_cluster.c — the Redis backend in cluster and sentinel modes,
 * against real redis-server processes on free 127.0.0.1 ports:
 *  - cluster: three masters (redis-cli --cluster create); the store
 *    contract over keys spread on all nodes with no redirect once the slot
 *    map is known, a slot migrated (MOVED followed, map updated; a
 *    scope's limit keys with it), a slot mid-migration (ASK followed,
 *    map kept), a node killed;
 *  - sentinel: a master, a replica and one sentinel; the contract (the
 *    first listed sentinel is down), then a failover followed by the same
 *    store, then a failover followed as the sentinel announces it
 *    (+switch-master), before the old master stops being one.
 * Every process is stopped in the group teardown; every wait is bounded. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include "idemgate/config/config.h"
#include "idemgate/store/store.h"
#include "store_testlib.h"

#include <arpa/inet.h>
#include <event2/event.h>
#include <fcntl.h>
#include <hiredis/hiredis.h>
#include <netinet/in.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#define NCLUSTER 3

/* ---- processes ---- */

static char tmp_dir[64];

static bool port_bindable(int port)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET,
                            .sin_port = htons((uint16_t)port),
                            .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    bool ok = fd >= 0 && bind(fd, (struct sockaddr *)&a, sizeof(a)) == 0;
    if (fd >= 0) close(fd);
    return ok;
}

/* A cluster node also listens on port + 10000 (its bus): both must be
 * free, so the port must be below 55536. */
static int free_cluster_port(void)
{
    for (int i = 0; i < 1000; i++) {
        int p = free_port();
        if (p > 0 && p + 10000 <= 65535 && port_bindable(p + 10000)) return p;
    }
    return -1;
}

static pid_t spawn(char *const argv[])
{
    pid_t pid = fork();
    if (pid == 0) {
        int devnull = open("/dev/null", O_RDWR);
        dup2(devnull, 0);
        dup2(devnull, 1);
        dup2(devnull, 2);
        execvp(argv[0], argv);
        _exit(127);
    }
    return pid;
}

/* Runs argv to completion within max_ms; its exit status, or -1. */
static int run_cmd(char *const argv[], int max_ms)
{
    pid_t pid = spawn(argv);
    if (pid < 0) return -1;
    uint64_t end = now_ms() + (uint64_t)max_ms;
    int st;
    while (now_ms() < end) {
        if (waitpid(pid, &st, WNOHANG) == pid) return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
        usleep(20000);
    }
    stop_pid(&pid);
    return -1;
}

static redisContext *sync_conn(int port)
{
    struct timeval tv = {2, 0};
    redisContext *c = redisConnectWithTimeout("127.0.0.1", port, tv);
    if (c && c->err) {
        redisFree(c);
        return NULL;
    }
    if (c) redisSetTimeout(c, tv);
    return c;
}

/* One command on a fresh connection; NULL when unreachable. */
static redisReply *rq(int port, const char *fmt, ...)
{
    redisContext *c = sync_conn(port);
    if (!c) return NULL;
    va_list ap;
    va_start(ap, fmt);
    redisReply *r = redisvCommand(c, fmt, ap);
    va_end(ap);
    redisFree(c);
    return r;
}

static long long rint_or(int port, long long dflt, const char *fmt, const char *arg)
{
    redisReply *r = rq(port, fmt, arg);
    long long v = r && r->type == REDIS_REPLY_INTEGER ? r->integer : dflt;
    if (r) freeReplyObject(r);
    return v;
}

/* True when the reply text (status, string or verbatim) contains needle. */
static bool rcontains(int port, const char *cmd, const char *needle)
{
    redisReply *r = rq(port, cmd);
    bool ok = r && (r->type == REDIS_REPLY_STRING || r->type == REDIS_REPLY_STATUS) && r->str &&
              strstr(r->str, needle);
    if (r) freeReplyObject(r);
    return ok;
}

static bool answers(int port)
{
    return rcontains(port, "PING", "PONG");
}

static bool wait_for(bool (*pred)(void *), void *arg, int max_ms)
{
    uint64_t end = now_ms() + (uint64_t)max_ms;
    while (now_ms() < end) {
        if (pred(arg)) return true;
        usleep(50000);
    }
    return false;
}

static bool pred_answers(void *arg)
{
    return answers(*(int *)arg);
}

static char *path_in_tmp(const char *name, int port, char *buf, size_t n)
{
    snprintf(buf, n, "%s/%s-%d", tmp_dir, name, port);
    return buf;
}

/* ---- per-test fixture: one event_base, one store ---- */

struct ctx {
    struct event_base *base;
    struct event *tick; /* wakes the loop so that every wait stays bounded */
    struct cfg cfg;
    char *nodes[4];
    char node_text[4][32];
    struct cfg_hostport node_addrs[4];
    struct store *st;
};

static struct ctx *ctx_new(enum cfg_redis_mode mode, const int *ports, size_t n)
{
    struct ctx *c = calloc(1, sizeof(*c));
    c->base = event_base_new();
    c->tick = stl_tick_new(c->base);
    c->cfg.store = CFG_STORE_REDIS;
    c->cfg.redis.mode = mode;
    c->cfg.redis.host = "127.0.0.1";
    c->cfg.redis.port = 1; /* unused in these modes */
    c->cfg.redis.key_prefix = PREFIX;
    c->cfg.redis.timeout_ms = 1000;
    c->cfg.redis.master_name = "m";
    for (size_t i = 0; i < n; i++) {
        snprintf(c->node_text[i], sizeof(c->node_text[i]), "127.0.0.1:%d", ports[i]);
        c->nodes[i] = c->node_text[i];
        snprintf(c->node_addrs[i].host, sizeof(c->node_addrs[i].host), "127.0.0.1");
        c->node_addrs[i].port = ports[i];
    }
    c->cfg.redis.nodes.v = c->nodes;
    c->cfg.redis.nodes.n = n;
    c->cfg.redis.node_addrs = c->node_addrs;
    c->st = store_redis_new(c->base, &c->cfg, NULL);
    return c;
}

static void ctx_free(struct ctx *c)
{
    store_free(c->st);
    event_free(c->tick);
    event_base_free(c->base);
    free(c);
}

static void run_for(struct ctx *c, int ms)
{
    stl_run_for(c->base, ms);
}

/* ---- operations, driven to their answer (store_testlib) ---- */

static void full_key(char *out, size_t n, const char *skey)
{
    int r = snprintf(out, n, PREFIX "{%s}", skey);
    if (r < 0 || (size_t)r >= n) abort(); /* a test key that does not fit is a test bug */
}

static enum store_acquire_state acquire_full(struct ctx *c, const char *skey, const uint8_t *fp,
                                             const char *token, struct acq_res *res)
{
    return stl_acquire(c->base, c->st, skey, fp, token, 10000, res);
}

static enum store_acquire_state acquire(struct ctx *c, const char *skey, const uint8_t *fp,
                                        const char *token)
{
    struct acq_res res;
    return acquire_full(c, skey, fp, token, &res);
}

static int complete(struct ctx *c, const char *skey, const char *token, const uint8_t *rec,
                    size_t len)
{
    return stl_complete(c->base, c->st, skey, token, rec, len, 60);
}

static int release(struct ctx *c, const char *skey, const char *token)
{
    return stl_release(c->base, c->st, skey, token);
}

static int renew(struct ctx *c, const char *skey, const char *token)
{
    return stl_renew(c->base, c->st, skey, token, 20000);
}

static int ping(struct ctx *c)
{
    return stl_ping(c->base, c->st);
}

/* Pings until the store answers, bounded. */
static bool wait_store_up(struct ctx *c, int max_ms)
{
    uint64_t end = now_ms() + (uint64_t)max_ms;
    while (now_ms() < end) {
        if (ping(c) == 1) return true;
        run_for(c, 100);
    }
    return false;
}

/* The whole contract on one fresh key: lock, in progress, mismatch,
 * renew, complete, replay; and lock / release / lock on a second one. */
static void contract_on(struct ctx *c, const char *k1, const char *k2)
{
    static const uint8_t rec[] = {0, 'r', 'e', 'c', 0, 255};
    assert_int_equal(acquire(c, k1, FP_1, TOKEN_A), STORE_ACQ_LOCKED);
    assert_int_equal(acquire(c, k1, FP_1, TOKEN_B), STORE_ACQ_IN_PROGRESS);
    assert_int_equal(acquire(c, k1, FP_2, TOKEN_B), STORE_ACQ_MISMATCH);
    assert_int_equal(renew(c, k1, TOKEN_B), 0);
    assert_int_equal(renew(c, k1, TOKEN_A), 1);
    assert_int_equal(complete(c, k1, TOKEN_B, rec, sizeof(rec)), 0);
    assert_int_equal(complete(c, k1, TOKEN_A, rec, sizeof(rec)), 1);
    struct acq_res res;
    assert_int_equal(acquire_full(c, k1, FP_1, TOKEN_B, &res), STORE_ACQ_COMPLETED);
    assert_int_equal(res.rec_len, sizeof(rec));
    assert_memory_equal(res.rec, rec, sizeof(rec));
    assert_int_equal(acquire(c, k1, FP_2, TOKEN_B), STORE_ACQ_MISMATCH);

    assert_int_equal(release(c, k2, TOKEN_A), 0);
    assert_int_equal(acquire(c, k2, FP_1, TOKEN_A), STORE_ACQ_LOCKED);
    assert_int_equal(release(c, k2, TOKEN_B), 0);
    assert_int_equal(release(c, k2, TOKEN_A), 1);
    assert_int_equal(acquire(c, k2, FP_2, TOKEN_B), STORE_ACQ_LOCKED);
}

/* ---- cluster ---- */

static pid_t cl_pid[NCLUSTER];
static int cl_port[NCLUSTER];

static int cl_start_node(int i)
{
    char port[16], conf[128];
    snprintf(port, sizeof(port), "%d", cl_port[i]);
    path_in_tmp("nodes", cl_port[i], conf, sizeof(conf));
    char *argv[] = {"redis-server",
                    "--port",
                    port,
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    tmp_dir,
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    conf,
                    "--cluster-require-full-coverage",
                    "no",
                    "--cluster-node-timeout",
                    "5000",
                    NULL};
    cl_pid[i] = spawn(argv);
    return cl_pid[i] > 0 && wait_for(pred_answers, &cl_port[i], 10000) ? 0 : -1;
}

static bool pred_cluster_ok(void *arg)
{
    (void)arg;
    for (int i = 0; i < NCLUSTER; i++)
        if (!rcontains(cl_port[i], "CLUSTER INFO", "cluster_state:ok")) return false;
    return true;
}

static int cluster_setup(void **state)
{
    (void)state;
    snprintf(tmp_dir, sizeof(tmp_dir), "/tmp/idemgate-test-cluster-XXXXXX");
    if (!mkdtemp(tmp_dir)) return -1;
    for (int i = 0; i < NCLUSTER; i++) {
        cl_pid[i] = -1;
        cl_port[i] = free_cluster_port();
    }
    for (int i = 0; i < NCLUSTER; i++)
        if (cl_port[i] <= 0 || cl_start_node(i) != 0) return -1;
    char addr[NCLUSTER][32];
    for (int i = 0; i < NCLUSTER; i++)
        snprintf(addr[i], sizeof(addr[i]), "127.0.0.1:%d", cl_port[i]);
    char *argv[] = {"redis-cli", "--cluster",          "create", addr[0],         addr[1],
                    addr[2],     "--cluster-replicas", "0",      "--cluster-yes", NULL};
    if (run_cmd(argv, 30000) != 0) return -1;
    return wait_for(pred_cluster_ok, NULL, 30000) ? 0 : -1;
}

static int cluster_teardown(void **state)
{
    (void)state;
    char path[128];
    for (int i = 0; i < NCLUSTER; i++) {
        stop_pid(&cl_pid[i]);
        unlink(path_in_tmp("nodes", cl_port[i], path, sizeof(path)));
    }
    rmdir(tmp_dir);
    return 0;
}

static int key_slot(const char *key)
{
    return (int)rint_or(cl_port[0], -1, "CLUSTER KEYSLOT %s", key);
}

/* Index of the node that owns slot, by node 0's CLUSTER SLOTS; -1. */
static int slot_owner(int slot)
{
    redisReply *r = rq(cl_port[0], "CLUSTER SLOTS");
    int owner = -1;
    for (size_t i = 0; r && r->type == REDIS_REPLY_ARRAY && i < r->elements; i++) {
        redisReply *e = r->element[i];
        if (slot < e->element[0]->integer || slot > e->element[1]->integer) continue;
        for (int n = 0; n < NCLUSTER; n++)
            if (e->element[2]->element[1]->integer == cl_port[n]) owner = n;
    }
    if (r) freeReplyObject(r);
    return owner;
}

static int key_owner(const char *skey)
{
    char key[128];
    full_key(key, sizeof(key), skey);
    return slot_owner(key_slot(key));
}

/* How many redirect errors of one kind ("MOVED", "ASK") the node sent
 * since its last CONFIG RESETSTAT. */
static long errorstat(int port, const char *kind)
{
    redisReply *r = rq(port, "INFO errorstats");
    long n = 0;
    char needle[64];
    snprintf(needle, sizeof(needle), "errorstat_%s:count=", kind);
    if (r && r->type == REDIS_REPLY_STRING) {
        const char *p = strstr(r->str, needle);
        if (p) n = strtol(p + strlen(needle), NULL, 10);
    }
    if (r) freeReplyObject(r);
    return n;
}

static void reset_stats(void)
{
    for (int i = 0; i < NCLUSTER; i++) {
        redisReply *r = rq(cl_port[i], "CONFIG RESETSTAT");
        assert_non_null(r);
        freeReplyObject(r);
    }
}

static struct ctx *cluster_ctx(void)
{
    struct ctx *c = ctx_new(CFG_REDIS_CLUSTER, cl_port, NCLUSTER);
    assert_true(wait_store_up(c, 10000));
    /* a first keyed op: the slot map is known once it has an answer */
    char k[64];
    unique_skey(k, sizeof(k), "warm");
    assert_int_equal(acquire(c, k, FP_1, TOKEN_A), STORE_ACQ_LOCKED);
    run_for(c, 300);
    return c;
}

static void test_cluster_contract_spread(void **state)
{
    (void)state;
    struct ctx *c = cluster_ctx();
    reset_stats();
    enum { NKEYS = 24 };
    char k1[NKEYS][64], k2[NKEYS][64];
    for (int i = 0; i < NKEYS; i++) {
        unique_skey(k1[i], sizeof(k1[i]), "contract");
        unique_skey(k2[i], sizeof(k2[i]), "release");
        contract_on(c, k1[i], k2[i]);
    }
    /* the slot map sent every command straight to its node */
    for (int n = 0; n < NCLUSTER; n++) {
        assert_int_equal(errorstat(cl_port[n], "MOVED"), 0);
        assert_int_equal(errorstat(cl_port[n], "ASK"), 0);
    }
    /* the keys are spread, and each lives on the node owning its slot */
    int per_node[NCLUSTER] = {0};
    for (int i = 0; i < NKEYS; i++) {
        int owner = key_owner(k1[i]);
        assert_in_range(owner, 0, NCLUSTER - 1);
        per_node[owner]++;
        char key[128];
        full_key(key, sizeof(key), k1[i]);
        assert_int_equal(rint_or(cl_port[owner], -1, "EXISTS %s", key), 1);
    }
    for (int n = 0; n < NCLUSTER; n++)
        assert_true(per_node[n] > 0);
    assert_int_equal(ping(c), 1);
    ctx_free(c);
}

static bool node_id(int i, char out[64])
{
    redisReply *r = rq(cl_port[i], "CLUSTER MYID");
    bool ok = r && r->type == REDIS_REPLY_STRING && r->len < 64;
    if (ok) memcpy(out, r->str, r->len + 1);
    if (r) freeReplyObject(r);
    return ok;
}

static void expect_ok(redisReply *r)
{
    assert_non_null(r);
    if (r->type == REDIS_REPLY_ERROR) fail_msg("redis error: %s", r->str);
    freeReplyObject(r);
}

/* Moves the keys of slot that node `from` still holds to node `to` (the
 * slot must be migrating): a slot is assigned only once its old owner
 * holds none of its keys, and earlier tests may have left some there. */
static void migrate_keys(int slot, int from, int to)
{
    redisReply *keys = rq(cl_port[from], "CLUSTER GETKEYSINSLOT %d 1000", slot);
    assert_non_null(keys);
    assert_int_equal(keys->type, REDIS_REPLY_ARRAY);
    for (size_t i = 0; i < keys->elements; i++)
        expect_ok(rq(cl_port[from], "MIGRATE 127.0.0.1 %d %b 0 5000", cl_port[to],
                     keys->element[i]->str, keys->element[i]->len));
    freeReplyObject(keys);
}

/* Moves every key of slot from node `from` to node `to` and assigns it. */
static void migrate_slot(int slot, int from, int to)
{
    char src_id[64], dst_id[64];
    assert_true(node_id(from, src_id));
    assert_true(node_id(to, dst_id));
    expect_ok(rq(cl_port[to], "CLUSTER SETSLOT %d IMPORTING %s", slot, src_id));
    expect_ok(rq(cl_port[from], "CLUSTER SETSLOT %d MIGRATING %s", slot, dst_id));
    migrate_keys(slot, from, to);
    for (int n = 0; n < NCLUSTER; n++)
        expect_ok(rq(cl_port[n], "CLUSTER SETSLOT %d NODE %s", slot, dst_id));
}

static void test_cluster_moved(void **state)
{
    (void)state;
    struct ctx *c = cluster_ctx();
    static const uint8_t rec[] = "moved-record";
    char k[64], key[128];
    unique_skey(k, sizeof(k), "moved");
    full_key(key, sizeof(key), k);
    assert_int_equal(acquire(c, k, FP_1, TOKEN_A), STORE_ACQ_LOCKED);
    assert_int_equal(complete(c, k, TOKEN_A, rec, sizeof(rec)), 1);
    int slot = key_slot(key);
    int from = slot_owner(slot);
    assert_in_range(from, 0, NCLUSTER - 1);
    int to = (from + 1) % NCLUSTER;
    migrate_slot(slot, from, to);
    assert_int_equal(slot_owner(slot), to);
    reset_stats();

    /* first op: MOVED from the old owner, followed */
    struct acq_res res;
    assert_int_equal(acquire_full(c, k, FP_1, TOKEN_B, &res), STORE_ACQ_COMPLETED);
    assert_memory_equal(res.rec, rec, sizeof(rec));
    assert_int_equal(errorstat(cl_port[from], "MOVED"), 1);
    /* then straight to the new owner: the map was updated */
    for (int i = 0; i < 5; i++)
        assert_int_equal(acquire(c, k, FP_1, TOKEN_B), STORE_ACQ_COMPLETED);
    char k2[64];
    unique_skey(k2, sizeof(k2), "moved-after");
    assert_int_equal(acquire(c, k2, FP_1, TOKEN_A), STORE_ACQ_LOCKED);
    for (int n = 0; n < NCLUSTER; n++)
        assert_int_equal(errorstat(cl_port[n], "MOVED"), n == from ? 1 : 0);
    assert_int_equal(rint_or(cl_port[to], -1, "EXISTS %s", key), 1);
    ctx_free(c);
}

/* A scope's limit keys (the rate state and the slots) share one slot:
 * the two-key script runs there, and follows MOVED with them when the
 * slot moves (the count goes on where it was). */
static void test_cluster_limit_moved(void **state)
{
    (void)state;
    struct ctx *c = cluster_ctx();
    char k[64], s[80], rate[128], slots[160];
    unique_skey(k, sizeof(k), "limit");
    snprintf(s, sizeof(s), "rl-%s", k);
    snprintf(rate, sizeof(rate), PREFIX "{rl:%s}", s);
    snprintf(slots, sizeof(slots), PREFIX "{rl:%s}:s", s);
    struct store_limit_reply r = stl_limit(c->base, c->st, s, TOKEN_A, 5, 60000, 1, true, 10000);
    assert_int_equal(r.verdict, STORE_LIMIT_ALLOWED);
    assert_int_equal(r.remaining, 4);
    int slot = key_slot(rate);
    assert_int_equal(key_slot(slots), slot);
    int from = slot_owner(slot);
    assert_in_range(from, 0, NCLUSTER - 1);
    assert_int_equal(rint_or(cl_port[from], -1, "EXISTS %s", rate), 1);
    assert_int_equal(rint_or(cl_port[from], -1, "EXISTS %s", slots), 1);
    int to = (from + 1) % NCLUSTER;
    migrate_slot(slot, from, to);
    reset_stats();
    r = stl_limit(c->base, c->st, s, TOKEN_B, 5, 60000, 1, true, 10000);
    assert_int_equal(r.verdict, STORE_LIMIT_CONCURRENCY);
    assert_int_equal(r.remaining, 3);
    assert_int_equal(errorstat(cl_port[from], "MOVED"), 1);
    assert_int_equal(stl_limit_renew(c->base, c->st, s, TOKEN_A, 10000), 1);
    assert_int_equal(stl_limit_release(c->base, c->st, s, TOKEN_A), 1);
    r = stl_limit(c->base, c->st, s, TOKEN_B, 5, 60000, 1, true, 10000);
    assert_int_equal(r.verdict, STORE_LIMIT_ALLOWED);
    assert_int_equal(r.remaining, 2);
    assert_int_equal(errorstat(cl_port[from], "MOVED"), 1);
    assert_int_equal(rint_or(cl_port[to], -1, "EXISTS %s", slots), 1);
    ctx_free(c);
}

static void test_cluster_ask(void **state)
{
    (void)state;
    struct ctx *c = cluster_ctx();
    char k[64], key[128];
    unique_skey(k, sizeof(k), "ask");
    full_key(key, sizeof(key), k);
    int slot = key_slot(key);
    int from = slot_owner(slot);
    assert_in_range(from, 0, NCLUSTER - 1);
    int to = (from + 2) % NCLUSTER;
    char src_id[64], dst_id[64];
    assert_true(node_id(from, src_id));
    assert_true(node_id(to, dst_id));
    /* slot half-migrated: the key is not on the source, so it says ASK */
    expect_ok(rq(cl_port[to], "CLUSTER SETSLOT %d IMPORTING %s", slot, src_id));
    expect_ok(rq(cl_port[from], "CLUSTER SETSLOT %d MIGRATING %s", slot, dst_id));
    reset_stats();
    assert_int_equal(acquire(c, k, FP_1, TOKEN_A), STORE_ACQ_LOCKED);
    assert_int_equal(acquire(c, k, FP_1, TOKEN_B), STORE_ACQ_IN_PROGRESS);
    assert_int_equal(release(c, k, TOKEN_A), 1);
    assert_int_equal(acquire(c, k, FP_1, TOKEN_A), STORE_ACQ_LOCKED);
    /* every op asked the source first: ASK does not change the map */
    assert_int_equal(errorstat(cl_port[from], "ASK"), 4);
    assert_int_equal(errorstat(cl_port[from], "MOVED"), 0);
    migrate_keys(slot, from, to); /* other tests' keys of that slot */
    for (int n = 0; n < NCLUSTER; n++)
        expect_ok(rq(cl_port[n], "CLUSTER SETSLOT %d NODE %s", slot, dst_id));
    assert_int_equal(rint_or(cl_port[to], -1, "EXISTS %s", key), 1);
    assert_int_equal(acquire(c, k, FP_1, TOKEN_B), STORE_ACQ_IN_PROGRESS);
    ctx_free(c);
}

static void never_cb(void *arg, const struct store_acquire_reply *r)
{
    (void)r;
    (*(int *)arg)++;
}

/* Ops in flight on several nodes (some before the slot map is known,
 * some written to the sockets) are dropped by store_free: no callback
 * fires from inside it or after it. */
static void test_cluster_free_with_ops_in_flight(void **state)
{
    (void)state;
    for (int wait = 0; wait < 3; wait++) {
        struct ctx *c = ctx_new(CFG_REDIS_CLUSTER, cl_port, NCLUSTER);
        if (wait) run_for(c, wait * 100);
        int calls = 0;
        for (int i = 0; i < 10; i++) {
            char k[64];
            unique_skey(k, sizeof(k), "free");
            store_acquire(
                c->st,
                &(struct store_acquire_req){k, strlen(k), FP_1, TOKEN_A, 10000, NULL, NULL, 0},
                never_cb, &calls);
        }
        if (wait) event_base_loop(c->base, EVLOOP_NONBLOCK);
        int before = calls;
        store_free(c->st);
        c->st = NULL;
        assert_int_equal(calls, before);
        event_free(c->tick);
        event_base_free(c->base);
        free(c);
    }
}

/* Last in the group: node `dead` stays down. */
static void test_cluster_node_killed(void **state)
{
    (void)state;
    struct ctx *c = cluster_ctx();
    int dead = 2, seen_dead = 0;
    stop_pid(&cl_pid[dead]);
    for (int round = 0; round < 3; round++) {
        int seen_alive = 0;
        /* Keys that differ in a counter can hash to one node for a while
         * (CRC16 is linear): go on until both kinds were seen, bounded. */
        for (int i = 0; i < 12 || ((seen_alive == 0 || seen_dead == 0) && i < 400); i++) {
            char k[64];
            unique_skey(k, sizeof(k), "killed");
            int owner = key_owner(k);
            assert_in_range(owner, 0, NCLUSTER - 1);
            enum store_acquire_state st = acquire(c, k, FP_1, TOKEN_A);
            if (owner == dead) {
                assert_int_equal(st, STORE_ACQ_ERROR);
                seen_dead++;
            } else {
                assert_int_equal(st, STORE_ACQ_LOCKED);
                seen_alive++;
            }
        }
        assert_true(seen_alive > 0);
        run_for(c, 300);
    }
    assert_true(seen_dead > 0);
    ctx_free(c);
}

/* ---- sentinel ---- */

static pid_t sm_pid = -1, sr_pid = -1, ss_pid = -1;
static int sm_port, sr_port, ss_port, dead_sentinel_port;

static pid_t start_plain(int port, const char *replicaof)
{
    char p[16];
    snprintf(p, sizeof(p), "%d", port);
    char *argv[16] = {"redis-server", "--port", p,       "--bind", "127.0.0.1", "--save", "",
                      "--appendonly", "no",     "--dir", tmp_dir,  NULL};
    char master[64];
    if (replicaof) {
        snprintf(master, sizeof(master), "%s", replicaof);
        argv[11] = "--replicaof";
        argv[12] = master;
        argv[13] = NULL;
    }
    return spawn(argv);
}

static bool pred_replica_up(void *arg)
{
    (void)arg;
    return rcontains(sr_port, "INFO replication", "master_link_status:up");
}

static bool pred_sentinel_ready(void *arg)
{
    (void)arg;
    redisReply *r = rq(ss_port, "SENTINEL REPLICAS m");
    bool ok = r && r->type == REDIS_REPLY_ARRAY && r->elements >= 1;
    if (r) freeReplyObject(r);
    return ok;
}

static int sentinel_setup(void **state)
{
    (void)state;
    snprintf(tmp_dir, sizeof(tmp_dir), "/tmp/idemgate-test-sentinel-XXXXXX");
    if (!mkdtemp(tmp_dir)) return -1;
    sm_port = free_port();
    sr_port = free_port();
    ss_port = free_port();
    dead_sentinel_port = free_port();
    if (sm_port <= 0 || sr_port <= 0 || ss_port <= 0 || dead_sentinel_port <= 0) return -1;
    sm_pid = start_plain(sm_port, NULL);
    if (sm_pid <= 0 || !wait_for(pred_answers, &sm_port, 10000)) return -1;
    char master[64];
    snprintf(master, sizeof(master), "127.0.0.1 %d", sm_port);
    sr_pid = start_plain(sr_port, master);
    if (sr_pid <= 0 || !wait_for(pred_answers, &sr_port, 10000)) return -1;
    if (!wait_for(pred_replica_up, NULL, 20000)) return -1;

    char conf[128];
    path_in_tmp("sentinel.conf", ss_port, conf, sizeof(conf));
    FILE *f = fopen(conf, "w");
    if (!f) return -1;
    fprintf(f,
            "port %d\nbind 127.0.0.1\ndir %s\n"
            "sentinel monitor m 127.0.0.1 %d 1\n"
            "sentinel down-after-milliseconds m 1000\n"
            "sentinel failover-timeout m 3000\n",
            ss_port, tmp_dir, sm_port);
    fclose(f);
    char *argv[] = {"redis-server", conf, "--sentinel", NULL};
    ss_pid = spawn(argv);
    if (ss_pid <= 0 || !wait_for(pred_answers, &ss_port, 10000)) return -1;
    return wait_for(pred_sentinel_ready, NULL, 30000) ? 0 : -1;
}

static int sentinel_teardown(void **state)
{
    (void)state;
    stop_pid(&ss_pid);
    stop_pid(&sr_pid);
    stop_pid(&sm_pid);
    char path[128];
    unlink(path_in_tmp("sentinel.conf", ss_port, path, sizeof(path)));
    rmdir(tmp_dir);
    return 0;
}

static struct ctx *sentinel_ctx(void)
{
    /* the first sentinel listed is down: the next one is asked */
    int ports[2] = {dead_sentinel_port, ss_port};
    struct ctx *c = ctx_new(CFG_REDIS_SENTINEL, ports, 2);
    assert_true(wait_store_up(c, 10000));
    return c;
}

static void test_sentinel_contract(void **state)
{
    (void)state;
    struct ctx *c = sentinel_ctx();
    for (int i = 0; i < 4; i++) {
        char k1[64], k2[64], key[128];
        unique_skey(k1, sizeof(k1), "s-contract");
        unique_skey(k2, sizeof(k2), "s-release");
        contract_on(c, k1, k2);
        full_key(key, sizeof(key), k1);
        assert_int_equal(rint_or(sm_port, -1, "EXISTS %s", key), 1);
    }
    ctx_free(c);
}

/* Operations started while no master is known wait for one. */
static void test_sentinel_ops_before_master_known(void **state)
{
    (void)state;
    int ports[1] = {ss_port};
    struct ctx *c = ctx_new(CFG_REDIS_SENTINEL, ports, 1);
    char k[64];
    unique_skey(k, sizeof(k), "s-early");
    assert_int_equal(acquire(c, k, FP_1, TOKEN_A), STORE_ACQ_LOCKED);
    ctx_free(c);
}

/* Parked ops (no master known yet) are dropped by store_free too. */
static void test_sentinel_free_with_parked_ops(void **state)
{
    (void)state;
    int ports[1] = {ss_port};
    struct ctx *c = ctx_new(CFG_REDIS_SENTINEL, ports, 1);
    int calls = 0;
    for (int i = 0; i < 5; i++) {
        char k[64];
        unique_skey(k, sizeof(k), "s-free");
        store_acquire(
            c->st, &(struct store_acquire_req){k, strlen(k), FP_1, TOKEN_A, 10000, NULL, NULL, 0},
            never_cb, &calls);
    }
    ctx_free(c);
    assert_int_equal(calls, 0);
}

static bool role_is(int port, const char *role)
{
    redisReply *r = rq(port, "ROLE");
    bool ok = r && r->type == REDIS_REPLY_ARRAY && r->elements > 0 &&
              r->element[0]->type == REDIS_REPLY_STRING && strcmp(r->element[0]->str, role) == 0;
    if (r) freeReplyObject(r);
    return ok;
}

static bool pred_failed_over(void *arg)
{
    (void)arg;
    return role_is(sr_port, "master") && role_is(sm_port, "slave");
}

static bool pred_failover_accepted(void *arg)
{
    (void)arg;
    redisReply *r = rq(ss_port, "SENTINEL FAILOVER m");
    bool ok = r && r->type == REDIS_REPLY_STATUS;
    if (r) freeReplyObject(r);
    return ok;
}

static void test_sentinel_failover(void **state)
{
    (void)state;
    struct ctx *c = sentinel_ctx();
    char k[64];
    unique_skey(k, sizeof(k), "s-before");
    assert_int_equal(acquire(c, k, FP_1, TOKEN_A), STORE_ACQ_LOCKED);
    assert_int_equal(complete(c, k, TOKEN_A, (const uint8_t *)"before", 6), 1);

    /* the sentinel refuses (NOGOODSLAVE) until it has heard from the
     * replica: ask again, bounded */
    assert_true(wait_for(pred_failover_accepted, NULL, 30000));
    assert_true(wait_for(pred_failed_over, NULL, 30000));

    /* the same store finds the promoted master, within a bounded wait;
     * operations in between may fail */
    enum store_acquire_state st = STORE_ACQ_ERROR;
    char k2[64];
    uint64_t end = now_ms() + 20000;
    while (now_ms() < end) {
        unique_skey(k2, sizeof(k2), "s-after");
        st = acquire(c, k2, FP_1, TOKEN_A);
        if (st == STORE_ACQ_LOCKED) break;
        assert_int_equal(st, STORE_ACQ_ERROR);
        run_for(c, 200);
    }
    assert_int_equal(st, STORE_ACQ_LOCKED);
    char key[128];
    full_key(key, sizeof(key), k2);
    assert_int_equal(rint_or(sr_port, -1, "EXISTS %s", key), 1);
    /* the record kept before the failover was replicated */
    assert_int_equal(acquire(c, k, FP_1, TOKEN_B), STORE_ACQ_COMPLETED);
    assert_int_equal(complete(c, k2, TOKEN_A, (const uint8_t *)"r", 1), 1);
    assert_int_equal(acquire(c, k2, FP_1, TOKEN_B), STORE_ACQ_COMPLETED);
    ctx_free(c);
}

/* Like wait_for, with c's event loop running in between. */
static bool wait_running(struct ctx *c, bool (*pred)(void *), void *arg, int max_ms)
{
    uint64_t end = now_ms() + (uint64_t)max_ms;
    while (now_ms() < end) {
        if (pred(arg)) return true;
        run_for(c, 50);
    }
    return false;
}

/* The port the sentinel names for m, or -1. */
static int sentinel_master_port(void)
{
    redisReply *r = rq(ss_port, "SENTINEL get-master-addr-by-name m");
    int port = -1;
    if (r && r->type == REDIS_REPLY_ARRAY && r->elements == 2 &&
        r->element[1]->type == REDIS_REPLY_STRING)
        port = atoi(r->element[1]->str);
    if (r) freeReplyObject(r);
    return port;
}

static bool pred_sentinel_names(void *arg)
{
    return sentinel_master_port() == *(int *)arg;
}

/* The store's +switch-master subscriber is the sentinel's one client
 * with a subscription. */
static bool pred_subscribed(void *arg)
{
    (void)arg;
    return rcontains(ss_port, "CLIENT LIST", " sub=1 ");
}

/* A store connection (the handshake ends with SCRIPT LOAD, then EVALSHA)
 * is open on the server at port. */
static bool pred_store_connected(void *arg)
{
    int port = *(int *)arg;
    return rcontains(port, "CLIENT LIST", "cmd=script|load") ||
           rcontains(port, "CLIENT LIST", "cmd=evalsha");
}

static bool pred_role_slave(void *arg)
{
    return role_is(*(int *)arg, "slave");
}

/* The store moves to the promoted master when the sentinel announces it:
 * the old master is SIGSTOPped as soon as the sentinel names the new one
 * (long before the sentinel would turn it into a replica, which closes
 * its clients), so a store that learns of failovers only from errors
 * would stay on it (its next op times out, and nothing ever connects to
 * the new master). With the subscription, the next op, with none failed
 * before it, goes to the new master. Runs after test_sentinel_failover:
 * whichever is the master now is failed over again. */
static void test_sentinel_switch_announced(void **state)
{
    (void)state;
    int old_port = sentinel_master_port();
    assert_true(old_port == sm_port || old_port == sr_port);
    int new_port = old_port == sm_port ? sr_port : sm_port;
    pid_t *old_pid = old_port == sm_port ? &sm_pid : &sr_pid;
    assert_true(wait_for(pred_role_slave, &new_port, 30000));

    struct ctx *c = sentinel_ctx();
    assert_true(wait_running(c, pred_subscribed, NULL, 10000));
    char k[64], key[128];
    unique_skey(k, sizeof(k), "s-old");
    assert_int_equal(acquire(c, k, FP_1, TOKEN_A), STORE_ACQ_LOCKED);
    full_key(key, sizeof(key), k);
    assert_int_equal(rint_or(old_port, -1, "EXISTS %s", key), 1);

    /* NOGOODSLAVE until the sentinel has heard from the replica */
    uint64_t end = now_ms() + 30000;
    while (!pred_failover_accepted(NULL)) {
        assert_true(now_ms() < end);
        run_for(c, 200);
    }
    assert_true(wait_running(c, pred_sentinel_names, &new_port, 30000));
    assert_int_equal(kill(*old_pid, SIGSTOP), 0);

    assert_true(wait_running(c, pred_store_connected, &new_port, 10000));
    unique_skey(k, sizeof(k), "s-new");
    assert_int_equal(acquire(c, k, FP_1, TOKEN_A), STORE_ACQ_LOCKED);
    full_key(key, sizeof(key), k);
    assert_int_equal(rint_or(new_port, -1, "EXISTS %s", key), 1);
    assert_int_equal(complete(c, k, TOKEN_A, (const uint8_t *)"r", 1), 1);
    assert_int_equal(acquire(c, k, FP_1, TOKEN_B), STORE_ACQ_COMPLETED);

    /* the old master comes back and is turned into a replica */
    assert_int_equal(kill(*old_pid, SIGCONT), 0);
    assert_true(wait_running(c, pred_role_slave, &old_port, 30000));
    ctx_free(c);
}

int main(void)
{
    signal(SIGPIPE, SIG_IGN);
    const struct CMUnitTest cluster[] = {
        cmocka_unit_test(test_cluster_contract_spread),
        cmocka_unit_test(test_cluster_moved),
        cmocka_unit_test(test_cluster_ask),
        cmocka_unit_test(test_cluster_limit_moved),
        cmocka_unit_test(test_cluster_free_with_ops_in_flight),
        cmocka_unit_test(test_cluster_node_killed),
    };
    const struct CMUnitTest sentinel[] = {
        cmocka_unit_test(test_sentinel_contract),
        cmocka_unit_test(test_sentinel_ops_before_master_known),
        cmocka_unit_test(test_sentinel_free_with_parked_ops),
        cmocka_unit_test(test_sentinel_failover),
        cmocka_unit_test(test_sentinel_switch_announced),
    };
    int failed = cmocka_run_group_tests_name("cluster", cluster, cluster_setup, cluster_teardown);
    failed += cmocka_run_group_tests_name("sentinel", sentinel, sentinel_setup, sentinel_teardown);
    return failed;
}
