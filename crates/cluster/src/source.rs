//! A node's routing facts ([`NodeInfo`], from a Node object's `spec.podCIDR` and `InternalIP`,
//! as the node IPAM controller and the kubelet fill them in a real cluster), and
//! [`ClusterState`], a snapshot of the store for one-shot planning and tests.

use ipnet::Ipv4Net;
use k8s_openapi::api::core::v1::Node;
use std::collections::BTreeMap;
use std::net::Ipv4Addr;

/// What node routing needs to know about one node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInfo {
    pub name: String,
    pub ip: Ipv4Addr,
    pub pod_cidr: Ipv4Net,
    pub labels: BTreeMap<String, String>,
}

impl NodeInfo {
    /// A Node's routing facts; a node without a pod CIDR or an InternalIP yet is `None` (not
    /// routable yet, as in Flannel).
    pub fn from_node(n: &Node) -> Option<NodeInfo> {
        let name = n.metadata.name.clone()?;
        let pod_cidr = n.spec.as_ref()?.pod_cidr.as_ref()?.parse().ok()?;
        let ip = n
            .status
            .as_ref()?
            .addresses
            .as_ref()?
            .iter()
            .find(|a| a.type_ == "InternalIP")?
            .address
            .parse()
            .ok()?;
        Some(NodeInfo {
            name,
            ip,
            pod_cidr,
            labels: n.metadata.labels.clone().unwrap_or_default(),
        })
    }

    /// The Node object a lab or a test publishes for this node.
    pub fn to_node(&self) -> Node {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": self.name, "labels": self.labels},
            "spec": {"podCIDR": self.pod_cidr.to_string(), "podCIDRs": [self.pod_cidr.to_string()]},
            "status": {"addresses": [{"type": "InternalIP", "address": self.ip.to_string()},
                                     {"type": "Hostname", "address": self.name}]}
        }))
        .expect("a well-formed Node")
    }
}

/// A snapshot of the objects the parts read.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ClusterState {
    pub nodes: Vec<NodeInfo>,
    pub services: Vec<k8s_openapi::api::core::v1::Service>,
    pub endpoint_slices: Vec<crate::slim::EndpointSlice>,
    /// Pods (DNS answers `a-b-c-d.<ns>.pod` only for pods that exist, in its `verified` mode).
    pub pods: Vec<k8s_openapi::api::core::v1::Pod>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_info_round_trips_through_a_node_object() {
        let n = NodeInfo {
            name: "node-1".into(),
            ip: "172.18.0.2".parse().unwrap(),
            pod_cidr: "10.244.1.0/24".parse().unwrap(),
            labels: BTreeMap::from([("zone".into(), "a".into())]),
        };
        assert_eq!(NodeInfo::from_node(&n.to_node()), Some(n));
    }
}
