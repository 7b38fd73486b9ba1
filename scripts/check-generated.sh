#!/usr/bin/env bash
# Fails when checked-in generated files differ from what their generators produce now:
# the protobuf code in proto/src/generated (protogen). CRD YAML joins this with the operator.
set -euo pipefail
cd "$(dirname "$0")/.."
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

cargo run -q --locked -p kubesg-proto --features codegen --bin protogen -- "$tmp/proto" >/dev/null
if ! diff -ru proto/src/generated "$tmp/proto"; then
  echo "proto/src/generated is stale: run 'cargo run -p kubesg-proto --features codegen --bin protogen'" >&2
  exit 1
fi
echo "generated files are current"
