//! The cluster model every part reads: Kubernetes objects (k8s-openapi's own types) parsed from
//! ordinary multi-document YAML manifests, the lab document that describes a lab cluster, their
//! validation, and the cluster-state interface every part reads through ([`store`]).
//!
//! Errors name the object, the field and what would be valid, e.g.
//! `Pod default/web: spec.nodeName: no node "node-9" (nodes: node-1, node-2)`.

pub mod gateway;
pub mod lab;
pub mod manifests;
pub mod selector;
pub mod slim;
pub mod source;
pub mod store;

pub use lab::{Backend, LabSpec, NodeSpec};
pub use manifests::Manifests;
pub use source::{ClusterState, NodeInfo};
pub use store::{Change, Kind, Object, Resource, Shared, Store, Update};

use std::fmt;

/// Hands memory freed after a part built its state from a large listing (the parsed objects, a
/// diff, batches) back to the system: glibc keeps it in its arenas otherwise, and RSS would show
/// the peak of the largest load instead of what the part holds. The walk costs a few ms.
pub fn release_freed_memory() {
    #[cfg(target_env = "gnu")]
    {
        unsafe extern "C" {
            fn malloc_trim(pad: usize) -> i32;
        }
        // SAFETY: malloc_trim only walks glibc's own heap, under its own locks.
        unsafe {
            malloc_trim(0);
        }
    }
}

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

/// A transport protocol as the API names it (`protocol: TCP|UDP|SCTP`, TCP when left out).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Proto {
    Tcp,
    Udp,
    Sctp,
}

impl Proto {
    pub fn parse(s: Option<&str>) -> Option<Proto> {
        match s.unwrap_or("TCP") {
            "TCP" => Some(Proto::Tcp),
            "UDP" => Some(Proto::Udp),
            "SCTP" => Some(Proto::Sctp),
            _ => None,
        }
    }

    /// nftables' spelling (`tcp`).
    pub fn as_str(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
            Proto::Sctp => "sctp",
        }
    }

    /// The IP protocol number (`meta l4proto`).
    pub fn number(self) -> u8 {
        match self {
            Proto::Tcp => 6,
            Proto::Udp => 17,
            Proto::Sctp => 132,
        }
    }

    pub fn from_number(n: u8) -> Option<Proto> {
        [Proto::Tcp, Proto::Udp, Proto::Sctp]
            .into_iter()
            .find(|p| p.number() == n)
    }
}

/// A container port of a pod spec, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodPort {
    /// Where it stands: `spec.containers[i].ports[j]`.
    pub path: String,
    pub name: String,
    pub container_port: u16,
    /// `TCP`, `UDP` or `SCTP`.
    pub protocol: String,
    /// `hostPort`, when set (0 counts as unset).
    pub host_port: Option<u16>,
    /// `hostIP`, when set.
    pub host_ip: Option<std::net::IpAddr>,
}

/// Every container port of `spec`; errors name `object` and the field
/// (`spec.containers[i].ports[j].hostPort`).
pub fn pod_ports(
    object: &str,
    spec: &k8s_openapi::api::core::v1::PodSpec,
) -> Result<Vec<PodPort>, ModelError> {
    let mut out = Vec::new();
    for (i, c) in spec.containers.iter().enumerate() {
        for (j, p) in c.ports.iter().flatten().enumerate() {
            let path = format!("spec.containers[{i}].ports[{j}]");
            let bad = |f: &str, why: String| ModelError::new(object, format!("{path}.{f}"), why);
            let container_port = u16::try_from(p.container_port)
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| {
                    bad(
                        "containerPort",
                        format!("{} is not a port (1-65535)", p.container_port),
                    )
                })?;
            let host_port = match p.host_port {
                None | Some(0) => None,
                Some(h) => Some(
                    u16::try_from(h)
                        .map_err(|_| bad("hostPort", format!("{h} is not a port (1-65535)")))?,
                ),
            };
            let protocol = p.protocol.as_deref().unwrap_or("TCP");
            if !matches!(protocol, "TCP" | "UDP" | "SCTP") {
                return Err(bad(
                    "protocol",
                    format!("{protocol:?} is not TCP, UDP or SCTP"),
                ));
            }
            let host_ip = match p.host_ip.as_deref() {
                None | Some("") => None,
                Some(ip) => Some(
                    ip.parse()
                        .map_err(|_| bad("hostIP", format!("{ip:?} is not an IP address")))?,
                ),
            };
            out.push(PodPort {
                path,
                name: p.name.clone().unwrap_or_default(),
                container_port,
                protocol: protocol.to_string(),
                host_port,
                host_ip,
            });
        }
    }
    Ok(out)
}
