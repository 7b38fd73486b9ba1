#!/usr/bin/env bash
# Installs everything building, testing and running kubesg needs on a Debian bookworm machine
# (run as root). Idempotent: each step checks first, so a second run takes a second or two.
set -euo pipefail

log() { printf '[bootstrap] %s\n' "$*" >&2; }

# Debian packages: LLVM 22 for bpf-linker (same major as rustc 1.95's LLVM), the network tools
# the tests and the demo drive, and the CNI reference plugins used as the primary plugin.
packages=(
  llvm-22-dev libpolly-22-dev libzstd-dev zlib1g-dev
  iproute2 iptables nftables conntrack iputils-ping netcat-openbsd iperf3
  containernetworking-plugins
)
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

# The bpf filesystem for pinned maps and links (not mounted on these machines by default).
if ! mountpoint -q /sys/fs/bpf; then
  log "mounting the bpf filesystem on /sys/fs/bpf"
  mount -t bpf bpf /sys/fs/bpf
fi
log "ready"
