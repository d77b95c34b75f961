/* http1.h — strict, incremental, zero-copy HTTP/1.1 parsing (RFC 9112).
 *
 * The parsers never allocate and never copy: every slice points into the
 * caller's buffer and stays valid only while that buffer is unchanged.
 * "Incremental": call again with the same buffer after more bytes arrived;
 * a head is either complete (its length is returned) or more is needed.
 * The chunked decoder keeps its own small state across calls and hands back
 * data slices of the input.
 *
 * Strictness (each a HTTP1_EBAD unless noted): both Content-Length and
 * Transfer-Encoding; Content-Length repeated or listed ("5, 5"); a non-digit
 * or overflowing Content-Length; a Transfer-Encoding other than exactly
 * "chunked" as the final coding (HTTP1_ENOTIMPL for unknown codings in a
 * request, and for any response whose final coding is not chunked);
 * a method with a lower-case letter (methods are case-sensitive); obs-fold (a header line starting
 * with SP/HTAB); a bare CR or a bare LF anywhere in the head; whitespace between a header name and
 * ':'; an empty or non-token header name or method; control characters (other than HTAB) in values;
 * a request target with a space or control; a version other than HTTP/1.0 or HTTP/1.1
 * (HTTP1_EVERSION); a head longer than max_head (HTTP1_ETOOLARGE); more than HTTP1_MAX_HEADERS
 * headers (HTTP1_ETOOMANY). Leading empty lines before a request line (RFC 9112 2.2) are tolerated
 * only as CRLF, at most a few. */
#ifndef IDEMGATE_HTTP1_H
#define IDEMGATE_HTTP1_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define HTTP1_MAX_HEADERS 100

#include "idemgate/http/chunked.h"

struct http1_header {
    struct http1_slice name;  /* as sent (case preserved) */
    struct http1_slice value; /* leading/trailing SP/HTAB trimmed */
};

enum http1_body {
    HTTP1_BODY_NONE,    /* no body (or HEAD/1xx/204/304 response) */
    HTTP1_BODY_LENGTH,  /* content_length bytes follow */
    HTTP1_BODY_CHUNKED, /* chunked transfer coding */
    HTTP1_BODY_CLOSE    /* responses only: body runs until the connection closes */
};

/* One parsed request or response head. */
struct http1_head {
    /* requests */
    struct http1_slice method;
    struct http1_slice target;
    /* responses */
    int status;
    struct http1_slice reason;
    /* both */
    int minor_version;       /* 0 or 1 */
    bool keep_alive;         /* from version and Connection: close/keep-alive */
    bool expect_continue;    /* request carried Expect: 100-continue */
    bool has_connection;     /* a Connection header is present (hop-by-hop checks) */
    struct http1_slice host; /* requests: the Host value (p NULL when none came) */
    enum http1_body body;
    uint64_t content_length; /* when body == HTTP1_BODY_LENGTH */
    size_t n_headers;
    struct http1_header headers[HTTP1_MAX_HEADERS];
};

/* Parse results (negative are errors). */
#define HTTP1_INCOMPLETE 0
#define HTTP1_EBAD (-1)      /* malformed: 400 */
#define HTTP1_ETOOLARGE (-2) /* head over max_head: 431 */
#define HTTP1_ETOOMANY (-3)  /* too many headers: 431 */
#define HTTP1_EVERSION (-4)  /* unsupported HTTP version: 505 */
#define HTTP1_ENOTIMPL (-5)  /* unsupported transfer coding: 501 */

/* Parses a request head from buf[0..len). Returns the head's length in bytes
 * (including the final CRLF CRLF) when complete, HTTP1_INCOMPLETE when more
 * bytes are needed (and len < max_head), or a negative HTTP1_E*. h is
 * written (borrowed slices into buf). */
long http1_parse_request(const char *buf, size_t len, size_t max_head, struct http1_head *h);

/* Parses a response head. head_request: the request was HEAD (so no body).
 * Body rules per RFC 9112 6.3: HEAD, 1xx, 204, 304 -> NONE; chunked ->
 * CHUNKED; Content-Length -> LENGTH; otherwise CLOSE. 1xx heads are returned
 * like any head (status 100..199); the caller skips them. */
long http1_parse_response(const char *buf, size_t len, size_t max_head, bool head_request,
                          struct http1_head *h);

/* RFC 9110 character classes: a token character; a field-value byte
 * (HTAB, SP, VCHAR, obs-text). */
bool http1_is_tchar(unsigned char c);
/* A method idemgate accepts, over either protocol: a token without a
 * lower-case letter ("post" is not POST, and would slip past a policy for
 * POST). */
bool http1_method_valid(const char *p, size_t n);
bool http1_is_value_byte(unsigned char c);

/* Case-insensitive comparison of a slice with a NUL-terminated name. */
bool http1_slice_ieq(struct http1_slice s, const char *name);
/* Finds the first header named name (case-insensitive), or NULL. *count (if
 * non-NULL) is set to the number of headers with that name. */
const struct http1_header *http1_find_header(const struct http1_head *h, const char *name,
                                             size_t *count);

/* True when headers[i] must not be forwarded by a proxy: Connection,
 * Keep-Alive, TE, Trailer, Transfer-Encoding, Upgrade, Proxy-* (any header
 * starting with "Proxy-"), and every header named as a token in any
 * Connection header of the same head. Content-Length is NOT hop-by-hop
 * (the caller decides about framing). */
bool http1_is_hop_by_hop(const struct http1_head *h, size_t i);

#endif
