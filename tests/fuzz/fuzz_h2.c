/* fuzz_h2.c — libFuzzer driver for the HTTP/2 server side (proxy/h2.c),
 * entered as in production: a plain connection accepted by client.c that
 * opens with the HTTP/2 preface. The whole proxy runs on one event base in
 * this thread: client, exchanges, the memory store, the upstream pools,
 * and a small in-process HTTP/1.1 upstream that answers on loopback.
 *
 * Input: the bytes a client sends after the preface (the harness writes
 * the preface itself). SETTLE and DRAIN cut the input into turns: each
 * turn is written, then the loop runs until the proxy is quiet (every
 * exchange ended, or nothing but timers left to wait for), so a later
 * turn can act on answers already under way (a WINDOW_UPDATE for a paused
 * stream, a RST_STREAM of a stream its upstream is answering); after
 * DRAIN the loop drains as on SIGTERM before the next turn. Whatever the
 * proxy writes back is read and dropped (it never blocks on a full
 * socket; FUZZ_H2_DUMP=path keeps a copy, FUZZ_H2_LOG=1 turns on debug
 * logs, access lines and the request heads the upstream gets). After the
 * last turn the client half-closes and the loop runs until the client,
 * every exchange and every upstream connection are gone; anything left
 * after HANG_MS is a hang and aborts. Not covered: the idle timeout
 * (client_timeout_ms is 1 s: too slow per input), TLS and ALPN.
 *
 * The upstream picks its answer from the request target it sees: "big"
 * (UP_BIG bytes: past a stream's window, two relay fills and
 * H2_STREAM_HIGH, so the exchange pauses), "chunk", "500", "204", "close"
 * (close-delimited), "cut" (shorter than its Content-Length), "none"
 * (closes unanswered), "bad" (not HTTP), "many" (120 headers), "slow"
 * (never answers: upstream_timeout_ms); else a small 200. Every answer
 * closes its connection. Routes: /w waits for a concurrent owner, /k
 * keeps lost and 5xx answers (and caches at most 1 KiB), /p has
 * idempotency off, /down goes to a closed port.
 *
 * Checked after every input: no client, no exchange, no open upstream
 * connection left; the connection counter and every client/exchange
 * gauge back to 0; no lock left in the memory store; the proxy's first
 * bytes are a SETTINGS frame; once the loop is freed, no event is left
 * on the base but the upstream's listener. Each input runs on a fresh
 * loop and a fresh memory store (replays within an input, none across
 * inputs); the configuration generation and the base are made once. */
#include <errno.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <event2/event.h>

#include "idemgate/config/config.h"
#include "idemgate/core/log.h"
#include "idemgate/core/metrics.h"
#include "idemgate/net/tls.h"
#include "idemgate/idem/engine.h"
#include "idemgate/proxy/client.h"
#include "idemgate/proxy/exchange.h"
#include "idemgate/proxy/gen.h"
#include "idemgate/proxy/loop.h"
#include "idemgate/proxy/upstream.h"
#include "idemgate/store/store.h"

#include "fuzz_check.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* Separate the turns of the input (both in h2.dict): after SETTLE the
 * next turn follows; after DRAIN the loop drains first (SIGTERM: GOAWAY,
 * open streams finish, then the connection closes). */
#define SETTLE "~~settle~~"
#define DRAIN "~~drain~~"
/* How long a turn may wait on timers for the exchanges to end while the
 * client is still connected. Below upstream_timeout_ms, so that a stream
 * stalled on the client's window is still there in the next turn. */
#define SETTLE_WAIT_MS 20
/* After the client half-closed: everything must be gone by then. */
#define HANG_MS 10000

static const char preface[] = "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

static struct event_base *base;
static struct gen *gen;
static struct event *wake; /* bounds a wait for the next timer */
static bool loud;          /* FUZZ_H2_LOG */
static FILE *dump;         /* FUZZ_H2_DUMP=path: the proxy's bytes, for a look at them */
static atomic_int connections;

static uint64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

static void wake_up(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    (void)arg;
}

/* ------------------------------------------------------------ upstream */

#define UP_IN_MAX 16384
/* Past two fills of the relay (UPSTREAM_FILL) and H2_STREAM_HIGH: the
 * exchange pauses its upstream read while the client's window is shut. */
#define UP_BIG 700000

struct up_conn {
    int fd;
    struct event *ev;
    char in[UP_IN_MAX];
    size_t in_n;
    bool answered; /* the head was seen and the answer chosen */
    bool shut;     /* the answer is written and our side shut */
    bool slow;     /* never answers */
    char *out;
    size_t out_n, out_off;
};

static int up_listen_fd = -1;
static struct event *up_listen_ev;
static int up_port;
static unsigned up_open; /* upstream connections open on our side */
static uint64_t up_progress;

static void up_close(struct up_conn *u)
{
    event_free(u->ev);
    close(u->fd);
    free(u->out);
    free(u);
    up_open--;
    up_progress++;
}

static void up_set_answer(struct up_conn *u, const char *head, const char *body, size_t body_n)
{
    size_t hn = strlen(head);
    u->out = malloc(hn + body_n + 1);
    if (!u->out) abort();
    memcpy(u->out, head, hn);
    if (body_n) memcpy(u->out + hn, body, body_n);
    u->out_n = hn + body_n;
}

static void up_text(struct up_conn *u, const char *head, const char *body, bool with_body)
{
    up_set_answer(u, head, body, with_body ? strlen(body) : 0);
}

/* The request head is in: what the target asks for. Returns false when
 * the connection was closed (the "none" answer). */
static bool up_answer(struct up_conn *u)
{
    char *sp = memchr(u->in, ' ', u->in_n);
    char *eol = memchr(u->in, '\r', u->in_n);
    bool head_req = u->in_n >= 5 && memcmp(u->in, "HEAD ", 5) == 0;
    char target[256] = "";
    if (sp && eol && eol > sp) {
        size_t n = (size_t)(eol - sp - 1);
        if (n >= sizeof(target)) n = sizeof(target) - 1;
        memcpy(target, sp + 1, n);
        target[n] = '\0';
    }
    u->answered = true;
    if (loud) {
        const char *end = memmem(u->in, u->in_n, "\r\n\r\n", 4);
        fprintf(stderr, "upstream got:\n%.*s\n", (int)(end - u->in), u->in);
    }
    if (strstr(target, "none")) {
        up_close(u);
        return false;
    }
    if (strstr(target, "slow")) {
        u->slow = true;
        return true;
    }
    if (strstr(target, "big")) {
        char *body = malloc(UP_BIG);
        if (!body) abort();
        memset(body, 'x', UP_BIG);
        char head[160];
        snprintf(head, sizeof(head),
                 "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                 "Content-Length: %d\r\nConnection: close\r\n\r\n",
                 UP_BIG);
        up_set_answer(u, head, body, head_req ? 0 : UP_BIG);
        free(body);
    } else if (strstr(target, "chunk")) {
        up_text(u,
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n"
                "Trailer: X-T\r\n\r\n",
                "5\r\nhello\r\n1;ext=1\r\n!\r\n0\r\nX-T: 1\r\n\r\n", !head_req);
    } else if (strstr(target, "500")) {
        up_text(u,
                "HTTP/1.1 500 Internal Server Error\r\nContent-Length: 4\r\n"
                "Connection: close\r\n\r\n",
                "fail", !head_req);
    } else if (strstr(target, "204")) {
        up_text(u, "HTTP/1.1 204 No Content\r\nX-Up: 204\r\nConnection: close\r\n\r\n", "", false);
    } else if (strstr(target, "close")) {
        up_text(u, "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n", "until the end",
                !head_req);
    } else if (strstr(target, "cut")) {
        up_text(u, "HTTP/1.1 200 OK\r\nContent-Length: 100\r\nConnection: close\r\n\r\n",
                "0123456789", true);
    } else if (strstr(target, "bad")) {
        up_text(u, "HTTP/1.1 abc\r\n\r\n", "", false);
    } else if (strstr(target, "many")) {
        char head[8192];
        size_t n = (size_t)snprintf(head, sizeof(head), "HTTP/1.1 200 OK\r\n");
        for (int i = 0; i < 120; i++)
            n += (size_t)snprintf(head + n, sizeof(head) - n, "X-H%d: v%d\r\n", i, i);
        snprintf(head + n, sizeof(head) - n, "Content-Length: 2\r\nConnection: close\r\n\r\n");
        up_text(u, head, "ok", !head_req);
    } else {
        up_text(u,
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 3\r\n"
                "Set-Cookie: a=b\r\nX-Up: 1\r\nKeep-Alive: timeout=5\r\n"
                "Connection: close\r\n\r\n",
                "ok\n", !head_req);
    }
    return true;
}

static void up_event(evutil_socket_t fd, short what, void *arg)
{
    (void)what;
    struct up_conn *u = arg;
    /* read: the request (kept up to UP_IN_MAX; the rest dropped) */
    for (;;) {
        char tmp[16384];
        ssize_t n = read(fd, tmp, sizeof(tmp));
        if (n > 0) {
            up_progress++;
            size_t k = (size_t)n;
            if (k > UP_IN_MAX - u->in_n) k = UP_IN_MAX - u->in_n;
            memcpy(u->in + u->in_n, tmp, k);
            u->in_n += k;
            continue;
        }
        if (n == 0 || (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)) {
            up_close(u); /* the proxy closed (or reset) its side */
            return;
        }
        if (errno == EAGAIN || errno == EWOULDBLOCK) break;
    }
    if (!u->answered && memmem(u->in, u->in_n, "\r\n\r\n", 4) && !up_answer(u)) return;
    /* write: the answer, then our side is shut (every answer closes) */
    while (u->out && u->out_off < u->out_n) {
        ssize_t n = send(fd, u->out + u->out_off, u->out_n - u->out_off, MSG_NOSIGNAL);
        if (n > 0) {
            up_progress++;
            u->out_off += (size_t)n;
        } else if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            return;
        } else if (n < 0 && errno == EINTR) {
            continue;
        } else {
            up_close(u);
            return;
        }
    }
    if (u->out && !u->shut) {
        u->shut = true;
        shutdown(fd, SHUT_WR);
    }
}

static void up_accept(evutil_socket_t lfd, short what, void *arg)
{
    (void)what;
    (void)arg;
    for (;;) {
        int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) return;
        struct up_conn *u = calloc(1, sizeof(*u));
        if (!u) abort();
        u->fd = fd;
        u->ev = event_new(base, fd, EV_READ | EV_WRITE | EV_PERSIST | EV_ET, up_event, u);
        if (!u->ev || event_add(u->ev, NULL) < 0) abort();
        up_open++;
        up_progress++;
    }
}

static void up_start(void)
{
    up_listen_fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    CHECK(up_listen_fd >= 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t al = sizeof(a);
    CHECK(bind(up_listen_fd, (struct sockaddr *)&a, sizeof(a)) == 0);
    CHECK(listen(up_listen_fd, 1024) == 0);
    CHECK(getsockname(up_listen_fd, (struct sockaddr *)&a, &al) == 0);
    up_port = ntohs(a.sin_port);
    up_listen_ev = event_new(base, up_listen_fd, EV_READ | EV_PERSIST, up_accept, NULL);
    CHECK(up_listen_ev && event_add(up_listen_ev, NULL) == 0);
}

/* ---------------------------------------------------------------- setup */

static void setup(void)
{
    signal(SIGPIPE, SIG_IGN);
    struct event_config *ec = event_config_new();
    event_config_set_flag(ec, EVENT_BASE_FLAG_NOLOCK);
    event_config_set_flag(ec, EVENT_BASE_FLAG_EPOLL_USE_CHANGELIST);
    base = event_base_new_with_config(ec);
    event_config_free(ec);
    CHECK(base);
    wake = evtimer_new(base, wake_up, NULL);
    CHECK(wake);
    up_start();

    /* FUZZ_H2_LOG=1: debug logs and access lines, to see what an input does */
    const char *verbose = getenv("FUZZ_H2_LOG");
    loud = verbose && *verbose && strcmp(verbose, "0") != 0;
    char json[2048];
    snprintf(json, sizeof(json),
             "{\"store\": \"memory\", \"workers\": 1, \"upstream\": \"http://127.0.0.1:%d\","
             " \"admin\": {\"listen\": \"off\"},"
             " \"log\": {\"level\": \"%s\", \"access\": %s},"
             " \"limits\": {\"client_timeout_ms\": 1000, \"upstream_connect_timeout_ms\": 50,"
             "  \"upstream_timeout_ms\": 100, \"max_header_bytes\": 1024,"
             "  \"max_request_body_bytes\": 4096},"
             " \"http2\": {\"max_concurrent_streams\": 8, \"max_resets_per_second\": 16},"
             " \"idempotency\": {\"methods\": [\"POST\", \"PATCH\", \"PUT\"]},"
             " \"routes\": ["
             "  {\"prefix\": \"/w\", \"idempotency\": {\"concurrent\": \"wait\","
             "   \"wait_max_ms\": 100}},"
             "  {\"prefix\": \"/k\", \"idempotency\": {\"unknown_outcome\": \"keep\","
             "   \"cache_5xx\": true, \"max_cached_response_bytes\": 1024}},"
             "  {\"prefix\": \"/p\", \"idempotency\": {\"enabled\": false}},"
             "  {\"prefix\": \"/down\", \"upstream\": \"http://127.0.0.1:9\"}]}",
             up_port, loud ? "debug" : "error", loud ? "true" : "false");
    /* A generation as gen_load makes one, from the JSON text (no file, no
     * environment). */
    char err[512];
    gen = calloc(1, sizeof(*gen));
    CHECK(gen);
    if (cfg_load_json(&gen->cfg, json, strlen(json), false, NULL, err, sizeof(err)) != 0) {
        fprintf(stderr, "fuzz_h2: %s\n", err);
        abort();
    }
    gen->tls = tls_set_new(&gen->cfg, err, sizeof(err));
    CHECK(gen->tls);
    gen->upstreams = upstream_registry_new(&gen->cfg, NULL);
    gen->id = 1;
    atomic_init(&gen->refs, 1);
    gen_publish(gen);
    log_set_level((enum log_level)gen->cfg.log_level);
    atomic_init(&connections, 0);
    const char *path = getenv("FUZZ_H2_DUMP");
    if (path && *path) {
        dump = fopen(path, "wb");
        CHECK(dump);
    }
}

/* --------------------------------------------------------------- a run */

struct run {
    int fd; /* the client's end */
    struct loop *loop;
    uint64_t got; /* bytes the proxy wrote */
    unsigned char first[9];
    bool peer_closed;
};

/* Reads (and drops) what the proxy wrote; returns the bytes read. */
static size_t read_back(struct run *r)
{
    size_t total = 0;
    if (r->fd < 0 || r->peer_closed) return 0;
    for (;;) {
        unsigned char tmp[65536];
        ssize_t n = recv(r->fd, tmp, sizeof(tmp), MSG_DONTWAIT);
        if (n > 0) {
            for (size_t i = 0; i < (size_t)n && r->got + i < sizeof(r->first); i++)
                r->first[r->got + i] = tmp[i];
            r->got += (uint64_t)n;
            total += (size_t)n;
            if (dump) fwrite(tmp, 1, (size_t)n, dump);
            continue;
        }
        if (n == 0 || (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR))
            r->peer_closed = true;
        if (n < 0 && errno == EINTR) continue;
        return total;
    }
}

/* What moved since the last look: bytes either way, objects coming and
 * going. */
struct snap {
    uint64_t got, up;
    unsigned exchanges, clients;
};

static struct snap snap_of(const struct run *r)
{
    struct snap s = {r->got, up_progress, r->loop->n_exchanges, 0};
    struct client *cl;
    TAILQ_FOREACH (cl, &r->loop->clients, link)
        s.clients++;
    return s;
}

static bool snap_same(struct snap a, struct snap b)
{
    return a.got == b.got && a.up == b.up && a.exchanges == b.exchanges && a.clients == b.clients;
}

/* One turn of the loop: runs what is ready, reads the proxy's output. */
static void turn(struct run *r, int flags)
{
    event_base_loop(base, flags);
    read_back(r);
}

/* Runs the loop without waiting until nothing moves; then, while done()
 * is false, waits for the next timer (EVLOOP_ONCE: an upstream timeout, a
 * wait poll, the store's tick...) and goes on, for up to max_ms. */
static bool settle(struct run *r, bool (*done)(const struct run *), uint64_t max_ms)
{
    uint64_t until = now_ms() + max_ms;
    int still = 0;
    struct snap last = snap_of(r);
    for (;;) {
        turn(r, EVLOOP_NONBLOCK);
        struct snap s = snap_of(r);
        if (!snap_same(s, last)) {
            last = s;
            still = 0;
            continue;
        }
        if (++still < 8) continue;
        if (done(r)) return true;
        uint64_t now = now_ms();
        if (now >= until) return false;
        struct timeval tv = {(time_t)((until - now) / 1000),
                             (suseconds_t)((until - now) % 1000) * 1000};
        evtimer_add(wake, &tv);
        turn(r, EVLOOP_ONCE);
        evtimer_del(wake);
        last = snap_of(r);
        still = 0;
    }
}

static bool no_exchange(const struct run *r)
{
    return r->loop->n_exchanges == 0 || TAILQ_EMPTY(&r->loop->clients);
}

static bool all_gone(const struct run *r)
{
    return TAILQ_EMPTY(&r->loop->clients) && r->loop->n_exchanges == 0 && up_open == 0;
}

/* Writes p[0..n) to the proxy, running the loop whenever the socket is
 * full. Stops early when the proxy closed the connection. */
static void send_all(struct run *r, const uint8_t *p, size_t n)
{
    size_t off = 0;
    int stuck = 0;
    while (off < n) {
        ssize_t w = send(r->fd, p + off, n - off, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (w > 0) {
            off += (size_t)w;
            stuck = 0;
            continue;
        }
        if (w < 0 && errno == EINTR) continue;
        if (w < 0 && errno != EAGAIN && errno != EWOULDBLOCK) return; /* EPIPE: it closed */
        /* full: let the proxy read */
        struct snap before = snap_of(r);
        turn(r, EVLOOP_NONBLOCK);
        if (TAILQ_EMPTY(&r->loop->clients)) return;
        if (snap_same(before, snap_of(r)) && ++stuck > 1000)
            return; /* the proxy stopped reading: the rest is dropped */
    }
}

static void check_gauges(void)
{
    CHECK(metrics_value(M_CONNECTIONS_ACTIVE, 0) == 0);
    for (int s = 0; s < CLIENT__COUNT; s++)
        CHECK(metrics_value(M_CLIENT_CONNECTIONS, s) == 0);
    for (int s = 0; s < IDEM__COUNT; s++)
        CHECK(metrics_value(M_EXCHANGES, s) == 0);
    for (int s = 0; s < EX__COUNT; s++)
        CHECK(metrics_value(M_EXCHANGES_UPSTREAM, s) == 0);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (!base) setup();

    const struct cfg *cfg = &gen->cfg;
    struct store_memory_shared *mem = store_memory_shared_new_bounded(
        cfg->redis.key_prefix, cfg->memory_max_bytes, cfg->memory_max_scope_bytes);
    struct loop loop;
    memset(&loop, 0, sizeof(loop));
    loop_init(&loop, 0, 0x5eed, gen, base, mem, NULL, &connections);

    int fds[2];
    CHECK(socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, fds) == 0);
    atomic_fetch_add(&connections, 1); /* as the worker counts it before client_accept */
    client_accept(&loop, fds[0], "127.0.0.1");
    struct run r = {.fd = fds[1], .loop = &loop};

    send_all(&r, (const uint8_t *)preface, sizeof(preface) - 1);
    /* the turns */
    const uint8_t *p = data, *end = data + size;
    for (;;) {
        const uint8_t *settle_at = memmem(p, (size_t)(end - p), SETTLE, strlen(SETTLE));
        const uint8_t *drain_at = memmem(p, (size_t)(end - p), DRAIN, strlen(DRAIN));
        bool drain_next = drain_at && (!settle_at || drain_at < settle_at);
        const uint8_t *cut = drain_next ? drain_at : settle_at;
        send_all(&r, p, (size_t)((cut ? cut : end) - p));
        settle(&r, no_exchange, SETTLE_WAIT_MS);
        if (!cut || TAILQ_EMPTY(&loop.clients)) break;
        if (drain_next && !loop.draining) { /* as worker_stop does */
            loop.draining = true;
            for (struct client *cl = TAILQ_FIRST(&loop.clients), *next; cl; cl = next) {
                next = TAILQ_NEXT(cl, link);
                client_drain(cl);
            }
            settle(&r, no_exchange, SETTLE_WAIT_MS);
        }
        p = cut + strlen(drain_next ? DRAIN : SETTLE);
    }
    /* the client is done: half-close, then everything must end by itself */
    shutdown(r.fd, SHUT_WR);
    if (!settle(&r, all_gone, HANG_MS)) {
        fprintf(stderr,
                "fuzz_h2: hang: %s client, %u exchange(s), %u upstream connection(s) "
                "after %d ms\n",
                TAILQ_EMPTY(&loop.clients) ? "no" : "a", loop.n_exchanges, up_open, HANG_MS);
        abort();
    }
    close(r.fd);
    if (dump) fflush(dump);

    CHECK(TAILQ_EMPTY(&loop.clients));
    CHECK(loop.n_exchanges == 0);
    CHECK(atomic_load(&connections) == 0);
    check_gauges();
    /* the server's connection preface comes first (RFC 9113 3.4) */
    if (r.got >= 9)
        CHECK(r.first[3] == 0x4 && r.first[4] == 0 && r.first[5] == 0 && r.first[6] == 0 &&
              r.first[7] == 0 && r.first[8] == 0);
    /* every lock was completed or released */
    struct store_memory_stats st;
    store_memory_shared_stats(mem, &st);
    CHECK(st.locks == 0);

    loop_free(&loop);
    store_memory_shared_free(mem);
    /* whatever the loop freed has left the base: only our listener is on it */
    CHECK(event_base_get_num_events(base, EVENT_BASE_COUNT_ADDED) == 1);
    CHECK(event_base_get_num_events(base, EVENT_BASE_COUNT_ACTIVE) == 0);
    return 0;
}
