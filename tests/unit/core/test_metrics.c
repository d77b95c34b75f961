/* test_metrics.c — the one metrics list (core/metrics.h): the exposition
 * is valid Prometheus text (one HELP and one TYPE per family, samples of
 * that family only, histograms with cumulative le buckets, _sum, _count),
 * the family names are docs/metrics.md's (and ours for the rest), the
 * outcome and state label values come in their enums' order, and the
 * per-state gauges count what metrics_state_move moved. The counters are
 * process-wide, so the tests compare before and after. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <signal.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmocka.h>

#include "idemgate/core/buf.h"
#include "idemgate/core/fsm.h"
#include "idemgate/core/metrics.h"
/* the state lists live with their machines (core/fsm.h); only the lists
 * are used here, so that the gauges get the product's names */
#include "idemgate/idem/engine.h"
#include "idemgate/proxy/client.h"
#include "idemgate/proxy/exchange.h"

#define STATE_NAME(id, name) name,
static const char *const engine_names[] = {STATES_ENGINE(STATE_NAME)};
static const char *const exchange_names[] = {STATES_EXCHANGE(STATE_NAME)};
static const char *const client_names[] = {STATES_CLIENT(STATE_NAME)};
#undef STATE_NAME

/* Everything may move between any two states (the guard has a test of its
 * own). */
static const unsigned any[METRICS_STATES_MAX] = {0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff};
static const struct fsm engine_fsm = {"engine", engine_names, IDEM__COUNT, any, METRICS_SET_ENGINE};
static const struct fsm exchange_fsm = {"exchange", exchange_names, EX__COUNT, any,
                                        METRICS_SET_EXCHANGE};
static const struct fsm client_fsm = {"client", client_names, CLIENT__COUNT, any,
                                      METRICS_SET_CLIENT};

/* As the modules do at load. */
static int name_states(void **state)
{
    (void)state;
    fsm_register(&engine_fsm);
    fsm_register(&exchange_fsm);
    fsm_register(&client_fsm);
    return 0;
}

#define ALL_GROUPS (METRICS_GROUP_ALWAYS | METRICS_GROUP_MEMORY_STORE | METRICS_GROUP_LMDB_STORE)

/* The exposition as a NUL-terminated string; the caller frees it. */
static char *render(unsigned groups)
{
    struct buf b;
    buf_init(&b);
    metrics_render_groups(&b, groups);
    char *s = malloc(buf_size(&b) + 1);
    assert_non_null(s);
    memcpy(s, buf_data(&b), buf_size(&b));
    s[buf_size(&b)] = '\0';
    buf_free(&b);
    return s;
}

/* The value of one series ("name" or "name{k=\"v\"}"); fails if absent. */
static double sample(const char *text, const char *series)
{
    size_t n = strlen(series);
    for (const char *p = text; p && *p; p = strchr(p, '\n'), p = p ? p + 1 : NULL) {
        if (strncmp(p, series, n) == 0 && p[n] == ' ') return strtod(p + n + 1, NULL);
    }
    fail_msg("no series %s", series);
    return -1;
}

static long long state_sample(const char *family, const char *state)
{
    char series[128];
    snprintf(series, sizeof(series), "%s{state=\"%s\"}", family, state);
    char *text = render(METRICS_GROUP_ALWAYS);
    long long v = (long long)sample(text, series);
    free(text);
    return v;
}

/* ------------------------------------------- a Prometheus text checker */

#define MAX_FAMILIES 64

struct family {
    char name[96];
    char kind[16];
    double last_bucket; /* histograms: the cumulative count so far */
    double inf;         /* the +Inf bucket, -1 until seen */
};

struct checker {
    struct family fam[MAX_FAMILIES];
    int n;
    char help[96]; /* the HELP line just read, waiting for its TYPE */
};

/* Copies the word at *p (up to a space or the end of the line). */
static void word(const char **p, char *out, size_t cap)
{
    size_t i = 0;
    while (**p && **p != ' ' && **p != '\n' && i + 1 < cap)
        out[i++] = *(*p)++;
    out[i] = '\0';
    assert_true(**p == ' ' || **p == '\n' || **p == '\0');
}

static void check_help(struct checker *c, const char *line)
{
    const char *p = line + strlen("# HELP ");
    word(&p, c->help, sizeof(c->help));
    assert_int_equal(*p, ' ');
    assert_true(p[1] != '\n' && p[1] != '\0'); /* a help text */
    for (int i = 0; i < c->n; i++)
        assert_string_not_equal(c->fam[i].name, c->help); /* one family, once */
}

static void check_type(struct checker *c, const char *line)
{
    const char *p = line + strlen("# TYPE ");
    assert_true(c->n < MAX_FAMILIES);
    struct family *f = &c->fam[c->n];
    word(&p, f->name, sizeof(f->name));
    assert_string_equal(f->name, c->help); /* right after its HELP */
    assert_int_equal(*p++, ' ');
    word(&p, f->kind, sizeof(f->kind));
    assert_true(strcmp(f->kind, "counter") == 0 || strcmp(f->kind, "gauge") == 0 ||
                strcmp(f->kind, "histogram") == 0);
    f->last_bucket = 0;
    f->inf = -1;
    c->help[0] = '\0';
    c->n++;
}

/* {key="value"} with a [a-z_] key and a value without quotes; returns the value. */
static void check_label(const char *labels, const char *want_key, char *value, size_t cap)
{
    assert_int_equal(labels[0], '{');
    const char *eq = strchr(labels, '=');
    assert_non_null(eq);
    assert_int_equal(strncmp(labels + 1, want_key, strlen(want_key)), 0);
    assert_int_equal(eq - labels - 1, strlen(want_key));
    assert_int_equal(eq[1], '"');
    const char *end = strchr(eq + 2, '"');
    assert_non_null(end);
    assert_string_equal(end + 1, "}");
    assert_true((size_t)(end - eq - 2) < cap);
    memcpy(value, eq + 2, (size_t)(end - eq - 2));
    value[end - eq - 2] = '\0';
}

static void check_histogram_sample(struct family *f, const char *series, double v)
{
    size_t n = strlen(f->name);
    assert_int_equal(strncmp(series, f->name, n), 0);
    const char *suffix = series + n;
    if (strncmp(suffix, "_bucket{", 8) == 0) {
        char le[32];
        check_label(suffix + 7, "le", le, sizeof(le));
        assert_true(f->inf < 0);          /* +Inf comes last */
        assert_true(v >= f->last_bucket); /* cumulative */
        f->last_bucket = v;
        if (strcmp(le, "+Inf") == 0)
            f->inf = v;
        else
            assert_true(strtod(le, NULL) > 0);
    } else if (strcmp(suffix, "_count") == 0) {
        assert_true(f->inf == v); /* after +Inf, equal to it */
    } else {
        assert_string_equal(suffix, "_sum");
        assert_true(v >= 0);
    }
}

static void check_sample(struct checker *c, const char *line)
{
    assert_true(c->n > 0);
    struct family *f = &c->fam[c->n - 1];
    const char *sp = strrchr(line, ' ');
    assert_non_null(sp);
    char series[192];
    assert_true((size_t)(sp - line) < sizeof(series));
    memcpy(series, line, (size_t)(sp - line));
    series[sp - line] = '\0';
    char *end;
    double v = strtod(sp + 1, &end);
    assert_true(end != sp + 1 && *end == '\0');
    if (strcmp(f->kind, "histogram") == 0) {
        check_histogram_sample(f, series, v);
        return;
    }
    if (strcmp(f->kind, "counter") == 0) assert_true(v >= 0);
    size_t n = strlen(f->name);
    assert_int_equal(strncmp(series, f->name, n), 0);
    if (series[n] == '{') {
        /* {k="v"} or {k="v",k2="v2",...}: [a-z_] keys, values without quotes */
        const char *p = series + n + 1;
        for (;;) {
            size_t k = strspn(p, "abcdefghijklmnopqrstuvwxyz_");
            assert_true(k > 0 && p[k] == '=' && p[k + 1] == '"');
            const char *close = strchr(p + k + 2, '"');
            assert_non_null(close);
            if (close[1] == '}') {
                assert_int_equal(close[2], '\0');
                break;
            }
            assert_int_equal(close[1], ',');
            p = close + 2;
        }
    } else {
        assert_int_equal(series[n], '\0');
    }
}

/* Checks the whole text, line by line; fills c with its families. */
static void check_exposition(struct checker *c, const char *text)
{
    memset(c, 0, sizeof(*c));
    size_t len = strlen(text);
    assert_true(len > 0 && text[len - 1] == '\n');
    char *copy = strdup(text), *save = NULL;
    for (char *line = strtok_r(copy, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
        if (strncmp(line, "# HELP ", 7) == 0)
            check_help(c, line);
        else if (strncmp(line, "# TYPE ", 7) == 0)
            check_type(c, line);
        else
            check_sample(c, line);
    }
    free(copy);
    assert_string_equal(c->help, ""); /* no HELP without its TYPE */
    for (int i = 0; i < c->n; i++)
        if (strcmp(c->fam[i].kind, "histogram") == 0) assert_true(c->fam[i].inf >= 0);
}

static const char *kind_of(const struct checker *c, const char *name)
{
    for (int i = 0; i < c->n; i++)
        if (strcmp(c->fam[i].name, name) == 0) return c->fam[i].kind;
    return NULL;
}

/* --------------------------------------------------------------- tests */

static void test_exposition_is_valid(void **state)
{
    (void)state;
    metrics_observe_store(3);
    metrics_observe_upstream(40000); /* past the last bucket: +Inf only */
    struct checker c;
    char *text = render(ALL_GROUPS);
    check_exposition(&c, text);
    assert_int_equal(c.n, M__COUNT);
    free(text);
}

static void series_two(struct buf *out, enum metrics_id id, const char *name)
{
    buf_printf(out, "%s{upstream=\"default\",server=\"127.0.0.1:1\"} %d\n", name,
               id == M_UPSTREAM_SERVER_UP ? 1 : 7);
    buf_printf(out, "%s{upstream=\"/v1\",server=\"[::1]:2\"} 0\n", name);
}

/* The SERIES rows take their samples from the callback, after their own
 * HELP and TYPE; without one they have none. */
static void test_series(void **state)
{
    (void)state;
    metrics_set_series(series_two);
    char *text = render(ALL_GROUPS);
    struct checker c;
    check_exposition(&c, text);
    assert_int_equal(sample(text, "idemgate_upstream_server_up{upstream=\"default\",server=\"127.0."
                                  "0.1:1\"}"),
                     1);
    assert_int_equal(sample(text, "idemgate_upstream_failures_total{upstream=\"default\",server="
                                  "\"127.0.0.1:1\"}"),
                     7);
    assert_int_equal(sample(text, "idemgate_upstream_failures_total{upstream=\"/v1\",server=\"[::"
                                  "1]:2\"}"),
                     0);
    free(text);
    metrics_set_series(NULL);
    text = render(ALL_GROUPS);
    assert_null(strstr(text, "idemgate_upstream_server_up{"));
    assert_non_null(strstr(text, "# TYPE idemgate_upstream_server_up gauge"));
    free(text);
}

/* docs/metrics.md's names exactly, with their kinds; then ours. */
static void test_family_names_and_kinds(void **state)
{
    (void)state;
    static const char *const want[][2] = {
        {"idemgate_requests_total", "counter"},
        {"idemgate_lock_renewals_total", "counter"},
        {"idemgate_store_errors_total", "counter"},
        {"idemgate_store_failopen_total", "counter"},
        {"idemgate_store_evictions_total", "counter"},
        {"idemgate_connections_active", "gauge"},
        {"idemgate_client_connections", "gauge"},
        {"idemgate_exchanges", "gauge"},
        {"idemgate_exchanges_upstream", "gauge"},
        {"idemgate_upstream_duration_seconds", "histogram"},
        {"idemgate_store_duration_seconds", "histogram"},
        {"idemgate_upstream_server_up", "gauge"},
        {"idemgate_upstream_failures_total", "counter"},
        {"idemgate_upstream_retries_total", "counter"},
        {"idemgate_ratelimited_total", "counter"},
        {"idemgate_reloads_total", "counter"},
        {"idemgate_webhook_verifications_total", "counter"},
        {"idemgate_memory_store_bytes", "gauge"},
        {"idemgate_memory_store_max_bytes", "gauge"},
        {"idemgate_memory_store_entries", "gauge"},
        {"idemgate_memory_store_refused_total", "counter"},
        {"idemgate_memory_store_max_scope_bytes", "gauge"},
        {"idemgate_memory_store_scopes", "gauge"},
        {"idemgate_lmdb_store_bytes", "gauge"},
        {"idemgate_lmdb_store_file_bytes", "gauge"},
        {"idemgate_lmdb_store_max_bytes", "gauge"},
        {"idemgate_lmdb_store_entries", "gauge"},
        {"idemgate_lmdb_store_refused_total", "counter"},
        {"idemgate_lmdb_store_scopes", "gauge"},
    };
    size_t n = sizeof(want) / sizeof(want[0]);
    struct checker c;
    char *text = render(ALL_GROUPS);
    check_exposition(&c, text);
    assert_int_equal(c.n, n);
    for (size_t i = 0; i < n; i++) {
        assert_string_equal(c.fam[i].name, want[i][0]); /* list order */
        assert_string_equal(kind_of(&c, want[i][0]), want[i][1]);
    }
    /* both results from the start, so that increase() sees the first one */
    assert_non_null(strstr(text, "\nidemgate_reloads_total{result=\"ok\"} "));
    assert_non_null(strstr(text, "\nidemgate_reloads_total{result=\"failed\"} "));
    assert_non_null(strstr(text, "\nidemgate_webhook_verifications_total{result=\"valid\"} 0\n"));
    assert_non_null(strstr(text, "\nidemgate_webhook_verifications_total{result=\"invalid\"} 0\n"));
    free(text);
}

/* metrics_render is the ALWAYS group: no memory store rows without it. */
static void test_groups(void **state)
{
    (void)state;
    struct checker c;
    char *text = render(METRICS_GROUP_ALWAYS);
    check_exposition(&c, text);
    assert_null(kind_of(&c, "idemgate_memory_store_bytes"));
    assert_non_null(kind_of(&c, "idemgate_exchanges"));
    free(text);

    struct buf b;
    buf_init(&b);
    metrics_render(&b);
    text = render(METRICS_GROUP_ALWAYS);
    assert_int_equal(buf_size(&b), strlen(text));
    assert_memory_equal(buf_data(&b), text, strlen(text));
    buf_free(&b);
    free(text);

    metrics_set(M_MEMORY_STORE_BYTES, 0, 12345);
    metrics_set(M_MEMORY_STORE_ENTRIES, METRICS_ENTRY_COMPLETED, 7);
    text = render(METRICS_GROUP_MEMORY_STORE);
    check_exposition(&c, text);
    assert_null(kind_of(&c, "idemgate_requests_total"));
    assert_true(sample(text, "idemgate_memory_store_bytes") == 12345);
    assert_true(sample(text, "idemgate_memory_store_entries{state=\"completed\"}") == 7);
    assert_true(sample(text, "idemgate_memory_store_entries{state=\"in_progress\"}") == 0);
    assert_null(kind_of(&c, "idemgate_lmdb_store_bytes"));
    free(text);

    metrics_set(M_LMDB_STORE_ENTRIES, METRICS_ENTRY_IN_PROGRESS, 3);
    text = render(METRICS_GROUP_LMDB_STORE);
    check_exposition(&c, text);
    assert_null(kind_of(&c, "idemgate_memory_store_bytes"));
    assert_true(sample(text, "idemgate_lmdb_store_entries{state=\"in_progress\"}") == 3);
    free(text);
}

/* docs/metrics.md's outcome names, in the order of the enum. */
static void test_outcomes(void **state)
{
    (void)state;
    static const char *const spec[] = {"passthrough", "executed",    "replayed",   "in_progress",
                                       "mismatch",    "rejected",    "not_cached", "store_error",
                                       "lost",        "rate_limited"};
    assert_int_equal(OUT__COUNT, sizeof(spec) / sizeof(spec[0]));
    assert_int_equal(OUT_PASSTHROUGH, 0);
    assert_int_equal(OUT_LOST, 8);
    for (int i = 0; i < OUT__COUNT; i++)
        assert_string_equal(metrics_outcome_name(i), spec[i]);
    assert_string_equal(metrics_outcome_name(-1), "unknown");
    assert_string_equal(metrics_outcome_name(OUT__COUNT), "unknown");

    char *before = render(METRICS_GROUP_ALWAYS);
    metrics_outcome(OUT_REPLAYED);
    metrics_outcome(OUT_REPLAYED);
    metrics_outcome(OUT_LOST);
    metrics_outcome((enum metrics_outcome)OUT__COUNT); /* ignored */
    char *after = render(METRICS_GROUP_ALWAYS);
    for (int i = 0; i < OUT__COUNT; i++) {
        char series[96];
        snprintf(series, sizeof(series), "idemgate_requests_total{outcome=\"%s\"}", spec[i]);
        double moved = sample(after, series) - sample(before, series);
        assert_true(moved == (i == OUT_REPLAYED ? 2 : i == OUT_LOST ? 1 : 0));
    }
    free(before);
    free(after);
}

static void test_state_names(void **state)
{
    (void)state;
    static const char *const en[] = {"new",       "acquiring",  "waiting",
                                     "forwarded", "completing", "done"};
    static const char *const ex[] = {"new", "forwarding", "streaming", "ended", "done"};
    static const char *const cl[] = {"idle", "busy", "holding", "closing"};
    assert_int_equal(IDEM__COUNT, 6);
    assert_int_equal(EX__COUNT, 5);
    assert_int_equal(CLIENT__COUNT, 4);
    for (int i = 0; i < IDEM__COUNT; i++) {
        assert_string_equal(metrics_state_name(METRICS_SET_ENGINE, i), en[i]);
        assert_true(state_sample("idemgate_exchanges", en[i]) >= 0);
    }
    for (int i = 0; i < EX__COUNT; i++) {
        assert_string_equal(metrics_state_name(METRICS_SET_EXCHANGE, i), ex[i]);
        assert_true(state_sample("idemgate_exchanges_upstream", ex[i]) >= 0);
    }
    for (int i = 0; i < CLIENT__COUNT; i++) {
        assert_string_equal(metrics_state_name(METRICS_SET_CLIENT, i), cl[i]);
        assert_true(state_sample("idemgate_client_connections", cl[i]) >= 0);
    }
    assert_string_equal(metrics_state_name(METRICS_SET_EXCHANGE, EX__COUNT), "unknown");
    assert_string_equal(metrics_state_name(METRICS_SET_CLIENT, -1), "unknown");
    assert_string_equal(metrics_state_name((enum metrics_gauge_set)99, 0), "unknown");
}

/* Two engines, an exchange and a client through their lives, counted on
 * /metrics. */
static void test_state_moves(void **state)
{
    (void)state;
    metrics_state_move(METRICS_SET_ENGINE, -1, IDEM_NEW);
    metrics_state_move(METRICS_SET_ENGINE, IDEM_NEW, IDEM_ACQUIRING);
    metrics_state_move(METRICS_SET_ENGINE, -1, IDEM_NEW);
    metrics_state_move(METRICS_SET_ENGINE, IDEM_NEW, IDEM_ACQUIRING);
    metrics_state_move(METRICS_SET_ENGINE, IDEM_ACQUIRING, IDEM_FORWARDED);
    metrics_state_move(METRICS_SET_EXCHANGE, -1, EX_NEW);
    metrics_state_move(METRICS_SET_EXCHANGE, EX_NEW, EX_FORWARDING);
    metrics_state_move(METRICS_SET_CLIENT, -1, CLIENT_IDLE);
    metrics_state_move(METRICS_SET_CLIENT, CLIENT_IDLE, CLIENT_BUSY);
    assert_int_equal(state_sample("idemgate_exchanges", "new"), 0);
    assert_int_equal(state_sample("idemgate_exchanges", "acquiring"), 1);
    assert_int_equal(state_sample("idemgate_exchanges", "forwarded"), 1);
    assert_int_equal(state_sample("idemgate_exchanges_upstream", "forwarding"), 1);
    assert_int_equal(state_sample("idemgate_client_connections", "busy"), 1);
    assert_int_equal(state_sample("idemgate_client_connections", "idle"), 0);
    assert_int_equal(metrics_value(M_EXCHANGES, IDEM_ACQUIRING), 1);

    /* to the end, and freed: every gauge back to 0 */
    metrics_state_move(METRICS_SET_ENGINE, IDEM_ACQUIRING, IDEM_DONE);
    metrics_state_move(METRICS_SET_ENGINE, IDEM_FORWARDED, IDEM_COMPLETING);
    assert_int_equal(state_sample("idemgate_exchanges", "done"), 1);
    assert_int_equal(state_sample("idemgate_exchanges", "completing"), 1);
    metrics_state_move(METRICS_SET_ENGINE, IDEM_COMPLETING, IDEM_DONE);
    metrics_state_move(METRICS_SET_ENGINE, IDEM_DONE, -1);
    metrics_state_move(METRICS_SET_ENGINE, IDEM_DONE, -1);
    metrics_state_move(METRICS_SET_EXCHANGE, EX_FORWARDING, EX_ENDED);
    metrics_state_move(METRICS_SET_EXCHANGE, EX_ENDED, EX_DONE);
    metrics_state_move(METRICS_SET_EXCHANGE, EX_DONE, -1);
    metrics_state_move(METRICS_SET_CLIENT, CLIENT_BUSY, CLIENT_HOLDING);
    assert_int_equal(state_sample("idemgate_client_connections", "holding"), 1);
    metrics_state_move(METRICS_SET_CLIENT, CLIENT_HOLDING, CLIENT_CLOSING);
    assert_int_equal(state_sample("idemgate_client_connections", "closing"), 1);
    metrics_state_move(METRICS_SET_CLIENT, CLIENT_CLOSING, -1);
    for (int i = 0; i < IDEM__COUNT; i++)
        assert_int_equal(metrics_value(M_EXCHANGES, i), 0);
    for (int i = 0; i < EX__COUNT; i++)
        assert_int_equal(metrics_value(M_EXCHANGES_UPSTREAM, i), 0);
    for (int i = 0; i < CLIENT__COUNT; i++)
        assert_int_equal(metrics_value(M_CLIENT_CONNECTIONS, i), 0);
}

/* fsm_next checks a move against its machine's table and moves the
 * gauge; fsm_enter and fsm_leave count objects in and out. (An illegal
 * move aborts: that is checked from outside, test_fsm_abort below.) */
static void test_state_next(void **state)
{
    (void)state;
    static const unsigned table[CLIENT__COUNT] = {
        [CLIENT_IDLE] = 1u << CLIENT_BUSY,
        [CLIENT_BUSY] = 1u << CLIENT_CLOSING,
    };
    const struct fsm m = {"client", client_names, CLIENT__COUNT, table, METRICS_SET_CLIENT};
    long long busy = metrics_value(M_CLIENT_CONNECTIONS, CLIENT_BUSY);
    fsm_enter(&m, CLIENT_IDLE);
    int s = fsm_next(&m, CLIENT_IDLE, CLIENT_BUSY);
    assert_int_equal(s, CLIENT_BUSY);
    assert_int_equal(metrics_value(M_CLIENT_CONNECTIONS, CLIENT_BUSY), busy + 1);
    s = fsm_next(&m, s, CLIENT_CLOSING);
    fsm_leave(&m, s);
    assert_int_equal(metrics_value(M_CLIENT_CONNECTIONS, CLIENT_BUSY), busy);
}

/* An illegal transition aborts the process (in a child here), in release
 * builds too. */
static void test_fsm_abort(void **state)
{
    (void)state;
    static const unsigned table[CLIENT__COUNT] = {[CLIENT_IDLE] = 1u << CLIENT_BUSY};
    const struct fsm m = {"client", client_names, CLIENT__COUNT, table, METRICS_SET_CLIENT};
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        fclose(stderr); /* the log line is expected */
        fsm_next(&m, CLIENT_IDLE, CLIENT_CLOSING);
        _exit(0);
    }
    int st = 0;
    assert_int_equal(waitpid(pid, &st, 0), pid);
    assert_true(WIFSIGNALED(st) && WTERMSIG(st) == SIGABRT);
}

/* A state out of its set, or a set that is none, moves nothing. */
static void test_state_move_out_of_range(void **state)
{
    (void)state;
    metrics_state_move(METRICS_SET_CLIENT, -1, CLIENT__COUNT);
    metrics_state_move(METRICS_SET_EXCHANGE, EX__COUNT, -1);
    metrics_state_move((enum metrics_gauge_set)METRICS_SET__COUNT, -1, 0);
    metrics_state_move(METRICS_SET_EXCHANGE, -1, -1);
    for (int i = 0; i < EX__COUNT; i++)
        assert_int_equal(metrics_value(M_EXCHANGES, i), 0);
    for (int i = 0; i < CLIENT__COUNT; i++)
        assert_int_equal(metrics_value(M_CLIENT_CONNECTIONS, i), 0);
    assert_int_equal(metrics_value(M_REQUESTS, OUT__COUNT), 0);
}

/* The shorthands move their rows; a histogram takes only observations. */
static void test_counters_gauges_histograms(void **state)
{
    (void)state;
    long long errors = metrics_value(M_STORE_ERRORS, 0);
    metrics_inc(M_STORE_ERRORS);
    assert_int_equal(metrics_value(M_STORE_ERRORS, 0), errors + 1);
    metrics_connections(2);
    metrics_connections(-1);
    char *text = render(METRICS_GROUP_ALWAYS);
    assert_true(sample(text, "idemgate_connections_active") == 1);
    assert_true(sample(text, "idemgate_store_errors_total") == (double)(errors + 1));
    double count = sample(text, "idemgate_store_duration_seconds_count");
    double sum = sample(text, "idemgate_store_duration_seconds_sum");
    double le5 = sample(text, "idemgate_store_duration_seconds_bucket{le=\"0.005\"}");
    double le1 = sample(text, "idemgate_store_duration_seconds_bucket{le=\"0.001\"}");
    free(text);
    metrics_connections(-1);

    metrics_inc(M_STORE_DURATION);      /* not a counter: ignored */
    metrics_observe(M_STORE_ERRORS, 5); /* not a histogram: ignored */
    metrics_observe_store(4);
    metrics_observe_store(2000);
    text = render(METRICS_GROUP_ALWAYS);
    assert_true(sample(text, "idemgate_store_errors_total") == (double)(errors + 1));
    assert_true(sample(text, "idemgate_store_duration_seconds_count") == count + 2);
    assert_true(sample(text, "idemgate_store_duration_seconds_sum") - sum > 2.003);
    assert_true(sample(text, "idemgate_store_duration_seconds_sum") - sum < 2.005);
    assert_true(sample(text, "idemgate_store_duration_seconds_bucket{le=\"0.001\"}") == le1);
    assert_true(sample(text, "idemgate_store_duration_seconds_bucket{le=\"0.005\"}") == le5 + 1);
    assert_true(sample(text, "idemgate_store_duration_seconds_bucket{le=\"2.5\"}") ==
                sample(text, "idemgate_store_duration_seconds_count"));
    struct checker c;
    check_exposition(&c, text);
    free(text);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_exposition_is_valid),
        cmocka_unit_test(test_family_names_and_kinds),
        cmocka_unit_test(test_groups),
        cmocka_unit_test(test_series),
        cmocka_unit_test(test_outcomes),
        cmocka_unit_test(test_state_names),
        cmocka_unit_test(test_state_moves),
        cmocka_unit_test(test_state_next),
        cmocka_unit_test(test_fsm_abort),
        cmocka_unit_test(test_state_move_out_of_range),
        cmocka_unit_test(test_counters_gauges_histograms),
    };
    return cmocka_run_group_tests(tests, name_states, NULL);
}
