/* admin.h — the admin listener (SPEC section 7): GET /healthz, /readyz,
 * /metrics on its own thread and event_base, with evhttp (speed does not
 * matter here) and its own store connection for /readyz pings. */
#ifndef IDEMGATE_ADMIN_H
#define IDEMGATE_ADMIN_H

struct cfg;
struct store_memory_shared;
struct admin;

/* Binds admin.listen and starts the thread. Returns NULL after logging
 * when it cannot bind. mem is borrowed (memory store) and may be NULL. */
struct admin *admin_start(const struct cfg *cfg, struct store_memory_shared *mem);
/* Stops the thread and frees everything. Tolerates NULL. */
void admin_stop(struct admin *a);

#endif
