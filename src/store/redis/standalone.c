/* standalone.c — the one-server topology (see redis_internal.h).
 *
 * Owns nothing but the choice: one connection (a struct rconn, conn.c) to
 * redis.url, TCP or a unix socket, that every op goes to and that
 * reconnects after its backoff. No reply is about topology here, and every
 * key lives behind that connection. s->topo_state is the connection
 * itself; it is freed with the store's other connections. */
#include "redis_internal.h"

#include <string.h>

static struct rconn *sa_conn(const struct store_redis *s)
{
    return s->topo_state;
}

static enum rs_route sa_route(struct rop *op)
{
    op->conn = sa_conn(op->s);
    return RS_ROUTE_SEND;
}

static void sa_on_backoff_over(struct rconn *c)
{
    rc_connect(c);
}

/* The defaults only matter to a struct cfg built by hand (config always
 * sets both). */
static void sa_init(struct store_redis *s)
{
    const struct cfg_redis *rc = &s->cfg->redis;
    const char *host = rc->host ? rc->host : "127.0.0.1";
    struct rconn *c =
        rc_new(s, rs_strndup(host, strlen(host)), rc->port ? rc->port : 6379, rc->unix_socket);
    s->topo_state = c;
    rc_connect(c);
}

static void sa_free(struct store_redis *s)
{
    s->topo_state = NULL;
}

const struct rs_topology_ops rs_standalone_ops = {
    .select_db = true,
    .init = sa_init,
    .route = sa_route,
    .on_backoff_over = sa_on_backoff_over,
    .free = sa_free,
};
