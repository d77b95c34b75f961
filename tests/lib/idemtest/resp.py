"""RESP2: the only way the tests talk to Redis (no redis-cli: its output is
escaped and its errors go to stdout as text).

Owns: RespClient (one connection, plain or TLS with an ssl.SSLContext:
AUTH and SELECT on connect, cmd(), or
send() now and reply() later; keys() and contents() read every stored byte
exactly); RedisError (an error reply); call() (one command on a connection
of its own), try_call() and ping() for polls; create_cluster() (slots and
MEET, as `redis-cli --cluster create` does them).
"""

import socket


class RedisError(Exception):
    """An error reply (the text after '-')."""


class RespClient:
    """Minimal RESP2 client on 127.0.0.1:port returning raw bytes. With
    password it sends AUTH [user] password first, with db SELECT db. With
    context (an ssl.SSLContext) it speaks TLS, verifying server_hostname
    as the context says (an IP address is checked against IP SANs)."""

    def __init__(self, port, timeout=5, user=None, password=None, db=None,
                 context=None, server_hostname="127.0.0.1"):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout)
        if context is not None:
            try:
                self.sock = context.wrap_socket(self.sock,
                                                server_hostname=server_hostname)
            except BaseException:
                self.sock.close()
                raise
        self.buf = b""
        try:
            if password is not None:
                self.cmd(*(["AUTH"] + ([user] if user else []) + [password]))
            if db is not None:
                self.cmd("SELECT", db)
        except BaseException:
            self.close()
            raise

    def close(self):
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _fill(self):
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("redis closed")
        self.buf += chunk

    def _line(self):
        while b"\r\n" not in self.buf:
            self._fill()
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def _exact(self, n):
        while len(self.buf) < n + 2:
            self._fill()
        data, self.buf = self.buf[:n], self.buf[n + 2:]
        return data

    def reply(self):
        """Reads one reply: bytes (simple and bulk strings), int, None (nil)
        or a list; raises RedisError for an error reply."""
        line = self._line()
        t, rest = line[:1], line[1:]
        if t == b"+":
            return rest
        if t == b"-":
            raise RedisError(rest.decode("latin-1"))
        if t == b":":
            return int(rest)
        if t == b"$":
            n = int(rest)
            return None if n < 0 else self._exact(n)
        if t == b"*":
            n = int(rest)
            return None if n < 0 else [self.reply() for _ in range(n)]
        raise RedisError("bad RESP reply %r" % line)

    def send(self, *args):
        """Sends one command without reading its reply (reply() reads it)."""
        out = [b"*%d\r\n" % len(args)]
        for a in args:
            if isinstance(a, str):
                a = a.encode()
            elif isinstance(a, int):
                a = str(a).encode()
            out.append(b"$%d\r\n%s\r\n" % (len(a), a))
        self.sock.sendall(b"".join(out))

    def cmd(self, *args):
        self.send(*args)
        return self.reply()

    def keys(self):
        found, cursor = [], b"0"
        while True:
            cursor, batch = self.cmd("SCAN", cursor, "COUNT", 1000)
            found.extend(batch)
            if cursor == b"0":
                return sorted(set(found))

    def contents(self, key):
        """Every byte stored under key, by type (plus DUMP)."""
        t = self.cmd("TYPE", key)
        parts = [key]
        if t == b"string":
            parts.append(self.cmd("GET", key))
        elif t == b"hash":
            parts.extend(self.cmd("HGETALL", key))
        elif t == b"list":
            parts.extend(self.cmd("LRANGE", key, 0, -1))
        elif t == b"set":
            parts.extend(self.cmd("SMEMBERS", key))
        elif t == b"zset":
            parts.extend(self.cmd("ZRANGE", key, 0, -1, "WITHSCORES"))
        elif t == b"stream":
            parts.append(repr(self.cmd("XRANGE", key, "-", "+")).encode())
        dump = self.cmd("DUMP", key)
        if dump:
            parts.append(dump)
        return t, [p for p in parts if p is not None]


def call(port, *args, user=None, password=None, db=None, timeout=10,
         context=None):
    """One command on a connection of its own (authenticated, database
    selected, over TLS with context, closed after the reply). Returns the
    reply (RespClient.reply)."""
    with RespClient(port, timeout, user, password, db, context) as c:
        return c.cmd(*args)


def try_call(port, *args, **kw):
    """call(), or None when Redis cannot be reached or answers an error:
    for polls that wait for a server to come up or change."""
    try:
        return call(port, *args, **kw)
    except (OSError, RedisError):
        return None


def ping(port, user=None, password=None, context=None):
    return try_call(port, "PING", user=user, password=password,
                    context=context) == b"PONG"


CLUSTER_SLOTS = 16384


def create_cluster(ports, context=None):
    """Makes the servers on ports (started with --cluster-enabled yes) one
    cluster of masters: the slots split in order as redis-cli splits them,
    a config epoch each, every node met by the first (over TLS with
    context, for servers with --tls-cluster yes). The caller waits for
    cluster_state:ok."""
    per = CLUSTER_SLOTS / float(len(ports))
    first, cursor = 0, 0.0
    for i, p in enumerate(ports):
        last = int(cursor + per - 1 + 0.5)
        if i == len(ports) - 1:
            last = CLUSTER_SLOTS - 1
        call(p, "CLUSTER", "ADDSLOTSRANGE", first, last, context=context)
        call(p, "CLUSTER", "SET-CONFIG-EPOCH", i + 1, context=context)
        first, cursor = last + 1, cursor + per
    for p in ports[1:]:
        call(ports[0], "CLUSTER", "MEET", "127.0.0.1", p, context=context)
