#!/usr/bin/env bash
# `make bench-traffic`: installs the traffic tools if missing (wrk, sockperf, iperf3, ipset,
# nftables, iptables), then runs the real-traffic benchmark (tests/bench_traffic.rs) in the
# release profile, as root. Arguments go to the bench (`--rounds`, `--peers`, `--seconds`,
# `--out`); without `--out` it writes docs/benchmarks.md.
set -euo pipefail

log() { printf '[bench-traffic] %s\n' "$*" >&2; }

cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

missing=()
for tool in wrk:wrk sockperf:sockperf iperf3:iperf3 ipset:ipset nft:nftables iptables:iptables; do
  if ! command -v "${tool%%:*}" >/dev/null 2>&1; then
    missing+=("${tool#*:}")
  fi
done
if ((${#missing[@]})); then
  log "installing Debian packages: ${missing[*]}"
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

args=("$@")
has_out=0
for a in "${args[@]}"; do
  case "$a" in --out | --out=*) has_out=1 ;; esac
done
if ((has_out == 0)); then
  args+=(--out docs/benchmarks.md)
fi

exec cargo bench -q -p kubesg-e2e --bench traffic -- "${args[@]}"
