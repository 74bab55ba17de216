# mesh-trace agent image (the DaemonSet in deploy/kustomize).
#
# The builder stage mirrors `cargo xtask setup` (xtask/src/setup.rs), the
# "Debian route" of README.md, Building:
# - Debian 12's rustc-web/cargo-web 1.96 (LLVM 22) with libstd-rust-web-dev-bpf,
#   a precompiled `core` for bpfel-unknown-none, and llvm-22-dev; these come
#   from bookworm-security, which debian:bookworm's apt sources include;
# - bpf-linker 0.13.0 built on LLVM 22 (LLVM_PREFIX=/usr/lib/llvm-22);
# - the host code built by a rustup toolchain, as CI does. mesh-trace/build.rs
#   builds the kernel programs (mesh-trace-ebpf) with Debian's /usr/bin/cargo
#   and embeds them in the binary.
# The lab's tools (iptables, iproute2, ...) are not installed: `mesh-trace run`
# executes no other program.
#
#   docker build -t mesh-trace:0.1.0 .

FROM debian:bookworm AS builder

ARG RUST_VERSION=1.95.0
ARG BPF_LINKER_VERSION=0.13.0

RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        rustc-web cargo-web libstd-rust-web-dev-bpf \
        llvm-22-dev zlib1g-dev libzstd-dev \
        gcc g++ libc6-dev ca-certificates curl \
    && rm -rf /var/lib/apt/lists/*

ENV RUSTUP_HOME=/usr/local/rustup \
    CARGO_HOME=/usr/local/cargo \
    PATH=/usr/local/cargo/bin:$PATH

# Host toolchain. Downloaded to a file, not piped: /bin/sh has no pipefail.
RUN curl --proto '=https' --tlsv1.2 -sSf -o /tmp/rustup-init.sh https://sh.rustup.rs \
    && sh /tmp/rustup-init.sh -y --no-modify-path --profile minimal \
        --default-toolchain "$RUST_VERSION" \
    && rm /tmp/rustup-init.sh \
    && cargo --version

# /usr/bin/llvm-config is not LLVM 22: point bpf-linker's build at it.
RUN LLVM_PREFIX=/usr/lib/llvm-22 cargo install bpf-linker --locked \
        --version "$BPF_LINKER_VERSION" --no-default-features --features llvm-22 \
    && bpf-linker --version

WORKDIR /src
COPY . .

# MESH_TRACE_BPF_TOOLCHAIN=debian: build.rs uses the Debian route or fails,
# instead of quietly producing a binary without its kernel programs.
# --no-default-features: the agent without the lab (its proxy, CA and load
# generator), `demo` and the benchmarks.
# --strip-debug drops the DWARF (most of the size), keeping the symbols.
RUN MESH_TRACE_BPF_TOOLCHAIN=debian cargo build --release --package mesh-trace --locked --no-default-features \
    && strip --strip-debug -o /usr/local/bin/mesh-trace target/release/mesh-trace \
    && /usr/local/bin/mesh-trace --version


FROM debian:bookworm-slim

LABEL org.opencontainers.image.title="mesh-trace" \
      org.opencontainers.image.description="eBPF datapath tracer for Istio sidecar traffic: per-hop latency of every request" \
      org.opencontainers.image.licenses="MIT OR Apache-2.0" \
      org.opencontainers.image.version="0.1.0"

# The binary needs only glibc and libgcc_s (in the base image). CA
# certificates are for a KUBECONFIG whose API server has a public
# certificate; in a pod the service account's CA is used.
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*

COPY --from=builder /usr/local/bin/mesh-trace /usr/local/bin/mesh-trace

# Root: loading eBPF programs needs capabilities that a non-root user does
# not keep (the DaemonSet runs it as uid 0 with a short capability list).
ENTRYPOINT ["/usr/local/bin/mesh-trace"]
CMD ["run"]
