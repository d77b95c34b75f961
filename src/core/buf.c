/* buf.c — growable byte buffer (see buf.h). */
#include "idemgate/core/buf.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

void buf_init(struct buf *b)
{
    memset(b, 0, sizeof(*b));
}

void buf_free(struct buf *b)
{
    if (!b) return;
    free(b->p);
    memset(b, 0, sizeof(*b));
}

char *buf_reserve(struct buf *b, size_t n)
{
    if (b->cap - b->len >= n) return b->p + b->len;
    if (b->off > 0 && b->cap - (b->len - b->off) >= n && b->off >= b->len / 2) {
        buf_compact(b);
        if (b->cap - b->len >= n) return b->p + b->len;
    }
    size_t cap = b->cap ? b->cap : 256;
    while (cap - b->len < n)
        cap *= 2;
    char *p = realloc(b->p, cap);
    if (!p) abort();
    b->p = p;
    b->cap = cap;
    return b->p + b->len;
}

void buf_append(struct buf *b, const void *data, size_t n)
{
    if (n == 0) return;
    memcpy(buf_reserve(b, n), data, n);
    b->len += n;
}

void buf_append_str(struct buf *b, const char *s)
{
    buf_append(b, s, strlen(s));
}

void buf_printf(struct buf *b, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    char *dst = buf_reserve(b, 128);
    int n = vsnprintf(dst, b->cap - b->len, fmt, ap);
    va_end(ap);
    if (n < 0) abort();
    if ((size_t)n >= b->cap - b->len) {
        dst = buf_reserve(b, (size_t)n + 1);
        va_start(ap, fmt);
        vsnprintf(dst, b->cap - b->len, fmt, ap);
        va_end(ap);
    }
    b->len += (size_t)n;
}

void buf_append_u64(struct buf *b, uint64_t v)
{
    char tmp[24];
    int i = sizeof(tmp);
    do {
        tmp[--i] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    buf_append(b, tmp + i, sizeof(tmp) - (size_t)i);
}

void buf_consume(struct buf *b, size_t n)
{
    b->off += n;
    if (b->off >= b->len) b->off = b->len = 0;
}

void buf_compact(struct buf *b)
{
    if (b->off == 0) return;
    memmove(b->p, b->p + b->off, b->len - b->off);
    b->len -= b->off;
    b->off = 0;
}

void buf_reset(struct buf *b)
{
    b->off = b->len = 0;
}

void buf_swap(struct buf *a, struct buf *b)
{
    struct buf t = *a;
    *a = *b;
    *b = t;
}

void buf_append_json_str(struct buf *b, const char *s, size_t n)
{
    static const char hex[] = "0123456789abcdef";
    size_t run = 0; /* plain bytes not yet appended, ending before i */
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c != '"' && c != '\\' && c >= 0x20 && c < 0x7f) {
            run++;
            continue;
        }
        buf_append(b, s + i - run, run);
        run = 0;
        if (c == '"' || c == '\\') {
            char e[2] = {'\\', (char)c};
            buf_append(b, e, 2);
        } else {
            char e[6] = {'\\', 'u', '0', '0', hex[c >> 4], hex[c & 15]};
            buf_append(b, e, 6);
        }
    }
    buf_append(b, s + n - run, run);
}

void buf_pool_init(struct buf_pool *bp, size_t size, unsigned max)
{
    bp->free = calloc(max, sizeof(*bp->free));
    if (!bp->free) abort();
    bp->n = 0;
    bp->max = max;
    bp->size = size;
}

void buf_pool_free(struct buf_pool *bp)
{
    while (bp->n > 0)
        free(bp->free[--bp->n]);
    free(bp->free);
    bp->free = NULL;
    bp->max = 0;
}

void buf_take(struct buf *b, struct buf_pool *bp)
{
    if (b->p || !bp || bp->size == 0) return;
    if (bp->n > 0) {
        b->p = bp->free[--bp->n];
    } else {
        b->p = malloc(bp->size);
        if (!b->p) abort();
    }
    b->cap = bp->size;
    b->off = b->len = 0;
}

void buf_release(struct buf *b, struct buf_pool *bp)
{
    if (!b->p || b->len > b->off) return;
    if (bp && b->cap == bp->size && bp->n < bp->max) {
        bp->free[bp->n++] = b->p;
        memset(b, 0, sizeof(*b));
        return;
    }
    buf_free(b);
}
