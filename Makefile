# The two commands of the README: `make test` runs every test; `make demo` runs kubesg locally.
.PHONY: test demo bootstrap bench bench-traffic fuzz image chart cluster cluster-down conformance

test:
	scripts/test.sh

# The demo runs the binaries it drives from target/debug: build them first (the demo checks
# they are current too), then narrate a local two-node cluster (as root).
demo:
	scripts/bootstrap.sh
	PATH="$$HOME/.cargo/bin:$$PATH" cargo build -p kubesg-agent -p kubesg-cni -p kubesg-operator --bins
	PATH="$$HOME/.cargo/bin:$$PATH" cargo run -q -p kubesg-demo

bootstrap:
	scripts/bootstrap.sh

# The benchmarks (tables, not tests): the datapath per packet and the conntrack sweep by table
# size (as root), the compiler on a synthetic 150 000-pod cluster, apply-to-ack latency with
# 200 agents.
bench:
	scripts/bootstrap.sh
	PATH="$$HOME/.cargo/bin:$$PATH" cargo bench -p kubesg-agent --bench datapath
	PATH="$$HOME/.cargo/bin:$$PATH" cargo bench -p kubesg-agent --bench sweep
	PATH="$$HOME/.cargo/bin:$$PATH" cargo bench -p kubesg-operator --bench compile
	PATH="$$HOME/.cargo/bin:$$PATH" cargo bench -p kubesg-operator --bench push

# Real traffic between two pods (as root): kubesg against iptables (seed form), iptables + ipset
# and nftables for N = 10, 1 000, 10 000 peers (new connections/s, keep-alive requests/s and
# latency, iperf3, sockperf ping-pong, time to enforcement, memory per tracked connection).
# Writes docs/benchmarks.md; options through BENCH_ARGS, e.g. BENCH_ARGS='--rounds 1 --peers 10'.
bench-traffic:
	scripts/bootstrap.sh
	scripts/bench-traffic.sh $(BENCH_ARGS)

# The fuzz targets (fuzz/: the packet parser, the CNI plugin's stdin and environment, the agent's
# PolicyUpdate handling, the operator's manifests), each for FUZZ_SECONDS (default 60) with
# nightly and libFuzzer: a table of executions and crashes last; crash inputs under
# target/fuzz-artifacts/. FUZZ_MERGE=1 merges what they found into fuzz/corpus.
fuzz:
	scripts/bootstrap.sh
	scripts/fuzz.sh $${FUZZ_SECONDS:-60}

# The container image (Dockerfile) built with buildah, no registry (scripts/image.sh), then run:
# kubesg-agent --version, kubesg-operator --version, kubesg-cni VERSION inside it.
image:
	scripts/bootstrap.sh
	scripts/image.sh build
	scripts/image.sh test

# The Helm chart's checks alone (also part of `make test`).
chart:
	scripts/bootstrap.sh
	scripts/check-chart.sh

# A real one-node Kubernetes cluster on this machine (as root), from the components
# scripts/k8s/build.sh builds: prints the admin kubeconfig's path last. `make cluster-down`
# removes everything it created.
cluster:
	scripts/bootstrap.sh
	scripts/k8s/cluster.sh up

cluster-down:
	scripts/k8s/cluster.sh down

# Upstream's NetworkPolicy e2e tests (test/e2e/network/netpol of the pinned Kubernetes) against
# the cluster `make cluster` started, with kubesg built from this tree and installed (or
# upgraded) there by its chart: builds e2e.test on first
# use (scripts/k8s/build.sh --e2e, minutes), JUnit in target/conformance, one line per test and
# `N passed, M failed, K skipped` last. docs/conformance.md says what the tests need.
conformance:
	scripts/k8s/conformance.sh --kubesg
