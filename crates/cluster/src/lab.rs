//! The lab document: how many nodes, the address plan and the routing backend.
//!
//! ```yaml
//! apiVersion: flatnet.dev/v1alpha1
//! kind: Lab
//! metadata: {name: demo}
//! spec:
//!   nodes: 3                      # or a list: [{name: a, subnet: 0, labels: {zone: a}}, …]
//!   backend: vxlan                # host-gw | vxlan | auto
//!   clusterCIDR: 10.244.0.0/16    # pod addresses; each node gets a /nodeCIDRMaskSize of it
//!   serviceCIDR: 10.96.0.0/12
//!   nodeCIDRMaskSize: 24
//!   underlay: {subnets: [172.18.0.0/24], mtu: 1500}   # several subnets are joined by a router
//!   loadBalancerPool: 198.51.100.0/24   # LoadBalancer Service IPs, reachable from the lab internet
//! ```

use crate::{is_dns_label, ModelError};
use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

pub const API_VERSION: &str = "flatnet.dev/v1alpha1";

/// How nodes reach each other's pod CIDRs (Flannel's backends).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum Backend {
    /// A route to each remote pod CIDR via the remote node's IP: needs one L2 segment.
    #[serde(rename = "host-gw")]
    HostGw,
    /// An overlay: pod packets encapsulated in UDP to the remote node.
    #[default]
    #[serde(rename = "vxlan")]
    Vxlan,
    /// host-gw to nodes on the same segment, VXLAN to the rest (Flannel's DirectRouting).
    #[serde(rename = "auto")]
    Auto,
}

impl Backend {
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::HostGw => "host-gw",
            Backend::Vxlan => "vxlan",
            Backend::Auto => "auto",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct NodeSpec {
    pub name: String,
    /// Index into `underlay.subnets`.
    #[serde(default)]
    pub subnet: usize,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Nodes {
    Count(usize),
    List(Vec<NodeSpec>),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Underlay {
    #[serde(default = "default_subnets")]
    pub subnets: Vec<Ipv4Net>,
    #[serde(default = "default_mtu")]
    pub mtu: u32,
}

impl Default for Underlay {
    fn default() -> Self {
        Underlay {
            subnets: default_subnets(),
            mtu: default_mtu(),
        }
    }
}

fn default_subnets() -> Vec<Ipv4Net> {
    vec!["172.18.0.0/24".parse().expect("valid")]
}
fn default_mtu() -> u32 {
    1500
}
fn default_nodes() -> Nodes {
    Nodes::Count(3)
}
fn default_cluster() -> Ipv4Net {
    "10.244.0.0/16".parse().expect("valid")
}
fn default_service() -> Ipv4Net {
    "10.96.0.0/12".parse().expect("valid")
}
fn default_mask() -> u8 {
    24
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawSpec {
    #[serde(default = "default_nodes")]
    pub nodes: Nodes,
    #[serde(default)]
    pub backend: Backend,
    #[serde(default = "default_cluster", rename = "clusterCIDR")]
    pub cluster_cidr: Ipv4Net,
    #[serde(default = "default_service", rename = "serviceCIDR")]
    pub service_cidr: Ipv4Net,
    #[serde(default = "default_mask", rename = "nodeCIDRMaskSize")]
    pub node_cidr_mask_size: u8,
    #[serde(default)]
    pub underlay: Underlay,
    #[serde(default = "default_lb_pool", rename = "loadBalancerPool")]
    pub load_balancer_pool: Ipv4Net,
}

fn default_lb_pool() -> Ipv4Net {
    "198.51.100.0/24".parse().expect("valid")
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Metadata {
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct LabDoc {
    pub api_version: String,
    pub kind: String,
    pub metadata: Metadata,
    #[serde(default = "default_raw")]
    pub spec: RawSpec,
}

fn default_raw() -> RawSpec {
    serde_json::from_value(serde_json::json!({})).expect("all fields default")
}

/// The lab's addressing outside the cluster: the lab "internet" beyond the router.
pub const INTERNET: &str = "203.0.113.0/24";

/// A validated lab: named nodes, each on an underlay subnet, and the address plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LabSpec {
    pub name: String,
    pub nodes: Vec<NodeSpec>,
    pub backend: Backend,
    pub cluster_cidr: Ipv4Net,
    pub service_cidr: Ipv4Net,
    pub node_cidr_mask_size: u8,
    pub underlay: Underlay,
    /// Where `type: LoadBalancer` Services get their IPs (what MetalLB hands out on a real
    /// cluster); the lab router sends each to a node.
    #[serde(default = "default_lb_pool")]
    pub load_balancer_pool: Ipv4Net,
}

impl LabSpec {
    /// Reads and validates a `kind: Lab` document.
    pub fn from_value(v: &serde_json::Value) -> Result<LabSpec, ModelError> {
        let name = v
            .pointer("/metadata/name")
            .and_then(|n| n.as_str())
            .unwrap_or("?");
        let object = format!("Lab {name}");
        let doc: LabDoc = serde_json::from_value(v.clone())
            .map_err(|e| ModelError::new(&object, "", e.to_string()))?;
        if doc.api_version != API_VERSION {
            return Err(ModelError::new(
                &object,
                "apiVersion",
                format!("{:?} is not {API_VERSION:?}", doc.api_version),
            ));
        }
        if !is_dns_label(&doc.metadata.name) || doc.metadata.name.len() > 12 {
            return Err(ModelError::new(
                &object,
                "metadata.name",
                "must be 1-12 lower-case letters, digits or '-' (it prefixes namespace names)",
            ));
        }
        let s = doc.spec;
        let nodes = match s.nodes {
            Nodes::Count(n) => (1..=n)
                .map(|i| NodeSpec {
                    name: format!("node-{i}"),
                    subnet: 0,
                    labels: BTreeMap::new(),
                })
                .collect(),
            Nodes::List(l) => l,
        };
        let lab = LabSpec {
            name: doc.metadata.name,
            nodes,
            backend: s.backend,
            cluster_cidr: s.cluster_cidr,
            service_cidr: s.service_cidr,
            node_cidr_mask_size: s.node_cidr_mask_size,
            underlay: s.underlay,
            load_balancer_pool: s.load_balancer_pool,
        };
        lab.validate()?;
        Ok(lab)
    }

    fn err(&self, field: &str, msg: impl Into<String>) -> ModelError {
        ModelError::new(format!("Lab {}", self.name), field, msg)
    }

    /// How many nodes the cluster CIDR can give a pod CIDR.
    pub fn node_capacity(&self) -> u64 {
        1u64 << (self.node_cidr_mask_size - self.cluster_cidr.prefix_len())
    }

    fn validate(&self) -> Result<(), ModelError> {
        if self.nodes.is_empty() {
            return Err(self.err("spec.nodes", "at least one node is needed"));
        }
        let mask = self.node_cidr_mask_size;
        if mask < self.cluster_cidr.prefix_len() || mask > 28 {
            return Err(self.err(
                "spec.nodeCIDRMaskSize",
                format!(
                    "{mask} must lie between the cluster CIDR's prefix /{} and /28",
                    self.cluster_cidr.prefix_len()
                ),
            ));
        }
        if (self.nodes.len() as u64) > self.node_capacity() {
            return Err(self.err(
                "spec.clusterCIDR",
                format!(
                    "{} holds {} pod CIDRs of /{mask}, too few for {} nodes; use a larger cluster CIDR or a longer nodeCIDRMaskSize",
                    self.cluster_cidr,
                    self.node_capacity(),
                    self.nodes.len()
                ),
            ));
        }
        if self.underlay.subnets.is_empty() {
            return Err(self.err("spec.underlay.subnets", "at least one subnet is needed"));
        }
        if !(1280..=9000).contains(&self.underlay.mtu) {
            return Err(self.err("spec.underlay.mtu", "must lie between 1280 and 9000"));
        }
        let internet: Ipv4Net = INTERNET.parse().expect("valid");
        let mut nets: Vec<(String, Ipv4Net)> = vec![
            ("spec.clusterCIDR".into(), self.cluster_cidr),
            ("spec.serviceCIDR".into(), self.service_cidr),
            ("the lab internet".into(), internet),
            ("spec.loadBalancerPool".into(), self.load_balancer_pool),
        ];
        for (i, s) in self.underlay.subnets.iter().enumerate() {
            nets.push((format!("spec.underlay.subnets[{i}]"), *s));
        }
        for (i, (fa, a)) in nets.iter().enumerate() {
            for (fb, b) in &nets[i + 1..] {
                if a.contains(&b.network()) || b.contains(&a.network()) {
                    return Err(self.err(fb, format!("{b} overlaps {fa} ({a})")));
                }
            }
        }
        let mut seen = std::collections::BTreeSet::new();
        for (i, n) in self.nodes.iter().enumerate() {
            let field = format!("spec.nodes[{i}]");
            if !is_dns_label(&n.name) || n.name.len() > 20 {
                return Err(self.err(
                    &format!("{field}.name"),
                    format!(
                        "{:?} must be 1-20 lower-case letters, digits or '-'",
                        n.name
                    ),
                ));
            }
            if !seen.insert(&n.name) {
                return Err(self.err(
                    &format!("{field}.name"),
                    format!("{:?} appears twice", n.name),
                ));
            }
            if n.subnet >= self.underlay.subnets.len() {
                return Err(self.err(
                    &format!("{field}.subnet"),
                    format!(
                        "{} is not an index of spec.underlay.subnets (0..{})",
                        n.subnet,
                        self.underlay.subnets.len() - 1
                    ),
                ));
            }
        }
        for (i, s) in self.underlay.subnets.iter().enumerate() {
            let on = self.nodes.iter().filter(|n| n.subnet == i).count() as u64;
            // .1 is the router, the rest are node addresses.
            let room = s.hosts().count() as u64 - 1;
            if on > room {
                return Err(self.err(
                    &format!("spec.underlay.subnets[{i}]"),
                    format!("{s} has room for {room} nodes, {on} are placed on it"),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn lab(spec: serde_json::Value) -> Result<LabSpec, ModelError> {
        LabSpec::from_value(
            &json!({"apiVersion": API_VERSION, "kind": "Lab", "metadata": {"name": "t"}, "spec": spec}),
        )
    }

    #[test]
    fn defaults_are_flannels() {
        let l = lab(json!({})).unwrap();
        assert_eq!(l.nodes.len(), 3);
        assert_eq!(l.cluster_cidr.to_string(), "10.244.0.0/16");
        assert_eq!(l.service_cidr.to_string(), "10.96.0.0/12");
        assert_eq!(l.node_cidr_mask_size, 24);
        assert_eq!(l.backend, Backend::Vxlan);
        assert_eq!(l.nodes[0].name, "node-1");
    }

    #[test]
    fn errors_name_the_field() {
        let e = lab(json!({"clusterCIDR": "10.96.0.0/16"})).unwrap_err();
        assert_eq!(e.field, "spec.serviceCIDR", "{e}");
        let e = lab(json!({"nodes": 5, "clusterCIDR": "10.244.0.0/22"})).unwrap_err();
        assert_eq!(e.field, "spec.clusterCIDR", "{e}");
        assert!(e.message.contains("too few"), "{e}");
        let e = lab(json!({"backend": "gre"})).unwrap_err();
        assert!(e.message.contains("host-gw"), "{e}");
        let e = lab(json!({"nodez": 3})).unwrap_err();
        assert!(e.message.contains("nodez"), "{e}");
        let e = lab(json!({"underlay": {"subnets": ["10.244.7.0/24"]}})).unwrap_err();
        assert_eq!(e.field, "spec.underlay.subnets[0]", "{e}");
        let e = lab(json!({"nodes": [{"name": "a", "subnet": 1}]})).unwrap_err();
        assert_eq!(e.field, "spec.nodes[0].subnet", "{e}");
        let e = lab(json!({"nodes": [{"name": "a"}, {"name": "a"}]})).unwrap_err();
        assert!(e.message.contains("twice"), "{e}");
    }
}
