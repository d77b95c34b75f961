/* target.c — request-target normalization and Host syntax (see target.h).
 * Owns nothing: pure functions over the caller's bytes. */
#include "idemgate/http/target.h"

#include <string.h>
#include <strings.h>

static int hexval(unsigned char c)
{
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

static bool is_alnum(unsigned char c)
{
    return (c >= '0' && c <= '9') || ((c | 0x20) >= 'a' && (c | 0x20) <= 'z');
}

/* RFC 3986 2.3 */
static bool is_unreserved(unsigned char c)
{
    return is_alnum(c) || c == '-' || c == '.' || c == '_' || c == '~';
}

/* RFC 3986 2.2 */
static bool is_sub_delim(unsigned char c)
{
    return c != '\0' && strchr("!$&'()*+,;=", c) != NULL;
}

bool target_is_normal(const char *t, size_t n)
{
    if (n == 0 || t[0] != '/') return false;
    for (size_t i = 0; i < n; i++) {
        char c = t[i];
        if (c == '?') return memchr(t + i, '#', n - i) == NULL;
        if (c == '%' || c == '#') return false;
        if (c == '/' && i + 1 < n && (t[i + 1] == '/' || t[i + 1] == '.')) return false;
    }
    return true;
}

/* Copies path p[0..n) into out, decoding escapes of unreserved characters
 * and upper-casing the rest. Returns the length or -1 on a bad escape. */
static long decode_path(const char *p, size_t n, char *out)
{
    static const char hex[] = "0123456789ABCDEF";
    size_t w = 0;
    for (size_t i = 0; i < n; i++) {
        if (p[i] != '%') {
            out[w++] = p[i];
            continue;
        }
        if (i + 2 >= n) return -1;
        int hi = hexval((unsigned char)p[i + 1]), lo = hexval((unsigned char)p[i + 2]);
        if (hi < 0 || lo < 0) return -1;
        unsigned char v = (unsigned char)(hi << 4 | lo);
        if (is_unreserved(v)) {
            out[w++] = (char)v;
        } else {
            out[w++] = '%';
            out[w++] = hex[hi];
            out[w++] = hex[lo];
        }
        i += 2;
    }
    return (long)w;
}

/* Merges slashes and resolves dot segments of p[0..n) in place (the
 * output never outruns the input). Returns the new length (p starts with
 * '/') or -1 when ".." climbs above the root. p must have room for one
 * more byte than n (an empty path becomes "/"). */
static long resolve_segments(char *p, size_t n)
{
    size_t o = 0, i = 0;
    bool trailing = false;
    while (i < n) {
        while (i < n && p[i] == '/')
            i++;
        size_t j = i;
        while (j < n && p[j] != '/')
            j++;
        size_t len = j - i;
        bool last = j >= n;
        if (len == 0) { /* ended with a slash */
            trailing = true;
            break;
        }
        if (len == 1 && p[i] == '.') {
            trailing = last;
        } else if (len == 2 && p[i] == '.' && p[i + 1] == '.') {
            if (o == 0) return -1;
            while (p[o - 1] != '/')
                o--;
            o--;
            trailing = last;
        } else {
            p[o++] = '/';
            memmove(p + o, p + i, len);
            o += len;
            trailing = false;
        }
        i = j;
    }
    if (o == 0 || trailing) p[o++] = '/';
    return (long)o;
}

/* Splits an absolute-form target: scheme check, authority, rest. */
static int split_absolute(const char *t, size_t n, const char **auth, size_t *auth_len,
                          size_t *rest)
{
    size_t s;
    if (n >= 7 && strncasecmp(t, "http://", 7) == 0)
        s = 7;
    else if (n >= 8 && strncasecmp(t, "https://", 8) == 0)
        s = 8;
    else
        return -1;
    size_t e = s;
    while (e < n && t[e] != '/' && t[e] != '?' && t[e] != '#')
        e++;
    /* userinfo would be logged and forwarded: refused (docs/requests.md) */
    if (memchr(t + s, '@', e - s) || !target_host_valid(t + s, e - s)) return -1;
    *auth = t + s;
    *auth_len = e - s;
    *rest = e;
    return 0;
}

long target_normalize(const char *t, size_t n, char *out, const char **auth, size_t *auth_len)
{
    *auth = NULL;
    *auth_len = 0;
    if (memchr(t, '#', n)) return -1;
    size_t start = 0;
    if (n == 0) return -1;
    if (t[0] != '/' && split_absolute(t, n, auth, auth_len, &start) < 0) return -1;
    const char *q = memchr(t + start, '?', n - start);
    size_t path_end = q ? (size_t)(q - t) : n;
    /* an absolute form's empty path is "/"; decoding keeps the leading
     * slash, if any, in place */
    long w = decode_path(t + start, path_end - start, out);
    if (w < 0) return -1;
    if (w > 0 && out[0] != '/') return -1;
    long o = resolve_segments(out, (size_t)w);
    if (o < 0) return -1;
    size_t qlen = n - path_end;
    memcpy(out + o, t + path_end, qlen);
    return o + (long)qlen;
}

static bool valid_port(const char *p, size_t n)
{
    if (n == 0 || n > 5) return false;
    unsigned v = 0;
    for (size_t i = 0; i < n; i++) {
        if (p[i] < '0' || p[i] > '9') return false;
        v = v * 10 + (unsigned)(p[i] - '0');
    }
    return v <= 65535;
}

static bool valid_reg_name(const char *p, size_t n)
{
    if (n == 0 || n > 255) return false;
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)p[i];
        if (c == '%') {
            if (i + 2 >= n || hexval((unsigned char)p[i + 1]) < 0 ||
                hexval((unsigned char)p[i + 2]) < 0)
                return false;
            i += 2;
        } else if (c == '.' && i + 1 < n && p[i + 1] == '.') {
            return false;
        } else if (!is_unreserved(c) && !is_sub_delim(c)) {
            return false;
        }
    }
    return true;
}

static bool valid_ip_literal(const char *p, size_t n)
{
    if (n < 3 || p[0] != '[' || p[n - 1] != ']') return false;
    for (size_t i = 1; i + 1 < n; i++) {
        unsigned char c = (unsigned char)p[i];
        if (!is_unreserved(c) && !is_sub_delim(c) && c != ':') return false;
    }
    return true;
}

bool target_host_valid(const char *p, size_t n)
{
    if (n > 0 && p[0] == '[') {
        const char *close = memchr(p, ']', n);
        if (!close) return false;
        size_t hl = (size_t)(close - p) + 1;
        if (hl == n) return valid_ip_literal(p, n);
        return p[hl] == ':' && valid_ip_literal(p, hl) && valid_port(p + hl + 1, n - hl - 1);
    }
    const char *colon = memchr(p, ':', n);
    if (!colon) return valid_reg_name(p, n);
    size_t hl = (size_t)(colon - p);
    return valid_reg_name(p, hl) && valid_port(colon + 1, n - hl - 1);
}
