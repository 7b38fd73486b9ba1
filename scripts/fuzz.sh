#!/usr/bin/env bash
# The fuzz targets (fuzz/: cargo-fuzz, libFuzzer), each in turn over its committed corpus
# (fuzz/corpus/TARGET):
#
#   scripts/fuzz.sh SECONDS [TARGET…]   each target for SECONDS (`make fuzz`, FUZZ_SECONDS)
#   scripts/fuzz.sh --brief [TARGET…]   each target for a fixed number of executions (50 000;
#                                       3 000 for manifest_values, whose executions compile two
#                                       clusters; FUZZ_BRIEF_RUNS for all) from a fixed seed
#                                       (FUZZ_SEED, default 1): `make test`
#
# New corpus entries go to a scratch corpus under target/ (target/fuzz-corpus/TARGET, kept
# between timed runs; a fresh one for each brief run), never into fuzz/corpus, unless a timed run
# is given FUZZ_MERGE=1: then what they add to the coverage is merged into fuzz/corpus (libFuzzer
# -merge=1), to be committed. A crash, a timeout (FUZZ_TIMEOUT seconds on one input, default 10)
# or running out of memory fails the run, after every target has had its turn; the input is kept
# under target/fuzz-artifacts/TARGET/ and a command to reproduce it is printed. The last lines are
# a table: executions, seconds, corpus size and crashes per target. FUZZ_ARGS: more libFuzzer
# flags for every target (they override the script's).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

usage() {
  echo "usage: scripts/fuzz.sh SECONDS [TARGET...] | scripts/fuzz.sh --brief [TARGET...]" >&2
  exit 2
}
(($# >= 1)) || usage
mode=$1
shift
if [[ "$mode" == --brief ]]; then
  brief=1
  seed=${FUZZ_SEED:-1}
  [[ "${FUZZ_BRIEF_RUNS:-0}" =~ ^[0-9]+$ ]] || usage
elif [[ "$mode" =~ ^[0-9]+$ ]] && ((mode > 0)); then
  seconds=$mode
  # A fixed seed only when asked: a timed run should try new inputs each time.
  seed=${FUZZ_SEED:-0}
else
  usage
fi
timeout=${FUZZ_TIMEOUT:-10}
read -r -a extra <<<"${FUZZ_ARGS:-}"

all_targets=(packet_parse cni_stdin cni_env policy_update manifests manifest_values)
targets=("$@")
((${#targets[@]})) || targets=("${all_targets[@]}")
for t in "${targets[@]}"; do
  [[ -f "fuzz/fuzz_targets/$t.rs" ]] || { echo "no fuzz target $t (fuzz/fuzz_targets/)" >&2; exit 2; }
done

log() { printf '[fuzz] %s\n' "$*" >&2; }

mkdir -p target
# fuzz/Cargo.lock is committed and kept on the root lock file's versions; cargo-fuzz has no
# --locked, so check it here as the rest of `make test` does with --locked.
if ! cargo +nightly metadata --manifest-path fuzz/Cargo.toml --format-version 1 --locked \
  >/dev/null 2>target/fuzz-lock-check.log; then
  cat target/fuzz-lock-check.log >&2
  log "fuzz/Cargo.lock is not current: 'cp Cargo.lock fuzz/Cargo.lock && cargo +nightly \
metadata --manifest-path fuzz/Cargo.toml --format-version 1 >/dev/null' renews it on the root \
lock file's versions"
  exit 1
fi

# `make test` checks the workspace's formatting; the fuzz crate is a workspace of its own.
if [[ -n "${brief:-}" ]]; then
  cargo fmt --manifest-path fuzz/Cargo.toml -- --check
fi

# No sanitizer: every target is safe Rust over safe Rust (the one unsafe read, Frame for [u8],
# is bounds-checked before it), where AddressSanitizer finds nothing a panic would not, and it
# would double the build and slow every execution. Debug assertions (overflow checks included)
# stay on: an overflow is a bug found. One target dir under target/ so builds are reused.
# A brief run (make test, CI: a cold build each time) builds with fuzz/Cargo.toml's dev profile
# (opt-level 1, no debug info), which compiles the dependency tree (kube, k8s-openapi, tonic)
# faster than -O's opt-level 3 and ran manifest_values' 3 000 executions in the same time (26.7 s
# against 27.4 s); a timed run builds with -O.
build_dir=target/fuzz
if [[ -n "${brief:-}" ]]; then
  profile=(--dev)
  bin_dir="$build_dir/x86_64-unknown-linux-gnu/debug"
else
  profile=(-O)
  bin_dir="$build_dir/x86_64-unknown-linux-gnu/release"
fi
log "building the fuzz targets (cargo +nightly fuzz build ${profile[*]}, $build_dir)"
cargo +nightly fuzz build --sanitizer none --debug-assertions "${profile[@]}" --target-dir "$build_dir"

# A brief run replays the same inputs only if nothing else varies: no periodic re-reading of the
# corpus directory (-reload=0) and no address randomization (setarch -R, where the sandbox allows
# it), since comparison tracing feeds compared values, pointers included, back into the mutations.
# That makes packet_parse, cni_stdin and cni_env exact replays; the agent's and the operator's
# HashMaps still seed their hashers per process, so the other targets' walks vary a little.
replay=()
if [[ -n "${brief:-}" ]]; then
  extra=(-reload=0 "${extra[@]}")
  if setarch "$(uname -m)" -R true 2>/dev/null; then
    replay=(setarch "$(uname -m)" -R)
  fi
fi

now() { date +%s.%N; }
failed=()
rows=()
for t in "${targets[@]}"; do
  corpus=fuzz/corpus/$t
  artifacts=target/fuzz-artifacts/$t
  logs=target/fuzz-logs
  mkdir -p "$corpus" "$artifacts" "$logs"
  if [[ -n "${brief:-}" ]]; then
    scratch=target/fuzz-corpus-brief/$t
    rm -rf "$scratch"
    runs=50000
    [[ "$t" != manifest_values ]] || runs=3000
    limit=(-runs="${FUZZ_BRIEF_RUNS:-$runs}")
  else
    scratch=target/fuzz-corpus/$t
    limit=(-max_total_time="$seconds")
  fi
  mkdir -p "$scratch"
  # What this run writes there (libFuzzer names an input by its hash: an old file may be rewritten).
  marker=$artifacts/.started
  touch "$marker"
  log "$t: ${limit[*]} -seed=$seed over $corpus"
  start=$(now)
  status=0
  # The scratch corpus first: libFuzzer writes new entries to the first directory only.
  "${replay[@]}" "$bin_dir/$t" "${limit[@]}" -seed="$seed" -timeout="$timeout" -max_len=4096 \
    -rss_limit_mb=2048 -print_final_stats=1 -artifact_prefix="$artifacts/" "${extra[@]}" \
    "$scratch" "$corpus" >"$logs/$t.log" 2>&1 || status=$?
  elapsed=$(awk -v a="$start" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }')
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$logs/$t.log" | tail -n 1)
  # The corpus as libFuzzer last reported it (`corp: UNITS/SIZE`), then the new entries.
  units=$( (grep -o 'corp: [0-9]*/[0-9]*[a-zA-Z]*' "$logs/$t.log" || true) | tail -n 1 | cut -d' ' -f2)
  new=$(find "$scratch" -type f | wc -l)
  found=$(find "$artifacts" -type f -newer "$marker" \( -name 'crash-*' -o -name 'timeout-*' \
    -o -name 'oom-*' -o -name 'leak-*' \) | sort)
  crashes=$(printf '%s' "$found" | grep -c . || true)
  ((status == 0 || crashes > 0)) || crashes="exit $status"
  if ((status != 0)) || [[ "$crashes" != 0 ]]; then
    failed+=("$t")
    log "$t FAILED (exit $status); the end of its log ($logs/$t.log):"
    tail -n 40 "$logs/$t.log" >&2
    while read -r a; do
      [[ -n "$a" ]] || continue
      log "$t: input kept at $a; reproduce with:"
      log "  RUST_BACKTRACE=1 $bin_dir/$t $a"
      log "  (or: cargo +nightly fuzz run --sanitizer none --debug-assertions -O --target-dir $build_dir $t $a)"
    done <<<"$found"
  fi
  rows+=("$t|${execs:-?}|$elapsed|${units:-?}|$new|$crashes")
  if [[ -z "${brief:-}" && "${FUZZ_MERGE:-}" == 1 && $status == 0 ]]; then
    log "$t: merging what the new entries add into $corpus (FUZZ_MERGE=1)"
    "$bin_dir/$t" -merge=1 -max_len=4096 -timeout="$timeout" "$corpus" "$scratch" \
      >"$logs/$t.merge.log" 2>&1 || { failed+=("$t (merge)"); tail -n 20 "$logs/$t.merge.log" >&2; }
  fi
done

# corpus: what libFuzzer last held (units/size); scratch: the files of the scratch corpus.
printf '\n%-16s %12s %9s %16s %8s %8s\n' target executions seconds corpus scratch crashes
for r in "${rows[@]}"; do
  IFS='|' read -r t e s c n k <<<"$r"
  printf '%-16s %12s %9s %16s %8s %8s\n' "$t" "$e" "$s" "$c" "$n" "$k"
done
if ((${#failed[@]})); then
  log "failed: ${failed[*]} (inputs under target/fuzz-artifacts/, logs under target/fuzz-logs/)"
  exit 1
fi
