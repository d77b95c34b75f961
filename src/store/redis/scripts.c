/* scripts.c — the Redis store's Lua scripts (see redis_internal.h).
 *
 * Owns the layout of a key's value (rs_lock_value, rs_parse_value), the
 * text of the scripts (acquire, complete, release, renew, the admin API's
 * inspect, and the limits: limit, limit release, limit renew), how many
 * keys each names, their SHA1s, and queueing SCRIPT LOAD for them on a
 * connection: as part of its handshake (the answers are checked there, in
 * conn.c) or again after a NOSCRIPT reply (checked here). Does not own
 * connections, nor call a script: op.c sends EVALSHA with the SHA1s in
 * struct store_redis, or, to acquire on Redis 7.0 and later, SET NX PX
 * GET. */
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

/* The limit scripts' clock: the server's TIME in whole milliseconds (a
 * write after TIME needs effects replication, the default from Redis 5:
 * asked for explicitly for older servers). */
#define RS_LIMIT_NOW                                                                               \
    "redis.replicate_commands()\n"                                                                 \
    "local t = redis.call('TIME')\n"                                                               \
    "local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)\n"

/* A lease of ARGV[lease] ms for ARGV[1] in the slots zset KEYS[k] (its
 * expiry the score); the zset lives as long as its longest lease. */
#define RS_LIMIT_LEASE(k, lease)                                                                   \
    "local lease = tonumber(ARGV[" #lease "])\n"                                                   \
    "redis.call('ZADD', KEYS[" #k "], now + lease, ARGV[1])\n"                                     \
    "if redis.call('PTTL', KEYS[" #k "]) < lease then\n"                                           \
    "  redis.call('PEXPIRE', KEYS[" #k "], lease)\n"                                               \
    "end\n"

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
    /* The limits of a scope (store_limit; the memory store's limits.c
     * decides the same): KEYS the rate state and the slots; ARGV token,
     * requests (0: no rate), window_ms, slots (0: none to take),
     * lease_ms. The rate is a GCRA kept exact in integers: the state
     * "<t0> <d> <n>" says TAT = t0 + d / n ms; a request adds window_ms
     * to d and passes when, after it, TAT - now <= window_ms. Answers
     * {verdict (0 allowed, 1 rate, 2 concurrency), remaining, reset_ms,
     * retry_ms}. */
    /* clang-format off */
    [RS_LIMIT] =
        RS_LIMIT_NOW
        "local n, w, c = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])\n"
        "local left, reset = 0, 0\n"
        "if n > 0 then\n"
        "  local d = 0\n"
        "  local v = redis.call('GET', KEYS[1])\n"
        "  local t0, d0, n0\n"
        "  if v then t0, d0, n0 = string.match(v, '^(%d+) (%d+) (%d+)$') end\n"
        "  if t0 then\n"
        "    t0, d0, n0 = tonumber(t0), tonumber(d0), tonumber(n0)\n"
        "    if n0 ~= n then d0 = math.ceil(d0 * n / n0) end\n"
        "    local el = math.max(now - t0, 0)\n"
        "    if el < math.ceil(d0 / n) then d = d0 - el * n end\n"
        "  end\n"
        "  local d1 = d + w\n"
        "  if d1 > w * n then\n"
        "    return {1, 0, math.ceil(d / n), math.ceil((d1 - w * n) / n)}\n"
        "  end\n"
        "  left = math.floor((w * n - d1) / w)\n"
        "  reset = math.ceil(d1 / n)\n"
        "  redis.call('SET', KEYS[1], string.format('%d %d %d', now, d1, n), 'PX', reset)\n"
        "end\n"
        "if c > 0 then\n"
        "  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)\n"
        "  if redis.call('ZCARD', KEYS[2]) >= c then return {2, left, reset, 0} end\n"
        RS_LIMIT_LEASE(2, 5)
        "end\n"
        "return {0, left, reset, 0}\n",
    /* KEYS the slots, ARGV token: 1 when it held a live lease (gone now). */
    [RS_LIMIT_RELEASE] =
        RS_LIMIT_NOW
        "local e = redis.call('ZSCORE', KEYS[1], ARGV[1])\n"
        "if not e then return 0 end\n"
        "redis.call('ZREM', KEYS[1], ARGV[1])\n"
        "if tonumber(e) > now then return 1 end\n"
        "return 0\n",
    /* KEYS the slots, ARGV token, lease_ms: 1 when it held a live lease
     * (now lease_ms from now). */
    [RS_LIMIT_RENEW] =
        RS_LIMIT_NOW
        "local e = redis.call('ZSCORE', KEYS[1], ARGV[1])\n"
        "if not e then return 0 end\n"
        "if tonumber(e) <= now then\n"
        "  redis.call('ZREM', KEYS[1], ARGV[1])\n"
        "  return 0\n"
        "end\n"
        RS_LIMIT_LEASE(1, 2)
        "return 1\n",
    /* clang-format on */
};

/* The scripts that name two keys; the others name one. */
const char *rs_script_numkeys(enum rs_script i)
{
    return i == RS_LIMIT ? "2" : "1";
}

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
