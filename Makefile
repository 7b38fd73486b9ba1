# The two commands of the README: `make test` runs every test; `make demo` runs kubesg locally.
.PHONY: test bootstrap bench

test:
	scripts/test.sh

bootstrap:
	scripts/bootstrap.sh

bench:
	scripts/bootstrap.sh
	cargo bench -p kubesg-agent --bench datapath
