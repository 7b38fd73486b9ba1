#!/usr/bin/env bash
# A real one-node Kubernetes cluster on this machine, from the binaries of scripts/k8s/build.sh:
# etcd, kube-apiserver, kube-controller-manager, kube-scheduler, containerd + runc, the kubelet,
# kube-proxy, a bridge CNI network and CoreDNS (the cluster DNS, deployed as kubeadm does). No
# image registry: the pause, agnhost and coredns images are built here with buildah and imported
# into containerd. Run as root.
#
#   cluster.sh up                  start everything, check that pods run and reach each other,
#                                  a Service and the cluster DNS (also from a hostNetwork pod),
#                                  print the admin kubeconfig path (last stdout line)
#   cluster.sh down                stop and remove everything `up` created (also after a failed
#                                  or partial `up`); idempotent
#   cluster.sh status              processes, node and pods
#   cluster.sh check-clean         compare the host with the snapshot `up` took before it
#                                  changed anything (links, netns, iptables/nft, mounts, CNI
#                                  files, cgroups, sysctls, processes, files); exit 1 on a diff
#   cluster.sh smoke               run the pod/Service check of `up` again
#   cluster.sh images              build the pause, agnhost and coredns image archives (cached)
#   cluster.sh import-image X      import X into the cluster's containerd: a docker/OCI archive
#                                  file, or a tag in scripts/image.sh's buildah storage (e.g.
#                                  localhost/kubesg:0.1.0)
#
# Environment:
#   KUBESG_CLUSTER_DIR       state dir: PKI, configs, etcd, containerd, kubelet, logs
#                            (default /var/lib/kubesg-cluster)
#   KUBESG_CLUSTER_SNAPSHOT  where `up` stores the before-up snapshot (kept after `down`, for
#                            check-clean; default /var/cache/kubesg/cluster-snapshot)
#   KUBESG_CLUSTER_IPV6      auto (default: dual-stack when the node has a global IPv6 address
#                            on its primary interface), 1 or 0
#   KUBESG_PROXY_MODE        iptables (default) or nftables
#   KUBESG_NODE_NAME         default: hostname
#   KUBESG_BUILDAH_ROOT / KUBESG_BUILDAH_RUNROOT   buildah storage for import-image
#                            (default: scripts/image.sh's, target/image/{storage,run})
set -euo pipefail -o errtrace # errtrace: up's ERR trap also fires inside functions

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
# shellcheck source=versions.env
source "$here/versions.env"

log() { printf '[cluster %3ds] %s\n' "$SECONDS" "$*" >&2; }

DIR="${KUBESG_CLUSTER_DIR:-/var/lib/kubesg-cluster}"
DIR="${DIR%/}"
SNAP="${KUBESG_CLUSTER_SNAPSHOT:-/var/cache/kubesg/cluster-snapshot}"
IMAGES="${KUBESG_K8S_DIR:-/var/cache/kubesg/k8s}/$KUBERNETES_VERSION/images"
PROXY_MODE="${KUBESG_PROXY_MODE:-iptables}"
NODE_NAME="${KUBESG_NODE_NAME:-$(hostname | tr '[:upper:]' '[:lower:]')}"

PKI="$DIR/pki"
CONF="$DIR/config"
LOGS="$DIR/logs"
RUN="$DIR/run"
KUBECONFIG_ADMIN="$DIR/kubeconfig"
SOCK="$DIR/containerd/containerd.sock"
# Shim sockets: containerd refuses a socket_dir longer than 42 characters (unix socket paths are
# short), so this cannot hide deeper in the tree.
SHIM_SOCKETS="$DIR/containerd/s"

# Addresses: all private, all on this machine.
CLUSTER_CIDR4=10.244.0.0/16 # the controller-manager gives the node the first /24 of it
POD_CIDR4=10.244.0.0/24
SVC_CIDR4=10.96.0.0/16
API_SVC_IP=10.96.0.1
CLUSTER_CIDR6=fd00:10:244::/56 # ULA; the node gets the first /64
POD_CIDR6=fd00:10:244::/64
SVC_CIDR6=fd00:10:96::/112
# The cluster DNS Service (kube-system/kube-dns): kubeadm's choice, the 10th address of the range
DNS_SVC_IP=10.96.0.10
DNS_SVC_IP6=fd00:10:96::a
CLUSTER_DOMAIN=cluster.local
API_PORT=6443
ETCD_CLIENT_PORT=2379
ETCD_PEER_PORT=2380

CNI_NET=kubesg-bridge
CNI_BRIDGE=kubesg0
CNI_CONFLIST=/etc/cni/net.d/10-kubesg-bridge.conflist
CNI_BIN=/opt/cni/bin
CNI_PLUGINS=(bridge host-local loopback portmap)
CNI_SRC=/usr/lib/cni # Debian's containernetworking-plugins

AGNHOST_VERSION="" # set by images()
PAUSE_IMAGE=""
AGNHOST_IMAGE=""
COREDNS_IMAGE="registry.k8s.io/coredns/coredns:$COREDNS_VERSION"

# The kernel settings the components change (the bridge plugin: forwarding; the kubelet, unless
# protectKernelDefaults: panic, overcommit, keys; kube-proxy: conntrack, route_localnet). The
# snapshot records them and `down` puts the recorded values back.
SYSCTLS=(
  net.ipv4.ip_forward net.ipv6.conf.all.forwarding net.ipv6.conf.default.forwarding
  net.ipv4.conf.all.route_localnet net.bridge.bridge-nf-call-iptables
  net.bridge.bridge-nf-call-ip6tables kernel.panic kernel.panic_on_oops vm.overcommit_memory
  vm.panic_on_oom kernel.keys.root_maxkeys kernel.keys.root_maxbytes net.netfilter.nf_conntrack_max
  net.netfilter.nf_conntrack_tcp_timeout_established
  net.netfilter.nf_conntrack_tcp_timeout_close_wait net.netfilter.nf_conntrack_tcp_be_liberal
)

# sbin folders for iptables, ip, sysctl, ... (also for the CNI plugins containerd runs); the
# caller's PATH after them (go, for build.sh)
export PATH="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:$PATH"

# ---------------------------------------------------------------------------------------------
# helpers

current="" # the component being started or waited for: its log tail is printed on failure

die() {
  log "ERROR: $*"
  if [[ -n "$current" && -f "$LOGS/$current.log" ]]; then
    log "last lines of $LOGS/$current.log:"
    tail -n 30 "$LOGS/$current.log" | cut -c1-400 | sed 's/^/    /' >&2
  fi
  log "logs: $LOGS; clean up with: $0 down"
  exit 1
}

on_error() { die "command failed (line $1): $2"; }

need_root() { [[ $EUID -eq 0 ]] || { echo "cluster.sh must run as root" >&2; exit 1; }; }

kc() { "$BIN/kubectl" --kubeconfig "$KUBECONFIG_ADMIN" "$@"; }

# PIDs of our daemons: one of the cluster's programs whose command line names a path in the
# cluster dir, as every daemon we start does (its config, data dir or socket) and containerd's
# shims (-address). Other users of the same binaries (a test's own etcd) and clients (kubectl,
# a `tail -f` of a log) never match.
DAEMONS=" etcd kube-apiserver kube-controller-manager kube-scheduler containerd containerd-shim-runc-v2 runc kubelet kube-proxy "
our_pids() {
  local p exe
  for p in /proc/[0-9]*; do
    p=${p#/proc/}
    exe=$(readlink "/proc/$p/exe" 2>/dev/null) || continue
    exe=${exe% (deleted)} # a binary that build.sh replaced since
    [[ "$DAEMONS" == *" ${exe##*/} "* ]] || continue
    tr '\0' ' ' 2>/dev/null <"/proc/$p/cmdline" | grep -qF -- "$DIR/" && echo "$p"
  done
  return 0
}

# PIDs in the kubelet's pod cgroups (the containers: pause, agnhost, ...), in any hierarchy.
pod_pids() {
  # (find fails when a cgroup goes away under it: not an error here)
  { find /sys/fs/cgroup -path '*kubepods*' -name cgroup.procs -exec cat {} + 2>/dev/null || true; } | sort -u
}

alive() { # component name: its pid file names a live process of ours
  local pid
  pid=$(cat "$RUN/$1.pid" 2>/dev/null) || return 1
  tr '\0' ' ' 2>/dev/null <"/proc/$pid/cmdline" | grep -qF -- "$DIR/"
}

# Starts a daemon in its own session (it outlives this script), logs to $LOGS/NAME.log.
# Returns once the daemon's program runs: until the forked shell has exec'd it, its command line
# is this script's, which `alive` would take for a daemon that exited (a first health check that
# fails fast, as curl on a closed port does, could read it then: CI saw "kube-proxy exited"
# with an empty log).
start() { # name, command...
  local name=$1 pid i
  shift
  current=$name
  log "starting $name"
  setsid "$@" >>"$LOGS/$name.log" 2>&1 </dev/null &
  pid=$!
  echo "$pid" >"$RUN/$name.pid"
  # A failed exec ends the child (gone, or a zombie until bash reaps it): 10 s bound the wait.
  for ((i = 0; i < 1000; i++)); do
    alive "$name" && return 0
    [[ "$(ps -o stat= -p "$pid" 2>/dev/null)" == [^Z]* ]] || return 0
    sleep 0.01
  done
}

wait_until() { # what, timeout seconds, command...: polls the command, watches $current
  local what=$1 timeout=$2
  shift 2
  local deadline=$((SECONDS + timeout))
  until "$@" >/dev/null 2>&1; do
    if [[ -n "$current" ]] && ! alive "$current"; then die "$current exited while waiting for $what"; fi
    ((SECONDS < deadline)) || die "timed out after ${timeout}s waiting for $what"
    sleep 0.5
  done
}

bins() {
  # build.sh returns at once when its stamp matches; otherwise it builds (minutes).
  BIN="$("$here/build.sh")"
}

primary_dev() { ip -4 -o route show default | awk '{for (i = 1; i < NF; i++) if ($i == "dev") { print $(i + 1); exit }}'; }

detect_node() {
  local dev
  dev=$(primary_dev)
  [[ -n "$dev" ]] || dev=$(ip -4 -o addr show scope global | awk '{print $2; exit}')
  [[ -n "$dev" ]] || die "no IPv4 interface with a global address"
  NODE_DEV=$dev
  NODE_IP=$(ip -4 -o addr show dev "$dev" scope global | awk '{sub("/.*", "", $4); print $4; exit}')
  NODE_IP6=$(ip -6 -o addr show dev "$dev" scope global -tentative -deprecated -dadfailed |
    awk '{sub("/.*", "", $4); print $4; exit}')
  case "${KUBESG_CLUSTER_IPV6:-auto}" in
    0) IPV6=0 ;;
    1) [[ -n "$NODE_IP6" ]] || die "KUBESG_CLUSTER_IPV6=1 but $dev has no global IPv6 address"; IPV6=1 ;;
    *) if [[ -n "$NODE_IP6" ]]; then IPV6=1; else IPV6=0; fi ;;
  esac
  if ((IPV6)); then
    NODE_IPS="$NODE_IP,$NODE_IP6"
    SVC_CIDRS="$SVC_CIDR4,$SVC_CIDR6"
    CLUSTER_CIDRS="$CLUSTER_CIDR4,$CLUSTER_CIDR6"
  else
    NODE_IPS="$NODE_IP"
    SVC_CIDRS="$SVC_CIDR4"
    CLUSTER_CIDRS="$CLUSTER_CIDR4"
  fi
}

# ---------------------------------------------------------------------------------------------
# snapshot / check-clean

# Writes the host state `down` must restore into $1, one file per aspect. Volatile details
# (counters, interface indexes, handles) are stripped so that equal states compare equal.
snapshot() {
  local out=$1
  mkdir -p "$out"
  ip -o link show | awk -F': ' '{sub("@.*", "", $2); print $2}' | sort >"$out/links"
  # Only cni-* namespaces (containerd's) and their mounts: other jobs here make namespaces too.
  ip netns list | awk '$1 ~ /^cni-/ {print $1}' | sort >"$out/netns"
  iptables-save 2>/dev/null | sed -E '/^#/d; s/\[[0-9]+:[0-9]+\]/[-]/' >"$out/iptables"
  ip6tables-save 2>/dev/null | sed -E '/^#/d; s/\[[0-9]+:[0-9]+\]/[-]/' >"$out/ip6tables"
  nft list ruleset 2>/dev/null | sed -E 's/counter packets [0-9]+ bytes [0-9]+/counter/' >"$out/nft"
  findmnt -rn -o TARGET,FSTYPE,PROPAGATION | grep -Ev '^/run/netns/[^c]|^/run/netns/c[^n]' | sort >"$out/mounts"
  # (find fails on the folders that do not exist)
  { find /etc/cni /opt/cni /var/lib/cni /run/netns -printf '%p %s\n' 2>/dev/null || true; } |
    grep -Ev '^/run/netns/[^c]|^/run/netns/c[^n]' | sort >"$out/cni-files"
  # depth 2: /sys/fs/cgroup/<hierarchy>/<top-level cgroup>, where the kubelet puts kubepods
  { find /sys/fs/cgroup -mindepth 2 -maxdepth 2 -type d 2>/dev/null || true; } | sort >"$out/cgroups"
  local key
  for key in "${SYSCTLS[@]}" "net.ipv4.conf.$(primary_dev).forwarding" \
    "net.ipv6.conf.$(primary_dev).forwarding"; do
    sysctl -e "$key" 2>/dev/null
  done >"$out/sysctls"
  {
    local p
    for p in $(our_pids; pod_pids); do
      printf '%s %s\n' "$(readlink "/proc/$p/exe" 2>/dev/null)" "$(tr '\0' ' ' 2>/dev/null <"/proc/$p/cmdline")"
    done
    return 0
  } | sort -u >"$out/processes"
  # Top-level entries of the places daemons like to leave things (the kubelet's
  # /var/log/containers, containerd's /run/containerd and /opt/containerd, NRI's /var/run/nri, ...).
  find /run /var/lib /var/log /opt /etc -mindepth 1 -maxdepth 1 2>/dev/null | sort >"$out/files" || true
  echo "$DIR" >"$out/cluster-dir"
}

check_clean() {
  [[ -d "$SNAP" ]] || { log "no snapshot at $SNAP (taken by up)"; exit 1; }
  local now
  now=$(mktemp -d)
  snapshot "$now"
  local f dirty=0
  for f in "$SNAP"/*; do
    f=$(basename "$f")
    if ! diff -u "$SNAP/$f" "$now/$f" >"$now/$f.diff"; then
      dirty=1
      log "differs from before up: $f"
      sed 's/^/    /' "$now/$f.diff" >&2
    fi
  done
  rm -rf "$now"
  if ((dirty)); then
    log "NOT clean (compared with $SNAP)"
    return 1
  fi
  log "clean: links, netns, iptables, ip6tables, nft, mounts, CNI files, cgroups, sysctls," \
    "processes and files equal the snapshot taken before up"
}

# ---------------------------------------------------------------------------------------------
# PKI

# A key and a certificate signed by the cluster CA. ECDSA P-256 (fast; every component accepts it).
new_ca() { # name, common name: a self-signed CA, 10 years
  local n=$1 cn=$2
  openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$PKI/$n.key" 2>/dev/null
  chmod 600 "$PKI/$n.key"
  cat >"$PKI/$n.cnf" <<EOF
[req]
distinguished_name = dn
prompt = no
[dn]
CN = $cn
[v3_ca]
basicConstraints = critical,CA:TRUE
keyUsage = critical,digitalSignature,keyCertSign,cRLSign
subjectKeyIdentifier = hash
EOF
  openssl req -x509 -new -config "$PKI/$n.cnf" -extensions v3_ca -key "$PKI/$n.key" \
    -days 3650 -sha256 -out "$PKI/$n.crt" 2>/dev/null
  rm -f "$PKI/$n.cnf"
}

sign() { # name, subject (/CN=../O=..), extendedKeyUsage, [subjectAltName], [CA name, default ca]
  local n=$1 subj=$2 eku=$3 san=${4:-} ca=${5:-ca}
  openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$PKI/$n.key" 2>/dev/null
  chmod 600 "$PKI/$n.key"
  {
    echo "basicConstraints = critical,CA:FALSE"
    echo "keyUsage = critical,digitalSignature"
    echo "extendedKeyUsage = $eku"
    echo "subjectKeyIdentifier = hash"
    echo "authorityKeyIdentifier = keyid"
    [[ -z "$san" ]] || echo "subjectAltName = $san"
  } >"$PKI/$n.ext"
  openssl req -new -key "$PKI/$n.key" -subj "$subj" -out "$PKI/$n.csr" 2>/dev/null
  openssl x509 -req -in "$PKI/$n.csr" -CA "$PKI/$ca.crt" -CAkey "$PKI/$ca.key" \
    -set_serial "0x$(openssl rand -hex 16)" -days 365 -sha256 -extfile "$PKI/$n.ext" \
    -out "$PKI/$n.crt" 2>/dev/null
  rm -f "$PKI/$n.csr" "$PKI/$n.ext"
}

kubeconfig() { # file, user name, cert name (in $PKI), server
  local f=$1 user=$2 cert=$3 server=$4
  cat >"$f" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: kubesg
  cluster:
    server: $server
    certificate-authority-data: $(base64 -w0 "$PKI/ca.crt")
users:
- name: $user
  user:
    client-certificate-data: $(base64 -w0 "$PKI/$cert.crt")
    client-key-data: $(base64 -w0 "$PKI/$cert.key")
contexts:
- name: kubesg
  context:
    cluster: kubesg
    user: $user
current-context: kubesg
EOF
  chmod 600 "$f"
}

pki() {
  log "generating PKI in $PKI"
  mkdir -p "$PKI" "$DIR/kubeconfigs"
  chmod 700 "$PKI"
  new_ca ca kubesg-cluster-ca
  # The aggregation layer's own CA (as kubeadm's front-proxy-ca): the apiserver proves to
  # aggregated API servers which user it forwards; the controller-manager and scheduler read the
  # CA from kube-system/extension-apiserver-authentication and complain when it is missing.
  new_ca front-proxy-ca kubesg-front-proxy-ca
  sign front-proxy-client "/CN=front-proxy-client" clientAuth "" front-proxy-ca

  local api_sans="DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc"
  api_sans+=",DNS:kubernetes.default.svc.cluster.local,DNS:localhost,DNS:$NODE_NAME"
  api_sans+=",IP:127.0.0.1,IP:$NODE_IP,IP:$API_SVC_IP"
  local node_sans="DNS:$NODE_NAME,DNS:localhost,IP:127.0.0.1,IP:$NODE_IP"
  if ((IPV6)); then
    api_sans+=",IP:::1,IP:$NODE_IP6,IP:${SVC_CIDR6%%/*}1"
    node_sans+=",IP:::1,IP:$NODE_IP6"
  fi
  sign apiserver "/CN=kube-apiserver" serverAuth "$api_sans"
  # what the apiserver shows the kubelet (logs, exec, port-forward): system:masters
  sign apiserver-kubelet-client "/CN=kube-apiserver-kubelet-client/O=system:masters" clientAuth
  sign apiserver-etcd-client "/CN=kube-apiserver-etcd-client" clientAuth
  sign etcd-server "/CN=etcd" serverAuth,clientAuth "DNS:localhost,IP:127.0.0.1"
  sign admin "/CN=kubernetes-admin/O=system:masters" clientAuth
  sign controller-manager "/CN=system:kube-controller-manager" clientAuth
  sign scheduler "/CN=system:kube-scheduler" clientAuth
  # the Node authorizer and NodeRestriction know the kubelet by this name and group
  sign kubelet "/CN=system:node:$NODE_NAME/O=system:nodes" clientAuth
  sign kubelet-server "/CN=$NODE_NAME" serverAuth "$node_sans"
  sign kube-proxy "/CN=system:kube-proxy" clientAuth
  # service-account token signing key pair (RSA: what every token consumer expects)
  openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$PKI/sa.key" 2>/dev/null
  chmod 600 "$PKI/sa.key"
  openssl pkey -in "$PKI/sa.key" -pubout -out "$PKI/sa.pub" 2>/dev/null

  local server="https://127.0.0.1:$API_PORT"
  kubeconfig "$KUBECONFIG_ADMIN" kubernetes-admin admin "$server"
  kubeconfig "$DIR/kubeconfigs/controller-manager.conf" system:kube-controller-manager controller-manager "$server"
  kubeconfig "$DIR/kubeconfigs/scheduler.conf" system:kube-scheduler scheduler "$server"
  kubeconfig "$DIR/kubeconfigs/kubelet.conf" "system:node:$NODE_NAME" kubelet "$server"
  kubeconfig "$DIR/kubeconfigs/kube-proxy.conf" system:kube-proxy kube-proxy "$server"
}

# ---------------------------------------------------------------------------------------------
# images (built here: there is no registry to pull from)

k8s_src() { (cd "$here/kubernetes" && go mod download k8s.io/kubernetes && go list -m -f '{{.Dir}}' k8s.io/kubernetes); }

# Three archives, cached in $IMAGES and rebuilt only when their inputs change:
#   registry.k8s.io/pause:<tag>  build/pause/linux/pause.c of the release, static, as upstream
#                                (FROM scratch, USER 65535, ENTRYPOINT /pause): the sandbox image
#   registry.k8s.io/e2e-test-images/agnhost:<VERSION>  the static agnhost of build.sh (upstream
#                                adds Alpine tools; this one is the binary alone)
#   registry.k8s.io/coredns/coredns:<COREDNS_VERSION>  the static coredns of build.sh, as
#                                upstream's Dockerfile has it (distroless static, USER nonroot
#                                65532, /coredns with file capability cap_net_bind_service)
# The upstream names make e2e (and kubeadm) manifests work unchanged with imagePullPolicy
# IfNotPresent.
images() {
  local src pause_tag
  src=$(k8s_src)
  AGNHOST_VERSION=$(cat "$src/test/images/agnhost/VERSION")
  pause_tag=$(sed -n 's/^TAG ?= *//p' "$src/build/pause/Makefile")
  PAUSE_IMAGE="registry.k8s.io/pause:$pause_tag"
  AGNHOST_IMAGE="registry.k8s.io/e2e-test-images/agnhost:$AGNHOST_VERSION"
  local stamp
  stamp=$(
    echo "$PAUSE_IMAGE $AGNHOST_IMAGE $COREDNS_IMAGE $(gcc --version | head -1) $(buildah --version)"
    sha256sum "$src/build/pause/linux/pause.c" "$BIN/agnhost" "$BIN/coredns"
    sed -n '/^images() {/,/^}/p' "${BASH_SOURCE[0]}" | sha256sum
  )
  if [[ -f "$IMAGES/pause.tar" && -f "$IMAGES/agnhost.tar" && -f "$IMAGES/coredns.tar" &&
    "$(cat "$IMAGES/.stamp" 2>/dev/null)" == "$stamp" ]]; then
    return 0
  fi
  log "building images $PAUSE_IMAGE, $AGNHOST_IMAGE and $COREDNS_IMAGE"
  mkdir -p "$IMAGES"
  local work
  work=$(mktemp -d "$IMAGES/build.XXXXXX")
  # buildah with its own throw-away storage: only the archives are kept
  bah() { buildah --root "$work/storage" --runroot "$work/run" --storage-driver vfs "$@"; }

  mkdir -p "$work/pause"
  gcc -Os -Wall -Werror -static -DVERSION="v$pause_tag-kubesg" -o "$work/pause/pause" \
    "$src/build/pause/linux/pause.c"
  local c
  c=$(bah from scratch)
  bah copy "$c" "$work/pause/pause" /pause >/dev/null
  bah config --user 65535:65535 --entrypoint '["/pause"]' --os linux --arch amd64 "$c"
  bah commit -q "$c" "$PAUSE_IMAGE" >/dev/null
  bah rm "$c" >/dev/null
  rm -f "$IMAGES/pause.tar"
  bah push -q "$PAUSE_IMAGE" "docker-archive:$IMAGES/pause.tar:$PAUSE_IMAGE" >/dev/null

  # /tmp and /uploads (netexec's upload dir) as upstream; /etc/passwd for tools that look up uids
  mkdir -p "$work/agnhost/etc" "$work/agnhost/tmp" "$work/agnhost/uploads"
  chmod 1777 "$work/agnhost/tmp"
  cp "$BIN/agnhost" "$work/agnhost/agnhost"
  ln -s agnhost "$work/agnhost/agnhost-2"
  printf 'root:x:0:0:root:/root:/sbin/nologin\nnobody:x:65534:65534:nobody:/:/sbin/nologin\n' >"$work/agnhost/etc/passwd"
  printf 'root:x:0:\nnogroup:x:65534:\n' >"$work/agnhost/etc/group"
  c=$(bah from scratch)
  bah copy "$c" "$work/agnhost/" / >/dev/null
  bah config --entrypoint '["/agnhost"]' --cmd '["pause"]' --port 80 --port 8080 --port 8081 \
    --port 9376 --port 5000 --os linux --arch amd64 "$c"
  bah commit -q "$c" "$AGNHOST_IMAGE" >/dev/null
  bah rm "$c" >/dev/null
  rm -f "$IMAGES/agnhost.tar"
  bah push -q "$AGNHOST_IMAGE" "docker-archive:$IMAGES/agnhost.tar:$AGNHOST_IMAGE" >/dev/null

  # upstream: gcr.io/distroless/static-debian12:nonroot + /coredns (setcap cap_net_bind_service
  # =+ep: the non-root process binds port 53; the Deployment adds NET_BIND_SERVICE to its
  # capability sets, the file capability makes it effective across execve). Distroless' passwd,
  # group and /tmp; no CA bundle (the kubernetes plugin uses the ServiceAccount's ca.crt).
  mkdir -p "$work/coredns/etc" "$work/coredns/tmp"
  chmod 1777 "$work/coredns/tmp"
  cp "$BIN/coredns" "$work/coredns/coredns"
  setcap cap_net_bind_service=+ep "$work/coredns/coredns"
  printf 'root:x:0:0:root:/root:/sbin/nologin\nnobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n' >"$work/coredns/etc/passwd"
  printf 'root:x:0:\nnobody:x:65534:\nnonroot:x:65532:\n' >"$work/coredns/etc/group"
  c=$(bah from scratch)
  bah copy "$c" "$work/coredns/" / >/dev/null
  bah config --user 65532:65532 --workingdir / --entrypoint '["/coredns"]' --port 53 --port 53/udp \
    --os linux --arch amd64 "$c"
  bah commit -q "$c" "$COREDNS_IMAGE" >/dev/null
  bah rm "$c" >/dev/null
  rm -f "$IMAGES/coredns.tar"
  bah push -q "$COREDNS_IMAGE" "docker-archive:$IMAGES/coredns.tar:$COREDNS_IMAGE" >/dev/null
  # the capability must have survived buildah's copy and the archive (or CoreDNS cannot bind 53)
  tar -xOf "$IMAGES/coredns.tar" "$(tar -xOf "$IMAGES/coredns.tar" manifest.json | jq -r '.[0].Layers[-1]')" |
    { mkdir "$work/check" && tar --xattrs --xattrs-include='security.*' -xf - -C "$work/check" coredns; }
  getcap "$work/check/coredns" | grep -q cap_net_bind_service ||
    die "the coredns image lost the file capability of /coredns (buildah copy dropped the xattr)"
  rm -rf "$work"
  echo "$stamp" >"$IMAGES/.stamp"
}

ctr_() { "$BIN/ctr" --address "$SOCK" -n k8s.io "$@"; }

import_archive() { # file; ctr's progress output goes to $LOGS/ctr-import.log
  local out
  out=$(ctr_ images import --platform linux/amd64 "$1" 2>&1) ||
    { printf '%s\n' "$out" >&2; die "ctr images import $1 failed"; }
  printf '%s\n' "$out" >>"$LOGS/ctr-import.log"
  log "imported $(tar -xOf "$1" manifest.json 2>/dev/null | jq -r '[.[].RepoTags[]?] | join(" ")' || echo "$1")"
}

# import-image: an archive file, or a tag in scripts/image.sh's buildah storage
import_image() {
  local what=$1
  [[ -S "$SOCK" ]] || die "containerd is not running (no $SOCK): run $0 up first"
  if [[ -f "$what" ]]; then
    import_archive "$what"
    return
  fi
  local root="${KUBESG_BUILDAH_ROOT:-$repo/target/image/storage}"
  local runroot="${KUBESG_BUILDAH_RUNROOT:-$repo/target/image/run}"
  # (checked first: buildah would create an empty storage there)
  [[ -d "$root" ]] || die "$what is not a file, and there is no buildah storage at $root"
  local tmp
  tmp=$(mktemp -d)
  log "exporting $what from buildah storage $root"
  buildah --root "$root" --runroot "$runroot" --storage-driver vfs push -q "$what" \
    "docker-archive:$tmp/image.tar:$what" >/dev/null ||
    { rm -rf "$tmp"; die "buildah push $what failed (not a file, and not a tag in $root)"; }
  import_archive "$tmp/image.tar"
  rm -rf "$tmp"
}

# ---------------------------------------------------------------------------------------------
# CNI

# Copies the reference plugins and writes the conflist; every file or folder created is listed
# in $DIR/cni-installed so that `down` removes exactly those.
cni_install() {
  local manifest="$DIR/cni-installed"
  : >>"$manifest"
  local d
  for d in /opt/cni "$CNI_BIN" /etc/cni /etc/cni/net.d; do
    if [[ ! -d "$d" ]]; then mkdir "$d" && echo "$d" >>"$manifest"; fi
  done
  local p
  for p in "${CNI_PLUGINS[@]}"; do
    if [[ -e "$CNI_BIN/$p" ]]; then
      cmp -s "$CNI_SRC/$p" "$CNI_BIN/$p" || log "keeping the existing $CNI_BIN/$p (not Debian's)"
      continue
    fi
    cp "$CNI_SRC/$p" "$CNI_BIN/$p"
    echo "$CNI_BIN/$p" >>"$manifest"
  done
  # `up` ran `down` before, so an existing conflist is someone else's (or left by a lost cluster dir)
  [[ ! -e "$CNI_CONFLIST" ]] || die "$CNI_CONFLIST exists and was not written by this cluster: remove it"
  local ranges='[{"subnet": "'$POD_CIDR4'"}]' routes='{"dst": "0.0.0.0/0"}'
  if ((IPV6)); then
    ranges+=', [{"subnet": "'$POD_CIDR6'"}]'
    routes+=', {"dst": "::/0"}'
  fi
  # bridge: isGateway (the bridge holds the pods' gateway addresses), ipMasq (pod traffic leaving
  # the node is masqueraded), hairpinMode (a pod reaches itself through its Service)
  cat >"$CNI_CONFLIST" <<EOF
{
  "cniVersion": "1.0.0",
  "name": "$CNI_NET",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "$CNI_BRIDGE",
      "isGateway": true,
      "ipMasq": true,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local",
        "ranges": [$ranges],
        "routes": [$routes]
      }
    },
    { "type": "portmap", "capabilities": { "portMappings": true } }
  ]
}
EOF
  grep -qxF "$CNI_CONFLIST" "$manifest" || echo "$CNI_CONFLIST" >>"$manifest"
}

# ---------------------------------------------------------------------------------------------
# up

write_configs() {
  mkdir -p "$CONF"
  # containerd 2.x (config version 3). Every path under the cluster dir, so that a second
  # containerd on the host is not disturbed and `down` finds everything: root, state, sockets,
  # shim sockets, runc's state (Root). NRI is off (it would create /var/run/nri, /opt/nri).
  cat >"$CONF/containerd.toml" <<EOF
version = 3
root = "$DIR/containerd/root"
state = "$DIR/containerd/state"
disabled_plugins = ["io.containerd.nri.v1.nri"]

[grpc]
  address = "$SOCK"

[ttrpc]
  address = "$SOCK.ttrpc"

[debug]
  address = ""

[plugins."io.containerd.internal.v1.opt"]
  path = "$DIR/containerd/opt"

[plugins."io.containerd.shim.v1.manager"]
  socket_dir = "$SHIM_SOCKETS"

[plugins."io.containerd.cri.v1.images"]
  snapshotter = "overlayfs"
  [plugins."io.containerd.cri.v1.images".pinned_images]
    sandbox = "$PAUSE_IMAGE"

# restrict_oom_score_adj: this machine withholds CAP_SYS_RESOURCE even from root, so runc cannot
# give the sandbox (pause) its oom_score_adj of -998 ("failed to update /proc/self/oom_score_adj:
# Permission denied"); containers get max(requested, containerd's own score) instead.
[plugins."io.containerd.cri.v1.runtime"]
  restrict_oom_score_adj = true
  [plugins."io.containerd.cri.v1.runtime".cni]
    bin_dirs = ["$CNI_BIN"]
    conf_dir = "/etc/cni/net.d"
  [plugins."io.containerd.cri.v1.runtime".containerd]
    default_runtime_name = "runc"
    [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc.options]
        BinaryName = "$BIN/runc"
        Root = "$DIR/containerd/runc"
        SystemdCgroup = false
EOF

  # The kubelet. failCgroupV1: false because Kubernetes >= 1.35 refuses cgroup v1 by default
  # and this machine mounts only v1 controllers (the cgroup2 "unified" mount has none of them).
  # cgroupfs: PID 1 is not systemd. Image GC off: nothing could pull an image back.
  # Eviction thresholds absolute and low: the disk is shared with builds and the caches they
  # leave (tens of GB), so the default percentages (10%, 15% of capacity; even 2% of 252 GB is
  # 5 GB) evicted test pods on a CI machine with plenty left for the tests themselves.
  cat >"$CONF/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
failCgroupV1: false
cgroupDriver: cgroupfs
# no CAP_SYS_RESOURCE here: the default -999 cannot be written (the kubelet only logs that)
oomScoreAdj: 0
containerRuntimeEndpoint: unix://$SOCK
authentication:
  anonymous:
    enabled: false
  webhook:
    enabled: true
  x509:
    clientCAFile: $PKI/ca.crt
authorization:
  mode: Webhook
tlsCertFile: $PKI/kubelet-server.crt
tlsPrivateKeyFile: $PKI/kubelet-server.key
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
# the cluster DNS (CoreDNS, Service kube-system/kube-dns); its own pods use dnsPolicy Default,
# the node's resolv.conf, which it forwards the other names to
clusterDNS: [$DNS_SVC_IP]
clusterDomain: $CLUSTER_DOMAIN
resolvConf: /etc/resolv.conf
podLogsDir: $DIR/pod-logs
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard:
  memory.available: 100Mi
  nodefs.available: 256Mi
  imagefs.available: 256Mi
  nodefs.inodesFree: "1%"
  imagefs.inodesFree: "1%"
EOF

  # kube-proxy. localhostNodePorts off: it would set net.ipv4.conf.all.route_localnet=1.
  # conntrack zeros: leave the host's conntrack sysctls alone.
  cat >"$CONF/kube-proxy.yaml" <<EOF
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection:
  kubeconfig: $DIR/kubeconfigs/kube-proxy.conf
mode: $PROXY_MODE
clusterCIDR: $CLUSTER_CIDRS
hostnameOverride: $NODE_NAME
bindAddress: 0.0.0.0
healthzBindAddress: 127.0.0.1:10256
metricsBindAddress: 127.0.0.1:10249
nodePortAddresses: [primary] # the node's IPs (what kube-proxy recommends), not every local one
iptables:
  localhostNodePorts: false
oomScoreAdj: 0 # no CAP_SYS_RESOURCE here for the default -999
conntrack:
  maxPerCore: 0
  tcpEstablishedTimeout: 0s
  tcpCloseWaitTimeout: 0s
EOF
}

port_free() { ! ss -Htln "sport = :$1" | grep -q .; }

preflight() {
  local t
  for t in openssl buildah gcc iptables ip6tables nft ss findmnt conntrack; do
    command -v "$t" >/dev/null || die "$t is missing (apt-get install openssl buildah gcc iptables nftables iproute2 util-linux conntrack)"
  done
  for t in "${CNI_PLUGINS[@]}"; do
    [[ -x "$CNI_SRC/$t" ]] || die "$CNI_SRC/$t is missing (apt-get install containernetworking-plugins)"
  done
  ((${#SHIM_SOCKETS} <= 42)) || die "KUBESG_CLUSTER_DIR is too long: $SHIM_SOCKETS must be <= 42 characters"
  local p
  for p in $API_PORT $ETCD_CLIENT_PORT $ETCD_PEER_PORT 10250 10248 10256 10249 10257 10259; do
    port_free "$p" || die "port $p is in use: $(ss -Htlnp "sport = :$p" | head -1)"
  done
  ! ip link show "$CNI_BRIDGE" >/dev/null 2>&1 || die "interface $CNI_BRIDGE exists already"
  # The kubelet evicts pods below 256 MiB free (kubelet.yaml): refuse to start well before, and
  # say how much there is, rather than let tests fail on evicted pods.
  local parent free_mib
  parent=$(dirname "$DIR")
  free_mib=$(df -Pm "$parent" | awk 'NR == 2 { print $4 }')
  log "disk: $free_mib MiB free on $(df -P "$parent" | awk 'NR == 2 { print $6 }')"
  ((free_mib >= 2048)) || die "only $free_mib MiB free under $parent: the cluster needs 2 GiB (images, etcd, logs)"
}

node_ready() {
  [[ "$(kc get node "$NODE_NAME" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}')" == True ]]
}

# The cluster DNS as kubeadm deploys it (cmd/kubeadm/app/phases/addons/dns/manifests.go of the
# release): ServiceAccount coredns, ClusterRole/Binding system:coredns, ConfigMap coredns
# (kubeadm's Corefile), Deployment coredns (1 replica here: one node) and Service kube-dns at
# $DNS_SVC_IP (plus $DNS_SVC_IP6 when dual-stack). Left out of kubeadm's: the Service's
# resourceVersion "0" (for its updates only).
dns_deploy() {
  local family_policy=SingleStack cluster_ips="[$DNS_SVC_IP]"
  if ((IPV6)); then
    family_policy=PreferDualStack
    cluster_ips="[$DNS_SVC_IP, $DNS_SVC_IP6]"
  fi
  log "deploying CoreDNS ($COREDNS_IMAGE), Service kube-system/kube-dns $cluster_ips"
  kc apply -f - >/dev/null <<EOF
apiVersion: v1
kind: ServiceAccount
metadata:
  name: coredns
  namespace: kube-system
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata:
  name: system:coredns
rules:
- apiGroups: [""]
  resources: [endpoints, services, pods, namespaces]
  verbs: [list, watch]
- apiGroups: [discovery.k8s.io]
  resources: [endpointslices]
  verbs: [list, watch]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata:
  name: system:coredns
roleRef:
  apiGroup: rbac.authorization.k8s.io
  kind: ClusterRole
  name: system:coredns
subjects:
- kind: ServiceAccount
  name: coredns
  namespace: kube-system
---
apiVersion: v1
kind: ConfigMap
metadata:
  name: coredns
  namespace: kube-system
data:
  Corefile: |
    .:53 {
        errors
        health {
           lameduck 5s
        }
        ready
        kubernetes $CLUSTER_DOMAIN in-addr.arpa ip6.arpa {
           pods insecure
           fallthrough in-addr.arpa ip6.arpa
           ttl 30
        }
        prometheus :9153
        forward . /etc/resolv.conf {
           max_concurrent 1000
        }
        cache 30 {
           disable success $CLUSTER_DOMAIN
           disable denial $CLUSTER_DOMAIN
        }
        loop
        reload
        loadbalance
    }
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: coredns
  namespace: kube-system
  labels:
    k8s-app: kube-dns
spec:
  replicas: 1
  strategy:
    type: RollingUpdate
    rollingUpdate:
      maxUnavailable: 1
  selector:
    matchLabels:
      k8s-app: kube-dns
  template:
    metadata:
      labels:
        k8s-app: kube-dns
    spec:
      priorityClassName: system-cluster-critical
      serviceAccountName: coredns
      affinity:
        podAntiAffinity:
          preferredDuringSchedulingIgnoredDuringExecution:
          - weight: 100
            podAffinityTerm:
              labelSelector:
                matchExpressions:
                - key: k8s-app
                  operator: In
                  values: ["kube-dns"]
              topologyKey: kubernetes.io/hostname
      tolerations:
      - key: CriticalAddonsOnly
        operator: Exists
      - key: node-role.kubernetes.io/control-plane
        effect: NoSchedule
      nodeSelector:
        kubernetes.io/os: linux
      containers:
      - name: coredns
        image: $COREDNS_IMAGE
        imagePullPolicy: IfNotPresent
        resources:
          limits:
            memory: 170Mi
          requests:
            cpu: 100m
            memory: 70Mi
        args: [ "-conf", "/etc/coredns/Corefile" ]
        volumeMounts:
        - name: config-volume
          mountPath: /etc/coredns
          readOnly: true
        ports:
        - containerPort: 53
          name: dns
          protocol: UDP
        - containerPort: 53
          name: dns-tcp
          protocol: TCP
        - containerPort: 9153
          name: metrics
          protocol: TCP
        - containerPort: 8080
          name: liveness-probe
          protocol: TCP
        - containerPort: 8181
          name: readiness-probe
          protocol: TCP
        livenessProbe:
          httpGet:
            path: /health
            port: liveness-probe
            scheme: HTTP
          initialDelaySeconds: 60
          timeoutSeconds: 5
          successThreshold: 1
          failureThreshold: 5
        readinessProbe:
          httpGet:
            path: /ready
            port: readiness-probe
            scheme: HTTP
        securityContext:
          allowPrivilegeEscalation: false
          capabilities:
            add:
            - NET_BIND_SERVICE
            drop:
            - ALL
          readOnlyRootFilesystem: true
      dnsPolicy: Default
      volumes:
        - name: config-volume
          configMap:
            name: coredns
            items:
            - key: Corefile
              path: Corefile
---
apiVersion: v1
kind: Service
metadata:
  labels:
    k8s-app: kube-dns
    kubernetes.io/cluster-service: "true"
    kubernetes.io/name: "CoreDNS"
  name: kube-dns
  namespace: kube-system
  annotations:
    prometheus.io/port: "9153"
    prometheus.io/scrape: "true"
spec:
  clusterIP: $DNS_SVC_IP
  clusterIPs: $cluster_ips
  ipFamilyPolicy: $family_policy
  ports:
  - name: dns
    port: 53
    protocol: UDP
    targetPort: 53
  - name: dns-tcp
    port: 53
    protocol: TCP
    targetPort: 53
  - name: metrics
    port: 9153
    protocol: TCP
    targetPort: 9153
  selector:
    k8s-app: kube-dns
EOF
}

# CoreDNS Ready: its ready plugin answers once the kubernetes plugin has synced with the
# apiserver (through the kubernetes Service, so kube-proxy's rules work too).
dns_wait() {
  [[ -n "${BIN:-}" ]] || bins
  current=kubelet
  kc -n kube-system rollout status deployment/coredns --timeout 120s >&2 || {
    kc -n kube-system describe pods -l k8s-app=kube-dns >&2 || true
    kc -n kube-system logs -l k8s-app=kube-dns --tail 30 >&2 || true
    die "CoreDNS did not become ready"
  }
  log "CoreDNS ready"
}

up() {
  need_root
  local t0=$SECONDS
  bins
  if [[ -e "$DIR/up.done" ]] && alive kubelet && kc get --raw /readyz >/dev/null 2>&1; then
    log "already up"
    echo "$KUBECONFIG_ADMIN"
    return
  fi
  if [[ -e "$DIR" ]]; then
    log "$DIR exists (a partial or stopped cluster): running down first"
    (down) # a subshell: down turns errexit off
  fi
  detect_node
  preflight
  # The state to return to. Taken only here, with no cluster around, so a later `up` after a
  # partial one compares with the same clean state.
  rm -rf "$SNAP"
  snapshot "$SNAP"
  trap 'on_error $LINENO "$BASH_COMMAND"' ERR
  mkdir -p "$DIR" "$LOGS" "$RUN"
  chmod 700 "$DIR"
  log "node $NODE_NAME, $NODE_IPS on $NODE_DEV; dual-stack: $((IPV6 ? 1 : 0)); kube-proxy $PROXY_MODE"
  images
  pki
  write_configs
  cni_install

  # Pod traffic crosses the bridge (br_netfilter must show it to kube-proxy's rules) and is
  # routed to and from the node (forwarding). The bridge plugin would set forwarding itself.
  sysctl -qw net.ipv4.ip_forward=1 net.bridge.bridge-nf-call-iptables=1
  ((IPV6 == 0)) || sysctl -qw net.ipv6.conf.all.forwarding=1 net.bridge.bridge-nf-call-ip6tables=1

  # The bpf filesystem as a node with systemd has it: mounted, and shared (systemd makes every
  # mount shared at boot). kubesg's chart mounts it into the agent with Bidirectional
  # propagation (its mount-bpffs init container), which containerd allows only on a shared
  # mount. `down` puts the propagation back as the snapshot found it.
  mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf
  mount --make-shared /sys/fs/bpf

  start etcd "$BIN/etcd" --name "$NODE_NAME" --data-dir "$DIR/etcd" \
    --listen-client-urls "https://127.0.0.1:$ETCD_CLIENT_PORT" \
    --advertise-client-urls "https://127.0.0.1:$ETCD_CLIENT_PORT" \
    --listen-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
    --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
    --initial-cluster "$NODE_NAME=http://127.0.0.1:$ETCD_PEER_PORT" \
    --cert-file "$PKI/etcd-server.crt" --key-file "$PKI/etcd-server.key" \
    --trusted-ca-file "$PKI/ca.crt" --client-cert-auth
  wait_until "etcd health" 60 "$BIN/etcdctl" --endpoints "https://127.0.0.1:$ETCD_CLIENT_PORT" \
    --cacert "$PKI/ca.crt" --cert "$PKI/apiserver-etcd-client.crt" \
    --key "$PKI/apiserver-etcd-client.key" endpoint health

  start kube-apiserver "$BIN/kube-apiserver" \
    --advertise-address "$NODE_IP" --secure-port "$API_PORT" --allow-privileged=true \
    --authorization-mode Node,RBAC --enable-admission-plugins NodeRestriction,PodSecurity \
    --client-ca-file "$PKI/ca.crt" \
    --tls-cert-file "$PKI/apiserver.crt" --tls-private-key-file "$PKI/apiserver.key" \
    --etcd-servers "https://127.0.0.1:$ETCD_CLIENT_PORT" --etcd-cafile "$PKI/ca.crt" \
    --etcd-certfile "$PKI/apiserver-etcd-client.crt" --etcd-keyfile "$PKI/apiserver-etcd-client.key" \
    --kubelet-client-certificate "$PKI/apiserver-kubelet-client.crt" \
    --kubelet-client-key "$PKI/apiserver-kubelet-client.key" \
    --kubelet-certificate-authority "$PKI/ca.crt" \
    --kubelet-preferred-address-types InternalIP,Hostname \
    --service-cluster-ip-range "$SVC_CIDRS" \
    --service-account-issuer https://kubernetes.default.svc.cluster.local \
    --service-account-key-file "$PKI/sa.pub" --service-account-signing-key-file "$PKI/sa.key" \
    --requestheader-client-ca-file "$PKI/front-proxy-ca.crt" \
    --requestheader-allowed-names front-proxy-client \
    --requestheader-username-headers X-Remote-User --requestheader-group-headers X-Remote-Group \
    --requestheader-extra-headers-prefix X-Remote-Extra- \
    --proxy-client-cert-file "$PKI/front-proxy-client.crt" \
    --proxy-client-key-file "$PKI/front-proxy-client.key"
  wait_until "kube-apiserver /readyz" 120 kc get --raw /readyz

  # (the IPv6 mask size only when dual-stack: a single-stack IPv4 controller-manager refuses it)
  local cidr_mask6=()
  ((IPV6 == 0)) || cidr_mask6=(--node-cidr-mask-size-ipv6 64)
  start kube-controller-manager "$BIN/kube-controller-manager" \
    --kubeconfig "$DIR/kubeconfigs/controller-manager.conf" \
    --authentication-kubeconfig "$DIR/kubeconfigs/controller-manager.conf" \
    --authorization-kubeconfig "$DIR/kubeconfigs/controller-manager.conf" \
    --bind-address 127.0.0.1 --leader-elect=false --controllers '*' \
    --service-account-private-key-file "$PKI/sa.key" --root-ca-file "$PKI/ca.crt" \
    --use-service-account-credentials=true \
    --cluster-signing-cert-file "$PKI/ca.crt" --cluster-signing-key-file "$PKI/ca.key" \
    --allocate-node-cidrs=true --cluster-cidr "$CLUSTER_CIDRS" --node-cidr-mask-size-ipv4 24 \
    "${cidr_mask6[@]}" --service-cluster-ip-range "$SVC_CIDRS"
  start kube-scheduler "$BIN/kube-scheduler" --kubeconfig "$DIR/kubeconfigs/scheduler.conf" \
    --authentication-kubeconfig "$DIR/kubeconfigs/scheduler.conf" \
    --authorization-kubeconfig "$DIR/kubeconfigs/scheduler.conf" \
    --bind-address 127.0.0.1 --leader-elect=false
  current=kube-controller-manager
  wait_until "kube-controller-manager /healthz" 60 curl -skf https://127.0.0.1:10257/healthz
  current=kube-scheduler
  wait_until "kube-scheduler /healthz" 60 curl -skf https://127.0.0.1:10259/healthz

  # containerd finds containerd-shim-runc-v2 on PATH
  start containerd env PATH="$BIN:$PATH" "$BIN/containerd" --config "$CONF/containerd.toml"
  wait_until "containerd" 60 "$BIN/ctr" --address "$SOCK" version
  import_archive "$IMAGES/pause.tar"
  import_archive "$IMAGES/agnhost.tar"
  import_archive "$IMAGES/coredns.tar"

  mkdir -p "$DIR/kubelet" "$DIR/pod-logs"
  start kubelet "$BIN/kubelet" --config "$CONF/kubelet.yaml" \
    --kubeconfig "$DIR/kubeconfigs/kubelet.conf" --root-dir "$DIR/kubelet" \
    --hostname-override "$NODE_NAME" --node-ip "$NODE_IPS" --v 2
  wait_until "node $NODE_NAME Ready" 180 node_ready

  start kube-proxy "$BIN/kube-proxy" --config "$CONF/kube-proxy.yaml"
  wait_until "kube-proxy /healthz" 60 curl -sf http://127.0.0.1:10256/healthz

  dns_deploy
  current=kube-controller-manager
  wait_until "the default ServiceAccount" 60 kc -n default get serviceaccount default
  # The smoke test waits for CoreDNS to be Ready (dns_wait) before its DNS checks, after its
  # address checks: CoreDNS's first readiness probe comes up to 10 s (its periodSeconds) after
  # the container started, because the kubelet delays the first probe of every worker by a
  # random part of the period while it is younger than that period itself.
  smoke
  touch "$DIR/up.done"
  trap - ERR
  log "cluster up in $((SECONDS - t0)) s; kubectl --kubeconfig $KUBECONFIG_ADMIN get nodes"
  echo "$KUBECONFIG_ADMIN"
}

# ---------------------------------------------------------------------------------------------
# smoke test: two agnhost netexec pods behind a ClusterIP Service

http_get() { curl -sf --max-time 5 "$@"; }

smoke() {
  [[ -n "${BIN:-}" ]] || bins
  [[ -n "$AGNHOST_IMAGE" ]] || images
  [[ -n "${IPV6:-}" ]] || detect_node
  current=kubelet
  local ns=kubesg-smoke family_policy=SingleStack
  ((IPV6 == 0)) || family_policy=PreferDualStack
  log "smoke test: Deployment of 2 agnhost netexec pods + ClusterIP Service + a hostNetwork pod in namespace $ns"
  kc apply -f - >/dev/null <<EOF
apiVersion: v1
kind: Namespace
metadata:
  name: $ns
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: netexec
  namespace: $ns
spec:
  replicas: 2
  selector:
    matchLabels: {app: netexec}
  template:
    metadata:
      labels: {app: netexec}
    spec:
      terminationGracePeriodSeconds: 1
      containers:
      - name: netexec
        image: $AGNHOST_IMAGE
        imagePullPolicy: Never
        args: [netexec, --http-port=8080, --udp-port=8081]
        ports:
        - {name: http, containerPort: 8080}
        readinessProbe:
          httpGet: {path: /healthz, port: 8080}
          periodSeconds: 1
---
apiVersion: v1
kind: Service
metadata:
  name: netexec
  namespace: $ns
spec:
  selector: {app: netexec}
  ipFamilyPolicy: $family_policy
  ports:
  - {name: http, port: 80, targetPort: 8080}
---
# as kubesg's agent: host network, cluster DNS (ClusterFirstWithHostNet)
apiVersion: v1
kind: Pod
metadata:
  name: hostnet
  namespace: $ns
spec:
  terminationGracePeriodSeconds: 1
  hostNetwork: true
  dnsPolicy: ClusterFirstWithHostNet
  containers:
  - name: agnhost
    image: $AGNHOST_IMAGE
    imagePullPolicy: Never
    args: [pause]
EOF
  kc -n "$ns" rollout status deployment/netexec --timeout 120s >&2 ||
    { kc -n "$ns" describe pods >&2 || true; die "the smoke Deployment did not become ready"; }

  local pods ips
  mapfile -t pods < <(kc -n "$ns" get pods -l app=netexec --field-selector status.phase=Running \
    -o jsonpath='{range .items[*]}{.metadata.name}{"\n"}{end}')
  ((${#pods[@]} == 2)) || die "expected 2 running smoke pods, got ${#pods[@]}"
  local svc_ips
  svc_ips=$(kc -n "$ns" get service netexec -o jsonpath='{.spec.clusterIPs[*]}')
  local pod ip got
  for pod in "${pods[@]}"; do
    ips=$(kc -n "$ns" get pod "$pod" -o jsonpath='{.status.podIPs[*].ip}')
    for ip in $ips; do
      [[ $ip == *:* ]] && ip="[$ip]"
      # node -> pod
      got=$(http_get "http://$ip:8080/hostname") || die "node -> pod $pod ($ip:8080) failed"
      [[ "$got" == "$pod" ]] || die "node -> $ip:8080 answered '$got', not $pod"
      log "  node -> pod $pod $ip:8080 ok"
    done
  done
  for ip in $svc_ips; do
    [[ $ip == *:* ]] && ip="[$ip]"
    # node -> Service (kube-proxy's rules). kube-proxy programs the endpoints of the just-ready
    # pods up to a second or so later (iptables minSyncPeriod: 1 s after its previous sync, e.g.
    # CoreDNS's), rejecting connections until then: wait for that first.
    current=kube-proxy
    wait_until "kube-proxy's rules for Service $ip:80" 30 http_get "http://$ip:80/hostname"
    current=kubelet
    got=$(http_get "http://$ip:80/hostname") || die "node -> Service $ip:80 failed"
    [[ " ${pods[*]} " == *" $got "* ]] || die "Service $ip:80 answered '$got'"
    log "  node -> Service $ip:80 ok ($got)"
    # pod -> Service, through `kubectl exec` (apiserver -> kubelet -> containerd exec)
    kc -n "$ns" exec "${pods[0]}" -- /agnhost connect --timeout 5s "$ip:80" >&2 ||
      die "pod ${pods[0]} -> Service $ip:80 failed"
    log "  pod ${pods[0]} -> Service $ip:80 ok (kubectl exec agnhost connect)"
  done
  # pod -> pod and pod -> Service with HTTP, from inside a pod (netexec's /dial)
  local first_ip other_ip
  first_ip=$(kc -n "$ns" get pod "${pods[0]}" -o jsonpath='{.status.podIP}')
  other_ip=$(kc -n "$ns" get pod "${pods[1]}" -o jsonpath='{.status.podIP}')
  got=$(http_get "http://$first_ip:8080/dial?request=hostname&protocol=http&host=$other_ip&port=8080&tries=1") ||
    die "pod -> pod dial failed"
  [[ "$got" == *"\"${pods[1]}\""* ]] || die "pod ${pods[0]} -> pod $other_ip:8080 answered $got"
  log "  pod ${pods[0]} -> pod ${pods[1]} $other_ip:8080 ok"
  # pod -> the apiserver's Service (10.96.0.1:443 -> node:6443)
  kc -n "$ns" exec "${pods[0]}" -- /agnhost connect --timeout 5s "$API_SVC_IP:443" >&2 ||
    die "pod -> kubernetes Service $API_SVC_IP:443 failed"
  log "  pod ${pods[0]} -> Service kubernetes $API_SVC_IP:443 ok"

  # The cluster DNS. agnhost connect resolves first (its error then starts with "DNS:"), then
  # connects: the name resolved to the Service. Names: a full one, the pod's own namespace through
  # the search list (ndots:5), and the kubelet's nameserver line.
  dns_wait
  local dest out
  out=$(kc -n "$ns" exec "${pods[0]}" -- /agnhost dns-server-list 2>&1) || die "dns-server-list failed: $out"
  [[ "$out" == "$DNS_SVC_IP" ]] || die "pod ${pods[0]} has nameservers '$out', not $DNS_SVC_IP"
  for dest in "kubernetes.default.svc.$CLUSTER_DOMAIN:443" "netexec.$ns.svc.$CLUSTER_DOMAIN:80" netexec:80; do
    kc -n "$ns" exec "${pods[0]}" -- /agnhost connect --timeout 5s "$dest" >&2 ||
      die "pod ${pods[0]} -> $dest (by DNS name) failed"
    log "  pod ${pods[0]} -> $dest ok (resolved by CoreDNS, connected)"
  done
  got=$(http_get "http://$first_ip:8080/dial?request=hostname&protocol=http&host=netexec.$ns.svc&port=80&tries=1") ||
    die "pod -> Service netexec.$ns.svc dial failed"
  [[ "$got" == *"\"${pods[0]}\""* || "$got" == *"\"${pods[1]}\""* ]] ||
    die "pod ${pods[0]} -> http://netexec.$ns.svc:80 answered $got"
  log "  pod ${pods[0]} -> http://netexec.$ns.svc:80 ok ($got)"
  if ((IPV6)); then
    kc -n "$ns" exec "${pods[0]}" -- /agnhost connect --timeout 5s "[$DNS_SVC_IP6]:53" >&2 ||
      die "pod ${pods[0]} -> kube-dns [$DNS_SVC_IP6]:53/tcp failed"
    log "  pod ${pods[0]} -> Service kube-dns [$DNS_SVC_IP6]:53/tcp ok"
  fi
  # ... and from the host network (kubesg's agent: kubesg-operator.kube-system.svc)
  kc -n "$ns" wait --for=condition=Ready pod/hostnet --timeout 60s >/dev/null ||
    die "the hostNetwork smoke pod did not become ready"
  out=$(kc -n "$ns" exec hostnet -- /agnhost dns-server-list 2>&1) || die "dns-server-list failed: $out"
  [[ "$out" == "$DNS_SVC_IP" ]] || die "hostNetwork pod has nameservers '$out', not $DNS_SVC_IP"
  for dest in kubernetes.default.svc:443 "netexec.$ns.svc:80"; do
    kc -n "$ns" exec hostnet -- /agnhost connect --timeout 5s "$dest" >&2 ||
      die "hostNetwork pod (ClusterFirstWithHostNet) -> $dest failed"
    log "  hostNetwork pod (ClusterFirstWithHostNet) -> $dest ok"
  done

  # The workload is gone again, so tests start from an empty cluster (not waited for).
  kc delete namespace "$ns" --wait=false >/dev/null
  log "smoke test passed"
}

# ---------------------------------------------------------------------------------------------
# down

kill_pids() { # signal, pids...: the pids still ours are signalled
  local sig=$1
  shift
  local p
  for p in "$@"; do kill "-$sig" "$p" 2>/dev/null || true; done
}

stop_components() { # names: TERM to all, up to 10 s, then KILL
  local c i left
  for c in "$@"; do alive "$c" && kill -TERM "$(cat "$RUN/$c.pid")" 2>/dev/null; done
  for i in $(seq 1 50); do
    left=0
    for c in "$@"; do alive "$c" && left=1; done
    ((left)) || return 0
    sleep 0.2
  done
  for c in "$@"; do alive "$c" && kill -KILL "$(cat "$RUN/$c.pid")" 2>/dev/null; done
  return 0
}

# Removes the iptables rules and chains of kube-proxy, the kubelet (KUBE-*) and the bridge and
# portmap plugins (CNI-*): rules in other chains jumping to them, then the chains themselves.
clean_iptables() { # iptables | ip6tables
  local cmd=$1 table rules line chain
  for table in filter nat mangle raw security; do
    rules=$("$cmd" -w -t "$table" -S 2>/dev/null) || continue
    while read -r line; do
      [[ "$line" == "-A "* ]] || continue
      chain=${line#-A }
      chain=${chain%% *}
      [[ "$chain" == KUBE-* || "$chain" == CNI-* ]] && continue
      [[ "$line" =~ -[jg]\ (KUBE-|CNI-) ]] || continue
      # the saved line is shell-quoted (comments with spaces)
      eval "\"\$cmd\" -w -t \"\$table\" -D ${line#-A }" || true
    done <<<"$rules"
    # all flushed before any is deleted: they jump to each other
    local ours
    mapfile -t ours < <(awk '$1 == "-N" && ($2 ~ /^KUBE-/ || $2 ~ /^CNI-/) {print $2}' <<<"$rules")
    for chain in "${ours[@]}"; do "$cmd" -w -t "$table" -F "$chain" 2>/dev/null || true; done
    for chain in "${ours[@]}"; do "$cmd" -w -t "$table" -X "$chain" 2>/dev/null || true; done
  done
}

clean_netfilter() {
  clean_iptables iptables
  clean_iptables ip6tables
  # kube-proxy's nftables mode (and its probe tables in iptables mode)
  local fam
  for fam in ip ip6 inet; do nft delete table "$fam" kube-proxy 2>/dev/null || true; done
  # iptables-nft leaves its tables (filter, nat, ...) behind with empty base chains; delete those
  # that did not exist before up and hold no rule now.
  local before="$SNAP/nft" t fam_name
  while read -r fam_name; do
    [[ -n "$fam_name" ]] || continue
    if [[ -f "$before" ]] && grep -qxF "table $fam_name {" "$before"; then continue; fi
    # shellcheck disable=SC2086
    t=$(nft -j list table $fam_name 2>/dev/null | jq '[.nftables[] | select(.rule)] | length') || continue
    # shellcheck disable=SC2086
    [[ "$t" == 0 ]] && nft delete table $fam_name
  done < <(nft list tables 2>/dev/null | sed -n 's/^table //p')
  # conntrack entries of pod and Service addresses
  local cidr
  for cidr in "$CLUSTER_CIDR4" "$SVC_CIDR4"; do
    conntrack -D -f ipv4 -s "$cidr" >/dev/null 2>&1 || true
    conntrack -D -f ipv4 -d "$cidr" >/dev/null 2>&1 || true
  done
  for cidr in "$CLUSTER_CIDR6" "$SVC_CIDR6"; do
    conntrack -D -f ipv6 -s "$cidr" >/dev/null 2>&1 || true
    conntrack -D -f ipv6 -d "$cidr" >/dev/null 2>&1 || true
  done
}

down() {
  need_root
  # Best effort, to the end: a step that fails (a process that exits under us, a cgroup that
  # vanishes) must not leave the later steps undone. check-clean verifies the result.
  set +e
  local t0=$SECONDS
  log "tearing down the cluster in $DIR"
  # 1. the node agents first, so nothing restarts containers; then the containers (every process
  #    in the kubelet's cgroups), containerd's shims, containerd, the control plane and etcd.
  stop_components kubelet kube-proxy
  local i pids
  for i in 1 2 3 4 5; do
    pids=$(pod_pids)
    [[ -n "$pids" ]] || break
    # shellcheck disable=SC2086
    kill_pids KILL $pids
    sleep 0.3
  done
  stop_components containerd kube-scheduler kube-controller-manager kube-apiserver
  stop_components etcd # after the apiserver, which removes its endpoint lease on the way out
  # whatever else still names the cluster dir (shims, a daemon without pid file)
  for i in 1 2 3; do
    pids=$(our_pids)
    [[ -n "$pids" ]] || break
    # shellcheck disable=SC2086
    kill_pids TERM $pids
    sleep "0.$((i * 3))"
    pids=$(our_pids)
    # shellcheck disable=SC2086
    kill_pids KILL $pids
  done
  [[ -z "$(our_pids)" ]] || log "WARNING: processes still running: $(our_pids | tr '\n' ' ')"
  log "processes stopped"

  # 2. mounts under the cluster dir (overlay rootfs, shm, the kubelet's volumes, netns), deepest
  #    first; the network namespaces containerd created (cni-*, not there before up).
  local m
  for m in $(findmnt -rn -o TARGET | { grep -F "$DIR/" || true; } | sort -r); do
    umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true
  done
  local ns
  for ns in $(ip netns list 2>/dev/null | awk '$1 ~ /^cni-/ {print $1}'); do
    if [[ -f "$SNAP/netns" ]] && grep -qxF "$ns" "$SNAP/netns"; then continue; fi
    ip netns delete "$ns" 2>/dev/null || { umount -l "/run/netns/$ns" 2>/dev/null; rm -f "/run/netns/$ns"; }
  done

  # 3. the bridge and any veth still attached to it
  if ip link show "$CNI_BRIDGE" >/dev/null 2>&1; then
    local link
    for link in $(ip -o link show master "$CNI_BRIDGE" | awk -F': ' '{sub("@.*", "", $2); print $2}'); do
      ip link delete "$link" 2>/dev/null || true
    done
    ip link delete "$CNI_BRIDGE" 2>/dev/null || true
  fi

  # 4. netfilter state
  clean_netfilter
  log "mounts, network namespaces, $CNI_BRIDGE, iptables/nft rules removed"

  # 5. the CNI files we installed, host-local's leases and the CNI result cache of our network
  if [[ -f "$DIR/cni-installed" ]]; then
    local f
    # files first, then folders (deepest first), each only if we created it
    while read -r f; do [[ -f "$f" ]] && rm -f "$f"; done <"$DIR/cni-installed"
    while read -r f; do [[ -d "$f" ]] && rmdir "$f" 2>/dev/null; done < <(sort -r "$DIR/cni-installed")
  fi
  rm -rf "/var/lib/cni/networks/$CNI_NET"
  rm -f /var/lib/cni/results/"$CNI_NET"-* 2>/dev/null || true
  # Folders the components create outside the cluster dir whatever their configuration, removed
  # when they did not exist before up: libcni's cache and host-local's leases (/var/lib/cni), the
  # kubelet's symlinks to container logs (/var/log/containers) and its device-plugin socket
  # (/var/lib/kubelet/device-plugins/kubelet.sock, a constant of the device plugin API).
  local p
  for p in /var/lib/cni /var/log/containers /var/lib/kubelet; do
    [[ -e "$p" && -f "$SNAP/files" ]] || continue
    grep -qxF "$p" "$SNAP/files" || rm -rf --one-file-system "$p"
  done

  # 6. the kubelet's pod cgroups, in every hierarchy, children first
  local d
  while read -r d; do
    find "$d" -depth -type d -exec rmdir {} \; 2>/dev/null
  done < <(find /sys/fs/cgroup -mindepth 2 -maxdepth 2 -type d -name 'kubepods*' 2>/dev/null)

  # 7. the kernel settings recorded before up
  if [[ -f "$SNAP/sysctls" ]]; then
    local key eq val
    while read -r key eq val; do
      [[ "$eq" == "=" ]] || continue
      [[ "$(sysctl -n "$key" 2>/dev/null)" == "$val" ]] || sysctl -qw "$key=$val" 2>/dev/null || true
    done <"$SNAP/sysctls"
  fi

  # 7b. the bpf filesystem's propagation, as the snapshot found it (up made it shared)
  if [[ -f "$SNAP/mounts" ]] && mountpoint -q /sys/fs/bpf; then
    local was
    was=$(awk '$1 == "/sys/fs/bpf" {print $3}' "$SNAP/mounts")
    case "$was" in
      private) mount --make-private /sys/fs/bpf ;;
      slave) mount --make-slave /sys/fs/bpf ;;
    esac
  fi

  # 7c. libmount's /run/mount (its utab and lock), which `mount --make-*` above and in up creates
  # on a machine that had none: removed when the snapshot did not have it and it holds nothing
  if [[ -f "$SNAP/files" ]] && ! grep -qx /run/mount "$SNAP/files"; then
    rmdir /run/mount 2>/dev/null || true
  fi

  # 8. the cluster dir; --one-file-system: never follow into a mount that survived step 2
  if [[ -d "$DIR" ]]; then
    rm -rf --one-file-system "$DIR" || log "WARNING: could not remove all of $DIR"
  fi
  log "down in $((SECONDS - t0)) s"
}

# ---------------------------------------------------------------------------------------------

status() {
  [[ -d "$DIR" ]] || { log "no cluster (no $DIR)"; return 1; }
  BIN="$("$here/build.sh" 2>/dev/null)"
  local c rc=0
  for c in etcd kube-apiserver kube-controller-manager kube-scheduler containerd kubelet kube-proxy; do
    if alive "$c"; then printf '%-24s running (pid %s)\n' "$c" "$(cat "$RUN/$c.pid")"
    else printf '%-24s NOT running\n' "$c"; rc=1; fi
  done
  kc get nodes -o wide 2>&1 || rc=1
  kc get pods -A -o wide 2>&1 || rc=1
  echo "kubeconfig: $KUBECONFIG_ADMIN"
  return $rc
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status) status ;;
  check-clean) check_clean ;;
  smoke) need_root; bins; smoke ;;
  images) need_root; bins; images; ls -l "$IMAGES"/*.tar >&2 ;;
  import-image)
    need_root
    [[ -n "${2:-}" ]] || { echo "usage: $0 import-image ARCHIVE|BUILDAH_TAG" >&2; exit 2; }
    bins
    import_image "$2"
    ;;
  *)
    echo "usage: $0 up | down | status | check-clean | smoke | images | import-image ARCHIVE|TAG" >&2
    exit 2
    ;;
esac
