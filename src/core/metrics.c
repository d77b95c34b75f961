/* metrics.c — the storage and the exposition of METRICS(X) (metrics.h).
 * Every metric owns one row of relaxed atomic slots: one per label value
 * (counters, gauges), or a histogram's buckets, +Inf, sum and count. The
 * tables below are generated from the lists; nothing names a metric,
 * an outcome or a state by hand. */
#include "idemgate/core/metrics.h"

#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdlib.h>

#include "idemgate/core/log.h"

/* ------------------------------------------------------------ kinds */

enum metrics_kind { KIND_COUNTER, KIND_GAUGE, KIND_HISTOGRAM };
static const char *const kind_names[] = {
    [KIND_COUNTER] = "counter", [KIND_GAUGE] = "gauge", [KIND_HISTOGRAM] = "histogram"};

/* ------------------------------------------------------- label sets */

enum label_set {
#define LABEL_SET_ID(id, key, values, n) LABELS_##id,
    METRICS_LABEL_SETS(LABEL_SET_ID)
#undef LABEL_SET_ID
};

/* Each set's values, NULL-terminated (so that NONE's is not empty). */
#define LABEL_VALUE(id, value) value,
#define LABEL_VALUES(id, key, values, n)                                                           \
    static const char *const values_##id[] = {values(LABEL_VALUE) NULL};
METRICS_LABEL_SETS(LABEL_VALUES)
#undef LABEL_VALUES
#undef LABEL_VALUE

/* One name per enum value: for the outcomes, OUT__COUNT names; none for a
 * state machine's set, named at start (metrics_state_names). */
#define LABEL_CHECK(id, key, values, n)                                                            \
    _Static_assert(                                                                                \
        sizeof(values_##id) / sizeof(values_##id[0]) == (size_t)(n) + 1 ||                         \
            ((n) == METRICS_STATES_MAX && sizeof(values_##id) / sizeof(values_##id[0]) == 1),      \
        "label set " #id ": its names and its enum differ in count");
METRICS_LABEL_SETS(LABEL_CHECK)
#undef LABEL_CHECK
_Static_assert(sizeof(values_OUTCOME) / sizeof(values_OUTCOME[0]) == OUT__COUNT + 1,
               "one outcome name per enum metrics_outcome value");

struct label_set_def {
    const char *key;           /* the label's name; NULL: no label */
    const char *const *values; /* n names */
    int n;                     /* 0: unlabeled, one value */
};
static const struct label_set_def label_sets[] = {
#define LABEL_SET_DEF(id, key, values, n) [LABELS_##id] = {key, values_##id, n},
    METRICS_LABEL_SETS(LABEL_SET_DEF)
#undef LABEL_SET_DEF
};

/* A state machine's set: the names its module gave (metrics_state_names).
 * Written once at start, before any thread reads them. */
static const char *const *state_names[sizeof(label_sets) / sizeof(label_sets[0])];
static int state_n[sizeof(label_sets) / sizeof(label_sets[0])];

/* The values of label set ls and how many: its list, or the names given
 * at start for a state machine's set (none yet: 0). */
static const char *const *set_values(enum label_set ls, int *n)
{
    const struct label_set_def *d = &label_sets[ls];
    if (d->n > 0 && d->values[0] == NULL) {
        *n = state_n[ls];
        return state_names[ls];
    }
    *n = d->n;
    return d->values;
}

/* ------------------------------------------------------- histograms */

static const double bucket_s[] = {0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                                  0.25,  0.5,    1,     2.5,  5,     10,   30};
#define N_BUCKETS (sizeof(bucket_s) / sizeof(bucket_s[0]))
/* A histogram's row: N_BUCKETS buckets (not cumulated), +Inf, sum, count. */
#define HIST_INF N_BUCKETS
#define HIST_SUM_MS (N_BUCKETS + 1)
#define HIST_COUNT (N_BUCKETS + 2)
#define HIST_SLOTS (N_BUCKETS + 3)

/* --------------------------------------------------------- the rows */

struct metric_def {
    const char *name, *help;
    enum metrics_kind kind;
    unsigned group; /* METRICS_GROUP_* */
    enum label_set labels;
};
static const struct metric_def defs[] = {
#define METRIC_DEF(id, kind, group, name, labels, help)                                            \
    [id] = {name, help, KIND_##kind, METRICS_GROUP_##group, LABELS_##labels},
    METRICS(METRIC_DEF)
#undef METRIC_DEF
};
_Static_assert(sizeof(defs) / sizeof(defs[0]) == M__COUNT, "one definition per metric");

static const enum metrics_id set_metric[] = {
#define SET_METRIC(set, metric) [set] = metric,
    METRICS_GAUGE_SETS(SET_METRIC)
#undef SET_METRIC
};

/* The widest row: a histogram's, or the largest label set. */
union row_width {
    char histogram[HIST_SLOTS];
#define LABEL_WIDTH(id, key, values, n) char id[(n) > 0 ? (n) : 1];
    METRICS_LABEL_SETS(LABEL_WIDTH)
#undef LABEL_WIDTH
};

static atomic_llong rows[M__COUNT][sizeof(union row_width)];

/* ---------------------------------------------------------- updates */

static bool is_metric(enum metrics_id id)
{
    return (unsigned)id < (unsigned)M__COUNT;
}

/* The slot of one label value of a counter or gauge, NULL if none. */
static atomic_llong *value_slot(enum metrics_id id, int label)
{
    if (!is_metric(id) || defs[id].kind == KIND_HISTOGRAM) return NULL;
    int n;
    set_values(defs[id].labels, &n);
    if (n == 0) n = label_sets[defs[id].labels].n; /* a state gauge not named yet */
    if (label < 0 || label >= (n > 0 ? n : 1)) return NULL;
    return &rows[id][label];
}

void metrics_add(enum metrics_id id, int label, long long delta)
{
    atomic_llong *p = value_slot(id, label);
    if (p) atomic_fetch_add_explicit(p, delta, memory_order_relaxed);
}

void metrics_inc(enum metrics_id id)
{
    metrics_add(id, 0, 1);
}

void metrics_set(enum metrics_id id, int label, long long value)
{
    atomic_llong *p = value_slot(id, label);
    if (p) atomic_store_explicit(p, value, memory_order_relaxed);
}

long long metrics_value(enum metrics_id id, int label)
{
    atomic_llong *p = value_slot(id, label);
    return p ? atomic_load_explicit(p, memory_order_relaxed) : 0;
}

void metrics_observe(enum metrics_id id, uint64_t ms)
{
    if (!is_metric(id) || defs[id].kind != KIND_HISTOGRAM) return;
    size_t i = 0;
    while (i < N_BUCKETS && (double)ms / 1000.0 > bucket_s[i])
        i++;
    atomic_fetch_add_explicit(&rows[id][i], 1, memory_order_relaxed);
    atomic_fetch_add_explicit(&rows[id][HIST_SUM_MS], (long long)ms, memory_order_relaxed);
    atomic_fetch_add_explicit(&rows[id][HIST_COUNT], 1, memory_order_relaxed);
}

void metrics_state_move(enum metrics_gauge_set set, int from, int to)
{
    if ((unsigned)set >= (unsigned)METRICS_SET__COUNT) return;
    if (from >= 0) metrics_add(set_metric[set], from, -1);
    if (to >= 0) metrics_add(set_metric[set], to, 1);
}

/* The name of value `label` of metric id's label set, "unknown" if none. */
static const char *label_name(enum metrics_id id, int label)
{
    int n;
    const char *const *values = set_values(defs[id].labels, &n);
    if (label < 0 || label >= n) return "unknown";
    return values[label];
}

void metrics_state_names(enum metrics_gauge_set set, const char *const *names, int n)
{
    if ((unsigned)set >= (unsigned)METRICS_SET__COUNT || n < 0 || n > METRICS_STATES_MAX) abort();
    enum label_set ls = defs[set_metric[set]].labels;
    state_names[ls] = names;
    state_n[ls] = n;
}

const char *metrics_state_name(enum metrics_gauge_set set, int state)
{
    if ((unsigned)set >= (unsigned)METRICS_SET__COUNT) return "unknown";
    return label_name(set_metric[set], state);
}

void metrics_outcome(enum metrics_outcome outcome)
{
    metrics_add(M_REQUESTS, (int)outcome, 1);
}

const char *metrics_outcome_name(int outcome)
{
    return label_name(M_REQUESTS, outcome);
}

void metrics_observe_store(uint64_t ms)
{
    metrics_observe(M_STORE_DURATION, ms);
}

void metrics_observe_upstream(uint64_t ms)
{
    metrics_observe(M_UPSTREAM_DURATION, ms);
}

void metrics_connections(int delta)
{
    metrics_add(M_CONNECTIONS_ACTIVE, 0, delta);
}

/* -------------------------------------------------------- rendering */

static long long load(const atomic_llong *p)
{
    return atomic_load_explicit(p, memory_order_relaxed);
}

static void render_histogram(struct buf *out, const char *name, const atomic_llong *row)
{
    unsigned long long cum = 0;
    for (size_t i = 0; i < N_BUCKETS; i++) {
        cum += (unsigned long long)load(&row[i]);
        buf_printf(out, "%s_bucket{le=\"%g\"} %llu\n", name, bucket_s[i], cum);
    }
    cum += (unsigned long long)load(&row[HIST_INF]);
    buf_printf(out, "%s_bucket{le=\"+Inf\"} %llu\n", name, cum);
    buf_printf(out, "%s_sum %.3f\n%s_count %llu\n", name, (double)load(&row[HIST_SUM_MS]) / 1000.0,
               name, (unsigned long long)load(&row[HIST_COUNT]));
}

/* One sample line: name, its label if any, the value (a counter never
 * goes below zero; a gauge may). */
static void render_sample(struct buf *out, const struct metric_def *d, int label, long long v)
{
    const struct label_set_def *ls = &label_sets[d->labels];
    int n;
    const char *const *values = set_values(d->labels, &n);
    buf_append_str(out, d->name);
    if (ls->n > 0) buf_printf(out, "{%s=\"%s\"}", ls->key, values[label]);
    if (d->kind == KIND_COUNTER)
        buf_printf(out, " %llu\n", (unsigned long long)v);
    else
        buf_printf(out, " %lld\n", v);
}

static metrics_series_fn *series_fn;

void metrics_set_series(metrics_series_fn *fn)
{
    series_fn = fn;
}

static void render_metric(struct buf *out, enum metrics_id id)
{
    const struct metric_def *d = &defs[id];
    buf_printf(out, "# HELP %s %s\n# TYPE %s %s\n", d->name, d->help, d->name, kind_names[d->kind]);
    if (d->labels == LABELS_SERIES) {
        if (series_fn) series_fn(out, id, d->name);
        return;
    }
    if (d->kind == KIND_HISTOGRAM) {
        render_histogram(out, d->name, rows[id]);
        return;
    }
    int n;
    set_values(d->labels, &n);
    if (n == 0 && label_sets[d->labels].n > 0) return; /* a state gauge not named yet */
    for (int i = 0; i < (n > 0 ? n : 1); i++)
        render_sample(out, d, i, load(&rows[id][i]));
}

void metrics_render_groups(struct buf *out, unsigned groups)
{
    for (int id = 0; id < M__COUNT; id++)
        if (defs[id].group & groups) render_metric(out, (enum metrics_id)id);
}

void metrics_render(struct buf *out)
{
    metrics_render_groups(out, METRICS_GROUP_ALWAYS);
}
