"""idemtest: the one helper library of the pytest suites (tests/integration,
tests/faults) and of the exactly-once checker (tests/faults/exactly_once.py).
A conftest.py (or the checker) puts tests/lib on sys.path; tests import from
the modules:

  procs       ports, the environment, the processes (upstreams, redis-server,
              idemgate) and in-process raw listeners; /proc readings
  http        Resp, request() / post() / Client, raw sockets, response parsing,
              /metrics
  resp        RESP2: the only way tests talk to Redis
  assertions  docs/errors.md errors, replay comparison, bounded waits
  config      configurations (deep merge, store settings)
  storm       many clients at once, faults injected mid-storm
  attempts    clients that record how every attempt ended, retrying sessions
  invariant   the exactly-once analysis of attempts against the execution log
  fixtures    the pytest fixtures (upstream, redis, idemgate, execup, ...)
"""
