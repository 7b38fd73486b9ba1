//! Named network namespaces (`ip netns`), removed when dropped, with unique names so tests run in
//! parallel without colliding.

use std::{
    fs::File,
    io::{self, Read, Write},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
    process::{Command, Output},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use nix::sched::{setns, CloneFlags};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A name unique to this process and call, short enough for an interface name (≤ 15 bytes):
/// `prefix` (keep it ≤ 4 bytes), the pid and a counter.
pub fn unique_name(prefix: &str) -> String {
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}{:x}x{n:x}", std::process::id() % 0x10_0000)
}

/// Runs a command, failing with its stderr when it exits non-zero.
pub fn run(cmd: &str, args: &[&str]) -> io::Result<Output> {
    let out = Command::new(cmd).args(args).output()?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "{cmd} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(out)
}

/// Runs `f` on a thread inside the named network namespace (`/run/netns/<name>`): for
/// namespaces known by name only, e.g. a node's, where a child process (the agent, the operator)
/// serves its metrics.
pub fn in_named<T: Send>(name: &str, f: impl FnOnce() -> T + Send) -> io::Result<T> {
    let path = format!("/run/netns/{name}");
    std::thread::scope(|s| {
        s.spawn(|| {
            let file = File::open(&path)?;
            setns(&file, CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
            Ok(f())
        })
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p))
    })
}

/// One HTTP/1.1 GET of `path` on `addr` from inside the named namespace: (status, body). Enough
/// for the `/metrics`, `/healthz` and `/readyz` endpoints of the agent and the operator, without
/// an HTTP client in the fixtures.
pub fn http_get(netns: &str, addr: SocketAddr, path: &str) -> io::Result<(u16, String)> {
    let mut stream = in_named(netns, || {
        TcpStream::connect_timeout(&addr, Duration::from_secs(2))
    })??;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| io::Error::other(format!("not an HTTP response: {response:?}")))?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

/// A named network namespace, deleted on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates a namespace named `unique_name(prefix)` with its loopback up.
    pub fn new(prefix: &str) -> io::Result<Self> {
        let name = unique_name(prefix);
        run("ip", &["netns", "add", &name])?;
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Its name (for `ip -n`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `ip -n <name> args…`.
    pub fn ip(&self, args: &[&str]) -> io::Result<Output> {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        run("ip", &full)
    }

    /// Runs a command inside the namespace (`ip netns exec`), returning its output whatever its
    /// exit status.
    pub fn exec(&self, cmd: &str, args: &[&str]) -> io::Result<Output> {
        Command::new("ip")
            .args(["netns", "exec", &self.name, cmd])
            .args(args)
            .output()
    }

    /// Runs `f` on a thread that has entered the namespace, and returns its result. Sockets
    /// created inside stay in the namespace when handed back; interface indexes and netlink
    /// calls inside refer to the namespace.
    pub fn enter<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = format!("/run/netns/{}", self.name);
        std::thread::scope(|s| {
            s.spawn(|| {
                let file = File::open(&path).unwrap_or_else(|e| panic!("opening {path}: {e}"));
                setns(&file, CloneFlags::CLONE_NEWNET)
                    .unwrap_or_else(|e| panic!("entering {path}: {e}"));
                f()
            })
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
        })
    }

    /// The index of interface `ifname` in this namespace.
    pub fn ifindex(&self, ifname: &str) -> io::Result<u32> {
        self.enter(|| nix::net::if_::if_nametoindex(ifname).map_err(io::Error::from))
    }

    /// The MAC address of interface `ifname` in the namespace: the destination a crafted frame
    /// needs for the interface to take it as its own.
    pub fn mac(&self, ifname: &str) -> io::Result<[u8; 6]> {
        let out = self.ip(&["-o", "link", "show", "dev", ifname])?;
        let text = String::from_utf8_lossy(&out.stdout);
        let bad = || io::Error::other(format!("no MAC address for {ifname} in: {text}"));
        let word = text
            .split_whitespace()
            .skip_while(|w| *w != "link/ether")
            .nth(1)
            .ok_or_else(bad)?;
        let mut mac = [0u8; 6];
        let mut parts = word.split(':');
        for b in &mut mac {
            *b = parts
                .next()
                .and_then(|p| u8::from_str_radix(p, 16).ok())
                .ok_or_else(bad)?;
        }
        Ok(mac)
    }

    /// Sends whole Ethernet `frames` out of interface `ifname` of the namespace through an
    /// `AF_PACKET` socket: they leave byte for byte, through the interface's tc egress hook,
    /// whatever their addresses say. For what no stack would send: a reset spoofed from the
    /// node, a malformed frame. Returns how many of them the way out dropped (a tc egress
    /// program's `TC_ACT_SHOT` fails the send with `ENOBUFS`).
    pub fn send_frames(&self, ifname: &str, frames: &[Vec<u8>]) -> io::Result<usize> {
        let ifindex = self.ifindex(ifname)?;
        self.enter(|| {
            // SAFETY: plain socket(2) call; the descriptor is owned at once.
            let fd =
                unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: `fd` is a fresh descriptor nobody else owns.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            // SAFETY: sockaddr_ll is plain data; zero is a valid value for every field.
            let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            addr.sll_family = libc::AF_PACKET as u16;
            addr.sll_ifindex = ifindex as i32;
            addr.sll_halen = 6;
            let mut dropped = 0;
            for frame in frames {
                if let Some(dst) = frame.get(..6) {
                    addr.sll_addr[..6].copy_from_slice(dst);
                }
                // SAFETY: the buffer and address are valid for the duration of the call and
                // their lengths are passed with them.
                let n = unsafe {
                    libc::sendto(
                        fd.as_raw_fd(),
                        frame.as_ptr().cast(),
                        frame.len(),
                        0,
                        (&addr as *const libc::sockaddr_ll).cast(),
                        std::mem::size_of::<libc::sockaddr_ll>() as u32,
                    )
                };
                if n < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::ENOBUFS) {
                    dropped += 1;
                } else if n != frame.len() as isize {
                    return Err(io::Error::other(format!(
                        "sending a {}-byte frame on {ifname}: {}",
                        frame.len(),
                        io::Error::last_os_error()
                    )));
                }
            }
            Ok(dropped)
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// Traffic from inside the namespace: sockets are created on a thread that entered it, so they
/// send and receive there wherever they are used afterwards.
impl Netns {
    /// A TCP listener bound to `addr` inside the namespace (bind before connecting: the bound
    /// listener is the server's readiness).
    pub fn tcp_listen(&self, addr: SocketAddr) -> io::Result<TcpListener> {
        self.enter(|| TcpListener::bind(addr))
    }

    /// Connects to `remote` from inside the namespace, from `local` when given (a fixed source
    /// port makes conntrack lines comparable between runs), waiting at most `timeout`: a dropped
    /// SYN gives `ErrorKind::TimedOut`, a RST `ErrorKind::ConnectionRefused`. The stream reads and
    /// writes with `timeout` too.
    pub fn tcp_connect(
        &self,
        local: Option<SocketAddr>,
        remote: SocketAddr,
        timeout: Duration,
    ) -> io::Result<TcpStream> {
        let stream = self.enter(|| match local {
            None => TcpStream::connect_timeout(&remote, timeout),
            Some(local) => connect_from(local, remote, timeout),
        })?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        Ok(stream)
    }

    /// A UDP socket bound to `addr` inside the namespace, whose receives give up after
    /// `read_timeout` (`ErrorKind::WouldBlock` or `TimedOut`).
    pub fn udp_bind(&self, addr: SocketAddr, read_timeout: Duration) -> io::Result<UdpSocket> {
        let sock = self.enter(|| UdpSocket::bind(addr))?;
        sock.set_read_timeout(Some(read_timeout))?;
        Ok(sock)
    }

    /// Sends one ICMP echo request to `dst` with `ping` (identifier `id` when given, so the
    /// conntrack entry is predictable) and reports whether the reply came within `timeout`
    /// (rounded up to whole seconds, as `ping -W` takes them). Any other failure of `ping` (exit
    /// status other than 0 or 1) is an error, never a "no reply".
    pub fn ping(&self, dst: IpAddr, id: Option<u16>, timeout: Duration) -> io::Result<bool> {
        let wait = timeout.as_secs() + u64::from(timeout.subsec_nanos() > 0);
        let wait = wait.max(1).to_string();
        let dst = dst.to_string();
        let id = id.map(|i| i.to_string());
        let mut args = vec!["-n", "-c", "1", "-W", wait.as_str()];
        if let Some(id) = &id {
            args.extend_from_slice(&["-e", id.as_str()]);
        }
        args.push(dst.as_str());
        let out = self.exec("ping", &args)?;
        match out.status.code() {
            Some(0) => Ok(true),
            Some(1) => Ok(false),
            _ => Err(io::Error::other(format!(
                "ping {} in {}: {}{}",
                args.join(" "),
                self.name,
                String::from_utf8_lossy(&out.stdout).trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            ))),
        }
    }

    /// A raw socket of the namespace: `protocol` `libc::IPPROTO_RAW` sends whole IP packets
    /// (crafted segments the pod's own stack would never send); `libc::IPPROTO_TCP` (or another
    /// protocol) receives a copy of every such packet addressed to the namespace.
    pub fn raw_socket(&self, v6: bool, protocol: i32) -> io::Result<RawSocket> {
        let domain = if v6 { libc::AF_INET6 } else { libc::AF_INET };
        self.enter(|| {
            // SAFETY: plain socket(2) call; the descriptor is owned at once.
            let fd = unsafe { libc::socket(domain, libc::SOCK_RAW | libc::SOCK_CLOEXEC, protocol) };
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: `fd` is a fresh descriptor nobody else owns.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            Ok(RawSocket { fd, v6 })
        })
    }

    /// Reads the kernel's own conntrack table of the namespace (`/proc/net/nf_conntrack`), one
    /// entry a line.
    pub fn nf_conntrack(&self) -> io::Result<Vec<String>> {
        let out = self.exec("cat", &["/proc/net/nf_conntrack"])?;
        if !out.status.success() {
            return Err(io::Error::other(format!(
                "reading /proc/net/nf_conntrack in {}: {}",
                self.name,
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(str::to_owned)
            .collect())
    }

    /// Turns on the kernel's connection tracking for what the namespace sends, IPv4 and IPv6
    /// (`-m conntrack --ctstate NEW,ESTABLISHED,RELATED -j ACCEPT` in OUTPUT), with
    /// `nf_conntrack_tcp_loose=0` (only a SYN opens a TCP connection, as in kubesg): the
    /// reference kubesg's table is compared with.
    pub fn track_with_kernel_conntrack(&self) -> io::Result<()> {
        for tool in ["iptables", "ip6tables"] {
            self.exec_ok(
                tool,
                &[
                    "-A",
                    "OUTPUT",
                    "-m",
                    "conntrack",
                    "--ctstate",
                    "NEW,ESTABLISHED,RELATED",
                    "-j",
                    "ACCEPT",
                ],
            )?;
        }
        self.exec_ok("sysctl", &["-qw", "net.netfilter.nf_conntrack_tcp_loose=0"])?;
        Ok(())
    }

    /// Runs a command inside the namespace, failing with its stderr when it exits non-zero.
    pub fn exec_ok(&self, cmd: &str, args: &[&str]) -> io::Result<Output> {
        let out = self.exec(cmd, args)?;
        if !out.status.success() {
            return Err(io::Error::other(format!(
                "{cmd} {} in {}: {}",
                args.join(" "),
                self.name,
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(out)
    }
}

/// Writes `total` bytes (whole MiB) from `tx` to `rx` and returns how many `rx` received: a
/// bulk transfer that ends, rather than hangs, when the path stops carrying it (each side gives
/// up after 5 s without progress).
pub fn transfer(mut tx: TcpStream, mut rx: TcpStream, total: usize) -> io::Result<usize> {
    const CHUNK: usize = 1 << 20;
    rx.set_read_timeout(Some(Duration::from_secs(5)))?;
    tx.set_write_timeout(Some(Duration::from_secs(5)))?;
    let reader = std::thread::spawn(move || {
        let mut buf = vec![0u8; CHUNK];
        let mut got = 0;
        while got < total {
            match rx.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => got += n,
            }
        }
        got
    });
    let chunk = vec![0x5a; CHUNK];
    for _ in 0..total / CHUNK {
        if tx.write_all(&chunk).is_err() {
            break;
        }
    }
    reader
        .join()
        .map_err(|_| io::Error::other("the transfer's reader panicked"))
}

/// Accepts one connection on `listener`, giving up with `ErrorKind::TimedOut` after `timeout`
/// (std's `accept` blocks for ever, which would hang a failing test).
pub fn accept_within(listener: &TcpListener, timeout: Duration) -> io::Result<TcpStream> {
    if !wait_readable(listener.as_fd(), timeout)? {
        return Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("no connection within {timeout:?}"),
        ));
    }
    let (stream, _) = listener.accept()?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    Ok(stream)
}

/// Receives that wait at most the socket's read timeout, even when the wait is interrupted.
///
/// The kernel never restarts a receive on a socket with `SO_RCVTIMEO` (signal(7)), and a process
/// that is stopped and continued (a paused CI machine, a debugger) sees such a receive fail with
/// `EINTR` even without a signal handler. These retry with what is left of the timeout, so a
/// test reads an interruption neither as "dropped" nor as a failure.
pub trait RecvWithin {
    /// `recv`, retried when interrupted.
    fn recv_within(&self, buf: &mut [u8]) -> io::Result<usize>;
    /// `recv_from`, retried when interrupted.
    fn recv_from_within(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)>;
}

impl RecvWithin for UdpSocket {
    fn recv_within(&self, buf: &mut [u8]) -> io::Result<usize> {
        retry_interrupted(
            self.read_timeout()?,
            |t| self.set_read_timeout(t),
            || self.recv(buf),
        )
    }

    fn recv_from_within(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
        retry_interrupted(
            self.read_timeout()?,
            |t| self.set_read_timeout(t),
            || self.recv_from(buf),
        )
    }
}

/// `read` on a stream with a read timeout, retried when interrupted (see [`RecvWithin`]).
pub fn read_within(mut stream: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    retry_interrupted(
        stream.read_timeout()?,
        |t| stream.set_read_timeout(t),
        || stream.read(buf),
    )
}

/// Runs `op` until it is not interrupted, shortening the socket's timeout (set through `set`) to
/// what is left of `timeout` for each retry and restoring it afterwards.
fn retry_interrupted<T>(
    timeout: Option<Duration>,
    set: impl Fn(Option<Duration>) -> io::Result<()>,
    mut op: impl FnMut() -> io::Result<T>,
) -> io::Result<T> {
    let deadline = timeout.map(|t| Instant::now() + t);
    let mut shortened = false;
    let result = loop {
        match op() {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {
                let Some(deadline) = deadline else { continue };
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "interrupted at the end of the read timeout",
                    ));
                }
                set(Some(left))?;
                shortened = true;
            }
            other => break other,
        }
    };
    if shortened {
        set(timeout)?;
    }
    result
}

/// Whether an error is a receive or connect timeout (`WouldBlock` and `TimedOut` both mean it).
pub fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// A raw IP socket living in a namespace (see [`Netns::raw_socket`]).
#[derive(Debug)]
pub struct RawSocket {
    fd: OwnedFd,
    v6: bool,
}

impl RawSocket {
    /// Sends `packet` to `dst`. On an `IPPROTO_RAW` socket `packet` is the whole IP packet,
    /// header included.
    pub fn send_to(&self, packet: &[u8], dst: IpAddr) -> io::Result<()> {
        let (addr, len) = sockaddr_of(SocketAddr::new(dst, 0));
        // SAFETY: the buffer and the address are valid for the lengths passed.
        let n = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                packet.as_ptr().cast(),
                packet.len(),
                0,
                (&addr as *const libc::sockaddr_storage).cast(),
                len,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// The next packet received within `timeout` as `(source, transport segment)` (the IPv4
    /// header, which IPv4 raw sockets deliver, is stripped), or `None` when none came.
    pub fn recv_within(&self, timeout: Duration) -> io::Result<Option<(IpAddr, Vec<u8>)>> {
        if !wait_readable(self.fd.as_fd(), timeout)? {
            return Ok(None);
        }
        let mut buf = vec![0u8; 65536];
        // SAFETY: zeroed sockaddr_storage is a valid value.
        let mut from: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        let mut from_len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        // SAFETY: the buffer and the address are valid for the lengths passed.
        let n = unsafe {
            libc::recvfrom(
                self.fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
                (&mut from as *mut libc::sockaddr_storage).cast(),
                &mut from_len,
            )
        };
        let Some(n) = received(n)? else {
            return Ok(None);
        };
        buf.truncate(n);
        let src = ip_of_sockaddr(&from)?;
        if !self.v6 {
            let ihl = usize::from(buf.first().copied().unwrap_or(0) & 0x0f) * 4;
            if ihl < 20 || ihl > buf.len() {
                return Err(io::Error::other("short IPv4 packet on a raw socket"));
            }
            buf.drain(..ihl);
        }
        Ok(Some((src, buf)))
    }

    /// The whole length of the next packet received within `timeout` (its IPv4 header included
    /// for IPv4), however large (a GRO packet of BIG TCP is over 64 KiB), or `None` when none
    /// came. The packet itself is discarded.
    pub fn recv_len_within(&self, timeout: Duration) -> io::Result<Option<usize>> {
        if !wait_readable(self.fd.as_fd(), timeout)? {
            return Ok(None);
        }
        let mut byte = [0u8; 1];
        // SAFETY: the buffer is valid for its length; MSG_TRUNC makes a raw socket return the
        // packet's real length.
        let n = unsafe {
            libc::recv(
                self.fd.as_raw_fd(),
                byte.as_mut_ptr().cast(),
                byte.len(),
                libc::MSG_DONTWAIT | libc::MSG_TRUNC,
            )
        };
        received(n)
    }

    /// Sets the receive buffer to `bytes`, above `rmem_max` (`SO_RCVBUFFORCE`, root): a copy of
    /// every segment of a bulk transfer, or one BIG TCP packet, needs more than the default.
    pub fn force_receive_buffer(&self, bytes: usize) -> io::Result<()> {
        let value = bytes as libc::c_int;
        // SAFETY: plain setsockopt(2) with a valid int and its size.
        let rc = unsafe {
            libc::setsockopt(
                self.fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVBUFFORCE,
                (&value as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Waits up to `timeout` for a packet for which `want(source, segment)` holds, skipping the
    /// others; returns it, or `None` when none came in time.
    pub fn wait_for(
        &self,
        timeout: Duration,
        mut want: impl FnMut(IpAddr, &[u8]) -> bool,
    ) -> io::Result<Option<(IpAddr, Vec<u8>)>> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.recv_within(left)? {
                Some((src, seg)) if want(src, &seg) => return Ok(Some((src, seg))),
                Some(_) => {}
                None => return Ok(None),
            }
            if left.is_zero() {
                return Ok(None);
            }
        }
    }
}

/// What a non-blocking `recv(2)` returned: its length, `None` when nothing was queued, or the
/// error.
fn received(n: isize) -> io::Result<Option<usize>> {
    if n >= 0 {
        return Ok(Some(n as usize));
    }
    let e = io::Error::last_os_error();
    if e.kind() == io::ErrorKind::WouldBlock {
        Ok(None)
    } else {
        Err(e)
    }
}

/// Whether `fd` becomes readable within `timeout`.
fn wait_readable(fd: BorrowedFd<'_>, timeout: Duration) -> io::Result<bool> {
    poll_within(fd, libc::POLLIN, timeout)
}

/// Whether one of `events` happens on `fd` within `timeout` (`poll`, retried when interrupted).
fn poll_within(fd: BorrowedFd<'_>, events: libc::c_short, timeout: Duration) -> io::Result<bool> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let mut pfd = libc::pollfd {
            fd: fd.as_raw_fd(),
            events,
            revents: 0,
        };
        let ms = left.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut pfd, 1, ms) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        return Ok(n > 0);
    }
}

/// `addr` as a C socket address and its length.
fn sockaddr_of(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: zeroed sockaddr_storage is a valid value.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in.
            unsafe { std::ptr::write((&mut ss as *mut libc::sockaddr_storage).cast(), sin) };
            std::mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in6.
            unsafe { std::ptr::write((&mut ss as *mut libc::sockaddr_storage).cast(), sin6) };
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (ss, len as libc::socklen_t)
}

/// The address in a C socket address.
fn ip_of_sockaddr(ss: &libc::sockaddr_storage) -> io::Result<IpAddr> {
    match i32::from(ss.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in.
            let sin: libc::sockaddr_in =
                unsafe { std::ptr::read((ss as *const libc::sockaddr_storage).cast()) };
            Ok(IpAddr::from(sin.sin_addr.s_addr.to_ne_bytes()))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says the storage holds a sockaddr_in6.
            let sin6: libc::sockaddr_in6 =
                unsafe { std::ptr::read((ss as *const libc::sockaddr_storage).cast()) };
            Ok(IpAddr::from(sin6.sin6_addr.s6_addr))
        }
        f => Err(io::Error::other(format!("unexpected address family {f}"))),
    }
}

/// `connect(2)` from a fixed local address with a timeout (std cannot bind before connecting).
fn connect_from(local: SocketAddr, remote: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    let domain = if remote.is_ipv6() {
        libc::AF_INET6
    } else {
        libc::AF_INET
    };
    // SAFETY: plain socket(2) call; the descriptor is owned at once.
    let fd = unsafe {
        libc::socket(
            domain,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let one: libc::c_int = 1;
    // SAFETY: the option value is a valid c_int.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_REUSEADDR,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    let (addr, len) = sockaddr_of(local);
    // SAFETY: the address is valid for `len`.
    if unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_storage).cast(),
            len,
        )
    } < 0
    {
        return Err(io::Error::last_os_error());
    }
    let (addr, len) = sockaddr_of(remote);
    // SAFETY: the address is valid for `len`.
    let r = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_storage).cast(),
            len,
        )
    };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINPROGRESS) {
            return Err(e);
        }
        if !poll_within(fd.as_fd(), libc::POLLOUT, timeout)? {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("connecting to {remote}: no answer within {timeout:?}"),
            ));
        }
        let mut err: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: the option buffer is a valid c_int.
        let r = unsafe {
            libc::getsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_ERROR,
                (&mut err as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        if err != 0 {
            return Err(io::Error::from_raw_os_error(err));
        }
    }
    let stream = TcpStream::from(fd);
    stream.set_nonblocking(false)?;
    Ok(stream)
}

/// Closes `stream` with a RST instead of a FIN (`SO_LINGER` with a zero timeout), as an
/// application aborting a connection does.
pub fn abort(stream: TcpStream) -> io::Result<()> {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: the option value is a valid linger struct for its length.
    let r = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    drop(stream);
    Ok(())
}
