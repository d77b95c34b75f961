/* chunked.h — the incremental chunked-body decoder (RFC 9112 7.1), used
 * for request bodies from clients and response bodies from upstreams.
 * Zero-copy: data slices point into the caller's input and are borrowed
 * while that input is unchanged; the decoder state is the caller's (no
 * allocation, nothing to free). */
#ifndef IDEMGATE_HTTP_CHUNKED_H
#define IDEMGATE_HTTP_CHUNKED_H

#include <stddef.h>
#include <stdint.h>

/* A slice of bytes in a caller's buffer (borrowed). */
struct http1_slice {
    const char *p;
    size_t n;
};

/* Parse errors shared with http1.h. */
#ifndef HTTP1_EBAD
#define HTTP1_EBAD (-1) /* malformed: 400 */
#endif

/* Incremental chunked-body decoder. */
struct http1_chunked {
    int state;
    uint64_t remaining;   /* bytes left in the current chunk */
    size_t line_bytes;    /* bytes of the current size/trailer line seen */
    size_t trailer_bytes; /* total trailer bytes seen */
};

#define HTTP1_CHUNK_MORE 0 /* consumed all input, need more */
#define HTTP1_CHUNK_DATA 1 /* *data is a slice of body bytes (inside in) */
#define HTTP1_CHUNK_DONE 2 /* last chunk and trailers consumed: body complete */

void http1_chunked_init(struct http1_chunked *c);
/* Consumes bytes from in[0..n) and sets *used to how many. Returns
 * HTTP1_CHUNK_DATA with *data set (a slice within the consumed bytes),
 * HTTP1_CHUNK_MORE when all n were consumed without data, HTTP1_CHUNK_DONE
 * when the terminating chunk and trailers are consumed (bytes after it are
 * not consumed), or HTTP1_EBAD. Chunk extensions are ignored; trailers are
 * skipped (bounded at 8 KiB); a size line is bounded at 1 KiB. Call in a
 * loop until MORE or DONE. */
int http1_chunked_next(struct http1_chunked *c, const char *in, size_t n, size_t *used,
                       struct http1_slice *data);

#endif
