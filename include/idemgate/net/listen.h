/* listen.h — listening TCP sockets, and the claims that keep two stores
 * off one address (docs/configuration.md).
 *
 * Processes may share a listen address (SO_REUSEPORT, for a rolling
 * restart) only when they share one store: two stores behind one address
 * would let a key run twice. Each process therefore holds, for as long as it
 * listens, a claim on its address carrying its store's identity; a process
 * whose identity does not fit the claims it finds refuses to listen.
 *
 * A claim is a set of names bound in the Linux abstract unix-socket
 * namespace. That namespace has the scope of the TCP ports it guards (one
 * network namespace), needs no file system, and the kernel drops a name
 * when its process exits however it exits: a claim never goes stale.
 * Holders keep bound sockets (no listen, nothing to answer); a newcomer
 * counts the names it cannot bind. Every name starts "idemgate/listen/1 ":
 *
 *   lock F:PORT            taken while one process checks, claims and binds
 *                          (family F 4 or 6, any address on PORT)
 *   SCOPE LEVEL SLOT       one claim: SCOPE is the address ("4:127.0.0.1:8080",
 *                          "6:[::1]:8080", "4:0.0.0.0:8080") or the port group
 *                          ("4:*:8080", every holder in that family and port);
 *                          LEVEL is "any", the store's kind ("memory",
 *                          "redis"), and kind:hash(detail) when the store has
 *                          a detail that must match too (an LMDB path);
 *                          SLOT 0..LISTEN_CLAIM_SLOTS-1.
 *
 * A holder claims one slot of each level in its address and in the port
 * group. A newcomer on a specific address checks that address and the
 * family's wildcard address; one on the wildcard address checks the port
 * group (so 0.0.0.0:8080 and 127.0.0.1:8080 see each other; IPv6 sockets
 * are V6ONLY, so [::]:8080 and 0.0.0.0:8080 do not overlap). It refuses
 * when anything is there and it is exclusive, or when there are holders
 * ("any") beyond those of its own full identity; "any" also catches a store
 * kind this binary does not know. */
#ifndef IDEMGATE_NET_LISTEN_H
#define IDEMGATE_NET_LISTEN_H

#include <stdbool.h>
#include <stddef.h>
#include <sys/socket.h>

#define LISTEN_CLAIM_SLOTS 32

/* host (numeric or a name) and port into *ss (the first address
 * getaddrinfo gives); -1 with "cannot resolve HOST: why" in err. text names
 * the address in the error. */
int listen_resolve(const char *host, int port, const char *text, struct sockaddr_storage *ss,
                   socklen_t *len, char *err, size_t errlen);

/* A non-blocking, close-on-exec socket bound to sa and listening
 * (SO_REUSEADDR; SO_REUSEPORT when reuseport; IPV6_V6ONLY for IPv6), or -1
 * with errno set. */
int listen_bind(const struct sockaddr *sa, socklen_t len, bool reuseport, int backlog);

/* What a process's store is, as far as sharing an address goes. */
struct listen_store_id {
    const char *kind;   /* "memory", "redis" */
    const char *detail; /* NULL, or what must match as well (an LMDB path) */
    bool exclusive;     /* shares its address with no other process */
};

struct listen_claim;

/* Takes the lock of sa's family and port, checks the claims there against
 * id and claims sa for id. kinds (NULL-terminated) are the store kinds
 * this binary knows, to name the holder in a refusal. Returns the claim,
 * still holding the lock (bind the listeners, then listen_claim_settled),
 * or NULL with err set, for example "held by another idemgate using the
 * memory store" (the caller prefixes "cannot listen on ADDR: "). */
struct listen_claim *listen_claim_take(const struct sockaddr *sa, const struct listen_store_id *id,
                                       const char *const *kinds, char *err, size_t errlen);
/* The listeners are bound: lets the next process check. */
void listen_claim_settled(struct listen_claim *c);
/* Drops the claim (and the lock, if still held). NULL is fine. */
void listen_claim_free(struct listen_claim *c);

#endif
