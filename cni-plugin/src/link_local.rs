//! The pod's IPv6 link-local addresses, which its CNI result never lists.
//!
//! The agent's source check lets a pod send Neighbor Discovery, MLD and DHCPv6 from the link
//! scope. Knowing only the CNI result's addresses, it had to let those pass from *any* link-local
//! address, so a pod on a shared bridge could claim a neighbour's or the gateway's link-local
//! address in its neighbours' caches. The kernel gives the pod's interface its link-local address
//! when the primary plugin brings it up (from the MAC, or a stable or random one, per
//! `addr_gen_mode`), so by the time this plugin runs it is there to read; registered with the
//! endpoint, it becomes the only link-local address the pod may send as.

use std::{io, net::Ipv6Addr, path::Path};

use crate::veth::{in_netns, DiscoveryError};

/// The link-local addresses of `ifname` in the network namespace `netns`, as the kernel lists
/// them in `/proc/net/if_inet6` there (tentative ones included: duplicate address detection may
/// still be running). None when the namespace has no IPv6 (the file is absent).
pub fn addresses(netns: &Path, ifname: &str) -> Result<Vec<Ipv6Addr>, DiscoveryError> {
    // /proc/thread-self/net follows the reading thread's namespace (/proc/self/net would be the
    // main thread's).
    let text = in_netns(netns, || {
        match std::fs::read_to_string("/proc/thread-self/net/if_inet6") {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(String::new()),
            other => other,
        }
    })?
    .map_err(|source| DiscoveryError::Netns {
        path: netns.to_path_buf(),
        source,
    })?;
    Ok(parse_if_inet6(&text, ifname))
}

/// The link-local addresses of `ifname` in the text of `/proc/net/if_inet6`: one address per
/// line, as 32 hex digits, then the interface index, prefix length, scope, flags and name.
pub fn parse_if_inet6(text: &str, ifname: &str) -> Vec<Ipv6Addr> {
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let [hex, _, _, _, _, name] = fields.as_slice() else {
                return None;
            };
            if *name != ifname || hex.len() != 32 {
                return None;
            }
            let addr = Ipv6Addr::from(u128::from_str_radix(hex, 16).ok()?);
            addr.is_unicast_link_local().then_some(addr)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_named_interfaces_link_local_addresses_are_read() {
        let text = "\
fd000000000000000000000000000005 02 40 00 80     eth0
fe80000000000000a8c1abfffe123456 02 40 20 80     eth0
fe800000000000000000000000000099 03 40 20 80     eth1
00000000000000000000000000000001 01 80 10 80       lo
garbage
";
        assert_eq!(
            parse_if_inet6(text, "eth0"),
            vec!["fe80::a8c1:abff:fe12:3456"
                .parse::<Ipv6Addr>()
                .expect("addr")]
        );
        assert_eq!(parse_if_inet6(text, "eth2"), Vec::<Ipv6Addr>::new());
    }

    #[test]
    fn a_netns_that_cannot_be_entered_is_an_error() {
        assert!(matches!(
            addresses(Path::new("/nonexistent/netns"), "eth0"),
            Err(DiscoveryError::Netns { .. })
        ));
    }
}
