/* log.h — JSON-lines logging on stderr (docs/logs.md).
 *
 * Each line is built in a local buffer and written with one write(2), so
 * lines from different worker threads never interleave. Never log a
 * credential or a body.
 *
 * Ownership: strings passed in are borrowed for the call only; the line
 * buffer handed to log_line_begin is the caller's (usually log_scratch,
 * which the thread owns until log_scratch_free). */
#ifndef IDEMGATE_LOG_H
#define IDEMGATE_LOG_H

#include <stdbool.h>

#include "idemgate/core/buf.h"

enum log_level { LOG_DEBUG, LOG_INFO, LOG_WARN, LOG_ERROR };

void log_set_level(enum log_level lvl);
bool log_enabled(enum log_level lvl);
/* {"ts":..., "level":..., "msg": <formatted message>} */
void log_msg(enum log_level lvl, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* Starts a line {"ts":"...","level":"info" into b; the caller appends
 * ,"key":value pairs and calls log_line_end. */
void log_line_begin(struct buf *b, enum log_level lvl);
void log_line_end(struct buf *b);
/* Appends ,"key":"escaped value". */
void log_kv_str(struct buf *b, const char *key, const char *v, size_t n);
void log_kv_int(struct buf *b, const char *key, long long v);
/* An empty buffer of this thread's, reused line after line (no allocation
 * per access line); log_scratch_free at the thread's end. */
struct buf *log_scratch(void);
void log_scratch_free(void);

#endif
