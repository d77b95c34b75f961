/* clock.h — the one monotonic clock of the process, in milliseconds.
 *
 * Every timestamp and deadline that is compared (store deadlines, lock
 * renewals, pool idle times, request durations) comes from clock_now_ms.
 * Tests replace it with a fake they advance themselves, so nothing that
 * depends on time needs to sleep. Wall-clock time (log lines, record
 * creation dates, HTTP Date) is not this clock's business, except where
 * it is compared with a time someone else wrote (a webhook's timestamp):
 * clock_wall_s, fakeable the same way. */
#ifndef IDEMGATE_CORE_CLOCK_H
#define IDEMGATE_CORE_CLOCK_H

#include <stdint.h>
#include <sys/time.h>

/* CLOCK_MONOTONIC in ms, or the fake's value while one is set. */
uint64_t clock_now_ms(void);

/* Tests: while now is non-NULL, clock_now_ms returns *now (borrowed: it
 * must stay valid until clock_set_fake(NULL)). Not thread-safe: set it
 * before any thread reads the clock. */
void clock_set_fake(const uint64_t *now);

/* CLOCK_REALTIME in whole seconds since the epoch, or the fake's value
 * while one is set (clock_set_fake_wall, as clock_set_fake). */
int64_t clock_wall_s(void);
/* The same in milliseconds (the fake's seconds times 1000): creation
 * dates and the expiry times a store shares across processes. */
uint64_t clock_wall_ms(void);
void clock_set_fake_wall(const int64_t *now);

/* A duration in ms as the struct timeval libevent's timers take. */
static inline struct timeval clock_tv(uint64_t ms)
{
    struct timeval tv = {(time_t)(ms / 1000), (suseconds_t)(ms % 1000) * 1000};
    return tv;
}

#endif
