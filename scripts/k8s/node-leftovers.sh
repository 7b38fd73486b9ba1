#!/usr/bin/env bash
# Removes what kubesg leaves on a node once its chart is gone (README, "Uninstall"): the plugin
# binary, the pins, the socket directory. Said on stderr for each one present. conformance.sh's
# uninstall runs it after `helm uninstall`; `make test` runs it before the cluster snapshot, for
# what an interrupted earlier run left.
set -euo pipefail
for left in /opt/cni/bin/kubesg-cni /var/run/kubesg /sys/fs/bpf/kubesg; do
  if [[ -e "$left" ]]; then
    echo "removing $left" >&2
    rm -rf "$left"
  fi
done
