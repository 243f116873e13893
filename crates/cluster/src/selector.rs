//! Label selectors (`matchLabels` and `matchExpressions`), checked as the API server checks
//! them: NetworkPolicy's pod and namespace selectors, a Gateway listener's namespace selector.

use crate::ModelError;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use std::collections::BTreeMap;

pub type Labels = BTreeMap<String, String>;

/// One `matchExpressions` requirement.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Requirement {
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    DoesNotExist(String),
}

/// A label selector: every `matchLabels` pair and every requirement must hold; `{}` selects
/// everything.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Selector {
    pub labels: Vec<(String, String)>,
    pub requirements: Vec<Requirement>,
}

impl Selector {
    pub fn parse(s: &LabelSelector, object: &str, field: &str) -> Result<Selector, ModelError> {
        let mut out = Selector {
            labels: s
                .match_labels
                .iter()
                .flatten()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            requirements: Vec::new(),
        };
        for (i, e) in s.match_expressions.iter().flatten().enumerate() {
            let f = format!("{field}.matchExpressions[{i}]");
            let values = e.values.clone().unwrap_or_default();
            let needs_values = |ok: bool| {
                if ok {
                    Ok(())
                } else {
                    Err(ModelError::new(
                        object,
                        format!("{f}.values"),
                        format!(
                            "operator {} {}",
                            e.operator,
                            if matches!(e.operator.as_str(), "In" | "NotIn") {
                                "needs at least one value"
                            } else {
                                "takes no values"
                            }
                        ),
                    ))
                }
            };
            out.requirements.push(match e.operator.as_str() {
                "In" => {
                    needs_values(!values.is_empty())?;
                    Requirement::In(e.key.clone(), values)
                }
                "NotIn" => {
                    needs_values(!values.is_empty())?;
                    Requirement::NotIn(e.key.clone(), values)
                }
                "Exists" => {
                    needs_values(values.is_empty())?;
                    Requirement::Exists(e.key.clone())
                }
                "DoesNotExist" => {
                    needs_values(values.is_empty())?;
                    Requirement::DoesNotExist(e.key.clone())
                }
                other => {
                    return Err(ModelError::new(
                        object,
                        format!("{f}.operator"),
                        format!("{other:?} is not one of In, NotIn, Exists, DoesNotExist"),
                    ))
                }
            });
        }
        Ok(out)
    }

    pub fn matches(&self, labels: &Labels) -> bool {
        self.labels.iter().all(|(k, v)| labels.get(k) == Some(v))
            && self.requirements.iter().all(|r| match r {
                Requirement::In(k, vs) => labels.get(k).is_some_and(|v| vs.contains(v)),
                Requirement::NotIn(k, vs) => labels.get(k).is_none_or(|v| !vs.contains(v)),
                Requirement::Exists(k) => labels.contains_key(k),
                Requirement::DoesNotExist(k) => !labels.contains_key(k),
            })
    }

    pub fn is_everything(&self) -> bool {
        self.labels.is_empty() && self.requirements.is_empty()
    }
}

impl std::fmt::Display for Selector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.is_everything() {
            return f.write_str("{}");
        }
        let mut parts: Vec<String> = self
            .labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        for r in &self.requirements {
            parts.push(match r {
                Requirement::In(k, v) => format!("{k} in ({})", v.join(",")),
                Requirement::NotIn(k, v) => format!("{k} notin ({})", v.join(",")),
                Requirement::Exists(k) => k.clone(),
                Requirement::DoesNotExist(k) => format!("!{k}"),
            });
        }
        write!(f, "{{{}}}", parts.join(", "))
    }
}
