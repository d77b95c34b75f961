/* siphash.h — SipHash (Aumasson and Bernstein, "SipHash: a fast short-input
 * PRF", 2012), written from the paper's description: a keyed 64-bit hash
 * for hash tables whose keys an adversary chooses. Without the 128-bit key
 * nobody can predict which inputs collide, so a client cannot pile its keys
 * into one bucket.
 *
 * Pure functions: nothing is allocated, nothing is kept. */
#ifndef IDEMGATE_SIPHASH_H
#define IDEMGATE_SIPHASH_H

#include <stddef.h>
#include <stdint.h>

#define SIPHASH_KEY_LEN 16

/* SipHash-2-4 (2 compression rounds per 8-byte word, 4 finalization
 * rounds), the variant of the paper's test vector; the key is read as two
 * little-endian 64-bit words, as the paper does. */
uint64_t siphash24(const uint8_t key[SIPHASH_KEY_LEN], const void *msg, size_t len);
/* SipHash-1-3: the same with 1 and 3 rounds, about twice as fast; what
 * CPython and Rust use for their hash tables, and what the memory store
 * uses. */
uint64_t siphash13(const uint8_t key[SIPHASH_KEY_LEN], const void *msg, size_t len);
/* SipHash-1-3 of msg (len bytes), and in *head that of its first split
 * bytes (split <= len), in one pass when split is a multiple of 8. */
uint64_t siphash13_split(const uint8_t key[SIPHASH_KEY_LEN], const void *msg, size_t len,
                         size_t split, uint64_t *head);

#endif
