/* clock.c — the process's monotonic millisecond clock and its test fake
 * (see clock.h). Owns nothing but the fake's pointer. */
#include "idemgate/core/clock.h"

#include <stddef.h>
#include <time.h>

static const uint64_t *fake_now;
static const int64_t *fake_wall;

uint64_t clock_now_ms(void)
{
    if (fake_now) return *fake_now;
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

void clock_set_fake(const uint64_t *now)
{
    fake_now = now;
}

int64_t clock_wall_s(void)
{
    if (fake_wall) return *fake_wall;
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec;
}

uint64_t clock_wall_ms(void)
{
    if (fake_wall) return (uint64_t)*fake_wall * 1000u;
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

void clock_set_fake_wall(const int64_t *now)
{
    fake_wall = now;
}
