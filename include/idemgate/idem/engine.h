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
/* How the exchange ended on the upstream's side (SPEC section 4). */
enum idem_end {
    IDEM_END_OK,         /* a complete response: kept when keepable */
    IDEM_END_FAILED,     /* never sent, or not keepable: the key is released */
    IDEM_END_UNANSWERED, /* sent, no head came: kept as lost (unknown_outcome "keep") */
    IDEM_END_LOST_HEAD,  /* the head was malformed: the upstream ran, kept as lost */
    IDEM_END_LOST_BODY   /* a keepable head, then the body was cut: kept as lost */
};
/* Whether a failure of that kind keeps the key as lost for this exchange:
 * an unanswered request (unknown_outcome "keep"), a cut keepable answer. */
bool idem_keeps_unanswered(const struct exchange *ex);
bool idem_would_keep(const struct exchange *ex);
/* The exchange is over from the upstream's side. Completes (the record, or a
 * lost record) or releases the key; calls exchange_idem_finished when the
 * store is done (or at once). */
void idem_response_end(struct exchange *ex, enum idem_end how);
/* Frees the engine's resources of the exchange. */
void idem_free(struct exchange *ex);

#endif
