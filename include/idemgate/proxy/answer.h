/* answer.h — the answers idemgate writes itself: docs/errors.md errors
 * (JSON or problem+json, Retry-After where docs/errors.md says) and replays of
 * stored records (byte for byte, Idempotent-Replayed: true, today's Date).
 * Appends to the client's output; borrows the exchange and the record. */
#ifndef IDEMGATE_PROXY_ANSWER_H
#define IDEMGATE_PROXY_ANSWER_H

#include <stdbool.h>

#include "idemgate/core/buf.h"
#include "idemgate/core/errors.h"

struct exchange;
struct record;
struct cfg;
struct cfg_idem;

/* Our error e as the exchange's answer (replayed: a lost answer replayed
 * to a retry); nothing when the client is gone. */
void answer_error(struct exchange *ex, enum err_code e, bool replayed);
/* A stored response replayed (r borrowed until the call returns). */
void answer_replay(struct exchange *ex, const struct record *r);
/* The Connection header of an answer to the exchange's client: close when
 * the client or the response asks for it or when draining (then
 * ex->client_close is set); keep-alive spelled out for HTTP/1.0. */
void answer_connection(struct exchange *ex, struct buf *o);
/* The rest of an error after its status line and Connection header:
 * Content-Type, Retry-After, Content-Length, body; an error that names a
 * limit says it (idem: the request's idempotency policy, for
 * key_max_length; NULL: the global one). */
void answer_error_rest(struct buf *o, const struct cfg *cfg, const struct cfg_idem *idem,
                       enum err_code e, int status);

#endif
