# syntax=docker/dockerfile:1
# Sketch until the deployment issue: a control-plane image built on Debian 12 with the same
# install script and CMake invocation as the README. The CUDA worker image comes with the
# deployment issue (CUDA devel base + libtorch CUDA build).
FROM debian:12.8-slim AS builder
WORKDIR /src
COPY scripts/install-deps.sh scripts/install-deps.sh
RUN scripts/install-deps.sh
COPY . .
RUN cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DTUNE_BUILD_TESTS=OFF \
 && cmake --build build -j"$(nproc)"

FROM debian:12.8-slim AS server
RUN apt-get update && apt-get install -y --no-install-recommends \
      libgrpc++1.51 libprotobuf32 libsqlite3-0 libspdlog1.10 libyaml-cpp0.7 libprometheus-cpp-pull1.0 \
 && rm -rf /var/lib/apt/lists/* && useradd --system --uid 10001 tune
COPY --from=builder /src/build/bin/tune-server /src/build/bin/tunectl /usr/local/bin/
USER tune
EXPOSE 7070 9090
ENTRYPOINT ["/usr/local/bin/tune-server", "--listen", "0.0.0.0:7070", "--db", "/var/lib/tunefleet/tunefleet.db"]
