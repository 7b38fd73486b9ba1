#!/usr/bin/env bash
# The test command (README): installs prerequisites, checks formatting and lints, then runs every
# test, including the privileged ones (root, network namespaces, BPF_PROG_TEST_RUN, real
# traffic). Privileged tests fail when they cannot run; only KUBESG_SKIP_PRIVILEGED=1 skips them.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

# Each step says how much disk is left (builds and their caches take tens of GB, and a full
# disk shows up later as evicted pods or failed writes far from its cause) and how long the run
# has taken so far (CI has a time budget; this says which step spends it).
step() {
  printf '\n==> %s (disk: %s free, %d s so far)\n' "$*" \
    "$(df -Ph . | awk 'NR == 2 { print $4 }')" "$SECONDS" >&2
}

step "bootstrap"
scripts/bootstrap.sh

step "cargo fmt --check"
cargo fmt --all -- --check

step "clippy (host crates)"
cargo clippy --all-targets --locked -- -D warnings

step "clippy (eBPF crate, bpf target)"
cargo +nightly clippy -p kubesg-ebpf --bins --release --locked \
  --target bpfel-unknown-none -Z build-std=core -- -D warnings

step "generated files are current"
scripts/check-generated.sh

step "Helm chart (scripts/check-chart.sh)"
scripts/check-chart.sh

step "container image (scripts/image.sh: buildah, then the binaries run inside it)"
scripts/image.sh build
scripts/image.sh test

step "tests"
cargo test --workspace --exclude kubesg-ebpf --exclude kubesg-cluster-e2e --locked -- \
  --test-threads="${KUBESG_TEST_THREADS:-4}"

# Each fuzz target for a fixed number of executions from a fixed seed over its committed corpus:
# the same inputs every run, so a failure here is a regression (`make fuzz` explores further).
step "fuzz targets, briefly (scripts/fuzz.sh --brief)"
scripts/fuzz.sh --brief

if [[ "${KUBESG_SKIP_PRIVILEGED:-}" == 1 ]]; then
  step "tests in a real cluster: skipped (KUBESG_SKIP_PRIVILEGED=1)"
else
  # A real one-node cluster (scripts/k8s/cluster.sh, as `make cluster`) for the tests that need
  # a real API server, kubelet and container runtime; taken down again, also when they fail, and
  # the host checked to be as it was.
  step "tests in a real cluster (scripts/k8s/cluster.sh up, tests/cluster, down, check-clean)"
  cargo test -p kubesg-cluster-e2e --locked --no-run
  # What kubesg leaves on a node after its chart is gone (README, "Uninstall"), here from an
  # earlier run that was interrupted before its own uninstall: removed before `up` snapshots the
  # host, or check-clean would count the uninstall below taking it away as a difference.
  scripts/k8s/node-leftovers.sh
  trap 'scripts/k8s/cluster.sh down >&2 || true' EXIT
  KUBESG_KUBECONFIG=$(scripts/k8s/cluster.sh up | tail -n 1)
  KUBESG_KUBECTL="$(scripts/k8s/build.sh)/kubectl"
  # The image `scripts/image.sh build` made above, for the chart's pods (no registry).
  scripts/k8s/cluster.sh import-image "localhost/kubesg:$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)"
  export KUBESG_KUBECONFIG KUBESG_KUBECTL
  cargo test -p kubesg-cluster-e2e --locked -- --test-threads="${KUBESG_TEST_THREADS:-4}"
  # Upstream's NetworkPolicy e2e tests in the same cluster, kubesg installed by its chart and
  # uninstalled after by the README's steps (`make conformance` without the uninstall).
  step "upstream NetworkPolicy e2e tests in the real cluster (scripts/k8s/conformance.sh)"
  scripts/k8s/conformance.sh --kubesg --uninstall
  trap - EXIT
  scripts/k8s/cluster.sh down
  scripts/k8s/cluster.sh check-clean
fi

if [[ "${KUBESG_SKIP_PRIVILEGED:-}" == 1 ]]; then
  step "the demo: skipped (KUBESG_SKIP_PRIVILEGED=1)"
else
  step "the demo, to the end and interrupted (scripts/demo-check.sh)"
  scripts/demo-check.sh
fi

step "all tests passed"
