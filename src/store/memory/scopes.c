/* scopes.c — the memory store's per-scope accounting and eviction order:
 * one struct mem_scope per scope while it holds an entry (the bytes
 * charged to it, its completed records oldest first), the max-heap of the
 * scopes that hold a completed record, by bytes, and making room for a
 * new lock or record (max_scope_bytes, then max_bytes).
 *
 * Owns every struct mem_scope (through sh->scopes) and the heap's
 * chunks. Does not own the entries it evicts (table.c drops them), the
 * dict mechanism (table.c), the mutex (shared.c) or anything of a worker
 * (ops.c). Callers hold sh->mu. */
#include "internal.h"

#include "idemgate/core/log.h"
#include "idemgate/core/metrics.h"

#include <stdio.h>
#include <string.h>

/* ---- the heap of scopes, by bytes ---- */

static struct mem_scope **mem_heap_slot(struct mem_heap *h, size_t i)
{
    return &h->chunks[i >> MEM_HEAP_SHIFT][i & (MEM_HEAP_CHUNK - 1)];
}

static void mem_heap_put(struct mem_heap *h, size_t i, struct mem_scope *sc)
{
    *mem_heap_slot(h, i) = sc;
    sc->heap_idx = i;
}

static void mem_heap_up(struct mem_heap *h, size_t i)
{
    struct mem_scope *sc = *mem_heap_slot(h, i);
    while (i > 0) {
        size_t parent = (i - 1) / 2;
        struct mem_scope *p = *mem_heap_slot(h, parent);
        if (p->bytes >= sc->bytes) break;
        mem_heap_put(h, i, p);
        i = parent;
    }
    mem_heap_put(h, i, sc);
}

static void mem_heap_down(struct mem_heap *h, size_t i)
{
    struct mem_scope *sc = *mem_heap_slot(h, i);
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= h->len) break;
        if (c + 1 < h->len && (*mem_heap_slot(h, c + 1))->bytes > (*mem_heap_slot(h, c))->bytes)
            c++;
        struct mem_scope *child = *mem_heap_slot(h, c);
        if (child->bytes <= sc->bytes) break;
        mem_heap_put(h, i, child);
        i = c;
    }
    mem_heap_put(h, i, sc);
}

/* A slot is reserved for every scope (mem_heap_reserve), so this never
 * allocates. */
static void mem_heap_push(struct mem_heap *h, struct mem_scope *sc)
{
    mem_heap_put(h, h->len++, sc);
    mem_heap_up(h, sc->heap_idx);
}

static void mem_heap_remove(struct mem_heap *h, struct mem_scope *sc)
{
    size_t i = sc->heap_idx;
    struct mem_scope *last = *mem_heap_slot(h, --h->len);
    sc->heap_idx = MEM_NOT_IN_HEAP;
    if (last == sc) return;
    mem_heap_put(h, i, last);
    mem_heap_up(h, i);
    mem_heap_down(h, last->heap_idx);
}

uint64_t mem_heap_growth(const struct mem_heap *h, size_t scopes)
{
    if (scopes < h->n_chunks * MEM_HEAP_CHUNK) return 0;
    uint64_t n = MEM_HEAP_CHUNK * sizeof(struct mem_scope *) + MEM_MALLOC_OVERHEAD;
    if (h->n_chunks == h->dir_cap)
        n += (uint64_t)(h->dir_cap ? h->dir_cap : MEM_HEAP_DIR_MIN) * sizeof(struct mem_scope **);
    return n;
}

void mem_heap_reserve(struct mem_heap *h, size_t scopes)
{
    if (scopes < h->n_chunks * MEM_HEAP_CHUNK) return;
    if (h->n_chunks == h->dir_cap) {
        size_t cap = h->dir_cap ? h->dir_cap * 2 : MEM_HEAP_DIR_MIN;
        struct mem_scope ***d = realloc(h->chunks, cap * sizeof(*d));
        if (!d) abort();
        h->chunks = d;
        h->dir_cap = cap;
    }
    h->chunks[h->n_chunks++] = mem_alloc(MEM_HEAP_CHUNK * sizeof(struct mem_scope *));
}

/* Gives back the last chunk once two chunks' worth of slots are unused
 * (the first chunk is kept). */
static void mem_heap_trim(struct mem_heap *h, size_t scopes)
{
    if (h->n_chunks > 1 && scopes + 2 * MEM_HEAP_CHUNK <= h->n_chunks * MEM_HEAP_CHUNK)
        free(h->chunks[--h->n_chunks]);
}

void mem_heap_free(struct mem_heap *h)
{
    for (size_t i = 0; i < h->n_chunks; i++)
        free(h->chunks[i]);
    free(h->chunks);
}

/* ---- scopes ---- */

struct mem_scope *mem_scope_find(struct store_memory_shared *sh, const char *name, size_t len,
                                 uint64_t h)
{
    for (int t = 0; t < mem_dict_tables(&sh->scopes); t++) {
        for (struct mem_node *n = mem_dict_chain(&sh->scopes, t, h); n; n = n->next) {
            struct mem_scope *sc = (struct mem_scope *)n;
            if (n->hash == h && sc->name_len == len && memcmp(sc->name, name, len) == 0) return sc;
        }
    }
    return NULL;
}

struct mem_scope *mem_scope_new(struct store_memory_shared *sh, const char *name, size_t len,
                                uint64_t h)
{
    mem_heap_reserve(&sh->heap, sh->scopes.count);
    struct mem_scope *sc = mem_alloc(sizeof(*sc) + len);
    sc->node.hash = h;
    sc->name_len = len;
    memcpy(sc->name, name, len);
    sc->heap_idx = MEM_NOT_IN_HEAP;
    sc->bytes = mem_scope_cost(len);
    sh->scope_bytes += sc->bytes;
    mem_dict_add(&sh->scopes, &sc->node);
    return sc;
}

void mem_scope_maybe_free(struct store_memory_shared *sh, struct mem_scope *sc)
{
    if (sc->entries > 0 || sc == sh->pinned) return;
    mem_dict_del(&sh->scopes, &sc->node);
    sh->scope_bytes -= mem_scope_cost(sc->name_len);
    free(sc);
    mem_heap_trim(&sh->heap, sh->scopes.count);
}

void mem_charge(struct store_memory_shared *sh, struct mem_scope *sc, uint64_t n)
{
    sc->bytes += n;
    if (sc->heap_idx != MEM_NOT_IN_HEAP) mem_heap_up(&sh->heap, sc->heap_idx);
}

void mem_uncharge(struct store_memory_shared *sh, struct mem_scope *sc, uint64_t n)
{
    sc->bytes -= n;
    if (sc->heap_idx != MEM_NOT_IN_HEAP) mem_heap_down(&sh->heap, sc->heap_idx);
}

/* ---- a scope's FIFO of completed records ---- */

void mem_scope_fifo_push(struct store_memory_shared *sh, struct mem_entry *e)
{
    struct mem_scope *sc = e->scope;
    e->u.q.s_older = sc->newest;
    e->u.q.s_newer = NULL;
    if (sc->newest)
        sc->newest->u.q.s_newer = e;
    else
        sc->oldest = e;
    sc->newest = e;
    if (sc->heap_idx == MEM_NOT_IN_HEAP) mem_heap_push(&sh->heap, sc);
}

void mem_scope_fifo_unlink(struct store_memory_shared *sh, struct mem_entry *e)
{
    struct mem_scope *sc = e->scope;
    if (e->u.q.s_older)
        e->u.q.s_older->u.q.s_newer = e->u.q.s_newer;
    else
        sc->oldest = e->u.q.s_newer;
    if (e->u.q.s_newer)
        e->u.q.s_newer->u.q.s_older = e->u.q.s_older;
    else
        sc->newest = e->u.q.s_older;
    if (!sc->oldest) mem_heap_remove(&sh->heap, sc);
}

/* ---- making room ---- */

/* Takes the oldest completed record of sc: reclaimed when it has expired,
 * evicted (and counted) otherwise. True when it was evicted. */
static bool mem_evict_oldest(struct store_memory_shared *sh, struct mem_scope *sc, uint64_t now)
{
    struct mem_entry *e = sc->oldest;
    if (e->expires_ms <= now) {
        mem_expire(sh, e);
        return false;
    }
    mem_drop(sh, e);
    sh->evictions++;
    metrics_inc(M_STORE_EVICTIONS);
    return true;
}

static bool mem_warn_due(uint64_t *last_ms, uint64_t now)
{
    if (*last_ms && now - *last_ms < MEM_WARN_EVERY_MS) return false;
    *last_ms = now;
    return true;
}

/* True when need more bytes would fit once every completed record were
 * gone: what the locks hold is never given back. Sweeps a few buckets for
 * dead locks before saying no. */
static bool mem_can_fit(struct store_memory_shared *sh, uint64_t need, uint64_t now)
{
    if (mem_total_bytes(sh) - sh->done_bytes + need <= sh->max_bytes) return true;
    mem_sweep_more(sh, now);
    return mem_total_bytes(sh) - sh->done_bytes + need <= sh->max_bytes;
}

/* Past max_bytes, the oldest completed record of the scope holding the
 * most bytes goes, as many times as it takes. */
bool mem_evict_for(struct store_memory_shared *sh, uint64_t need, uint64_t now)
{
    if (mem_fits(sh, need)) return true;
    if (!mem_can_fit(sh, need, now)) return false;
    bool evicted = false;
    char victim[17] = "";
    while (!mem_fits(sh, need) && sh->heap.len > 0) {
        struct mem_scope *top = *mem_heap_slot(&sh->heap, 0);
        if (!victim[0])
            snprintf(victim, sizeof(victim), "%.*s", (int)(top->name_len < 16 ? top->name_len : 16),
                     top->name);
        evicted |= mem_evict_oldest(sh, top, now);
    }
    if (evicted && mem_warn_due(&sh->evict_logged_ms, now))
        log_msg(LOG_WARN,
                "memory store: full, evicting the oldest completed records of the largest scope "
                "(memory.max_bytes %llu; scope %s)",
                (unsigned long long)sh->max_bytes, victim);
    return mem_fits(sh, need);
}

/* Room in scope sc (NULL: a scope yet to be created) for need more bytes
 * under max_scope_bytes: its own oldest completed records go first. 0, or
 * -1 when its locks alone leave no room (nothing is evicted then). sc must
 * outlive this call (pinned, or holding the lock being completed). */
static int mem_scope_room(struct store_memory_shared *sh, struct mem_scope *sc, uint64_t need,
                          uint64_t now)
{
    uint64_t cap = sh->max_scope_bytes;
    if (!cap || (sc ? sc->bytes : 0) + need <= cap) return 0;
    if (!sc) return -1;
    if (sc->bytes - sc->done_bytes + need > cap) {
        mem_sweep_more(sh, now);
        if (sc->bytes - sc->done_bytes + need > cap) return -1;
    }
    bool evicted = false;
    while (sc->bytes + need > cap && sc->oldest)
        evicted |= mem_evict_oldest(sh, sc, now);
    if (evicted && mem_warn_due(&sh->scope_evict_logged_ms, now))
        log_msg(LOG_WARN,
                "memory store: a scope reached memory.max_scope_bytes %llu, evicting its oldest "
                "completed records (scope %.*s)",
                (unsigned long long)cap, (int)(sc->name_len < 16 ? sc->name_len : 16), sc->name);
    return sc->bytes + need <= cap ? 0 : -1;
}

static void mem_refuse(struct store_memory_shared *sh, const char *what, uint64_t limit,
                       uint64_t now)
{
    sh->refused++;
    if (mem_warn_due(&sh->refuse_logged_ms, now))
        log_msg(LOG_WARN, "memory store: full of in-progress locks, refusing new keys (%s %llu)",
                what, (unsigned long long)limit);
}

/* need_all is need plus what the table itself grows by. */
int mem_make_room(struct store_memory_shared *sh, struct mem_scope *sc, uint64_t need,
                  uint64_t need_all, uint64_t now)
{
    if (!mem_fits(sh, need_all) && !mem_can_fit(sh, need_all, now)) {
        mem_refuse(sh, "memory.max_bytes", sh->max_bytes, now);
        return -1;
    }
    if (mem_scope_room(sh, sc, need, now) < 0) {
        mem_refuse(sh, "memory.max_scope_bytes", sh->max_scope_bytes, now);
        return -1;
    }
    if (!mem_evict_for(sh, need_all, now)) {
        mem_refuse(sh, "memory.max_bytes", sh->max_bytes, now);
        return -1;
    }
    return 0;
}
