/* http1.c — strict, incremental, zero-copy HTTP/1.1 head parser (see
 * http1.h; the chunked body decoder is chunked.c, the writer writer.c).
 *
 * Owns only parsing: it never allocates, never copies and decides nothing
 * beyond message framing. A head is parsed in two steps: a cheap memchr scan
 * that finds the end of the head (and rejects bare LFs early), then a single
 * validating pass over the lines it recorded. */
#include "idemgate/http/http1.h"

#include <string.h>

#define MAX_LEADING_CRLF 4
#define MAX_LINES (HTTP1_MAX_HEADERS + 1) /* start line + headers */

/* Character classes, one bit each, so one table load answers any class. */
#define C_TCHAR 0x01 /* RFC 9110 token character */
#define C_VALUE 0x02 /* field-value byte: HTAB, SP, VCHAR, obs-text */

/* clang-format off */
static const unsigned char cls[256] = {
    ['\t'] = C_VALUE, [' '] = C_VALUE,
    ['!'] = C_TCHAR | C_VALUE, ['"'] = C_VALUE, ['#'] = C_TCHAR | C_VALUE,
    ['$'] = C_TCHAR | C_VALUE, ['%'] = C_TCHAR | C_VALUE, ['&'] = C_TCHAR | C_VALUE,
    ['\''] = C_TCHAR | C_VALUE, ['('] = C_VALUE, [')'] = C_VALUE,
    ['*'] = C_TCHAR | C_VALUE, ['+'] = C_TCHAR | C_VALUE, [','] = C_VALUE,
    ['-'] = C_TCHAR | C_VALUE, ['.'] = C_TCHAR | C_VALUE, ['/'] = C_VALUE,
    ['0' ... '9'] = C_TCHAR | C_VALUE,
    [':'] = C_VALUE, [';'] = C_VALUE, ['<'] = C_VALUE, ['='] = C_VALUE, ['>'] = C_VALUE,
    ['?'] = C_VALUE, ['@'] = C_VALUE,
    ['A' ... 'Z'] = C_TCHAR | C_VALUE,
    ['['] = C_VALUE, ['\\'] = C_VALUE, [']'] = C_VALUE, ['^'] = C_TCHAR | C_VALUE,
    ['_'] = C_TCHAR | C_VALUE, ['`'] = C_TCHAR | C_VALUE,
    ['a' ... 'z'] = C_TCHAR | C_VALUE,
    ['{'] = C_VALUE, ['|'] = C_TCHAR | C_VALUE, ['}'] = C_VALUE, ['~'] = C_TCHAR | C_VALUE,
    [0x80 ... 0xFF] = C_VALUE,
};
/* clang-format on */

static inline unsigned char to_lower(unsigned char c)
{
    return (unsigned char)(c - 'A') < 26 ? (unsigned char)(c | 0x20) : c;
}

static inline bool is_ows(char c)
{
    return c == ' ' || c == '\t';
}

/* Case-insensitive compare of n bytes; b must already be lowercase. */
static bool ieq_lower(const char *a, const char *b, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (to_lower((unsigned char)a[i]) != (unsigned char)b[i]) return false;
    return true;
}

static bool slice_is(const char *p, size_t n, const char *lower_name, size_t name_n)
{
    return n == name_n && ieq_lower(p, lower_name, n);
}

#define SLICE_IS(p, n, lit) slice_is((p), (n), lit, sizeof(lit) - 1)

bool http1_slice_ieq(struct http1_slice s, const char *name)
{
    size_t n = strlen(name);
    if (s.n != n) return false;
    for (size_t i = 0; i < n; i++)
        if (to_lower((unsigned char)s.p[i]) != to_lower((unsigned char)name[i])) return false;
    return true;
}

/* ---- end-of-head scan ---------------------------------------------------- */

/* Where the lines of a head end: lf[i] is the LF ending line i. */
struct line_index {
    const char *lf[MAX_LINES];
    size_t n;
};

/* Skips up to MAX_LEADING_CRLF empty lines before a request line (RFC 9112
 * 2.2) and sets *start to the request line. Returns 0, 1 when only empty
 * lines (or a lone CR) were seen so far, or HTTP1_EBAD. */
static int skip_leading_crlf(const char *buf, size_t lim, size_t *start)
{
    size_t i = 0;
    for (int k = 0; i < lim; k++) {
        if (buf[i] == '\n') return HTTP1_EBAD;
        if (buf[i] != '\r') break;
        if (i + 1 >= lim) return 1;
        if (buf[i + 1] != '\n') return HTTP1_EBAD;
        if (k == MAX_LEADING_CRLF) return HTTP1_EBAD;
        i += 2;
    }
    *start = i;
    return i < lim ? 0 : 1;
}

/* Finds the CRLF CRLF ending the head that starts at buf + start, looking at
 * no more than lim bytes. Returns the head's end offset, 0 when not found, or
 * a negative error (a bare LF, an empty start line, too many lines). */
static long scan_head(const char *buf, size_t start, size_t lim, struct line_index *li)
{
    const char *p = buf + start, *end = buf + lim, *q;
    li->n = 0;
    while ((q = memchr(p, '\n', (size_t)(end - p))) != NULL) {
        if (q == buf + start || q[-1] != '\r') return HTTP1_EBAD;
        if (q - p == 1) {                      /* empty line */
            if (li->n == 0) return HTTP1_EBAD; /* no start line */
            return q + 1 - buf;
        }
        if (li->n == MAX_LINES) return HTTP1_ETOOMANY;
        li->lf[li->n++] = q;
        p = q + 1;
    }
    return 0;
}

/* ---- line validation ----------------------------------------------------- */

static bool all_tchar(const char *p, size_t n)
{
    if (n == 0) return false;
    for (size_t i = 0; i < n; i++)
        if (!(cls[(unsigned char)p[i]] & C_TCHAR)) return false;
    return true;
}

/* Word-at-a-time test for any byte < 0x20 or == 0x7F (bit hacks from
 * "Bit Twiddling Hacks"; exact as to whether any byte matches). */
static inline bool word_has_ctl(uint64_t x)
{
    const uint64_t ones = 0x0101010101010101ULL, highs = 0x8080808080808080ULL;
    uint64_t lt20 = (x - ones * 0x20) & ~x & highs;
    uint64_t y = x ^ (ones * 0x7F);
    uint64_t eq7f = (y - ones) & ~y & highs;
    return (lt20 | eq7f) != 0;
}

static bool all_value(const char *p, size_t n)
{
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        uint64_t w;
        memcpy(&w, p + i, 8);
        if (!word_has_ctl(w)) continue;
        for (size_t j = i; j < i + 8; j++)
            if (!(cls[(unsigned char)p[j]] & C_VALUE)) return false;
    }
    for (; i < n; i++)
        if (!(cls[(unsigned char)p[i]] & C_VALUE)) return false;
    return true;
}

static bool all_visible(const char *p, size_t n)
{
    if (n == 0) return false;
    for (size_t i = 0; i < n; i++)
        if ((unsigned char)(p[i] - 0x21) > 0x7E - 0x21) return false;
    return true;
}

/* "HTTP/1.0" or "HTTP/1.1": sets *minor. Other "HTTP/d.d" -> EVERSION. */
static int parse_version(const char *p, size_t n, int *minor)
{
    if (n != 8 || memcmp(p, "HTTP/", 5) != 0 || p[6] != '.') return HTTP1_EBAD;
    if ((unsigned char)(p[5] - '0') > 9 || (unsigned char)(p[7] - '0') > 9) return HTTP1_EBAD;
    if (p[5] != '1' || (p[7] != '0' && p[7] != '1')) return HTTP1_EVERSION;
    *minor = p[7] - '0';
    return 0;
}

static int parse_request_line(const char *s, const char *e, struct http1_head *h)
{
    const char *sp1 = memchr(s, ' ', (size_t)(e - s));
    if (!sp1) return HTTP1_EBAD;
    const char *t = sp1 + 1;
    const char *sp2 = memchr(t, ' ', (size_t)(e - t));
    if (!sp2) return HTTP1_EBAD;
    h->method = (struct http1_slice){s, (size_t)(sp1 - s)};
    h->target = (struct http1_slice){t, (size_t)(sp2 - t)};
    if (!http1_method_valid(h->method.p, h->method.n)) return HTTP1_EBAD;
    if (!all_visible(h->target.p, h->target.n)) return HTTP1_EBAD;
    return parse_version(sp2 + 1, (size_t)(e - sp2 - 1), &h->minor_version);
}

/* "HTTP/1.x SP 3DIGIT [SP reason]" */
static int parse_status_line(const char *s, const char *e, struct http1_head *h)
{
    size_t n = (size_t)(e - s);
    if (n < 8) return HTTP1_EBAD;
    int rc = parse_version(s, 8, &h->minor_version);
    if (rc) return rc;
    if (n < 12 || s[8] != ' ') return HTTP1_EBAD;
    const char *d = s + 9;
    if ((unsigned char)(d[0] - '1') > 4 || (unsigned char)(d[1] - '0') > 9 ||
        (unsigned char)(d[2] - '0') > 9)
        return HTTP1_EBAD;
    h->status = (d[0] - '0') * 100 + (d[1] - '0') * 10 + (d[2] - '0');
    const char *r = s + 12;
    if (r == e) {
        h->reason = (struct http1_slice){r, 0};
        return 0;
    }
    if (*r != ' ') return HTTP1_EBAD;
    r++;
    if (!all_value(r, (size_t)(e - r))) return HTTP1_EBAD;
    h->reason = (struct http1_slice){r, (size_t)(e - r)};
    return 0;
}

/* ---- header semantics ---------------------------------------------------- */

/* What the framing-relevant headers said, gathered in the one pass. */
struct framing {
    int cl_count;
    uint64_t cl;
    int te_count;
    int te_codings;      /* total codings over all TE headers */
    bool te_final_chunk; /* the last coding seen is chunked */
    bool te_chunk_seen;  /* chunked seen anywhere */
    bool te_bad;         /* empty element, or chunked applied twice */
    bool te_unknown;     /* a coding not registered in RFC 9110 */
    int host_count;
    const struct http1_header *host; /* the (first) Host header */
    bool conn_close, conn_keep_alive, expect_continue, conn_seen;
};

static int parse_content_length(const char *p, size_t n, uint64_t *out)
{
    if (n == 0 || n > 19) return HTTP1_EBAD;
    uint64_t v = 0;
    for (size_t i = 0; i < n; i++) {
        unsigned d = (unsigned char)(p[i] - '0');
        if (d > 9) return HTTP1_EBAD;
        v = v * 10 + d; /* 19 digits < 2^64: no overflow */
    }
    *out = v;
    return 0;
}

/* Calls fn for each OWS-trimmed element of a comma-separated list (empty
 * elements included, with n == 0). */
static void for_each_element(const char *p, size_t n,
                             void (*fn)(const char *p, size_t n, void *arg), void *arg)
{
    const char *e = p + n;
    for (;;) {
        const char *c = memchr(p, ',', (size_t)(e - p));
        const char *ee = c ? c : e, *s = p;
        while (s < ee && is_ows(*s))
            s++;
        while (ee > s && is_ows(ee[-1]))
            ee--;
        fn(s, (size_t)(ee - s), arg);
        if (!c) return;
        p = c + 1;
    }
}

static void te_element(const char *p, size_t n, void *arg)
{
    struct framing *f = arg;
    if (n == 0) {
        f->te_bad = true;
        return;
    }
    bool chunked = SLICE_IS(p, n, "chunked");
    if (!all_tchar(p, n)) f->te_bad = true;
    if (!chunked && !SLICE_IS(p, n, "gzip") && !SLICE_IS(p, n, "deflate") &&
        !SLICE_IS(p, n, "compress") && !SLICE_IS(p, n, "x-gzip") && !SLICE_IS(p, n, "x-compress"))
        f->te_unknown = true;
    if (chunked && f->te_chunk_seen) f->te_bad = true; /* RFC 9112 6.1: at most once */
    f->te_chunk_seen |= chunked;
    f->te_final_chunk = chunked;
    f->te_codings++;
}

static void conn_element(const char *p, size_t n, void *arg)
{
    struct framing *f = arg;
    if (SLICE_IS(p, n, "close"))
        f->conn_close = true;
    else if (SLICE_IS(p, n, "keep-alive"))
        f->conn_keep_alive = true;
}

static int note_header(const struct http1_header *hd, struct framing *f)
{
    const char *p = hd->name.p, *v = hd->value.p;
    size_t n = hd->name.n, vn = hd->value.n;
    switch (n) {
    case 4:
        if (SLICE_IS(p, n, "host")) {
            f->host_count++;
            if (!f->host) f->host = hd;
        }
        break;
    case 6:
        if (SLICE_IS(p, n, "expect") && SLICE_IS(v, vn, "100-continue")) f->expect_continue = true;
        break;
    case 10:
        if (SLICE_IS(p, n, "connection")) {
            f->conn_seen = true;
            for_each_element(v, vn, conn_element, f);
        }
        break;
    case 14:
        if (SLICE_IS(p, n, "content-length")) {
            if (++f->cl_count > 1) return HTTP1_EBAD;
            return parse_content_length(v, vn, &f->cl);
        }
        break;
    case 17:
        if (SLICE_IS(p, n, "transfer-encoding")) {
            f->te_count++;
            for_each_element(v, vn, te_element, f);
        }
        break;
    }
    return 0;
}

static int parse_header_line(const char *s, const char *e, struct http1_header *hd)
{
    const char *c = s;
    while (c < e && (cls[(unsigned char)*c] & C_TCHAR))
        c++;
    /* also rejects obs-fold (line starting with SP/HTAB) and "Name :" */
    if (c == s || c == e || *c != ':') return HTTP1_EBAD;
    const char *v = c + 1;
    if (!all_value(v, (size_t)(e - v))) return HTTP1_EBAD;
    while (v < e && is_ows(*v))
        v++;
    while (e > v && is_ows(e[-1]))
        e--;
    hd->name = (struct http1_slice){s, (size_t)(c - s)};
    hd->value = (struct http1_slice){v, (size_t)(e - v)};
    return 0;
}

/* Parses header lines 1..n-1 of li into h, gathering framing facts. */
static int parse_headers(const struct line_index *li, struct http1_head *h, struct framing *f)
{
    memset(f, 0, sizeof(*f));
    h->n_headers = 0;
    for (size_t i = 1; i < li->n; i++) {
        struct http1_header *hd = &h->headers[h->n_headers];
        int rc = parse_header_line(li->lf[i - 1] + 1, li->lf[i] - 1, hd);
        if (rc) return rc;
        h->n_headers++;
        rc = note_header(hd, f);
        if (rc) return rc;
    }
    if (f->te_bad || (f->cl_count && f->te_count)) return HTTP1_EBAD;
    return 0;
}

static void head_reset(struct http1_head *h)
{
    h->method = h->target = h->reason = (struct http1_slice){NULL, 0};
    h->status = 0;
    h->minor_version = 0;
    h->keep_alive = false;
    h->expect_continue = false;
    h->has_connection = false;
    h->host = (struct http1_slice){NULL, 0};
    h->body = HTTP1_BODY_NONE;
    h->content_length = 0;
    h->n_headers = 0;
}

static bool keep_alive(int minor, const struct framing *f)
{
    if (f->conn_close) return false;
    return minor == 1 || f->conn_keep_alive;
}

/* Locates a complete head: returns its length, HTTP1_INCOMPLETE or an error. */

/* An incomplete request whose method already holds a non-token byte will
 * never become valid: say so now rather than wait for a head end that a
 * TLS ClientHello or other binary junk never sends. */
static bool method_prefix_bad(const char *p, size_t n)
{
    const char *sp = memchr(p, ' ', n);
    size_t m = sp ? (size_t)(sp - p) : n;
    return (m > 0 && !all_tchar(p, m)) || (sp && m == 0);
}

static long locate_head(const char *buf, size_t len, size_t max_head, bool request, size_t *start,
                        struct line_index *li)
{
    size_t lim = len < max_head ? len : max_head;
    long end = 0;
    *start = 0;
    if (request) {
        int rc = skip_leading_crlf(buf, lim, start);
        if (rc < 0) return rc;
        if (rc == 0) end = scan_head(buf, *start, lim, li);
        if (end == 0 && rc == 0 && method_prefix_bad(buf + *start, lim - *start)) return HTTP1_EBAD;
    } else if (lim > 0) {
        end = scan_head(buf, 0, lim, li);
    }
    if (end != 0) return end;
    return len >= max_head ? HTTP1_ETOOLARGE : HTTP1_INCOMPLETE;
}

long http1_parse_request(const char *buf, size_t len, size_t max_head, struct http1_head *h)
{
    struct line_index li;
    struct framing f;
    size_t start;
    head_reset(h);
    long end = locate_head(buf, len, max_head, true, &start, &li);
    if (end <= 0) return end;

    int rc = parse_request_line(buf + start, li.lf[0] - 1, h);
    if (rc) return rc;
    rc = parse_headers(&li, h, &f);
    if (rc) return rc;
    if (f.host_count > 1 || (h->minor_version == 1 && f.host_count != 1)) return HTTP1_EBAD;
    if (f.host) h->host = f.host->value;

    if (f.te_count) {
        /* RFC 9112 6.1: TE in HTTP/1.0 means faulty framing; 6.3 rule 4:
         * a final coding other than chunked cannot be delimited. */
        if (h->minor_version == 0) return HTTP1_EBAD;
        /* RFC 9110 6.1: a coding we do not know is 501, not 400. */
        if (!f.te_final_chunk) return f.te_unknown ? HTTP1_ENOTIMPL : HTTP1_EBAD;
        if (f.te_codings > 1) return HTTP1_ENOTIMPL;
        h->body = HTTP1_BODY_CHUNKED;
    } else if (f.cl_count) {
        h->body = HTTP1_BODY_LENGTH;
        h->content_length = f.cl;
    }
    h->keep_alive = keep_alive(h->minor_version, &f);
    h->has_connection = f.conn_seen;
    h->expect_continue = h->minor_version == 1 && f.expect_continue;
    return end;
}

long http1_parse_response(const char *buf, size_t len, size_t max_head, bool head_request,
                          struct http1_head *h)
{
    struct line_index li;
    struct framing f;
    size_t start;
    head_reset(h);
    long end = locate_head(buf, len, max_head, false, &start, &li);
    if (end <= 0) return end;

    int rc = parse_status_line(buf, li.lf[0] - 1, h);
    if (rc) return rc;
    rc = parse_headers(&li, h, &f);
    if (rc) return rc;
    if (f.te_count && h->minor_version == 0) return HTTP1_EBAD;

    h->keep_alive = keep_alive(h->minor_version, &f);
    h->has_connection = f.conn_seen;
    h->content_length = f.cl;
    if (head_request || h->status < 200 || h->status == 204 || h->status == 304) {
        h->body = HTTP1_BODY_NONE;
    } else if (f.te_count) {
        /* a coding under chunked would reach the client undeclared once the
         * hop-by-hop Transfer-Encoding is dropped: refuse it */
        if (f.te_final_chunk && f.te_codings > 1) return HTTP1_ENOTIMPL;
        /* RFC 9112 6.3 would read a non-chunked coding to the close; we
         * would then forward (and keep) a body in a coding the client is
         * never told of, so such an answer is malformed to us (docs/requests.md). */
        if (!f.te_final_chunk) return HTTP1_ENOTIMPL;
        h->body = HTTP1_BODY_CHUNKED;
    } else if (f.cl_count) {
        h->body = HTTP1_BODY_LENGTH;
    } else {
        h->body = HTTP1_BODY_CLOSE;
    }
    if (h->body == HTTP1_BODY_CLOSE) h->keep_alive = false;
    return end;
}

/* ---- header lookup and hop-by-hop ---------------------------------------- */

const struct http1_header *http1_find_header(const struct http1_head *h, const char *name,
                                             size_t *count)
{
    size_t n = strlen(name), found = 0;
    const struct http1_header *first = NULL;
    for (size_t i = 0; i < h->n_headers; i++) {
        const struct http1_header *hd = &h->headers[i];
        if (hd->name.n != n || !http1_slice_ieq(hd->name, name)) continue;
        if (!first) first = hd;
        found++;
    }
    if (count) *count = found;
    return first;
}

static bool fixed_hop_by_hop(const char *p, size_t n)
{
    switch (n) {
    case 2:
        return SLICE_IS(p, n, "te");
    case 7:
        return SLICE_IS(p, n, "trailer") || SLICE_IS(p, n, "upgrade");
    case 10:
        return SLICE_IS(p, n, "connection") || SLICE_IS(p, n, "keep-alive");
    case 17:
        return SLICE_IS(p, n, "transfer-encoding");
    }
    return false;
}

struct token_search {
    struct http1_slice name;
    bool found;
};

static void match_token(const char *p, size_t n, void *arg)
{
    struct token_search *ts = arg;
    if (n != ts->name.n || ts->found) return;
    for (size_t i = 0; i < n; i++)
        if (to_lower((unsigned char)p[i]) != to_lower((unsigned char)ts->name.p[i])) return;
    ts->found = true;
}

bool http1_is_hop_by_hop(const struct http1_head *h, size_t i)
{
    if (i >= h->n_headers) return false;
    struct http1_slice name = h->headers[i].name;
    if (fixed_hop_by_hop(name.p, name.n)) return true;
    if (name.n >= 6 && ieq_lower(name.p, "proxy-", 6)) return true;
    /* Known at parse time: most heads have no Connection header at all,
     * and then this per-header scan of all headers is skipped. */
    if (!h->has_connection) return false;
    struct token_search ts = {name, false};
    for (size_t k = 0; k < h->n_headers && !ts.found; k++) {
        const struct http1_header *hd = &h->headers[k];
        if (SLICE_IS(hd->name.p, hd->name.n, "connection"))
            for_each_element(hd->value.p, hd->value.n, match_token, &ts);
    }
    return ts.found;
}

bool http1_method_valid(const char *p, size_t n)
{
    if (n == 0 || !all_tchar(p, n)) return false;
    /* Methods are case-sensitive (RFC 9110 9.1): "post" is not POST, and
     * would slip past a policy for POST. nginx refuses them too. */
    for (size_t i = 0; i < n; i++)
        if ((unsigned char)(p[i] - 'a') < 26) return false;
    return true;
}

bool http1_is_tchar(unsigned char c)
{
    return (cls[c] & C_TCHAR) != 0;
}

bool http1_is_value_byte(unsigned char c)
{
    return (cls[c] & C_VALUE) != 0;
}
