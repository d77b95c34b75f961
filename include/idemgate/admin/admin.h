/* admin.h — the admin listener (docs/admin.md): GET /healthz, /readyz,
 * /metrics on its own thread and event_base, with evhttp (speed does not
 * matter here) and its own store connection for /readyz pings. */
#ifndef IDEMGATE_ADMIN_H
#define IDEMGATE_ADMIN_H

struct cfg;
struct store_memory_shared;
struct admin;

/* Binds admin.listen: the listening socket, or -1 after logging why
 * ("cannot listen on admin address ADDR: Address already in use"). Called
 * before the proxy listeners exist, so an instance that cannot start never
 * takes (and drops) a connection of an address it shares. */
int admin_listen(const struct cfg *cfg);
/* Starts the thread on listen_fd (from admin_listen; taken over, closed
 * even on failure). Returns NULL after logging when it cannot start. mem is
 * borrowed (memory store) and may be NULL. */
struct admin *admin_start(const struct cfg *cfg, int listen_fd, struct store_memory_shared *mem);
/* Stops the thread and frees everything. Tolerates NULL. */
void admin_stop(struct admin *a);

#endif
