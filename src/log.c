/* log.c — JSON log lines on stderr, one write(2) per line. */
#include "idemgate/log.h"

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
    struct timeval tv;
    struct tm tm;
    gettimeofday(&tv, NULL);
    gmtime_r(&tv.tv_sec, &tm);
    char ts[40];
    strftime(ts, sizeof(ts), "%Y-%m-%dT%H:%M:%S", &tm);
    buf_printf(b, "{\"ts\":\"%s.%03dZ\",\"level\":\"%s\"", ts, (int)(tv.tv_usec / 1000),
               log_names[lvl]);
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
    buf_printf(b, ",\"%s\":\"", key);
    buf_append_json_str(b, v, n);
    buf_append(b, "\"", 1);
}

void log_kv_int(struct buf *b, const char *key, long long v)
{
    buf_printf(b, ",\"%s\":%lld", key, v);
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
