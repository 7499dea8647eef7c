# syntax=docker/dockerfile:1
# The fedrelay image: relay-node (the entrypoint) and relay-loadtest, on a distroless runtime
# (glibc, CA certificates, no shell), running as the non-root user 10001.
#
#   docker build -t fedrelay:dev .
#
# The Helm chart (charts/fedrelay) runs /usr/local/bin/relay-node and, for its load-test Job,
# /usr/local/bin/relay-loadtest.

ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src
# The whole workspace, including .cargo/config.toml and tools/protoc: etcd-client's build
# script runs the protoc that the protoc-bin-vendored build-dependency brings along.
COPY . .
RUN cargo build --release --locked -p relay-node -p relay-loadtest \
 && install -D -m 0755 target/release/relay-node /out/relay-node \
 && install -D -m 0755 target/release/relay-loadtest /out/relay-loadtest

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/ /usr/local/bin/
USER 10001:10001
# HTTP edge, admin listener (health, readiness, metrics), gRPC between nodes.
EXPOSE 8080 9090 7443
ENTRYPOINT ["/usr/local/bin/relay-node"]
CMD ["--config", "/etc/fedrelay/relay.toml"]
