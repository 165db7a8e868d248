# syntax=docker/dockerfile:1
#
# keygate container image.
#
#   docker build -t keygate .
#   docker run --rm -p 8080:8080 -p 9090:9090 \
#       -v "$PWD/keygate.toml:/etc/keygate/keygate.toml:ro" \
#       -e KEYGATE_JWT_SECRET="$(head -c 48 /dev/urandom | base64)" keygate
#
# The policy file must listen on 0.0.0.0 (server.listen, server.admin_listen)
# to be reachable from outside the container, and should set
# state_dir = "/var/lib/keygate" (writable by the image's user; mount a volume
# there to keep quotas and refresh tokens across container restarts).
# deploy/kubernetes/keygate-sidecar.yaml runs this image as a sidecar.

# ---------------------------------------------------------------- builder
# bookworm, the same Debian release (glibc 2.36) as the runtime image below.
FROM rust:1-bookworm AS builder

# pingora's zlib-ng is built with cmake.
RUN apt-get update \
 && apt-get install -y --no-install-recommends cmake \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /src

# Dependencies first, in their own layer: it is rebuilt only when
# Cargo.toml or Cargo.lock change, not on every source edit. The manifest
# names [[bench]] targets, so cargo wants their files to exist; stubs do.
COPY Cargo.toml Cargo.lock ./
RUN mkdir -p src benches \
 && echo 'fn main() {}' > src/main.rs \
 && touch src/lib.rs \
 && for b in gate limiter login; do echo 'fn main() {}' > benches/$b.rs; done \
 && cargo build --release --locked \
 && rm -rf src \
           target/release/keygate target/release/deps/keygate-* \
           target/release/deps/libkeygate-* target/release/.fingerprint/keygate-*

# The sources, build.rs, and the file they include_str! at compile time
# (src/cli/demo.rs embeds config.example.toml).
COPY build.rs ./
COPY src ./src
COPY config.example.toml ./
# .git is not in the build context, so build.rs cannot ask git for the
# commit that keygate_build_info{commit} and `keygate --version` show; pass
# it in: docker build --build-arg KEYGATE_GIT_COMMIT=$(git rev-parse --short=12 HEAD) .
ARG KEYGATE_GIT_COMMIT=unknown
RUN KEYGATE_GIT_COMMIT="$KEYGATE_GIT_COMMIT" cargo build --release --locked \
 && install -D -m 0755 target/release/keygate /out/usr/local/bin/keygate \
 && install -d -m 0700 /out/var/lib/keygate \
 && install -d -m 0755 /out/etc/keygate

# ---------------------------------------------------------------- runtime
# distroless/cc rather than debian:bookworm-slim: keygate links only glibc,
# libm and libgcc_s (ldd), which cc-debian12 ships together with the CA
# roots (for https:// upstreams and rediss://) and tzdata, and nothing else:
# no shell, no package manager, no setuid binaries, so a compromised process
# finds nothing to work with, and there is less to patch. The :nonroot tag's
# user is uid/gid 65532. Debug with `kubectl debug --target=keygate` (an
# ephemeral container) or `docker run --entrypoint`, not a shell in here.
FROM gcr.io/distroless/cc-debian12:nonroot

COPY --from=builder /out/usr/local/bin/keygate /usr/local/bin/keygate
# The state directory, owned by the runtime user (an empty directory:
# Kubernetes mounts an emptyDir or a volume over it).
COPY --from=builder --chown=65532:65532 /out/var/lib/keygate /var/lib/keygate
COPY --from=builder /out/etc/keygate /etc/keygate

# The numeric form of distroless' `nonroot` user: Kubernetes can only verify
# runAsNonRoot against a numeric USER (with `USER nonroot` the kubelet
# refuses to start the container: "image has non-numeric user").
USER 65532:65532
WORKDIR /var/lib/keygate

# 8080: the public listener (server.listen). 9090: the admin listener
# (/healthz, /readyz, /metrics, POST /reload); keep it off the public network.
EXPOSE 8080 9090

# SIGTERM (the default stop signal) drains in-flight requests for
# server.grace_period; give `docker stop -t` / terminationGracePeriodSeconds more.
ENTRYPOINT ["keygate"]
CMD ["run", "-c", "/etc/keygate/keygate.toml"]
