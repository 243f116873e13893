//! Cluster state as an agent sees it, and the `file` source: a directory of manifests (Node
//! objects with `spec.podCIDR` and an `InternalIP`, as the node IPAM controller and the kubelet
//! fill them in a real cluster). The `kube` source will fill the same [`ClusterState`].

use crate::manifests::Manifests;
use crate::ModelError;
use ipnet::Ipv4Net;
use k8s_openapi::api::core::v1::Node;
use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

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

#[derive(Debug, Clone, Default, PartialEq)]
pub struct ClusterState {
    pub nodes: Vec<NodeInfo>,
    pub services: Vec<k8s_openapi::api::core::v1::Service>,
    pub endpoint_slices: Vec<k8s_openapi::api::discovery::v1::EndpointSlice>,
    /// Pods (DNS answers `a-b-c-d.<ns>.pod` only for pods that exist, in its `verified` mode).
    pub pods: Vec<k8s_openapi::api::core::v1::Pod>,
}

/// A directory of `*.yaml`, `*.yml` and `*.json` manifests, read whole on each load.
#[derive(Debug, Clone)]
pub struct FileSource {
    pub dir: PathBuf,
}

impl FileSource {
    pub fn new(dir: impl Into<PathBuf>) -> FileSource {
        FileSource { dir: dir.into() }
    }

    fn files(&self) -> std::io::Result<Vec<PathBuf>> {
        let mut out = Vec::new();
        let mut stack = vec![self.dir.clone()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d)? {
                let p = e?.path();
                if p.is_dir() {
                    stack.push(p);
                } else if matches!(
                    p.extension().and_then(|e| e.to_str()),
                    Some("yaml" | "yml" | "json")
                ) {
                    out.push(p);
                }
            }
        }
        out.sort();
        Ok(out)
    }

    /// Changes whenever a file appears, goes or is rewritten: cheap enough to poll.
    pub fn fingerprint(&self) -> u64 {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        for p in self.files().unwrap_or_default() {
            p.hash(&mut h);
            if let Ok(m) = std::fs::metadata(&p) {
                m.len().hash(&mut h);
                m.modified().ok().hash(&mut h);
            }
        }
        h.finish()
    }

    pub fn load(&self) -> Result<ClusterState, ModelError> {
        let io = |p: &Path, e: std::io::Error| {
            ModelError::new(p.display().to_string(), "", e.to_string())
        };
        let mut all = Manifests::default();
        for p in self.files().map_err(|e| io(&self.dir, e))? {
            let text = match std::fs::read_to_string(&p) {
                Ok(t) => t,
                // Removed between listing and reading: the next poll sees the new state.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io(&p, e)),
            };
            all.extend(Manifests::parse(&text, &p.display().to_string())?)?;
        }
        let mut nodes: Vec<NodeInfo> = all.nodes.iter().filter_map(NodeInfo::from_node).collect();
        nodes.sort_by(|a, b| a.name.cmp(&b.name));
        nodes.dedup_by(|a, b| a.name == b.name);
        Ok(ClusterState {
            nodes,
            services: all.services,
            endpoint_slices: all.endpoint_slices,
            pods: all.pods,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nodes_round_trip_through_files() {
        let dir = std::env::temp_dir().join(format!("fn-src-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("nodes")).unwrap();
        let n = NodeInfo {
            name: "node-1".into(),
            ip: "172.18.0.2".parse().unwrap(),
            pod_cidr: "10.244.1.0/24".parse().unwrap(),
            labels: BTreeMap::new(),
        };
        let src = FileSource::new(&dir);
        let before = src.fingerprint();
        std::fs::write(
            dir.join("nodes/node-1.json"),
            serde_json::to_string(&n.to_node()).unwrap(),
        )
        .unwrap();
        assert_ne!(before, src.fingerprint());
        assert_eq!(src.load().unwrap().nodes, vec![n]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
