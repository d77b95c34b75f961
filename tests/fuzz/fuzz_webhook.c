/* fuzz_webhook.c — libFuzzer driver for webhook/ (a delivery's signature
 * and key) on requests from the wire: the first byte picks one of four
 * routes (standard with two secrets; hmac-sha256 hex with a prefix and a
 * JSON-pointer key; base64 with an escaped pointer into arrays; none with
 * a header key), the rest is an HTTP/1.1 request that the parser must
 * accept first. Invariants: no crash or sanitizer report; a key is at
 * most WEBHOOK_KEY_MAX bytes and, from JSON, NUL-terminated in its buffer;
 * a header key points into the request; verify is deterministic. */
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "idemgate/config/config.h"
#include "idemgate/core/clock.h"
#include "idemgate/http/http1.h"
#include "idemgate/webhook/webhook.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static const char *const routes[] = {
    "{\"signature\": \"standard\", \"secrets\": [\"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\", "
    "\"whsec_c2VjcmV0LW9sZA==\"], \"tolerance_seconds\": 300}",
    "{\"signature\": \"hmac-sha256\", \"header\": \"X-Hub-Signature-256\", \"prefix\": "
    "\"sha256=\", \"secrets\": [\"s1\"], \"key\": \"json:/request_id\"}",
    "{\"signature\": \"hmac-sha256\", \"header\": \"X-Sig\", \"encoding\": \"base64\", "
    "\"secrets\": [\"s2\", \"s3\"], \"key\": \"json:/data/items/0/a~1b~0c\"}",
    "{\"signature\": \"none\", \"key\": \"header:X-Event-Id\"}",
};
#define N_ROUTES (sizeof(routes) / sizeof(routes[0]))

static struct cfg cfgs[N_ROUTES];
static int loaded;
static const int64_t wall = 1614265330;

static void load(void)
{
    char json[1024], err[256];
    for (size_t i = 0; i < N_ROUTES; i++) {
        int n = snprintf(json, sizeof(json),
                         "{\"routes\": [{\"prefix\": \"/h\", \"webhook\": %s}]}", routes[i]);
        if (cfg_load_json(&cfgs[i], json, (size_t)n, false, NULL, err, sizeof(err)) != 0) abort();
    }
    clock_set_fake_wall(&wall);
    loaded = 1;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (!loaded) load();
    if (size < 1) return 0;
    const struct cfg_webhook *w = &cfgs[data[0] % N_ROUTES].routes[0].webhook;
    const char *req = (const char *)data + 1;
    size_t n = size - 1;
    struct http1_head h;
    long head = http1_parse_request(req, n, 65536, &h);
    if (head <= 0) return 0;
    /* The body: what follows the head (its framing is not the point). */
    const char *body = req + head;
    size_t body_len = n - (size_t)head;
    bool v1 = webhook_verify(w, &h, body, body_len);
    if (webhook_verify(w, &h, body, body_len) != v1) abort();
    char *buf = malloc(WEBHOOK_KEY_MAX + 1);
    if (!buf) abort();
    const char *key = NULL;
    size_t key_len = 0;
    if (webhook_key(w, &h, body, body_len, buf, &key, &key_len) == WEBHOOK_KEY_OK) {
        if (w->key_json) {
            if (key != buf || key_len > WEBHOOK_KEY_MAX || buf[key_len] != '\0') abort();
        } else if (key < req || key + key_len > req + n) {
            abort();
        }
    }
    free(buf);
    return 0;
}
