/* writer.c — HTTP/1.1 response head writing (see writer.h). Owns only a
 * per-thread cache of the formatted date. */
#include "idemgate/http/writer.h"

#include <string.h>
#include <time.h>

void http1_write_status(struct buf *o, int status, const char *reason, size_t reason_len)
{
    buf_append(o, "HTTP/1.1 ", 9);
    buf_append_u64(o, (uint64_t)status);
    buf_append(o, " ", 1);
    buf_append(o, reason, reason_len);
    buf_append(o, "\r\n", 2);
}

void http1_write_header(struct buf *o, const char *name, size_t name_len, const char *value,
                        size_t value_len)
{
    buf_append(o, name, name_len);
    buf_append(o, ": ", 2);
    buf_append(o, value, value_len);
    buf_append(o, "\r\n", 2);
}

void http1_write_header_u64(struct buf *o, const char *name, size_t name_len, unsigned long long v)
{
    buf_append(o, name, name_len);
    buf_append(o, ": ", 2);
    buf_append_u64(o, (uint64_t)v);
    buf_append(o, "\r\n", 2);
}

const char *http1_reason(int status)
{
    switch (status) {
    case 200:
        return "OK";
    case 201:
        return "Created";
    case 400:
        return "Bad Request";
    case 401:
        return "Unauthorized";
    case 408:
        return "Request Timeout";
    case 409:
        return "Conflict";
    case 413:
        return "Content Too Large";
    case 422:
        return "Unprocessable Content";
    case 431:
        return "Request Header Fields Too Large";
    case 501:
        return "Not Implemented";
    case 502:
        return "Bad Gateway";
    case 503:
        return "Service Unavailable";
    case 504:
        return "Gateway Timeout";
    case 505:
        return "HTTP Version Not Supported";
    default:
        return "Unknown";
    }
}

const char *http1_date_now(void)
{
    static __thread time_t cached_sec = -1;
    static __thread char cached[32];
    time_t now = time(NULL);
    if (now != cached_sec) {
        struct tm tm;
        gmtime_r(&now, &tm);
        strftime(cached, sizeof(cached), "%a, %d %b %Y %H:%M:%S GMT", &tm);
        cached_sec = now;
    }
    return cached;
}
