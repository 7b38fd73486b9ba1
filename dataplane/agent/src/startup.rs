//! Pods exempt from the startup policy (`--startup-exempt NAMESPACE/NAME-PREFIX`).
//!
//! Under `deny` or `wait` a pod passes nothing until the operator has sent its rules. The
//! operator's own pods cannot wait for that: while no operator runs (first install, a `helm
//! upgrade` that recreates it, a drained or rebooted node) their rules can only come from
//! themselves, so they would be denied the API server for ever and nothing would lead again.
//! Such pods get `allow` instead (passed and tracked, then judged by their rules once these
//! arrive, like any pod under `allow`). The chart exempts the operator's pods; anything else
//! kubesg depends on in a cluster (a DNS the agent resolves the operator through, say) can be
//! added.

use std::{fmt, str::FromStr};

use crate::{endpoints::PodRef, enforcer::StartupPolicy};

/// Pods of one namespace whose names start with a prefix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodPattern {
    namespace: String,
    name_prefix: String,
}

impl PodPattern {
    /// Whether `pod` is one of them.
    pub fn matches(&self, pod: &PodRef) -> bool {
        pod.namespace == self.namespace && pod.name.starts_with(&self.name_prefix)
    }
}

impl fmt::Display for PodPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}*", self.namespace, self.name_prefix)
    }
}

/// Why a `--startup-exempt` value was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{value:?}: {reason} (expected NAMESPACE/NAME-PREFIX, e.g. kube-system/kubesg-operator-)")]
pub struct InvalidPodPattern {
    value: String,
    reason: &'static str,
}

impl FromStr for PodPattern {
    type Err = InvalidPodPattern;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        let invalid = |reason| InvalidPodPattern {
            value: value.to_owned(),
            reason,
        };
        let (namespace, name_prefix) = value.split_once('/').ok_or_else(|| invalid("no '/'"))?;
        if !is_dns_label(namespace) {
            return Err(invalid("the namespace is not a DNS label"));
        }
        // An empty prefix would exempt a whole namespace from the startup policy: a
        // deliberate choice that must be spelled out, not the accident of a trailing slash.
        if name_prefix.is_empty() {
            return Err(invalid("the name prefix is empty"));
        }
        if name_prefix.len() > 253
            || !name_prefix
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        {
            return Err(invalid(
                "the name prefix holds characters no pod name has (a-z, 0-9, '-', '.')",
            ));
        }
        Ok(PodPattern {
            namespace: namespace.to_owned(),
            name_prefix: name_prefix.to_owned(),
        })
    }
}

/// An RFC 1123 label, as namespace names are.
fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// The startup policy with its exemptions: what a pod whose rules have not arrived gets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Startup {
    /// The policy for pods in general.
    pub policy: StartupPolicy,
    /// Pods that get `allow` whatever the policy.
    pub exempt: Vec<PodPattern>,
}

impl Startup {
    /// `policy` with no exemptions.
    pub fn new(policy: StartupPolicy) -> Self {
        Startup {
            policy,
            exempt: Vec::new(),
        }
    }

    /// The policy `pod` gets while its rules have not arrived.
    pub fn for_pod(&self, pod: &PodRef) -> StartupPolicy {
        if self.exempt.iter().any(|p| p.matches(pod)) {
            StartupPolicy::Allow
        } else {
            self.policy
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(namespace: &str, name: &str) -> PodRef {
        PodRef {
            namespace: namespace.into(),
            name: name.into(),
            uid: String::new(),
        }
    }

    #[test]
    fn exempt_pods_get_allow_and_the_others_the_policy() {
        let startup = Startup {
            policy: StartupPolicy::Deny,
            exempt: vec!["kube-system/kubesg-operator-".parse().expect("pattern")],
        };
        let operator = pod("kube-system", "kubesg-operator-7d9f8-x2v4q");
        assert_eq!(startup.for_pod(&operator), StartupPolicy::Allow);
        for other in [
            pod("default", "kubesg-operator-7d9f8-x2v4q"),
            pod("kube-system", "coredns-5d78c9869d-abcde"),
            pod("kube-system", "kubesg-operato"),
        ] {
            assert_eq!(startup.for_pod(&other), StartupPolicy::Deny, "{other}");
        }
        assert_eq!(
            Startup::new(StartupPolicy::Wait).for_pod(&operator),
            StartupPolicy::Wait
        );
    }

    #[test]
    fn malformed_patterns_are_refused_with_the_reason() {
        for (value, reason) in [
            ("kubesg-operator-", "no '/'"),
            ("kube-system/", "the name prefix is empty"),
            ("/kubesg-operator-", "the namespace is not a DNS label"),
            ("Kube-System/x", "the namespace is not a DNS label"),
            ("kube-system/x*", "characters no pod name has"),
            ("kube-system/a/b", "characters no pod name has"),
        ] {
            let err = value.parse::<PodPattern>().expect_err(value).to_string();
            assert!(err.contains(reason), "{value}: {err}");
            assert!(err.contains("NAMESPACE/NAME-PREFIX"), "{value}: {err}");
        }
        assert_eq!(
            "kube-system/kubesg-operator-"
                .parse::<PodPattern>()
                .expect("pattern")
                .to_string(),
            "kube-system/kubesg-operator-*"
        );
    }
}
