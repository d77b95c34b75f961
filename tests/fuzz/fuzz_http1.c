/* fuzz_http1.c — libFuzzer driver for http1.c.
 *
 * Feeds the input to the request and response head parsers and to the
 * chunked decoder, and checks invariants: a returned length is within the
 * input and max_head, every slice lies inside the head, a complete head is
 * INCOMPLETE at every shorter prefix it is tested at and parses the same
 * alone, and the chunked decoder gives the same verdict and the same bytes
 * however its input is split. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "idemgate/http/http1.h"

#include "fuzz_check.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static struct http1_head head, head2;

static void check_slice(struct http1_slice s, const char *buf, long n)
{
    if (s.n == 0) return;
    CHECK(s.p >= buf && s.p + s.n <= buf + n);
}

static void check_head(const struct http1_head *h, const char *buf, long n, bool request)
{
    CHECK(h->n_headers <= HTTP1_MAX_HEADERS);
    CHECK(h->minor_version == 0 || h->minor_version == 1);
    CHECK(h->body >= HTTP1_BODY_NONE && h->body <= HTTP1_BODY_CLOSE);
    if (request) {
        CHECK(h->method.n > 0 && h->target.n > 0);
        check_slice(h->method, buf, n);
        check_slice(h->target, buf, n);
        CHECK(h->body != HTTP1_BODY_CLOSE);
    } else {
        CHECK(h->status >= 100 && h->status <= 599);
        check_slice(h->reason, buf, n);
        if (h->body == HTTP1_BODY_CLOSE) CHECK(!h->keep_alive);
    }
    size_t cl_count = 0;
    http1_find_header(h, "content-length", &cl_count);
    if (h->body == HTTP1_BODY_LENGTH) CHECK(cl_count == 1);
    for (size_t i = 0; i < h->n_headers; i++) {
        const struct http1_header *hd = &h->headers[i];
        CHECK(hd->name.n > 0);
        check_slice(hd->name, buf, n);
        check_slice(hd->value, buf, n);
        if (hd->value.n) {
            CHECK(hd->value.p[0] != ' ' && hd->value.p[0] != '\t');
            CHECK(hd->value.p[hd->value.n - 1] != ' ' && hd->value.p[hd->value.n - 1] != '\t');
        }
        (void)http1_is_hop_by_hop(h, i);
        char name[64];
        if (hd->name.n < sizeof(name)) {
            memcpy(name, hd->name.p, hd->name.n);
            name[hd->name.n] = '\0';
            size_t count = 0;
            const struct http1_header *first = http1_find_header(h, name, &count);
            CHECK(first != NULL && first <= hd && count >= 1);
            CHECK(http1_slice_ieq(first->name, name));
        }
    }
}

static long parse(bool request, const char *buf, size_t len, size_t max_head, bool head_req,
                  struct http1_head *h)
{
    return request ? http1_parse_request(buf, len, max_head, h)
                   : http1_parse_response(buf, len, max_head, head_req, h);
}

/* Parses at a prefix copied into an exact-size buffer, so reading past len
 * is caught by ASan. */
static long parse_copy(bool request, const char *buf, size_t len, size_t max_head, bool head_req)
{
    char *copy = malloc(len ? len : 1);
    memcpy(copy, buf, len);
    long rc = parse(request, copy, len, max_head, head_req, &head2);
    free(copy);
    return rc;
}

static void fuzz_head(bool request, const char *buf, size_t len, size_t max_head, bool head_req)
{
    long n = parse(request, buf, len, max_head, head_req, &head);
    CHECK(n >= HTTP1_ENOTIMPL);
    CHECK(n <= (long)len && n <= (long)max_head);
    if (n == HTTP1_INCOMPLETE) CHECK(len < max_head);
    if (n <= 0) return;
    check_head(&head, buf, n, request);
    /* the same head alone, and with max_head at its exact length */
    CHECK(parse_copy(request, buf, (size_t)n, max_head, head_req) == n);
    CHECK(parse(request, buf, len, (size_t)n, head_req, &head2) == n);
    CHECK(parse(request, buf, len, (size_t)n - 1, head_req, &head2) == HTTP1_ETOOLARGE);
    CHECK(head2.n_headers == 0 || head2.n_headers <= HTTP1_MAX_HEADERS);
    /* any shorter prefix is incomplete */
    CHECK(parse_copy(request, buf, (size_t)n - 1, max_head, head_req) == HTTP1_INCOMPLETE);
    CHECK(parse_copy(request, buf, (size_t)n / 2, max_head, head_req) == HTTP1_INCOMPLETE);
}

/* ---- chunked ------------------------------------------------------------- */

struct chunk_run {
    int rc;
    size_t consumed;
    uint8_t *out;
    size_t out_n;
};

/* Decodes in[0..n) fed in pieces: step(i) gives the size of the next piece. */
static void chunk_run(const char *in, size_t n, uint32_t seed, int mode, struct chunk_run *r)
{
    struct http1_chunked c;
    http1_chunked_init(&c);
    r->out = malloc(n ? n : 1);
    r->out_n = 0;
    r->rc = HTTP1_CHUNK_MORE;
    size_t pos = 0;
    while (pos < n) {
        size_t piece = n - pos;
        if (mode == 1) piece = 1;
        if (mode == 2) {
            seed = seed * 1103515245u + 12345u;
            piece = 1 + (seed >> 16) % 17;
            if (piece > n - pos) piece = n - pos;
        }
        /* an exact-size copy of the piece, so overreads are caught */
        char *p = malloc(piece);
        memcpy(p, in + pos, piece);
        size_t off = 0;
        int rc;
        do {
            size_t used = (size_t)-1;
            struct http1_slice d = {NULL, 0};
            rc = http1_chunked_next(&c, p + off, piece - off, &used, &d);
            CHECK(used <= piece - off);
            if (rc == HTTP1_CHUNK_DATA) {
                CHECK(d.n > 0 && d.p >= p + off && d.p + d.n <= p + off + used);
                CHECK(r->out_n + d.n <= n);
                memcpy(r->out + r->out_n, d.p, d.n);
                r->out_n += d.n;
            } else if (rc == HTTP1_CHUNK_MORE) {
                CHECK(used == piece - off);
            }
            off += used;
        } while (rc == HTTP1_CHUNK_DATA && off < piece);
        free(p);
        pos += off;
        if (rc == HTTP1_CHUNK_DONE || rc < 0) {
            r->rc = rc;
            CHECK(rc == HTTP1_CHUNK_DONE || rc == HTTP1_EBAD);
            break;
        }
    }
    r->consumed = pos;
}

static void fuzz_chunked(const char *in, size_t n, uint32_t seed)
{
    struct chunk_run a, b, c;
    chunk_run(in, n, seed, 0, &a);
    chunk_run(in, n, seed, 1, &b);
    chunk_run(in, n, seed, 2, &c);
    CHECK(a.rc == b.rc && a.rc == c.rc);
    CHECK(a.consumed == b.consumed && a.consumed == c.consumed);
    CHECK(a.out_n == b.out_n && a.out_n == c.out_n);
    CHECK(memcmp(a.out, b.out, a.out_n) == 0 && memcmp(a.out, c.out, a.out_n) == 0);
    free(a.out);
    free(b.out);
    free(c.out);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1) return 0;
    uint8_t ctl = data[0];
    const char *buf = (const char *)data + 1;
    size_t len = size - 1;
    size_t max_head = (ctl & 0x80) ? (size_t)(ctl & 0x7f) * 8 : 65536;

    fuzz_head(true, buf, len, max_head, false);
    fuzz_head(false, buf, len, max_head, (ctl & 1) != 0);
    fuzz_chunked(buf, len, ctl);
    return 0;
}
