#!/usr/bin/python3
"""make_h2_corpus.py: writes the seed corpus of fuzz_h2 (tests/fuzz/fuzz_h2.c).

Each seed is what an h2c client sends after the connection preface (the
harness writes the preface itself): SETTINGS, then requests as HPACK
header blocks and DATA, RST_STREAM, PING, PRIORITY, WINDOW_UPDATE,
CONTINUATION, GOAWAY. SETTLE ("~~settle~~") separates the turns of a
conversation: the harness writes one turn, lets the proxy answer, then
writes the next; at DRAIN ("~~drain~~") it also drains the loop as on
SIGTERM before the next turn. The request targets pick the harness's
upstream answer ("big", "chunk", "500", "slow", ...; see fuzz_h2.c) and
its routes (/w, /k, /p, /down).

Frames come from Debian's python3-h2 (with hpack and hyperframe), on the
client side of an H2Connection, its outbound header checks off so that
seeds can carry what the proxy must refuse. The server's frames are never
fed back: the client's view of flow control is the default one. Usage:
    /usr/bin/python3 tests/fuzz/make_h2_corpus.py [OUTDIR]
(default: tests/fuzz/corpus/fuzz_h2). Deterministic: the same files each
run. Needs python3-h2 (apt-get install python3-h2)."""

import os
import sys

import h2.config
import h2.connection
import h2.errors
from hyperframe.frame import GoAwayFrame, PriorityFrame, SettingsFrame

SETTLE = b"~~settle~~"
DRAIN = b"~~drain~~"
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


class Client:
    """An h2 client connection whose output (after the preface) we keep."""

    def __init__(self, settings=None):
        cfg = h2.config.H2Configuration(client_side=True, header_encoding=None,
                                        validate_outbound_headers=False)
        self.c = h2.connection.H2Connection(config=cfg)
        if settings:
            self.c.local_settings.update(settings)
        self.c.initiate_connection()
        out = self.c.data_to_send()
        assert out.startswith(PREFACE)
        self.out = bytearray(out[len(PREFACE):])

    def flush(self):
        self.out += self.c.data_to_send()

    def raw(self, b):
        self.flush()
        self.out += b

    def settle(self):
        self.raw(SETTLE)

    def drain(self):
        self.raw(DRAIN)

    def request(self, sid, method, path, body=None, key=None, extra=(), end=True, frame_size=None):
        headers = [(b":method", method), (b":scheme", b"http"), (b":path", path),
                   (b":authority", b"example.test")]
        if key is not None:
            headers.append((b"idempotency-key", key))
        if body is not None:
            headers.append((b"content-type", b"application/json"))
        headers += list(extra)
        if frame_size:  # split the header block: HEADERS + CONTINUATION frames
            saved = self.c.max_outbound_frame_size
            self.c.max_outbound_frame_size = frame_size
            self.c.send_headers(sid, headers, end_stream=end and body is None)
            self.c.max_outbound_frame_size = saved
            self.c._get_stream_by_id(sid).max_outbound_frame_size = saved
        else:
            self.c.send_headers(sid, headers, end_stream=end and body is None)
        if body is not None:
            for i in range(0, len(body), 16384):
                last = i + 16384 >= len(body)
                self.c.send_data(sid, body[i:i + 16384], end_stream=end and last)
        self.flush()

    def window(self, n, sid=None):
        self.c.increment_flow_control_window(n, stream_id=sid)
        self.flush()

    def reset(self, sid, code=h2.errors.ErrorCodes.CANCEL):
        self.c.reset_stream(sid, error_code=code)
        self.flush()

    def ping(self, data=b"12345678"):
        self.c.ping(data)
        self.flush()

    def bytes(self):
        self.flush()
        return bytes(self.out)


def seeds():
    body = b'{"amount": 100, "currency": "EUR"}'
    s = {}

    c = Client()
    c.request(1, b"GET", b"/")
    s["get"] = c.bytes()

    c = Client()
    c.request(1, b"POST", b"/orders", body=body, key=b"k-1")
    s["post_key"] = c.bytes()

    # the same key again once the first is answered: a replay; then a
    # different body under it: a mismatch
    c = Client()
    c.request(1, b"POST", b"/orders", body=body, key=b"k-1",
              extra=[(b"authorization", b"Bearer t0k3n")])
    c.settle()
    c.request(3, b"POST", b"/orders", body=body, key=b"k-1",
              extra=[(b"authorization", b"Bearer t0k3n")])
    c.settle()
    c.request(5, b"POST", b"/orders", body=b'{"amount": 1}', key=b"k-1",
              extra=[(b"authorization", b"Bearer t0k3n")])
    s["post_replay_mismatch"] = c.bytes()

    # the same key twice at once: 409 in progress; and /w, which waits
    c = Client()
    c.request(1, b"POST", b"/slow", body=body, key=b"k-2")
    c.request(3, b"POST", b"/slow", body=body, key=b"k-2")
    c.request(5, b"POST", b"/w/slow", body=body, key=b"k-3")
    c.request(7, b"POST", b"/w/slow", body=body, key=b"k-3")
    s["post_concurrent"] = c.bytes()

    # a request reset in the same turn, and one reset while its upstream works
    c = Client()
    c.request(1, b"POST", b"/orders", body=body, key=b"k-4")
    c.reset(1)
    c.request(3, b"POST", b"/slow", body=body, key=b"k-5")
    c.settle()
    c.reset(3)
    s["rst_stream"] = c.bytes()

    c = Client()
    c.ping()
    c.request(1, b"GET", b"/")
    c.ping(b"abcdefgh")
    c.raw(PriorityFrame(3, depends_on=1, stream_weight=200).serialize())
    c.raw(SettingsFrame(0, settings={SettingsFrame.HEADER_TABLE_SIZE: 0}).serialize())
    c.raw(GoAwayFrame(0, last_stream_id=1, error_code=0).serialize())
    s["ping_priority_goaway"] = c.bytes()

    # a header block in HEADERS + CONTINUATION frames, then a body
    c = Client()
    c.request(1, b"POST", b"/orders", body=body, key=b"k-6", frame_size=16,
              extra=[(b"x-long", b"v" * 40)])
    s["continuation"] = c.bytes()

    # an answer past the stream's window and H2_STREAM_HIGH: the exchange
    # pauses; the windows opened later resume it; then a replay of it
    c = Client()
    c.request(1, b"POST", b"/big", body=body, key=b"k-7")
    c.settle()
    c.window(1 << 24)
    c.window(1 << 24, 1)
    c.settle()
    c.request(3, b"POST", b"/big", body=body, key=b"k-7")
    c.window(1 << 24, 3)
    s["big_window"] = c.bytes()

    # three paused streams resumed by one turn of windows: a stream drained
    # while the proxy walks its streams resumes its exchange, which writes
    # and sends again (nested), draining the next ones
    c = Client()
    for sid in (1, 3, 5):
        c.request(sid, b"GET", b"/big")
    c.settle()
    c.window(1 << 24)
    for sid in (5, 3, 1):
        c.window(1 << 24, sid)
    s["big_streams_windows"] = c.bytes()

    c = Client(settings={SettingsFrame.INITIAL_WINDOW_SIZE: 1 << 20,
                         SettingsFrame.MAX_FRAME_SIZE: 1 << 20})
    c.window(1 << 24)
    c.request(1, b"GET", b"/big")
    c.request(3, b"HEAD", b"/big")
    s["big_settings"] = c.bytes()

    # every other answer of the upstream, one stream each
    c = Client()
    sid = 1
    for path in [b"/chunk", b"/500", b"/204", b"/close", b"/cut", b"/none", b"/bad", b"/many",
                 b"/down"]:
        c.request(sid, b"GET", path)
        sid += 2
    s["answers_get"] = c.bytes()

    c = Client()
    sid = 1
    for path in [b"/k/500", b"/k/none", b"/k/big", b"/k/slow", b"/p/orders", b"/down/x",
                 b"/chunk", b"/cut"]:
        c.request(sid, b"POST", path, body=body, key=b"key-%d" % sid)
        sid += 2
    c.settle()
    for path in [b"/k/500", b"/k/none", b"/k/big", b"/k/slow"]:
        c.request(sid, b"POST", path, body=body, key=b"key-%d" % (sid - 16))
        sid += 2
    s["answers_post_keys"] = c.bytes()

    # refused before any exchange: 431 (a header block past 1024 bytes),
    # 413 (a body past 4096), 400 (bad :path, bad host, * not OPTIONS)
    c = Client()
    c.request(1, b"GET", b"/", extra=[(b"x-big", b"h" * 1500)])
    c.request(3, b"POST", b"/orders", body=b"b" * 5000, key=b"k-8")
    c.request(5, b"GET", b"/a/../../b")
    c.request(7, b"GET", b"/", extra=[(b"host", b"bad host")])
    c.request(9, b"GET", b"*")
    c.request(11, b"OPTIONS", b"*")
    c.request(13, b"GET", b"/%2e%2e/x?q=1")
    s["refused"] = c.bytes()

    # trailers, and a body in several DATA frames
    c = Client()
    c.request(1, b"POST", b"/orders", body=body, key=b"k-9", end=False)
    c.c.send_data(1, b"more")
    c.c.send_headers(1, [(b"x-trailer", b"1")], end_stream=True)
    s["trailers"] = c.bytes()

    # Rapid Reset: more resets in a second than max_resets_per_second (16)
    c = Client()
    for i in range(20):
        c.request(1 + 2 * i, b"GET", b"/")
        c.reset(1 + 2 * i)
    s["rapid_reset"] = c.bytes()

    # SIGTERM with streams open: GOAWAY, they finish, the connection closes;
    # a stream opened after the GOAWAY is not served
    c = Client()
    c.request(1, b"POST", b"/slow", body=body, key=b"k-10")
    c.request(3, b"GET", b"/")
    c.drain()
    c.request(5, b"GET", b"/")
    s["drain"] = c.bytes()

    c = Client()
    c.ping()
    c.drain()
    s["drain_idle"] = c.bytes()

    # the client stops reading: answers fill its window, the client goes
    c = Client()
    for i in range(8):
        c.request(1 + 2 * i, b"GET", b"/big")
    s["many_big"] = c.bytes()
    return s


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "corpus", "fuzz_h2")
    os.makedirs(out, exist_ok=True)
    for name, data in sorted(seeds().items()):
        with open(os.path.join(out, name), "wb") as f:
            f.write(data)
        print("%-24s %6d bytes" % (name, len(data)))


if __name__ == "__main__":
    main()
