"""idemtest: the one helper library of the pytest suites (tests/integration,
tests/faults) and of the exactly-once checker (tests/faults/exactly_once.py).
A conftest.py (or the checker) puts tests/lib on sys.path; tests import from
the modules:

  procs       ports, the environment, the processes (upstreams, redis-server,
              idemgate) and in-process raw listeners; /proc readings
  http        Resp, request() / post() / Client, raw sockets, response parsing,
              /metrics
  h2          HTTP/2 clients (python3-h2): H2Client with frame-level control
              (streams, CONTINUATION, RST_STREAM, PING, SETTINGS, raw frames,
              GOAWAY), h2_request() / h2_post(), alpn_selected()
  proto       one request over HTTP/1.1 or HTTP/2 as the same Resp (Proto, the
              `proto` fixture's value), refused()
  resp        RESP2: the only way tests talk to Redis
  assertions  docs/errors.md errors, replay comparison, bounded waits
  config      configurations (deep merge, store settings)
  storm       many clients at once, faults injected mid-storm
  attempts    clients that record how every attempt ended, retrying sessions
  invariant   the exactly-once analysis of attempts against the execution log
  fixtures    the pytest fixtures (upstream, redis, proto, idemgate, execup, ...)
"""
