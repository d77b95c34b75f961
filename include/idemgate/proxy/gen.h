/* gen.h — a configuration generation (docs/configuration.md, Reload): one
 * loaded configuration with what is built from it once for the process,
 * its TLS contexts and its resolved upstream groups. The process starts
 * with generation 1; each successful reload builds the next one and
 * publishes it as the current one.
 *
 *   gen_current() ──ref──▶ gen ◀──ref── loop_gen (one per loop and gen)
 *                           │                ▲
 *                           │                └──ref── exchange
 *                           └─owns─ cfg, tls_set, upstream_registry
 *
 * Ownership: a generation is reference-counted (atomic: loops on several
 * threads and the admin thread hold references). The current pointer
 * holds one; each loop_gen (proxy/loop.h) holds one, and so does whatever
 * borrows the configuration past a call (a store, the admin's store). The
 * last gen_unref frees the configuration, the TLS contexts (SSL objects
 * made from them stay valid) and the upstream registry. A published
 * generation is read-only. */
#ifndef IDEMGATE_PROXY_GEN_H
#define IDEMGATE_PROXY_GEN_H

#include <stdatomic.h>
#include <stddef.h>

#include "idemgate/config/config.h"

struct tls_set;
struct upstream_registry;

struct gen {
    atomic_uint refs;
    unsigned long id; /* 1 at start, one more per successful reload */
    struct cfg cfg;
    struct tls_set *tls;
    struct upstream_registry *upstreams;
};

/* Loads the configuration from flags (file, environment, flags: as at
 * start) and builds what it needs. prev (may be NULL) is the generation it
 * will replace: the new one's id is prev's + 1 and the upstream counters
 * carry on by identity. Returns 0 with *out (one reference, the caller's);
 * 2 for a configuration error (err is the one line -t prints); 1 when the
 * configuration is valid but cannot be put to use (a TLS context). */
int gen_load(const struct cfg_flags *flags, const struct gen *prev, struct gen **out, char *err,
             size_t errlen);

void gen_ref(struct gen *g);
/* Drops a reference; the last one frees g. NULL is fine. */
void gen_unref(struct gen *g);

/* Makes g the current generation (taking a reference of its own) and
 * drops the current pointer's reference on the one it replaces. Any
 * thread; serialized with gen_current. */
void gen_publish(struct gen *g);
/* The current generation with a new reference (the caller's), or NULL
 * before the first gen_publish. Any thread. */
struct gen *gen_current(void);
/* Drops the current pointer (at exit). */
void gen_retire_current(void);

#endif
