/* ownership.c — what struct cfg owns, and how it lets go of it.
 *
 * Owns: allocation for the whole config (out of memory aborts, as
 * everywhere in idemgate), string lists, the copies and frees of every
 * struct that holds strings (a route's idempotency settings start as a
 * copy of the global ones), and cfg_free. Does not own: deciding what a
 * value is (syntax.c, values.c) or when a struct is filled (load.c).
 *
 * Every struct here owns exactly the strings it points to; each _free
 * zeroes what it freed, so freeing twice, or a zeroed struct, is safe. */
#include "internal.h"

#include <stdlib.h>
#include <string.h>

void *cfg_xcalloc(size_t n, size_t size)
{
    void *p = calloc(n ? n : 1, size ? size : 1);
    if (!p) abort();
    return p;
}

char *cfg_xstrndup(const char *s, size_t n)
{
    char *p = strndup(s, n);
    if (!p) abort();
    return p;
}

char *cfg_xstrdup(const char *s)
{
    return cfg_xstrndup(s, strlen(s));
}

void cfg_strlist_free(struct cfg_strlist *l)
{
    for (size_t i = 0; i < l->n; i++)
        free(l->v[i]);
    free(l->v);
    l->v = NULL;
    l->n = 0;
}

void cfg_strlist_push(struct cfg_strlist *l, const char *s, size_t n)
{
    char **v = realloc(l->v, (l->n + 1) * sizeof *v);
    if (!v) abort();
    l->v = v;
    l->v[l->n++] = cfg_xstrndup(s, n);
}

static void strlist_copy(struct cfg_strlist *dst, const struct cfg_strlist *src)
{
    memset(dst, 0, sizeof *dst);
    for (size_t i = 0; i < src->n; i++)
        cfg_strlist_push(dst, src->v[i], strlen(src->v[i]));
}

void cfg_url_free(struct cfg_url *u)
{
    free(u->host);
    free(u->text);
    memset(u, 0, sizeof *u);
}

void cfg_url_copy(struct cfg_url *dst, const struct cfg_url *src)
{
    dst->tls = src->tls;
    dst->port = src->port;
    dst->host = src->host ? cfg_xstrdup(src->host) : NULL;
    dst->text = src->text ? cfg_xstrdup(src->text) : NULL;
}

void cfg_addr_free(struct cfg_addr *a)
{
    free(a->host);
    free(a->text);
    memset(a, 0, sizeof *a);
}

void cfg_idem_free(struct cfg_idem *m)
{
    free(m->header);
    free(m->scope_secret);
    cfg_strlist_free(&m->methods);
    cfg_strlist_free(&m->scope_headers);
    cfg_strlist_free(&m->fingerprint_headers);
    cfg_strlist_free(&m->replay_exclude_headers);
    memset(m, 0, sizeof *m);
}

void cfg_idem_copy(struct cfg_idem *dst, const struct cfg_idem *src)
{
    *dst = *src;
    dst->header = src->header ? cfg_xstrdup(src->header) : NULL;
    dst->scope_secret = src->scope_secret ? cfg_xstrdup(src->scope_secret) : NULL;
    strlist_copy(&dst->methods, &src->methods);
    strlist_copy(&dst->scope_headers, &src->scope_headers);
    strlist_copy(&dst->fingerprint_headers, &src->fingerprint_headers);
    strlist_copy(&dst->replay_exclude_headers, &src->replay_exclude_headers);
}

void cfg_tls_client_free(struct cfg_tls_client *t)
{
    free(t->ca_file);
    free(t->server_name);
    memset(t, 0, sizeof *t);
}

static void redis_free(struct cfg_redis *r)
{
    free(r->url);
    free(r->host);
    free(r->username);
    free(r->password);
    free(r->master_name);
    free(r->key_prefix);
    cfg_strlist_free(&r->nodes);
    free(r->node_addrs);
    cfg_tls_client_free(&r->tls_client);
    memset(r, 0, sizeof *r);
}

void cfg_free(struct cfg *c)
{
    if (!c) return;
    cfg_addr_free(&c->listen);
    cfg_upstream_free(&c->upstream);
    redis_free(&c->redis);
    cfg_idem_free(&c->idem);
    cfg_addr_free(&c->admin_listen);
    free(c->lmdb_path);
    free(c->tls_cert_file);
    free(c->tls_key_file);
    free(c->admin_token);
    cfg_tls_client_free(&c->upstream_tls);
    for (size_t i = 0; i < c->n_routes; i++) {
        free(c->routes[i].prefix);
        cfg_upstream_free(&c->routes[i].upstream);
        cfg_idem_free(&c->routes[i].idem);
        cfg_webhook_free(&c->routes[i].webhook);
    }
    free(c->routes);
    memset(c, 0, sizeof *c);
}
