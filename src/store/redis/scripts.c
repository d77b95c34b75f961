/* scripts.c — the Redis store's Lua scripts (see redis_internal.h).
 *
 * Owns the text of the four scripts (acquire, complete, release, renew),
 * their SHA1s, and queueing SCRIPT LOAD for them on a connection: as part
 * of its handshake (the answers are checked there, in conn.c) or again
 * after a NOSCRIPT reply (checked here). Does not own connections, nor
 * call a script: op.c sends EVALSHA with the SHA1s in struct store_redis. */
#include "redis_internal.h"

#include "idemgate/core/log.h"

#include <openssl/evp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Acquire replies {code} or {3, record}; codes follow the table in store.h.
 * HMGET returns false for a missing key or field, so an absent key reads
 * as s == false. */
static const char *const rs_scripts[RS_NSCRIPTS] = {
    [RS_ACQUIRE] = "local v = redis.call('HMGET', KEYS[1], 's', 'f')\n"
                   "if not v[1] then\n"
                   "  redis.call('HSET', KEYS[1], 's', 'p', 't', ARGV[2], 'f', ARGV[1])\n"
                   "  redis.call('PEXPIRE', KEYS[1], ARGV[3])\n"
                   "  return {0}\n"
                   "end\n"
                   "if v[2] ~= ARGV[1] then return {2} end\n"
                   "if v[1] == 'c' then\n"
                   "  return {3, redis.call('HGET', KEYS[1], 'r')}\n"
                   "end\n"
                   "return {1}\n",
    [RS_COMPLETE] = "local v = redis.call('HMGET', KEYS[1], 's', 't')\n"
                    "if v[1] ~= 'p' or v[2] ~= ARGV[1] then return 0 end\n"
                    "redis.call('HSET', KEYS[1], 's', 'c', 'r', ARGV[2])\n"
                    "redis.call('HDEL', KEYS[1], 't')\n"
                    "redis.call('EXPIRE', KEYS[1], ARGV[3])\n"
                    "return 1\n",
    [RS_RELEASE] = "local v = redis.call('HMGET', KEYS[1], 's', 't')\n"
                   "if v[1] ~= 'p' or v[2] ~= ARGV[1] then return 0 end\n"
                   "redis.call('DEL', KEYS[1])\n"
                   "return 1\n",
    [RS_RENEW] = "local v = redis.call('HMGET', KEYS[1], 's', 't')\n"
                 "if v[1] ~= 'p' or v[2] ~= ARGV[1] then return 0 end\n"
                 "redis.call('PEXPIRE', KEYS[1], ARGV[2])\n"
                 "return 1\n",
};

static void rs_sha1_hex(const char *text, char out[41])
{
    unsigned char md[EVP_MAX_MD_SIZE];
    unsigned int n = 0;
    if (!EVP_Digest(text, strlen(text), md, &n, EVP_sha1(), NULL) || n != 20) abort();
    for (unsigned i = 0; i < n; i++)
        snprintf(out + 2 * i, 3, "%02x", md[i]);
}

/* The SHA1 of each script, which EVALSHA names it by. */
void rs_scripts_hash(char sha[RS_NSCRIPTS][41])
{
    for (int i = 0; i < RS_NSCRIPTS; i++)
        rs_sha1_hex(rs_scripts[i], sha[i]);
}

/* Whether r is SCRIPT LOAD's answer for script i: its SHA1. */
bool rs_script_loaded(const struct store_redis *s, const redisReply *r, intptr_t i)
{
    return r->type == REDIS_REPLY_STRING && r->len == 40 && memcmp(r->str, s->sha[i], 40) == 0;
}

/* Queues SCRIPT LOAD for every script, with the script's index as the
 * callback's privdata; commands sent after these on the same connection
 * run after them, so nobody waits for the answers. */
int rs_scripts_load(struct rconn *c, redisCallbackFn *fn)
{
    for (intptr_t i = 0; i < RS_NSCRIPTS; i++) {
        const char *argv[3] = {"SCRIPT", "LOAD", rs_scripts[i]};
        size_t lens[3] = {6, 4, strlen(rs_scripts[i])};
        if (redisAsyncCommandArgv(c->ac, fn, (void *)i, 3, argv, lens) != REDIS_OK) return -1;
    }
    return 0;
}

static void rs_reload_cb(redisAsyncContext *ac, void *reply, void *priv)
{
    struct rconn *c = rc_of(ac);
    if (c && reply && !rs_script_loaded(c->s, reply, (intptr_t)priv))
        log_msg(LOG_ERROR, "store redis: SCRIPT LOAD failed on NOSCRIPT reload");
}

/* The server forgot the scripts (SCRIPT FLUSH, a restart without
 * persistence): load them again on c; a failure is only logged. */
int rs_scripts_reload(struct rconn *c)
{
    return rs_scripts_load(c, rs_reload_cb);
}
