/* test_conn.c — the connection layer on real sockets (socketpairs): the
 * buffer pool, conn_sendv's one-writev path and its queueing of what the
 * socket does not take (order kept), conn_fill's short-read rule, trim. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include <cmocka.h>
#include <event2/event.h>

#include "idemgate/core/buf.h"
#include "idemgate/net/conn.h"

struct fx {
    struct event_base *base;
    struct buf_pool pool;
    struct conn c;
    int peer;
};

static void noop_cb(struct conn *c, short what, void *arg)
{
    (void)c;
    (void)what;
    (void)arg;
}

static int setup(void **state)
{
    struct fx *fx = calloc(1, sizeof(*fx));
    int sv[2];
    assert_int_equal(socketpair(AF_UNIX, SOCK_STREAM, 0, sv), 0);
    assert_int_equal(conn_set_nonblock(sv[0]), 0);
    assert_int_equal(conn_set_nonblock(sv[1]), 0);
    int small = 4096;
    setsockopt(sv[0], SOL_SOCKET, SO_SNDBUF, &small, sizeof(small));
    setsockopt(sv[1], SOL_SOCKET, SO_RCVBUF, &small, sizeof(small));
    fx->base = event_base_new();
    buf_pool_init(&fx->pool, 16384, 4);
    assert_int_equal(conn_open(&fx->c, fx->base, sv[0], noop_cb, NULL), 0);
    fx->c.pool = &fx->pool;
    fx->peer = sv[1];
    *state = fx;
    return 0;
}

static int teardown(void **state)
{
    struct fx *fx = *state;
    conn_close(&fx->c);
    close(fx->peer);
    buf_pool_free(&fx->pool);
    event_base_free(fx->base);
    free(fx);
    return 0;
}

/* Reads everything the peer can get within the loop's reach. */
static size_t drain(int fd, char *out, size_t cap)
{
    size_t got = 0;
    for (;;) {
        ssize_t n = read(fd, out + got, cap - got);
        if (n <= 0) break;
        got += (size_t)n;
    }
    return got;
}

static void test_pool_take_release(void **state)
{
    (void)state;
    struct buf_pool bp;
    buf_pool_init(&bp, 1024, 2);
    struct buf a, b, c;
    buf_init(&a);
    buf_init(&b);
    buf_init(&c);
    buf_take(&a, &bp);
    buf_take(&b, &bp);
    assert_non_null(a.p);
    assert_int_equal(a.cap, 1024);
    char *pa = a.p;
    buf_append(&a, "x", 1);
    buf_release(&a, &bp); /* not empty: kept */
    assert_ptr_equal(a.p, pa);
    buf_consume(&a, 1);
    buf_release(&a, &bp); /* empty: back to the pool */
    assert_null(a.p);
    assert_int_equal(bp.n, 1);
    buf_take(&c, &bp); /* reused, no malloc */
    assert_ptr_equal(c.p, pa);
    /* a buffer that grew past the pool's size is freed, not pooled */
    buf_append(&b, "y", 1);
    buf_reserve(&b, 4096);
    buf_consume(&b, 1);
    buf_release(&b, &bp);
    assert_null(b.p);
    assert_int_equal(bp.n, 0);
    buf_release(&c, &bp);
    buf_pool_free(&bp);
}

static void test_sendv_one_write(void **state)
{
    struct fx *fx = *state;
    buf_append_str(conn_outbuf(&fx->c), "HEAD|");
    struct iovec iov[2] = {{"body1|", 6}, {"body2", 5}};
    assert_int_equal(conn_sendv(&fx->c, iov, 2), 1);
    assert_int_equal(buf_size(&fx->c.out), 0);
    char got[64];
    size_t n = drain(fx->peer, got, sizeof(got));
    assert_int_equal(n, 16);
    assert_memory_equal(got, "HEAD|body1|body2", 16);
}

static void test_sendv_queues_rest_in_order(void **state)
{
    struct fx *fx = *state;
    size_t big = 1 << 20;
    char *body = malloc(big);
    for (size_t i = 0; i < big; i++)
        body[i] = (char)(i * 7 + 3);
    buf_append_str(conn_outbuf(&fx->c), "H:");
    struct iovec iov = {body, big};
    int r = conn_sendv(&fx->c, &iov, 1);
    assert_int_equal(r, 0); /* the socket cannot take 1 MiB at once */
    assert_false(fx->c.wr_ready);
    size_t queued = buf_size(&fx->c.out);
    assert_true(queued > 0 && queued <= big + 2);
    /* The caller's bytes are no longer needed: scribble over them. */
    memset(body, 0, big);
    char *got = malloc(big + 2);
    size_t have = 0;
    while (have < big + 2) {
        have += drain(fx->peer, got + have, big + 2 - have);
        fx->c.wr_ready = true;
        assert_true(conn_flush(&fx->c) >= 0);
    }
    assert_memory_equal(got, "H:", 2);
    for (size_t i = 0; i < big; i++)
        if (got[2 + i] != (char)(i * 7 + 3)) fail_msg("byte %zu differs", i);
    free(got);
    free(body);
}

static void test_fill_and_trim(void **state)
{
    struct fx *fx = *state;
    assert_int_equal(write(fx->peer, "hello", 5), 5);
    fx->c.rd_ready = true;
    assert_int_equal(conn_fill(&fx->c, 1 << 20), 5);
    /* a short read drained the socket: no extra read for EAGAIN */
    assert_false(fx->c.rd_ready);
    assert_int_equal(fx->c.in.cap, 16384); /* from the pool */
    conn_trim(&fx->c);                     /* not empty: kept */
    assert_non_null(fx->c.in.p);
    buf_consume(&fx->c.in, 5);
    conn_trim(&fx->c);
    assert_null(fx->c.in.p);
    assert_int_equal(fx->pool.n, 1);
    close(fx->peer);
    fx->peer = -1;
    fx->c.rd_ready = true;
    assert_int_equal(conn_fill(&fx->c, 1 << 20), 0);
    assert_true(fx->c.eof);
}

static void test_sendv_after_error(void **state)
{
    struct fx *fx = *state;
    close(fx->peer);
    fx->peer = -1;
    struct iovec iov = {"x", 1};
    int r = 0;
    for (int i = 0; i < 3 && r >= 0; i++)
        r = conn_sendv(&fx->c, &iov, 1);
    assert_int_equal(r, -1);
    assert_true(fx->c.err != 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_pool_take_release),
        cmocka_unit_test_setup_teardown(test_sendv_one_write, setup, teardown),
        cmocka_unit_test_setup_teardown(test_sendv_queues_rest_in_order, setup, teardown),
        cmocka_unit_test_setup_teardown(test_fill_and_trim, setup, teardown),
        cmocka_unit_test_setup_teardown(test_sendv_after_error, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
