/* listen.c — listening sockets and address claims in the abstract
 * unix-socket namespace (the scheme is described in listen.h). Owns the
 * claim's sockets; nothing else is kept. */
#include "idemgate/net/listen.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "idemgate/core/siphash.h"

#define NAME_PREFIX "idemgate/listen/1 "
#define LOCK_WAIT_MS 5000
#define LOCK_POLL_MS 5
#define SCOPE_LEN 80
#define LEVEL_LEN 48
/* per scope: any, kind, kind:detail */
#define LEVELS 3

struct listen_claim {
    int lock_fd;
    int fds[2 * LEVELS];
    int n;
};

int listen_resolve(const char *host, int port, const char *text, struct sockaddr_storage *ss,
                   socklen_t *len, char *err, size_t errlen)
{
    struct addrinfo hints, *res = NULL;
    memset(&hints, 0, sizeof(hints));
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
    char p[8];
    snprintf(p, sizeof(p), "%d", port);
    int rc = getaddrinfo(host, p, &hints, &res);
    if (rc != 0) {
        snprintf(err, errlen, "cannot resolve %s: %s", text, gai_strerror(rc));
        return -1;
    }
    if (res->ai_addrlen > sizeof(*ss) ||
        (res->ai_family != AF_INET && res->ai_family != AF_INET6)) {
        snprintf(err, errlen, "cannot resolve %s: not an IPv4 or IPv6 address", text);
        freeaddrinfo(res);
        return -1;
    }
    memset(ss, 0, sizeof(*ss));
    memcpy(ss, res->ai_addr, res->ai_addrlen);
    *len = res->ai_addrlen;
    freeaddrinfo(res);
    return 0;
}

int listen_bind(const struct sockaddr *sa, socklen_t len, bool reuseport, int backlog)
{
    int fd = socket(sa->sa_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) return -1;
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    if (reuseport) setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof(one));
    if (sa->sa_family == AF_INET6) setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof(one));
    if (bind(fd, sa, len) < 0 || listen(fd, backlog) < 0) {
        int e = errno;
        close(fd);
        errno = e;
        return -1;
    }
    return fd;
}

/* ---- names ---- */

static int addr_port(const struct sockaddr *sa)
{
    return sa->sa_family == AF_INET ? ntohs(((const struct sockaddr_in *)sa)->sin_port)
                                    : ntohs(((const struct sockaddr_in6 *)sa)->sin6_port);
}

static int addr_family(const struct sockaddr *sa)
{
    return sa->sa_family == AF_INET ? 4 : 6;
}

static bool addr_is_wildcard(const struct sockaddr *sa)
{
    if (sa->sa_family == AF_INET)
        return ((const struct sockaddr_in *)sa)->sin_addr.s_addr == htonl(INADDR_ANY);
    return IN6_IS_ADDR_UNSPECIFIED(&((const struct sockaddr_in6 *)sa)->sin6_addr);
}

/* "4:127.0.0.1:8080" / "6:[::1]:8080"; the family's wildcard address
 * instead of sa's when wildcard. */
static void addr_scope(const struct sockaddr *sa, bool wildcard, char *out, size_t n)
{
    char host[INET6_ADDRSTRLEN] = "";
    if (sa->sa_family == AF_INET) {
        if (wildcard)
            snprintf(host, sizeof(host), "0.0.0.0");
        else
            inet_ntop(AF_INET, &((const struct sockaddr_in *)sa)->sin_addr, host, sizeof(host));
        snprintf(out, n, "4:%s:%d", host, addr_port(sa));
    } else {
        if (wildcard)
            snprintf(host, sizeof(host), "::");
        else
            inet_ntop(AF_INET6, &((const struct sockaddr_in6 *)sa)->sin6_addr, host, sizeof(host));
        snprintf(out, n, "6:[%s]:%d", host, addr_port(sa));
    }
}

static void group_scope(const struct sockaddr *sa, char *out, size_t n)
{
    snprintf(out, n, "%d:*:%d", addr_family(sa), addr_port(sa));
}

/* The identity's full level: the kind, or kind:hash(detail). */
static void full_level(const struct listen_store_id *id, char *out, size_t n)
{
    if (!id->detail) {
        snprintf(out, n, "%s", id->kind);
        return;
    }
    static const uint8_t key[SIPHASH_KEY_LEN] = {0}; /* a name, not a secret */
    snprintf(out, n, "%s:%016llx", id->kind,
             (unsigned long long)siphash24(key, id->detail, strlen(id->detail)));
}

/* A unix socket bound to the abstract name, or -1 with errno
 * (EADDRINUSE: some process holds it). */
static int abstract_bind(const char *name)
{
    struct sockaddr_un un;
    memset(&un, 0, sizeof(un));
    un.sun_family = AF_UNIX;
    size_t len = strlen(name);
    if (len + 1 > sizeof(un.sun_path)) {
        errno = ENAMETOOLONG;
        return -1;
    }
    memcpy(un.sun_path + 1, name, len); /* sun_path[0] == '\0': abstract */
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return -1;
    socklen_t sl = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + 1 + len);
    if (bind(fd, (struct sockaddr *)&un, sl) < 0) {
        int e = errno;
        close(fd);
        errno = e;
        return -1;
    }
    return fd;
}

static void slot_name(const char *scope, const char *level, int slot, char *out, size_t n)
{
    snprintf(out, n, NAME_PREFIX "%s %s %d", scope, level, slot);
}

/* How many processes hold scope/level; -1 with errno on a failure. */
static int count_held(const char *scope, const char *level)
{
    int held = 0;
    for (int i = 0; i < LISTEN_CLAIM_SLOTS; i++) {
        char name[128];
        slot_name(scope, level, i, name, sizeof(name));
        int fd = abstract_bind(name);
        if (fd >= 0) {
            close(fd);
        } else if (errno == EADDRINUSE) {
            held++;
        } else {
            return -1;
        }
    }
    return held;
}

/* Binds the first free slot of scope/level into c; -1 with errno (ENOSPC:
 * every slot is held). */
static int claim_slot(struct listen_claim *c, const char *scope, const char *level)
{
    for (int i = 0; i < LISTEN_CLAIM_SLOTS; i++) {
        char name[128];
        slot_name(scope, level, i, name, sizeof(name));
        int fd = abstract_bind(name);
        if (fd >= 0) {
            c->fds[c->n++] = fd;
            return 0;
        }
        if (errno != EADDRINUSE) return -1;
    }
    errno = ENOSPC;
    return -1;
}

static int take_lock(const struct sockaddr *sa, char *err, size_t errlen)
{
    char name[128];
    snprintf(name, sizeof(name), NAME_PREFIX "lock %d:%d", addr_family(sa), addr_port(sa));
    for (int waited = 0;; waited += LOCK_POLL_MS) {
        int fd = abstract_bind(name);
        if (fd >= 0) return fd;
        if (errno != EADDRINUSE) {
            snprintf(err, errlen, "cannot take the address claim lock: %s", strerror(errno));
            return -1;
        }
        if (waited >= LOCK_WAIT_MS) {
            snprintf(err, errlen, "another idemgate has been starting on it for %d s",
                     LOCK_WAIT_MS / 1000);
            return -1;
        }
        struct timespec ts = {0, LOCK_POLL_MS * 1000000L};
        nanosleep(&ts, NULL);
    }
}

/* 0 when id may join scope; 1 with the refusal in err; -1 on a failure. */
static int check_scope(const char *scope, const struct listen_store_id *id, const char *full,
                       const char *const *kinds, char *err, size_t errlen)
{
    int any = count_held(scope, "any");
    if (any <= 0) return any;
    if (!id->exclusive) {
        int mine = count_held(scope, full);
        if (mine < 0) return -1;
        if (mine == any) return 0;
    }
    /* Name a holder that does not fit. */
    for (const char *const *k = kinds; *k; k++) {
        int n = count_held(scope, *k);
        if (n < 0) return -1;
        if (n > 0 && (strcmp(*k, id->kind) != 0 || id->exclusive)) {
            snprintf(err, errlen, "held by another idemgate using the %s store", *k);
            return 1;
        }
    }
    int same_kind = count_held(scope, id->kind);
    if (same_kind < 0) return -1;
    if (same_kind > 0)
        snprintf(err, errlen, "held by another idemgate using another %s store", id->kind);
    else
        snprintf(err, errlen, "held by another idemgate using another store");
    return 1;
}

struct listen_claim *listen_claim_take(const struct sockaddr *sa, const struct listen_store_id *id,
                                       const char *const *kinds, char *err, size_t errlen)
{
    struct listen_claim *c = calloc(1, sizeof(*c));
    if (!c) abort();
    c->lock_fd = take_lock(sa, err, errlen);
    if (c->lock_fd < 0) {
        free(c);
        return NULL;
    }
    char own[SCOPE_LEN], wild[SCOPE_LEN], group[SCOPE_LEN], full[LEVEL_LEN];
    addr_scope(sa, false, own, sizeof(own));
    addr_scope(sa, true, wild, sizeof(wild));
    group_scope(sa, group, sizeof(group));
    full_level(id, full, sizeof(full));

    /* A wildcard address overlaps every address of its family and port;
     * a specific one, itself and the wildcard. */
    int rc = 0;
    if (addr_is_wildcard(sa)) {
        rc = check_scope(group, id, full, kinds, err, errlen);
    } else {
        rc = check_scope(own, id, full, kinds, err, errlen);
        if (rc == 0) rc = check_scope(wild, id, full, kinds, err, errlen);
    }
    if (rc == 0) {
        const char *scopes[2] = {own, group};
        for (int s = 0; s < 2 && rc == 0; s++) {
            if (claim_slot(c, scopes[s], "any") < 0 || claim_slot(c, scopes[s], id->kind) < 0 ||
                (id->detail && claim_slot(c, scopes[s], full) < 0))
                rc = -1;
        }
        if (rc < 0 && errno == ENOSPC)
            snprintf(err, errlen, "%d idemgate processes already share it", LISTEN_CLAIM_SLOTS);
        else if (rc < 0)
            snprintf(err, errlen, "cannot claim it: %s", strerror(errno));
    } else if (rc < 0) {
        snprintf(err, errlen, "cannot check who holds it: %s", strerror(errno));
    }
    if (rc != 0) {
        listen_claim_free(c);
        return NULL;
    }
    return c;
}

void listen_claim_settled(struct listen_claim *c)
{
    if (c && c->lock_fd >= 0) {
        close(c->lock_fd);
        c->lock_fd = -1;
    }
}

void listen_claim_free(struct listen_claim *c)
{
    if (!c) return;
    listen_claim_settled(c);
    for (int i = 0; i < c->n; i++)
        close(c->fds[i]);
    free(c);
}
