/* writer.h — writing HTTP/1.1 response heads, next to the parser: the
 * status line, header lines, the reason phrases we use, and today's
 * IMF-fixdate. Appends to a caller's buf (borrowed); decides nothing. */
#ifndef IDEMGATE_HTTP_WRITER_H
#define IDEMGATE_HTTP_WRITER_H

#include <stddef.h>

#include "idemgate/core/buf.h"

/* "HTTP/1.1 <status> <reason>\r\n" */
void http1_write_status(struct buf *o, int status, const char *reason, size_t reason_len);
/* "<name>: <value>\r\n" */
void http1_write_header(struct buf *o, const char *name, size_t name_len, const char *value,
                        size_t value_len);
/* "<name>: <decimal>\r\n" */
void http1_write_header_u64(struct buf *o, const char *name, size_t name_len, unsigned long long v);
/* The reason phrase for a status we answer ourselves ("Unknown" else). */
const char *http1_reason(int status);
/* RFC 9110 IMF-fixdate of now, formatted once per second per thread (the
 * string is the thread's, valid until the next call). */
const char *http1_date_now(void);

#endif
