/* fuzz_target.c — libFuzzer driver for target_normalize and
 * target_host_valid. Invariants: the result fits in n + 1 bytes (the
 * documented capacity, so ASan sees an overrun); it starts with '/'; its
 * path has no empty, "." or ".." segment and no escape of an unreserved
 * character; normalizing it again gives it back unchanged; target_is_normal
 * never says "normal" for an input that normalization would change; an
 * absolute form's authority is a valid Host. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "idemgate/http/target.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void check_path(const char *p, size_t n)
{
    const char *q = memchr(p, '?', n);
    size_t pn = q ? (size_t)(q - p) : n;
    if (pn == 0 || p[0] != '/') abort();
    for (size_t i = 0; i < pn; i++) {
        if (p[i] == '/' && i + 1 < pn && p[i + 1] == '/') abort();
        if (p[i] == '/' && i + 1 < pn && p[i + 1] == '.' &&
            (i + 2 == pn || p[i + 2] == '/' ||
             (p[i + 2] == '.' && (i + 3 == pn || p[i + 3] == '/'))))
            abort();
        if (p[i] == '%') {
            if (i + 2 >= pn) abort();
            char a = p[i + 1], b = p[i + 2];
            if ((a >= 'a' && a <= 'f') || (b >= 'a' && b <= 'f')) abort(); /* upper-case hex */
        }
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const char *in = (const char *)data;
    char *out = malloc(size + 1);
    if (!out) abort();
    const char *auth;
    size_t auth_len;
    long n = target_normalize(in, size, out, &auth, &auth_len);
    if (target_is_normal(in, size) && (n != (long)size || memcmp(out, in, size) != 0)) abort();
    if (n >= 0) {
        if ((size_t)n > size + 1) abort();
        check_path(out, (size_t)n);
        if (auth && !target_host_valid(auth, auth_len)) abort();
        char *again = malloc((size_t)n + 1);
        if (!again) abort();
        const char *auth2;
        size_t auth2_len;
        long m = target_normalize(out, (size_t)n, again, &auth2, &auth2_len);
        if (m != n || memcmp(again, out, (size_t)n) != 0 || auth2) abort();
        free(again);
    }
    (void)target_host_valid(in, size);
    free(out);
    return 0;
}
