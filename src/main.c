/* main.c — flags, configuration, signals, start and stop of the workers,
 * exit codes (SPEC section 1): 0 clean, 1 runtime failure at start,
 * 2 usage or configuration error. The only file that may exit(). */
#include <getopt.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "idemgate/admin.h"
#include "idemgate/config.h"
#include "idemgate/log.h"
#include "idemgate/server.h"

static const char usage_text[] =
    "usage: idemgate [-c FILE] [--listen ADDR] [--upstream URL] [--store redis|memory]\n"
    "                [--redis URL] [--workers N] [--admin ADDR] [-t] [--version] [-h]\n"
    "\n"
    "  -c, --config FILE     JSON config file (defaults + env + flags without it)\n"
    "      --listen ADDR     host:port to listen on ([::1]:8080 for IPv6)\n"
    "      --upstream URL    default upstream, http://host:port or https://host:port\n"
    "      --store KIND      redis (shared, production) or memory (one instance)\n"
    "      --redis URL       redis://[:password@]host[:port][/db] or unix:///path.sock\n"
    "      --workers N       event-loop threads; 0 = one per CPU\n"
    "      --admin ADDR      admin listener host:port, or off\n"
    "  -t, --test-config     validate the configuration, print 'configuration ok', exit\n"
    "      --version         print the version and exit\n"
    "  -h, --help            print this help and exit\n"
    "\n"
    "Environment: IDEMGATE_LISTEN, IDEMGATE_UPSTREAM, IDEMGATE_STORE, IDEMGATE_REDIS_URL,\n"
    "IDEMGATE_WORKERS, IDEMGATE_ADMIN_LISTEN, IDEMGATE_SCOPE_SECRET, IDEMGATE_LOG_LEVEL,\n"
    "IDEMPOTENCY_TTL_SECONDS. Precedence: defaults < config file < environment < flags.\n";

enum { OPT_LISTEN = 256, OPT_UPSTREAM, OPT_STORE, OPT_REDIS, OPT_WORKERS, OPT_ADMIN, OPT_VERSION };

static const struct option long_opts[] = {
    {"config", required_argument, NULL, 'c'},
    {"listen", required_argument, NULL, OPT_LISTEN},
    {"upstream", required_argument, NULL, OPT_UPSTREAM},
    {"store", required_argument, NULL, OPT_STORE},
    {"redis", required_argument, NULL, OPT_REDIS},
    {"workers", required_argument, NULL, OPT_WORKERS},
    {"admin", required_argument, NULL, OPT_ADMIN},
    {"test-config", no_argument, NULL, 't'},
    {"version", no_argument, NULL, OPT_VERSION},
    {"help", no_argument, NULL, 'h'},
    {NULL, 0, NULL, 0},
};

/* Returns -1 to go on, or the exit status. */
static int parse_args(int argc, char **argv, struct cfg_flags *f, int *test_only)
{
    int opt;
    opterr = 0;
    while ((opt = getopt_long(argc, argv, ":c:th", long_opts, NULL)) != -1) {
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
            *test_only = 1;
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
    if (optind < argc) {
        fprintf(stderr, "argument %s: unexpected (see idemgate --help)\n", argv[optind]);
        return 2;
    }
    return -1;
}

int main(int argc, char **argv)
{
    struct cfg_flags flags;
    memset(&flags, 0, sizeof(flags));
    int test_only = 0;
    int rc = parse_args(argc, argv, &flags, &test_only);
    if (rc >= 0) return rc;

    struct cfg cfg;
    char err[512];
    if (cfg_load(&cfg, &flags, err, sizeof(err)) != 0) {
        fprintf(stderr, "%s\n", err);
        return 2;
    }
    if (test_only) {
        printf("configuration ok\n");
        cfg_free(&cfg);
        return 0;
    }
    log_set_level((enum log_level)cfg.log_level);
    signal(SIGPIPE, SIG_IGN);

    /* Workers inherit this mask: only the main thread takes the signals. */
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGTERM);
    sigaddset(&set, SIGINT);
    pthread_sigmask(SIG_BLOCK, &set, NULL);

    struct server srv;
    if (server_init(&srv, &cfg) != 0 || server_start(&srv) != 0) {
        server_stop(&srv);
        server_free(&srv);
        cfg_free(&cfg);
        return 1;
    }
    struct admin *admin = NULL;
    if (cfg.admin_enabled && !(admin = admin_start(&cfg, srv.mem))) {
        server_stop(&srv);
        server_free(&srv);
        cfg_free(&cfg);
        return 1;
    }
    log_msg(LOG_INFO, "idemgate %s listening on %s, upstream %s, store %s, %d worker(s)",
            IDEMGATE_VERSION, cfg.listen.text, cfg.upstream.text,
            cfg.store == CFG_STORE_MEMORY ? "memory" : "redis", srv.n_workers);

    int sig = 0;
    sigwait(&set, &sig);
    log_msg(LOG_INFO, "signal %d: draining (up to %d ms)", sig, cfg.limits.shutdown_grace_ms);
    server_stop(&srv);
    admin_stop(admin);
    if (!server_free(&srv)) {
        log_msg(LOG_WARN, "exiting with requests still in flight");
        _exit(0);
    }
    cfg_free(&cfg);
    log_msg(LOG_INFO, "stopped");
    return 0;
}
