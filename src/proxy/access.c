/* access.c — the access line, the requests counter and request ids (see
 * access.h), shared by the exchange and by the client's refusals. Owns
 * nothing. */
#include "idemgate/proxy/access.h"

#include <string.h>

#include "idemgate/config/config.h"
#include "idemgate/core/clock.h"
#include "idemgate/core/log.h"
#include "idemgate/proxy/loop.h"

static bool all_lower_hex(const char *p, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (!((p[i] >= '0' && p[i] <= '9') || (p[i] >= 'a' && p[i] <= 'f'))) return false;
    return true;
}

/* The trace id of a valid W3C traceparent ("00-<32 hex>-<16 hex>-<2 hex>";
 * a later version may append fields after another '-'); all zeros, an
 * upper-case digit or version ff is invalid, and nothing is logged. */
static bool access_trace_id(const struct http1_head *h, struct http1_slice *out)
{
    const struct http1_header *tp = http1_find_header(h, "traceparent", NULL);
    if (!tp || tp->value.n < 55) return false;
    const char *p = tp->value.p;
    if (p[2] != '-' || p[35] != '-' || p[52] != '-' || !all_lower_hex(p, 2) ||
        !all_lower_hex(p + 3, 32) || !all_lower_hex(p + 36, 16) || !all_lower_hex(p + 53, 2))
        return false;
    if (memcmp(p, "ff", 2) == 0 || (memcmp(p, "00", 2) == 0 && tp->value.n != 55)) return false;
    if (tp->value.n > 55 && p[55] != '-') return false;
    if (strspn(p + 3, "0") >= 32) return false;
    *out = (struct http1_slice){p + 3, 32};
    return true;
}

bool access_begin(const struct cfg *cfg, const struct access_fields *f, struct buf *b)
{
    metrics_outcome(f->outcome);
    if (!cfg->log_access || !log_enabled(LOG_INFO)) return false;
    *b = *log_scratch();
    log_line_begin(b, LOG_INFO);
    log_kv_str(b, "msg", "access", 6);
    log_kv_str(b, "request_id", f->request_id, f->request_id_len);
    /* an empty slice may have no pointer: "" keeps the escaper's arithmetic defined */
    log_kv_str(b, "method", f->method.n ? f->method.p : "", f->method.n);
    const char *q = f->target.n ? memchr(f->target.p, '?', f->target.n) : NULL;
    size_t plen = q ? (size_t)(q - f->target.p) : f->target.n;
    log_kv_str(b, "path", plen ? f->target.p : "", plen);
    log_kv_int(b, "status", f->status);
    const char *outcome = metrics_outcome_name((int)f->outcome);
    log_kv_str(b, "outcome", outcome, strlen(outcome));
    log_kv_int(b, "duration_ms", (long long)(clock_now_ms() - f->start_ms));
    log_kv_int(b, "upstream_ms", (long long)f->upstream_ms);
    return true;
}

void access_end(struct buf *b, const struct http1_head *h)
{
    struct http1_slice trace;
    if (h && access_trace_id(h, &trace)) log_kv_str(b, "trace_id", trace.p, trace.n);
    log_line_end(b);
    *log_scratch() = *b; /* the scratch keeps what the line grew it to */
}

static char *put_hex(char *p, uint64_t v, int digits)
{
    static const char hex[] = "0123456789abcdef";
    for (int i = digits - 1; i >= 0; i--) {
        p[i] = hex[v & 15];
        v >>= 4;
    }
    return p + digits;
}

/* "<boot:8>-<worker:4>-<counter:12>" in hex: unique per process start,
 * worker and request, built without printf on every request. */
size_t access_request_id(struct loop *l, char out[64])
{
    char *p = put_hex(out, l->boot_id, 8);
    *p++ = '-';
    p = put_hex(p, (unsigned)l->id, 4);
    *p++ = '-';
    p = put_hex(p, ++l->rid_counter, 12);
    *p = '\0';
    return (size_t)(p - out);
}
