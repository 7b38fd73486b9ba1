//! Traffic probes between pod namespaces: does a NEW connection open? A TCP connect, a UDP
//! request answered by an echo, an ICMP echo. Each answers [`Verdict::Allowed`] or
//! [`Verdict::Refused`] by what the network did, and fails (an error, never a verdict) when the
//! probe itself went wrong: nothing listening (a RST, an ICMP port unreachable), a tool missing.
//!
//! "Refused" is silence, because that is what kubesg does to a connection no rule allows: the
//! packet is dropped. The timeouts are short but cover a lost first packet where the protocol
//! retries (TCP resends its SYN after 1 s; the UDP probe sends twice).
//!
//! [`Responder`] is the other end: TCP echo listeners and UDP echo sockets on a pod's ports
//! (dual-stack, one socket per port), so every probe has something to talk to and a held
//! connection can prove, by an echo, that it still carries data.

use std::{
    fmt,
    io::{self, Read, Write},
    net::{IpAddr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    thread::JoinHandle,
    time::Duration,
};

use crate::netns::{accept_within, is_timeout, read_within, Netns, RecvWithin};

/// How long a TCP probe waits for its connection: past the SYN retransmission at 1 s.
pub const TCP_TIMEOUT: Duration = Duration::from_millis(1500);
/// How long a UDP probe waits for each of its two requests' echo.
pub const UDP_TIMEOUT: Duration = Duration::from_millis(600);
/// How long an ICMP probe waits for the echo reply (`ping -W` takes whole seconds).
pub const ICMP_TIMEOUT: Duration = Duration::from_secs(1);

/// What happened to a NEW connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Verdict {
    /// It opened (TCP connected, the echo came back).
    Allowed,
    /// Nothing came back: dropped.
    Refused,
}

impl Verdict {
    /// `Allowed` when `allowed`.
    pub fn from_bool(allowed: bool) -> Verdict {
        if allowed {
            Verdict::Allowed
        } else {
            Verdict::Refused
        }
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Verdict::Allowed => "allowed",
            Verdict::Refused => "refused",
        })
    }
}

/// A kind of probe.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Probe {
    /// A TCP connection to this port.
    Tcp(u16),
    /// A UDP request to this port, answered by an echo.
    Udp(u16),
    /// An ICMP (ICMPv6) echo request.
    Ping,
}

impl Probe {
    /// The IANA protocol number for the family (`v6`).
    pub fn protocol(self, v6: bool) -> u8 {
        match self {
            Probe::Tcp(_) => 6,
            Probe::Udp(_) => 17,
            Probe::Ping if v6 => 58,
            Probe::Ping => 1,
        }
    }

    /// The port as the SecurityGroup semantics see it: the destination port, or for an echo
    /// request `type << 8 | code` (type 8, or 128 for ICMPv6; code 0).
    pub fn port(self, v6: bool) -> u16 {
        match self {
            Probe::Tcp(p) | Probe::Udp(p) => p,
            Probe::Ping if v6 => 128 << 8,
            Probe::Ping => 8 << 8,
        }
    }

    /// Runs the probe from `from` to `to`.
    pub fn run(self, from: &Netns, to: IpAddr) -> io::Result<Verdict> {
        match self {
            Probe::Tcp(port) => tcp(from, SocketAddr::new(to, port)),
            Probe::Udp(port) => udp(from, SocketAddr::new(to, port)),
            Probe::Ping => ping(from, to),
        }
    }
}

impl fmt::Display for Probe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Probe::Tcp(p) => write!(f, "{p}/tcp"),
            Probe::Udp(p) => write!(f, "{p}/udp"),
            Probe::Ping => f.write_str("ping"),
        }
    }
}

/// Opens a TCP connection from `from` to `to`: `Allowed` when it connects within
/// [`TCP_TIMEOUT`], `Refused` when nothing answers; a RST (nothing listens) is an error.
pub fn tcp(from: &Netns, to: SocketAddr) -> io::Result<Verdict> {
    match from.tcp_connect(None, to, TCP_TIMEOUT) {
        Ok(_) => Ok(Verdict::Allowed),
        Err(e) if is_timeout(&e) => Ok(Verdict::Refused),
        Err(e) => Err(io::Error::new(
            e.kind(),
            format!("TCP probe {} -> {to}: {e}", from.name()),
        )),
    }
}

/// Sends a UDP request from `from` to `to` (twice, [`UDP_TIMEOUT`] each): `Allowed` when the
/// echo comes back, `Refused` when nothing does; an ICMP port unreachable is an error.
pub fn udp(from: &Netns, to: SocketAddr) -> io::Result<Verdict> {
    let local: SocketAddr = if to.is_ipv6() {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    } else {
        ([0, 0, 0, 0], 0).into()
    };
    let sock = from.udp_bind(local, UDP_TIMEOUT)?;
    sock.connect(to)?;
    let mut buf = [0u8; 64];
    for _ in 0..2 {
        sock.send(b"probe")?;
        match sock.recv_within(&mut buf) {
            Ok(n) if &buf[..n] == b"probe" => return Ok(Verdict::Allowed),
            Ok(n) => {
                return Err(io::Error::other(format!(
                    "UDP probe {} -> {to}: unexpected answer {:?}",
                    from.name(),
                    &buf[..n]
                )))
            }
            Err(e) if is_timeout(&e) => {}
            Err(e) => {
                return Err(io::Error::new(
                    e.kind(),
                    format!("UDP probe {} -> {to}: {e}", from.name()),
                ))
            }
        }
    }
    Ok(Verdict::Refused)
}

/// Sends one ICMP echo request from `from` to `to`: `Allowed` when the reply comes within
/// [`ICMP_TIMEOUT`].
pub fn ping(from: &Netns, to: IpAddr) -> io::Result<Verdict> {
    from.ping(to, None, ICMP_TIMEOUT).map(Verdict::from_bool)
}

/// Whether a held connection still carries data both ways: writes `data` and expects the
/// [`Responder`]'s echo within `timeout`. `false` when nothing comes back (the connection was
/// cut: its packets are dropped) or the connection was reset.
pub fn echoes(stream: &mut TcpStream, data: &[u8], timeout: Duration) -> io::Result<bool> {
    stream.set_read_timeout(Some(timeout))?;
    if let Err(e) = stream.write_all(data) {
        return if e.kind() == io::ErrorKind::BrokenPipe
            || e.kind() == io::ErrorKind::ConnectionReset
        {
            Ok(false)
        } else {
            Err(e)
        };
    }
    let mut buf = vec![0u8; data.len()];
    match stream.read_exact(&mut buf) {
        Ok(()) if buf == data => Ok(true),
        Ok(()) => Err(io::Error::other(format!("echo garbled: {buf:?}"))),
        Err(e) if is_timeout(&e) => Ok(false),
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::ConnectionReset | io::ErrorKind::UnexpectedEof
            ) =>
        {
            Ok(false)
        }
        Err(e) => Err(e),
    }
}

/// How often the responder's threads look at their stop flag.
const TICK: Duration = Duration::from_millis(100);

/// Echo servers in a pod: for each TCP port a listener on `[::]` (both families) whose
/// connections echo what they receive, for each UDP port a socket echoing each datagram to its
/// sender. Dropping it stops and joins every thread and closes every socket (a socket left open
/// would keep the pod's namespace alive after it is deleted).
pub struct Responder {
    stop: Arc<AtomicBool>,
    threads: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl Responder {
    /// Starts echo servers inside `ns` on `tcp_ports` and `udp_ports`.
    pub fn start(ns: &Netns, tcp_ports: &[u16], udp_ports: &[u16]) -> io::Result<Responder> {
        let responder = Responder {
            stop: Arc::new(AtomicBool::new(false)),
            threads: Arc::new(Mutex::new(Vec::new())),
        };
        for &port in tcp_ports {
            let listener = ns.tcp_listen((Ipv6Addr::UNSPECIFIED, port).into())?;
            let stop = responder.stop.clone();
            let threads = responder.threads.clone();
            responder.spawn(move || serve_tcp(listener, stop, threads));
        }
        for &port in udp_ports {
            let sock = ns.udp_bind((Ipv6Addr::UNSPECIFIED, port).into(), TICK)?;
            let stop = responder.stop.clone();
            responder.spawn(move || serve_udp(sock, stop));
        }
        Ok(responder)
    }

    fn spawn(&self, f: impl FnOnce() + Send + 'static) {
        let handle = std::thread::spawn(f);
        lock(&self.threads).push(handle);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn serve_tcp(
    listener: TcpListener,
    stop: Arc<AtomicBool>,
    threads: Arc<Mutex<Vec<JoinHandle<()>>>>,
) {
    while !stop.load(Ordering::Relaxed) {
        match accept_within(&listener, TICK) {
            Ok(stream) => {
                let stop = stop.clone();
                let handle = std::thread::spawn(move || echo_tcp(stream, stop));
                lock(&threads).push(handle);
            }
            Err(e) if is_timeout(&e) => {}
            // A connection reset before it was accepted: keep serving.
            Err(_) => std::thread::sleep(TICK),
        }
    }
}

fn echo_tcp(mut stream: TcpStream, stop: Arc<AtomicBool>) {
    if stream.set_read_timeout(Some(TICK)).is_err() {
        return;
    }
    let mut buf = [0u8; 4096];
    while !stop.load(Ordering::Relaxed) {
        match read_within(&stream, &mut buf) {
            Ok(0) => return,
            Ok(n) => {
                if stream.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
            Err(e) if is_timeout(&e) => {}
            Err(_) => return,
        }
    }
}

fn serve_udp(sock: UdpSocket, stop: Arc<AtomicBool>) {
    let mut buf = [0u8; 2048];
    while !stop.load(Ordering::Relaxed) {
        match sock.recv_from_within(&mut buf) {
            Ok((n, peer)) => {
                let _ = sock.send_to(&buf[..n], peer);
            }
            Err(e) if is_timeout(&e) => {}
            // An ICMP error about an earlier echo: keep serving.
            Err(_) => {}
        }
    }
}

impl Drop for Responder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Connection threads are added while listeners run: join until none is left.
        loop {
            let batch: Vec<JoinHandle<()>> = std::mem::take(&mut *lock(&self.threads));
            if batch.is_empty() {
                break;
            }
            for handle in batch {
                let _ = handle.join();
            }
        }
    }
}

impl fmt::Debug for Responder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Responder")
            .field("threads", &lock(&self.threads).len())
            .finish()
    }
}
