/* webhook.h — a webhook delivery's checks (docs/webhooks.md): is it signed
 * by one of the route's secrets, and what is its idempotency key.
 *
 * Pure: no I/O, no state, the wall clock from core/clock (fakeable), so
 * every case is a unit test. Runs when an exchange starts, before the
 * engine (proxy/checks.c), on the whole request as received: the raw body
 * and the headers as sent. Every comparison of a signature is constant-
 * time (CRYPTO_memcmp) and every secret is tried (rotation). The route's
 * settings (struct cfg_webhook) and the request are borrowed for a call. */
#ifndef IDEMGATE_WEBHOOK_H
#define IDEMGATE_WEBHOOK_H

#include <stdbool.h>
#include <stddef.h>

struct cfg_webhook;
struct http1_head;

/* The largest key a JSON member may give (longer ones are refused as a
 * header's would be: key_max_length is at most 1024). */
#define WEBHOOK_KEY_MAX 1024

/* Whether the delivery carries a valid signature of w's scheme: standard
 * (webhook-id, webhook-timestamp within tolerance_seconds of now,
 * webhook-signature with a "v1,<base64>" HMAC-SHA256 of
 * "<id>.<timestamp>.<body>"), hmac-sha256 (header: prefix, then the HMAC
 * of the body in hex or base64), or none (always). */
bool webhook_verify(const struct cfg_webhook *w, const struct http1_head *h, const char *body,
                    size_t body_len);

enum webhook_key_status {
    WEBHOOK_KEY_OK,
    WEBHOOK_KEY_ABSENT, /* the header is missing */
    WEBHOOK_KEY_INVALID /* not JSON, no such member, or neither a string nor an integer */
};

/* The delivery's idempotency key from w's source: a header's value
 * (pointing into h), or the member an RFC 6901 pointer names in a JSON
 * body (a string, or an integer as its decimal text, copied into buf of
 * WEBHOOK_KEY_MAX + 1 bytes). The caller validates it as any key. */
enum webhook_key_status webhook_key(const struct cfg_webhook *w, const struct http1_head *h,
                                    const char *body, size_t body_len,
                                    char buf[WEBHOOK_KEY_MAX + 1], const char **key,
                                    size_t *key_len);

#endif
