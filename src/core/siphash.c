/* siphash.c — SipHash-c-d (siphash.h), from the description in section 2 of
 * the SipHash paper: four 64-bit words of state initialised from the key
 * and four constants, each 8-byte little-endian message word absorbed with
 * c SipRounds, the last word carrying the remaining bytes and the length
 * modulo 256 in its top byte, then 0xff into v2 and d SipRounds. */
#include "idemgate/core/siphash.h"

#include <endian.h>
#include <string.h>

/* The core is inlined into each variant, so that the round counts are
 * constants and the loops unroll. */
#define SIP_INLINE static inline __attribute__((always_inline))

struct sip_state {
    uint64_t v0, v1, v2, v3;
};

SIP_INLINE uint64_t sip_rotl(uint64_t x, int b)
{
    return (x << b) | (x >> (64 - b));
}

/* An 8-byte little-endian word, whatever the host's byte order and the
 * pointer's alignment. */
SIP_INLINE uint64_t sip_load64(const uint8_t *p)
{
    uint64_t v;
    memcpy(&v, p, sizeof(v));
    return le64toh(v);
}

SIP_INLINE void sip_round(struct sip_state *s)
{
    s->v0 += s->v1;
    s->v2 += s->v3;
    s->v1 = sip_rotl(s->v1, 13);
    s->v3 = sip_rotl(s->v3, 16);
    s->v1 ^= s->v0;
    s->v3 ^= s->v2;
    s->v0 = sip_rotl(s->v0, 32);
    s->v2 += s->v1;
    s->v0 += s->v3;
    s->v1 = sip_rotl(s->v1, 17);
    s->v3 = sip_rotl(s->v3, 21);
    s->v1 ^= s->v2;
    s->v3 ^= s->v0;
    s->v2 = sip_rotl(s->v2, 32);
}

SIP_INLINE void sip_absorb(struct sip_state *s, uint64_t m, int c)
{
    s->v3 ^= m;
    for (int i = 0; i < c; i++)
        sip_round(s);
    s->v0 ^= m;
}

SIP_INLINE void sip_init(struct sip_state *s, const uint8_t key[SIPHASH_KEY_LEN])
{
    uint64_t k0 = sip_load64(key), k1 = sip_load64(key + 8);
    /* "somepseudorandomlygeneratedbytes", as in the paper */
    s->v0 = k0 ^ 0x736f6d6570736575ULL;
    s->v1 = k1 ^ 0x646f72616e646f6dULL;
    s->v2 = k0 ^ 0x6c7967656e657261ULL;
    s->v3 = k1 ^ 0x7465646279746573ULL;
}

/* Absorbs the n whole words at p. */
SIP_INLINE void sip_words(struct sip_state *s, const uint8_t *p, size_t n, int c)
{
    for (size_t i = 0; i < n; i++)
        sip_absorb(s, sip_load64(p + 8 * i), c);
}

/* The last word (the tail_len < 8 bytes at tail, the message length mod
 * 256 on top), then the finalization. s is a copy: the caller's state may
 * go on. */
SIP_INLINE uint64_t sip_finish(struct sip_state s, const uint8_t *tail, size_t tail_len, size_t len,
                               int c, int d)
{
    uint8_t last[8] = {0};
    if (tail_len) memcpy(last, tail, tail_len);
    last[7] = (uint8_t)len;
    sip_absorb(&s, sip_load64(last), c);
    s.v2 ^= 0xff;
    for (int i = 0; i < d; i++)
        sip_round(&s);
    return s.v0 ^ s.v1 ^ s.v2 ^ s.v3;
}

/* c compression rounds per word, d finalization rounds. */
SIP_INLINE uint64_t sip_hash(const uint8_t key[SIPHASH_KEY_LEN], const void *msg, size_t len, int c,
                             int d)
{
    struct sip_state s;
    sip_init(&s, key);
    const uint8_t *p = msg;
    sip_words(&s, p, len / 8, c);
    return sip_finish(s, p + len / 8 * 8, len % 8, len, c, d);
}

uint64_t siphash24(const uint8_t key[SIPHASH_KEY_LEN], const void *msg, size_t len)
{
    return sip_hash(key, msg, len, 2, 4);
}

uint64_t siphash13(const uint8_t key[SIPHASH_KEY_LEN], const void *msg, size_t len)
{
    return sip_hash(key, msg, len, 1, 3);
}

/* Both messages share their first split / 8 words: absorbed once, the
 * state is finished twice. */
uint64_t siphash13_split(const uint8_t key[SIPHASH_KEY_LEN], const void *msg, size_t len,
                         size_t split, uint64_t *head)
{
    if (split > len) split = len;
    if (split % 8 != 0) {
        *head = siphash13(key, msg, split);
        return siphash13(key, msg, len);
    }
    const uint8_t *p = msg;
    struct sip_state s;
    sip_init(&s, key);
    sip_words(&s, p, split / 8, 1);
    *head = sip_finish(s, p + split, 0, split, 1, 3);
    size_t rest = len - split;
    sip_words(&s, p + split, rest / 8, 1);
    return sip_finish(s, p + split + rest / 8 * 8, rest % 8, len, 1, 3);
}
