/* main.c — flags, configuration, signals, start and stop of the workers,
 * exit codes (docs/configuration.md): 0 clean, 1 runtime failure at start,
 * 2 usage or configuration error; and --healthcheck, a one-shot blocking
 * GET /healthz on the admin listener (exit 0 on 200, else 1). The only
 * file that may exit(). */
#include <errno.h>
#include <getopt.h>
#include <netdb.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#include "idemgate/core/clock.h"
#include "idemgate/admin/admin.h"
#include "idemgate/config/config.h"
#include "idemgate/core/log.h"
#include "idemgate/proxy/gen.h"
#include "idemgate/proxy/server.h"
#include "idemgate/store/store.h"

static const char usage_text[] =
    "usage: idemgate [-c FILE] [--listen ADDR] [--upstream URL] [--store redis|memory|lmdb]\n"
    "                [--redis URL] [--workers N] [--admin ADDR] [-t] [-T] [--version] [-h]\n"
    "       idemgate [-c FILE] --healthcheck [ADDR]\n"
    "\n"
    "  -c, --config FILE     JSON config file (defaults + env + flags without it)\n"
    "      --listen ADDR     host:port to listen on ([::1]:8080 for IPv6)\n"
    "      --upstream URL    default upstream, http://host:port or https://host:port\n"
    "      --store KIND      redis (shared, production), memory (one instance) or lmdb\n"
    "                        (a file on this host, shared by its instances, kept)\n"
    "      --redis URL       redis://[[user]:password@]host[:port][/db], rediss://... (TLS)\n"
    "                        or unix:///path.sock\n"
    "      --workers N       event-loop threads; 0 = one per CPU\n"
    "      --admin ADDR      admin listener host:port, or off\n"
    "  -t, --test-config     validate the configuration, print 'configuration ok', exit\n"
    "  -T, --dump-config     validate, print the effective configuration (defaults < file\n"
    "                        < environment < flags) as JSON, secrets redacted, exit\n"
    "      --version         print the version and exit\n"
    "  -h, --help            print this help and exit\n"
    "      --healthcheck [ADDR]  GET /healthz on the admin listener (ADDR host:port, else the\n"
    "                        configured admin.listen); exit 0 on 200, else 1\n"
    "\n"
    "Environment: IDEMGATE_LISTEN, IDEMGATE_UPSTREAM, IDEMGATE_STORE, IDEMGATE_REDIS_URL,\n"
    "IDEMGATE_WORKERS, IDEMGATE_ADMIN_LISTEN, IDEMGATE_SCOPE_SECRET, IDEMGATE_LOG_LEVEL,\n"
    "IDEMPOTENCY_TTL_SECONDS. Precedence: defaults < config file < environment < flags.\n";

enum {
    OPT_LISTEN = 256,
    OPT_UPSTREAM,
    OPT_STORE,
    OPT_REDIS,
    OPT_WORKERS,
    OPT_ADMIN,
    OPT_VERSION,
    OPT_HEALTHCHECK
};

static const struct option long_opts[] = {
    {"config", required_argument, NULL, 'c'},
    {"listen", required_argument, NULL, OPT_LISTEN},
    {"upstream", required_argument, NULL, OPT_UPSTREAM},
    {"store", required_argument, NULL, OPT_STORE},
    {"redis", required_argument, NULL, OPT_REDIS},
    {"workers", required_argument, NULL, OPT_WORKERS},
    {"admin", required_argument, NULL, OPT_ADMIN},
    {"test-config", no_argument, NULL, 't'},
    {"dump-config", no_argument, NULL, 'T'},
    {"version", no_argument, NULL, OPT_VERSION},
    {"help", no_argument, NULL, 'h'},
    {"healthcheck", optional_argument, NULL, OPT_HEALTHCHECK},
    {NULL, 0, NULL, 0},
};

/* What the command line asks for besides the configuration flags. */
struct cli_mode {
    int test_only;
    bool dump; /* -T */
    bool healthcheck;
    const char *health_addr; /* --healthcheck ADDR, or NULL */
};

/* Returns -1 to go on, or the exit status. */
static const char *store_kind_name(enum cfg_store s)
{
    return s == CFG_STORE_MEMORY ? "memory" : s == CFG_STORE_LMDB ? "lmdb" : "redis";
}

static int parse_args(int argc, char **argv, struct cfg_flags *f, struct cli_mode *m)
{
    int opt;
    opterr = 0;
    while ((opt = getopt_long(argc, argv, ":c:tTh", long_opts, NULL)) != -1) {
        switch (opt) {
        case 'c':
            f->config_file = optarg;
            break;
        case OPT_LISTEN:
            f->listen = optarg;
            break;
        case OPT_UPSTREAM:
            f->upstream = optarg;
            break;
        case OPT_STORE:
            f->store = optarg;
            break;
        case OPT_REDIS:
            f->redis = optarg;
            break;
        case OPT_WORKERS:
            f->workers = optarg;
            break;
        case OPT_ADMIN:
            f->admin = optarg;
            break;
        case 't':
            m->test_only = 1;
            break;
        case 'T':
            m->dump = true;
            break;
        case OPT_HEALTHCHECK:
            m->healthcheck = true;
            m->health_addr = optarg;
            break;
        case OPT_VERSION:
            printf("idemgate %s\n", IDEMGATE_VERSION);
            return 0;
        case 'h':
            fputs(usage_text, stdout);
            return 0;
        case ':':
            fprintf(stderr, "flag %s: needs a value\n", argv[optind - 1]);
            return 2;
        default:
            fprintf(stderr, "flag %s: unknown flag (see idemgate --help)\n", argv[optind - 1]);
            return 2;
        }
    }
    /* "--healthcheck ADDR": getopt leaves an optional value given after a
     * space as an operand. */
    if (m->healthcheck && !m->health_addr && optind == argc - 1) m->health_addr = argv[optind++];
    if (optind < argc) {
        fprintf(stderr, "argument %s: unexpected (see idemgate --help)\n", argv[optind]);
        return 2;
    }
    return -1;
}

/* ---- --healthcheck ---- */

#define HC_TIMEOUT_MS 2000
#define HC_HOST_LEN 256

static uint64_t hc_now_ms(void)
{
    return clock_now_ms();
}

/* "host:port" or "[v6]:port" into host (no brackets) and port; -1 when
 * malformed. */
static int hc_split(const char *addr, char *host, char *port)
{
    const char *colon = strrchr(addr, ':');
    const char *h = addr;
    size_t hlen = colon ? (size_t)(colon - addr) : 0;
    if (addr[0] == '[') {
        const char *close = strchr(addr, ']');
        if (!close || close[1] != ':') return -1;
        h = addr + 1;
        hlen = (size_t)(close - h);
        colon = close + 1;
    }
    if (!colon || hlen == 0 || hlen >= HC_HOST_LEN || !colon[1] || strlen(colon + 1) > 5 ||
        strspn(colon + 1, "0123456789") != strlen(colon + 1))
        return -1;
    memcpy(host, h, hlen);
    host[hlen] = '\0';
    strcpy(port, colon + 1);
    return 0;
}

/* A listener on every address is asked on loopback. */
static const char *hc_connect_host(const char *host)
{
    if (strcmp(host, "0.0.0.0") == 0) return "127.0.0.1";
    if (strcmp(host, "::") == 0) return "::1";
    return host;
}

static void hc_timeouts(int fd, uint64_t deadline_ms)
{
    uint64_t now = hc_now_ms(), left = deadline_ms > now ? deadline_ms - now : 1;
    struct timeval tv = clock_tv(left);
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv)); /* connect() too, on Linux */
}

/* A connected blocking socket, or -1 with why filled in. */
static int hc_dial(const char *host, const char *port, uint64_t deadline_ms, char *why,
                   size_t whylen)
{
    struct addrinfo hints = {.ai_socktype = SOCK_STREAM, .ai_flags = AI_NUMERICSERV};
    struct addrinfo *res = NULL;
    int gai = getaddrinfo(host, port, &hints, &res);
    if (gai != 0) {
        snprintf(why, whylen, "cannot resolve: %s", gai_strerror(gai));
        return -1;
    }
    int fd = -1, err = ECONNREFUSED;
    for (struct addrinfo *ai = res; ai && fd < 0; ai = ai->ai_next) {
        fd = socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC, ai->ai_protocol);
        if (fd < 0) {
            err = errno;
            continue;
        }
        hc_timeouts(fd, deadline_ms);
        if (connect(fd, ai->ai_addr, ai->ai_addrlen) != 0) {
            err = errno == EINPROGRESS ? ETIMEDOUT : errno;
            close(fd);
            fd = -1;
        }
    }
    freeaddrinfo(res);
    if (fd < 0) snprintf(why, whylen, "cannot connect: %s", strerror(err));
    return fd;
}

/* The status of GET /healthz at host:port, or -1 (why says what failed). */
static int hc_get(const char *host, const char *port, char *why, size_t whylen)
{
    uint64_t deadline = hc_now_ms() + HC_TIMEOUT_MS;
    int fd = hc_dial(host, port, deadline, why, whylen);
    if (fd < 0) return -1;
    char req[HC_HOST_LEN + 96];
    bool v6 = strchr(host, ':') != NULL;
    int n = snprintf(req, sizeof(req), "GET /healthz HTTP/1.0\r\nHost: %s%s%s:%s\r\n\r\n",
                     v6 ? "[" : "", host, v6 ? "]" : "", port);
    char head[64];
    size_t got = 0;
    if (send(fd, req, (size_t)n, MSG_NOSIGNAL) != n) {
        snprintf(why, whylen, "cannot send the request: %s", strerror(errno));
        close(fd);
        return -1;
    }
    /* "HTTP/1.x 200 " is all that is needed */
    while (got < 13 && hc_now_ms() < deadline) {
        hc_timeouts(fd, deadline);
        ssize_t r = recv(fd, head + got, sizeof(head) - 1 - got, 0);
        if (r <= 0) break;
        got += (size_t)r;
    }
    close(fd);
    head[got] = '\0';
    if (got < 13 || strncmp(head, "HTTP/1.", 7) != 0 || head[8] != ' ') {
        snprintf(why, whylen, "%s", got ? "not an HTTP answer" : "no answer in time");
        return -1;
    }
    return atoi(head + 9);
}

/* --healthcheck [ADDR]: ADDR, else admin.listen from the configuration
 * (file, environment, flags). Exit 0 on 200, else 1 with one line on
 * stderr: container runtimes read anything but 0 and 1 as reserved. */
static int run_healthcheck(const struct cfg_flags *flags, const char *addr)
{
    char host[HC_HOST_LEN], port[8], why[128];
    if (addr) {
        if (hc_split(addr, host, port) != 0) {
            fprintf(stderr, "healthcheck: %s: must be host:port or [v6]:port\n", addr);
            return 1;
        }
    } else {
        struct cfg cfg;
        char err[512];
        if (cfg_load(&cfg, flags, err, sizeof(err)) != 0) {
            fprintf(stderr, "healthcheck: %s\n", err);
            return 1;
        }
        bool on = cfg.admin_enabled && strlen(cfg.admin_listen.host) < sizeof(host);
        if (on) {
            strcpy(host, cfg.admin_listen.host);
            snprintf(port, sizeof(port), "%d", cfg.admin_listen.port);
        }
        cfg_free(&cfg);
        if (!on) {
            fprintf(stderr, "healthcheck: the admin listener is off (admin.listen); give ADDR\n");
            return 1;
        }
    }
    const char *to = hc_connect_host(host);
    int status = hc_get(to, port, why, sizeof(why));
    if (status == 200) return 0;
    if (status > 0) snprintf(why, sizeof(why), "answered %d", status);
    fprintf(stderr, "healthcheck: %s%s%s:%s/healthz: %s\n", strchr(to, ':') ? "[" : "", to,
            strchr(to, ':') ? "]" : "", port, why);
    return 1;
}

/* POST /-/reload, on the admin thread. */
static int main_reload(void *arg, char *err, size_t errlen, unsigned long *id)
{
    return server_reload(arg, err, errlen, id);
}

int main(int argc, char **argv)
{
    struct cfg_flags flags;
    memset(&flags, 0, sizeof(flags));
    struct cli_mode mode = {0};
    int rc = parse_args(argc, argv, &flags, &mode);
    if (rc >= 0) return rc;
    if (mode.healthcheck) return run_healthcheck(&flags, mode.health_addr);

    char err[512];
    if (mode.dump || mode.test_only) {
        struct cfg cfg;
        if (cfg_load(&cfg, &flags, err, sizeof(err)) != 0) {
            fprintf(stderr, "%s\n", err);
            return 2;
        }
        if (mode.dump) {
            char *text = cfg_dump_json(&cfg, true);
            fputs(text, stdout);
            free(text);
        } else {
            if (cfg.store == CFG_STORE_LMDB &&
                store_lmdb_check_path(cfg.lmdb_path, err, sizeof(err)) < 0) {
                fprintf(stderr, "config: lmdb.path: %s\n", err);
                cfg_free(&cfg);
                return 2;
            }
            printf("configuration ok\n");
        }
        cfg_free(&cfg);
        return 0;
    }
    struct gen *g = NULL;
    rc = gen_load(&flags, NULL, &g, err, sizeof(err));
    if (rc != 0) {
        if (rc == 2)
            fprintf(stderr, "%s\n", err);
        else
            log_msg(LOG_ERROR, "%s", err);
        return rc;
    }
    /* The start values (main's reference until the workers run). */
    const struct cfg *cfg = &g->cfg;
    log_set_level((enum log_level)cfg->log_level);
    signal(SIGPIPE, SIG_IGN);

    /* Workers inherit this mask: only the main thread takes the signals. */
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGTERM);
    sigaddset(&set, SIGINT);
    sigaddset(&set, SIGHUP);
    pthread_sigmask(SIG_BLOCK, &set, NULL);

    /* The admin socket first: an instance that cannot bind it must fail
     * before it joins a shared proxy address and takes connections there. */
    bool admin_on = cfg->admin_enabled;
    int admin_fd = admin_on ? admin_listen(cfg) : -1;
    if (admin_on && admin_fd < 0) {
        gen_unref(g);
        return 1;
    }
    struct server srv;
    gen_ref(g); /* the server takes this one over; main keeps its own until the start line */
    if (server_init(&srv, g, &flags) != 0 || server_start(&srv) != 0) {
        if (admin_fd >= 0) close(admin_fd);
        server_stop(&srv);
        server_free(&srv);
        gen_unref(g);
        return 1;
    }
    struct admin *admin = NULL;
    if (admin_on && !(admin = admin_start(admin_fd, srv.mem, srv.lmdb, main_reload, &srv))) {
        server_stop(&srv);
        server_free(&srv);
        gen_unref(g);
        return 1;
    }
    log_msg(LOG_INFO, "idemgate %s listening on %s, upstream %s%s, store %s, %d worker(s)",
            IDEMGATE_VERSION, cfg->listen.text, cfg->upstream.servers[0].url.text,
            cfg->upstream.n > 1 ? " (a group)" : "", store_kind_name(cfg->store), srv.n_workers);
    gen_unref(g); /* the loops, the admin and the server hold theirs */
    g = NULL;
    cfg = NULL;

    int sig = 0;
    while (sigwait(&set, &sig) == 0 && sig == SIGHUP) {
        unsigned long id;
        server_reload(&srv, err, sizeof(err), &id); /* logged and counted there */
    }
    struct gen *cur = gen_current();
    int grace_ms = cur->cfg.limits.shutdown_grace_ms;
    gen_unref(cur);
    log_msg(LOG_INFO, "signal %d: draining (up to %d ms)", sig, grace_ms);
    server_stop(&srv);
    admin_stop(admin);
    if (!server_free(&srv)) {
        log_msg(LOG_WARN, "exiting with requests still in flight");
        _exit(0);
    }
    log_msg(LOG_INFO, "stopped");
    return 0;
}
