/* answer.h — the answers idemgate writes itself: docs/errors.md errors
 * (JSON or problem+json, Retry-After where docs/errors.md says) and replays of
 * stored records (byte for byte, Idempotent-Replayed: true, today's Date).
 * Handed to the exchange's front (proxy/front.h) as a head and a body;
 * borrows the exchange and the record. */
#ifndef IDEMGATE_PROXY_ANSWER_H
#define IDEMGATE_PROXY_ANSWER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "idemgate/core/buf.h"
#include "idemgate/core/errors.h"

struct exchange;
struct record;
struct cfg;
struct cfg_idem;
struct front_header;
struct front_head;

/* Our error e as the exchange's answer (replayed: a lost answer replayed
 * to a retry; retry_s: a computed Retry-After, for the errors whose row
 * says so); nothing but its status when the front is gone. */
void answer_error(struct exchange *ex, enum err_code e, bool replayed, uint32_t retry_s);
/* A stored record as the exchange's answer. */
void answer_replay(struct exchange *ex, const struct record *r);

/* The values of the RateLimit headers of one answer. */
struct answer_rl {
    char v[3][64];
};
/* The RateLimit headers of ex's answer (ratelimit.headers: legacy
 * RateLimit-Limit/-Remaining/-Reset, or draft RateLimit-Policy and
 * RateLimit), appended to hs[*n] (room for 3), their values in vals; none
 * when the request was not counted. Returns true when it added any. */
bool answer_ratelimit_headers(const struct exchange *ex, struct front_header *hs, size_t *n,
                              struct answer_rl *vals);
/* One of the names those headers replace on an upstream's or a stored
 * answer (true only when ex's answer carries its own). */
bool answer_replaces_header(const struct exchange *ex, const char *name, size_t len);

/* The body of error e with status (into body) and its content type; the
 * limit it names comes from cfg and idem (NULL: the global policy). */
const char *answer_error_body(const struct cfg *cfg, const struct cfg_idem *idem, enum err_code e,
                              int status, struct buf *body);
/* An error's head for a front: its body into body, its Content-Type (and
 * Retry-After) appended to hs[*n] (room for 2), fh filled (its headers are
 * hs). Returns the status. For answers outside an exchange too (a front
 * refusing a request before one exists). */
int answer_error_head(const struct cfg *cfg, const struct cfg_idem *idem, enum err_code e,
                      uint32_t retry_s, char retry_buf[12], struct buf *body,
                      struct front_header *hs, size_t *n, struct front_head *fh);

#endif
