/* target.h — the request target, normalized (docs/requests.md), and the Host
 * header's syntax (docs/headers.md).
 *
 * Route, policy and fingerprint are decided on the normalized target, and
 * the upstream receives it, so no spelling of a path reaches the upstream
 * under another route's policy:
 *  - absolute form ("http://host:port/p?q") becomes origin form ("/p?q"),
 *    its authority is handed back (it replaces Host); userinfo
 *    ("http://u:p@h/") and any scheme but http/https are refused;
 *  - in the path, percent-encoded unreserved characters (RFC 3986 2.3) are
 *    decoded ("%72" is "r"), other escapes kept with upper-case hex ("%2f"
 *    becomes "%2F", it stays encoded); a bad escape is refused;
 *  - repeated slashes are merged, "." and ".." segments resolved
 *    (RFC 3986 5.2.4); climbing above the root is refused;
 *  - the query is kept as it came; a fragment ('#') is refused.
 * Nothing here allocates; every function is pure. */
#ifndef IDEMGATE_TARGET_H
#define IDEMGATE_TARGET_H

#include <stdbool.h>
#include <stddef.h>

/* True when t[0..n) is an origin-form target that normalization would
 * leave unchanged, found by one cheap scan (the common case: no '%', no
 * "//", no "/.", no '#'). False means "call target_normalize", not "bad". */
bool target_is_normal(const char *t, size_t n);

/* Normalizes t[0..n) into out, which must hold n + 1 bytes (the result is
 * never longer). Returns the normalized length, or -1 for a target that is
 * refused (400). For an absolute-form target, *auth / *auth_len are set to
 * its authority (a slice of t, borrowed); otherwise *auth is NULL. */
long target_normalize(const char *t, size_t n, char *out, const char **auth, size_t *auth_len);

/* True when p[0..n) is a valid Host: host[:port], with host a reg-name
 * (unreserved, sub-delims, percent escapes; no "..") of at most 255
 * bytes, an IPv4 address or a bracketed IPv6/IPvFuture literal, and port
 * 1 to 5 digits up to 65535. */
bool target_host_valid(const char *p, size_t n);

#endif
