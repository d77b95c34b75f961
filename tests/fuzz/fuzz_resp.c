/* fuzz_resp.c — libFuzzer driver for the RESP2 parser and command writer
 * (src/store/redis/resp.c). The first byte picks a split point, the rest
 * is a stream of replies from a "server". Checked:
 *  - the stream parsed reply by reply: consumed is 1..n, strings lie inside
 *    the input, nothing nests deeper than RESP_MAX_DEPTH; a reply written
 *    back canonically is no longer than its input and parses to itself;
 *  - the first reply parsed from only the bytes before the split: 0 (with
 *    need past the prefix and, when the whole gives a reply, not past it),
 *    or the same answer as from the whole stream;
 *  - the stream fed in two pieces (at the split) to a connection-like
 *    reader that consumes replies: the same replies and the same end (error
 *    or waiting) as the whole stream;
 *  - the input cut at 0xFF bytes into arguments, written as a command:
 *    resp_command_len bytes that parse back to those arguments.
 * Every parse reads a heap copy of exactly the bytes it may read. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "store/redis/resp.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static struct resp_arena arena;
static int arena_ready;

/* buf_data of a buf that never held a byte is NULL + 0 (undefined). */
static const char *bdata(const struct buf *b)
{
    return b->p ? buf_data(b) : "";
}

static void check_tree(const struct rreply *r, const char *p, size_t n, int depth)
{
    switch (r->type) {
    case RREPLY_STRING:
    case RREPLY_STATUS:
    case RREPLY_ERROR:
        if (!r->str || r->str < p || r->len > n || (size_t)(r->str - p) > n - r->len) abort();
        if (r->type != RREPLY_STRING && memchr(r->str, '\r', r->len)) abort();
        if (r->type == RREPLY_STRING && r->len > (size_t)RESP_MAX_BULK) abort();
        break;
    case RREPLY_INTEGER:
    case RREPLY_NIL:
        if (r->str || r->elements) abort();
        break;
    case RREPLY_ARRAY:
        if (depth >= RESP_MAX_DEPTH || r->elements > (size_t)RESP_MAX_ELEMENTS) abort();
        if ((r->elements == 0) != (r->element == NULL)) abort();
        for (size_t k = 0; k < r->elements; k++)
            check_tree(&r->element[k], p, n, depth + 1);
        break;
    default:
        abort();
    }
}

/* The canonical RESP of a reply (nil as $-1). */
static void write_reply(const struct rreply *r, struct buf *b)
{
    switch (r->type) {
    case RREPLY_STRING:
        buf_printf(b, "$%zu\r\n", r->len);
        buf_append(b, r->str, r->len);
        buf_append(b, "\r\n", 2);
        break;
    case RREPLY_STATUS:
    case RREPLY_ERROR:
        buf_append(b, r->type == RREPLY_STATUS ? "+" : "-", 1);
        buf_append(b, r->str, r->len);
        buf_append(b, "\r\n", 2);
        break;
    case RREPLY_INTEGER:
        buf_printf(b, ":%lld\r\n", r->integer);
        break;
    case RREPLY_NIL:
        buf_append_str(b, "$-1\r\n");
        break;
    case RREPLY_ARRAY:
        buf_printf(b, "*%zu\r\n", r->elements);
        for (size_t k = 0; k < r->elements; k++)
            write_reply(&r->element[k], b);
        break;
    }
}

static int parse_exact(const char *in, size_t n, struct rreply **r, size_t *consumed, char **copy)
{
    *copy = malloc(n ? n : 1);
    if (!*copy) abort();
    if (n) memcpy(*copy, in, n);
    int rc = resp_parse(*copy, n, &arena, r, consumed);
    if (rc < -1 || rc > 1) abort();
    if (rc != 1 && (*r || *consumed)) abort();
    if (rc == 0 && arena.need <= n) abort();
    if (rc == 1) {
        if (!*r || *consumed == 0 || *consumed > n) abort();
        check_tree(*r, *copy, *consumed, 0);
    }
    return rc;
}

/* Parses the stream reply by reply; appends each reply's canonical RESP to
 * out; returns how it ended (0 waiting, -1 error). */
static int parse_stream(const char *in, size_t n, struct buf *out, int check_round_trip)
{
    for (;;) {
        struct rreply *r;
        size_t consumed;
        char *copy;
        int rc = parse_exact(in, n, &r, &consumed, &copy);
        if (rc != 1) {
            free(copy);
            return rc;
        }
        size_t before = buf_size(out);
        write_reply(r, out);
        size_t len = buf_size(out) - before;
        free(copy);
        if (len > consumed) abort();
        if (check_round_trip) {
            /* The canonical form parses to itself. */
            struct buf again;
            buf_init(&again);
            char *canon = malloc(len);
            if (!canon) abort();
            memcpy(canon, bdata(out) + before, len);
            size_t c2;
            if (resp_parse(canon, len, &arena, &r, &c2) != 1 || c2 != len) abort();
            write_reply(r, &again);
            if (buf_size(&again) != len || memcmp(bdata(&again), canon, len)) abort();
            buf_free(&again);
            free(canon);
        }
        in += consumed;
        n -= consumed;
    }
}

static void check_prefix(const char *in, size_t n, size_t k)
{
    struct rreply *r;
    size_t whole_consumed, part_consumed;
    char *whole_copy, *part_copy;
    int whole = parse_exact(in, n, &r, &whole_consumed, &whole_copy);
    struct buf a, b;
    buf_init(&a);
    buf_init(&b);
    if (whole == 1) write_reply(r, &a);
    size_t whole_need = arena.need;
    int part = parse_exact(in, k, &r, &part_consumed, &part_copy);
    if (part == 0) {
        if (whole == 1 && arena.need > whole_consumed) abort();
        if (whole == 0 && arena.need > whole_need) abort();
    } else {
        if (part != whole) abort();
        if (part == 1) {
            if (part_consumed != whole_consumed) abort();
            write_reply(r, &b);
            if (buf_size(&a) != buf_size(&b) || memcmp(bdata(&a), bdata(&b), buf_size(&a))) abort();
        }
    }
    buf_free(&a);
    buf_free(&b);
    free(whole_copy);
    free(part_copy);
}

/* A connection: bytes arrive in two reads, replies are consumed. */
static int read_in_two(const char *in, size_t n, size_t k, struct buf *out)
{
    struct buf pending;
    buf_init(&pending);
    int rc = 0;
    size_t cuts[2] = {k, n - k};
    const char *src = in;
    for (int c = 0; c < 2; c++) {
        buf_append(&pending, src, cuts[c]);
        src += cuts[c];
        for (;;) {
            struct rreply *r;
            size_t consumed;
            char *copy;
            rc = parse_exact(bdata(&pending), buf_size(&pending), &r, &consumed, &copy);
            if (rc == 1) write_reply(r, out);
            free(copy);
            if (rc != 1) break;
            buf_consume(&pending, consumed);
        }
        if (rc == -1) break;
    }
    buf_free(&pending);
    return rc;
}

static void check_writer(const char *in, size_t n)
{
    const char *argv[64];
    size_t lens[64];
    int argc = 0;
    size_t start = 0;
    for (size_t i = 0; i <= n && argc < 64; i++) {
        if (i == n || (unsigned char)in[i] == 0xFF) {
            argv[argc] = in + start;
            lens[argc++] = i - start;
            start = i + 1;
        }
    }
    struct buf b;
    buf_init(&b);
    resp_append_command(&b, argc, argv, lens);
    size_t len = resp_command_len(argc, argv, lens);
    if (buf_size(&b) != len) abort();
    char *copy = malloc(len);
    if (!copy) abort();
    memcpy(copy, bdata(&b), len);
    struct rreply *r;
    size_t consumed;
    if (resp_parse(copy, len, &arena, &r, &consumed) != 1 || consumed != len) abort();
    if (r->type != RREPLY_ARRAY || r->elements != (size_t)argc) abort();
    for (int k = 0; k < argc; k++) {
        const struct rreply *e = &r->element[k];
        if (e->type != RREPLY_STRING || e->len != lens[k]) abort();
        if (lens[k] && memcmp(e->str, argv[k], lens[k])) abort();
    }
    free(copy);
    buf_free(&b);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (!arena_ready) {
        resp_arena_init(&arena);
        arena_ready = 1;
    }
    if (size < 1) return 0;
    const char *in = (const char *)data + 1;
    size_t n = size - 1;
    size_t k = (size_t)data[0] * (n + 1) / 256; /* 0 .. n */

    struct buf whole, two;
    buf_init(&whole);
    buf_init(&two);
    int end = parse_stream(in, n, &whole, 1);
    check_prefix(in, n, k);
    if (read_in_two(in, n, k, &two) != end) abort();
    if (buf_size(&whole) != buf_size(&two) || memcmp(bdata(&whole), bdata(&two), buf_size(&whole)))
        abort();
    buf_free(&whole);
    buf_free(&two);
    if (n <= 4096) check_writer(in, n);
    resp_arena_free(&arena);
    return 0;
}
