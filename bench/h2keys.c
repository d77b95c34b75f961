/* h2keys.c — a small HTTP/2 load generator for bench/run's `h2-first`
 * scenario: like h2load (h2c with prior knowledge, C connections, M
 * concurrent streams on each, closed loop), but every request carries a
 * new Idempotency-Key (PREFIX-1, PREFIX-2, ...), which h2load cannot do (its
 * headers are fixed for a run). Not a test. bench/run compiles it into its
 * temp dir (cc -O2 bench/h2keys.c -lnghttp2; Debian libnghttp2-dev):
 *
 *   h2keys -c 50 -m 10 -D 3 -d body.json -H 'content-type: application/json' \
 *          -k PREFIX -l log.tsv http://127.0.0.1:8080/v1/orders
 *
 *   -c N      connections (default 1)
 *   -m N      concurrent streams per connection (default 1)
 *   -D SECS   run for SECS seconds, counting the responses completed by then
 *             (requests still in flight at the end are not counted, as h2load
 *             -D); or
 *   -n N      send N requests in all and wait for every answer
 *   -d FILE   POST the file as the body (content-length set); else GET
 *   -H 'name: value'  one more request header (repeatable)
 *   -k PREFIX an Idempotency-Key per request, PREFIX-<counter> (the counter
 *             is global, from 1); sent as a literal never indexed (HPACK):
 *             it never repeats
 *   -K NAME   the key header's name (default idempotency-key)
 *   -l FILE   one line per finished request in h2load's --log-file format:
 *             start (µs since the epoch) TAB status (-1: failed) TAB µs
 *             until the end of the response; written at the end
 *
 * Settings as h2load's defaults: stream and connection windows 2^30-1, no
 * push. A connection that the server ends (GOAWAY, close) is replaced; a
 * stream it refused (REFUSED_STREAM: never processed) is not counted, and
 * another request takes its place. Prints one line, `H2KEYS {json}`:
 * requests (finished in the measured time, failed ones included),
 * succeeded (2xx), status classes, failed (reset or lost), bytes read,
 * duration, req/s (answered, any status), reconnects, refused. Exit 1 on
 * a usage error, when connections end before any HTTP/2 frame (10 per
 * connection), or when nothing finished for 10 s. One thread, epoll,
 * level-triggered. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <nghttp2/nghttp2.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_HEADERS 16

struct conn;

struct slot {
    struct conn *c;
    uint64_t t0_ns;   /* monotonic, at submit */
    uint64_t wall_us; /* the epoch, at submit (for the log) */
    int status;
    size_t off; /* body bytes sent */
    int used;
};

struct conn {
    int fd;
    nghttp2_session *s;
    struct slot *slots;
    int inflight;
    int goaway;
    int dead;
    int pollout;
    int got; /* an HTTP/2 frame received */
    uint8_t *wbuf;
    size_t wlen, woff, wcap;
};

struct rec {
    uint64_t start_us;
    int32_t status;
    uint32_t dur_us;
};

static struct {
    int conns, streams;
    double duration_s; /* -D */
    long total;        /* -n */
    const char *body;
    size_t body_len;
    char clen[24];
    nghttp2_nv extra[MAX_HEADERS];
    int nextra;
    const char *key_prefix, *key_name;
    const char *logfile;
    char authority[300], path[4096];
    struct sockaddr_in addr;
} cfg = {.conns = 1, .streams = 1, .key_name = "idempotency-key"};

static struct {
    int ep;
    struct conn *conns;
    int running; /* still submitting */
    int counting;
    long submitted, finished;
    long st[6]; /* by status class: [0] other, [2] 2xx ... [5] 5xx */
    long failed, reconnects, connect_errors, refused;
    int stalled;
    uint64_t bytes;
    uint64_t key_counter;
    struct rec *recs;
    size_t nrecs, caprecs;
} g;

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static uint64_t wall_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u;
}

static void die(const char *msg)
{
    fprintf(stderr, "h2keys: %s\n", msg);
    exit(1);
}

static void record(struct slot *sl, int status)
{
    if (!g.counting) return;
    g.finished++;
    if (status < 0)
        g.failed++;
    else
        g.st[status >= 200 && status < 600 ? status / 100 : 0]++;
    if (g.nrecs == g.caprecs) {
        g.caprecs = g.caprecs ? g.caprecs * 2 : 65536;
        g.recs = realloc(g.recs, g.caprecs * sizeof(*g.recs));
        if (!g.recs) die("out of memory");
    }
    g.recs[g.nrecs++] =
        (struct rec){sl->wall_us, status, (uint32_t)((now_ns() - sl->t0_ns) / 1000)};
}

/* ---- nghttp2 callbacks */

static ssize_t on_send(nghttp2_session *s, const uint8_t *data, size_t len, int flags, void *ud)
{
    struct conn *c = ud;
    (void)s;
    (void)flags;
    if (c->wlen + len > c->wcap) {
        size_t cap = c->wcap ? c->wcap : 16384;
        while (cap < c->wlen + len)
            cap *= 2;
        c->wbuf = realloc(c->wbuf, cap);
        if (!c->wbuf) die("out of memory");
        c->wcap = cap;
    }
    memcpy(c->wbuf + c->wlen, data, len);
    c->wlen += len;
    return (ssize_t)len;
}

static int on_header(nghttp2_session *s, const nghttp2_frame *f, const uint8_t *name, size_t nlen,
                     const uint8_t *value, size_t vlen, uint8_t flags, void *ud)
{
    (void)flags;
    (void)ud;
    if (f->hd.type != NGHTTP2_HEADERS || nlen != 7 || memcmp(name, ":status", 7) != 0) return 0;
    struct slot *sl = nghttp2_session_get_stream_user_data(s, f->hd.stream_id);
    if (sl && vlen == 3)
        sl->status = (value[0] - '0') * 100 + (value[1] - '0') * 10 + (value[2] - '0');
    return 0;
}

static int on_frame_recv(nghttp2_session *s, const nghttp2_frame *f, void *ud)
{
    (void)s;
    struct conn *c = ud;
    c->got = 1;
    if (f->hd.type == NGHTTP2_GOAWAY) c->goaway = 1;
    return 0;
}

static int on_stream_close(nghttp2_session *s, int32_t id, uint32_t err, void *ud)
{
    struct conn *c = ud;
    struct slot *sl = nghttp2_session_get_stream_user_data(s, id);
    if (!sl || !sl->used) return 0; /* already counted (the connection was reset) */
    if (err == NGHTTP2_REFUSED_STREAM) {
        /* Never processed (beyond a GOAWAY's last stream, or above the
         * server's stream limit): not a request; another takes its place. */
        g.refused++;
        g.submitted--;
    } else {
        record(sl, err == NGHTTP2_NO_ERROR && sl->status ? sl->status : -1);
    }
    sl->used = 0;
    c->inflight--;
    return 0;
}

static ssize_t read_body(nghttp2_session *s, int32_t id, uint8_t *buf, size_t len, uint32_t *flags,
                         nghttp2_data_source *src, void *ud)
{
    (void)s;
    (void)id;
    (void)ud;
    struct slot *sl = src->ptr;
    size_t n = cfg.body_len - sl->off;
    if (n > len) n = len;
    memcpy(buf, cfg.body + sl->off, n);
    sl->off += n;
    if (sl->off == cfg.body_len) *flags |= NGHTTP2_DATA_FLAG_EOF;
    return (ssize_t)n;
}

/* ---- connections */

static void conn_open(struct conn *c)
{
    c->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (c->fd < 0) die("socket failed");
    int one = 1;
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    if (connect(c->fd, (struct sockaddr *)&cfg.addr, sizeof(cfg.addr)) != 0 && errno != EINPROGRESS)
        die("connect failed");
    nghttp2_session_callbacks *cb;
    nghttp2_session_callbacks_new(&cb);
    nghttp2_session_callbacks_set_send_callback(cb, on_send);
    nghttp2_session_callbacks_set_on_header_callback(cb, on_header);
    nghttp2_session_callbacks_set_on_frame_recv_callback(cb, on_frame_recv);
    nghttp2_session_callbacks_set_on_stream_close_callback(cb, on_stream_close);
    if (nghttp2_session_client_new(&c->s, cb, c) != 0) die("nghttp2_session_client_new failed");
    nghttp2_session_callbacks_del(cb);
    nghttp2_settings_entry iv[] = {{NGHTTP2_SETTINGS_ENABLE_PUSH, 0},
                                   {NGHTTP2_SETTINGS_INITIAL_WINDOW_SIZE, (1u << 30) - 1}};
    nghttp2_submit_settings(c->s, NGHTTP2_FLAG_NONE, iv, 2);
    nghttp2_session_set_local_window_size(c->s, NGHTTP2_FLAG_NONE, 0, (1 << 30) - 1);
    c->inflight = c->goaway = c->dead = c->pollout = c->got = 0;
    c->wlen = c->woff = 0;
    for (int i = 0; i < cfg.streams; i++)
        c->slots[i].used = 0;
    struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT, .data.ptr = c};
    c->pollout = 1;
    if (epoll_ctl(g.ep, EPOLL_CTL_ADD, c->fd, &ev) != 0) die("epoll_ctl failed");
}

/* The connection is gone (closed, error or drained after a GOAWAY): its
 * requests in flight failed; a new one takes its place while running. */
static void conn_reset(struct conn *c)
{
    for (int i = 0; i < cfg.streams; i++) {
        if (c->slots[i].used) {
            record(&c->slots[i], -1);
            c->slots[i].used = 0;
        }
    }
    c->inflight = 0;
    nghttp2_session_del(c->s);
    epoll_ctl(g.ep, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    c->fd = -1;
    c->dead = 1;
    if (!c->got && ++g.connect_errors > 10 * cfg.conns) {
        fprintf(stderr, "h2keys: %ld connections ended before any HTTP/2 frame; giving up\n",
                g.connect_errors);
        g.running = 0;
        g.stalled = 1;
        return;
    }
    if (g.running) {
        g.reconnects++;
        conn_open(c);
    }
}

static void submit_more(struct conn *c)
{
    if (c->goaway || c->dead) return;
    while (g.running && c->inflight < cfg.streams && (!cfg.total || g.submitted < cfg.total)) {
        struct slot *sl = NULL;
        for (int i = 0; i < cfg.streams; i++) {
            if (!c->slots[i].used) {
                sl = &c->slots[i];
                break;
            }
        }
        if (!sl) return;
        nghttp2_nv nv[MAX_HEADERS + 8];
        int n = 0;
#define NV(k, v, fl)                                                                               \
    nv[n++] = (nghttp2_nv){(uint8_t *)(k), (uint8_t *)(v), strlen(k), strlen(v), (fl)}
        NV(":method", cfg.body ? "POST" : "GET", 0);
        NV(":scheme", "http", 0);
        NV(":authority", cfg.authority, 0);
        NV(":path", cfg.path, 0);
        for (int i = 0; i < cfg.nextra; i++)
            nv[n++] = cfg.extra[i];
        if (cfg.body) NV("content-length", cfg.clen, 0);
        char key[512];
        if (cfg.key_prefix) {
            snprintf(key, sizeof(key), "%s-%llu", cfg.key_prefix,
                     (unsigned long long)++g.key_counter);
            NV(cfg.key_name, key, NGHTTP2_NV_FLAG_NO_INDEX);
        }
#undef NV
        sl->used = 1;
        sl->c = c;
        sl->status = 0;
        sl->off = 0;
        sl->t0_ns = now_ns();
        sl->wall_us = wall_us();
        nghttp2_data_provider prd = {.source.ptr = sl, .read_callback = read_body};
        int32_t id = nghttp2_submit_request(c->s, NULL, nv, (size_t)n, cfg.body ? &prd : NULL, sl);
        if (id < 0) {
            sl->used = 0;
            c->goaway = 1; /* no stream id left, or the session is ending */
            return;
        }
        c->inflight++;
        g.submitted++;
    }
}

/* Writes what the session has to send; 0, or -1 when the connection is
 * unusable. */
static int conn_flush(struct conn *c)
{
    for (;;) {
        while (c->woff < c->wlen) {
            ssize_t w = write(c->fd, c->wbuf + c->woff, c->wlen - c->woff);
            if (w < 0) {
                if (errno == EINTR) continue;
                if (errno != EAGAIN) return -1;
                if (!c->pollout) {
                    struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT, .data.ptr = c};
                    epoll_ctl(g.ep, EPOLL_CTL_MOD, c->fd, &ev);
                    c->pollout = 1;
                }
                return 0;
            }
            c->woff += (size_t)w;
        }
        c->woff = c->wlen = 0;
        if (!nghttp2_session_want_write(c->s)) break;
        if (nghttp2_session_send(c->s) != 0) return -1;
        if (c->wlen == 0) break;
    }
    if (c->pollout) {
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
        epoll_ctl(g.ep, EPOLL_CTL_MOD, c->fd, &ev);
        c->pollout = 0;
    }
    return 0;
}

static void conn_event(struct conn *c, uint32_t events)
{
    static uint8_t buf[65536];
    if (events & EPOLLIN) {
        for (;;) {
            ssize_t r = read(c->fd, buf, sizeof(buf));
            if (r < 0 && errno == EINTR) continue;
            if (r < 0 && errno == EAGAIN) break;
            if (r <= 0) {
                conn_reset(c);
                return;
            }
            if (g.counting) g.bytes += (uint64_t)r;
            if (nghttp2_session_mem_recv(c->s, buf, (size_t)r) < 0) {
                conn_reset(c);
                return;
            }
            if ((size_t)r < sizeof(buf)) break;
        }
    } else if (events & (EPOLLERR | EPOLLHUP)) {
        conn_reset(c);
        return;
    }
    submit_more(c);
    if (conn_flush(c) != 0 || (c->goaway && c->inflight == 0) ||
        (!nghttp2_session_want_read(c->s) && !nghttp2_session_want_write(c->s)))
        conn_reset(c);
}

/* ---- main */

static void usage(void)
{
    fprintf(stderr, "usage: h2keys [-c N] [-m N] (-D SECS | -n N) [-d FILE] [-H 'name: value']... "
                    "[-k PREFIX] [-K NAME] [-l LOGFILE] http://HOST:PORT/PATH\n");
    exit(1);
}

static void parse_url(const char *url)
{
    if (strncmp(url, "http://", 7) != 0) usage();
    const char *h = url + 7, *slash = strchr(h, '/'), *colon = strchr(h, ':');
    if (!slash || !colon || colon > slash || (size_t)(slash - h) >= sizeof(cfg.authority) ||
        strlen(slash) >= sizeof(cfg.path))
        usage();
    memcpy(cfg.authority, h, (size_t)(slash - h));
    strcpy(cfg.path, slash);
    char host[256];
    size_t hl = (size_t)(colon - h);
    if (hl >= sizeof(host)) usage();
    memcpy(host, h, hl);
    host[hl] = 0;
    cfg.addr.sin_family = AF_INET;
    cfg.addr.sin_port = htons((uint16_t)atoi(colon + 1));
    if (inet_pton(AF_INET, host, &cfg.addr.sin_addr) != 1) die("the host must be an IPv4 address");
}

static char *slurp(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    if (!f) die("cannot open the -d file");
    char *b = NULL;
    size_t n = 0, cap = 0, r;
    do {
        if (n == cap && !(b = realloc(b, cap = cap ? cap * 2 : 4096))) die("out of memory");
        r = fread(b + n, 1, cap - n, f);
        n += r;
    } while (r > 0);
    fclose(f);
    *len = n;
    return b;
}

static void add_header(char *h)
{
    char *colon = strchr(h + 1, ':'); /* a name may start with ':' */
    if (!colon || cfg.nextra == MAX_HEADERS) usage();
    *colon = 0;
    char *v = colon + 1;
    while (*v == ' ')
        v++;
    for (char *p = h; *p; p++)
        if (*p >= 'A' && *p <= 'Z') *p = (char)(*p - 'A' + 'a');
    cfg.extra[cfg.nextra++] =
        (nghttp2_nv){(uint8_t *)h, (uint8_t *)v, strlen(h), strlen(v), NGHTTP2_NV_FLAG_NONE};
}

int main(int argc, char **argv)
{
    int opt;
    while ((opt = getopt(argc, argv, "c:m:D:n:d:H:k:K:l:")) != -1) {
        switch (opt) {
        case 'c':
            cfg.conns = atoi(optarg);
            break;
        case 'm':
            cfg.streams = atoi(optarg);
            break;
        case 'D':
            cfg.duration_s = atof(optarg);
            break;
        case 'n':
            cfg.total = atol(optarg);
            break;
        case 'd':
            cfg.body = slurp(optarg, &cfg.body_len);
            snprintf(cfg.clen, sizeof(cfg.clen), "%zu", cfg.body_len);
            break;
        case 'H':
            add_header(optarg);
            break;
        case 'k':
            cfg.key_prefix = optarg;
            break;
        case 'K':
            cfg.key_name = optarg;
            break;
        case 'l':
            cfg.logfile = optarg;
            break;
        default:
            usage();
        }
    }
    if (optind != argc - 1 || cfg.conns < 1 || cfg.streams < 1 ||
        (cfg.duration_s > 0) == (cfg.total > 0))
        usage();
    parse_url(argv[optind]);

    g.ep = epoll_create1(EPOLL_CLOEXEC);
    g.conns = calloc((size_t)cfg.conns, sizeof(*g.conns));
    if (g.ep < 0 || !g.conns) die("setup failed");
    g.running = g.counting = 1;
    uint64_t t0 = now_ns();
    uint64_t end = cfg.duration_s > 0 ? t0 + (uint64_t)(cfg.duration_s * 1e9) : 0;
    uint64_t last_progress = t0;
    long last_finished = 0;
    for (int i = 0; i < cfg.conns; i++) {
        struct conn *c = &g.conns[i];
        c->slots = calloc((size_t)cfg.streams, sizeof(*c->slots));
        if (!c->slots) die("out of memory");
        conn_open(c);
        submit_more(c);
    }
    struct epoll_event evs[256];
    for (;;) {
        uint64_t now = now_ns();
        if (end && now >= end) break;
        if (cfg.total && g.finished >= cfg.total) break;
        if (g.finished != last_finished) {
            last_finished = g.finished;
            last_progress = now;
        } else if (now - last_progress > 10000000000ull) {
            fprintf(stderr, "h2keys: no answer for 10 s (%ld of %ld finished)\n", g.finished,
                    g.submitted);
            g.stalled = 1;
            break;
        }
        if (g.stalled) break;
        int timeout_ms = end ? (int)((end - now) / 1000000) + 1 : 1000;
        if (timeout_ms > 1000) timeout_ms = 1000;
        int n = epoll_wait(g.ep, evs, 256, timeout_ms);
        for (int i = 0; i < n; i++) {
            struct conn *c = evs[i].data.ptr;
            if (c->fd >= 0) conn_event(c, evs[i].events);
        }
    }
    g.counting = g.running = 0;
    double dur = (double)((end && now_ns() > end ? end : now_ns()) - t0) / 1e9;
    if (cfg.logfile) {
        FILE *f = fopen(cfg.logfile, "w");
        if (!f) die("cannot write the -l file");
        for (size_t i = 0; i < g.nrecs; i++)
            fprintf(f, "%llu\t%d\t%u\n", (unsigned long long)g.recs[i].start_us,
                    (int)g.recs[i].status, g.recs[i].dur_us);
        fclose(f);
    }
    printf("H2KEYS {\"requests\":%ld,\"submitted\":%ld,\"succeeded\":%ld,\"status_2xx\":%ld,"
           "\"status_3xx\":%ld,\"status_4xx\":%ld,\"status_5xx\":%ld,\"status_other\":%ld,"
           "\"failed\":%ld,\"bytes\":%llu,\"duration_s\":%.6f,\"rps\":%.2f,\"reconnects\":%ld,"
           "\"refused\":%ld,\"stalled\":%s}\n",
           g.finished, g.submitted, g.st[2], g.st[2], g.st[3], g.st[4], g.st[5], g.st[0] + g.st[1],
           g.failed, (unsigned long long)g.bytes, dur,
           dur > 0 ? (double)(g.finished - g.failed) / dur : 0.0, g.reconnects, g.refused,
           g.stalled ? "true" : "false");
    return g.stalled ? 1 : 0;
}
