/* resp.h — RESP2 replies in, commands out; private to src/store/redis/
 * (next to redis_internal.h for the same reason: nothing outside the Redis
 * store may use it).
 *
 * Parsing is zero-copy and stateless:
 *  - a reply's strings point into the caller's input bytes (never
 *    NUL-terminated: use len), so they stay valid only until the caller
 *    consumes or moves those bytes (buf_consume, buf_compact, any append
 *    to the buf that may realloc);
 *  - reply nodes (the root and every array's elements, contiguous) live in
 *    a struct resp_arena the caller keeps, one per connection: up to
 *    RESP_ARENA_INLINE nodes inline (no malloc for a bulk string, nil, an
 *    integer, a ROLE / sentinel / pub/sub answer), larger replies (a big
 *    CLUSTER SLOTS) take heap chunks that the next resp_parse on the arena
 *    frees. A reply is valid until the next resp_parse or
 *    resp_arena_free on its arena;
 *  - resp_parse keeps no state between calls: with too few bytes it
 *    returns 0, and the caller calls it again on the same bytes plus more.
 *    a->need then tells how many bytes (counted from p) the reply needs at
 *    least, so a caller holding a large bulk string in pieces need not
 *    re-parse before that many have arrived.
 *
 * Only RESP2 (+ - : $ *, $-1 and *-1 as nil): any other type byte, RESP3
 * included, is a protocol error (we never send HELLO 3). Limits like
 * Redis's: bulk strings up to RESP_MAX_BULK bytes, arrays up to
 * RESP_MAX_ELEMENTS elements, arrays nested at most RESP_MAX_DEPTH deep,
 * status / error lines up to RESP_MAX_LINE bytes, integers within long
 * long. Out of memory aborts (like buf). */
#ifndef IDEMGATE_STORE_REDIS_RESP_H
#define IDEMGATE_STORE_REDIS_RESP_H

#include <stddef.h>

#include "idemgate/core/buf.h"

#define RESP_MAX_BULK (512LL * 1024 * 1024)
#define RESP_MAX_ELEMENTS (1024LL * 1024)
#define RESP_MAX_DEPTH 7 /* "*1\r\n" seven times then a scalar is the deepest */
#define RESP_MAX_LINE (64 * 1024)
#define RESP_ARENA_INLINE 32

enum rreply_type {
    RREPLY_STRING = 1, /* $ bulk string: str, len (binary-safe) */
    RREPLY_STATUS,     /* + simple string: str, len */
    RREPLY_ERROR,      /* - error: str, len ("MOVED 3999 10.0.0.1:6381") */
    RREPLY_INTEGER,    /* : integer */
    RREPLY_NIL,        /* $-1 or *-1 */
    RREPLY_ARRAY,      /* * array: element[0 .. elements) */
};

struct rreply {
    enum rreply_type type;
    long long integer;
    const char *str; /* into the input; NULL for NIL, INTEGER, ARRAY */
    size_t len;
    size_t elements;
    struct rreply *element; /* contiguous, in the arena; NULL when elements == 0 */
};

struct resp_chunk;

struct resp_arena {
    size_t need; /* after resp_parse returned 0: a lower bound on n (> n) */
    /* private */
    struct rreply *cur; /* the chunk being filled: inline or the newest heap one */
    size_t used, cap;
    struct resp_chunk *heap;
    struct rreply inline_nodes[RESP_ARENA_INLINE];
};

void resp_arena_init(struct resp_arena *a);
/* Frees the heap chunks; the arena may be reused (no resp_arena_init). */
void resp_arena_free(struct resp_arena *a);

/* Parses one reply from p[0 .. n). Returns 1 with *out (in a) and
 * *consumed (the reply's bytes, <= n); 0 when p holds only the start of a
 * reply (nothing consumed; see a->need); -1 on a protocol error (the
 * connection cannot be used any more). Never reads past p + n. */
int resp_parse(const char *p, size_t n, struct resp_arena *a, struct rreply **out,
               size_t *consumed);

/* Bytes resp_append_command writes for these arguments. lens may be NULL
 * (then every argv[i] is a C string). */
size_t resp_command_len(int argc, const char **argv, const size_t *lens);
/* Appends the command as an array of bulk strings (*argc\r\n then
 * $len\r\narg\r\n per argument), in one buf_reserve. lens may be NULL. */
void resp_append_command(struct buf *out, int argc, const char **argv, const size_t *lens);

#endif
