#!/usr/bin/env bash
# The container image (Dockerfile) without Docker: buildah, the Dockerfile's final stage, no
# registry. Everything it keeps stays under target/image/ (buildah's storage included).
#
#   scripts/image.sh binaries DIR   release kubesg-operator and kubesg-agent, static kubesg-cni,
#                                   into DIR (also what the Dockerfile's build stage runs)
#   scripts/image.sh build [TAG]    the binaries, a runtime base assembled from Debian's
#                                   packages (glibc, libgcc: what gcr.io/distroless/cc-debian12
#                                   holds), then `buildah bud` of the Dockerfile with them
#   scripts/image.sh test [TAG]     runs the image's binaries inside it: kubesg-agent --version,
#                                   kubesg-operator --version, kubesg-cni VERSION
#
# TAG defaults to localhost/kubesg:<workspace version>.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

log() { printf '[image] %s\n' "$*" >&2; }

version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
work=target/image
bah() {
  buildah --root "$PWD/$work/storage" --runroot "$PWD/$work/run" --storage-driver vfs "$@"
}

binaries() {
  local out=$1
  mkdir -p "$out"
  cargo build --release --locked -p kubesg-agent -p kubesg-operator --bins
  # Static (glibc's static-pie): the plugin runs on the node, whatever its C library. It makes
  # no DNS or user lookups, so static glibc has nothing to miss.
  RUSTFLAGS="-C target-feature=+crt-static" cargo build --release --locked -p kubesg-cni \
    --target x86_64-unknown-linux-gnu
  local target=${CARGO_TARGET_DIR:-target}
  cp "$target/release/kubesg-agent" "$target/release/kubesg-operator" \
    "$target/x86_64-unknown-linux-gnu/release/kubesg-cni" "$out/"
  strip "$out"/kubesg-* 2>/dev/null || true
}

# A runtime base equal in content to distroless/cc-debian12: Debian 12's libc6 and libgcc-s1
# (the same versions the binaries were linked against here), passwd/group with root and
# nonroot (65532), /tmp, PATH.
runtime_base() {
  local base=localhost/kubesg-runtime-base:bookworm
  if bah images -q "$base" >/dev/null 2>&1; then
    echo "$base"
    return
  fi
  log "assembling $base from Debian packages"
  local tmp rootfs
  tmp=$(mktemp -d)
  rootfs=$tmp/rootfs
  mkdir -p "$rootfs"/{etc,tmp,usr/local/bin}
  chmod 1777 "$rootfs/tmp"
  (
    cd "$tmp"
    for pkg in libc6 libgcc-s1; do
      apt-get download -q -o APT::Sandbox::User=root \
        "$pkg=$(dpkg-query -W -f='${Version}' "$pkg")" >/dev/null
    done
    for deb in ./*.deb; do dpkg-deb -x "$deb" "$rootfs"; done
  )
  printf 'root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n' \
    > "$rootfs/etc/passwd"
  printf 'root:x:0:\nnonroot:x:65532:\n' > "$rootfs/etc/group"
  printf 'hosts: files dns\n' > "$rootfs/etc/nsswitch.conf"
  local ctr
  ctr=$(bah from scratch)
  bah copy "$ctr" "$rootfs/" / >/dev/null
  bah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --user 65532:65532 "$ctr"
  bah commit -q "$ctr" "$base" >/dev/null
  bah rm "$ctr" >/dev/null
  rm -rf "$tmp"
  echo "$base"
}

build() {
  local tag=${1:-localhost/kubesg:$version}
  local context=$work/context
  rm -rf "$context"
  binaries "$context"
  local base
  base=$(runtime_base)
  log "building $tag (Dockerfile, prebuilt binaries, runtime $base)"
  bah bud -q --isolation chroot --pull=never \
    --build-arg BINARIES=prebuilt --build-arg RUNTIME_IMAGE="$base" \
    -f "$PWD/Dockerfile" -t "$tag" "$context" >/dev/null
  log "built $tag"
}

# Runs a command inside the image (its filesystem, its user) with buildah options before `--`
# (e.g. --env NAME=VALUE: a distroless image has no env(1)) and prints its stdout.
in_image() {
  local tag=$1
  shift
  local opts=()
  while [[ "$1" != -- ]]; do opts+=("$1"); shift; done
  shift
  local ctr out status=0
  ctr=$(bah from --pull=never "$tag")
  out=$(bah run --isolation chroot "${opts[@]}" "$ctr" -- "$@") || status=$?
  bah rm "$ctr" >/dev/null
  printf '%s\n' "$out"
  return $status
}

test_image() {
  local tag=${1:-localhost/kubesg:$version}
  local out
  out=$(in_image "$tag" -- kubesg-agent --version)
  [[ "$out" == "kubesg-agent $version" ]] || { log "kubesg-agent --version: $out"; exit 1; }
  out=$(in_image "$tag" -- kubesg-operator --version)
  [[ "$out" == "kubesg-operator $version" ]] || { log "kubesg-operator --version: $out"; exit 1; }
  out=$(in_image "$tag" --env CNI_COMMAND=VERSION -- kubesg-cni)
  [[ "$out" == *'"supportedVersions":["0.3.0","0.3.1","0.4.0","1.0.0","1.1.0"]'* ]] ||
    { log "kubesg-cni VERSION: $out"; exit 1; }
  local user
  user=$(bah inspect --format '{{.OCIv1.Config.User}}' "$tag")
  [[ "$user" == 65532:65532 ]] || { log "the image's user is $user, not 65532:65532"; exit 1; }
  log "$tag runs: kubesg-agent and kubesg-operator $version, kubesg-cni VERSION; user $user"
}

case "${1:-}" in
  binaries) binaries "${2:?usage: $0 binaries DIR}" ;;
  build) build "${2:-}" ;;
  test) test_image "${2:-}" ;;
  *)
    echo "usage: $0 binaries DIR | build [TAG] | test [TAG]" >&2
    exit 2
    ;;
esac
