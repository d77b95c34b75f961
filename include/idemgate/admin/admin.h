/* admin.h — the admin listener (docs/admin.md): GET /healthz, /readyz,
 * /metrics, GET/DELETE /keys/{key} and POST /-/reload on its own thread
 * and event_base, with evhttp (speed does not matter here) and its own
 * store connection for /readyz pings and the keys API. */
#ifndef IDEMGATE_ADMIN_H
#define IDEMGATE_ADMIN_H

#include <stddef.h>

struct cfg;
struct store_memory_shared;
struct store_lmdb_env;
struct admin;

/* Binds admin.listen: the listening socket, or -1 after logging why
 * ("cannot listen on admin address ADDR: Address already in use"). Called
 * before the proxy listeners exist, so an instance that cannot start never
 * takes (and drops) a connection of an address it shares. */
int admin_listen(const struct cfg *cfg);
/* What POST /-/reload calls (on the admin thread): 0 with *id the new
 * generation, or -1 with err and *id the generation kept. */
typedef int admin_reload_fn(void *arg, char *err, size_t errlen, unsigned long *id);

/* Starts the thread on listen_fd (from admin_listen; taken over, closed
 * even on failure), serving the current configuration generation
 * (proxy/gen.h: one must be published). Returns NULL after logging when it
 * cannot start. mem (memory store) and lmdb (LMDB store) are borrowed
 * and may be NULL; reload (with reload_arg) serves POST /-/reload. */
struct admin *admin_start(int listen_fd, struct store_memory_shared *mem,
                          struct store_lmdb_env *lmdb, admin_reload_fn *reload, void *reload_arg);
/* Stops the thread and frees everything. Tolerates NULL. */
void admin_stop(struct admin *a);

#endif
