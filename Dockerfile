# Multi-stage: build on debian:12, run on debian:12-slim.
FROM debian:12 AS build
RUN apt-get update && apt-get install -y --no-install-recommends \
      build-essential cmake pkg-config libevent-dev libssl-dev libhiredis-dev \
      libcjson-dev libxxhash-dev libcmocka-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cmake -S . -B build -DCMAKE_BUILD_TYPE=RelWithDebInfo -DIDEMGATE_TESTS=OFF \
    && cmake --build build -j"$(nproc)" --target idemgate

FROM debian:12-slim
RUN apt-get update && apt-get install -y --no-install-recommends \
      libevent-2.1-7 libevent-pthreads-2.1-7 libevent-openssl-2.1-7 libssl3 \
      libcjson1 libxxhash0 ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/build/idemgate /usr/local/bin/idemgate
COPY config/idemgate.json /etc/idemgate/idemgate.json
EXPOSE 8080 9091
USER nobody
ENTRYPOINT ["/usr/local/bin/idemgate"]
CMD ["-c", "/etc/idemgate/idemgate.json"]
