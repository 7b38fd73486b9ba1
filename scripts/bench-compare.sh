#!/usr/bin/env bash
# The datapath benchmark of this tree side by side with another commit's: both bench binaries
# run alternately (base, this, base, this, ...) RUNS times, and the table gives, per case, the
# median ns/packet of each build and their ratio (this / base), the figure a "≤ 1.15× the
# previous build" target is about. Not part of `make test`.
#
#   scripts/bench-compare.sh BASE [RUNS]        (as root; RUNS defaults to 5)
#
# The base is checked out in a worktree under target/bench-base/ and built with a target directory
# of its own there (neither build evicts the other's artifacts); this tree's bench
# source and test packet builder are copied over it so that both builds run the same cases.
# Raw outputs are kept in target/bench-base/runs/.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

[[ $# -ge 1 ]] || { sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
rev=$(git rev-parse --short "$1^{commit}")
runs=${2:-5}
root=target/bench-base
wt=$root/src-$rev
mkdir -p "$root/runs"
if [[ ! -d $wt ]]; then
  git worktree add --detach "$wt" "$rev" >/dev/null
fi
cp dataplane/agent/benches/datapath.rs "$wt/dataplane/agent/benches/datapath.rs"
cp testkit/src/packet.rs "$wt/testkit/src/packet.rs"

# The bench executable cargo builds in $1 with target directory $2.
bench_exe() {
  (cd "$1" && CARGO_TARGET_DIR=$2 cargo bench -p kubesg-agent --bench datapath --no-run \
    --message-format=json) | grep '"kind":\["bench"\]' |
    sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -1
}
echo "building the base ($rev)" >&2
# One target directory per base: cargo hashes path dependencies by their place in the workspace,
# so two bases sharing one would reuse each other's crates (their fingerprints name the other
# worktree's unchanged files).
base_exe=$(bench_exe "$wt" "$PWD/$root/target-$rev")
echo "building this tree" >&2
this_exe=$(bench_exe . "$PWD/target")
[[ -x $base_exe && -x $this_exe ]] || { echo "bench-compare: no bench executable" >&2; exit 1; }

for i in $(seq 1 "$runs"); do
  for build in base this; do
    exe=base_exe
    [[ $build == this ]] && exe=this_exe
    echo "run $i/$runs: $build" >&2
    if ! "${!exe}" > "$root/runs/$build-$i.txt" 2> "$root/runs/$build-$i.err"; then
      echo "bench-compare: the $build bench failed:" >&2
      tail -5 "$root/runs/$build-$i.err" >&2
      exit 1
    fi
  done
done

python3 - "$root/runs" "$runs" "$rev" <<'EOF'
import re, statistics, sys
d, runs, rev = sys.argv[1], int(sys.argv[2]), sys.argv[3]
row = re.compile(r"^(\(.*?)\s+(ipv4|ipv6)\s+(\d+)$")
vals = {}
order = []
for build in ("base", "this"):
    for i in range(1, runs + 1):
        for line in open(f"{d}/{build}-{i}.txt"):
            m = row.match(line.rstrip())
            if not m:
                continue
            key = (m.group(1).strip(), m.group(2))
            if key not in order:
                order.append(key)
            vals.setdefault(key, {}).setdefault(build, []).append(int(m.group(3)))
print(f"\nns/packet, median of {runs} alternating runs per build (base {rev})\n")
print(f"{'case':<48} {'family':>6} {'base':>6} {'this':>6} {'this/base':>10}")
for key in order:
    v = vals[key]
    if "base" not in v or "this" not in v:
        continue
    b, t = statistics.median(v["base"]), statistics.median(v["this"])
    print(f"{key[0]:<48} {key[1]:>6} {b:>6.0f} {t:>6.0f} {t / b:>10.2f}")
EOF
