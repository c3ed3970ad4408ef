# syntax=docker/dockerfile:1
# keygate's container image: built on the official Rust image (Debian bookworm), run on
# distroless cc (Debian 12: glibc, libgcc, CA certificates; no shell, no package manager) as the
# non-root user 65532. Nothing is written to the root filesystem: run it read-only, with the
# keys file (if the file store is used) on a volume. `scripts/image.sh` assembles the same
# image without Docker; `tests/image.rs` checks that both agree on what is declared below.
#
#     docker build -t ghcr.io/keygate/keygate:0.1.0 .

ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src
COPY . .
# The registry and target caches persist between builds; the binary is copied out of the
# cached target directory since the cache mount is not part of the layer.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin keygate \
    && install -D -m 0755 target/release/keygate /out/usr/local/bin/keygate \
    && install -d -m 0755 /out/var/lib/keygate

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/usr/local/bin/keygate /usr/local/bin/keygate
# The working directory, for a keys file given by a relative path: owned by the user keygate
# runs as, so a volume mounted here is writable by it.
COPY --from=build --chown=65532:65532 /out/var/lib/keygate /var/lib/keygate
WORKDIR /var/lib/keygate
USER 65532:65532
# keygate's default ports: the proxy (server.listen) and the admin listener with the probes,
# metrics and management API (server.admin_listen).
EXPOSE 8080 9090
# The admin listener defaults to loopback, where no probe from outside the container reaches
# it: in the image it listens on every interface. An environment variable beats the config
# file: move it with this variable or --admin-listen.
ENV KEYGATE__SERVER__ADMIN_LISTEN=0.0.0.0:9090
LABEL org.opencontainers.image.title="keygate" \
      org.opencontainers.image.description="Authentication sidecar and edge gateway that guards HTTP services with bearer API keys" \
      org.opencontainers.image.source="https://github.com/keygate/keygate" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.licenses="Apache-2.0"
ENTRYPOINT ["/usr/local/bin/keygate"]
CMD ["serve"]
