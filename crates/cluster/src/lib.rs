//! The cluster model every part reads: Kubernetes objects (k8s-openapi's own types) parsed from
//! ordinary multi-document YAML manifests, the lab document that describes a lab cluster, their
//! validation, and the `file` source through which an agent sees cluster state.
//!
//! Errors name the object, the field and what would be valid, e.g.
//! `Pod default/web: spec.nodeName: no node "node-9" (nodes: node-1, node-2)`.

pub mod lab;
pub mod manifests;
pub mod source;

pub use lab::{Backend, LabSpec, NodeSpec};
pub use manifests::Manifests;
pub use source::{ClusterState, FileSource, NodeInfo};

use std::fmt;

/// A model error: which object, which field, what is wrong and what would be valid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelError {
    pub object: String,
    pub field: String,
    pub message: String,
}

impl ModelError {
    pub fn new(
        object: impl Into<String>,
        field: impl Into<String>,
        message: impl Into<String>,
    ) -> ModelError {
        ModelError {
            object: object.into(),
            field: field.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for ModelError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            write!(f, "{}: {}", self.object, self.message)
        } else {
            write!(f, "{}: {}: {}", self.object, self.field, self.message)
        }
    }
}

impl std::error::Error for ModelError {}

/// Kubernetes object names (RFC 1123 labels): lower-case alphanumerics and '-', at most 63.
pub fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// RFC 1123 subdomains (Pod and Deployment names): dot-separated labels, at most 253.
pub fn is_dns_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_dns_label)
}
