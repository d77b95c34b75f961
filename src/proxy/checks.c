/* checks.c — the list of request checks a route may carry (see checks.h),
 * and the webhook's: its verdict counted in
 * idemgate_webhook_verifications_total{result}, its key and the route's
 * scope handed to the engine. */
#include "idemgate/proxy/checks.h"

#include <stdio.h>
#include <string.h>

#include "idemgate/config/config.h"
#include "idemgate/core/metrics.h"
#include "idemgate/idem/fingerprint.h"

struct request_check {
    bool (*applies)(const struct cfg_route *r);
    /* false: refused (ireq->refused set), the checks after it not run */
    bool (*run)(const struct cfg_route *r, const struct check_request *req,
                struct idem_request *ireq, struct check_out *out);
};

/* ------------------------------------------------------------ webhook */

static bool webhook_applies(const struct cfg_route *r)
{
    return r->webhook.enabled;
}

/* A webhook route's scope: the route itself (its prefix, hashed as a
 * credential would be, under the route's scope_secret), so one route's
 * events never meet another's. Remembered per thread by the strings it
 * comes from (never by a pointer, which a reload may reuse). */
#define SCOPE_MEMO 4
#define SCOPE_MEMO_STR 128

struct scope_memo {
    char prefix[SCOPE_MEMO_STR];
    char secret[SCOPE_MEMO_STR];
    char scope[SCOPE_HEX_LEN + 1];
};

static __thread struct scope_memo scope_memo[SCOPE_MEMO];
static __thread unsigned scope_memo_next;

static void webhook_scope(const struct cfg_route *r, char out[SCOPE_HEX_LEN + 1])
{
    static const char tag[] = "webhook:";
    const char *secret = r->idem.scope_secret ? r->idem.scope_secret : "";
    bool fits = strlen(r->prefix) < SCOPE_MEMO_STR && strlen(secret) < SCOPE_MEMO_STR;
    for (int i = 0; fits && i < SCOPE_MEMO; i++) {
        const struct scope_memo *m = &scope_memo[i];
        if (m->scope[0] && strcmp(m->prefix, r->prefix) == 0 && strcmp(m->secret, secret) == 0) {
            memcpy(out, m->scope, SCOPE_HEX_LEN + 1);
            return;
        }
    }
    char name[512];
    size_t plen = strlen(r->prefix);
    if (plen > sizeof(name) - sizeof(tag)) plen = sizeof(name) - sizeof(tag);
    memcpy(name, tag, sizeof(tag) - 1);
    memcpy(name + sizeof(tag) - 1, r->prefix, plen);
    scope_hash(secret, strlen(secret), name, sizeof(tag) - 1 + plen, out);
    if (!fits) return;
    struct scope_memo *m = &scope_memo[scope_memo_next++ % SCOPE_MEMO];
    snprintf(m->prefix, sizeof(m->prefix), "%s", r->prefix);
    snprintf(m->secret, sizeof(m->secret), "%s", secret);
    memcpy(m->scope, out, SCOPE_HEX_LEN + 1);
}

static bool webhook_run(const struct cfg_route *r, const struct check_request *req,
                        struct idem_request *ireq, struct check_out *out)
{
    const struct cfg_webhook *w = &r->webhook;
    if (!webhook_verify(w, req->head, req->body, req->body_len)) {
        metrics_add(M_WEBHOOK_VERIFICATIONS, METRICS_WEBHOOK_INVALID, 1);
        ireq->refused = true;
        ireq->refusal = ERR_INVALID_SIGNATURE;
        return false;
    }
    metrics_add(M_WEBHOOK_VERIFICATIONS, METRICS_WEBHOOK_VALID, 1);
    struct idem_given *g = &out->given;
    memset(g, 0, sizeof(*g));
    switch (
        webhook_key(w, req->head, req->body, req->body_len, out->keybuf, &g->key, &g->key_len)) {
    case WEBHOOK_KEY_OK:
        break;
    case WEBHOOK_KEY_ABSENT:
        g->key = NULL;
        g->error = ERR_WEBHOOK_KEY_REQUIRED;
        break;
    case WEBHOOK_KEY_INVALID:
        g->key = NULL;
        g->error = ERR_WEBHOOK_KEY_INVALID;
        break;
    }
    webhook_scope(r, g->scope);
    ireq->given = g;
    return true;
}

/* ---------------------------------------------------------------- list */

static const struct request_check checks[] = {
    {webhook_applies, webhook_run},
};

void checks_run(const struct cfg_route *route, const struct check_request *req,
                struct idem_request *ireq, struct check_out *out)
{
    if (!route) return;
    for (size_t i = 0; i < sizeof(checks) / sizeof(checks[0]); i++)
        if (checks[i].applies(route) && !checks[i].run(route, req, ireq, out)) return;
}
