/* env.c — the LMDB store's environment (struct store_lmdb_env, store.h):
 * -t's check of lmdb.path, opening the environment once per process (and
 * refusing one that is not ours or holds more than max_bytes), its stats,
 * the admin API's view of one key, and freeing it.
 *
 * Owns the struct, its MDB_env (closed by store_lmdb_env_free) and its
 * resolved path. Does not own the stores made on it (ops.c) nor what the
 * transactions decide (txn.c, keys.c, limits.c). */
#include "internal.h"

#include "idemgate/core/log.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

/* The sub-databases, in the order of the struct's MDB_dbi members. */
static const char *const lm_db_names[] = {"entries", "expiry", "heap",   "done",
                                          "limits",  "meta",   "scopes", NULL};

/* mkdir -p: 0, or -1 with errno. */
static int lm_mkdir_p(const char *path)
{
    char buf[PATH_MAX];
    size_t n = strlen(path);
    if (n == 0 || n >= sizeof(buf)) {
        errno = ENAMETOOLONG;
        return -1;
    }
    memcpy(buf, path, n + 1);
    for (char *p = buf + 1; *p; p++) {
        if (*p != '/') continue;
        *p = '\0';
        if (mkdir(buf, 0750) < 0 && errno != EEXIST) return -1;
        *p = '/';
    }
    if (mkdir(buf, 0750) < 0 && errno != EEXIST) return -1;
    struct stat st;
    if (stat(buf, &st) < 0) return -1;
    if (!S_ISDIR(st.st_mode)) {
        errno = ENOTDIR;
        return -1;
    }
    return 0;
}

int store_lmdb_check_path(const char *path, char *err, size_t errlen)
{
    if (lm_mkdir_p(path) < 0) {
        snprintf(err, errlen, "cannot create %s: %s", path, strerror(errno));
        return -1;
    }
    char probe[PATH_MAX];
    snprintf(probe, sizeof(probe), "%s/data.mdb", path);
    int fd = open(probe, O_RDWR | O_CLOEXEC);
    if (fd < 0 && errno == ENOENT) {
        snprintf(probe, sizeof(probe), "%s/.idemgate-check-XXXXXX", path);
        fd = mkstemp(probe);
        if (fd >= 0) unlink(probe);
    }
    if (fd < 0) {
        snprintf(err, errlen, "cannot write in %s: %s", path, strerror(errno));
        return -1;
    }
    close(fd);
    return 0;
}

/* Every key of the main database must name one of our databases. */
static int lm_check_main(MDB_txn *t, const char *path, char *err, size_t errlen)
{
    MDB_dbi main_db;
    MDB_cursor *c;
    int rc = mdb_dbi_open(t, NULL, 0, &main_db);
    if (!rc) rc = mdb_cursor_open(t, main_db, &c);
    if (rc) {
        snprintf(err, errlen, "lmdb.path: cannot read %s: %s", path, mdb_strerror(rc));
        return -1;
    }
    MDB_val k, v;
    int bad = 0;
    for (rc = mdb_cursor_get(c, &k, &v, MDB_FIRST); rc == 0 && !bad;
         rc = mdb_cursor_get(c, &k, &v, MDB_NEXT)) {
        bad = 1;
        for (const char *const *n = lm_db_names; *n; n++)
            if (k.mv_size == strlen(*n) && memcmp(k.mv_data, *n, k.mv_size) == 0) bad = 0;
        if (bad)
            snprintf(err, errlen,
                     "lmdb.path: %s holds another program's LMDB databases (%.*s), not idemgate's",
                     path, (int)(k.mv_size > 40 ? 40 : k.mv_size), (const char *)k.mv_data);
    }
    mdb_cursor_close(c);
    return bad ? -1 : 0;
}

/* Opens (or creates) our databases and checks the layout's name. */
static int lm_open_dbs(struct store_lmdb_env *e, char *err, size_t errlen)
{
    MDB_txn *t;
    int rc = mdb_txn_begin(e->env, NULL, 0, &t);
    if (rc) {
        snprintf(err, errlen, "lmdb.path: cannot write to %s: %s", e->path, mdb_strerror(rc));
        return -1;
    }
    if (lm_check_main(t, e->path, err, errlen) < 0) {
        mdb_txn_abort(t);
        return -1;
    }
    MDB_dbi *dbis[] = {&e->entries, &e->expiry, &e->heap,  &e->done,
                       &e->limits,  &e->meta,   &e->scopes};
    for (size_t i = 0; lm_db_names[i] && !rc; i++)
        rc = mdb_dbi_open(t, lm_db_names[i], MDB_CREATE, dbis[i]);
    MDB_val k = {6, "layout"}, v;
    if (!rc) {
        rc = mdb_get(t, e->meta, &k, &v);
        if (rc == MDB_NOTFOUND) {
            v.mv_size = strlen(LM_LAYOUT);
            v.mv_data = LM_LAYOUT;
            rc = mdb_put(t, e->meta, &k, &v, 0);
        } else if (!rc && (v.mv_size != strlen(LM_LAYOUT) ||
                           memcmp(v.mv_data, LM_LAYOUT, v.mv_size) != 0)) {
            snprintf(err, errlen, "lmdb.path: %s holds another layout (%.*s), not %s", e->path,
                     (int)(v.mv_size > 40 ? 40 : v.mv_size), (const char *)v.mv_data, LM_LAYOUT);
            mdb_txn_abort(t);
            return -1;
        }
    }
    if (!rc)
        rc = mdb_txn_commit(t);
    else
        mdb_txn_abort(t);
    if (rc) {
        snprintf(err, errlen, "lmdb.path: cannot open the databases in %s: %s", e->path,
                 mdb_strerror(rc));
        return -1;
    }
    return 0;
}

/* Data already above max_bytes: LMDB would quietly grow the map instead. */
static int lm_check_size(struct store_lmdb_env *e, char *err, size_t errlen)
{
    MDB_envinfo info;
    MDB_stat st;
    mdb_env_info(e->env, &info);
    mdb_env_stat(e->env, &st);
    uint64_t used = ((uint64_t)info.me_last_pgno + 1) * st.ms_psize;
    if (used <= e->max_bytes && info.me_mapsize <= e->max_bytes) return 0;
    snprintf(err, errlen,
             "lmdb.path: %s holds %llu bytes, more than lmdb.max_bytes %llu (raise it, or move "
             "the files away)",
             e->path, (unsigned long long)(used > info.me_mapsize ? used : info.me_mapsize),
             (unsigned long long)e->max_bytes);
    return -1;
}

int store_lmdb_env_open(const struct store_lmdb_opts *o, struct store_lmdb_env **out, char *err,
                        size_t errlen)
{
    *out = NULL;
    if (lm_mkdir_p(o->path) < 0) {
        snprintf(err, errlen, "lmdb.path: cannot create %s: %s", o->path, strerror(errno));
        return -1;
    }
    char real[PATH_MAX];
    if (!realpath(o->path, real)) {
        snprintf(err, errlen, "lmdb.path: cannot resolve %s: %s", o->path, strerror(errno));
        return -1;
    }
    struct store_lmdb_env *e = lm_alloc(sizeof(*e));
    e->path = strdup(real);
    if (!e->path) abort();
    e->max_bytes = o->max_bytes;
    e->budget = o->max_bytes / 2;
    atomic_init(&e->max_scope_bytes, o->max_scope_bytes);
    e->fsync = o->fsync;
    int rc = mdb_env_create(&e->env);
    if (!rc) rc = mdb_env_set_maxdbs(e->env, 8);
    if (!rc) rc = mdb_env_set_mapsize(e->env, (size_t)o->max_bytes);
    if (!rc) rc = mdb_env_set_maxreaders(e->env, 512);
    /* MDB_NOTLS: a read transaction is not tied to its thread's slot.
     * MDB_NOSYNC: a commit is in the page cache, which outlives the
     * process, and is flushed by the OS; with sync "fsync" the writer
     * thread flushes each batch of commits itself (writer.c). MDB_WRITEMAP: a
     * transaction writes its (copied-on-write) pages into the shared map
     * itself instead of malloc'd copies written out at commit: a process
     * killed mid-transaction leaves only pages no committed meta page
     * points to (the kill loop, tests/faults/test_lmdb_kill.py, checks it),
     * and an acquire + complete pair costs 5.7 us instead of 24 us
     * (bench/store_bench lmdb). Every process on a path opens it the same
     * way. */
    unsigned flags = MDB_NOTLS | MDB_WRITEMAP | MDB_NOSYNC;
    if (!rc) rc = mdb_env_open(e->env, e->path, flags, 0640);
    if (rc) {
        snprintf(err, errlen, "lmdb.path: cannot open the LMDB environment in %s: %s", e->path,
                 rc == MDB_INVALID ? "data.mdb is not an LMDB file" : mdb_strerror(rc));
        store_lmdb_env_free(e);
        return -1;
    }
    int dead = 0;
    mdb_reader_check(e->env, &dead);
    if (lm_check_size(e, err, errlen) < 0 || lm_open_dbs(e, err, errlen) < 0) {
        store_lmdb_env_free(e);
        return -1;
    }
    if (e->fsync && lm_writer_start(e) != 0) {
        snprintf(err, errlen, "lmdb.path: cannot start the writer thread for %s", e->path);
        store_lmdb_env_free(e);
        return -1;
    }
    *out = e;
    return 0;
}

const char *store_lmdb_env_path(const struct store_lmdb_env *env)
{
    return env->path;
}

void store_lmdb_env_set_scope_bound(struct store_lmdb_env *env, uint64_t max_scope_bytes)
{
    atomic_store(&env->max_scope_bytes, max_scope_bytes);
}

void store_lmdb_env_free(struct store_lmdb_env *env)
{
    if (!env) return;
    lm_writer_stop(env);
    if (env->env) {
        if (env->fsync) mdb_env_sync(env->env, 1);
        mdb_env_close(env->env);
    }
    free(env->path);
    free(env);
}

void store_lmdb_stats(struct store_lmdb_env *env, struct store_lmdb_stats *out)
{
    memset(out, 0, sizeof(*out));
    out->max_bytes = env->max_bytes;
    out->max_scope_bytes = atomic_load(&env->max_scope_bytes);
    MDB_envinfo info;
    MDB_stat st;
    mdb_env_info(env->env, &info);
    mdb_env_stat(env->env, &st);
    out->file_bytes = ((uint64_t)info.me_last_pgno + 1) * st.ms_psize;
    MDB_txn *t;
    if (mdb_txn_begin(env->env, NULL, MDB_RDONLY, &t)) return;
    struct lm_totals tot = {0};
    MDB_val k = {6, "totals"}, v;
    if (mdb_get(t, env->meta, &k, &v) == 0 && v.mv_size == sizeof(tot))
        memcpy(&tot, v.mv_data, sizeof(tot));
    mdb_txn_abort(t);
    out->bytes = tot.bytes;
    out->entries = tot.entries;
    out->completed = tot.completed;
    out->locks = tot.entries - tot.completed;
    out->scopes = tot.scopes;
    out->evictions = tot.evictions;
    out->expired = tot.expired;
    out->refused = tot.refused;
}

uint64_t store_lmdb_scope_bytes(struct store_lmdb_env *env, const char *scope, size_t len)
{
    MDB_txn *t;
    if (mdb_txn_begin(env->env, NULL, MDB_RDONLY, &t)) return 0;
    struct lm_scope sc = {0};
    MDB_val k = {len, (void *)scope}, v;
    if (mdb_get(t, env->scopes, &k, &v) == 0 && v.mv_size == sizeof(sc))
        memcpy(&sc, v.mv_data, sizeof(sc));
    mdb_txn_abort(t);
    return sc.bytes;
}

/* ---- the admin API ---- */

struct lm_key_args {
    const char *skey;
    size_t len;
    bool scope_prefix, forget;
    struct store_key_info *out;
};

/* Whether stored (an entry's skey) is skey, or with scope_prefix has a
 * scope starting with skey's scope and the same key. */
static bool lm_key_match(const char *stored, size_t slen, const char *skey, size_t len,
                         bool scope_prefix)
{
    if (!scope_prefix) return slen == len && memcmp(stored, skey, len) == 0;
    const char *colon = memchr(skey, ':', len), *scolon = memchr(stored, ':', slen);
    if (!colon || !scolon) return false;
    size_t sl = (size_t)(colon - skey), ssl = (size_t)(scolon - stored);
    size_t kl = len - sl - 1, skl = slen - ssl - 1;
    return ssl >= sl && memcmp(stored, skey, sl) == 0 && skl == kl &&
           memcmp(scolon + 1, colon + 1, kl) == 0;
}

/* A scope prefix: the first live entry that matches (a walk of all). */
static int lm_key_scan(struct lm_txn *x, struct lm_key_args *a, struct lm_entry *en)
{
    MDB_cursor *c;
    int rc = mdb_cursor_open(x->t, x->e->entries, &c);
    if (rc) return -1;
    MDB_val k, v;
    int found = 0;
    for (rc = mdb_cursor_get(c, &k, &v, MDB_FIRST); rc == 0 && !found;
         rc = mdb_cursor_get(c, &k, &v, MDB_NEXT)) {
        if (v.mv_size < sizeof(struct lm_hdr) || k.mv_size > LM_KEY_MAX) continue;
        struct lm_hdr h;
        memcpy(&h, v.mv_data, sizeof(h));
        if (h.expires_ms <= x->now || sizeof(h) + h.skey_len > v.mv_size) continue;
        const char *stored = (const char *)v.mv_data + sizeof(h);
        if (!lm_key_match(stored, h.skey_len, a->skey, a->len, true)) continue;
        memcpy(en->key, k.mv_data, k.mv_size);
        en->key_len = k.mv_size;
        en->h = h;
        en->val = v.mv_data;
        en->val_len = v.mv_size;
        found = 1;
    }
    mdb_cursor_close(c);
    return found;
}

static int lm_key_txn(struct lm_txn *x, void *arg)
{
    struct lm_key_args *a = arg;
    struct store_key_info *out = a->out;
    store_key_info_free(out);
    memset(out, 0, sizeof(*out));
    out->ttl_ms = -1;
    struct lm_entry en;
    int f = a->scope_prefix ? lm_key_scan(x, a, &en) : lm_entry_find(x, a->skey, a->len, &en);
    if (f < 0) {
        out->found = -1;
        return x->err;
    }
    if (f == 0) return 0;
    out->found = 1;
    out->completed = en.h.completed;
    memcpy(out->fp, en.h.fp, STORE_FP_LEN);
    out->created_ms = en.h.created_ms;
    out->ttl_ms = (int64_t)(en.h.expires_ms - x->now);
    out->skey_len = en.h.skey_len;
    out->skey = lm_alloc(out->skey_len + 1);
    memcpy(out->skey, en.val + sizeof(struct lm_hdr), out->skey_len);
    if (en.h.completed) {
        size_t off = sizeof(struct lm_hdr) + en.h.skey_len;
        out->record_len = en.val_len - off;
        out->record = lm_alloc(out->record_len);
        memcpy(out->record, en.val + off, out->record_len);
    }
    if (a->forget) lm_drop(x, &en, out->skey);
    return 0;
}

void store_lmdb_key(struct store_lmdb_env *env, const char *skey, size_t skey_len,
                    bool scope_prefix, bool forget, struct store_key_info *out)
{
    memset(out, 0, sizeof(*out));
    struct lm_key_args a = {skey, skey_len, scope_prefix, forget, out};
    if (lm_run(env, lm_key_txn, &a) != 0) {
        store_key_info_free(out);
        memset(out, 0, sizeof(*out));
        out->found = -1;
        out->ttl_ms = -1;
    }
}
