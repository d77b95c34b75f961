/* relay.h — the upstream side of an exchange: the forwarded request
 * (rewritten: normalized target, hop-by-hop headers out, X-Forwarded-*,
 * X-Request-Id, Host), the response head and body relayed to the client
 * with backpressure, and every upstream failure classified for the engine
 * (docs/requests.md: never sent, unanswered, malformed head, cut body).
 * Borrows the exchange (the relay holds one reference on it while an
 * upstream connection is in use); owns that connection until it is given
 * back to its pool (upstream_put) or closed. */
#ifndef IDEMGATE_PROXY_RELAY_H
#define IDEMGATE_PROXY_RELAY_H

struct exchange;

/* The engine's forward op: takes a pooled (or new) upstream connection and
 * sends the request; the response is relayed as it arrives. */
void relay_forward(struct exchange *ex);
/* The client drained its output: resume an upstream paused on backlog. */
void relay_client_drained(struct exchange *ex);
/* The client left: an upstream paused on its backlog reads on alone (its
 * edge was used up), so the answer is still read and kept. */
void relay_client_gone(struct exchange *ex);

#endif
