# syntax=docker/dockerfile:1
# endpoint-stats images, two targets built from one compile:
#   runtime (default)  the service: distroless, no shell, non-root.
#       docker build -t endpoint-stats:TAG .
#   ops                the same binary plus pg_dump/pg_restore for the backup, verify-backup,
#                      maintenance and health-check CronJobs.
#       docker build --target ops -t endpoint-stats-ops:TAG .
#
# The ops stage starts FROM the very PostgreSQL image that deploy/kubernetes runs (postgres:16.9,
# Debian bookworm): its pg_dump/pg_restore are those of the server's major version by
# construction, with no third-party package repository, and its glibc is the builder's
# (bookworm). tests/deploy/check_manifests.py checks that the two pins agree.

# checkov:skip=CKV_DOCKER_2:Kubernetes probes /health and /ready; the runtime image has no shell or client to run a HEALTHCHECK
# ---- build ------------------------------------------------------------------------------------
FROM rust:1.95-bookworm AS builder
WORKDIR /src
# sqlx's macros must never reach for a live database at build time (migrations are embedded
# from migrations/)
ENV SQLX_OFFLINE=true \
    CARGO_TERM_COLOR=never
# The git revision for endpoint_stats_build_info{revision}: docker build --build-arg REVISION=$(git rev-parse --short HEAD)
ARG REVISION=unknown
ENV ENDPOINT_STATS_REVISION=${REVISION}
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin endpoint-stats \
    && install -D -m 0755 target/release/endpoint-stats /out/endpoint-stats

# ---- ops: backups, verification, maintenance, health checks ----------------------------------
FROM postgres:16.9-bookworm AS ops
RUN groupadd --system --gid 10001 endpoint-stats \
    && useradd --system --uid 10001 --gid 10001 --home-dir /nonexistent --no-create-home \
       --shell /usr/sbin/nologin endpoint-stats
COPY --from=builder /out/endpoint-stats /usr/local/bin/endpoint-stats
ENV LOG_FORMAT=json
USER 10001:10001
WORKDIR /tmp
ENTRYPOINT ["/usr/local/bin/endpoint-stats"]
CMD ["check"]

# ---- runtime: the service (default target, so it is last) -------------------------------------
# distroless publishes no version tags, only moving ones and digests: the release pipeline may
# append @sha256:<digest> to pin it exactly (none can be resolved where this file is linted).
FROM gcr.io/distroless/cc-debian12:nonroot AS runtime
COPY --from=builder /out/endpoint-stats /usr/local/bin/endpoint-stats
ENV LOG_FORMAT=json \
    PORT=9999 \
    BIND=0.0.0.0
# distroless "nonroot" user; Kubernetes runs it read-only with no capabilities
USER 65532:65532
WORKDIR /tmp
EXPOSE 9999
# No HEALTHCHECK: Kubernetes probes /health and /ready (deploy/kubernetes/base/app/deployment.yaml),
# and the image has no shell or curl to run one.
ENTRYPOINT ["/usr/local/bin/endpoint-stats"]
CMD ["serve"]
