/* store_testlib.h — helpers shared by the store test programs (test_store,
 * test_store_cluster): clock, free ports, stopping a child process, a
 * bounded event-loop driver, and store operations driven to their single,
 * never-synchronous answer (asserted with cmocka). */
#ifndef IDEMGATE_TESTS_STORE_TESTLIB_H
#define IDEMGATE_TESTS_STORE_TESTLIB_H

#include "idemgate/store/store.h"

#include <event2/event.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#define PREFIX "idemtest:"
#define WAIT_MS 5000 /* upper bound for any single answer */

/* ---- processes and ports ---- */

uint64_t now_ms(void);
/* A TCP port on 127.0.0.1 that was free a moment ago; -1 on error. */
int free_port(void);
/* SIGCONT + SIGKILL + reap; *pid becomes -1. No-op when *pid <= 0. */
void stop_pid(pid_t *pid);

/* ---- event loop ---- */

/* A persistent 20 ms timer on base that wakes the loop so that every wait
 * stays bounded; the caller frees it with event_free. */
struct event *stl_tick_new(struct event_base *base);
void stl_run_until(struct event_base *base, const bool *done, int max_ms);
void stl_run_for(struct event_base *base, int ms);

/* ---- operations, driven to their answer ---- */

extern bool in_call; /* true while a store call is running */

struct acq_res {
    bool done;
    bool sync;
    int calls;
    enum store_acquire_state state;
    uint8_t rec[1024];
    size_t rec_len;
};

struct done_res {
    bool done;
    bool sync;
    int calls;
    int status;
};

void acq_cb(void *arg, const struct store_acquire_reply *r);
void done_cb(void *arg, int status);

extern const char TOKEN_A[STORE_TOKEN_LEN + 1];
extern const char TOKEN_B[STORE_TOKEN_LEN + 1];
extern const uint8_t FP_1[STORE_FP_LEN];
extern const uint8_t FP_2[STORE_FP_LEN];

/* A scope key never used before by this process (nor by another pid). */
void unique_skey(char *out, size_t n, const char *what);

enum store_acquire_state stl_acquire(struct event_base *base, struct store *st, const char *skey,
                                     const uint8_t *fp, const char *token, uint32_t lock_ms,
                                     struct acq_res *res);
int stl_complete(struct event_base *base, struct store *st, const char *skey, const char *token,
                 const uint8_t *rec, size_t len, uint32_t ttl);
int stl_release(struct event_base *base, struct store *st, const char *skey, const char *token);
int stl_renew(struct event_base *base, struct store *st, const char *skey, const char *token,
              uint32_t lock_ms);
int stl_ping(struct event_base *base, struct store *st);

struct limit_res {
    bool done;
    bool sync;
    int calls;
    struct store_limit_reply reply;
};

void limit_cb(void *arg, const struct store_limit_reply *r);

/* store_limit with these arguments, driven to its answer. */
struct store_limit_reply stl_limit(struct event_base *base, struct store *st, const char *scope,
                                   const char *token, uint32_t requests, uint32_t window_ms,
                                   uint32_t concurrent, bool take_slot, uint32_t lease_ms);
int stl_limit_release(struct event_base *base, struct store *st, const char *scope,
                      const char *token);
int stl_limit_renew(struct event_base *base, struct store *st, const char *scope, const char *token,
                    uint32_t lease_ms);

#endif
