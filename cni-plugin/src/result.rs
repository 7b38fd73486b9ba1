//! CNI results: the `prevResult` kubesg reads the pod's interface and IPs from and passes on,
//! converted to the config's version, and the VERSION answer.
//!
//! Only what kubesg reads is typed (`interfaces[].name`/`sandbox`, `ips[].address`/`interface`/
//! `version`); every other field (`mac`, `gateway`, `routes`, `dns`, 1.1.0's `mtu`,
//! `socketPath`, …, and fields of later versions) is kept as it came, so a chained plugin never
//! loses what the plugins before it reported. Between versions only `ips[].version` changes:
//! 0.3.x and 0.4.0 results carry it ("4"/"6"), 1.x results do not (as libcni's
//! `types/040` ↔ `types/100` conversion).

use std::{os::unix::fs::MetadataExt, path::Path};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::{
    config::CniVersion,
    error::{CniError, ErrorCode},
};

/// A CNI result (0.3.0 to 1.1.0 shape).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CniResult {
    /// The version the result is written in.
    #[serde(
        rename = "cniVersion",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub cni_version: Option<String>,
    /// The interfaces the plugins created, host side and pod side.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interfaces: Option<Vec<Interface>>,
    /// The addresses assigned, each pointing at its interface by index.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ips: Option<Vec<IpConfig>>,
    /// Everything else (`routes`, `dns`, …), untouched.
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

/// An entry of `interfaces`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Interface {
    /// The interface's name (in its sandbox when it has one, on the host otherwise).
    pub name: String,
    /// The netns path of a pod-side interface; absent or empty for host interfaces.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<String>,
    /// `mac`, `mtu`, `socketPath`, `pciID`, …, untouched.
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

impl Interface {
    /// Whether this is a host-side interface (no sandbox).
    pub fn is_host_side(&self) -> bool {
        self.sandbox.as_deref().is_none_or(str::is_empty)
    }
}

/// An entry of `ips`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IpConfig {
    /// "4" or "6" before 1.0.0; absent from 1.0.0 on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// The address with its prefix length ("10.1.0.5/24").
    pub address: String,
    /// The index in `interfaces` of the interface the address is on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<usize>,
    /// `gateway`, …, untouched.
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

impl CniResult {
    /// Reads a result given as JSON. Its own `cniVersion` says which version it is in; without
    /// one it is in `default_version` (libcni's rule for `prevResult`). A version kubesg does not
    /// speak is code 1; anything else wrong (not an object, an address that is not a CIDR, an
    /// index past `interfaces`) is code 7.
    pub fn from_value(value: Value, default_version: CniVersion) -> Result<Self, CniError> {
        let invalid = |what: String| CniError::new(ErrorCode::InvalidNetworkConfig, what);
        if !value.is_object() {
            return Err(invalid(format!("prevResult is not a JSON object: {value}")));
        }
        let mut result: CniResult =
            serde_json::from_value(value).map_err(|e| invalid(format!("prevResult: {e}")))?;
        let version = match result.cni_version.as_deref() {
            None | Some("") => default_version,
            Some(v) => CniVersion::parse(v).ok_or_else(|| CniVersion::incompatible(v))?,
        };
        result.cni_version = Some(version.as_str().to_owned());
        let interfaces = result.interfaces.as_ref().map_or(0, Vec::len);
        for ip in result.ips.iter().flatten() {
            ip.address.parse::<IpNet>().map_err(|e| {
                invalid(format!(
                    "prevResult: ips[].address {:?} is not a CIDR: {e}",
                    ip.address
                ))
            })?;
            if let Some(i) = ip.interface.filter(|i| *i >= interfaces) {
                return Err(invalid(format!(
                    "prevResult: ips[] entry {} points at interface {i}, but there are only \
                     {interfaces}",
                    ip.address
                )));
            }
        }
        Ok(result)
    }

    /// The version the result is in (set by [`CniResult::from_value`]).
    pub fn version(&self) -> Option<CniVersion> {
        self.cni_version.as_deref().and_then(CniVersion::parse)
    }

    /// The result written in `to`: `cniVersion` set, `ips[].version` added (from the address's
    /// family) or removed; nothing else changes.
    pub fn into_version(mut self, to: CniVersion) -> CniResult {
        self.cni_version = Some(to.as_str().to_owned());
        for ip in self.ips.iter_mut().flatten() {
            if !to.ips_carry_version() {
                ip.version = None;
            } else if ip.version.is_none() {
                ip.version = match ip.address.parse::<IpNet>() {
                    Ok(IpNet::V4(_)) => Some("4".to_owned()),
                    Ok(IpNet::V6(_)) => Some("6".to_owned()),
                    Err(_) => None,
                };
            }
        }
        self
    }

    /// The index in `interfaces` of the pod's interface: named `ifname` with `sandbox` equal to
    /// `netns` (or naming the same namespace file by another path, e.g. `/var/run/netns/x` for
    /// `/run/netns/x`). Missing is code 7: the plugins before kubesg did not report the interface
    /// the runtime asked for.
    pub fn pod_interface(&self, netns: &Path, ifname: &str) -> Result<usize, CniError> {
        let interfaces = self.interfaces.as_deref().unwrap_or_default();
        let named = || {
            interfaces
                .iter()
                .enumerate()
                .filter(|(_, i)| i.name == ifname && !i.is_host_side())
        };
        let exact = named().find(|(_, i)| i.sandbox.as_deref().map(Path::new) == Some(netns));
        let same_file = || {
            let want = std::fs::metadata(netns).ok()?;
            named().find(|(_, i)| {
                i.sandbox
                    .as_deref()
                    .and_then(|s| std::fs::metadata(s).ok())
                    .is_some_and(|m| m.dev() == want.dev() && m.ino() == want.ino())
            })
        };
        exact.or_else(same_file).map(|(idx, _)| idx).ok_or_else(|| {
            CniError::new(
                ErrorCode::InvalidNetworkConfig,
                format!(
                    "prevResult has no interface {ifname:?} in sandbox {}: the plugins before \
                     kubesg-cni did not report the pod's interface",
                    netns.display()
                ),
            )
        })
    }

    /// The addresses of interface `index`. Results whose `ips` name no interface at all (allowed:
    /// `interface` is optional) are taken to be about the pod's only interface.
    pub fn pod_ips(&self, index: usize) -> Vec<IpNet> {
        let ips = self.ips.as_deref().unwrap_or_default();
        let any_indexed = ips.iter().any(|ip| ip.interface.is_some());
        ips.iter()
            .filter(|ip| !any_indexed || ip.interface == Some(index))
            .filter_map(|ip| ip.address.parse().ok())
            .collect()
    }

    /// The host-side interfaces (no sandbox), in the result's order: where the host end of the
    /// pod's veth is named, next to bridges and other host devices.
    pub fn host_interfaces(&self) -> impl Iterator<Item = &Interface> {
        self.interfaces
            .iter()
            .flatten()
            .filter(|i| i.is_host_side())
    }
}

/// The VERSION command's answer: the version of this output and every version kubesg speaks.
pub fn version_info() -> Value {
    json!({
        "cniVersion": CniVersion::LATEST.as_str(),
        "supportedVersions": CniVersion::SUPPORTED.iter().map(|v| v.as_str()).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A bridge plugin's result in 1.0.0 with everything a later plugin must keep.
    fn bridge_result_v1() -> Value {
        json!({
            "cniVersion": "1.0.0",
            "interfaces": [
                {"name": "cni0", "mac": "a6:2b:0a:c4:8c:ef"},
                {"name": "veth8ae5ce40", "mac": "7e:17:cb:f0:fe:bc", "mtu": 1450},
                {"name": "eth0", "mac": "8a:10:f6:3e:71:d1", "sandbox": "/run/netns/pod1"},
            ],
            "ips": [
                {"interface": 2, "address": "10.99.0.2/24", "gateway": "10.99.0.1"},
                {"interface": 2, "address": "fd99::2/64", "gateway": "fd99::1"},
            ],
            "routes": [{"dst": "0.0.0.0/0", "gw": "10.99.0.1"}, {"dst": "::/0"}],
            "dns": {"nameservers": ["10.96.0.10"], "search": ["svc.cluster.local"]},
        })
    }

    fn parse(v: Value) -> CniResult {
        CniResult::from_value(v, CniVersion::V1_0_0).expect("valid result")
    }

    fn to_json(r: CniResult) -> Value {
        serde_json::to_value(r).expect("serializes")
    }

    #[test]
    fn result_unchanged_in_its_own_version() {
        let r = parse(bridge_result_v1());
        assert_eq!(
            to_json(r.into_version(CniVersion::V1_0_0)),
            bridge_result_v1()
        );
    }

    #[test]
    fn converting_to_0_4_0_adds_ip_versions_and_keeps_everything_else() {
        let r = parse(bridge_result_v1()).into_version(CniVersion::V0_4_0);
        let mut want = bridge_result_v1();
        want["cniVersion"] = json!("0.4.0");
        want["ips"][0]["version"] = json!("4");
        want["ips"][1]["version"] = json!("6");
        assert_eq!(to_json(r), want);
    }

    #[test]
    fn round_trip_1_0_0_to_0_4_0_to_0_3_1_and_back_preserves_the_result() {
        let v040 = parse(bridge_result_v1()).into_version(CniVersion::V0_4_0);
        let v031 = parse(to_json(v040)).into_version(CniVersion::V0_3_1);
        let j031 = to_json(v031);
        assert_eq!(j031["cniVersion"], json!("0.3.1"));
        assert_eq!(j031["ips"][0]["version"], json!("4"));
        let back = parse(j031).into_version(CniVersion::V1_0_0);
        assert_eq!(to_json(back), bridge_result_v1());
    }

    #[test]
    fn round_trip_0_3_1_to_1_1_0_and_back_preserves_the_result() {
        let mut v031 = bridge_result_v1();
        v031["cniVersion"] = json!("0.3.1");
        v031["ips"][0]["version"] = json!("4");
        v031["ips"][1]["version"] = json!("6");
        let v110 = to_json(parse(v031.clone()).into_version(CniVersion::V1_1_0));
        assert_eq!(v110["cniVersion"], json!("1.1.0"));
        assert!(v110["ips"][0].get("version").is_none());
        assert_eq!(v110["routes"], v031["routes"]);
        assert_eq!(v110["dns"], v031["dns"]);
        assert_eq!(v110["interfaces"], v031["interfaces"]);
        assert_eq!(to_json(parse(v110).into_version(CniVersion::V0_3_1)), v031);
    }

    #[test]
    fn result_without_version_is_read_in_the_config_version() {
        let mut v = bridge_result_v1();
        v.as_object_mut().expect("object").remove("cniVersion");
        let r = CniResult::from_value(v, CniVersion::V0_4_0).expect("valid");
        assert_eq!(r.version(), Some(CniVersion::V0_4_0));
    }

    #[test]
    fn result_in_an_unsupported_version_is_code_1() {
        let err = CniResult::from_value(
            json!({"cniVersion": "0.2.0", "ip4": {"ip": "10.0.0.2/24"}}),
            CniVersion::V1_0_0,
        )
        .expect_err("0.2.0");
        assert_eq!(err.code, ErrorCode::IncompatibleVersion);
    }

    #[test]
    fn result_with_a_bad_address_or_index_is_code_7() {
        for bad in [
            json!({"cniVersion": "1.0.0", "ips": [{"address": "10.0.0.2"}]}),
            json!({"cniVersion": "1.0.0", "interfaces": [], "ips": [{"address": "10.0.0.2/24", "interface": 0}]}),
            json!({"cniVersion": "1.0.0", "interfaces": "eth0"}),
            json!([]),
        ] {
            let err = CniResult::from_value(bad.clone(), CniVersion::V1_0_0).expect_err("bad");
            assert_eq!(err.code, ErrorCode::InvalidNetworkConfig, "{bad}");
        }
    }

    #[test]
    fn pod_interface_is_the_named_one_in_the_sandbox() {
        let r = parse(bridge_result_v1());
        assert_eq!(
            r.pod_interface(Path::new("/run/netns/pod1"), "eth0").ok(),
            Some(2)
        );
        let other_ns = r
            .pod_interface(Path::new("/run/netns/pod2"), "eth0")
            .expect_err("other netns");
        assert_eq!(other_ns.code, ErrorCode::InvalidNetworkConfig);
        let host_name = r
            .pod_interface(Path::new("/run/netns/pod1"), "cni0")
            .expect_err("host interface");
        assert_eq!(host_name.code, ErrorCode::InvalidNetworkConfig);
    }

    #[test]
    fn pod_interface_matches_another_path_to_the_same_netns_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("ns");
        std::fs::write(&file, b"").expect("file");
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&file, &link).expect("symlink");
        let r = parse(json!({
            "cniVersion": "1.0.0",
            "interfaces": [{"name": "eth0", "sandbox": link.display().to_string()}],
        }));
        assert_eq!(r.pod_interface(&file, "eth0").ok(), Some(0));
    }

    #[test]
    fn pod_ips_are_those_on_the_pod_interface_both_families() {
        let mut v = bridge_result_v1();
        v["ips"]
            .as_array_mut()
            .expect("ips")
            .push(json!({"interface": 1, "address": "192.0.2.1/32"}));
        let r = parse(v);
        let want: Vec<IpNet> = vec![
            "10.99.0.2/24".parse().expect("v4"),
            "fd99::2/64".parse().expect("v6"),
        ];
        assert_eq!(r.pod_ips(2), want);
    }

    #[test]
    fn pod_ips_without_any_interface_index_are_all_the_ips() {
        let r = parse(json!({
            "cniVersion": "1.0.0",
            "interfaces": [{"name": "eth0", "sandbox": "/run/netns/p"}],
            "ips": [{"address": "10.0.0.2/24"}],
        }));
        assert_eq!(
            r.pod_ips(0),
            vec!["10.0.0.2/24".parse::<IpNet>().expect("net")]
        );
    }

    #[test]
    fn host_interfaces_are_those_without_sandbox() {
        let r = parse(bridge_result_v1());
        let names: Vec<&str> = r.host_interfaces().map(|i| i.name.as_str()).collect();
        assert_eq!(names, ["cni0", "veth8ae5ce40"]);
    }

    #[test]
    fn version_info_lists_every_supported_version() {
        assert_eq!(
            version_info(),
            json!({
                "cniVersion": "1.1.0",
                "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"],
            })
        );
    }
}
