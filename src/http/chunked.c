/* chunked.c — the incremental chunked transfer-coding decoder (RFC 9112
 * 7.1; see chunked.h): sizes, extensions (skipped), data slices, trailers
 * (skipped). Owns only its small per-body state; never allocates or
 * copies. */
#include "idemgate/http/chunked.h"

#include <stdint.h>
#include <string.h>

#include "idemgate/http/http1.h"

#define CHUNK_LINE_MAX 1024
#define CHUNK_TRAILER_MAX 8192

/* ---- chunked decoder ----------------------------------------------------- */

enum chunk_state {
    CS_SIZE,        /* hex digits of a chunk size */
    CS_SIZE_WS,     /* whitespace after the size; only ';' may follow */
    CS_EXT,         /* chunk extension, skipped until CR */
    CS_SIZE_LF,     /* LF ending a size line */
    CS_DATA,        /* chunk bytes */
    CS_DATA_CR,     /* CR after chunk bytes */
    CS_DATA_LF,     /* LF after chunk bytes */
    CS_TRAILER,     /* at the start of a trailer line (or the final CRLF) */
    CS_TRAILER_TXT, /* inside a trailer line */
    CS_TRAILER_LF,  /* LF ending a trailer line */
    CS_END_LF,      /* LF of the final empty line */
    CS_DONE,
    CS_ERROR, /* sticky after HTTP1_EBAD */
};

/* A hex digit's value plus one; zero for anything else. */
static const unsigned char hex1[256] = {
    ['0'] = 1,  ['1'] = 2,  ['2'] = 3,  ['3'] = 4,  ['4'] = 5,  ['5'] = 6,  ['6'] = 7,  ['7'] = 8,
    ['8'] = 9,  ['9'] = 10, ['a'] = 11, ['b'] = 12, ['c'] = 13, ['d'] = 14, ['e'] = 15, ['f'] = 16,
    ['A'] = 11, ['B'] = 12, ['C'] = 13, ['D'] = 14, ['E'] = 15, ['F'] = 16,
};

void http1_chunked_init(struct http1_chunked *c)
{
    memset(c, 0, sizeof(*c));
    c->state = CS_SIZE;
}

/* One byte of a size line (everything but data and trailers). */
static int chunk_size_byte(struct http1_chunked *c, unsigned char b)
{
    if (++c->line_bytes > CHUNK_LINE_MAX) return HTTP1_EBAD;
    switch (c->state) {
    case CS_SIZE:
        if (hex1[b]) {
            if (c->line_bytes > 16) return HTTP1_EBAD; /* 16 hex digits fill 64 bits */
            c->remaining = (c->remaining << 4) | (uint64_t)(hex1[b] - 1);
            return 0;
        }
        if (c->line_bytes == 1) return HTTP1_EBAD; /* no digits */
        if (b == '\r')
            c->state = CS_SIZE_LF;
        else if (b == ';')
            c->state = CS_EXT;
        else if (b == ' ' || b == '\t')
            c->state = CS_SIZE_WS;
        else
            return HTTP1_EBAD;
        return 0;
    case CS_SIZE_WS:
        if (b == ';')
            c->state = CS_EXT;
        else if (b != ' ' && b != '\t')
            return HTTP1_EBAD;
        return 0;
    case CS_EXT:
        if (b == '\r')
            c->state = CS_SIZE_LF;
        else if (!http1_is_value_byte(b))
            return HTTP1_EBAD;
        return 0;
    default: /* CS_SIZE_LF */
        if (b != '\n') return HTTP1_EBAD;
        c->line_bytes = 0;
        c->state = c->remaining ? CS_DATA : CS_TRAILER;
        return 0;
    }
}

/* One byte after the last chunk: trailer lines then the final CRLF. */
static int chunk_trailer_byte(struct http1_chunked *c, unsigned char b)
{
    if (++c->trailer_bytes > CHUNK_TRAILER_MAX) return HTTP1_EBAD;
    switch (c->state) {
    case CS_TRAILER:
        if (b == '\r')
            c->state = CS_END_LF;
        else if (http1_is_tchar(b)) /* a field name; obs-fold is refused */
            c->state = CS_TRAILER_TXT;
        else
            return HTTP1_EBAD;
        return 0;
    case CS_TRAILER_TXT:
        if (b == '\r')
            c->state = CS_TRAILER_LF;
        else if (!http1_is_value_byte(b))
            return HTTP1_EBAD;
        return 0;
    case CS_TRAILER_LF:
        if (b != '\n') return HTTP1_EBAD;
        c->state = CS_TRAILER;
        return 0;
    default: /* CS_END_LF */
        if (b != '\n') return HTTP1_EBAD;
        c->state = CS_DONE;
        return 0;
    }
}

int http1_chunked_next(struct http1_chunked *c, const char *in, size_t n, size_t *used,
                       struct http1_slice *data)
{
    size_t i = 0;
    int rc = 0;
    while (i < n) {
        unsigned char b = (unsigned char)in[i];
        switch (c->state) {
        case CS_DATA: {
            size_t k = n - i;
            if (k > c->remaining) k = (size_t)c->remaining;
            data->p = in + i;
            data->n = k;
            c->remaining -= k;
            if (c->remaining == 0) c->state = CS_DATA_CR;
            *used = i + k;
            return HTTP1_CHUNK_DATA;
        }
        case CS_DATA_CR:
            if (b != '\r') rc = HTTP1_EBAD;
            c->state = CS_DATA_LF;
            break;
        case CS_DATA_LF:
            if (b != '\n') rc = HTTP1_EBAD;
            c->state = CS_SIZE;
            c->line_bytes = 0;
            break;
        case CS_TRAILER:
        case CS_TRAILER_TXT:
        case CS_TRAILER_LF:
        case CS_END_LF:
            rc = chunk_trailer_byte(c, b);
            break;
        case CS_DONE:
            *used = i;
            return HTTP1_CHUNK_DONE;
        case CS_ERROR:
            rc = HTTP1_EBAD;
            break;
        default:
            rc = chunk_size_byte(c, b);
            break;
        }
        if (rc) {
            c->state = CS_ERROR;
            *used = i;
            return rc;
        }
        i++;
    }
    *used = i;
    if (c->state == CS_ERROR) return HTTP1_EBAD;
    return c->state == CS_DONE ? HTTP1_CHUNK_DONE : HTTP1_CHUNK_MORE;
}
