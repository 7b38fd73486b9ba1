//! Content fingerprints: a canonical binary encoding of compiled rules, hashed with SHA-256.
//!
//! Policy ids are derived from them, so identical policies share an id and an unchanged policy
//! keeps it across recompiles and operator restarts. A cryptographic hash, because whoever may
//! write a SecurityGroup in one namespace must not be able to craft rules whose id collides with
//! another namespace's policy (a node keys policies by id). Every variable-length field is
//! length-prefixed, so no two different contents encode alike.

use std::net::IpAddr;

use ipnet::IpNet;
use ring::digest::{Context, SHA256};

use crate::plan::{PeerBlock, PortSpec, RuleProtocol};

/// A fingerprint: the first 128 bits of a SHA-256, plenty against accidental collisions and
/// still beyond reach of deliberate ones.
pub type Fingerprint = [u8; 16];

/// Builds one fingerprint from a sequence of typed fields.
pub struct Hasher(Context);

impl Default for Hasher {
    fn default() -> Self {
        Hasher(Context::new(&SHA256))
    }
}

impl Hasher {
    /// A hasher for a kind of content: the tag keeps, say, a rule and a policy with the same
    /// bytes apart.
    pub fn new(tag: &str) -> Self {
        let mut h = Hasher::default();
        h.str(tag);
        h
    }

    /// A byte.
    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.0.update(&[v]);
        self
    }

    /// A 16-bit number.
    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.0.update(&v.to_be_bytes());
        self
    }

    /// A length or count.
    pub fn count(&mut self, v: usize) -> &mut Self {
        self.0.update(&(v as u64).to_be_bytes());
        self
    }

    /// A 64-bit signed number.
    pub fn i64(&mut self, v: i64) -> &mut Self {
        self.0.update(&v.to_be_bytes());
        self
    }

    /// A string, length-prefixed.
    pub fn str(&mut self, s: &str) -> &mut Self {
        self.count(s.len());
        self.0.update(s.as_bytes());
        self
    }

    /// Another fingerprint.
    pub fn fingerprint(&mut self, f: &Fingerprint) -> &mut Self {
        self.0.update(f);
        self
    }

    /// A protocol.
    pub fn protocol(&mut self, p: RuleProtocol) -> &mut Self {
        self.u8(match p {
            RuleProtocol::Any => 0,
            RuleProtocol::Tcp => 1,
            RuleProtocol::Udp => 2,
            RuleProtocol::Sctp => 3,
            RuleProtocol::Icmp => 4,
            RuleProtocol::Icmpv6 => 5,
        })
    }

    /// A list of port specs.
    pub fn ports(&mut self, ports: &[PortSpec]) -> &mut Self {
        self.count(ports.len());
        for p in ports {
            match *p {
                PortSpec::Range { first, last } => {
                    self.u8(0).u16(first).u16(last);
                }
                PortSpec::Icmp { icmp_type, code } => {
                    self.u8(1).u8(icmp_type);
                    match code {
                        None => self.u8(0),
                        Some(c) => self.u8(1).u8(c),
                    };
                }
            }
        }
        self
    }

    /// A block (family, address, prefix length).
    pub fn net(&mut self, n: &IpNet) -> &mut Self {
        match n.addr() {
            IpAddr::V4(a) => {
                self.u8(4);
                self.0.update(&a.octets());
            }
            IpAddr::V6(a) => {
                self.u8(6);
                self.0.update(&a.octets());
            }
        }
        self.u8(n.prefix_len())
    }

    /// A list of peer blocks.
    pub fn peers(&mut self, peers: &[PeerBlock]) -> &mut Self {
        self.count(peers.len());
        for b in peers {
            self.net(&b.cidr).count(b.except.len());
            for e in &b.except {
                self.net(e);
            }
        }
        self
    }

    /// The fingerprint.
    pub fn finish(self) -> Fingerprint {
        let d = self.0.finish();
        let mut out = [0u8; 16];
        out.copy_from_slice(&d.as_ref()[..16]);
        out
    }
}

/// Lowercase hex of a fingerprint (a policy id).
pub fn hex(f: &Fingerprint) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(32);
    for b in f {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn length_prefixes_keep_adjacent_strings_apart() {
        let mut a = Hasher::new("t");
        a.str("ab").str("c");
        let mut b = Hasher::new("t");
        b.str("a").str("bc");
        assert_ne!(a.finish(), b.finish());
    }

    #[test]
    fn tags_keep_kinds_apart_and_equal_input_hashes_alike() {
        let mut a = Hasher::new("rule");
        a.u16(80);
        let mut b = Hasher::new("policy");
        b.u16(80);
        let mut c = Hasher::new("rule");
        c.u16(80);
        let (a, b, c) = (a.finish(), b.finish(), c.finish());
        assert_ne!(a, b);
        assert_eq!(a, c);
    }

    #[test]
    fn hex_is_32_lowercase_digits() {
        let h = hex(&[0xab; 16]);
        assert_eq!(h.len(), 32);
        assert_eq!(&h[..4], "abab");
    }

    #[test]
    fn families_with_the_same_bytes_differ() {
        let mut a = Hasher::default();
        a.net(&"0.0.0.0/0".parse().unwrap());
        let mut b = Hasher::default();
        b.net(&"::/0".parse().unwrap());
        assert_ne!(a.finish(), b.finish());
    }
}
