"""Throwaway TLS material for a test, made with the `openssl` command into
a directory of the test's own: a CA, a server certificate it signed for IP
127.0.0.1 and DNS localhost (EC P-256, valid 2 days; for client
authentication too with client=True, as the cluster bus of a TLS Redis
Cluster asks both ends for one), and a second,
unrelated CA that signed nothing (the wrong trust anchor of negative
tests). Nothing here is trusted anywhere else.

make_certs(d, client=False) -> Certs; Certs.ca, .wrong_ca, .cert, .key are paths.
"""

import os
import subprocess
from collections import namedtuple

Certs = namedtuple("Certs", "dir ca wrong_ca cert key")

SERVER_EXT = ("subjectAltName=IP:127.0.0.1,DNS:localhost\n"
              "basicConstraints=CA:FALSE\n"
              "keyUsage=critical,digitalSignature\n"
              "extendedKeyUsage=%s\n"
              "subjectKeyIdentifier=hash\n"
              "authorityKeyIdentifier=keyid\n")


def _openssl(*args, cwd):
    subprocess.run(["openssl"] + list(args), cwd=cwd, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   timeout=60)


def _make_ca(d, name):
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt",
             "ec_paramgen_curve:prime256v1", "-nodes", "-keyout",
             name + ".key", "-out", name + ".crt", "-days", "2", "-subj",
             "/CN=idemgate test " + name, "-addext",
             "basicConstraints=critical,CA:TRUE", "-addext",
             "keyUsage=critical,keyCertSign,cRLSign", cwd=d)


def make_certs(d, client=False):
    """Makes the CA, the wrong CA and the server certificate and key in
    directory d (created if missing); returns their paths. client: the
    certificate may also authenticate a client (extendedKeyUsage
    serverAuth,clientAuth): what Redis servers that connect to each other
    over TLS (cluster bus, replication, sentinels) present."""
    os.makedirs(d, exist_ok=True)
    _make_ca(d, "ca")
    _make_ca(d, "wrongca")
    with open(os.path.join(d, "srv.ext"), "w") as f:
        f.write(SERVER_EXT % ("serverAuth,clientAuth" if client else "serverAuth"))
    _openssl("req", "-newkey", "ec", "-pkeyopt",
             "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", "srv.key",
             "-out", "srv.csr", "-subj", "/CN=localhost", cwd=d)
    _openssl("x509", "-req", "-in", "srv.csr", "-CA", "ca.crt", "-CAkey",
             "ca.key", "-CAcreateserial", "-out", "srv.crt", "-days", "2",
             "-extfile", "srv.ext", cwd=d)
    p = lambda name: os.path.join(d, name)  # noqa: E731
    return Certs(d, p("ca.crt"), p("wrongca.crt"), p("srv.crt"), p("srv.key"))
