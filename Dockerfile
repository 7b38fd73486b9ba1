# syntax=docker/dockerfile:1
# The kubesg image: kubesg-operator, kubesg-agent and kubesg-cni in /usr/local/bin on a
# distroless runtime (glibc and libgcc only: no shell, no package manager), non-root by default.
#
#   docker build -t kubesg:dev .            # builds everything in the `build` stage
#   make image                              # here, without a registry: scripts/image.sh
#
# The operator runs as the image's user (65532). The agent cannot: the kernel checks
# capabilities for bpf(2) and netlink and the host paths it writes are root's, so the chart runs
# it as root with exactly CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON. kubesg-cni is linked
# statically: install-cni copies it onto the node, whose C library may be older than Debian 12's.
#
# RUNTIME_IMAGE and BINARIES let scripts/image.sh build the same final stage on a machine that
# reaches no image registry: a runtime base assembled from Debian's packages, and binaries built
# outside (the `prebuilt` stage, with the build context holding just them).
ARG RUST_IMAGE=docker.io/library/rust:1.95-bookworm
ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot
ARG BINARIES=build

FROM ${RUST_IMAGE} AS build
WORKDIR /src
COPY . .
# The eBPF toolchain (LLVM 22, bpf-linker, nightly rust-src), then the three binaries.
RUN scripts/bootstrap.sh --build-only && scripts/image.sh binaries /out

FROM scratch AS prebuilt
COPY kubesg-operator kubesg-agent kubesg-cni /out/

FROM ${BINARIES} AS binaries

FROM ${RUNTIME_IMAGE}
LABEL org.opencontainers.image.title="kubesg" \
      org.opencontainers.image.description="Stateful security groups for Kubernetes pods, enforced by eBPF" \
      org.opencontainers.image.source="https://github.com/kubesg/kubesg" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=binaries /out/ /usr/local/bin/
USER 65532:65532
# No default command: the chart names the binary of each container.
ENTRYPOINT []
