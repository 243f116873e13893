//! NetworkPolicies, pods and namespaces reduced to what a verdict reads, and checked as the
//! API server checks them: a policy it would refuse (a bad selector operator, `endPort` without
//! a numeric `port` or below it, a bad CIDR, an `except` outside its `cidr`, a peer naming both
//! an `ipBlock` and a selector) is refused here with the policy and field named.

use cluster::manifests::namespaced;
use cluster::{ModelError, Proto};
use ipnet::Ipv4Net;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::networking::v1::{NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use std::net::Ipv4Addr;

pub use cluster::selector::{Labels, Requirement, Selector};
/// Namespace and name.
pub type Key = (String, String);

/// Which namespaces a selector peer reaches.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Namespaces {
    /// Only a `podSelector`: the policy's own namespace.
    Own(String),
    /// A `namespaceSelector` (`{}`: every namespace).
    Matching(Selector),
}

/// One peer of a rule.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Peer {
    Pods {
        namespaces: Namespaces,
        pods: Selector,
    },
    /// `ipBlock`: `cidr` without the `except`s (it matches pods' addresses too).
    Block { cidr: Ipv4Net, except: Vec<Ipv4Net> },
}

impl Peer {
    /// The address ranges (inclusive) an `ipBlock` covers, in order.
    pub fn ranges(cidr: Ipv4Net, except: &[Ipv4Net]) -> Vec<(Ipv4Addr, Ipv4Addr)> {
        let mut cuts: Vec<(u32, u32)> = except
            .iter()
            .map(|e| (u32::from(e.network()), u32::from(e.broadcast())))
            .collect();
        cuts.sort();
        let mut out = Vec::new();
        let mut next = u32::from(cidr.network()) as u64;
        let end = u32::from(cidr.broadcast()) as u64;
        for (lo, hi) in cuts {
            if (lo as u64) > next {
                out.push((next, lo as u64 - 1));
            }
            next = next.max(hi as u64 + 1);
        }
        if next <= end {
            out.push((next, end));
        }
        out.into_iter()
            .map(|(a, b)| (Ipv4Addr::from(a as u32), Ipv4Addr::from(b as u32)))
            .collect()
    }

    pub fn block_contains(cidr: &Ipv4Net, except: &[Ipv4Net], ip: Ipv4Addr) -> bool {
        cidr.contains(&ip) && !except.iter().any(|e| e.contains(&ip))
    }
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Peer::Pods {
                namespaces: Namespaces::Own(ns),
                pods,
            } => write!(f, "pods {pods} in namespace {ns}"),
            Peer::Pods {
                namespaces: Namespaces::Matching(n),
                pods,
            } => write!(f, "pods {pods} in namespaces {n}"),
            Peer::Block { cidr, except } if except.is_empty() => write!(f, "ipBlock {cidr}"),
            Peer::Block { cidr, except } => {
                let e: Vec<String> = except.iter().map(|e| e.to_string()).collect();
                write!(f, "ipBlock {cidr} except {}", e.join(", "))
            }
        }
    }
}

/// The port a rule names.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum PortRef {
    /// No `port`: every port of the protocol.
    All,
    /// `port` .. `endPort` (inclusive; equal without `endPort`).
    Range(u16, u16),
    /// A named port, resolved on the destination pod's containerPorts (name and protocol).
    Named(String),
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PortMatch {
    pub proto: Proto,
    pub port: PortRef,
}

impl std::fmt::Display for PortMatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let p = self.proto.as_str().to_ascii_uppercase();
        match &self.port {
            PortRef::All => write!(f, "every {p} port"),
            PortRef::Range(a, b) if a == b => write!(f, "{a}/{p}"),
            PortRef::Range(a, b) => write!(f, "{a}-{b}/{p}"),
            PortRef::Named(n) => write!(f, "port {n:?}/{p}"),
        }
    }
}

/// One ingress or egress rule: `peers` (`None`: every source or destination) and `ports`
/// (empty: every port of every protocol).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Rule {
    pub peers: Option<Vec<Peer>>,
    pub ports: Vec<PortMatch>,
}

/// A NetworkPolicy, checked. `ingress`/`egress` are `Some` when the policy isolates that
/// direction (its `policyTypes`, defaulted as the API server does: Ingress always, Egress when
/// it has egress rules); the rules then say what is allowed.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Policy {
    pub namespace: String,
    pub name: String,
    pub selector: Selector,
    pub ingress: Option<Vec<Rule>>,
    pub egress: Option<Vec<Rule>>,
}

/// Ingress or egress.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Direction {
    Ingress,
    Egress,
}

impl Direction {
    pub const BOTH: [Direction; 2] = [Direction::Ingress, Direction::Egress];

    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Ingress => "ingress",
            Direction::Egress => "egress",
        }
    }
}

impl Policy {
    pub fn key(&self) -> Key {
        (self.namespace.clone(), self.name.clone())
    }

    pub fn rules(&self, d: Direction) -> Option<&[Rule]> {
        match d {
            Direction::Ingress => self.ingress.as_deref(),
            Direction::Egress => self.egress.as_deref(),
        }
    }

    /// Whether the policy selects `pod` (in namespace `pod.namespace`).
    pub fn selects(&self, pod: &PodFacts) -> bool {
        !pod.host_network && pod.namespace == self.namespace && self.selector.matches(&pod.labels)
    }

    /// Checks `np` as the API server would; errors name the policy and the field.
    pub fn parse(np: &NetworkPolicy) -> Result<Policy, ModelError> {
        let (namespace, name) = namespaced(&np.metadata);
        let object = format!("NetworkPolicy {namespace}/{name}");
        let spec = np.spec.as_ref().ok_or_else(|| {
            ModelError::new(&object, "spec", "missing (spec.podSelector is required)")
        })?;
        let selector = Selector::parse(
            &spec.pod_selector.clone().unwrap_or_default(),
            &object,
            "spec.podSelector",
        )?;
        let has_egress = spec.egress.as_ref().is_some_and(|e| !e.is_empty());
        let types: Vec<String> = match &spec.policy_types {
            Some(t) if !t.is_empty() => t.clone(),
            _ if has_egress => vec!["Ingress".into(), "Egress".into()],
            _ => vec!["Ingress".into()],
        };
        for (i, t) in types.iter().enumerate() {
            if !matches!(t.as_str(), "Ingress" | "Egress") {
                return Err(ModelError::new(
                    &object,
                    format!("spec.policyTypes[{i}]"),
                    format!("{t:?} is not one of Ingress, Egress"),
                ));
            }
        }
        // Each direction's rules as (peers, ports), read only when its type isolates.
        let rules = |d: &str, list: Vec<(Option<&[_]>, Option<&[_]>)>| {
            let (field, peers) = match d {
                "Ingress" => ("ingress", "from"),
                _ => ("egress", "to"),
            };
            types
                .iter()
                .any(|t| t == d)
                .then(|| {
                    (list.into_iter().enumerate())
                        .map(|(i, (from, ports))| {
                            let f = format!("spec.{field}[{i}]");
                            rule(&object, &f, peers, from, ports, &namespace)
                        })
                        .collect::<Result<Vec<_>, _>>()
                })
                .transpose()
        };
        let ingress = rules(
            "Ingress",
            (spec.ingress.iter().flatten())
                .map(|r| (r.from.as_deref(), r.ports.as_deref()))
                .collect(),
        )?;
        let egress = rules(
            "Egress",
            (spec.egress.iter().flatten())
                .map(|r| (r.to.as_deref(), r.ports.as_deref()))
                .collect(),
        )?;
        Ok(Policy {
            namespace,
            name,
            selector,
            ingress,
            egress,
        })
    }
}

/// One ingress or egress rule at `field` (`spec.ingress[i]`), its peers under `peer_field`.
fn rule(
    object: &str,
    field: &str,
    peer_field: &str,
    peer_list: Option<&[NetworkPolicyPeer]>,
    port_list: Option<&[NetworkPolicyPort]>,
    own: &str,
) -> Result<Rule, ModelError> {
    Ok(Rule {
        peers: peers(object, &format!("{field}.{peer_field}"), peer_list, own)?,
        ports: ports(object, &format!("{field}.ports"), port_list)?,
    })
}

fn peers(
    object: &str,
    field: &str,
    list: Option<&[NetworkPolicyPeer]>,
    own: &str,
) -> Result<Option<Vec<Peer>>, ModelError> {
    let Some(list) = list.filter(|l| !l.is_empty()) else {
        return Ok(None);
    };
    let mut out = Vec::new();
    for (i, p) in list.iter().enumerate() {
        let f = format!("{field}[{i}]");
        let selectors = p.pod_selector.is_some() || p.namespace_selector.is_some();
        match (&p.ip_block, selectors) {
            (Some(_), true) => {
                return Err(ModelError::new(
                    object,
                    f,
                    "ipBlock cannot be combined with podSelector or namespaceSelector in one peer",
                ))
            }
            (None, false) => {
                return Err(ModelError::new(
                    object,
                    f,
                    "a peer needs one of podSelector, namespaceSelector or ipBlock",
                ))
            }
            (Some(b), false) => {
                let cidr = b.cidr.parse::<Ipv4Net>().map_err(|_| {
                    ModelError::new(
                        object,
                        format!("{f}.ipBlock.cidr"),
                        format!("{:?} is not an IPv4 CIDR such as 10.0.0.0/8", b.cidr),
                    )
                })?;
                let mut except = Vec::new();
                for (j, e) in b.except.iter().flatten().enumerate() {
                    let ef = format!("{f}.ipBlock.except[{j}]");
                    let net = e.parse::<Ipv4Net>().map_err(|_| {
                        ModelError::new(object, &ef, format!("{e:?} is not an IPv4 CIDR"))
                    })?;
                    if !(cidr.contains(&net) && net.prefix_len() > cidr.prefix_len()) {
                        return Err(ModelError::new(
                            object,
                            ef,
                            format!("{net} must be a strict subset of the cidr {cidr}"),
                        ));
                    }
                    except.push(net);
                }
                out.push(Peer::Block { cidr, except });
            }
            (None, true) => {
                let pods = Selector::parse(
                    &p.pod_selector.clone().unwrap_or_default(),
                    object,
                    &format!("{f}.podSelector"),
                )?;
                let namespaces = match &p.namespace_selector {
                    None => Namespaces::Own(own.to_string()),
                    Some(s) => Namespaces::Matching(Selector::parse(
                        s,
                        object,
                        &format!("{f}.namespaceSelector"),
                    )?),
                };
                out.push(Peer::Pods { namespaces, pods });
            }
        }
    }
    Ok(Some(out))
}

fn ports(
    object: &str,
    field: &str,
    list: Option<&[NetworkPolicyPort]>,
) -> Result<Vec<PortMatch>, ModelError> {
    let mut out = Vec::new();
    for (i, p) in list.iter().copied().flatten().enumerate() {
        let f = format!("{field}[{i}]");
        let proto = Proto::parse(p.protocol.as_deref()).ok_or_else(|| {
            ModelError::new(
                object,
                format!("{f}.protocol"),
                format!(
                    "{:?} is not one of TCP, UDP, SCTP",
                    p.protocol.as_deref().unwrap_or("")
                ),
            )
        })?;
        let number = |n: i32, what: &str| {
            u16::try_from(n).ok().filter(|n| *n > 0).ok_or_else(|| {
                ModelError::new(
                    object,
                    format!("{f}.{what}"),
                    format!("{n} is not a port (1-65535)"),
                )
            })
        };
        let port = match (&p.port, p.end_port) {
            (None, None) => PortRef::All,
            (Some(IntOrString::Int(n)), end) => {
                let start = number(*n, "port")?;
                let end = match end {
                    None => start,
                    Some(e) => {
                        let e = number(e, "endPort")?;
                        if e < start {
                            return Err(ModelError::new(
                                object,
                                format!("{f}.endPort"),
                                format!("{e} is below port {start}; it must be at least the port"),
                            ));
                        }
                        e
                    }
                };
                PortRef::Range(start, end)
            }
            (Some(IntOrString::String(name)), None) => {
                if name.is_empty() || name.len() > 15 {
                    return Err(ModelError::new(
                        object,
                        format!("{f}.port"),
                        format!(
                            "{name:?} is not a port name (an IANA service name of 1-15 characters)"
                        ),
                    ));
                }
                PortRef::Named(name.clone())
            }
            (_, Some(_)) => {
                return Err(ModelError::new(
                    object,
                    format!("{f}.endPort"),
                    "endPort needs a numeric port",
                ))
            }
        };
        out.push(PortMatch { proto, port });
    }
    Ok(out)
}

/// A pod as policies see it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PodFacts {
    pub namespace: String,
    pub name: String,
    pub labels: Labels,
    pub ip: Option<Ipv4Addr>,
    pub node: Option<String>,
    /// hostNetwork pods share their node's address: policies never select them, and selector
    /// peers never match them.
    pub host_network: bool,
    /// Container ports: name, protocol, number (named ones resolve policies' named ports).
    pub ports: Vec<(String, Proto, u16)>,
}

impl PodFacts {
    /// `None` for a pod that has ended (Succeeded, Failed): it holds no address any more.
    pub fn from_pod(p: &Pod) -> Option<PodFacts> {
        let (namespace, name) = namespaced(&p.metadata);
        let status = p.status.as_ref();
        if matches!(
            status.and_then(|s| s.phase.as_deref()),
            Some("Succeeded" | "Failed")
        ) {
            return None;
        }
        let spec = p.spec.as_ref();
        let ip = status
            .and_then(|s| s.pod_ip.as_deref())
            .and_then(|ip| ip.parse().ok());
        let ports = spec
            .into_iter()
            .flat_map(|s| s.containers.iter())
            .flat_map(|c| c.ports.iter().flatten())
            .filter_map(|p| {
                Some((
                    p.name.clone().filter(|n| !n.is_empty())?,
                    Proto::parse(p.protocol.as_deref())?,
                    u16::try_from(p.container_port).ok()?,
                ))
            })
            .collect();
        Some(PodFacts {
            namespace,
            name,
            labels: p.metadata.labels.clone().unwrap_or_default(),
            ip,
            node: spec.and_then(|s| s.node_name.clone()),
            host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
            ports,
        })
    }

    pub fn key(&self) -> Key {
        (self.namespace.clone(), self.name.clone())
    }

    /// The number a named port stands for on this pod.
    pub fn named_port(&self, name: &str, proto: Proto) -> Option<u16> {
        self.ports
            .iter()
            .find(|(n, p, _)| n == name && *p == proto)
            .map(|(_, _, n)| *n)
    }
}

/// A namespace's labels, with `kubernetes.io/metadata.name` as the API server always sets it.
pub fn namespace_labels(ns: &Namespace) -> (String, Labels) {
    let name = ns.metadata.name.clone().unwrap_or_default();
    let mut labels = ns.metadata.labels.clone().unwrap_or_default();
    labels.insert("kubernetes.io/metadata.name".into(), name.clone());
    (name, labels)
}
