#!/usr/bin/env bash
# Fails when checked-in generated files differ from what their generators produce now:
# the protobuf code in proto/src/generated (protogen) and the CRD YAML in charts/kubesg/crds
# (kubesg-operator crdgen).
set -euo pipefail
cd "$(dirname "$0")/.."
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

cargo run -q --locked -p kubesg-proto --features codegen --bin protogen -- "$tmp/proto" >/dev/null
if ! diff -ru proto/src/generated "$tmp/proto"; then
  echo "proto/src/generated is stale: run 'cargo run -p kubesg-proto --features codegen --bin protogen'" >&2
  exit 1
fi
cargo run -q --locked -p kubesg-operator -- crdgen --out "$tmp/crds" >/dev/null
if ! diff -ru charts/kubesg/crds "$tmp/crds"; then
  echo "charts/kubesg/crds is stale: run 'cargo run -p kubesg-operator -- crdgen --out charts/kubesg/crds'" >&2
  exit 1
fi
echo "generated files are current"
