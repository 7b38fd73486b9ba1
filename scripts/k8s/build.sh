#!/usr/bin/env bash
# Builds the upstream components of the kubesg test cluster from their Go modules, at the
# versions of scripts/k8s/versions.env, into one folder, and prints that folder on stdout:
#
#   kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy kubectl
#   etcd etcdctl  containerd containerd-shim-runc-v2 ctr  runc
#   agnhost (the e2e test image's binary, k8s.io/kubernetes/test/images/agnhost; cluster.sh
#   puts it into the test cluster's workload image)
#   coredns (the cluster DNS; cluster.sh makes its image)
# and, with --e2e only (opt-in: ~2.7 GB more GOCACHE and minutes of compiling):
#   e2e.test (upstream's end-to-end suite, `go test -c k8s.io/kubernetes/test/e2e`, built as
#   `make WHAT=test/e2e/e2e.test` does) and ginkgo (its CLI, for parallel runs);
#   scripts/k8s/conformance.sh runs them
#
# Usage: scripts/k8s/build.sh [--force] [--e2e]
#   KUBESG_K8S_BIN  the output folder (default ${KUBESG_K8S_DIR:-/var/cache/kubesg/k8s}/<k8s version>/bin)
#   --force         rebuild even when the stamp says the binaries are current
#   --e2e           also build e2e.test and ginkgo (stamp of their own: bin/.stamp-e2e)
#
# Idempotent: when every binary exists and the stamp file records the same versions, the same
# build inputs (this script, versions.env, the go.mod/go.sum files, our main packages) and the
# same Go, it exits at once (with --e2e: when both stamps match). GOMODCACHE and GOCACHE are go's
# defaults unless set, so a rebuild after a change only compiles what changed. Run as root on
# Debian (runc needs libseccomp-dev, which this script installs when it is missing). Logs go to
# stderr.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
log() { printf '[k8s-build] %s\n' "$*" >&2; }

force=0
e2e=0
for arg in "$@"; do
  case "$arg" in
    --force) force=1 ;;
    --e2e) e2e=1 ;;
    *) echo "usage: $0 [--force] [--e2e]" >&2; exit 2 ;;
  esac
done

# shellcheck source=versions.env
source "$here/versions.env"

out="${KUBESG_K8S_BIN:-${KUBESG_K8S_DIR:-/var/cache/kubesg/k8s}/$KUBERNETES_VERSION/bin}"

k8s_bins=(kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy kubectl etcd etcdctl agnhost)
containerd_bins=(containerd ctr)
shim_bins=(containerd-shim-runc-v2)
runc_bins=(runc)
coredns_bins=(coredns)
all_bins=("${k8s_bins[@]}" "${containerd_bins[@]}" "${shim_bins[@]}" "${runc_bins[@]}" "${coredns_bins[@]}")
e2e_bins=(e2e.test ginkgo)

# Go as the machine has it (preinstalled in /usr/local/go; a shell that did not source the
# profile may lack it on PATH).
if ! command -v go >/dev/null && [[ -x /usr/local/go/bin/go ]]; then
  export PATH="$PATH:/usr/local/go/bin"
fi
command -v go >/dev/null || { log "no go command: install Go (1.26.6 or newer)"; exit 1; }

# The machine's Go only (go1.26.8 here; containerd's go.mod wants >= 1.26.6): no silent toolchain
# download. A caller that needs another approved toolchain exports GOTOOLCHAIN itself.
export GOTOOLCHAIN="${GOTOOLCHAIN:-local}"

inputs=(
  "$here/build.sh" "$here/versions.env"
  "$here/kubernetes/go.mod" "$here/kubernetes/go.sum" "$here/kubernetes/etcd/main.go"
  "$here/kubernetes/e2e/e2e.go"
  "$here/containerd/go.mod" "$here/containerd/go.sum"
  "$here/runc/go.mod" "$here/runc/go.sum"
  "$here/coredns/go.mod" "$here/coredns/go.sum"
)
stamp_text() {
  printf 'kubernetes=%s etcd=%s containerd=%s runc=%s coredns=%s\n' \
    "$KUBERNETES_VERSION" "$ETCD_VERSION" "$CONTAINERD_VERSION" "$RUNC_VERSION" "$COREDNS_VERSION"
  printf 'go=%s\n' "$(go env GOVERSION)"
  (cd "$here" && sha256sum "${inputs[@]#"$here/"}")
}

# The e2e binaries have a stamp of their own, so that the cluster's binaries stay current (and
# a run without --e2e returns at once) whether or not e2e.test was ever built.
e2e_stamp_text() {
  stamp_text
  printf 'e2e tags=%s\n' "$e2e_tags"
}
e2e_tags="selinux notest grpcnotrace" # hack/lib/golang.sh: gotags for every non-debug build

current() { # stamp file, stamp text, binaries...
  local stamp="$1" text="$2" b
  shift 2
  [[ -f "$out/$stamp" ]] || return 1
  for b in "$@"; do [[ -x "$out/$b" ]] || return 1; done
  [[ "$(cat "$out/$stamp")" == "$text" ]]
}

need_bins=1 need_e2e=0
if ((force == 0)) && current .stamp "$(stamp_text)" "${all_bins[@]}"; then need_bins=0; fi
if ((e2e == 1)); then
  need_e2e=1
  if ((force == 0)) && current .stamp-e2e "$(e2e_stamp_text)" "${e2e_bins[@]}"; then need_e2e=0; fi
fi
if ((need_bins == 0 && need_e2e == 0)); then
  log "up to date: $out"
  echo "$out"
  exit 0
fi

# versions.env and the go.mod files must agree, or the stamp would lie.
require_line() { # file, module, version
  grep -qE "^[[:space:]]*(require[[:space:]]+)?$2 $3( |$)" "$here/$1" ||
    { log "$1 does not require $2 $3 (versions.env): update one of them"; exit 1; }
}
require_line kubernetes/go.mod k8s.io/kubernetes "$KUBERNETES_VERSION"
require_line kubernetes/go.mod go.etcd.io/etcd/server/v3 "$ETCD_VERSION"
require_line kubernetes/go.mod go.etcd.io/etcd/etcdctl/v3 "$ETCD_VERSION"
require_line containerd/go.mod github.com/containerd/containerd/v2 "$CONTAINERD_VERSION"
require_line runc/go.mod github.com/opencontainers/runc "$RUNC_VERSION"
require_line coredns/go.mod github.com/coredns/coredns "$COREDNS_VERSION"
staging="v0.${KUBERNETES_VERSION#v1.}"
if grep -E '^[[:space:]]*k8s\.io/[a-z-]+ => ' "$here/kubernetes/go.mod" | grep -vq " $staging\$"; then
  log "kubernetes/go.mod replaces a k8s.io staging module with a version other than $staging"
  exit 1
fi

if ! pkg-config --exists libseccomp 2>/dev/null; then
  log "installing libseccomp-dev (runc is built with seccomp support)"
  apt-get update -q >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends libseccomp-dev pkg-config >&2
fi

mkdir -p "$out"
exec 9>"$out/.lock"
flock 9
partial="$out/.partial"
rm -rf "$partial"
mkdir -p "$partial"

# Another developer compiles on the same 2 cores: every go command runs niced.
go_build() { # module folder, then go build arguments
  local dir="$1"
  shift
  nice -n 10 go build -C "$here/$dir" -mod=readonly -buildvcs=false -trimpath -o "$partial/" "$@"
}

# Moves the named binaries from the partial directory into place, refusing a missing one (the
# stamp must never claim a binary that is not there).
move_built() {
  local b
  for b in "$@"; do
    [[ -x "$partial/$b" ]] || { log "go did not produce $b"; exit 1; }
    mv -f "$partial/$b" "$out/$b"
  done
}

start=$SECONDS
# What hack/lib/version.sh stamps, so that kubectl version, the kubelet and the apiserver report
# the release. buildDate stays at its fixed default: a changing value would relink every binary.
k8s_minor="${KUBERNETES_VERSION#v1.}"
k8s_minor="${k8s_minor%%.*}"
version_ldflags=""
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  version_ldflags+=" -X $pkg.gitVersion=$KUBERNETES_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$k8s_minor"
  version_ldflags+=" -X $pkg.gitTreeState=clean"
done
k8s_src="$(cd "$here/kubernetes" && go mod download k8s.io/kubernetes && go list -m -f '{{.Dir}}' k8s.io/kubernetes)"

if ((need_bins == 1)); then
  # agnhost's Makefile stamps main.Version with its VERSION file; no other main package here has
  # a main.Version, and the linker ignores -X for symbols that do not exist.
  k8s_ldflags="-s -w$version_ldflags -X main.Version=$(cat "$k8s_src/test/images/agnhost/VERSION")"
  log "building Kubernetes $KUBERNETES_VERSION (with agnhost) and etcd $ETCD_VERSION"
  # Kubernetes builds its server binaries and kubectl with cgo off (static), and so do we.
  CGO_ENABLED=0 go_build kubernetes -ldflags "$k8s_ldflags" tool ./etcd

  # containerd's Makefile: urfave_cli_no_docs for all, no_grpc and cgo off for the shim. cgo off
  # for containerd too drops only the btrfs snapshotter (overlayfs is what the test cluster uses).
  cd_ldflags="-s -w -X github.com/containerd/containerd/v2/version.Version=$CONTAINERD_VERSION"
  log "building containerd $CONTAINERD_VERSION"
  CGO_ENABLED=0 go_build containerd -tags urfave_cli_no_docs -ldflags "$cd_ldflags" \
    github.com/containerd/containerd/v2/cmd/containerd github.com/containerd/containerd/v2/cmd/ctr
  CGO_ENABLED=0 go_build containerd -tags "urfave_cli_no_docs no_grpc" -ldflags "$cd_ldflags" \
    github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2

  # runc's Makefile: cgo (nsenter), PIE, tags seccomp and urfave_cli_no_docs; we leave out
  # libpathrs (not packaged in bookworm). The version comes from runc's embedded VERSION file.
  log "building runc $RUNC_VERSION"
  CGO_ENABLED=1 go_build runc -buildmode=pie -tags "seccomp urfave_cli_no_docs" -ldflags "-s -w" \
    github.com/opencontainers/runc

  # CoreDNS's Makefile: cgo off, tag grpcnotrace, GitCommit stamped (its version is a constant of
  # coremain). The root package of the module is its main package (coredns.go: every plugin of
  # plugin.cfg, then coremain.Run), built through the `tool` line of coredns/go.mod.
  log "building CoreDNS $COREDNS_VERSION"
  CGO_ENABLED=0 go_build coredns -tags grpcnotrace \
    -ldflags "-s -w -X github.com/coredns/coredns/coremain.GitCommit=$COREDNS_VERSION" tool

  move_built "${all_bins[@]}"
  stamp_text >"$out/.stamp"
  log "built ${#all_bins[@]} binaries in $((SECONDS - start)) s into $out"
fi

if ((need_e2e == 1)); then
  e2e_start=$SECONDS
  # As `make WHAT="test/e2e/e2e.test github.com/onsi/ginkgo/v2/ginkgo"` (hack/lib/golang.sh,
  # non-debug): -trimpath, tags selinux,notest,grpcnotrace, ldflags "all=<version> -s -w";
  # e2e.test through `go test -c`. The packages come from kubernetes/go.mod, whose requirements
  # kubernetes/e2e/e2e.go completes (tidy does not follow a dependency's tests). cgo off like the
  # cluster's Kubernetes binaries, so that the packages they share come from the build cache.
  log "building e2e.test and ginkgo (Kubernetes $KUBERNETES_VERSION)"
  CGO_ENABLED=0 nice -n 10 go test -C "$here/kubernetes" -c -mod=readonly -buildvcs=false -trimpath \
    -tags "$e2e_tags" -ldflags "all=-s -w$version_ldflags" -o "$partial/e2e.test" \
    k8s.io/kubernetes/test/e2e
  CGO_ENABLED=0 go_build kubernetes -tags "$e2e_tags" -ldflags "-s -w" github.com/onsi/ginkgo/v2/ginkgo
  move_built "${e2e_bins[@]}"
  e2e_stamp_text >"$out/.stamp-e2e"
  log "built ${e2e_bins[*]} in $((SECONDS - e2e_start)) s into $out"
fi
rmdir "$partial"
echo "$out"
