/* record.c — the stored-response binary encoding (see record.h): the
 * incremental writer, the whole-record encoder and the strict zero-copy
 * decoder. Knows nothing of HTTP semantics or of the store. */
#include "idemgate/idem/record.h"

#include <stdbool.h>
#include <string.h>

static const uint8_t record_magic[3] = {'I', 'G', 'R'};

/* magic | version | status | created_ms | fp | n_headers */
#define RECORD_FIXED_LEN (3 + 1 + 2 + 8 + 16 + 2)
#define RECORD_NAME_MAX 65535u
#define RECORD_VALUE_MAX 0xFFFFFFFFu

static void put_be(uint8_t *p, uint64_t v, size_t n)
{
    for (size_t i = 0; i < n; i++)
        p[i] = (uint8_t)(v >> (8 * (n - 1 - i)));
}

static uint64_t get_be(const uint8_t *p, size_t n)
{
    uint64_t v = 0;
    for (size_t i = 0; i < n; i++)
        v = (v << 8) | p[i];
    return v;
}

static void append_be(struct buf *b, uint64_t v, size_t n)
{
    uint8_t tmp[8];
    put_be(tmp, v, n);
    buf_append(b, tmp, n);
}

/* Offsets in the writer are relative to buf_data(out), not to out->p:
 * buf_reserve may compact the buffer (move the unread bytes to p[0]) while
 * the body is appended, which shifts absolute positions but not these. */
static uint8_t *writer_at(struct record_writer *w, size_t off)
{
    return (uint8_t *)w->out->p + w->out->off + off;
}

void record_begin(struct record_writer *w, struct buf *out, int status, uint64_t created_ms,
                  const uint8_t fp[16])
{
    w->out = out;
    w->start = buf_size(out);
    w->n_headers = 0;
    w->body_off = 0;
    buf_append(out, record_magic, sizeof(record_magic));
    append_be(out, RECORD_VERSION, 1);
    append_be(out, (uint16_t)status, 2);
    append_be(out, created_ms, 8);
    buf_append(out, fp, 16);
    w->count_off = buf_size(out);
    append_be(out, 0, 2);
}

int record_add_header(struct record_writer *w, const char *name, size_t name_len, const char *value,
                      size_t value_len)
{
    if (w->n_headers >= RECORD_MAX_HEADERS) return -1;
    if (name_len > RECORD_NAME_MAX || value_len > RECORD_VALUE_MAX) return -1;
    append_be(w->out, name_len, 2);
    buf_append(w->out, name, name_len);
    append_be(w->out, value_len, 4);
    buf_append(w->out, value, value_len);
    w->n_headers++;
    return 0;
}

void record_begin_body(struct record_writer *w)
{
    w->body_off = buf_size(w->out);
    append_be(w->out, 0, 8);
}

void record_end(struct record_writer *w)
{
    uint64_t body_len = buf_size(w->out) - (w->body_off + 8);
    put_be(writer_at(w, w->count_off), w->n_headers, 2);
    put_be(writer_at(w, w->body_off), body_len, 8);
}

static bool record_encodable(const struct record *r)
{
    if (r->status < 100 || r->status > 599) return false;
    if (r->n_headers > RECORD_MAX_HEADERS) return false;
    for (size_t i = 0; i < r->n_headers; i++) {
        if (r->headers[i].name_len > RECORD_NAME_MAX) return false;
        if (r->headers[i].value_len > RECORD_VALUE_MAX) return false;
    }
    return r->body_len <= SIZE_MAX;
}

int record_encode(const struct record *r, struct buf *out)
{
    if (!record_encodable(r)) return -1;
    struct record_writer w;
    record_begin(&w, out, r->status, r->created_ms, r->fp);
    for (size_t i = 0; i < r->n_headers; i++) {
        const struct record_header *h = &r->headers[i];
        record_add_header(&w, h->name, h->name_len, h->value, h->value_len);
    }
    record_begin_body(&w);
    buf_append(out, r->body, (size_t)r->body_len);
    record_end(&w);
    return 0;
}

/* A bounds-checked reader over the blob: every take compares against what
 * remains, so no length in the input can make an offset overflow. */
struct record_cursor {
    const uint8_t *p;
    size_t left;
};

static const uint8_t *cursor_take(struct record_cursor *c, uint64_t n)
{
    if (n > c->left) return NULL;
    const uint8_t *at = c->p;
    c->p += n;
    c->left -= (size_t)n;
    return at;
}

static int cursor_be(struct record_cursor *c, size_t n, uint64_t *v)
{
    const uint8_t *at = cursor_take(c, n);
    if (!at) return -1;
    *v = get_be(at, n);
    return 0;
}

static int decode_fixed(struct record_cursor *c, struct record *r)
{
    const uint8_t *magic = cursor_take(c, sizeof(record_magic));
    if (!magic || memcmp(magic, record_magic, sizeof(record_magic)) != 0) return -1;
    uint64_t version, status, n;
    if (cursor_be(c, 1, &version) < 0 || version != RECORD_VERSION) return -1;
    if (cursor_be(c, 2, &status) < 0 || status < 100 || status > 599) return -1;
    if (cursor_be(c, 8, &r->created_ms) < 0) return -1;
    const uint8_t *fp = cursor_take(c, 16);
    if (!fp) return -1;
    memcpy(r->fp, fp, 16);
    if (cursor_be(c, 2, &n) < 0 || n > RECORD_MAX_HEADERS) return -1;
    r->status = (int)status;
    r->n_headers = (size_t)n;
    return 0;
}

static int decode_header(struct record_cursor *c, struct record_header *h)
{
    uint64_t name_len, value_len;
    if (cursor_be(c, 2, &name_len) < 0) return -1;
    const uint8_t *name = cursor_take(c, name_len);
    if (!name) return -1;
    if (cursor_be(c, 4, &value_len) < 0) return -1;
    const uint8_t *value = cursor_take(c, value_len);
    if (!value) return -1;
    h->name = (const char *)name;
    h->name_len = (size_t)name_len;
    h->value = (const char *)value;
    h->value_len = (size_t)value_len;
    return 0;
}

int record_decode(const uint8_t *buf, size_t len, size_t max_len, struct record *r)
{
    if (len > max_len || len < RECORD_FIXED_LEN) return -1;
    struct record_cursor c = {buf, len};
    if (decode_fixed(&c, r) < 0) return -1;
    for (size_t i = 0; i < r->n_headers; i++)
        if (decode_header(&c, &r->headers[i]) < 0) return -1;
    if (cursor_be(&c, 8, &r->body_len) < 0) return -1;
    r->body = cursor_take(&c, r->body_len);
    if (!r->body) return -1;
    return c.left == 0 ? 0 : -1;
}

const char *record_pseudo(const struct record *r, const char *name, size_t *len)
{
    size_t n = strlen(name);
    /* pseudo-headers come first */
    for (size_t i = 0;
         i < r->n_headers && r->headers[i].name_len > 0 && r->headers[i].name[0] == ':'; i++) {
        const struct record_header *h = &r->headers[i];
        if (h->name_len == n && memcmp(h->name, name, n) == 0) {
            *len = h->value_len;
            return h->value;
        }
    }
    return NULL;
}

bool record_is_lost(const struct record *r)
{
    size_t n;
    return record_pseudo(r, RECORD_HDR_LOST, &n) != NULL;
}
