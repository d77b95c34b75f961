/* writer.c — the writer thread of an LMDB environment opened with sync
 * "fsync": group commit. A flush costs the disk's latency (0.3 to 8 ms
 * here), which would stop a worker's event loop for that long if the
 * worker committed itself. Instead every write operation is queued here;
 * the thread takes all that queued up while the last flush ran, runs them
 * in one transaction (each sees the ones before it, in queue order, as
 * if run alone), commits, flushes once (mdb_env_sync), and only then
 * hands each back to its loop (lm_job.land): a lock or a record is on
 * disk before the request is forwarded or its answer let go. The more
 * requests wait, the more share one flush.
 *
 * Owns the thread; the jobs are their operations' (ops.c). */
#include "internal.h"

#include "idemgate/core/log.h"

static void *writer_main(void *arg)
{
    struct store_lmdb_env *e = arg;
    struct lm_jobq q;
    for (;;) {
        pthread_mutex_lock(&e->mu);
        while (TAILQ_EMPTY(&e->jobs) && !e->stop)
            pthread_cond_wait(&e->cv, &e->mu);
        if (TAILQ_EMPTY(&e->jobs)) {
            pthread_mutex_unlock(&e->mu);
            return NULL;
        }
        TAILQ_INIT(&q);
        TAILQ_CONCAT(&q, &e->jobs, link);
        pthread_mutex_unlock(&e->mu);

        lm_run_batch(e, &q);
        /* One flush for the batch; none when nothing was committed. */
        int rc = atomic_exchange(&e->unsynced, false) ? mdb_env_sync(e->env, 1) : 0;
        if (rc)
            log_msg(LOG_ERROR, "lmdb store: flush failed: %s (lmdb.path %s)", mdb_strerror(rc),
                    e->path);
        struct lm_job *j;
        while ((j = TAILQ_FIRST(&q))) {
            TAILQ_REMOVE(&q, j, link);
            /* Not on disk: what it did may be lost at a power loss, so it
             * answers as a store error (a lock it took expires). */
            if (rc && !j->rc) j->rc = rc;
            j->land(j);
        }
    }
}

int lm_writer_start(struct store_lmdb_env *e)
{
    pthread_mutex_init(&e->mu, NULL);
    pthread_cond_init(&e->cv, NULL);
    TAILQ_INIT(&e->jobs);
    int rc = pthread_create(&e->writer, NULL, writer_main, e);
    e->writer_started = rc == 0;
    return rc;
}

void lm_writer_stop(struct store_lmdb_env *e)
{
    if (!e->writer_started) return;
    pthread_mutex_lock(&e->mu);
    e->stop = true;
    pthread_cond_signal(&e->cv);
    pthread_mutex_unlock(&e->mu);
    pthread_join(e->writer, NULL);
    e->writer_started = false;
    pthread_cond_destroy(&e->cv);
    pthread_mutex_destroy(&e->mu);
}

void lm_writer_submit(struct store_lmdb_env *e, struct lm_job *j)
{
    pthread_mutex_lock(&e->mu);
    bool idle = TAILQ_EMPTY(&e->jobs);
    TAILQ_INSERT_TAIL(&e->jobs, j, link);
    if (idle) pthread_cond_signal(&e->cv);
    pthread_mutex_unlock(&e->mu);
}
