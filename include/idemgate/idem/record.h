/* record.h — the stored-response encoding.
 *
 * A record is one versioned binary blob (all integers big-endian):
 *   magic "IGR" | version u8 (=1) | status u16 | created_ms u64 |
 *   fingerprint 16 bytes | n_headers u16 |
 *   n_headers x { name_len u16 | name | value_len u32 | value } |
 *   body_len u64 | body
 * and nothing after. The decoder refuses anything truncated, with trailing
 * bytes, of another magic/version, a status outside 100..599, more than
 * RECORD_MAX_HEADERS headers, or a total larger than max_len.
 *
 * Writing is incremental, so a response can be recorded while it streams:
 * record_begin, record_add_header for each header, record_begin_body, then
 * append body bytes to the buf directly, then record_end. */
#ifndef IDEMGATE_RECORD_H
#define IDEMGATE_RECORD_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "idemgate/core/buf.h"

#define RECORD_VERSION 1

/* Pseudo-headers (names starting with ':', which no HTTP header can have)
 * carry what is not a header: the reason phrase, a HEAD answer's declared
 * length, and the mark of a lost answer (docs/requests.md: the upstream ran
 * but its answer never arrived whole; its value says why). */
#define RECORD_HDR_REASON ":reason"
#define RECORD_HDR_LENGTH ":content-length"
#define RECORD_HDR_LOST ":lost"
#define RECORD_MAX_HEADERS 200

struct record_header {
    const char *name; /* borrowed slice into the decoded blob */
    size_t name_len;
    const char *value;
    size_t value_len;
};

/* A decoded record: every pointer is a slice into the blob given to
 * record_decode (borrowed; valid while the blob is). */
struct record {
    int status;
    uint64_t created_ms;
    uint8_t fp[16];
    size_t n_headers;
    struct record_header headers[RECORD_MAX_HEADERS];
    const uint8_t *body;
    uint64_t body_len;
};

/* Incremental writer state; the bytes go to *out (borrowed). */
struct record_writer {
    struct buf *out;
    size_t start;     /* offset in out where the record begins */
    size_t count_off; /* offset of n_headers */
    size_t body_off;  /* offset of body_len, set by record_begin_body */
    uint16_t n_headers;
};

void record_begin(struct record_writer *w, struct buf *out, int status, uint64_t created_ms,
                  const uint8_t fp[16]);
/* Returns -1 (and writes nothing) beyond RECORD_MAX_HEADERS or when a name
 * is over 65535 bytes. */
int record_add_header(struct record_writer *w, const char *name, size_t name_len, const char *value,
                      size_t value_len);
void record_begin_body(struct record_writer *w);
/* Patches the header count and body length. */
void record_end(struct record_writer *w);

/* Convenience: encodes a whole struct record into out (appended). */
int record_encode(const struct record *r, struct buf *out);

/* The value of pseudo-header name, or NULL (with *len untouched). */
const char *record_pseudo(const struct record *r, const char *name, size_t *len);
/* True for a lost record (RECORD_HDR_LOST present). */
bool record_is_lost(const struct record *r);

/* Decodes buf[0..len). Returns 0 or -1 (truncated, trailing bytes, bad
 * magic/version/status, too many headers, len > max_len). */
int record_decode(const uint8_t *buf, size_t len, size_t max_len, struct record *r);

#endif
