//! iperf3 between two test pods: a bulk TCP stream through the datapath at a set rate or at full
//! speed, read back from iperf3's JSON report. Both processes are killed and reaped when dropped,
//! so a failing test leaves none behind.

use std::{
    io::Read,
    net::IpAddr,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use crate::netns::Netns;

/// A child process killed and reaped on drop.
#[derive(Debug)]
pub struct Reaped(pub Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn iperf3(ns: &Netns, args: &[&str]) -> Reaped {
    Reaped(
        Command::new("ip")
            .args(["netns", "exec", ns.name(), "iperf3"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("running iperf3"),
    )
}

/// Starts a one-shot iperf3 server on `addr`:`port` in `ns` and waits until it listens.
pub fn server(ns: &Netns, addr: IpAddr, port: u16) -> Reaped {
    let (addr, port) = (addr.to_string(), port.to_string());
    let server = iperf3(ns, &["-s", "-1", "-B", &addr, "-p", &port]);
    let filter = format!("sport = :{port}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ns
        .exec("ss", &["-Hltn", &filter])
        .is_ok_and(|o| !o.stdout.is_empty())
    {
        assert!(Instant::now() < deadline, "iperf3 -s never listened");
        std::thread::sleep(Duration::from_millis(20));
    }
    server
}

/// A running iperf3 client.
#[derive(Debug)]
pub struct Client {
    child: Reaped,
    seconds: u64,
}

/// Starts a client in `ns` sending to `addr`:`port` for `seconds`, at `rate` (iperf3's `-b`, as
/// `"100M"`) or, with `None`, as fast as it can; it reports every half second.
pub fn client(ns: &Netns, addr: IpAddr, port: u16, seconds: u64, rate: Option<&str>) -> Client {
    let (addr, port, secs) = (addr.to_string(), port.to_string(), seconds.to_string());
    let mut args = vec!["-c", &addr, "-p", &port, "-t", &secs, "-i", "0.5", "-J"];
    if let Some(rate) = rate {
        args.extend(["-b", rate]);
    }
    Client {
        child: iperf3(ns, &args),
        seconds,
    }
}

impl Client {
    /// Whether it has ended (with its iperf3 output when it has).
    pub fn ended(&mut self) -> Option<String> {
        let status = self.child.0.try_wait().expect("iperf3")?;
        Some(format!("{status}: {}", self.output()))
    }

    fn output(&mut self) -> String {
        let mut out = String::new();
        if let Some(mut stdout) = self.child.0.stdout.take() {
            let _ = stdout.read_to_string(&mut out);
        }
        out
    }

    /// Waits for the end (it fails the test when the stream stalls ten seconds past its length)
    /// and returns the half-second intervals of the report, each `{"sum": {"bytes": …, …}}`, after
    /// checking that iperf3 reported no error and every interval is there.
    pub fn intervals(mut self) -> Vec<serde_json::Value> {
        let deadline = Instant::now() + Duration::from_secs(self.seconds + 10);
        while self.child.0.try_wait().expect("iperf3").is_none() {
            assert!(Instant::now() < deadline, "the stream stalled");
            std::thread::sleep(Duration::from_millis(50));
        }
        let out = self.output();
        let mut report: serde_json::Value =
            serde_json::from_str(&out).unwrap_or_else(|e| panic!("iperf3 -J output ({e}): {out}"));
        assert!(report.get("error").is_none(), "iperf3: {}", report["error"]);
        let intervals = match report["intervals"].take() {
            serde_json::Value::Array(v) => v,
            other => panic!("no intervals in the report: {other}"),
        };
        assert!(
            intervals.len() as u64 >= 2 * self.seconds,
            "{} intervals for {} s",
            intervals.len(),
            self.seconds
        );
        intervals
    }
}

/// The bytes of one interval of [`Client::intervals`].
pub fn bytes(interval: &serde_json::Value) -> u64 {
    interval["sum"]["bytes"].as_u64().unwrap_or(0)
}
