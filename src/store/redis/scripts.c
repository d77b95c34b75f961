/* scripts.c — the Redis store's Lua scripts (see redis_internal.h).
 *
 * Owns the layout of a key's value (rs_lock_value, rs_parse_value), the
 * text of the scripts (acquire, complete, release, renew, and the admin
 * API's inspect), their
 * SHA1s, and queueing SCRIPT LOAD for them on a connection: as part
 * of its handshake (the answers are checked there, in conn.c) or again
 * after a NOSCRIPT reply (checked here). Does not own connections, nor
 * call a script: op.c sends EVALSHA with the SHA1s in struct store_redis,
 * or, to acquire on Redis 7.0 and later, SET NX PX GET. */
#include "redis_internal.h"

#include "idemgate/core/log.h"

#include <openssl/evp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* The owner check the fenced scripts share: the value at KEYS[1] is a
 * lock (state 'p') of this layout holding ARGV[1] as its token. A key of
 * another type (an older idemgate's hash, whose lock is not ours anyway)
 * fails the script with WRONGTYPE: a store error to the caller. */
#define RS_STR_(x) #x
#define RS_STR(x) RS_STR_(x)
#define RS_OWNED_CHECK                                                                             \
    "local v = redis.call('GET', KEYS[1])\n"                                                       \
    "if not v or #v ~= " RS_STR(RS_VAL_HDR) " or string.sub(v, 1, 36) ~= '" RS_VAL_MAGIC           \
                                            "p' .. ARGV[1] then return 0 end\n"

/* The scripts (values: "<magic>" state token fingerprint created-at
 * record, see redis_internal.h). Acquire answers like SET NX GET: nil
 * when it took the lock, else the value there. It is what a server older
 * than 7.0 acquires with, and what reads a key an older idemgate wrote (a
 * hash s/t/f/r), answering its state in this layout without changing it
 * (no created-at: zeros). */
static const char *const rs_scripts[RS_NSCRIPTS] = {
    [RS_ACQUIRE] =
        "if redis.call('TYPE', KEYS[1]).ok == 'hash' then\n"
        "  local h = redis.call('HMGET', KEYS[1], 's', 't', 'f', 'r')\n"
        "  return '" RS_VAL_MAGIC "' .. h[1] .. (h[2] or string.rep('0', 32)) .. h[3] ..\n"
        "         string.rep('\\0', 8) .. (h[4] or '')\n"
        "end\n"
        "local v = redis.call('GET', KEYS[1])\n"
        "if v then return v end\n"
        "redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])\n"
        "return false\n",
    [RS_COMPLETE] = RS_OWNED_CHECK "redis.call('SET', KEYS[1], '" RS_VAL_MAGIC
                                   "c' .. string.sub(v, 5, " RS_STR(RS_VAL_HDR) ") .. ARGV[2], "
                                                                                "'EX', ARGV[3])\n"
                                                                                "return 1\n",
    [RS_RELEASE] = RS_OWNED_CHECK "redis.call('DEL', KEYS[1])\n"
                                  "return 1\n",
    [RS_RENEW] = RS_OWNED_CHECK "redis.call('PEXPIRE', KEYS[1], ARGV[2])\n"
                                "return 1\n",
    /* The admin API: {value (an older hash read into this layout), PTTL},
     * or nil; ARGV[1] == '1' deletes it in the same step. */
    [RS_INSPECT] = "local t = redis.call('TYPE', KEYS[1]).ok\n"
                   "local v\n"
                   "if t == 'hash' then\n"
                   "  local h = redis.call('HMGET', KEYS[1], 's', 't', 'f', 'r')\n"
                   "  v = '" RS_VAL_MAGIC "' .. (h[1] or '?') .. (h[2] or string.rep('0', 32)) ..\n"
                   "      (h[3] or string.rep('\\0', 16)) .. string.rep('\\0', 8) .. (h[4] or '')\n"
                   "elseif t == 'string' then\n"
                   "  v = redis.call('GET', KEYS[1])\n"
                   "else\n"
                   "  return false\n"
                   "end\n"
                   "local ttl = redis.call('PTTL', KEYS[1])\n"
                   "if ARGV[1] == '1' then redis.call('DEL', KEYS[1]) end\n"
                   "return {v, ttl}\n",
};

/* The value of a new lock: header, no record. */
void rs_lock_value(char out[RS_VAL_HDR], const uint8_t fp[STORE_FP_LEN],
                   const char token[STORE_TOKEN_LEN], uint64_t created_ms)
{
    memcpy(out, RS_VAL_MAGIC, 3);
    out[3] = 'p';
    memcpy(out + 4, token, STORE_TOKEN_LEN);
    memcpy(out + 4 + STORE_TOKEN_LEN, fp, STORE_FP_LEN);
    for (int i = 0; i < 8; i++)
        out[RS_VAL_HDR - 1 - i] = (char)(created_ms >> (8 * i));
}

/* What the value v (not ours: SET NX found it) means to an acquire with
 * fingerprint fp; false when it is not a value of this layout. */
bool rs_parse_value(const char *v, size_t n, const uint8_t fp[STORE_FP_LEN],
                    struct store_acquire_reply *out)
{
    if (n < RS_VAL_HDR || memcmp(v, RS_VAL_MAGIC, 3) != 0) return false;
    bool same = memcmp(v + 4 + STORE_TOKEN_LEN, fp, STORE_FP_LEN) == 0;
    switch (v[3]) {
    case 'p':
        if (n != RS_VAL_HDR) return false;
        out->state = same ? STORE_ACQ_IN_PROGRESS : STORE_ACQ_MISMATCH;
        return true;
    case 'c':
        out->state = same ? STORE_ACQ_COMPLETED : STORE_ACQ_MISMATCH;
        if (same) {
            out->record = (const uint8_t *)v + RS_VAL_HDR;
            out->record_len = n - RS_VAL_HDR;
        }
        return true;
    default:
        return false;
    }
}

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
bool rs_script_loaded(const struct store_redis *s, const struct rreply *r, intptr_t i)
{
    return r->type == RREPLY_STRING && r->len == 40 && memcmp(r->str, s->sha[i], 40) == 0;
}

/* Queues SCRIPT LOAD for every script, with the script's index as the
 * callback's privdata; commands sent after these on the same connection
 * run after them, so nobody waits for the answers. */
int rs_scripts_load(struct rconn *c, rc_reply_fn *fn)
{
    for (intptr_t i = 0; i < RS_NSCRIPTS; i++) {
        const char *argv[3] = {"SCRIPT", "LOAD", rs_scripts[i]};
        size_t lens[3] = {6, 4, strlen(rs_scripts[i])};
        if (rc_command(c, fn, (void *)i, 3, argv, lens) != 0) return -1;
    }
    return 0;
}

static void rs_reload_cb(struct rconn *c, const struct rreply *r, void *priv)
{
    if (r && !rs_script_loaded(c->s, r, (intptr_t)priv))
        log_msg(LOG_ERROR, "store redis: SCRIPT LOAD failed on NOSCRIPT reload");
}

/* The server forgot the scripts (SCRIPT FLUSH, a restart without
 * persistence): load them again on c; a failure is only logged. */
int rs_scripts_reload(struct rconn *c)
{
    return rs_scripts_load(c, rs_reload_cb);
}
