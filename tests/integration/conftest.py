"""pytest fixtures for the idemgate integration tests: a private upstream
(upstream.py), a private redis-server, and an idemgate factory. Helpers are
in igtest.py (import them with `from igtest import ...`)."""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import igtest  # noqa: E402
from igtest import free_port, idemgate_bin  # noqa: E402,F401

IDEMGATE_BIN = idemgate_bin()


@pytest.fixture
def upstream():
    up = igtest.Upstream()
    yield up
    up.stop()


@pytest.fixture
def upstream2():
    up = igtest.Upstream()
    yield up
    up.stop()


@pytest.fixture
def redis():
    r = igtest.Redis()
    yield r
    r.stop()


@pytest.fixture
def idemgate(tmp_path):
    """Factory: idemgate(config=None, args=(), env=None, wait=True) starts
    one idemgate with config merged onto {"listen": free port, "workers": 1,
    "admin": {"listen": "off"}} and returns an igtest.Idemgate. Every
    instance is stopped at teardown; its exit code there is not checked."""
    if not os.path.exists(IDEMGATE_BIN):
        pytest.fail("idemgate binary not found at %s (set IDEMGATE_BIN)"
                    % IDEMGATE_BIN)
    started = []

    def factory(config=None, args=(), env=None, wait=True):
        g = igtest.Idemgate(str(tmp_path), config, args, env, wait=False)
        started.append(g)
        if wait:
            try:
                g.wait_ready()
            except RuntimeError as e:
                pytest.fail(str(e))
        return g

    yield factory
    for g in started:
        try:
            g.stop(timeout=10)
        except Exception:  # noqa: BLE001 - teardown must go on
            g.kill()
