//! Conntrack timeouts by name, as nf_conntrack's sysctls name them
//! (`net.netfilter.nf_conntrack_<name>`), for the CLI and the agent's settings.

use std::time::Duration;

use kubesg_common::{
    config::{timeout, Config},
    conntrack::TcpState,
};

/// Every timeout slot with its sysctl-style name.
pub const NAMES: [(&str, usize); 16] = [
    ("tcp_timeout_syn_sent", TcpState::SynSent as usize),
    ("tcp_timeout_syn_recv", TcpState::SynRecv as usize),
    ("tcp_timeout_established", TcpState::Established as usize),
    ("tcp_timeout_fin_wait", TcpState::FinWait as usize),
    ("tcp_timeout_close_wait", TcpState::CloseWait as usize),
    ("tcp_timeout_last_ack", TcpState::LastAck as usize),
    ("tcp_timeout_time_wait", TcpState::TimeWait as usize),
    ("tcp_timeout_close", TcpState::Close as usize),
    ("tcp_timeout_syn_sent2", TcpState::SynSent2 as usize),
    ("udp_timeout", timeout::UDP_UNREPLIED),
    ("udp_timeout_stream", timeout::UDP_REPLIED),
    ("icmp_timeout", timeout::ICMP),
    ("generic_timeout", timeout::GENERIC),
    ("frag_timeout", timeout::FRAGMENT),
    ("tcp_timeout_max_retrans", timeout::TCP_RETRANS),
    ("tcp_timeout_unacknowledged", timeout::TCP_UNACK),
];

/// A `NAME=SECONDS` setting that could not be understood.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TimeoutError {
    /// Not `NAME=SECONDS`.
    #[error("expected NAME=SECONDS, got {0:?}")]
    Syntax(String),
    /// An unknown name.
    #[error("unknown timeout {0:?}; known: {known}", known = known())]
    UnknownName(String),
    /// Not a positive number of seconds.
    #[error("timeout {name} must be a positive number of seconds, got {value:?}")]
    BadValue {
        /// The timeout.
        name: String,
        /// What was given.
        value: String,
    },
}

fn known() -> String {
    NAMES.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ")
}

/// Applies `NAME=SECONDS` (seconds may be fractional, e.g. `0.5`) to `cfg`.
pub fn apply(cfg: &mut Config, setting: &str) -> Result<(), TimeoutError> {
    let (name, value) = setting
        .split_once('=')
        .ok_or_else(|| TimeoutError::Syntax(setting.to_string()))?;
    let name = name.trim().trim_start_matches("nf_conntrack_");
    let slot = NAMES
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, s)| *s)
        .ok_or_else(|| TimeoutError::UnknownName(name.to_string()))?;
    let secs: f64 = value.trim().parse().map_err(|_| TimeoutError::BadValue {
        name: name.to_string(),
        value: value.to_string(),
    })?;
    if !secs.is_finite() || secs <= 0.0 || secs > 1e9 {
        return Err(TimeoutError::BadValue {
            name: name.to_string(),
            value: value.to_string(),
        });
    }
    cfg.timeouts_ns[slot] = Duration::from_secs_f64(secs).as_nanos() as u64;
    Ok(())
}

/// `(name, timeout)` for every slot of `cfg`.
pub fn list(cfg: &Config) -> Vec<(&'static str, Duration)> {
    NAMES
        .iter()
        .map(|(n, s)| (*n, Duration::from_nanos(cfg.timeout(*s))))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_kernels() {
        let cfg = Config::defaults();
        let l = list(&cfg);
        let get = |n: &str| l.iter().find(|(k, _)| *k == n).map(|(_, d)| d.as_secs());
        assert_eq!(get("tcp_timeout_established"), Some(432_000));
        assert_eq!(get("tcp_timeout_syn_sent"), Some(120));
        assert_eq!(get("udp_timeout"), Some(30));
        assert_eq!(get("udp_timeout_stream"), Some(120));
        assert_eq!(get("icmp_timeout"), Some(30));
        assert_eq!(get("generic_timeout"), Some(600));
    }

    #[test]
    fn setting_by_sysctl_name_changes_one_slot() {
        let mut cfg = Config::defaults();
        apply(&mut cfg, "nf_conntrack_tcp_timeout_established=3600").unwrap();
        assert_eq!(
            cfg.timeout(TcpState::Established as usize),
            3_600_000_000_000
        );
        apply(&mut cfg, "udp_timeout=0.25").unwrap();
        assert_eq!(cfg.timeout(timeout::UDP_UNREPLIED), 250_000_000);
        assert_eq!(cfg.timeout(timeout::ICMP), 30_000_000_000);
    }

    #[test]
    fn bad_settings_are_refused_with_the_reason() {
        let mut cfg = Config::defaults();
        assert_eq!(
            apply(&mut cfg, "tcp_timeout_established"),
            Err(TimeoutError::Syntax("tcp_timeout_established".into()))
        );
        assert!(matches!(
            apply(&mut cfg, "tcp_timeout_forever=1"),
            Err(TimeoutError::UnknownName(_))
        ));
        for v in ["0", "-1", "soon", "inf"] {
            assert!(matches!(
                apply(&mut cfg, &format!("icmp_timeout={v}")),
                Err(TimeoutError::BadValue { .. })
            ));
        }
        assert_eq!(cfg, Config::defaults());
    }
}
