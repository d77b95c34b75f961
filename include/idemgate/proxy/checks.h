/* checks.h — a route's request checks (docs/webhooks.md): run on the whole
 * request when its exchange starts, before the engine, so a request they
 * refuse never takes a lock or reaches the upstream. Each check in the
 * list (checks.c) applies to the routes that configure it; today one: a
 * webhook route's signature and key (webhook/webhook.h).
 *
 * A check may refuse the request (ireq->refused, answered by the engine
 * whatever the method) or give the engine the key and scope to use
 * (ireq->given, pointing at *given; the key may point into keybuf or the
 * request). Everything is borrowed for the call; what ireq points to is
 * read by idem_start only. */
#ifndef IDEMGATE_PROXY_CHECKS_H
#define IDEMGATE_PROXY_CHECKS_H

#include "idemgate/http/http1.h"
#include "idemgate/idem/engine.h"
#include "idemgate/webhook/webhook.h"

struct cfg_route;

/* What the checks look at: the request as received (the target as sent
 * next to the normalized one in head, for a scheme that signs it). */
struct check_request {
    const struct http1_head *head;
    struct http1_slice target_sent;
    const char *body;
    size_t body_len;
};

/* The room a check's answer needs, on the caller's stack. */
struct check_out {
    struct idem_given given;
    char keybuf[WEBHOOK_KEY_MAX + 1];
};

void checks_run(const struct cfg_route *route, const struct check_request *req,
                struct idem_request *ireq, struct check_out *out);

#endif
