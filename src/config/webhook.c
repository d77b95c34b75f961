/* webhook.c — routes[].webhook (docs/webhooks.md): its keys set from the
 * table (cfg_webhook_opts), then resolved once at load: the secrets read
 * from the environment ("env:NAME") and decoded ("whsec_<base64>" for the
 * standard scheme), the key's source parsed, the scheme's requirements
 * checked. The request side (verifying a delivery, finding its key) is
 * webhook/webhook.c's. */
#include "internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/crypto.h>

#include "idemgate/core/base64.h"

#define WHSEC_PREFIX "whsec_"

static const char *const scheme_names[] = {"standard", "hmac-sha256", "none"};

/* One secret as its HMAC key: the environment's value for "env:NAME";
 * base64-decoded after an optional "whsec_" for the standard scheme. */
static int resolve_secret(struct cfg_webhook *w, size_t i, const char *path, struct cfg_err *e)
{
    char where[CFG_WHERE_LEN];
    snprintf(where, sizeof where, "config: %.200s.secrets[%zu]", path, i);
    const char *s = w->secrets.v[i];
    if (strcmp(s, CFG_DUMP_REDACTED) == 0)
        return cfg_fail(e, where, "holds the redacted value of -T; put the secret back");
    if (strncmp(s, "env:", 4) == 0) {
        const char *name = s + 4, *v = *name ? getenv(name) : NULL;
        if (!v || !*v) return cfg_fail(e, where, "environment variable %.64s is not set", name);
        s = v;
    }
    struct cfg_secret *k = &w->keys[i];
    size_t n = strlen(s);
    if (w->signature != CFG_WH_STANDARD) {
        k->v = (unsigned char *)cfg_xstrndup(s, n);
        k->n = n;
        return 0;
    }
    if (strncmp(s, WHSEC_PREFIX, strlen(WHSEC_PREFIX)) == 0) {
        s += strlen(WHSEC_PREFIX);
        n -= strlen(WHSEC_PREFIX);
    }
    k->v = cfg_xcalloc(n + 1, 1);
    long d = base64_decode(s, n, k->v, n + 1);
    if (d <= 0) return cfg_fail(e, where, "must be whsec_ followed by base64");
    k->n = (size_t)d;
    return 0;
}

/* "header:NAME" or "json:/pointer"; NULL takes the scheme's default. */
static int resolve_key(struct cfg_webhook *w, const char *path, struct cfg_err *e)
{
    char where[CFG_WHERE_LEN];
    snprintf(where, sizeof where, "config: %.200s.key", path);
    const char *k = w->key;
    if (!k) {
        if (w->signature != CFG_WH_STANDARD)
            return cfg_fail(e, where, "is required with signature %s", scheme_names[w->signature]);
        k = "header:webhook-id";
    }
    if (strncmp(k, "header:", 7) == 0 && cfg_is_token(k + 7)) {
        w->key_json = false;
        w->key_source = cfg_xstrdup(k + 7);
        return 0;
    }
    if (strncmp(k, "json:", 5) == 0 && (k[5] == '\0' || k[5] == '/')) {
        w->key_json = true;
        w->key_source = cfg_xstrdup(k + 5);
        return 0;
    }
    return cfg_fail(e, where, "must be \"header:NAME\" or \"json:/pointer\"");
}

int cfg_build_webhook(struct cfg_webhook *w, const cJSON *obj, const char *path, struct cfg_err *e)
{
    for (size_t i = 0; i < cfg_n_webhook_opts; i++) {
        struct cfg_val v = {NULL, cfg_webhook_opts[i].def};
        if (cfg_opt_set(&cfg_webhook_opts[i], (char *)w, &v, path, e) < 0) return -1;
    }
    w->enabled = true;
    if (cfg_apply_object(obj, path, (char *)w, cfg_webhook_opts, cfg_n_webhook_opts, NULL, 0, e) <
        0)
        return -1;
    char where[CFG_WHERE_LEN];
    if (w->signature == CFG_WH_HMAC_SHA256 && !w->header) {
        snprintf(where, sizeof where, "config: %.200s.header", path);
        return cfg_fail(e, where, "is required with signature hmac-sha256");
    }
    if (w->header && !cfg_is_token(w->header)) {
        snprintf(where, sizeof where, "config: %.200s.header", path);
        return cfg_fail(e, where, "must be a valid HTTP header name");
    }
    if (w->signature != CFG_WH_NONE && w->secrets.n == 0) {
        snprintf(where, sizeof where, "config: %.200s.secrets", path);
        return cfg_fail(e, where, "is required (one secret or more) with signature %s",
                        scheme_names[w->signature]);
    }
    w->keys = cfg_xcalloc(w->secrets.n, sizeof(*w->keys));
    w->n_keys = w->secrets.n;
    for (size_t i = 0; i < w->secrets.n; i++)
        if (resolve_secret(w, i, path, e) < 0) return -1;
    return resolve_key(w, path, e);
}

void cfg_webhook_free(struct cfg_webhook *w)
{
    free(w->header);
    free(w->prefix);
    cfg_strlist_free(&w->secrets);
    free(w->key);
    for (size_t i = 0; i < w->n_keys; i++) {
        if (w->keys[i].v) OPENSSL_cleanse(w->keys[i].v, w->keys[i].n);
        free(w->keys[i].v);
    }
    free(w->keys);
    free(w->key_source);
    memset(w, 0, sizeof(*w));
}
