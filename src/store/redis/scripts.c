/* scripts.c — the Redis store's Lua scripts (part of redis_internal.h).
 *
 * Owns the text of the four scripts, their SHA1s, and loading them on a
 * connection (SCRIPT LOAD at handshake, again on NOSCRIPT). Does not own
 * the connection, nor call a script (op.c sends EVALSHA). */
#include "redis_internal.h"

#include "idemgate/core/log.h"

#include <openssl/evp.h>
#include <stdio.h>
#include <string.h>

/* Acquire replies {code} or {3, record}; codes follow the table in store.h.
 * HMGET returns false for a missing key or field, so an absent key reads
 * as s == false. */
const char *const rs_scripts[RS_NSCRIPTS] = {
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

void rs_sha1_hex(const char *text, char out[41])
{
    unsigned char md[EVP_MAX_MD_SIZE];
    unsigned int n = 0;
    if (!EVP_Digest(text, strlen(text), md, &n, EVP_sha1(), NULL) || n != 20) abort();
    for (unsigned i = 0; i < n; i++)
        snprintf(out + 2 * i, 3, "%02x", md[i]);
}

bool rs_check_load_reply(const struct store_redis *s, const redisReply *r, intptr_t i)
{
    return r->type == REDIS_REPLY_STRING && r->len == 40 && memcmp(r->str, s->sha[i], 40) == 0;
}

void rc_reload_cb(redisAsyncContext *ac, void *reply, void *priv)
{
    struct rconn *c = rc_of(ac);
    if (c && reply && !rs_check_load_reply(c->s, reply, (intptr_t)priv))
        log_msg(LOG_ERROR, "store redis: SCRIPT LOAD failed on NOSCRIPT reload");
}

/* Queues SCRIPT LOAD for every script; commands sent after these on the
 * same connection run after them, so nobody waits for the answers. */
int rc_load_scripts(struct rconn *c, redisCallbackFn *fn)
{
    for (intptr_t i = 0; i < RS_NSCRIPTS; i++) {
        const char *argv[3] = {"SCRIPT", "LOAD", rs_scripts[i]};
        size_t lens[3] = {6, 4, strlen(rs_scripts[i])};
        if (redisAsyncCommandArgv(c->ac, fn, (void *)i, 3, argv, lens) != REDIS_OK) return -1;
    }
    return 0;
}
