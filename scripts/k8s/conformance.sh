#!/usr/bin/env bash
# Runs upstream's NetworkPolicy end-to-end tests (k8s.io/kubernetes test/e2e/network/netpol, at
# the version of versions.env) against the running test cluster of scripts/k8s/cluster.sh, with
# the e2e.test that `scripts/k8s/build.sh --e2e` builds (built here first when it is missing).
# Prints one line per test, then `N passed, M failed, K skipped`; exits non-zero when a test
# failed, when none ran, or when the suite itself failed. docs/conformance.md says what the tests
# do and need.
#
# With --kubesg (what `make conformance` passes) it first builds kubesg's image, imports it and
# installs (or upgrades and restarts) the chart with the image settings only, as a user would;
# without it, whatever enforces NetworkPolicies (kubesg installed by hand, or nothing, in which
# case the tests that expect a denial fail) is the caller's business.
#
# Usage: scripts/k8s/conformance.sh [--dry-run] [--kubesg [--uninstall]] [-- extra e2e.test flags]
#   --dry-run    list the tests the selection would run (ginkgo dry run, no cluster needed)
#   --kubesg     install kubesg from this tree (scripts/image.sh build, import, helm) first
#   --uninstall  with --kubesg: uninstall it afterwards (also after a failure) by the README's
#                steps, as `make test` does before it takes the cluster down
#
# Environment:
#   KUBESG_CLUSTER_DIR                cluster.sh's state dir (default /var/lib/kubesg-cluster);
#                                     the admin kubeconfig is <dir>/kubeconfig
#   KUBESG_CONFORMANCE_KUBECONFIG     another kubeconfig instead
#   KUBESG_CONFORMANCE_REPORT_DIR     JUnit and logs (default <repo>/target/conformance; its
#                                     previous reports are removed first)
#   KUBESG_CONFORMANCE_SCTP           auto (default: run the 3 SCTP tests only when this kernel
#                                     has SCTP), 1 or 0
#   KUBESG_CONFORMANCE_LABEL_FILTER   the Ginkgo label filter (default: the Feature:NetworkPolicy
#                                     tests, without the SCTPConnectivity ones unless SCTP runs)
#   KUBESG_CONFORMANCE_NODES          parallel Ginkgo processes (default 1: e2e.test alone;
#                                     more runs it under the ginkgo CLI)
#   KUBESG_CONFORMANCE_TIMEOUT        the suite's timeout (default 3h; Ginkgo's own is 1h)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
# shellcheck source=versions.env
source "$here/versions.env"

log() { printf '[conformance] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# Go (for `go list`), as build.sh finds it: the machine's toolchain only.
if ! command -v go >/dev/null && [[ -x /usr/local/go/bin/go ]]; then
  export PATH="$PATH:/usr/local/go/bin"
fi
export GOTOOLCHAIN="${GOTOOLCHAIN:-local}"

dry_run=0
kubesg=0
uninstall=0
extra=()
while (($# > 0)); do
  case "$1" in
    --dry-run) dry_run=1 ;;
    --kubesg) kubesg=1 ;;
    --uninstall) uninstall=1 ;;
    --) shift; extra=("$@"); break ;;
    *) echo "usage: $0 [--dry-run] [--kubesg [--uninstall]] [-- extra e2e.test flags]" >&2; exit 2 ;;
  esac
  shift
done

DIR="${KUBESG_CLUSTER_DIR:-/var/lib/kubesg-cluster}"
DIR="${DIR%/}"
kubeconfig="${KUBESG_CONFORMANCE_KUBECONFIG:-$DIR/kubeconfig}"
report="${KUBESG_CONFORMANCE_REPORT_DIR:-$repo/target/conformance}"
nodes="${KUBESG_CONFORMANCE_NODES:-1}"
timeout="${KUBESG_CONFORMANCE_TIMEOUT:-3h}"
sctp="${KUBESG_CONFORMANCE_SCTP:-auto}"
[[ "$nodes" =~ ^[1-9][0-9]*$ ]] || die "KUBESG_CONFORMANCE_NODES must be a positive number, not '$nodes'"
command -v jq >/dev/null || die "jq is missing (apt-get install jq)"

# The cluster first: refusing takes a second, building e2e.test minutes.
kc() { "$BIN/kubectl" --kubeconfig "$kubeconfig" --request-timeout=10s "$@"; }
if ((dry_run == 0)); then
  [[ -f "$kubeconfig" ]] ||
    die "no cluster is up: $kubeconfig does not exist. Start one with 'make cluster' (scripts/k8s/cluster.sh up, as root)"
  [[ -r "$kubeconfig" ]] || die "cannot read $kubeconfig (run as root)"
fi

# e2e.test, ginkgo and kubectl: build.sh returns at once when its stamps match.
BIN="$("$here/build.sh" --e2e)"
e2e="$BIN/e2e.test"

if ((dry_run == 0)); then
  kc get --raw /readyz >/dev/null 2>&1 ||
    die "the cluster of $kubeconfig does not answer (apiserver /readyz). Is it up? 'scripts/k8s/cluster.sh status'"
  kc wait --for=condition=Ready node --all --timeout=30s >/dev/null ||
    die "a node of the cluster is not Ready ('scripts/k8s/cluster.sh status')"
  # No registry: the test pods' images must be in the node's containerd already (cluster.sh up
  # imports them under the names e2e.test expects). The kubelet reports the node's images.
  # The names: e2e.test's own list (it honours KUBE_TEST_REPO_LIST), narrowed to the agnhost of
  # the module's VERSION file (the list also holds an older agnhost and a private one that the
  # netpol tests do not use) and pause.
  k8s_src="$(cd "$here/kubernetes" && go list -m -f '{{.Dir}}' k8s.io/kubernetes)"
  agnhost_version=$(cat "$k8s_src/test/images/agnhost/VERSION")
  node_images=$(kc get nodes -o jsonpath='{range .items[*]}{range .status.images[*]}{range .names[*]}{@}{"\n"}{end}{end}{end}')
  for image in $("$e2e" --list-images | grep -E "/agnhost:${agnhost_version//./\\.}\$|/pause:" | sort -u); do
    grep -qxF "$image" <<<"$node_images" ||
      die "image $image is not on the node (e2e.test's pods use it with imagePullPolicy IfNotPresent and no registry is reachable): import it with 'scripts/k8s/cluster.sh import-image <archive>' (cluster.sh up imports agnhost and pause)"
  done
fi

# kubesg, installed as the README's "Try it in a real cluster" says: its image built and imported,
# the chart with the image settings only. An installed release is upgraded and its pods
# restarted, so they run the image just built under the same tag.
((uninstall == 0 || kubesg == 1)) || die "--uninstall goes with --kubesg"
# The README's uninstall: agents take kubesg out of the CNI chain as they stop, then the release.
uninstall_kubesg() {
  log "uninstalling kubesg (cni.uninstall=true, then helm uninstall)"
  "${helm[@]}" upgrade kubesg "$repo/charts/kubesg" -n kube-system --reuse-values \
    --set cni.uninstall=true >/dev/null || true
  kc -n kube-system rollout status daemonset/kubesg-agent --timeout=180s >&2 || true
  "${helm[@]}" uninstall kubesg -n kube-system --wait >&2 || true
  # What the README leaves on the node for the user to remove once no pod set up with kubesg
  # remains (the caller takes the cluster down next). Left behind, cluster.sh check-clean finds
  # it.
  "$here/node-leftovers.sh"
}
if ((dry_run == 0 && kubesg == 1)); then
  helm=(helm --kubeconfig "$kubeconfig")
  ((uninstall == 0)) || trap uninstall_kubesg EXIT
  version=$(sed -n 's/^version = "\(.*\)"/\1/p' "$repo/Cargo.toml" | head -1)
  image="localhost/kubesg:$version"
  log "building and importing $image"
  "$repo/scripts/image.sh" build "$image" >&2
  "$here/cluster.sh" import-image "$image" >&2
  if "${helm[@]}" status kubesg -n kube-system >/dev/null 2>&1; then
    log "upgrading the kubesg release and restarting its pods"
    # --reuse-values keeps the release's other settings; a release installed with
    # operator.networkPolicies=ignore would pass no test, so the suite's setting is set too.
    "${helm[@]}" upgrade kubesg "$repo/charts/kubesg" -n kube-system --reuse-values \
      --set image.repository=localhost/kubesg --set image.tag="$version" \
      --set operator.networkPolicies=enforce >/dev/null
    kc -n kube-system rollout restart deployment/kubesg-operator daemonset/kubesg-agent >/dev/null
  else
    log "installing kubesg (helm install kubesg charts/kubesg -n kube-system)"
    "${helm[@]}" install kubesg "$repo/charts/kubesg" -n kube-system \
      --set image.repository=localhost/kubesg --set image.tag="$version" >/dev/null
  fi
  kc -n kube-system rollout status daemonset/kubesg-agent --timeout=180s >&2 ||
    die "the kubesg agents did not become Ready ('kubectl -n kube-system describe ds/kubesg-agent')"
  # Only the leader of the operator's replicas is Ready (the others refuse agents), so the
  # Deployment's rollout never reports complete: wait for a Ready leader of the current pod
  # template instead (after an upgrade, a leader of the old one stays Ready until replaced; the
  # template's restartedAt, set by `rollout restart`, tells the two apart).
  for ((i = 0; ; i++)); do
    want=$(kc -n kube-system get deployment/kubesg-operator -o json 2>/dev/null | jq -r \
      '.spec.template.metadata.annotations["kubectl.kubernetes.io/restartedAt"] // ""' || true)
    ready=$(kc -n kube-system get pods -o json 2>/dev/null \
      -l app.kubernetes.io/instance=kubesg,app.kubernetes.io/component=operator |
      jq --arg want "$want" '[.items[]
        | select(.metadata.deletionTimestamp == null)
        | select((.metadata.annotations["kubectl.kubernetes.io/restartedAt"] // "") == $want)
        | select(any(.status.conditions[]?; .type == "Ready" and .status == "True"))] | length' ||
      true)
    ((${ready:-0} >= 1)) && break
    ((i < 180)) || die "no kubesg operator became Ready (the leader) within 180 s ('kubectl -n kube-system logs deploy/kubesg-operator')"
    sleep 1
  done
  log "kubesg $version enforces NetworkPolicies ($(kc -n kube-system get deploy/kubesg-operator -o jsonpath='{.spec.template.spec.containers[0].args}' | grep -o -- '--network-policies=[a-z]*'))"
fi

# SCTP: the 3 [Feature:SCTPConnectivity] tests open SCTP sockets in the pods, which needs the
# kernel's sctp module (loaded on demand when it exists). Without it they cannot pass.
if [[ "$sctp" == auto ]]; then
  sctp=0
  if [[ -e /proc/net/sctp ]] || { [[ $EUID -eq 0 ]] && modprobe -q sctp 2>/dev/null && [[ -e /proc/net/sctp ]]; }; then
    sctp=1
  fi
  ((sctp == 1)) || log "this kernel has no SCTP (no /proc/net/sctp, no sctp module): the SCTPConnectivity tests are skipped"
fi
filter="Feature: containsAny NetworkPolicy"
((sctp == 1)) || filter+=" && !Feature: containsAny SCTPConnectivity"
filter="${KUBESG_CONFORMANCE_LABEL_FILTER:-$filter}"

mkdir -p "$report"
rm -rf "$report/ginkgo" "$report"/junit_*.xml "$report/e2e.log"

suite_args=(
  --kubeconfig="$kubeconfig"
  --provider=local                # framework/provider.go: no cloud, as local-up-cluster.sh
  --kubectl-path="$BIN/kubectl"   # the failure dumps call kubectl
  --dns-domain=cluster.local      # cluster.sh's clusterDomain
  --node-os-distro=debian         # anything but windows: UDP/SCTP tests run, Linux timeouts
  # The suite's setup waits for every kube-system pod to be Ready; kubesg's operator replicas
  # that do not lead are never Ready (only the leader serves agents), so it would wait its 10
  # minutes and fail. This script checked the cluster, the agents and the leader above instead.
  --minStartupPods=-1
  --report-dir="$report"          # junit_01.xml
  --report-complete-ginkgo        # ginkgo/report.json (read below) and ginkgo/report.xml
  --report-complete-junit
)
ginkgo_args=(
  --label-filter="$filter"
  --timeout="$timeout"
  --no-color
  --silence-skips # no 'S' for each of the ~7000 specs the filter leaves out
  --v             # each spec's name and result as it runs (e2e.log keeps the rest)
)
if ((dry_run == 1)); then
  ginkgo_args+=(--dry-run)
  nodes=1 # Ginkgo dry-runs in series only
fi

log "e2e.test $KUBERNETES_VERSION, label filter '$filter', $nodes process(es), reports in $report"
rc=0
if ((nodes == 1)); then
  cmd=("$e2e" "${ginkgo_args[@]/#--/--ginkgo.}" "${suite_args[@]}" "${extra[@]}")
else
  cmd=("$BIN/ginkgo" --nodes="$nodes" "${ginkgo_args[@]}" "$e2e" -- "${suite_args[@]}" "${extra[@]}")
fi
# The test binary's output goes to e2e.log whole; the terminal gets Ginkgo's progress lines.
"${cmd[@]}" >"$report/e2e.log" 2>&1 &
pid=$!
{
  tail -n +1 --pid="$pid" -F "$report/e2e.log" 2>/dev/null |
    grep --line-buffered -E '^(\[sig-network\] |• |Ran |SUCCESS!|FAIL!|Summarizing)' || true
} &
progress=$!
# Background jobs of a script ignore SIGINT: pass Ctrl-C (or a TERM) on as SIGTERM, which Ginkgo
# turns into an orderly stop that still writes the reports. A trapped signal ends `wait` early:
# wait again until e2e.test has exited.
trap 'kill -TERM "$pid" 2>/dev/null || true' INT TERM
while :; do
  if wait "$pid"; then rc=0; else rc=$?; fi
  kill -0 "$pid" 2>/dev/null || break
done
wait "$progress" || true
trap - INT TERM

json="$report/ginkgo/report.json"
[[ -s "$json" ]] || die "no report ($json); e2e.test exited with $rc, see $report/e2e.log"

# One line per test: every spec labelled Feature:NetworkPolicy (a skipped one too) and any other
# spec that ran (a wider selection); Ginkgo reports the ~7500 specs the filter left out as
# skipped, and those are not listed. State, duration, full name, first line of the failure.
results=$(jq -r '
  .[].SpecReports[]?
  | select(.LeafNodeType == "It")
  | select(.State != "skipped"
      or ([.ContainerHierarchyLabels[]?[]?, .LeafNodeLabels[]?] | index("Feature:NetworkPolicy")) != null)
  | [.State, ((.RunTime // 0) / 1e9 | floor | tostring),
     ([.ContainerHierarchyTexts[]?, .LeafNodeText] | join(" ")),
     ((.Failure.Message // "") | split("\n") | map(select(length > 0)) | first // "")]
  | @tsv' "$json" | sort -t $'\t' -k3)
passed=0 failed=0 skipped=0
while IFS=$'\t' read -r state secs name why; do
  [[ -n "$name" ]] || continue
  case "$state" in
    passed) ((++passed)); word=$([[ $dry_run == 1 ]] && echo WOULD-RUN || echo PASS) ;;
    skipped | pending) ((++skipped)); word=SKIP ;;
    *) ((++failed)); word="FAIL($state)" ;;
  esac
  if ((dry_run == 1)); then
    printf '%-14s %s\n' "$word" "$name"
  else
    printf '%-14s %5ss  %s\n' "$word" "$secs" "$name"
    [[ "$state" == passed || "$state" == skipped || -z "$why" ]] || printf '%22s%s\n' '' "$why"
  fi
done <<<"$results"

log "JUnit: $report/junit_01.xml (and ginkgo/report.xml); full log: $report/e2e.log"
if ((dry_run == 1)); then
  echo "dry run: $passed would run, $skipped skipped by the filter"
  exit "$rc"
fi
echo "$passed passed, $failed failed, $skipped skipped"
if ((failed > 0)); then exit 1; fi
((rc == 0)) || die "e2e.test exited with $rc although no test failed (the suite's setup, a timeout?), see $report/e2e.log"
((passed > 0)) || die "no NetworkPolicy test ran"
