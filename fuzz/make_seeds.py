#!/usr/bin/env python3
"""Writes the seed corpora of the fuzz targets (fuzz/corpus/TARGET/seed-*): the frames the
parser's tests build (kubesg-testkit's packet module: TCP with Linux's SYN options, UDP, ICMP
echo and errors, fragments, IPv6 extension headers, VLAN, ARP, BIG TCP), the CNI configs and
environments of cni-plugin's tests, PolicyUpdates like the operator's, and the demo's
manifests. Run it from anywhere; it rewrites only the seed-* files (entries merged by
`FUZZ_MERGE=1 make fuzz` are named by their hash and stay)."""

import json
import os
import random
import struct

FUZZ = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(FUZZ)


def write(target, name, data):
    d = os.path.join(FUZZ, "corpus", target)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(d, "seed-" + name), "wb") as f:
        f.write(data)


def clear(target):
    d = os.path.join(FUZZ, "corpus", target)
    if os.path.isdir(d):
        for n in os.listdir(d):
            if n.startswith("seed-"):
                os.remove(os.path.join(d, n))


# --- packets (as kubesg-testkit's packet module builds them) -------------------------------

SRC_MAC = bytes([2, 0, 0, 0, 0, 1])
DST_MAC = bytes([2, 0, 0, 0, 0, 2])
POD4, PEER4 = bytes([10, 0, 0, 5]), bytes([10, 0, 1, 7])
POD6 = bytes.fromhex("fd000000000000000000000000000005")
PEER6 = bytes.fromhex("fd000000000000000000000000010007")


def eth(ethertype, payload):
    return DST_MAC + SRC_MAC + struct.pack("!H", ethertype) + payload


def csum(b):
    if len(b) % 2:
        b += b"\0"
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def ipv4(src, dst, proto, payload, ident=0, frag=0x4000, options=b"", total=None):
    ihl = 5 + len(options) // 4
    tot = 20 + len(options) + len(payload) if total is None else total
    h = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, tot, ident, frag, 64, proto, 0, src, dst)
    h += options
    h = h[:10] + struct.pack("!H", csum(h)) + h[12:]
    return eth(0x0800, h + payload)


def ipv6(src, dst, nh, payload, plen=None):
    plen = len(payload) if plen is None else plen
    return eth(0x86DD, struct.pack("!IHBB16s16s", 6 << 28, plen, nh, 64, src, dst) + payload)


def ip(src, dst, proto, payload, **kw):
    return (ipv4 if len(src) == 4 else ipv6)(src, dst, proto, payload, **kw)


def tcp(sport, dport, flags, seq=1000, ack=0, opts=b"", data=b"", win=64240):
    off = (20 + len(opts)) // 4
    return struct.pack("!HHIIBBHHH", sport, dport, seq, ack, off << 4, flags, win, 0, 0) + opts + data


SYN, ACK, FIN, RST, PSH = 0x02, 0x10, 0x01, 0x04, 0x08
# Linux's SYN options: MSS, SACK permitted, timestamps, NOP, window scale 7.
LINUX_SYN_OPTS = bytes([2, 4, 5, 0xB4, 4, 2, 8, 10, 0, 0, 0, 1, 0, 0, 0, 0, 1, 3, 3, 7])
TIMESTAMPS = bytes([1, 1, 8, 10, 0, 0, 0, 2, 0, 0, 0, 1])
SACK_BLOCKS = bytes([1, 1, 5, 18]) + struct.pack("!IIII", 2000, 3000, 4000, 5000)


def udp(sport, dport, data):
    return struct.pack("!HHHH", sport, dport, 8 + len(data), 0) + data


def icmp4(t, c, rest):
    return bytes([t, c, 0, 0]) + rest


def frames():
    out = {}
    for fam, (pod, peer) in (("v4", (POD4, PEER4)), ("v6", (POD6, PEER6))):
        p4 = fam == "v4"
        syn = ip(pod, peer, 6, tcp(40000, 80, SYN, opts=LINUX_SYN_OPTS))
        out[f"tcp-syn-{fam}"] = syn
        out[f"tcp-ack-ts-{fam}"] = ip(pod, peer, 6, tcp(40000, 80, ACK, 1001, 501, TIMESTAMPS))
        out[f"tcp-sack-{fam}"] = ip(pod, peer, 6, tcp(40000, 80, ACK, 1001, 501, SACK_BLOCKS))
        out[f"tcp-psh-{fam}"] = ip(pod, peer, 6, tcp(40000, 80, PSH | ACK, data=b"GET / HTTP/1.1\r\n"))
        out[f"tcp-fin-rst-{fam}"] = ip(pod, peer, 6, tcp(40000, 80, FIN | RST | SYN))
        out[f"tcp-doff4-{fam}"] = ip(pod, peer, 6, struct.pack("!HHIIBBHHH", 1, 2, 0, 0, 4 << 4, SYN, 0, 0, 0))
        out[f"udp-{fam}"] = ip(pod, peer, 17, udp(40000, 53, b"abcdefgh"))
        out[f"udp-badlen-{fam}"] = ip(pod, peer, 17, struct.pack("!HHHH", 1, 2, 3, 0))
        out[f"sctp-{fam}"] = ip(pod, peer, 132, struct.pack("!HHII", 5000, 9000, 0, 0) + bytes(16))
        out[f"gre-{fam}"] = ip(pod, peer, 47, bytes(8))
        if p4:
            echo = ip(pod, peer, 1, icmp4(8, 0, struct.pack("!HH", 7, 1)))
            err = ip(peer, pod, 1, icmp4(3, 3, bytes(4)) + syn[14:14 + 20 + 8])
            frag_err = ip(peer, pod, 1, icmp4(3, 4, struct.pack("!HH", 0, 1400)) + syn[14:])
        else:
            echo = ip(pod, peer, 58, icmp4(128, 0, struct.pack("!HH", 7, 1)))
            err = ip(peer, pod, 58, icmp4(1, 4, bytes(4)) + syn[14:14 + 40 + 8])
            frag_err = ip(peer, pod, 58, icmp4(2, 0, struct.pack("!I", 1280)) + syn[14:])
        out[f"icmp-echo-{fam}"] = echo
        out[f"icmp-error-{fam}"] = err
        out[f"icmp-too-big-{fam}"] = frag_err
        out[f"vlan-{fam}"] = syn[:12] + struct.pack("!HH", 0x8100, 5) + syn[12:]
    # IPv4 fragments, options, bad lengths.
    payload = udp(40000, 53, b"abcdefgh")
    out["frag-first-v4"] = ipv4(POD4, PEER4, 17, payload[:8], ident=7, frag=0x2000)
    out["frag-later-v4"] = ipv4(POD4, PEER4, 17, payload[8:], ident=7, frag=1)
    out["options-v4"] = ipv4(POD4, PEER4, 6, tcp(1, 2, SYN), options=bytes([1, 1, 1, 1]))
    out["ihl4-v4"] = bytes(out["tcp-syn-v4"][:14]) + bytes([0x44]) + out["tcp-syn-v4"][15:]
    out["total-1000-v4"] = ipv4(POD4, PEER4, 6, tcp(1, 2, SYN), total=1000)
    out["bad-version-v4"] = out["tcp-syn-v4"][:14] + bytes([0x65]) + out["tcp-syn-v4"][15:]
    # IPv6 extension headers, atomic fragment, fragments, a chain too long.
    u6 = udp(40000, 53, b"")
    hbh = bytes([43, 0, 1, 4, 0, 0, 0, 0])
    rh = bytes([17, 0, 4, 0, 0, 0, 0, 0])
    out["ext-hbh-routing-v6"] = ipv6(POD6, PEER6, 0, hbh + rh + u6)
    out["atomic-frag-v6"] = ipv6(POD6, PEER6, 44, struct.pack("!BBHI", 17, 0, 0, 9) + u6)
    out["frag-first-v6"] = ipv6(POD6, PEER6, 44, struct.pack("!BBHI", 17, 0, 1, 9) + u6)
    out["frag-later-v6"] = ipv6(POD6, PEER6, 44, struct.pack("!BBHI", 17, 0, 8, 9) + bytes(8))
    out["ah-v6"] = ipv6(POD6, PEER6, 51, bytes([17, 1, 0, 0]) + bytes(8) + u6)
    chain = b"".join(bytes([60, 0, 1, 4, 0, 0, 0, 0]) for _ in range(9))
    out["ext-chain-too-long-v6"] = ipv6(POD6, PEER6, 60, chain + u6)
    q = ipv6(POD6, PEER6, 60, bytes([17, 0, 1, 4, 0, 0, 0, 0]) + u6)
    out["icmp-error-quoting-ext-v6"] = ipv6(PEER6, POD6, 58, icmp4(1, 4, bytes(4)) + q[14:])
    out["payload-1000-v6"] = ipv6(POD6, PEER6, 17, u6, plen=1000)
    # Not IP: ARP (let through), QinQ.
    arp = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, SRC_MAC, POD4, bytes(6), PEER4)
    out["arp"] = eth(0x0806, arp)
    out["qinq"] = out["vlan-v4"][:12] + bytes([0x88, 0xA8]) + out["vlan-v4"][14:]
    return out


def packets():
    clear("packet_parse")
    for name, f in frames().items():
        # Control: bit 0 GSO, the rest where the linear part ends (here: all of it, and the
        # Ethernet and IP headers only).
        write("packet_parse", name, struct.pack("<H", len(f) << 1) + f)
        write("packet_parse", name + "-head34", struct.pack("<H", 34 << 1) + f)
    # BIG TCP: a GSO packet whose IP length says 0.
    seg4 = frames()["tcp-ack-ts-v4"]
    big4 = seg4[:16] + b"\0\0" + seg4[18:]
    write("packet_parse", "big-tcp-v4", struct.pack("<H", (40 << 1) | 1) + big4)
    seg6 = frames()["tcp-ack-ts-v6"]
    big6 = seg6[:18] + b"\0\0" + seg6[20:]
    write("packet_parse", "big-tcp-v6", struct.pack("<H", (60 << 1) | 1) + big6)


# --- CNI ---------------------------------------------------------------------------------

NETNS = "/run/netns/kubesg-cli-test-pod"


def prev_result(version="1.0.0", with_version=False):
    ips = [
        {"interface": 2, "address": "10.99.0.2/24", "gateway": "10.99.0.1"},
        {"interface": 2, "address": "fd99::2/64", "gateway": "fd99::1"},
    ]
    if with_version:
        ips[0]["version"], ips[1]["version"] = "4", "6"
    return {
        "cniVersion": version,
        "interfaces": [
            {"name": "cni0", "mac": "a6:2b:0a:c4:8c:ef"},
            {"name": "veth8ae5ce40", "mac": "7e:17:cb:f0:fe:bc"},
            {"name": "eth0", "mac": "8a:10:f6:3e:71:d1", "sandbox": NETNS},
        ],
        "ips": ips,
        "routes": [{"dst": "0.0.0.0/0"}],
        "dns": {},
    }


def config(version, **extra):
    c = {
        "cniVersion": version,
        "name": "kubesg-test",
        "type": "kubesg-cni",
        "agentSocket": "/var/run/kubesg/agent.sock",
        "timeoutSeconds": 5,
    }
    c.update(extra)
    return json.dumps(c)


def cni():
    clear("cni_stdin")
    write("cni_stdin", "add-1.0.0", config("1.0.0", prevResult=prev_result()))
    write("cni_stdin", "add-0.4.0", config("0.4.0", prevResult=prev_result("0.4.0", True)))
    write("cni_stdin", "add-0.3.1-no-prev-version", config("0.3.1", prevResult={
        k: v for k, v in prev_result().items() if k != "cniVersion"}))
    write("cni_stdin", "add-1.1.0-runtime", config("1.1.0", prevResult=prev_result("1.1.0"),
                                                   runtimeConfig={"portMappings": []},
                                                   args={"cni": {}}))
    write("cni_stdin", "gc-1.1.0", config("1.1.0", **{"cni.dev/valid-attachments": [
        {"containerID": "a1", "ifname": "eth0"}, {"containerID": "b2", "ifname": "net1"}]}))
    write("cni_stdin", "gc-older-key", config("1.1.0", **{"cni.dev/attachments": [
        {"containerID": "a1", "ifname": "eth0"}]}))
    write("cni_stdin", "del-null-prev", config("1.0.0", prevResult=None))
    write("cni_stdin", "prev-bad-cidr", config("1.0.0", prevResult={
        "ips": [{"address": "10.0.0.300/24", "interface": 0}], "interfaces": []}))
    write("cni_stdin", "no-version", json.dumps({"name": "n", "type": "kubesg-cni"}))
    write("cni_stdin", "bad-name", config("1.0.0", name="bad name"))
    write("cni_stdin", "not-json", '{"cniVersion": ')

    clear("cni_env")
    env = lambda *vals: "\0".join(vals)
    args = "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-0;K8S_POD_UID=u1"
    write("cni_env", "add", env("ADD", "c0ffee", NETNS, "eth0", args))
    write("cni_env", "check", env("CHECK", "c0ffee", NETNS, "eth0", ""))
    write("cni_env", "del-no-netns", env("DEL", "c0ffee", "", "eth0", args))
    write("cni_env", "status", env("STATUS"))
    write("cni_env", "gc", env("GC", "", "", "", ""))
    write("cni_env", "version", env("VERSION"))
    write("cni_env", "bad-ifname", env("ADD", "c0ffee", NETNS, "averyveryverylongname", args))
    write("cni_env", "bad-args", env("ADD", "c0ffee", NETNS, "eth0", "K8S_POD_NAME=p;garbage"))


# --- PolicyUpdate (protobuf, kubesg/v1alpha1/policy.proto) --------------------------------


def varint(n):
    n &= (1 << 64) - 1
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def fv(field, n):
    return varint(field << 3) + varint(n)


def fb(field, data):
    if isinstance(data, str):
        data = data.encode()
    return varint(field << 3 | 2) + varint(len(data)) + data


def pod_ref(ns, name, uid=""):
    return fb(1, ns) + fb(2, name) + (fb(3, uid) if uid else b"")


def rule(protocol, ports=(), peers=(), origin="", sets=(), layer=0, number=0):
    r = fv(1, protocol) + (fv(2, number) if number else b"")
    r += b"".join(fb(3, p) for p in ports)
    r += b"".join(fb(4, p) for p in peers)
    r += fb(5, origin) if origin else b""
    r += b"".join(fb(6, s) for s in sets)
    r += fv(7, layer) if layer else b""
    return r


def port_range(first, last):
    return fb(1, fv(1, first) + fv(2, last))


def icmp(t, code=None):
    return fb(2, fv(1, t) + (fv(2, code) if code is not None else b""))


def peer(cidr, *except_):
    return fb(1, cidr) + b"".join(fb(2, e) for e in except_)


def policy(pid, ingress=(), egress=(), layered=False, in_layers=(), eg_layers=(), groups=()):
    p = fb(1, pid) + b"".join(fb(2, r) for r in ingress) + b"".join(fb(3, r) for r in egress)
    p += b"".join(fb(5, g) for g in groups)
    if layered:
        p += fv(6, 1)
        if in_layers:
            p += fb(7, b"".join(varint(l) for l in in_layers))
        if eg_layers:
            p += fb(8, b"".join(varint(l) for l in eg_layers))
    return p


def update(version, snapshot=False, base=0, policies=(), remove_policies=(), pods=(),
           remove_pods=(), recheck=None, sets=(), remove_sets=()):
    u = fv(1, version) + (fv(2, 1) if snapshot else b"") + (fv(3, base) if base else b"")
    u += b"".join(fb(4, p) for p in policies)
    u += b"".join(fb(5, p) for p in remove_policies)
    u += b"".join(fb(6, fb(1, pod) + (fb(2, pid) if pid else b"")) for pod, pid in pods)
    u += b"".join(fb(7, p) for p in remove_pods)
    if recheck is not None:
        u += fb(8, fv(1, 1) if recheck else b"")
    u += b"".join(fb(9, fb(1, sid) + b"".join(fb(2, c) for c in cidrs)) for sid, cidrs in sets)
    u += b"".join(fb(10, s) for s in remove_sets)
    return u


def delimited(*updates):
    return b"".join(varint(len(u)) + u for u in updates)


TCP, UDP, SCTP, ICMP, ICMPV6, NUMBER, ANY = 2, 3, 4, 5, 6, 7, 1


def policy_updates():
    clear("policy_update")
    web = policy(
        "p-web",
        ingress=[
            rule(TCP, [port_range(8080, 8080)], [peer("10.0.0.0/8", "10.1.0.0/16")],
                 "shop/web ingress[0]", ["s-lb"]),
            rule(UDP, [port_range(53, 53), port_range(5000, 6000)], [peer("fd00::/8")]),
        ],
        egress=[
            rule(ICMP, [icmp(8, 0), icmp(3)], [peer("0.0.0.0/0")]),
            rule(ICMPV6, [icmp(128)], [peer("::/0")]),
            rule(NUMBER, [], [peer("10.0.0.0/8")], number=47),
            rule(ANY, [], [], sets=["s-db"]),
        ],
        groups=[fb(1, "shop") + fb(2, "web") + fv(3, 1)],
    )
    db = policy("p-db", ingress=[rule(SCTP, [port_range(9000, 9001)], [], sets=["s-web"])])
    layered = policy(
        "p-np",
        ingress=[rule(TCP, [port_range(80, 80)], [peer("10.0.0.0/16")], layer=1),
                 rule(TCP, [], [peer("10.0.0.0/8")], layer=0)],
        egress=[rule(UDP, [port_range(53, 53)], [], sets=["s-dns"], layer=1)],
        layered=True, in_layers=[0, 1], eg_layers=[1],
        groups=[fb(1, "shop") + fb(2, "dns-clients") + fv(3, 2) + fb(4, "NetworkPolicy")],
    )
    sets = [("s-lb", ["10.0.0.20/32"]), ("s-db", ["10.0.1.20/32", "fd00::1:20/128"]),
            ("s-web", ["10.0.0.10/32", "10.0.1.10/32"]), ("s-dns", ["10.0.1.53/32"])]
    pods = [(pod_ref("shop", "web-0", "u1"), "p-web"), (pod_ref("shop", "db-0", "u2"), "p-db"),
            (pod_ref("shop", "dns-0"), "p-np"), (pod_ref("shop", "plain-0"), "")]
    snap = update(1, True, policies=[web, db, layered], pods=pods, recheck=True, sets=sets)
    write("policy_update", "snapshot", delimited(snap))
    delta = update(2, base=1, sets=[("s-lb", ["10.0.0.20/32", "10.0.0.21/32"])],
                   pods=[(pod_ref("shop", "web-1", "u3"), "p-web")],
                   remove_pods=[pod_ref("shop", "plain-0")])
    write("policy_update", "snapshot-delta", delimited(snap, delta))
    gone = update(3, base=2, remove_policies=["p-db"], remove_sets=["s-web"],
                  remove_pods=[pod_ref("shop", "db-0", "u2")])
    write("policy_update", "snapshot-delta-delta", delimited(snap, delta, gone))
    # Refused: a set still named is removed; a pod naming a missing policy; a stale delta.
    write("policy_update", "unknown-set", delimited(snap, update(2, base=1, remove_sets=["s-lb"])))
    write("policy_update", "unknown-policy",
          delimited(update(5, True, pods=[(pod_ref("a", "b"), "nope")])))
    write("policy_update", "stale", delimited(snap, update(1, base=1)))
    write("policy_update", "invalid-cidr",
          delimited(update(1, True, policies=[policy("p", [rule(TCP, [], [peer("10.0.0.0/33")])])])))
    write("policy_update", "empty-snapshot", delimited(update(9, True, recheck=False)))


# --- manifests -----------------------------------------------------------------------------


def manifests():
    clear("manifests")
    demo = os.path.join(ROOT, "demo", "manifests")
    for n in sorted(os.listdir(demo)):
        with open(os.path.join(demo, n), "rb") as f:
            write("manifests", n, f.read())
    with open(os.path.join(FUZZ, "templates", "cluster.yaml"), "rb") as f:
        write("manifests", "cluster.yaml", f.read())
    write("manifests", "bad-document.yaml", "apiVersion: v1\nkind: Pod\nmetadata: [oops")
    write("manifests", "unknown-kind.yaml", "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n")
    write("manifests", "anchors.yaml",
          "a: &a [1, 2, 3]\nb: &b [*a, *a, *a]\nc: [*b, *b, *b]\n---\n--- !tag\n...\n")

    # The structured target reads its input as choices: an empty one is the templates as they
    # are; random bytes give mutated clusters (fixed seeds, so the corpus is stable).
    clear("manifest_values")
    write("manifest_values", "empty", b"")
    rng = random.Random(20261208)
    for i, n in enumerate((16, 64, 128, 256, 512, 1024)):
        write("manifest_values", f"random-{i}", bytes(rng.randrange(256) for _ in range(n)))


if __name__ == "__main__":
    packets()
    cni()
    policy_updates()
    manifests()
