#!/usr/bin/env bash
# Stress check for flaky tests (not part of `make test`): runs test targets N times each while
# two busy-loop processes keep both cores loaded, and prints, for every test, how many runs
# passed and failed. Use it on every test that sleeps, times or races before landing it.
#
#   scripts/flake-check.sh N [TARGET[::FILTER] ...]
#
# TARGET is an integration-test target (a file under some crate's tests/, e.g. prog_timeouts),
# or `lib:CRATE` for a crate's unit tests; FILTER is passed to the test binary (a substring of
# test names). Without targets, every target whose tests sleep, time or race is run. Each run is
# the target's whole binary with the suite's thread count (KUBESG_TEST_THREADS, default 4), as
# `make test` runs it. As root: most of these tests are privileged.
#
# Prints lines like `prog_clock::calibrated_under_load_the_clock_is_within_its_bound: 30 passed,
# 0 failed`, then the totals; exits 1 when any run failed. Logs of failed runs are kept under
# target/flake-check/.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

usage() {
  sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
}

[[ $# -ge 1 && "$1" =~ ^[0-9]+$ && "$1" -gt 0 ]] || usage
runs=$1
shift
targets=("$@")
if ((${#targets[@]} == 0)); then
  # Every target that sleeps, measures time, spawns threads or races another process.
  targets=(
    prog_timeouts prog_clock install_cni lib:kubesg-agent operator_link prog_fragments
    prog_malformed prog_policy prog_udp_icmp traffic_idle traffic_kernel_compare
    traffic_protocols traffic_rule_change traffic_tcp_window traffic_table_pressure traffic_kernel_verdicts spoofing pinning agent_restart cni_chain manifests_e2e operator_trust
    startup_policy manifests_mode push_sync reconcile agent_calls
  )
fi

out=target/flake-check
rm -rf "$out"
mkdir -p "$out"

echo "building the test binaries" >&2
cargo test --workspace --exclude kubesg-ebpf --locked --no-run --message-format=json \
  2>"$out/build.log" >"$out/build.json" || { cat "$out/build.log" >&2; exit 1; }

# target name -> "test binary<TAB>its crate's directory" (cargo runs tests from there)
binary_of() {
  python3 - "$out/build.json" "$1" <<'EOF'
import json, os, sys
want = sys.argv[2]
for line in open(sys.argv[1]):
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") != "compiler-artifact" or not m.get("executable"):
        continue
    t = m["target"]
    if want.startswith("lib:"):
        hit = "lib" in t["kind"] and t["name"] == want[4:].replace("-", "_")
    else:
        hit = "test" in t["kind"] and t["name"] == want
    if hit:
        print(m["executable"] + "\t" + os.path.dirname(m["manifest_path"]))
        break
EOF
}

busy=()
stop_busy() {
  for p in "${busy[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap stop_busy EXIT INT TERM
for _ in 1 2; do
  (while :; do :; done) &
  busy+=($!)
done
echo "two busy loops running (pids ${busy[*]}); $runs runs per target" >&2

declare -A passed failed
any_failed=0
threads=${KUBESG_TEST_THREADS:-4}
for spec in "${targets[@]}"; do
  target=${spec%%::*}
  filter=""
  [[ "$spec" == *::* ]] && filter=${spec#*::}
  found=$(binary_of "$target")
  if [[ -z "$found" ]]; then
    echo "no test target named $target" >&2
    exit 2
  fi
  bin=${found%%$'\t'*}
  crate_dir=${found#*$'\t'}
  label=${target#lib:}
  for ((i = 1; i <= runs; i++)); do
    log="$out/$label.$i.log"
    status=0
    (cd "$crate_dir" && "$bin" ${filter:+"$filter"} --test-threads="$threads") >"$log" 2>&1 ||
      status=$?
    while read -r name result; do
      key="$label::$name"
      if [[ "$result" == ok ]]; then
        passed[$key]=$((${passed[$key]:-0} + 1))
      elif [[ "$result" == FAILED ]]; then
        failed[$key]=$((${failed[$key]:-0} + 1))
      fi
    done < <(sed -n 's/^test \(.*\) \.\.\. \(ok\|FAILED\)$/\1 \2/p' "$log")
    if ((status != 0)); then
      any_failed=1
      echo "$label run $i failed (log: $log)" >&2
    else
      rm -f "$log"
    fi
  done
  echo "$label: $runs runs done" >&2
done

total_pass=0
total_fail=0
for key in $(printf '%s\n' "${!passed[@]}" "${!failed[@]}" | sort -u); do
  p=${passed[$key]:-0}
  f=${failed[$key]:-0}
  total_pass=$((total_pass + p))
  total_fail=$((total_fail + f))
  if ((f > 0)); then
    printf '%s: %d passed, %d failed   <-- FLAKY\n' "$key" "$p" "$f"
  else
    printf '%s: %d passed, %d failed\n' "$key" "$p" "$f"
  fi
done
printf 'flake-check (%d runs per target, both cores busy): %d passed, %d failed\n' \
  "$runs" "$total_pass" "$total_fail"
exit $((any_failed || total_fail > 0))
