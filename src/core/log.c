/* log.c — JSON log lines on stderr, one write(2) per line. */
#include "idemgate/core/log.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

static enum log_level log_level_min = LOG_INFO;
static const char *const log_names[] = {"debug", "info", "warn", "error"};

void log_set_level(enum log_level lvl)
{
    log_level_min = lvl;
}

bool log_enabled(enum log_level lvl)
{
    return lvl >= log_level_min;
}

void log_line_begin(struct buf *b, enum log_level lvl)
{
    /* The date part changes once a second: format it then, per thread
     * (an access line per request must not cost a strftime + printf). */
    static __thread time_t cached_sec = -1;
    static __thread char cached[24];
    struct timeval tv;
    gettimeofday(&tv, NULL);
    if (tv.tv_sec != cached_sec) {
        struct tm tm;
        gmtime_r(&tv.tv_sec, &tm);
        strftime(cached, sizeof(cached), "%Y-%m-%dT%H:%M:%S", &tm);
        cached_sec = tv.tv_sec;
    }
    unsigned ms = (unsigned)(tv.tv_usec / 1000);
    char frac[6] = {
        '.', (char)('0' + ms / 100), (char)('0' + ms / 10 % 10), (char)('0' + ms % 10), 'Z', '"'};
    buf_append(b, "{\"ts\":\"", 7);
    buf_append_str(b, cached);
    buf_append(b, frac, sizeof(frac));
    buf_append(b, ",\"level\":\"", 10);
    buf_append_str(b, log_names[lvl]);
    buf_append(b, "\"", 1);
}

static void log_key(struct buf *b, const char *key)
{
    buf_append(b, ",\"", 2);
    buf_append_str(b, key);
    buf_append(b, "\":", 2);
}

void log_line_end(struct buf *b)
{
    buf_append(b, "}\n", 2);
    const char *p = buf_data(b);
    size_t n = buf_size(b);
    while (n > 0) {
        ssize_t w = write(STDERR_FILENO, p, n);
        if (w <= 0) break;
        p += w;
        n -= (size_t)w;
    }
}

void log_kv_str(struct buf *b, const char *key, const char *v, size_t n)
{
    log_key(b, key);
    buf_append(b, "\"", 1);
    buf_append_json_str(b, v, n);
    buf_append(b, "\"", 1);
}

void log_kv_int(struct buf *b, const char *key, long long v)
{
    log_key(b, key);
    if (v < 0) {
        buf_append(b, "-", 1);
        buf_append_u64(b, (uint64_t)0 - (uint64_t)v);
    } else {
        buf_append_u64(b, (uint64_t)v);
    }
}

void log_msg(enum log_level lvl, const char *fmt, ...)
{
    if (!log_enabled(lvl)) return;
    char msg[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    struct buf b;
    buf_init(&b);
    log_line_begin(&b, lvl);
    log_kv_str(&b, "msg", msg, strlen(msg));
    log_line_end(&b);
    buf_free(&b);
}

static __thread struct buf log_tls_buf;

struct buf *log_scratch(void)
{
    buf_reset(&log_tls_buf);
    return &log_tls_buf;
}

void log_scratch_free(void)
{
    buf_free(&log_tls_buf);
}
