//! The two rtnetlink questions host-side interface discovery asks: "what is this link" (its
//! index, name, kind and peer: `RTM_GETLINK`) and "which id does this network namespace have
//! here" (`RTM_GETNSID`).
//!
//! Netlink rather than `/sys/class/net`: sysfs shows the links of the network namespace that
//! mounted it, not of the calling thread, so a thread that entered a pod's netns with `setns`
//! would read the host's `eth0/iflink` in `/sys/class/net/eth0` (wrong and silent). A netlink
//! socket belongs to the namespace of the thread that opens it.

use std::{
    io,
    os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
};

// <linux/netlink.h>, <linux/rtnetlink.h>, <linux/if_link.h>, <linux/net_namespace.h>.
const NLMSG_HDRLEN: usize = 16;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 1;
const RTM_NEWLINK: u16 = 16;
const RTM_GETLINK: u16 = 18;
const RTM_NEWNSID: u16 = 88;
const RTM_GETNSID: u16 = 90;
const IFINFOMSG_LEN: usize = 16;
/// `struct rtgenmsg` is one byte, padded to the netlink alignment.
const RTGENMSG_LEN: usize = 4;
const IFLA_IFNAME: u16 = 3;
const IFLA_LINK: u16 = 5;
const IFLA_LINKINFO: u16 = 18;
const IFLA_INFO_KIND: u16 = 1;
const IFLA_LINK_NETNSID: u16 = 37;
const NETNSA_NSID: u16 = 1;
const NETNSA_FD: u16 = 3;
/// Attribute types carry `NLA_F_NESTED` and `NLA_F_NET_BYTEORDER` in their top bits.
const NLA_TYPE_MASK: u16 = 0x3fff;
/// Large enough for any link message of a veth or a bridge (no VF lists).
const RECV_BUFFER: usize = 64 * 1024;

/// What discovery needs to know about a link, in the namespace that was asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    /// Its index.
    pub index: u32,
    /// Its name.
    pub name: String,
    /// Its kind (`IFLA_INFO_KIND`: "veth", "bridge", …); `None` for physical devices.
    pub kind: Option<String>,
    /// `IFLA_LINK`: for a veth, the index of its peer in the peer's namespace.
    pub link: Option<u32>,
    /// `IFLA_LINK_NETNSID`: for a veth whose peer is in another namespace, that namespace's id
    /// as seen from here.
    pub link_netnsid: Option<i32>,
}

impl Link {
    /// Whether the link is one end of a veth pair.
    pub fn is_veth(&self) -> bool {
        self.kind.as_deref() == Some("veth")
    }
}

/// The link named `name` in the calling thread's network namespace, `None` when there is none.
pub fn link_by_name(name: &str) -> io::Result<Option<Link>> {
    let mut body = ifinfomsg(0);
    let mut cname = name.as_bytes().to_vec();
    cname.push(0);
    push_attr(&mut body, IFLA_IFNAME, &cname);
    get_link(body)
}

/// The link with index `index` in the calling thread's network namespace, `None` when there is
/// none.
pub fn link_by_index(index: u32) -> io::Result<Option<Link>> {
    let index = i32::try_from(index)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "ifindex out of range"))?;
    get_link(ifinfomsg(index))
}

/// The id the calling thread's network namespace gives the namespace `netns` (an open netns
/// file), as links report it in `IFLA_LINK_NETNSID`; `None` when it has none assigned.
pub fn netnsid_of(netns: BorrowedFd<'_>) -> io::Result<Option<i32>> {
    let mut body = vec![0u8; RTGENMSG_LEN];
    body[0] = libc::AF_UNSPEC as u8;
    let fd = u32::try_from(netns.as_raw_fd())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "negative fd"))?;
    push_attr(&mut body, NETNSA_FD, &fd.to_ne_bytes());
    let Some(payload) = request(RTM_GETNSID, RTM_NEWNSID, &body)? else {
        return Ok(None);
    };
    let attrs = payload.get(RTGENMSG_LEN..).unwrap_or_default();
    let nsid = attributes(attrs)
        .find(|(t, _)| *t == NETNSA_NSID)
        .and_then(|(_, v)| read_u32(v))
        .map(|v| v as i32)
        .filter(|id| *id >= 0);
    Ok(nsid)
}

/// Sends `RTM_GETLINK` with `body` and decodes the answer.
fn get_link(body: Vec<u8>) -> io::Result<Option<Link>> {
    let Some(payload) = request(RTM_GETLINK, RTM_NEWLINK, &body)? else {
        return Ok(None);
    };
    if payload.len() < IFINFOMSG_LEN {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "short RTM_NEWLINK message",
        ));
    }
    let index = read_u32(&payload[4..8]).unwrap_or_default();
    let mut link = Link {
        index,
        name: String::new(),
        kind: None,
        link: None,
        link_netnsid: None,
    };
    for (kind, value) in attributes(&payload[IFINFOMSG_LEN..]) {
        match kind {
            IFLA_IFNAME => link.name = c_string(value),
            IFLA_LINK => link.link = read_u32(value),
            IFLA_LINK_NETNSID => link.link_netnsid = read_u32(value).map(|v| v as i32),
            IFLA_LINKINFO => {
                link.kind = attributes(value)
                    .find(|(t, _)| *t == IFLA_INFO_KIND)
                    .map(|(_, v)| c_string(v));
            }
            _ => {}
        }
    }
    Ok(Some(link))
}

/// An `ifinfomsg` asking for link `index` (0: by name, in an `IFLA_IFNAME` attribute).
fn ifinfomsg(index: i32) -> Vec<u8> {
    let mut body = vec![0u8; IFINFOMSG_LEN];
    body[0] = libc::AF_UNSPEC as u8;
    body[4..8].copy_from_slice(&index.to_ne_bytes());
    body
}

/// Appends a netlink attribute, padded to 4 bytes.
fn push_attr(buf: &mut Vec<u8>, kind: u16, value: &[u8]) {
    let len = 4 + value.len();
    buf.extend_from_slice(&(len as u16).to_ne_bytes());
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(value);
    buf.resize(buf.len() + (align4(len) - len), 0);
}

/// Sends one request of type `kind` and returns the payload of the answer of type `answer`, or
/// `None` when the kernel answers `ENODEV`/`ENOENT` (no such link or namespace).
fn request(kind: u16, answer: u16, body: &[u8]) -> io::Result<Option<Vec<u8>>> {
    const SEQ: u32 = 1;
    let sock = open_socket()?;
    let mut msg = Vec::with_capacity(NLMSG_HDRLEN + body.len());
    msg.extend_from_slice(&((NLMSG_HDRLEN + body.len()) as u32).to_ne_bytes());
    msg.extend_from_slice(&kind.to_ne_bytes());
    msg.extend_from_slice(&NLM_F_REQUEST.to_ne_bytes());
    msg.extend_from_slice(&SEQ.to_ne_bytes());
    msg.extend_from_slice(&0u32.to_ne_bytes());
    msg.extend_from_slice(body);
    // SAFETY: the buffer is valid for its length.
    let sent = unsafe { libc::send(sock.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut buf = vec![0u8; RECV_BUFFER];
    loop {
        // SAFETY: the buffer is valid for its length.
        let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        let mut rest = &buf[..n as usize];
        while rest.len() >= NLMSG_HDRLEN {
            let len = read_u32(&rest[0..4]).unwrap_or_default() as usize;
            let msg_kind = u16::from_ne_bytes([rest[4], rest[5]]);
            let seq = read_u32(&rest[8..12]).unwrap_or_default();
            if len < NLMSG_HDRLEN || len > rest.len() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "truncated netlink message",
                ));
            }
            let payload = &rest[NLMSG_HDRLEN..len];
            rest = rest.get(align4(len)..).unwrap_or_default();
            if seq != SEQ {
                continue;
            }
            match msg_kind {
                NLMSG_ERROR => {
                    let errno = payload.get(0..4).and_then(read_u32).unwrap_or_default() as i32;
                    match -errno {
                        0 => continue,
                        libc::ENODEV | libc::ENOENT => return Ok(None),
                        e => return Err(io::Error::from_raw_os_error(e)),
                    }
                }
                NLMSG_DONE => return Ok(None),
                k if k == answer => return Ok(Some(payload.to_vec())),
                _ => {}
            }
        }
    }
}

/// A `NETLINK_ROUTE` socket in the calling thread's network namespace, with a receive timeout
/// so that a kernel that never answers cannot hang a CNI call.
fn open_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2) call; the descriptor is owned at once.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let timeout = libc::timeval {
        tv_sec: 5,
        tv_usec: 0,
    };
    // SAFETY: the option value is a valid timeval for its length.
    let r = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&timeout as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(sock)
}

/// The attributes in `buf`, as (type, value); stops at the first malformed one.
fn attributes(mut buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if buf.len() < 4 {
            return None;
        }
        let len = usize::from(u16::from_ne_bytes([buf[0], buf[1]]));
        let kind = u16::from_ne_bytes([buf[2], buf[3]]) & NLA_TYPE_MASK;
        if len < 4 || len > buf.len() {
            return None;
        }
        let value = &buf[4..len];
        buf = buf.get(align4(len)..).unwrap_or_default();
        Some((kind, value))
    })
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

fn read_u32(b: &[u8]) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(0..4)?.try_into().ok()?))
}

/// A NUL-terminated string attribute.
fn c_string(b: &[u8]) -> String {
    let end = b.iter().position(|c| *c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_is_found_by_name_and_by_index() {
        let lo = link_by_name("lo")
            .expect("netlink works")
            .expect("every namespace has lo");
        assert_eq!(lo.name, "lo");
        assert!(!lo.is_veth());
        assert_eq!(link_by_index(lo.index).expect("netlink works"), Some(lo));
    }

    #[test]
    fn missing_link_is_none_not_an_error() {
        assert_eq!(link_by_name("kubesgnone0").expect("netlink works"), None);
        assert_eq!(link_by_index(0x7fff_fff0).expect("netlink works"), None);
    }

    #[test]
    fn attributes_are_read_back_as_written_with_padding() {
        let mut buf = Vec::new();
        push_attr(&mut buf, IFLA_IFNAME, b"eth0\0");
        push_attr(&mut buf, IFLA_LINK, &7u32.to_ne_bytes());
        assert_eq!(buf.len() % 4, 0);
        let attrs: Vec<(u16, &[u8])> = attributes(&buf).collect();
        assert_eq!(attrs.len(), 2);
        assert_eq!(c_string(attrs[0].1), "eth0");
        assert_eq!(read_u32(attrs[1].1), Some(7));
    }
}
