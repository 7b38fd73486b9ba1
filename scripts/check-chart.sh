#!/usr/bin/env bash
# The Helm chart's checks: lint (Helm's Go library through helm-sdkpy, and helm 4's strict lint)
# with the default values and every charts/kubesg/ci/*-values.yaml, the values schema rejecting
# scripts/chart/bad-values/*, the rendered objects against the Kubernetes OpenAPI schemas, the
# certificates, privileges and command lines the chart renders. The tools come from
# scripts/bootstrap.sh; see scripts/chart/check_chart.py.
set -euo pipefail
cd "$(dirname "$0")/.."
exec python3 scripts/chart/check_chart.py "$@"
