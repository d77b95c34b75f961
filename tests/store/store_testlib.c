/* store_testlib.c — helpers shared by the store test programs (see
 * store_testlib.h). Linked into test_store and test_store_cluster only. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include "store_testlib.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

/* ---- processes and ports ---- */

uint64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

int free_port(void)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof(a);
    if (fd < 0 || bind(fd, (struct sockaddr *)&a, sizeof(a)) != 0 ||
        getsockname(fd, (struct sockaddr *)&a, &len) != 0)
        return -1;
    close(fd);
    return ntohs(a.sin_port);
}

void stop_pid(pid_t *pid)
{
    if (*pid <= 0) return;
    kill(*pid, SIGCONT);
    kill(*pid, SIGKILL);
    waitpid(*pid, NULL, 0);
    *pid = -1;
}

/* ---- event loop ---- */

static void tick_cb(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    (void)arg;
}

struct event *stl_tick_new(struct event_base *base)
{
    struct event *tick = event_new(base, -1, EV_PERSIST, tick_cb, NULL);
    struct timeval tv = {0, 20000};
    event_add(tick, &tv);
    return tick;
}

void stl_run_until(struct event_base *base, const bool *done, int max_ms)
{
    uint64_t end = now_ms() + (uint64_t)max_ms;
    while (!*done && now_ms() < end)
        event_base_loop(base, EVLOOP_ONCE);
}

void stl_run_for(struct event_base *base, int ms)
{
    bool never = false;
    stl_run_until(base, &never, ms);
}

/* ---- operations, driven to their answer ---- */

bool in_call;
static int unique_counter;

const char TOKEN_A[STORE_TOKEN_LEN + 1] = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
const char TOKEN_B[STORE_TOKEN_LEN + 1] = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";
const uint8_t FP_1[STORE_FP_LEN] = {0, 1, 2, 3, 0, 0, 6, 7, 8, 9, 10, 11, 12, 13, 14, 0};
const uint8_t FP_2[STORE_FP_LEN] = {0, 1, 2, 3, 0, 0, 6, 7, 8, 9, 10, 11, 12, 13, 14, 1};

void acq_cb(void *arg, const struct store_acquire_reply *r)
{
    struct acq_res *res = arg;
    res->done = true;
    res->sync = in_call;
    res->calls++;
    res->state = r->state;
    res->rec_len = 0;
    if (r->state == STORE_ACQ_COMPLETED) {
        assert_true(r->record_len <= sizeof(res->rec));
        if (r->record_len) memcpy(res->rec, r->record, r->record_len);
        res->rec_len = r->record_len;
    }
}

void done_cb(void *arg, int status)
{
    struct done_res *res = arg;
    res->done = true;
    res->sync = in_call;
    res->calls++;
    res->status = status;
}

void unique_skey(char *out, size_t n, const char *what)
{
    snprintf(out, n, "scope%d-%d:%s", (int)getpid(), ++unique_counter, what);
}

enum store_acquire_state stl_acquire(struct event_base *base, struct store *st, const char *skey,
                                     const uint8_t *fp, const char *token, uint32_t lock_ms,
                                     struct acq_res *res)
{
    memset(res, 0, sizeof(*res));
    in_call = true;
    store_acquire(
        st, &(struct store_acquire_req){skey, strlen(skey), fp, token, lock_ms, NULL, NULL, 0},
        acq_cb, res);
    in_call = false;
    assert_false(res->done); /* never synchronous */
    stl_run_until(base, &res->done, WAIT_MS);
    assert_true(res->done);
    assert_false(res->sync);
    /* one more pass over ready events: a second callback would run now */
    event_base_loop(base, EVLOOP_NONBLOCK);
    assert_int_equal(res->calls, 1);
    return res->state;
}

/* The second half of every done-style call: the call itself ran with
 * in_call set. */
static int finish_done(struct event_base *base, struct done_res *res)
{
    in_call = false;
    assert_false(res->done);
    stl_run_until(base, &res->done, WAIT_MS);
    assert_true(res->done);
    assert_false(res->sync);
    /* one more pass over ready events: a second callback would run now */
    event_base_loop(base, EVLOOP_NONBLOCK);
    assert_int_equal(res->calls, 1);
    return res->status;
}

int stl_complete(struct event_base *base, struct store *st, const char *skey, const char *token,
                 const uint8_t *rec, size_t len, uint32_t ttl)
{
    struct done_res res = {0};
    in_call = true;
    store_complete(st, skey, strlen(skey), token, rec, len, ttl, done_cb, &res);
    return finish_done(base, &res);
}

int stl_release(struct event_base *base, struct store *st, const char *skey, const char *token)
{
    struct done_res res = {0};
    in_call = true;
    store_release(st, skey, strlen(skey), token, done_cb, &res);
    return finish_done(base, &res);
}

int stl_renew(struct event_base *base, struct store *st, const char *skey, const char *token,
              uint32_t lock_ms)
{
    struct done_res res = {0};
    in_call = true;
    store_renew(st, skey, strlen(skey), token, lock_ms, done_cb, &res);
    return finish_done(base, &res);
}

int stl_ping(struct event_base *base, struct store *st)
{
    struct done_res res = {0};
    in_call = true;
    store_ping(st, done_cb, &res);
    return finish_done(base, &res);
}

void limit_cb(void *arg, const struct store_limit_reply *r)
{
    struct limit_res *res = arg;
    res->done = true;
    res->sync = in_call;
    res->calls++;
    res->reply = *r;
}

struct store_limit_reply stl_limit(struct event_base *base, struct store *st, const char *scope,
                                   const char *token, uint32_t requests, uint32_t window_ms,
                                   uint32_t concurrent, bool take_slot, uint32_t lease_ms)
{
    struct limit_res res = {0};
    struct store_limit_args a = {.requests = requests,
                                 .window_ms = window_ms,
                                 .concurrent = concurrent,
                                 .take_slot = take_slot,
                                 .lease_ms = lease_ms};
    in_call = true;
    store_limit(st, scope, strlen(scope), token, &a, limit_cb, &res);
    in_call = false;
    assert_false(res.done); /* never synchronous */
    stl_run_until(base, &res.done, WAIT_MS);
    assert_true(res.done);
    assert_false(res.sync);
    event_base_loop(base, EVLOOP_NONBLOCK);
    assert_int_equal(res.calls, 1);
    return res.reply;
}

int stl_limit_release(struct event_base *base, struct store *st, const char *scope,
                      const char *token)
{
    struct done_res res = {0};
    in_call = true;
    store_limit_release(st, scope, strlen(scope), token, done_cb, &res);
    return finish_done(base, &res);
}

int stl_limit_renew(struct event_base *base, struct store *st, const char *scope, const char *token,
                    uint32_t lease_ms)
{
    struct done_res res = {0};
    in_call = true;
    store_limit_renew(st, scope, strlen(scope), token, lease_ms, done_cb, &res);
    return finish_done(base, &res);
}
