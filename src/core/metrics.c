/* metrics.c — atomic counters and fixed-bucket histograms shared by all
 * workers (relaxed atomics: counts, not synchronisation). */
#include "idemgate/core/metrics.h"

#include <stdatomic.h>

static const char *const outcome_names[] = {"passthrough", "executed",    "replayed",
                                            "in_progress", "mismatch",    "rejected",
                                            "not_cached",  "store_error", "lost"};
#define N_OUTCOMES (sizeof(outcome_names) / sizeof(outcome_names[0]))

static const double bucket_s[] = {0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                                  0.25,  0.5,    1,     2.5,  5,     10,   30};
#define N_BUCKETS (sizeof(bucket_s) / sizeof(bucket_s[0]))

struct histogram {
    atomic_ullong buckets[N_BUCKETS + 1]; /* last: +Inf */
    atomic_ullong sum_ms;
    atomic_ullong count;
};

static atomic_ullong counters[M__COUNT];
static atomic_ullong outcomes[N_OUTCOMES];
static atomic_llong connections_active;
static struct histogram h_store, h_upstream;

static const char *const counter_names[] = {
#define METRICS_NAME(id, name, help) name,
    METRICS_COUNTERS(METRICS_NAME)
#undef METRICS_NAME
};
static const char *const counter_help[] = {
#define METRICS_HELP(id, name, help) help,
    METRICS_COUNTERS(METRICS_HELP)
#undef METRICS_HELP
};

void metrics_inc(enum metrics_counter c)
{
    atomic_fetch_add_explicit(&counters[c], 1, memory_order_relaxed);
}

const char *metrics_outcome_name(int outcome)
{
    if (outcome < 0 || (unsigned)outcome >= N_OUTCOMES) return "unknown";
    return outcome_names[outcome];
}

void metrics_outcome(int outcome)
{
    if (outcome >= 0 && (unsigned)outcome < N_OUTCOMES)
        atomic_fetch_add_explicit(&outcomes[outcome], 1, memory_order_relaxed);
}

static void observe(struct histogram *h, uint64_t ms)
{
    size_t i = 0;
    while (i < N_BUCKETS && (double)ms / 1000.0 > bucket_s[i])
        i++;
    atomic_fetch_add_explicit(&h->buckets[i], 1, memory_order_relaxed);
    atomic_fetch_add_explicit(&h->sum_ms, ms, memory_order_relaxed);
    atomic_fetch_add_explicit(&h->count, 1, memory_order_relaxed);
}

void metrics_observe_store(uint64_t ms)
{
    observe(&h_store, ms);
}

void metrics_observe_upstream(uint64_t ms)
{
    observe(&h_upstream, ms);
}

void metrics_connections(int delta)
{
    atomic_fetch_add_explicit(&connections_active, delta, memory_order_relaxed);
}

static void render_histogram(struct buf *out, const char *name, const char *help,
                             struct histogram *h)
{
    buf_printf(out, "# HELP %s %s\n# TYPE %s histogram\n", name, help, name);
    unsigned long long cum = 0;
    for (size_t i = 0; i <= N_BUCKETS; i++) {
        cum += atomic_load_explicit(&h->buckets[i], memory_order_relaxed);
        if (i < N_BUCKETS)
            buf_printf(out, "%s_bucket{le=\"%g\"} %llu\n", name, bucket_s[i], cum);
        else
            buf_printf(out, "%s_bucket{le=\"+Inf\"} %llu\n", name, cum);
    }
    buf_printf(out, "%s_sum %.3f\n%s_count %llu\n", name,
               (double)atomic_load_explicit(&h->sum_ms, memory_order_relaxed) / 1000.0, name,
               (unsigned long long)atomic_load_explicit(&h->count, memory_order_relaxed));
}

void metrics_render(struct buf *out)
{
    buf_printf(out, "# HELP idemgate_requests_total Requests by idempotency outcome.\n"
                    "# TYPE idemgate_requests_total counter\n");
    for (size_t i = 0; i < N_OUTCOMES; i++)
        buf_printf(out, "idemgate_requests_total{outcome=\"%s\"} %llu\n", outcome_names[i],
                   (unsigned long long)atomic_load_explicit(&outcomes[i], memory_order_relaxed));
    for (size_t i = 0; i < M__COUNT; i++)
        buf_printf(out, "# HELP %s %s\n# TYPE %s counter\n%s %llu\n", counter_names[i],
                   counter_help[i], counter_names[i], counter_names[i],
                   (unsigned long long)atomic_load_explicit(&counters[i], memory_order_relaxed));
    buf_printf(out,
               "# HELP idemgate_connections_active Open client connections.\n"
               "# TYPE idemgate_connections_active gauge\nidemgate_connections_active %lld\n",
               (long long)atomic_load_explicit(&connections_active, memory_order_relaxed));
    render_histogram(out, "idemgate_upstream_duration_seconds", "Upstream request duration.",
                     &h_upstream);
    render_histogram(out, "idemgate_store_duration_seconds", "Store operation duration.", &h_store);
}
