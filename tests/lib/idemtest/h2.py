"""HTTP/2 as the tests speak it: one client connection with frame-level
control, on Debian's python3-h2 (h2 for the protocol state and HPACK,
hyperframe underneath), over a plain socket (h2c with prior knowledge) or
TLS with ALPN h2.

Owns: H2Client (one connection: open streams, send HEADERS (split into
HEADERS + CONTINUATION on demand), DATA (flow controlled), RST_STREAM,
PING, SETTINGS, raw bytes; read with a deadline; per-stream status,
headers, body, reset code; the connection's GOAWAYs; whether the server
closed it); H2Stream (what one stream got); NoH2 (the server did not speak
HTTP/2: no SETTINGS as its first frame, or ALPN did not choose h2);
h2_request() / h2_post() (one request on a fresh connection, answered as
an http.Resp); alpn_selected() (what a TLS listener chooses); frame() and
hpack_literal() (raw frames and header blocks for what h2 would refuse to
send: floods, unterminated header blocks).

How the reading works: the bytes from the server are cut into frames here
(9-byte header + payload) and fed to h2 one frame at a time; GOAWAY and
RST_STREAM are also decoded here from the raw frame, so they are recorded
even when h2's state machine gave up (h2_error says why). h2 refuses every
frame after a GOAWAY; a graceful GOAWAY (RFC 9113 section 6.8) lets the
streams up to its last_stream_id finish, so after one the connection's
state is put back to open and reading goes on.

Flow control: the client opens the connection-level receive window by
16 MiB at once (so one stalled stream never blocks the others at the
connection level) and, per stream, returns the window as DATA arrives,
unless the test holds that stream (hold_window) and opens it later
(open_window). Its per-stream initial window stays 65535 unless settings
say otherwise.

Every wait is bounded by a deadline; nothing here sleeps.
"""

import socket
import ssl
import struct
import time

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
from h2.connection import ConnectionState
from h2.errors import ErrorCodes
from h2.settings import SettingCodes

from .http import BODY, Resp, header_items, hdrs

# Frame types (RFC 9113 section 6) and flags.
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, \
    WINDOW_UPDATE, CONTINUATION = range(10)
FRAME_NAMES = {DATA: "DATA", HEADERS: "HEADERS", PRIORITY: "PRIORITY",
               RST_STREAM: "RST_STREAM", SETTINGS: "SETTINGS",
               PUSH_PROMISE: "PUSH_PROMISE", PING: "PING", GOAWAY: "GOAWAY",
               WINDOW_UPDATE: "WINDOW_UPDATE", CONTINUATION: "CONTINUATION"}
END_STREAM = 0x1
ACK = 0x1
END_HEADERS = 0x4

# Error codes (RFC 9113 section 7), as ints.
NO_ERROR = 0x0
PROTOCOL_ERROR = 0x1
INTERNAL_ERROR = 0x2
FLOW_CONTROL_ERROR = 0x3
STREAM_CLOSED = 0x5
FRAME_SIZE_ERROR = 0x6
REFUSED_STREAM = 0x7
CANCEL = 0x8
COMPRESSION_ERROR = 0x9
ENHANCE_YOUR_CALM = 0xB

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
CONNECTION_WINDOW_BOOST = 16 * 1024 * 1024


class NoH2(AssertionError):
    """The server did not answer as an HTTP/2 server: its first bytes are
    not a SETTINGS frame (an HTTP/1.1 answer, nothing, a close), or TLS
    ALPN did not choose h2."""


def error_name(code):
    try:
        return "%s (0x%x)" % (ErrorCodes(code).name, code)
    except ValueError:
        return "0x%x" % code


def frame(ftype, flags, stream_id, payload=b""):
    """One raw frame: the 9-byte header and payload."""
    n = len(payload)
    return struct.pack(">BHBBI", n >> 16, n & 0xFFFF, ftype, flags,
                       stream_id & 0x7FFFFFFF) + payload


def _hpack_int(value, prefix_bits, first=0):
    """An HPACK integer (RFC 7541 section 5.1) with the given prefix size;
    first holds the bits above the prefix in the first byte."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes([first | value])
    out = bytearray([first | limit])
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def hpack_literal(name, value):
    """One header field as an HPACK literal without indexing, new name, no
    Huffman (RFC 7541 section 6.2.2): valid for any decoder, and it leaves
    every dynamic table as it was (so a raw block never desynchronises the
    connection's own encoder)."""
    if isinstance(name, str):
        name = name.encode("latin-1")
    if isinstance(value, str):
        value = value.encode("latin-1")
    return (b"\x00" + _hpack_int(len(name), 7) + name
            + _hpack_int(len(value), 7) + value)


def _b(x):
    return x if isinstance(x, bytes) else str(x).encode("latin-1")


class GoAway:
    """One GOAWAY the server sent."""

    __slots__ = ("error_code", "last_stream_id", "debug", "index")

    def __init__(self, error_code, last_stream_id, debug, index):
        self.error_code = error_code
        self.last_stream_id = last_stream_id
        self.debug = debug
        self.index = index  # its position in H2Client.frames_in

    def __repr__(self):
        return "GoAway(%s, last_stream_id=%d, debug=%r)" % (
            error_name(self.error_code), self.last_stream_id, self.debug[:200])


class H2Stream:
    """What one stream got: status and headers (lowercase names, str, in
    order, without pseudo-headers), body bytes, the DATA payloads as they
    came (chunks), trailers, whether END_STREAM came (ended), the server's
    RST_STREAM code (reset_code, None when not reset), and whether we
    reset it (local_reset)."""

    def __init__(self, stream_id):
        self.id = stream_id
        self.status = None
        self.headers = []
        self.informational = []
        self.body = b""
        self.chunks = []
        self.trailers = []
        self.ended = False
        self.reset_code = None
        self.local_reset = False
        self.held = False
        self.unacked = 0
        self.end_index = None  # position in frames_in of what ended it

    @property
    def done(self):
        return self.ended or self.reset_code is not None or self.local_reset

    def header(self, name):
        name = name.lower()
        for k, v in self.headers:
            if k == name:
                return v
        return None

    def resp(self):
        """The answer as an http.Resp (reason is empty in HTTP/2)."""
        return Resp(self.status if self.status is not None else 0, "",
                    self.headers, self.body)

    def __repr__(self):
        return ("H2Stream(%d status=%r ended=%s reset=%s headers=%r body=%r)" % (
            self.id, self.status, self.ended,
            None if self.reset_code is None else error_name(self.reset_code),
            self.headers, self.body[:300]))


class _Connection(h2.connection.H2Connection):
    """h2's connection, with a switch to open streams past the server's
    SETTINGS_MAX_CONCURRENT_STREAMS (h2 refuses that locally)."""

    ignore_stream_limit = False

    @property
    def open_outbound_streams(self):
        if self.ignore_stream_limit:
            return 0
        return super().open_outbound_streams


def client_context(ca=None, alpn=("h2", "http/1.1")):
    """An ssl.SSLContext offering alpn, trusting ca (without ca: no
    verification at all)."""
    if ca:
        ctx = ssl.create_default_context(cafile=ca)
    else:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    return ctx


def alpn_selected(port, ca=None, offer=("h2", "http/1.1"), host="127.0.0.1",
                  timeout=10):
    """The ALPN protocol a TLS listener chose for a client offering offer
    (None when it chose none). Sends nothing after the handshake."""
    raw = socket.create_connection((host, port), timeout=timeout)
    try:
        s = client_context(ca, offer).wrap_socket(raw, server_hostname=host)
        try:
            return s.selected_alpn_protocol()
        finally:
            s.close()
    finally:
        raw.close()


class H2Client:
    """One HTTP/2 client connection to 127.0.0.1:port.

    tls: TLS offering alpn (ca: the CA to trust; None: no verification),
    and h2 must be chosen; else h2c with prior knowledge. settings: the
    client's SETTINGS (SettingCodes or int -> value) sent in its preface,
    on top of ENABLE_PUSH 0, MAX_CONCURRENT_STREAMS 100 and
    MAX_HEADER_LIST_SIZE 1 MiB (the client is never the one that limits).
    rcvbuf: SO_RCVBUF of the socket (small, the server's writes back up:
    what a client that does not read looks like). The constructor sends the preface and reads the server's first
    frame: NoH2 when it is not SETTINGS (server_settings then holds what it
    advertised)."""

    def __init__(self, port, tls=False, ca=None, host="127.0.0.1",
                 authority=None, timeout=10.0, settings=None,
                 alpn=("h2", "http/1.1"), rcvbuf=None, boost_window=True):
        self.port = port
        self.tls = tls
        self.host = host
        self.authority = authority or "%s:%d" % (host, port)
        self.timeout = timeout
        self.streams = {}
        self.frames_in = []       # (type, flags, stream_id, length) as received
        self.goaways = []         # GoAway, in order
        self.server_settings = {}  # int code -> value, from every SETTINGS
        self.settings_acks = 0
        self.ping_acks = 0
        self.closed = False       # the server closed (or reset) the connection
        self.close_reason = None
        self.send_error = None    # the OSError a send met, if any
        self.h2_error = None      # why h2 stopped parsing, if it did
        self.alpn = None
        self._inbuf = b""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.settimeout(timeout)
        try:
            sock.connect((host, port))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if tls:
                sock = client_context(ca, alpn).wrap_socket(sock, server_hostname=host)
                self.alpn = sock.selected_alpn_protocol()
        except BaseException:
            sock.close()
            raise
        self.sock = sock
        if tls and self.alpn != "h2":
            self.close()
            raise NoH2("TLS ALPN chose %r, not h2 (offered %r)" % (self.alpn, list(alpn)))
        cfg = h2.config.H2Configuration(client_side=True, header_encoding=None)
        self.conn = _Connection(config=cfg)
        initial = {SettingCodes.ENABLE_PUSH: 0,
                   SettingCodes.MAX_CONCURRENT_STREAMS: 100,
                   SettingCodes.MAX_HEADER_LIST_SIZE: 1 << 20}
        initial.update(settings or {})
        self.conn.local_settings = h2.settings.Settings(client=True,
                                                        initial_values=initial)
        # h2 applies a local setting to its own side only when a changed
        # value is acknowledged; values of the preface never change, so
        # their effect on what this client accepts is applied here
        ls = self.conn.local_settings
        self.conn.decoder.max_allowed_table_size = ls.header_table_size
        if ls.max_header_list_size is not None:
            self.conn.decoder.max_header_list_size = ls.max_header_list_size
        self.conn.max_inbound_frame_size = ls.max_frame_size
        self.conn.initiate_connection()
        if boost_window:
            self.conn.increment_flow_control_window(CONNECTION_WINDOW_BOOST)
        self.flush()
        self._read_server_preface()

    # -- the start -----------------------------------------------------------

    def _read_server_preface(self):
        deadline = time.monotonic() + self.timeout
        while len(self._inbuf) < 9 and not self.closed:
            if not self._recv(deadline - time.monotonic(), feed=False):
                break
        head = self._inbuf[:9]
        if len(head) < 9 or head[3] != SETTINGS or head[4] & ACK or \
                struct.unpack(">I", head[5:9])[0] & 0x7FFFFFFF:
            # say what came instead: read a little more of it
            end = time.monotonic() + 0.5
            while not self.closed and time.monotonic() < end and len(self._inbuf) < 512:
                if not self._recv(end - time.monotonic(), feed=False):
                    break
            got = self._inbuf
            self.close()
            if not got:
                raise NoH2("no HTTP/2 preface answer: %s without a byte" % (
                    "the server closed the connection" if self.closed else
                    "%.1f s passed" % self.timeout))
            raise NoH2("no HTTP/2 preface answer: the server's first bytes are "
                       "not a SETTINGS frame: %r" % got[:300])
        self._process()

    # -- sending -------------------------------------------------------------

    def flush(self):
        """Sends what h2 has queued. A failed send (the server closed)
        is recorded in send_error, not raised."""
        data = self.conn.data_to_send()
        if data:
            self.send_raw(data)

    def send_raw(self, data, deadline=None, read_between=False):
        """Writes raw bytes (frames h2 knows nothing about), bounded by
        deadline (default: timeout from now). Returns the count written;
        an error or a write that stays blocked past the deadline ends it
        (send_error says which). read_between: take what the server has
        already sent between two writes (without waiting), so a GOAWAY is
        read as soon as it comes (for floods the server does not answer
        frame by frame; a PING flood must not read)."""
        deadline = deadline or time.monotonic() + self.timeout
        sent = 0
        view = memoryview(data)
        while sent < len(data):
            left = deadline - time.monotonic()
            if left <= 0:
                self.send_error = socket.timeout("send blocked until the deadline")
                break
            if read_between and sent:
                self._recv(0.001)
                if self.closed:
                    break
            try:
                self.sock.settimeout(left)
                n = self.sock.send(view[sent:sent + 65536])
            except (socket.timeout, ssl.SSLWantWriteError) as e:
                self.send_error = e
                break
            except (OSError, ssl.SSLError) as e:
                self.send_error = e
                break
            sent += n
        return sent

    def next_stream_id(self):
        return self.conn.get_next_available_stream_id()

    def _stream(self, stream_id):
        st = self.streams.get(stream_id)
        if st is None:
            st = self.streams[stream_id] = H2Stream(stream_id)
        return st

    def request_headers(self, method, path, headers=(), authority=None,
                        scheme=None):
        """The header list of a request: the pseudo-headers, then headers
        (a dict or pairs) with lowercase names, as bytes. authority None:
        the connection's (an empty one is sent as it is)."""
        out = [(b":method", _b(method)),
               (b":scheme", _b(scheme or ("https" if self.tls else "http"))),
               (b":authority", _b(self.authority if authority is None else authority)),
               (b":path", _b(path))]
        for k, v in header_items(headers):
            out.append((_b(k).lower(), _b(v)))
        return out

    def send_headers(self, stream_id, header_list, end_stream=False,
                     fragment=None, ignore_limit=False, flush=True):
        """HEADERS on stream_id (a new one opens it). fragment: the header
        block goes out in pieces of that many bytes (HEADERS, then
        CONTINUATION frames). ignore_limit: open it even past the server's
        SETTINGS_MAX_CONCURRENT_STREAMS."""
        conn = self.conn
        saved = conn.max_outbound_frame_size
        conn.ignore_stream_limit = ignore_limit
        try:
            if fragment:
                conn.max_outbound_frame_size = fragment
            conn.send_headers(stream_id, header_list, end_stream=end_stream)
        finally:
            conn.ignore_stream_limit = False
            conn.max_outbound_frame_size = saved
            s = conn.streams.get(stream_id)
            if s is not None:
                s.max_outbound_frame_size = saved
        self._stream(stream_id)
        if flush:
            self.flush()

    def send_data(self, stream_id, data, end_stream=False, flush=True):
        """DATA on stream_id, split by the frame size and waiting (bounded)
        for the server's flow-control window when it is short."""
        deadline = time.monotonic() + self.timeout
        off = 0
        while True:
            rest = len(data) - off
            window = min(self.conn.local_flow_control_window(stream_id),
                         self.conn.max_outbound_frame_size)
            if rest == 0 or window > 0:
                n = min(rest, window)
                last = off + n == len(data)
                self.conn.send_data(stream_id, data[off:off + n],
                                    end_stream=end_stream and last)
                off += n
                if last:
                    break
                continue
            self.flush()
            ok = self.wait(lambda: self.conn.local_flow_control_window(stream_id) > 0
                           or self.streams[stream_id].done,
                           deadline - time.monotonic())
            if not ok or self.streams[stream_id].done:
                raise AssertionError(
                    "stream %d: no flow-control window to send %d more bytes "
                    "(server window %d, %r, goaways %r, closed %s)" % (
                        stream_id, rest, self.conn.local_flow_control_window(stream_id),
                        self.streams[stream_id], self.goaways, self.closed))
        if flush:
            self.flush()

    def request(self, method, path, headers=(), body=b"", end_stream=True,
                authority=None, content_length=True, fragment=None,
                ignore_limit=False, flush=True):
        """Opens a stream with one request: HEADERS (END_STREAM when there is
        no body and end_stream), then the body as DATA. content_length:
        add content-length for a body (or a POST/PUT/PATCH) unless headers
        has one. flush False: the frames wait in h2's buffer for the next
        flush() (to send several streams in one write). Returns the
        stream id."""
        if isinstance(body, str):
            body = body.encode()
        items = header_items(headers)
        names = {_b(k).lower() for k, _ in items}
        if content_length and b"content-length" not in names and (
                body or method in ("POST", "PUT", "PATCH")):
            items.append(("content-length", str(len(body))))
        sid = self.next_stream_id()
        hl = self.request_headers(method, path, items, authority)
        self.send_headers(sid, hl, end_stream=end_stream and not body,
                          fragment=fragment, ignore_limit=ignore_limit, flush=False)
        if body:
            self.send_data(sid, body, end_stream=end_stream, flush=False)
        if flush:
            self.flush()
        return sid

    def post(self, path, key, body=BODY, api_key="k1", extra=None,
             method="POST", flush=True):
        """A covered request (http.hdrs()) on a new stream; its id."""
        return self.request(method, path, hdrs(key, api_key, extra=extra), body,
                            flush=flush)

    def reset(self, stream_id, code=CANCEL, flush=True):
        """RST_STREAM (CANCEL by default)."""
        self.conn.reset_stream(stream_id, error_code=code)
        self._stream(stream_id).local_reset = True
        if flush:
            self.flush()

    def ping(self, data=b"idemtest", flush=True):
        self.conn.ping(data)
        if flush:
            self.flush()

    def update_settings(self, settings, flush=True):
        self.conn.update_settings(settings)
        if flush:
            self.flush()

    def hold_window(self, stream_id):
        """Stops returning stream_id's receive window: the server may send
        it no more than the stream's initial window until open_window."""
        self._stream(stream_id).held = True

    def open_window(self, stream_id):
        """Returns what stream_id received while held, and goes on returning
        its window as DATA arrives."""
        st = self._stream(stream_id)
        st.held = False
        if st.unacked:
            n, st.unacked = st.unacked, 0
            self._ack(n, stream_id)
        self.flush()

    def _ack(self, n, stream_id):
        try:
            self.conn.acknowledge_received_data(n, stream_id)
        except h2.exceptions.ProtocolError:
            pass  # the stream is gone: nothing to return

    # -- receiving -----------------------------------------------------------

    def _recv(self, timeout, feed=True):
        """One read of at most timeout seconds. Returns False when nothing
        more will come (closed) or nothing came in time."""
        if self.closed:
            return False
        try:
            self.sock.settimeout(max(0.001, timeout))
            data = self.sock.recv(65536)
        except (socket.timeout, ssl.SSLWantReadError):
            return False
        except (ssl.SSLZeroReturnError, ssl.SSLEOFError) as e:
            self._closed("tls eof: %s" % e)
            return False
        except (OSError, ssl.SSLError) as e:
            self._closed(repr(e))
            return False
        if not data:
            self._closed("eof")
            return False
        self._inbuf += data
        if feed:
            self._process()
        return True

    def _closed(self, why):
        self.closed = True
        self.close_reason = why

    def _process(self):
        """Cuts the complete frames out of the input, records them, feeds
        them to h2, and sends what h2 answers (ACKs, window updates)."""
        while len(self._inbuf) >= 9:
            n = int.from_bytes(self._inbuf[:3], "big")
            if len(self._inbuf) < 9 + n:
                break
            raw, self._inbuf = self._inbuf[:9 + n], self._inbuf[9 + n:]
            ftype, flags = raw[3], raw[4]
            sid = struct.unpack(">I", raw[5:9])[0] & 0x7FFFFFFF
            payload = raw[9:]
            index = len(self.frames_in)
            self.frames_in.append((ftype, flags, sid, n))
            if ftype == GOAWAY and n >= 8:
                last, code = struct.unpack(">II", payload[:8])
                self.goaways.append(GoAway(code, last & 0x7FFFFFFF, payload[8:], index))
            elif ftype == RST_STREAM and n == 4:
                st = self._stream(sid)
                st.reset_code = struct.unpack(">I", payload)[0]
                st.end_index = index if st.end_index is None else st.end_index
            elif ftype in (DATA, HEADERS) and flags & END_STREAM and sid:
                st = self._stream(sid)
                st.end_index = index if st.end_index is None else st.end_index
            if self.h2_error is None:
                self._feed(raw, ftype)
        self.flush()

    def _feed(self, raw, ftype):
        try:
            events = self.conn.receive_data(raw)
        except h2.exceptions.ProtocolError as e:
            self.h2_error = "%s: %s (after %d frames)" % (
                type(e).__name__, e, len(self.frames_in))
            return
        for ev in events:
            self._event(ev)
        if ftype == GOAWAY:
            # keep reading the streams the GOAWAY lets finish (h2 would
            # refuse every frame from now on)
            self.conn.state_machine.state = ConnectionState.CLIENT_OPEN

    def _event(self, ev):
        E = h2.events
        if isinstance(ev, E.ResponseReceived):
            st = self._stream(ev.stream_id)
            for k, v in ev.headers:
                k, v = k.decode("latin-1"), v.decode("latin-1")
                if k == ":status":
                    st.status = int(v)
                elif not k.startswith(":"):
                    st.headers.append((k, v))
        elif isinstance(ev, E.InformationalResponseReceived):
            self._stream(ev.stream_id).informational.append(ev.headers)
        elif isinstance(ev, E.TrailersReceived):
            self._stream(ev.stream_id).trailers = [
                (k.decode("latin-1"), v.decode("latin-1")) for k, v in ev.headers]
        elif isinstance(ev, E.DataReceived):
            st = self._stream(ev.stream_id)
            st.body += ev.data
            st.chunks.append(ev.data)
            if st.held:
                st.unacked += ev.flow_controlled_length
            elif ev.flow_controlled_length:
                self._ack(ev.flow_controlled_length, ev.stream_id)
        elif isinstance(ev, E.StreamEnded):
            self._stream(ev.stream_id).ended = True
        elif isinstance(ev, E.RemoteSettingsChanged):
            for code, change in ev.changed_settings.items():
                self.server_settings[int(code)] = change.new_value
        elif isinstance(ev, E.SettingsAcknowledged):
            self.settings_acks += 1
        elif isinstance(ev, E.PingAckReceived):
            self.ping_acks += 1

    def read(self, timeout=0.2):
        """Reads once (up to timeout seconds); True when bytes came."""
        return self._recv(timeout)

    def wait(self, pred, timeout=None):
        """Reads until pred() holds, the server closed the connection, or
        timeout seconds passed; returns pred()'s last value."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            v = pred()
            if v or self.closed:
                return pred()
            left = deadline - time.monotonic()
            if left <= 0:
                return v
            self._recv(min(left, 0.5))

    def wait_stream(self, stream_id, timeout=None):
        """Reads until stream_id ended or was reset; AssertionError, saying
        what the connection saw, when it did not within timeout."""
        st = self._stream(stream_id)
        if not self.wait(lambda: st.done, timeout):
            raise AssertionError("stream %d not finished: %s" % (stream_id, self.describe()))
        return st

    def response(self, stream_id, timeout=None):
        """The complete answer on stream_id as an http.Resp; AssertionError
        when the stream was reset or did not end."""
        st = self.wait_stream(stream_id, timeout)
        if st.reset_code is not None:
            raise AssertionError("stream %d reset by the server with %s: %s" % (
                stream_id, error_name(st.reset_code), self.describe()))
        if not st.ended or st.status is None:
            raise AssertionError("stream %d has no complete answer: %s" % (
                stream_id, self.describe()))
        return st.resp()

    def wait_closed(self, timeout=None):
        """Reads (and drops what the server sends) until it closes the
        connection or timeout passes; returns whether it closed."""
        return self.wait(lambda: self.closed, timeout)

    def wait_goaway(self, timeout=None):
        """Reads until a GOAWAY came (or the connection closed); returns the
        last GOAWAY or None."""
        self.wait(lambda: self.goaways, timeout)
        return self.goaway

    @property
    def goaway(self):
        return self.goaways[-1] if self.goaways else None

    def frame_counts(self):
        out = {}
        for ftype, _, _, _ in self.frames_in:
            name = FRAME_NAMES.get(ftype, str(ftype))
            out[name] = out.get(name, 0) + 1
        return out

    def describe(self):
        """A one-paragraph account of the connection, for failures."""
        return ("frames in %r; goaways %r; closed %s (%s); send error %r; h2 error %r; "
                "streams %r" % (self.frame_counts(), self.goaways, self.closed,
                                self.close_reason, self.send_error, self.h2_error,
                                list(self.streams.values())[-6:]))

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def h2_request(port, method, path, headers=None, body=b"", tls=False, ca=None,
               authority=None, timeout=15, content_length=True):
    """One request on a fresh HTTP/2 connection (h2c prior knowledge, or TLS
    with ALPN h2 trusting ca); returns its http.Resp (headers lowercase)."""
    with H2Client(port, tls=tls, ca=ca, authority=authority, timeout=timeout) as c:
        sid = c.request(method, path, headers or (), body,
                        content_length=content_length)
        return c.response(sid)


def h2_post(port, path, key, body=BODY, tls=False, ca=None, api_key="k1",
            extra=None, method="POST", timeout=15):
    """A covered request (http.hdrs()) on a fresh HTTP/2 connection."""
    return h2_request(port, method, path, hdrs(key, api_key, extra=extra), body,
                      tls=tls, ca=ca, timeout=timeout)
