# Multi-stage: build on debian:12, run on debian:12-slim.
FROM debian:12 AS build
# libhiredis-dev: CMake's top level asks for it, though the binary no longer
# links it.
RUN apt-get update && apt-get install -y --no-install-recommends \
      build-essential cmake pkg-config libevent-dev libssl-dev libhiredis-dev \
      libcjson-dev libxxhash-dev libnghttp2-dev liblmdb-dev libcmocka-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# Built outside /src, so a build/ directory in the context cannot get in the way.
RUN cmake -S . -B /build -DCMAKE_BUILD_TYPE=RelWithDebInfo -DIDEMGATE_TESTS=OFF \
    && cmake --build /build -j"$(nproc)" --target idemgate

FROM debian:12-slim
# What the binary links, and nothing else (scripts/container-test.sh checks
# ldd inside the image both ways): libevent, OpenSSL, cJSON, xxHash, nghttp2, LMDB; and
# ca-certificates for upstream_tls and rediss://.
RUN apt-get update && apt-get install -y --no-install-recommends \
      libevent-2.1-7 libssl3 libcjson1 libxxhash0 libnghttp2-14 liblmdb0 ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /build/idemgate /usr/local/bin/idemgate
# config/container.json: the memory store (works with nothing else running;
# IDEMGATE_STORE=redis IDEMGATE_REDIS_URL=... for Redis) and the admin
# listener on 0.0.0.0:9091 for probes (/keys still answers only loopback
# clients unless admin.token is set).
COPY config/container.json /etc/idemgate/idemgate.json
EXPOSE 8080 9091
# nobody, numeric so runAsNonRoot can verify it.
USER 65534:65534
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
  CMD ["/usr/local/bin/idemgate", "-c", "/etc/idemgate/idemgate.json", "--healthcheck"]
ENTRYPOINT ["/usr/local/bin/idemgate"]
CMD ["-c", "/etc/idemgate/idemgate.json"]
