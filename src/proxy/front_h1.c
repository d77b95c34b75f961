/* front_h1.c — the HTTP/1 front (proxy/front.h): an exchange's answer
 * framed for an HTTP/1.x client connection. The status line, the
 * Connection header (keep-alive for 1.0 clients, close when the answer or
 * the client asks for it, or the loop drains), Content-Length, or chunked
 * re-encoding of a body of unknown length (close-delimited for 1.0
 * clients); the last bytes of a held answer wait in the output buffer
 * (CLIENT_HOLDING) until end(DONE). Also our answers to requests refused
 * before any exchange (client_queue_error).
 *
 * Owns nothing: writes into the client's output buffer (client.c). */
#include <string.h>
#include <sys/uio.h>

#include "idemgate/config/config.h"
#include "idemgate/http/writer.h"
#include "idemgate/proxy/answer.h"
#include "idemgate/proxy/client.h"
#include "idemgate/proxy/front.h"
#include "idemgate/proxy/loop.h"

static void h1_write_head(struct client *cl, const struct front_head *h)
{
    struct buf *o = conn_outbuf(&cl->c);
    http1_write_status(o, h->status, h->reason, h->reason_len);
    for (size_t i = 0; i < h->n_headers; i++) {
        const struct front_header *hd = &h->headers[i];
        http1_write_header(o, hd->name, hd->name_len, hd->value, hd->value_len);
    }
    cl->out_chunked = false;
    if (h->body == FRONT_BODY_STREAM) {
        if (cl->minor >= 1)
            cl->out_chunked = true;
        else
            cl->close_after = true; /* a 1.0 client reads to the close */
    }
    if (cl->close_after || !cl->keep_alive || cl->loop->draining) {
        cl->close_after = true;
        buf_append_str(o, "Connection: close\r\n");
    } else if (cl->minor == 0) {
        buf_append_str(o, "Connection: keep-alive\r\n");
    }
    if (h->body == FRONT_BODY_LENGTH)
        http1_write_header_u64(o, "Content-Length", 14, h->content_length);
    else if (cl->out_chunked)
        buf_append_str(o, "Transfer-Encoding: chunked\r\n");
    buf_append(o, "\r\n", 2);
}

static void h1_head(void *front, const struct front_head *h)
{
    h1_write_head(front, h);
}

/* A Content-Length or close-delimited slice goes out with one writev
 * behind whatever is queued (no copy), but a held one waits in the
 * buffer. Chunked slices are framed into the buffer and flushed once per
 * batch (flush). */
static void h1_body(void *front, const char *p, size_t n, bool hold)
{
    struct client *cl = front;
    struct buf *o = conn_outbuf(&cl->c);
    if (cl->out_chunked) {
        buf_printf(o, "%zx\r\n", n);
        buf_append(o, p, n);
        buf_append(o, "\r\n", 2);
    } else if (hold) {
        buf_append(o, p, n);
    } else {
        struct iovec iov = {(void *)p, n};
        if (conn_sendv(&cl->c, &iov, 1) < 0) client_close(cl);
    }
}

static void h1_flush(void *front)
{
    client_flush(front);
}

/* The last chunk, once. */
static void h1_terminate(struct client *cl)
{
    if (!cl->out_chunked) return;
    cl->out_chunked = false;
    buf_append(conn_outbuf(&cl->c), "0\r\n\r\n", 5);
}

static void h1_end(void *front, enum front_end how)
{
    struct client *cl = front;
    switch (how) {
    case FRONT_END_HOLD:
        h1_terminate(cl);
        client_set_state(cl, CLIENT_HOLDING);
        break;
    case FRONT_END_DONE:
        h1_terminate(cl);
        client_request_done(cl, cl->close_after);
        break;
    case FRONT_END_ABORT:
        /* no last chunk: a cut chunked body, or a short Content-Length, and
         * the close, are what tell the client */
        client_request_done(cl, true);
        break;
    }
}

static bool h1_backlogged(const void *front)
{
    return client_backlogged(front);
}

const struct front_ops client_front_ops = {
    .head = h1_head,
    .body = h1_body,
    .flush = h1_flush,
    .end = h1_end,
    .backlogged = h1_backlogged,
};

int client_queue_error(struct client *cl, enum err_code e, const char *request_id,
                       size_t request_id_len)
{
    struct front_header hs[3];
    size_t n = 0;
    hs[n++] = (struct front_header){"X-Request-Id", 12, request_id, request_id_len};
    struct buf body;
    buf_init(&body);
    struct front_head fh;
    char retry[12];
    int status = answer_error_head(cl->loop->cfg, NULL, e, 0, retry, &body, hs, &n, &fh);
    cl->close_after = true;
    h1_write_head(cl, &fh);
    buf_append(conn_outbuf(&cl->c), buf_data(&body), buf_size(&body));
    buf_free(&body);
    return status;
}
