/* fuzz_record.c — libFuzzer driver for record_decode: any input either is
 * refused or decodes to slices inside the input that re-encode to exactly
 * the same bytes. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "idemgate/core/buf.h"
#include "idemgate/idem/record.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static int inside(const void *p, size_t n, const uint8_t *data, size_t size)
{
    const uint8_t *q = p;
    return q >= data && n <= size && q - data <= (ptrdiff_t)(size - n);
}

static void check_slices(const struct record *r, const uint8_t *data, size_t size)
{
    if (r->n_headers > RECORD_MAX_HEADERS) abort();
    if (r->status < 100 || r->status > 599) abort();
    for (size_t i = 0; i < r->n_headers; i++) {
        const struct record_header *h = &r->headers[i];
        if (!inside(h->name, h->name_len, data, size)) abort();
        if (!inside(h->value, h->value_len, data, size)) abort();
    }
    if (!inside(r->body, (size_t)r->body_len, data, size)) abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static struct record r;
    /* The max_len limit: taken from the first input byte so both sides of
     * it are explored. */
    size_t max_len = size;
    if (size > 0 && data[0] & 1) max_len = size - (data[0] >> 7);
    if (record_decode(data, size, max_len, &r) != 0) return 0;
    if (size > max_len) abort();
    check_slices(&r, data, size);

    struct buf out;
    buf_init(&out);
    if (record_encode(&r, &out) != 0) abort();
    if (buf_size(&out) != size || memcmp(buf_data(&out), data, size) != 0) abort();
    buf_free(&out);
    return 0;
}
