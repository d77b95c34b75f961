/* h2.h — HTTP/2 from clients (docs/configuration.md, HTTP/2): one
 * struct h2conn per client connection that speaks it (prior knowledge on
 * the plain listener, ALPN h2 on the TLS one), each of its streams a front
 * (proxy/front.h) for one exchange.
 *
 *   client ──owns──▶ h2conn ──owns──▶ stream ──(attached, 1 ref)──▶ exchange
 *
 * Ownership: the client (client.c) owns its h2conn (h2_conn_free from
 * client_close) and keeps the socket, the timer and the place in the
 * loop's list; the h2conn owns the nghttp2 session and the streams. A
 * stream that closes while its exchange runs hands it its bytes
 * (exchange_front_gone): the exchange goes on and its answer is kept. */
#ifndef IDEMGATE_PROXY_H2_H
#define IDEMGATE_PROXY_H2_H

#include <stdbool.h>

struct client;
struct h2conn;

/* The client speaks HTTP/2 from now on (its input may hold the preface
 * and more): the session, our SETTINGS queued. */
struct h2conn *h2_conn_start(struct client *cl);
/* The client's socket is ready (what: EV_READ | EV_WRITE). May close the
 * client (client_close): touch nothing of it after. */
void h2_conn_event(struct h2conn *h, short what);
/* Frees the session and the streams (exchanges go on alone). From
 * client_close only. */
void h2_conn_free(struct h2conn *h);
/* SIGTERM: GOAWAY; open streams finish, then the connection closes. May
 * close the client. */
void h2_conn_drain(struct h2conn *h);
/* client_timeout_ms passed without a frame: true when the connection is
 * idle and is being closed (the caller closes it), false when streams are
 * still open (the timer is armed again). */
bool h2_conn_timeout(struct h2conn *h);

#endif
