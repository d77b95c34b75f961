/* buf.h — a growable byte buffer with a read offset.
 *
 * Owns its bytes (p). Data lives in p[off .. len); bytes before off were
 * consumed. Growth may move p: never keep pointers into a buf across an
 * append. Out of memory aborts. */
#ifndef IDEMGATE_BUF_H
#define IDEMGATE_BUF_H

#include <stddef.h>
#include <stdint.h>

struct buf {
    char *p;
    size_t off; /* first unread byte */
    size_t len; /* end of data */
    size_t cap;
};

void buf_init(struct buf *b);
/* Frees the bytes; b may then be reused after buf_init. Tolerates NULL. */
void buf_free(struct buf *b);
/* Makes room for at least n more bytes after len; returns p + len. */
char *buf_reserve(struct buf *b, size_t n);
/* Counts n bytes written at buf_reserve's pointer as data. */
static inline void buf_commit(struct buf *b, size_t n)
{
    b->len += n;
}
void buf_append(struct buf *b, const void *data, size_t n);
void buf_append_str(struct buf *b, const char *s);
void buf_printf(struct buf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
void buf_append_u64(struct buf *b, uint64_t v);
/* Drops n bytes from the front (advances off); resets to empty when drained. */
void buf_consume(struct buf *b, size_t n);
/* Moves unread bytes to the start of p. */
void buf_compact(struct buf *b);
static inline size_t buf_size(const struct buf *b)
{
    return b->len - b->off;
}
/* NULL for a buffer that never held a byte (no arithmetic on NULL). */
static inline const char *buf_data(const struct buf *b)
{
    return b->p ? b->p + b->off : NULL;
}
void buf_reset(struct buf *b);
/* Swaps the contents of two buffers. */
void buf_swap(struct buf *a, struct buf *b);
/* A per-thread cache of equally sized free buffers: a connection gives its
 * buffers back while idle (so 10,000 idle keep-alive connections hold no
 * buffer memory) and the next busy one takes them without malloc. */
struct buf_pool {
    char **free;
    unsigned n, max;
    size_t size;
};

void buf_pool_init(struct buf_pool *bp, size_t size, unsigned max);
void buf_pool_free(struct buf_pool *bp);
/* Gives b memory from the pool when b has none. bp may be NULL. */
void buf_take(struct buf *b, struct buf_pool *bp);
/* When b is empty, gives its memory back to the pool (or frees it when it
 * grew past the pool's size or the pool is full). bp may be NULL. */
void buf_release(struct buf *b, struct buf_pool *bp);

/* Appends the bytes escaped as the inside of a JSON string. */
void buf_append_json_str(struct buf *b, const char *s, size_t n);

#endif
