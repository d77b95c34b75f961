/* idem.h — the idempotency state machine (SPEC sections 3 and 4).
 *
 * Knows no sockets: it decides from the parsed request, asks the store,
 * and drives the exchange through exchange_forward / exchange_replay /
 * exchange_answer_error. It owns the exchange's idempotency fields (key,
 * token, fingerprint, renewal timer, record writer). */
#ifndef IDEMGATE_IDEM_H
#define IDEMGATE_IDEM_H

#include <stdbool.h>
#include <stddef.h>

struct exchange;
struct http1_head;

/* Starts the engine on a complete request: answers, forwards, or starts an
 * acquire whose callback does one of those later. */
void idem_start(struct exchange *ex);
/* The upstream answered with this head (status, headers): decides whether
 * the response may be kept and starts recording it. */
void idem_response_head(struct exchange *ex, const struct http1_head *rh);
/* Body bytes of the response, as delivered. */
void idem_response_body(struct exchange *ex, const char *p, size_t n);
/* The exchange is over from the upstream's side. ok: the response was
 * complete (false: 502/504/broken). Completes or releases the key; calls
 * exchange_idem_finished when the store is done (or at once). */
void idem_response_end(struct exchange *ex, bool ok);
/* Frees the engine's resources of the exchange. */
void idem_free(struct exchange *ex);

#endif
