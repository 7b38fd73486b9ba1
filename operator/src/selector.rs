//! Label selectors, as Kubernetes matches them: `matchLabels` and `matchExpressions` (`In`,
//! `NotIn`, `Exists`, `DoesNotExist`) all have to hold, and an empty selector selects everything.
//! A selector is checked once, when its group is accepted, and compiled into [`Selector`], so the
//! compiler never meets an invalid one (an invalid selector makes its group not Accepted, as the
//! API server would refuse it).
//!
//! The syntax checks copy apimachinery's `ValidateLabelSelector`, `IsQualifiedName` and
//! `IsValidLabelValue`, because in manifests mode there is no API server to do them.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

/// One requirement on a label. `matchLabels: {k: v}` becomes `In { key: k, values: [v] }`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Requirement {
    /// The label is present with one of the values.
    In {
        /// Label key.
        key: String,
        /// Allowed values, sorted and without duplicates.
        values: Vec<String>,
    },
    /// The label is absent, or present with none of the values (as Kubernetes: absent matches).
    NotIn {
        /// Label key.
        key: String,
        /// Refused values, sorted and without duplicates.
        values: Vec<String>,
    },
    /// The label is present, whatever its value.
    Exists(String),
    /// The label is absent.
    DoesNotExist(String),
}

/// A set of labels a selector can look at: the model's maps, or the compiler's compact copies
/// of them (150 000 pods' label maps are a large part of its memory).
pub trait Labels {
    /// The value of a label, if present.
    fn label(&self, key: &str) -> Option<&str>;
}

impl Labels for BTreeMap<String, String> {
    fn label(&self, key: &str) -> Option<&str> {
        self.get(key).map(String::as_str)
    }
}

fn contains(values: &[String], v: &str) -> bool {
    values.binary_search_by(|x| x.as_str().cmp(v)).is_ok()
}

impl Requirement {
    fn matches(&self, labels: &(impl Labels + ?Sized)) -> bool {
        match self {
            Requirement::In { key, values } => {
                labels.label(key).is_some_and(|v| contains(values, v))
            }
            Requirement::NotIn { key, values } => {
                labels.label(key).is_none_or(|v| !contains(values, v))
            }
            Requirement::Exists(key) => labels.label(key).is_some(),
            Requirement::DoesNotExist(key) => labels.label(key).is_none(),
        }
    }
}

/// A checked label selector: every requirement must hold. Requirements are sorted, so two
/// selectors that say the same thing compare equal and hash alike.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Selector {
    requirements: Vec<Requirement>,
}

/// Why a selector is invalid: the field inside the selector (e.g. `matchExpressions[0].values`)
/// and what is wrong with it. The caller prefixes the selector's own path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SelectorError {
    /// The field, relative to the selector.
    pub field: String,
    /// What is wrong.
    pub message: String,
}

impl Selector {
    /// The selector that selects everything (`{}`).
    pub fn everything() -> Self {
        Selector::default()
    }

    /// A selector of the given requirements (tests and callers that build selectors directly).
    pub fn from_requirements(mut requirements: Vec<Requirement>) -> Self {
        requirements.sort();
        requirements.dedup();
        Selector { requirements }
    }

    /// Checks a Kubernetes `LabelSelector` and compiles it; every problem is reported, not only
    /// the first, so one status message tells the user everything to fix.
    pub fn parse(sel: &LabelSelector) -> Result<Self, Vec<SelectorError>> {
        let mut errors = Vec::new();
        let mut requirements = Vec::new();
        for (k, v) in sel.match_labels.iter().flatten() {
            let field = format!("matchLabels[{k:?}]");
            check_key(&field, k, &mut errors);
            check_value(&field, v, &mut errors);
            requirements.push(Requirement::In {
                key: k.clone(),
                values: vec![v.clone()],
            });
        }
        for (i, e) in sel.match_expressions.iter().flatten().enumerate() {
            let field = format!("matchExpressions[{i}]");
            check_key(&format!("{field}.key"), &e.key, &mut errors);
            let mut values = e.values.clone().unwrap_or_default();
            for (j, v) in values.iter().enumerate() {
                check_value(&format!("{field}.values[{j}]"), v, &mut errors);
            }
            values.sort();
            values.dedup();
            let key = e.key.clone();
            let needs_values = |errors: &mut Vec<SelectorError>, values: &[String]| {
                if values.is_empty() {
                    errors.push(SelectorError {
                        field: format!("{field}.values"),
                        message: format!("operator {} needs at least one value", e.operator),
                    });
                }
            };
            let refuses_values = |errors: &mut Vec<SelectorError>, values: &[String]| {
                if !values.is_empty() {
                    errors.push(SelectorError {
                        field: format!("{field}.values"),
                        message: format!("operator {} takes no values", e.operator),
                    });
                }
            };
            match e.operator.as_str() {
                "In" => {
                    needs_values(&mut errors, &values);
                    requirements.push(Requirement::In { key, values });
                }
                "NotIn" => {
                    needs_values(&mut errors, &values);
                    requirements.push(Requirement::NotIn { key, values });
                }
                "Exists" => {
                    refuses_values(&mut errors, &values);
                    requirements.push(Requirement::Exists(key));
                }
                "DoesNotExist" => {
                    refuses_values(&mut errors, &values);
                    requirements.push(Requirement::DoesNotExist(key));
                }
                other => errors.push(SelectorError {
                    field: format!("{field}.operator"),
                    message: format!("{other:?} is not In, NotIn, Exists or DoesNotExist"),
                }),
            }
        }
        if errors.is_empty() {
            Ok(Selector::from_requirements(requirements))
        } else {
            Err(errors)
        }
    }

    /// Whether labels satisfy every requirement.
    pub fn matches(&self, labels: &(impl Labels + ?Sized)) -> bool {
        self.requirements.iter().all(|r| r.matches(labels))
    }

    /// Whether the selector selects everything (no requirement).
    pub fn is_everything(&self) -> bool {
        self.requirements.is_empty()
    }

    /// The most selective `In` requirement (fewest values), if any: every label set the selector
    /// matches has this key with one of these values, so an index by (key, value) narrows the
    /// candidates to check before [`Selector::matches`].
    pub fn narrowest_in(&self) -> Option<(&str, &[String])> {
        self.requirements
            .iter()
            .filter_map(|r| match r {
                Requirement::In { key, values } => Some((key.as_str(), values.as_slice())),
                _ => None,
            })
            .min_by_key(|(_, values)| values.len())
    }

    /// The requirements, sorted.
    pub fn requirements(&self) -> &[Requirement] {
        &self.requirements
    }
}

/// Checks a label key as apimachinery's `IsQualifiedName`: an optional DNS-subdomain prefix and
/// `/`, then a name of at most 63 alphanumerics, `-`, `_`, `.` that starts and ends alphanumeric.
fn check_key(field: &str, key: &str, errors: &mut Vec<SelectorError>) {
    let (prefix, name) = match key.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    let mut problem = None;
    if let Some(p) = prefix {
        if !is_dns_subdomain(p) {
            problem = Some(format!(
                "label key {key:?}: the prefix must be a DNS subdomain (lowercase alphanumerics, \
                 '-' and '.', at most 253 characters)"
            ));
        }
    }
    if problem.is_none() && !is_label_name(name) {
        problem = Some(format!(
            "label key {key:?}: the name must be 1-63 alphanumerics, '-', '_' or '.', starting \
             and ending with an alphanumeric"
        ));
    }
    if let Some(message) = problem {
        errors.push(SelectorError {
            field: field.to_string(),
            message,
        });
    }
}

/// Checks a label value as apimachinery's `IsValidLabelValue`: empty, or a label name.
fn check_value(field: &str, value: &str, errors: &mut Vec<SelectorError>) {
    if !value.is_empty() && !is_label_name(value) {
        errors.push(SelectorError {
            field: field.to_string(),
            message: format!(
                "label value {value:?} must be at most 63 alphanumerics, '-', '_' or '.', \
                 starting and ending with an alphanumeric"
            ),
        });
    }
}

fn is_label_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
}

fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|part| {
            let b = part.as_bytes();
            !b.is_empty()
                && b.len() <= 63
                && b[0].is_ascii_alphanumeric()
                && b[b.len() - 1].is_ascii_alphanumeric()
                && b.iter()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        })
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn expr(key: &str, op: &str, values: Option<&[&str]>) -> LabelSelectorRequirement {
        LabelSelectorRequirement {
            key: key.into(),
            operator: op.into(),
            values: values.map(|v| v.iter().map(|s| s.to_string()).collect()),
        }
    }

    fn selector(
        match_labels: &[(&str, &str)],
        exprs: Vec<LabelSelectorRequirement>,
    ) -> LabelSelector {
        LabelSelector {
            match_labels: (!match_labels.is_empty()).then(|| labels(match_labels)),
            match_expressions: (!exprs.is_empty()).then_some(exprs),
        }
    }

    #[test]
    fn empty_selector_selects_everything() {
        let s = Selector::parse(&LabelSelector::default()).unwrap();
        assert!(s.is_everything());
        assert!(s.matches(&labels(&[])));
        assert!(s.matches(&labels(&[("app", "web")])));
    }

    #[test]
    fn match_labels_require_every_pair() {
        let s = Selector::parse(&selector(&[("app", "web"), ("tier", "front")], vec![])).unwrap();
        assert!(s.matches(&labels(&[("app", "web"), ("tier", "front"), ("x", "y")])));
        assert!(!s.matches(&labels(&[("app", "web")])));
        assert!(!s.matches(&labels(&[("app", "web"), ("tier", "back")])));
    }

    #[test]
    fn in_matches_any_listed_value_and_requires_the_key() {
        let s = Selector::parse(&selector(
            &[],
            vec![expr("env", "In", Some(&["prod", "staging"]))],
        ))
        .unwrap();
        assert!(s.matches(&labels(&[("env", "prod")])));
        assert!(s.matches(&labels(&[("env", "staging")])));
        assert!(!s.matches(&labels(&[("env", "dev")])));
        assert!(!s.matches(&labels(&[])));
    }

    #[test]
    fn not_in_matches_an_absent_key_as_kubernetes_does() {
        let s =
            Selector::parse(&selector(&[], vec![expr("env", "NotIn", Some(&["prod"]))])).unwrap();
        assert!(s.matches(&labels(&[])));
        assert!(s.matches(&labels(&[("env", "dev")])));
        assert!(!s.matches(&labels(&[("env", "prod")])));
    }

    #[test]
    fn exists_and_does_not_exist_look_at_the_key_only() {
        let exists = Selector::parse(&selector(&[], vec![expr("team", "Exists", None)])).unwrap();
        let absent = Selector::parse(&selector(
            &[],
            vec![expr("team", "DoesNotExist", Some(&[]))],
        ))
        .unwrap();
        assert!(exists.matches(&labels(&[("team", "")])));
        assert!(!exists.matches(&labels(&[("other", "x")])));
        assert!(absent.matches(&labels(&[("other", "x")])));
        assert!(!absent.matches(&labels(&[("team", "a")])));
    }

    #[test]
    fn match_labels_and_expressions_must_all_hold() {
        let s = Selector::parse(&selector(
            &[("app", "web")],
            vec![expr("env", "NotIn", Some(&["dev"]))],
        ))
        .unwrap();
        assert!(s.matches(&labels(&[("app", "web"), ("env", "prod")])));
        assert!(!s.matches(&labels(&[("app", "web"), ("env", "dev")])));
        assert!(!s.matches(&labels(&[("app", "db"), ("env", "prod")])));
    }

    #[test]
    fn unknown_operator_is_an_error_naming_the_field() {
        let err = Selector::parse(&selector(&[], vec![expr("a", "Gt", Some(&["1"]))])).unwrap_err();
        assert_eq!(err[0].field, "matchExpressions[0].operator");
        assert!(
            err[0].message.contains("\"Gt\" is not In, NotIn"),
            "{err:?}"
        );
    }

    #[test]
    fn in_without_values_and_exists_with_values_are_errors() {
        let err = Selector::parse(&selector(
            &[],
            vec![
                expr("a", "In", Some(&[])),
                expr("b", "Exists", Some(&["x"])),
            ],
        ))
        .unwrap_err();
        assert_eq!(err.len(), 2);
        assert_eq!(err[0].field, "matchExpressions[0].values");
        assert_eq!(err[0].message, "operator In needs at least one value");
        assert_eq!(err[1].field, "matchExpressions[1].values");
        assert_eq!(err[1].message, "operator Exists takes no values");
    }

    #[test]
    fn invalid_label_keys_and_values_are_errors() {
        let err =
            Selector::parse(&selector(&[("-bad", "ok"), ("ok", "bad value")], vec![])).unwrap_err();
        assert_eq!(err.len(), 2, "{err:?}");
        assert!(err[0].message.contains("label key \"-bad\""), "{err:?}");
        assert!(
            err[1].message.contains("label value \"bad value\""),
            "{err:?}"
        );
        let prefixed =
            Selector::parse(&selector(&[("app.kubernetes.io/name", "web")], vec![])).unwrap();
        assert!(prefixed.matches(&labels(&[("app.kubernetes.io/name", "web")])));
        let err = Selector::parse(&selector(&[("Bad_Prefix/name", "x")], vec![])).unwrap_err();
        assert!(
            err[0].message.contains("prefix must be a DNS subdomain"),
            "{err:?}"
        );
    }

    #[test]
    fn equivalent_selectors_compare_equal() {
        let a = Selector::parse(&selector(
            &[("app", "web")],
            vec![expr("env", "In", Some(&["b", "a", "a"]))],
        ))
        .unwrap();
        let b = Selector::parse(&selector(
            &[],
            vec![
                expr("env", "In", Some(&["a", "b"])),
                expr("app", "In", Some(&["web"])),
            ],
        ))
        .unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn narrowest_in_picks_the_requirement_with_fewest_values() {
        let s = Selector::parse(&selector(
            &[("app", "web")],
            vec![
                expr("env", "In", Some(&["a", "b"])),
                expr("x", "Exists", None),
            ],
        ))
        .unwrap();
        assert_eq!(s.narrowest_in(), Some(("app", &["web".to_string()][..])));
        let none = Selector::parse(&selector(&[], vec![expr("x", "Exists", None)])).unwrap();
        assert_eq!(none.narrowest_in(), None);
    }
}
