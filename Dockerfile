# syntax=docker/dockerfile:1
#
# tunefleet images. One builder, two runtime targets:
#   docker build --target server -t tunefleet/tune-server:0.1.0 .   # control plane, no CUDA
#   docker build --target worker -t tunefleet/tune-worker:0.1.0 .   # tune-worker + tune-train + CUDA
#
# The builder installs the build dependencies with scripts/install-deps.sh and builds with the
# README's CMake invocation (tests/deploy checks that they cannot drift apart). Ubuntu 24.04
# carries the same package names as Debian 12 for everything but libtorch, which comes from
# the PyTorch CUDA wheel instead (its CMake config, C++11 ABI); TUNE_DEPS_EXCLUDE keeps the
# distribution's CPU-only libtorch out.

# The CUDA host the GPU tests run on: Ubuntu 24.04, CUDA 13, PyTorch 2.11 (shared/gpu/README.md).
ARG CUDA_VERSION=13.0.1
ARG UBUNTU=ubuntu24.04

FROM nvidia/cuda:${CUDA_VERSION}-devel-${UBUNTU} AS builder
ARG TORCH_VERSION=2.11.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu130
# Ampere, Ada, Hopper, Blackwell; override for other GPUs.
ARG CUDA_ARCHS="80;86;89;90;100;120"
ENV DEBIAN_FRONTEND=noninteractive
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
WORKDIR /src
COPY scripts/install-deps.sh scripts/install-deps.sh
RUN TUNE_DEPS_EXCLUDE="libtorch-dev libgloo-dev nodejs npm shellcheck" scripts/install-deps.sh \
 && apt-get install -y -qq --no-install-recommends python3-venv \
 && rm -rf /var/lib/apt/lists/*
# libtorch with CUDA and NCCL: the official wheel, in a venv whose path the binaries' RPATH
# keeps, so the worker image copies the venv to the same place.
RUN python3 -m venv /opt/torch \
 && /opt/torch/bin/pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}"
COPY . .
RUN Torch_DIR="$(/opt/torch/bin/python -c 'import torch.utils; print(torch.utils.cmake_prefix_path)')/Torch" \
 && export Torch_DIR \
 && cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DTUNE_BUILD_TESTS=OFF \
      -DTUNE_WITH_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES="${CUDA_ARCHS}" \
 && cmake --build build -j"$(nproc)"
# The Ubuntu packages each runtime image needs: those owning the shared libraries the binaries
# load (libraries of the torch venv are owned by no package and travel with the venv).
RUN mkdir -p /out \
 && for set in "server:tune-server tunectl" "worker:tune-worker tune-train tunectl"; do \
      name=${set%%:*}; bins=${set#*:}; \
      for b in $bins; do ldd "build/bin/$b"; done \
        | awk '/=> \// {print $3}' | sort -u \
        | while read -r lib; do dpkg -S "$(realpath "$lib")" 2>/dev/null || dpkg -S "$lib" 2>/dev/null || true; done \
        | cut -d: -f1 | grep -v -E '^(libc6|libgcc-s1|libstdc\+\+6|cuda-|libcu|libnccl|libnv)' \
        | sort -u > "/out/$name-packages.txt"; \
    done \
 && cat /out/*-packages.txt

FROM ubuntu:24.04 AS server
LABEL org.opencontainers.image.title="tune-server" \
      org.opencontainers.image.description="tunefleet control plane: tune-server (SQLite job queue, scheduler, /metrics) and tunectl" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="0.1.0"
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# The package list is computed from the binaries' ldd output in the builder.
COPY --from=builder /out/server-packages.txt /tmp/packages.txt
RUN mapfile -t pkgs < /tmp/packages.txt \
 && apt-get update -qq && apt-get install -y -qq --no-install-recommends "${pkgs[@]}" \
 && rm -rf /var/lib/apt/lists/* /tmp/packages.txt \
 && groupadd --system --gid 10001 tune \
 && useradd --system --uid 10001 --gid tune --home-dir /var/lib/tunefleet tune \
 && mkdir -p /var/lib/tunefleet /etc/tunefleet \
 && chown tune:tune /var/lib/tunefleet
COPY --from=builder /src/build/bin/tune-server /src/build/bin/tunectl /usr/local/bin/
USER 10001:10001
WORKDIR /var/lib/tunefleet
VOLUME ["/var/lib/tunefleet"]
EXPOSE 7070 9090
ENV TUNE_LISTEN=0.0.0.0:7070 \
    TUNE_METRICS_LISTEN=0.0.0.0:9090 \
    TUNE_DB=/var/lib/tunefleet/tunefleet.db
# Healthy = the server answers a real RPC (its job store is open), not just an open port.
HEALTHCHECK --interval=30s --timeout=10s --retries=3 \
  CMD ["/usr/local/bin/tunectl", "--server", "127.0.0.1:7070", "--timeout", "5", "list", "--limit", "1"]
ENTRYPOINT ["/usr/local/bin/tune-server"]

FROM nvidia/cuda:${CUDA_VERSION}-runtime-${UBUNTU} AS worker
LABEL org.opencontainers.image.title="tune-worker" \
      org.opencontainers.image.description="tunefleet GPU worker: tune-worker, tune-train (libtorch CUDA, NCCL) and tunectl" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="0.1.0"
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
COPY --from=builder /out/worker-packages.txt /tmp/packages.txt
RUN mapfile -t pkgs < /tmp/packages.txt \
 && apt-get update -qq && apt-get install -y -qq --no-install-recommends "${pkgs[@]}" \
 && rm -rf /var/lib/apt/lists/* /tmp/packages.txt \
 && groupadd --system --gid 10001 tune \
 && useradd --system --uid 10001 --gid tune --home-dir /var/lib/tunefleet tune \
 && mkdir -p /var/lib/tunefleet/work \
 && chown -R tune:tune /var/lib/tunefleet
# torch, its CUDA/NCCL/cuDNN wheels and their libraries, at the path the RPATH names.
COPY --from=builder /opt/torch /opt/torch
COPY --from=builder /src/build/bin/tune-worker /src/build/bin/tune-train /src/build/bin/tunectl /usr/local/bin/
USER 10001:10001
WORKDIR /var/lib/tunefleet
ENV TUNE_WORK_DIR=/var/lib/tunefleet/work \
    TUNE_TRAINER=/usr/local/bin/tune-train \
    TUNE_GPUS=all \
    TUNE_WORKER_METRICS_LISTEN=0.0.0.0:9091 \
    NCCL_NVLS_ENABLE=0 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
# 9091: the worker's own /metrics (GPU memory and utilisation, slots, connection).
EXPOSE 9091
# Healthy = it can reach its server (TUNE_SERVER).
# (No --start-period: dockerfilelint 1.8 misparses it; 3 x 30 s covers start-up.)
HEALTHCHECK --interval=30s --timeout=10s --retries=3 \
  CMD ["/usr/local/bin/tunectl", "--timeout", "5", "workers"]
ENTRYPOINT ["/usr/local/bin/tune-worker"]
