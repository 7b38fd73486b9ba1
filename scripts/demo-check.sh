#!/usr/bin/env bash
# `make demo` as CI checks it (scripts/test.sh): once to the end, where the demo itself fails on
# any connectivity cell that differs from the reference evaluation or on anything it left
# behind; then interrupted with SIGINT part-way (a Ctrl-C), which must exit 130 and leave nothing:
# no network namespace, no pin under /sys/fs/bpf, no kubesg process, no temporary directory.
# Run as root after the binaries are built; it builds what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

footprint() {
  {
    ip netns list | awk '{print "netns " $1}'
    find /sys/fs/bpf -mindepth 1 -maxdepth 1 -printf 'bpffs %f\n'
    # By process name: a command line that only mentions them (cargo test -p kubesg-agent) is not one.
    # One name at a time: pgrep matches no name against a pattern longer than the kernel's 15
    # characters of a process name, and says so only on stderr.
    for name in kubesg-agent kubesg-operator kubesg-cni; do
      pgrep -a -x "$name" | sed 's/^[0-9]* /process /' || true
    done
    # The demo's temporary directories (manifests, statuses, PKI, IPAM, the agents' and the
    # operator's), all named kubesg-*; other files in /tmp are not the demo's.
    find "${TMPDIR:-/tmp}" -mindepth 1 -maxdepth 1 -type d -newer "$stamp" -name 'kubesg-*' \
      -printf 'tmp %f\n'
  } | sort
}

# Fails when the footprint differs from the one before the demo ran.
same_footprint() {
  local after
  after=$(footprint)
  if [[ "$before" != "$after" ]]; then
    diff <(echo "$before") <(echo "$after") >&2 || true
    echo "$1 left something behind" >&2
    exit 1
  fi
}

cargo build -q --locked -p kubesg-agent -p kubesg-cni -p kubesg-operator -p kubesg-demo --bins
stamp=$(mktemp)
log=$(mktemp)
trap 'rm -f "$stamp" "$log"' EXIT
before=$(footprint)

echo "demo, to the end:" >&2
if ! NO_COLOR=1 target/debug/kubesg-demo >"$log" 2>&1; then
  cat "$log" >&2
  echo "the demo failed" >&2
  exit 1
fi
grep -E 'Nothing left behind|Done in' "$log" >&2
same_footprint "the demo"

echo "demo, interrupted once its cluster runs:" >&2
NO_COLOR=1 target/debug/kubesg-demo >"$log" 2>&1 &
demo=$!
for _ in $(seq 1 600); do
  grep -q 'Adding 7 pods' "$log" && break
  kill -0 "$demo" 2>/dev/null || break
  sleep 0.1
done
kill -INT "$demo"
status=0
wait "$demo" || status=$?
if [[ $status -ne 130 ]]; then
  cat "$log" >&2
  echo "an interrupted demo must exit 130, it exited $status" >&2
  exit 1
fi
tail -n 2 "$log" >&2
same_footprint "the interrupted demo"
echo "demo checks passed" >&2
