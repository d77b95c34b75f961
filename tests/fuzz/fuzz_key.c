/* fuzz_key.c — libFuzzer driver for idem_key_parse: a key accepted is
 * 1..max_len bytes of 0x21..0x7E, NUL-terminated; the output never grows
 * past n + 1 bytes; a valid key parses to itself, and quoting it (with \"
 * and \\ escaped) gives it back. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "idemgate/idem/fingerprint.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void check_key(const char *k, size_t len, size_t max_len)
{
    if (len == 0 || len > max_len || k[len] != '\0') abort();
    for (size_t i = 0; i < len; i++)
        if ((unsigned char)k[i] < 0x21 || (unsigned char)k[i] > 0x7E) abort();
}

/* Quoting a valid key as an sf-string must parse back to the same key. */
static void check_quoted_round_trip(const char *k, size_t len, size_t max_len)
{
    char *q = malloc(2 * len + 2);
    char *back = malloc(2 * len + 3);
    if (!q || !back) abort();
    size_t n = 0;
    q[n++] = '"';
    for (size_t i = 0; i < len; i++) {
        if (k[i] == '"' || k[i] == '\\') q[n++] = '\\';
        q[n++] = k[i];
    }
    q[n++] = '"';
    size_t back_len;
    if (idem_key_parse(q, n, max_len, back, &back_len) != 0) abort();
    if (back_len != len || memcmp(back, k, len) != 0) abort();
    free(q);
    free(back);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1) return 0;
    size_t max_len = data[0]; /* first byte: the configured maximum */
    const char *in = (const char *)data + 1;
    size_t n = size - 1;
    /* Exactly n + 1 bytes, the documented capacity, so ASan sees overruns. */
    char *out = malloc(n + 1);
    if (!out) abort();
    size_t len = 12345;
    if (idem_key_parse(in, n, max_len, out, &len) == 0) {
        check_key(out, len, max_len);
        if (len > n) abort();
        /* A plain value that is valid is the key itself. */
        if (n > 0 && in[0] != '"' && (len != n || memcmp(out, in, n) != 0)) abort();
        check_quoted_round_trip(out, len, max_len);
    }
    free(out);
    return 0;
}
