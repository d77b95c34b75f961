/* syntax.c — the grammars of one text value (docs/configuration.md).
 *
 * Owns: what an HTTP token and an HTTP method are, decimal numbers, host
 * names, "host:port" and "[v6]:port", listen addresses ("*:port"), http(s)
 * URLs and Redis URLs (with percent-decoded userinfo). Each parser takes a
 * text and gives back its parts, owned by the caller. Does not own: the
 * messages (values.c says what a bad value of each option must be), the
 * options, or JSON. Pure: no state, nothing kept between calls. */
#include "internal.h"

#include <arpa/inet.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

static bool is_tchar(unsigned char ch)
{
    if ((ch >= '0' && ch <= '9') || (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z'))
        return true;
    return ch && strchr("!#$%&'*+-.^_`|~", ch) != NULL;
}

bool cfg_is_token(const char *s)
{
    if (!*s) return false;
    for (; *s; s++)
        if (!is_tchar((unsigned char)*s)) return false;
    return true;
}

bool cfg_is_method(const char *s)
{
    if (!cfg_is_token(s)) return false;
    for (; *s; s++)
        if (*s >= 'a' && *s <= 'z') return false;
    return true;
}

/* Decimal digits only, value <= max. */
int cfg_parse_uint(const char *s, size_t n, long long max, long long *out)
{
    long long v = 0;
    if (n == 0) return -1;
    for (size_t i = 0; i < n; i++) {
        if (s[i] < '0' || s[i] > '9') return -1;
        v = v * 10 + (s[i] - '0');
        if (v > max) return -1;
    }
    *out = v;
    return 0;
}

static bool is_hostname(const char *s, size_t n)
{
    if (n == 0 || n > 253) return false;
    for (size_t i = 0; i < n; i++) {
        unsigned char ch = (unsigned char)s[i];
        if (!((ch >= '0' && ch <= '9') || (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') ||
              ch == '-' || ch == '.' || ch == '_'))
            return false;
    }
    return true;
}

/* Parses "host[:port]" or "[v6][:port]" (s[0..n)). The port is required
 * when def_port is 0. Returns the host without brackets (caller frees). */
int cfg_parse_hostport(const char *s, size_t n, int def_port, char **host, int *port)
{
    const char *h, *rest;
    size_t hlen;
    if (n > 0 && s[0] == '[') {
        const char *close = memchr(s, ']', n);
        char tmp[INET6_ADDRSTRLEN];
        struct in6_addr a6;
        if (!close) return -1;
        h = s + 1;
        hlen = (size_t)(close - h);
        if (hlen == 0 || hlen >= sizeof tmp) return -1;
        memcpy(tmp, h, hlen);
        tmp[hlen] = '\0';
        if (inet_pton(AF_INET6, tmp, &a6) != 1) return -1;
        rest = close + 1;
    } else {
        const char *colon = memchr(s, ':', n);
        h = s;
        hlen = colon ? (size_t)(colon - s) : n;
        if (!is_hostname(h, hlen)) return -1;
        rest = s + hlen;
    }
    size_t rlen = n - (size_t)(rest - s);
    long long p = def_port;
    if (rlen == 0) {
        if (def_port == 0) return -1;
    } else if (rest[0] != ':' || cfg_parse_uint(rest + 1, rlen - 1, 65535, &p) < 0 || p < 1) {
        return -1;
    }
    *host = cfg_xstrndup(h, hlen);
    *port = (int)p;
    return 0;
}

/* "host:port", "[v6]:port" or "*:port" (any IPv4 address). */
int cfg_parse_addr(const char *s, struct cfg_addr *out)
{
    memset(out, 0, sizeof *out);
    if (s[0] == '*' && s[1] == ':') {
        long long p;
        if (cfg_parse_uint(s + 2, strlen(s + 2), 65535, &p) < 0 || p < 1) return -1;
        out->host = cfg_xstrdup("0.0.0.0");
        out->port = (int)p;
    } else if (cfg_parse_hostport(s, strlen(s), 0, &out->host, &out->port) < 0) {
        return -1;
    }
    out->text = cfg_xstrdup(s);
    return 0;
}

bool cfg_prefix_ci(const char *s, const char *prefix)
{
    return strncasecmp(s, prefix, strlen(prefix)) == 0;
}

/* "http://host[:port][/]" or "https://...": no path, query or userinfo. */
int cfg_parse_url(const char *s, struct cfg_url *out)
{
    const char *auth;
    memset(out, 0, sizeof *out);
    if (cfg_prefix_ci(s, "http://")) {
        auth = s + 7;
    } else if (cfg_prefix_ci(s, "https://")) {
        out->tls = true;
        auth = s + 8;
    } else {
        return -1;
    }
    size_t n = strlen(auth);
    if (n > 0 && auth[n - 1] == '/') n--;
    if (memchr(auth, '@', n)) return -1;
    const char *slash = memchr(auth, '/', n);
    if (slash) return slash > auth ? -2 : -1;
    if (cfg_parse_hostport(auth, n, out->tls ? 443 : 80, &out->host, &out->port) < 0) return -1;
    out->text = cfg_xstrdup(s);
    return 0;
}

static int hexval(char ch)
{
    if (ch >= '0' && ch <= '9') return ch - '0';
    if (ch >= 'a' && ch <= 'f') return ch - 'a' + 10;
    if (ch >= 'A' && ch <= 'F') return ch - 'A' + 10;
    return -1;
}

/* Percent-decodes s[0..n) into a new string; NULL when malformed. */
static char *percent_decode(const char *s, size_t n)
{
    char *out = cfg_xcalloc(n + 1, 1);
    size_t j = 0;
    for (size_t i = 0; i < n; i++) {
        if (s[i] != '%') {
            out[j++] = s[i];
            continue;
        }
        int hi = i + 2 < n ? hexval(s[i + 1]) : -1;
        int lo = i + 2 < n ? hexval(s[i + 2]) : -1;
        if (hi < 0 || lo < 0 || (hi == 0 && lo == 0)) {
            free(out);
            return NULL;
        }
        out[j++] = (char)(hi * 16 + lo);
        i += 2;
    }
    return out;
}

void cfg_redis_target_free(struct cfg_redis_target *t)
{
    free(t->host);
    free(t->username);
    free(t->password);
    memset(t, 0, sizeof *t);
}

/* The userinfo of a Redis URL, "[user]:password" (s[0..n)): an ACL user
 * with its password, or the password of the default user; both
 * percent-decoded. ":" alone means neither. */
static int parse_redis_userinfo(const char *s, size_t n, struct cfg_redis_target *t)
{
    const char *colon = memchr(s, ':', n);
    if (!colon) return -1; /* "user@" without a password is not in the grammar */
    size_t ulen = (size_t)(colon - s), plen = n - ulen - 1;
    if (ulen > 0 && !(t->username = percent_decode(s, ulen))) return -1;
    if (plen > 0 && !(t->password = percent_decode(colon + 1, plen))) return -1;
    if (t->username && !t->password) t->password = cfg_xstrdup("");
    return 0;
}

/* "redis://[[user]:password@]host[:port][/db]", the same with "rediss://"
 * (TLS), or "unix:///path". The database is any number Redis may have
 * (--databases can be large). Schemes are lower-case, as Redis clients
 * write them. */
int cfg_parse_redis_url(const char *s, struct cfg_redis_target *t)
{
    memset(t, 0, sizeof *t);
    if (strncmp(s, "unix://", 7) == 0) {
        if (s[7] != '/' || s[8] == '\0') return -1;
        t->unix_socket = true;
        t->host = cfg_xstrdup(s + 7);
        return 0;
    }
    const char *rest;
    if (strncmp(s, "redis://", 8) == 0) {
        rest = s + 8;
    } else if (strncmp(s, "rediss://", 9) == 0) {
        t->tls = true;
        rest = s + 9;
    } else {
        return -1;
    }
    const char *at = strrchr(rest, '@');
    if (at) {
        if (parse_redis_userinfo(rest, (size_t)(at - rest), t) < 0) goto bad;
        rest = at + 1;
    }
    const char *slash = strchr(rest, '/');
    size_t hlen = slash ? (size_t)(slash - rest) : strlen(rest);
    long long db = 0;
    if (slash && slash[1] && cfg_parse_uint(slash + 1, strlen(slash + 1), INT_MAX, &db) < 0)
        goto bad;
    if (cfg_parse_hostport(rest, hlen, 6379, &t->host, &t->port) < 0) goto bad;
    t->db = (int)db;
    return 0;
bad:
    cfg_redis_target_free(t);
    return -1;
}
