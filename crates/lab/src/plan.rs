//! The lab planner: pure functions from the lab document and the manifests to the lab's shape —
//! node addresses and pod CIDRs (what the node IPAM controller writes into `Node.spec.podCIDR`),
//! the pods Deployments stand for, and which node each pod runs on (the scheduler's job, kept to
//! nodeName, nodeSelector and spreading).

use crate::probes::{self, Probe};
use cluster::manifests::{describe, namespaced};
use cluster::{LabSpec, Manifests, ModelError, NodeSpec};
use ipnet::Ipv4Net;
use k8s_openapi::api::core::v1::{PodSpec, PodTemplateSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

/// One node as built: its stable id (for short link names), underlay place and pod CIDR.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodePlan {
    pub name: String,
    pub id: u32,
    pub subnet: usize,
    pub ip: Ipv4Addr,
    pub underlay: Ipv4Net,
    pub gateway: Ipv4Addr,
    pub pod_cidr: Ipv4Net,
    pub labels: BTreeMap<String, String>,
}

impl NodePlan {
    /// See [`scheduling_labels`].
    pub fn scheduling_labels(&self) -> BTreeMap<String, String> {
        scheduling_labels(&self.name, &self.labels)
    }
}

/// The router's address on an underlay subnet.
pub fn router_ip(subnet: Ipv4Net) -> Ipv4Addr {
    subnet.hosts().next().expect("a subnet with hosts")
}

/// Gives every node of `spec` an address and a pod CIDR. Nodes already in `existing` keep theirs;
/// new ones take the lowest free pod CIDR, address and id.
pub fn allocate_nodes(spec: &LabSpec, existing: &[NodePlan]) -> Result<Vec<NodePlan>, ModelError> {
    let mut out: Vec<NodePlan> = Vec::new();
    let mut used_cidrs: BTreeSet<Ipv4Net> = BTreeSet::new();
    let mut used_ips: BTreeSet<Ipv4Addr> = BTreeSet::new();
    let mut used_ids: BTreeSet<u32> = BTreeSet::new();
    for n in &spec.nodes {
        if let Some(e) = existing.iter().find(|e| e.name == n.name) {
            used_cidrs.insert(e.pod_cidr);
            used_ips.insert(e.ip);
            used_ids.insert(e.id);
        }
    }
    let mut cidrs = spec
        .cluster_cidr
        .subnets(spec.node_cidr_mask_size)
        .expect("validated mask");
    for n in &spec.nodes {
        if let Some(e) = existing.iter().find(|e| e.name == n.name) {
            out.push(NodePlan {
                labels: n.labels.clone(),
                ..e.clone()
            });
            continue;
        }
        let object = format!("Lab {}", spec.name);
        let pod_cidr = cidrs.find(|c| !used_cidrs.contains(c)).ok_or_else(|| {
            ModelError::new(
                &object,
                "spec.clusterCIDR",
                "no pod CIDR left for another node",
            )
        })?;
        used_cidrs.insert(pod_cidr);
        let underlay = spec.underlay.subnets[n.subnet];
        let gateway = router_ip(underlay);
        let ip = underlay
            .hosts()
            .skip(1)
            .find(|ip| !used_ips.contains(ip))
            .ok_or_else(|| {
                ModelError::new(
                    &object,
                    format!("spec.underlay.subnets[{}]", n.subnet),
                    "no address left for another node",
                )
            })?;
        used_ips.insert(ip);
        let id = (1..).find(|i| !used_ids.contains(i)).expect("an id");
        used_ids.insert(id);
        out.push(NodePlan {
            name: n.name.clone(),
            id,
            subnet: n.subnet,
            ip,
            underlay,
            gateway,
            pod_cidr,
            labels: n.labels.clone(),
        });
    }
    Ok(out)
}

/// A process of a pod: `command` + `args` as Kubernetes runs them (no shell); empty means the
/// built-in `flatnet serve`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Workload {
    pub container: String,
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    /// The HTTP port `flatnet serve` listens on (the first declared containerPort, else 8080).
    pub http_port: u16,
    /// `readinessProbe`: until it succeeds, the pod is not a ready endpoint.
    #[serde(default)]
    pub readiness: Option<Probe>,
    /// `livenessProbe`: when it fails, the kubelet restarts the container.
    #[serde(default)]
    pub liveness: Option<Probe>,
}

/// A pod as the lab runs it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodWant {
    pub namespace: String,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub node_name: Option<String>,
    pub node_selector: BTreeMap<String, String>,
    pub workloads: Vec<Workload>,
    /// Declared container ports (named ones resolve Services' named `targetPort`s).
    pub ports: Vec<NamedPort>,
    /// Changes whenever anything the lab runs changes; a changed pod is recreated.
    pub hash: String,
    pub owner: Option<String>,
    /// `spec.hostname` and `spec.subdomain`: with a headless Service named like the subdomain,
    /// the pod is `<hostname>.<subdomain>.<ns>.svc.<zone>` in DNS.
    #[serde(default)]
    pub hostname: Option<String>,
    #[serde(default)]
    pub subdomain: Option<String>,
    /// `spec.dnsPolicy` and `spec.dnsConfig`, checked: what the pod's resolv.conf is made of.
    #[serde(default)]
    pub dns: PodDns,
    /// `spec.hostNetwork`: the pod runs in its node's namespace, with the node's address.
    #[serde(default)]
    pub host_network: bool,
}

/// A pod's DNS settings as the kubelet reads them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodDns {
    /// `ClusterFirst` (the default; also for `ClusterFirstWithHostNet`), `Default` or `None`.
    pub policy: String,
    pub nameservers: Vec<String>,
    pub searches: Vec<String>,
    /// Option name and value (`ndots` → `5`).
    pub options: Vec<(String, Option<String>)>,
}

/// Reads and checks `spec.dnsPolicy` and `spec.dnsConfig` (the API server's rules).
fn pod_dns(object: &str, spec: &PodSpec) -> Result<PodDns, ModelError> {
    // The kubelet gives a hostNetwork pod the node's resolver unless it asks for the cluster's.
    let host_network = spec.host_network == Some(true);
    let policy = match spec.dns_policy.as_deref().unwrap_or("ClusterFirst") {
        "ClusterFirst" if host_network => "Default",
        "ClusterFirst" | "ClusterFirstWithHostNet" => "ClusterFirst",
        "Default" => "Default",
        "None" => "None",
        other => {
            return Err(ModelError::new(
                object,
                "spec.dnsPolicy",
                format!(
                    "{other:?} is not one of ClusterFirst, ClusterFirstWithHostNet, Default, None"
                ),
            ))
        }
    };
    let cfg = spec.dns_config.clone().unwrap_or_default();
    let nameservers = cfg.nameservers.unwrap_or_default();
    for (i, ns) in nameservers.iter().enumerate() {
        if ns.parse::<std::net::IpAddr>().is_err() {
            return Err(ModelError::new(
                object,
                format!("spec.dnsConfig.nameservers[{i}]"),
                format!("{ns:?} is not an IP address"),
            ));
        }
    }
    if policy == "None" && nameservers.is_empty() {
        return Err(ModelError::new(
            object,
            "spec.dnsConfig.nameservers",
            "at least one is required when spec.dnsPolicy is None",
        ));
    }
    if nameservers.len() > 3 {
        return Err(ModelError::new(
            object,
            "spec.dnsConfig.nameservers",
            format!("{} given; at most 3", nameservers.len()),
        ));
    }
    let searches = cfg.searches.unwrap_or_default();
    if searches.len() > 32 {
        return Err(ModelError::new(
            object,
            "spec.dnsConfig.searches",
            format!("{} given; at most 32", searches.len()),
        ));
    }
    let mut options = Vec::new();
    for (i, o) in cfg.options.unwrap_or_default().into_iter().enumerate() {
        let name = o.name.filter(|n| !n.is_empty()).ok_or_else(|| {
            ModelError::new(
                object,
                format!("spec.dnsConfig.options[{i}].name"),
                "required",
            )
        })?;
        options.push((name, o.value));
    }
    Ok(PodDns {
        policy: policy.into(),
        nameservers,
        searches,
        options,
    })
}

/// A declared `containerPort`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NamedPort {
    pub name: String,
    pub port: u16,
    pub protocol: String,
    /// `hostPort`: the node forwards this port to the pod (the CNI `portMappings` capability).
    #[serde(default)]
    pub host_port: Option<u16>,
    #[serde(default)]
    pub host_ip: Option<String>,
}

fn container_ports(object: &str, spec: &PodSpec) -> Result<Vec<NamedPort>, ModelError> {
    Ok(cluster::pod_ports(object, spec)?
        .into_iter()
        .map(|p| NamedPort {
            name: p.name,
            port: p.container_port,
            protocol: p.protocol,
            host_port: p.host_port,
            host_ip: p.host_ip.map(|ip| ip.to_string()),
        })
        .collect())
}

/// The declared hostPorts (a change recreates the pod, as a changed pod spec would).
fn host_ports(ports: &[NamedPort]) -> Vec<&NamedPort> {
    ports.iter().filter(|p| p.host_port.is_some()).collect()
}

impl PodWant {
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// `(hostPort, protocol)` pairs: two pods holding the same one cannot share a node (a
    /// hostNetwork pod's containerPorts are its hostPorts, as the API server defaults them).
    fn host_ports(&self) -> impl Iterator<Item = (u16, &str)> {
        self.ports.iter().filter_map(|p| {
            let port = if self.host_network {
                Some(p.port)
            } else {
                p.host_port
            };
            Some((port?, p.protocol.as_str()))
        })
    }
}

fn short_hash(v: &impl Serialize, len: usize) -> String {
    let h = Sha256::digest(serde_json::to_vec(v).expect("serializable"));
    h.iter().map(|b| format!("{b:02x}")).collect::<String>()[..len].to_string()
}

/// Kubernetes' alphabet for generated name suffixes (no vowels, no look-alikes).
const SUFFIX: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";

fn suffix(seed: &str) -> String {
    Sha256::digest(seed.as_bytes())[..5]
        .iter()
        .map(|b| SUFFIX[*b as usize % SUFFIX.len()] as char)
        .collect()
}

fn workloads(object: &str, spec: &PodSpec) -> Result<Vec<Workload>, ModelError> {
    if spec.containers.is_empty() {
        return Err(ModelError::new(
            object,
            "spec.containers",
            "at least one container is needed",
        ));
    }
    let mut serve_taken = false;
    let mut out = Vec::new();
    for (i, c) in spec.containers.iter().enumerate() {
        let probe = |field: &str, p: &Option<k8s_openapi::api::core::v1::Probe>| {
            p.as_ref()
                .map(|p| probes::parse(object, i, c, field, p))
                .transpose()
        };
        let readiness = probe("readinessProbe", &c.readiness_probe)?;
        let liveness = probe("livenessProbe", &c.liveness_probe)?;
        let mut argv: Vec<String> = c.command.clone().unwrap_or_default();
        argv.extend(c.args.clone().unwrap_or_default());
        if argv.is_empty() {
            if serve_taken {
                continue; // one built-in server per pod: the ports would clash
            }
            serve_taken = true;
        }
        let env = c
            .env
            .iter()
            .flatten()
            .filter_map(|e| e.value.clone().map(|v| (e.name.clone(), v)))
            .collect();
        // `flatnet serve` echoes on 9000; HTTP goes on the first other declared TCP port.
        let http_port = c
            .ports
            .iter()
            .flatten()
            .filter(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
            .filter_map(|p| u16::try_from(p.container_port).ok())
            .find(|p| *p != 9000)
            .unwrap_or(8080);
        out.push(Workload {
            container: c.name.clone(),
            argv,
            env,
            http_port,
            readiness,
            liveness,
        });
    }
    Ok(out)
}

/// Every pod the manifests ask for: bare Pods; each Deployment's replicas (named
/// `<deployment>-<template hash>-<suffix>`, like the ReplicaSet controller, but stable); each
/// StatefulSet's replicas (`<name>-<ordinal>`, with hostname and subdomain set so that
/// `<name>-<ordinal>.<serviceName>` resolves, as the StatefulSet controller does); one pod of each
/// DaemonSet on every node its nodeSelector admits.
pub fn desired_pods(m: &Manifests, nodes: &[NodeSpec]) -> Result<Vec<PodWant>, ModelError> {
    let mut out: Vec<PodWant> = Vec::new();
    for p in &m.pods {
        let (ns, name) = namespaced(&p.metadata);
        let object = describe("Pod", Some(&ns), &name);
        let spec = p
            .spec
            .as_ref()
            .ok_or_else(|| ModelError::new(&object, "spec", "missing"))?;
        let w = workloads(&object, spec)?;
        let dns = pod_dns(&object, spec)?;
        let ports = container_ports(&object, spec)?;
        out.push(PodWant {
            labels: p.metadata.labels.clone().unwrap_or_default(),
            node_name: spec.node_name.clone(),
            node_selector: spec.node_selector.clone().unwrap_or_default(),
            hash: short_hash(
                &(
                    &w,
                    &spec.node_name,
                    &spec.node_selector,
                    &spec.hostname,
                    &spec.subdomain,
                    host_ports(&ports),
                    spec.host_network,
                ),
                10,
            ),
            workloads: w,
            ports,
            namespace: ns,
            name,
            owner: None,
            hostname: spec.hostname.clone(),
            subdomain: spec.subdomain.clone(),
            dns,
            host_network: spec.host_network == Some(true),
        });
    }
    for d in &m.deployments {
        let (ns, name) = namespaced(&d.metadata);
        let object = describe("Deployment", Some(&ns), &name);
        let t = Template::of(&object, &d.spec.selector, &d.spec.template)?;
        for i in 0..replicas(&object, d.spec.replicas)? {
            let seed = format!("{ns}/{name}/{}/{i}", t.hash);
            let pod = format!("{name}-{}-{}", t.hash, suffix(&seed));
            out.push(t.pod(&ns, pod, &object, None));
        }
    }
    for st in &m.stateful_sets {
        let (ns, name) = namespaced(&st.metadata);
        let object = describe("StatefulSet", Some(&ns), &name);
        let spec = &st.spec;
        let t = Template::of(&object, &spec.selector, &spec.template)?;
        let service = spec.service_name.clone().filter(|s| !s.is_empty());
        for i in 0..replicas(&object, spec.replicas)? {
            let pod = format!("{name}-{i}");
            let mut w = t.pod(&ns, pod.clone(), &object, None);
            w.hostname = Some(pod);
            w.subdomain = service.clone();
            out.push(w);
        }
    }
    for ds in &m.daemon_sets {
        let (ns, name) = namespaced(&ds.metadata);
        let object = describe("DaemonSet", Some(&ns), &name);
        let spec = &ds.spec;
        let t = Template::of(&object, &spec.selector, &spec.template)?;
        for n in nodes {
            let admitted = t.spec.node_name.as_ref().is_none_or(|x| *x == n.name)
                && selects(&t.node_selector(), &scheduling_labels(&n.name, &n.labels));
            if admitted {
                let pod = format!("{name}-{}", suffix(&format!("{ns}/{name}/{}", n.name)));
                out.push(t.pod(&ns, pod, &object, Some(n.name.clone())));
            }
        }
    }
    let mut seen = BTreeSet::new();
    for p in &out {
        if !seen.insert(p.key()) {
            return Err(ModelError::new(
                describe("Pod", Some(&p.namespace), &p.name),
                "metadata.name",
                "defined twice",
            ));
        }
    }
    Ok(out)
}

/// A controller's replica count (default 1), refused when negative.
fn replicas(object: &str, replicas: Option<i32>) -> Result<i32, ModelError> {
    let n = replicas.unwrap_or(1);
    if n < 0 {
        return Err(ModelError::new(
            object,
            "spec.replicas",
            format!("{n} is negative"),
        ));
    }
    Ok(n)
}

/// A controller's pod template, checked: what each of its pods gets.
struct Template<'a> {
    labels: BTreeMap<String, String>,
    spec: &'a PodSpec,
    workloads: Vec<Workload>,
    ports: Vec<NamedPort>,
    dns: PodDns,
    hash: String,
}

impl<'a> Template<'a> {
    fn of(
        object: &str,
        selector: &LabelSelector,
        t: &'a PodTemplateSpec,
    ) -> Result<Template<'a>, ModelError> {
        let spec = t
            .spec
            .as_ref()
            .ok_or_else(|| ModelError::new(object, "spec.template.spec", "missing"))?;
        let labels = t
            .metadata
            .as_ref()
            .and_then(|m| m.labels.clone())
            .unwrap_or_default();
        if let Some(sel) = &selector.match_labels {
            if let Some((k, v)) = sel.iter().find(|(k, v)| labels.get(*k) != Some(v)) {
                return Err(ModelError::new(
                    object,
                    "spec.selector.matchLabels",
                    format!("{k}={v} does not match the template's labels"),
                ));
            }
        }
        let workloads = workloads(object, spec)?;
        let ports = container_ports(object, spec)?;
        let dns = pod_dns(object, spec)?;
        let hash = short_hash(
            &(
                &workloads,
                &labels,
                &spec.node_name,
                &spec.node_selector,
                &dns,
                host_ports(&ports),
                spec.host_network,
            ),
            10,
        );
        Ok(Template {
            labels,
            spec,
            workloads,
            ports,
            dns,
            hash,
        })
    }

    fn node_selector(&self) -> BTreeMap<String, String> {
        self.spec.node_selector.clone().unwrap_or_default()
    }

    /// One pod of the template; `node` pins it (a DaemonSet's), else the template's nodeName.
    fn pod(&self, namespace: &str, name: String, owner: &str, node: Option<String>) -> PodWant {
        PodWant {
            namespace: namespace.to_string(),
            name,
            labels: self.labels.clone(),
            node_name: node.or_else(|| self.spec.node_name.clone()),
            node_selector: self.node_selector(),
            workloads: self.workloads.clone(),
            ports: self.ports.clone(),
            hash: self.hash.clone(),
            owner: Some(owner.to_string()),
            hostname: self.spec.hostname.clone(),
            subdomain: self.spec.subdomain.clone(),
            dns: self.dns.clone(),
            host_network: self.spec.host_network == Some(true),
        }
    }
}

/// A node's labels as the scheduler sees them (with the well-known hostname label).
pub fn scheduling_labels(
    name: &str,
    labels: &BTreeMap<String, String>,
) -> BTreeMap<String, String> {
    let mut l = labels.clone();
    l.insert("kubernetes.io/hostname".into(), name.to_string());
    l
}

/// Whether a nodeSelector admits a node with these labels.
fn selects(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// The outcome of scheduling.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Placement {
    /// pod key → node
    pub bound: BTreeMap<String, String>,
    /// pod key → why it cannot run
    pub pending: BTreeMap<String, String>,
}

/// Binds each wanted pod to a node. Pods already running (`running`: key → node) stay where
/// they are while their node exists; the rest go where nodeName says, else to the eligible node
/// (nodeSelector) with the fewest pods.
pub fn place(
    wants: &[PodWant],
    nodes: &[NodePlan],
    running: &BTreeMap<String, String>,
) -> Placement {
    let mut load: BTreeMap<&str, usize> = nodes.iter().map(|n| (n.name.as_str(), 0)).collect();
    // hostPorts in use per node (the scheduler's NodePorts filter): one pod each.
    let mut used: BTreeMap<&str, BTreeSet<(u16, &str)>> = BTreeMap::new();
    let mut p = Placement::default();
    for w in wants {
        if let Some(node) = running
            .get(&w.key())
            .filter(|n| load.contains_key(n.as_str()))
        {
            *load.get_mut(node.as_str()).expect("present") += 1;
            used.entry(node.as_str())
                .or_default()
                .extend(w.host_ports());
            p.bound.insert(w.key(), node.clone());
        }
    }
    for w in wants {
        if p.bound.contains_key(&w.key()) {
            continue;
        }
        let free = |node: &str| {
            let taken = used.get(node);
            w.host_ports()
                .all(|hp| taken.is_none_or(|t| !t.contains(&hp)))
        };
        let chosen = match &w.node_name {
            Some(n) if load.contains_key(n.as_str()) && free(n) => Ok(n.clone()),
            Some(n) if load.contains_key(n.as_str()) => {
                Err(format!("node {n:?}: a hostPort of this pod is taken there"))
            }
            Some(n) => Err(format!("spec.nodeName: no node {n:?}")),
            None => {
                let eligible: Vec<&NodePlan> = nodes
                    .iter()
                    .filter(|n| selects(&w.node_selector, &n.scheduling_labels()))
                    .collect();
                if eligible.is_empty() {
                    Err(format!(
                        "no node matches nodeSelector {:?}",
                        w.node_selector
                    ))
                } else {
                    eligible
                        .into_iter()
                        .filter(|n| free(&n.name))
                        .min_by_key(|n| load[n.name.as_str()])
                        .map(|n| n.name.clone())
                        .ok_or_else(|| "no node has this pod's hostPorts free".to_string())
                }
            }
        };
        match chosen {
            Ok(n) => {
                let node = load.get_key_value(n.as_str()).expect("present").0;
                used.entry(node).or_default().extend(w.host_ports());
                *load.get_mut(n.as_str()).expect("present") += 1;
                p.bound.insert(w.key(), n);
            }
            Err(why) => {
                p.pending.insert(w.key(), why);
            }
        }
    }
    p
}

/// Checks that every pod naming a node names one of `nodes` (an error at `up`/`apply` time,
/// where Kubernetes would leave the pod unschedulable forever).
pub fn check_node_names(wants: &[PodWant], nodes: &[NodeSpec]) -> Result<(), ModelError> {
    for w in wants {
        if let Some(n) = &w.node_name {
            if !nodes.iter().any(|x| &x.name == n) {
                let names: Vec<&str> = nodes.iter().map(|x| x.name.as_str()).collect();
                return Err(ModelError::new(
                    w.owner
                        .clone()
                        .unwrap_or_else(|| describe("Pod", Some(&w.namespace), &w.name)),
                    "spec.nodeName",
                    format!("no node {n:?} (nodes: {})", names.join(", ")),
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lab(nodes: serde_json::Value) -> LabSpec {
        LabSpec::from_value(&serde_json::json!({"apiVersion": "flatnet.dev/v1alpha1", "kind": "Lab",
            "metadata": {"name": "t"}, "spec": {"nodes": nodes, "underlay": {"subnets": ["172.18.0.0/24", "172.19.0.0/24"]}}}))
        .unwrap()
    }

    #[test]
    fn nodes_get_distinct_cidrs_and_addresses_and_keep_them() {
        let spec =
            lab(serde_json::json!([{"name": "a"}, {"name": "b", "subnet": 1}, {"name": "c"}]));
        let nodes = allocate_nodes(&spec, &[]).unwrap();
        let cidrs: Vec<String> = nodes.iter().map(|n| n.pod_cidr.to_string()).collect();
        assert_eq!(cidrs, ["10.244.0.0/24", "10.244.1.0/24", "10.244.2.0/24"]);
        assert_eq!(nodes[0].ip.to_string(), "172.18.0.2");
        assert_eq!(nodes[1].ip.to_string(), "172.19.0.2");
        assert_eq!(nodes[1].gateway.to_string(), "172.19.0.1");
        assert_eq!(nodes[2].ip.to_string(), "172.18.0.3");
        // Remove b, add d: a and c keep theirs, d takes the freed CIDR.
        let spec2 = lab(serde_json::json!([{"name": "a"}, {"name": "c"}, {"name": "d"}]));
        let again = allocate_nodes(&spec2, &nodes).unwrap();
        assert_eq!(again[0], nodes[0]);
        assert_eq!(again[1], nodes[2]);
        assert_eq!(again[2].pod_cidr.to_string(), "10.244.1.0/24");
        assert_eq!(again[2].id, 2);
    }

    fn manifests(text: &str) -> Manifests {
        Manifests::parse(text, "t.yaml").unwrap()
    }

    #[test]
    fn deployments_spread_and_selectors_hold() {
        let spec = lab(
            serde_json::json!([{"name": "a", "labels": {"disk": "ssd"}}, {"name": "b"}, {"name": "c"}]),
        );
        let nodes = allocate_nodes(&spec, &[]).unwrap();
        let m = manifests(
            r#"
apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
spec:
  replicas: 6
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec: {containers: [{name: c, image: x}]}
---
apiVersion: v1
kind: Pod
metadata: {name: db}
spec: {nodeSelector: {disk: ssd}, containers: [{name: c, image: x}]}
---
apiVersion: v1
kind: Pod
metadata: {name: gpu}
spec: {nodeSelector: {gpu: "yes"}, containers: [{name: c, image: x}]}
"#,
        );
        let wants = desired_pods(&m, &spec.nodes).unwrap();
        assert_eq!(wants.len(), 8);
        let p = place(&wants, &nodes, &BTreeMap::new());
        assert_eq!(p.bound["default/db"], "a");
        assert!(p.pending["default/gpu"].contains("nodeSelector"));
        let mut per: BTreeMap<&str, usize> = BTreeMap::new();
        for n in p.bound.values() {
            *per.entry(n.as_str()).or_default() += 1;
        }
        let (min, max) = (per.values().min().unwrap(), per.values().max().unwrap());
        assert!(max - min <= 1, "spread: {per:?}");
        // Stable: the same input names the same pods.
        assert_eq!(desired_pods(&m, &spec.nodes).unwrap(), wants);
    }

    #[test]
    fn stateful_sets_name_pods_by_ordinal_and_daemon_sets_cover_admitted_nodes() {
        let spec = lab(
            serde_json::json!([{"name": "a", "labels": {"disk": "ssd"}}, {"name": "b"}, {"name": "c", "labels": {"disk": "ssd"}}]),
        );
        let m = manifests(
            r#"
apiVersion: apps/v1
kind: StatefulSet
metadata: {name: db, namespace: data}
spec:
  serviceName: db
  replicas: 3
  selector: {matchLabels: {app: db}}
  template:
    metadata: {labels: {app: db}}
    spec: {containers: [{name: c, image: x}]}
---
apiVersion: apps/v1
kind: DaemonSet
metadata: {name: agent}
spec:
  selector: {matchLabels: {app: agent}}
  template:
    metadata: {labels: {app: agent}}
    spec: {nodeSelector: {disk: ssd}, containers: [{name: c, image: x}]}
"#,
        );
        let wants = desired_pods(&m, &spec.nodes).unwrap();
        let db: Vec<_> = wants
            .iter()
            .filter(|w| w.namespace == "data")
            .map(|w| {
                (
                    w.name.as_str(),
                    w.hostname.as_deref(),
                    w.subdomain.as_deref(),
                )
            })
            .collect();
        assert_eq!(
            db,
            [
                ("db-0", Some("db-0"), Some("db")),
                ("db-1", Some("db-1"), Some("db")),
                ("db-2", Some("db-2"), Some("db"))
            ]
        );
        let mut agents: Vec<_> = wants
            .iter()
            .filter(|w| w.name.starts_with("agent-"))
            .map(|w| w.node_name.as_deref().unwrap())
            .collect();
        agents.sort();
        assert_eq!(agents, ["a", "c"], "one per node with disk=ssd");
        let bad = manifests("apiVersion: apps/v1\nkind: StatefulSet\nmetadata: {name: s}\nspec: {serviceName: s, selector: {matchLabels: {app: s}}, template: {metadata: {labels: {app: t}}, spec: {containers: [{name: c, image: x}]}}}\n");
        assert_eq!(
            desired_pods(&bad, &spec.nodes).unwrap_err().to_string(),
            "StatefulSet default/s: spec.selector.matchLabels: app=s does not match the template's labels"
        );
    }

    #[test]
    fn dns_settings_are_checked_and_named() {
        let pod = |spec: &str| {
            manifests(&format!(
                "apiVersion: v1\nkind: Pod\nmetadata: {{name: x}}\nspec: {{containers: [{{name: c, image: x}}], {spec}}}\n"
            ))
        };
        let err = |spec: &str| desired_pods(&pod(spec), &[]).unwrap_err().to_string();
        assert_eq!(
            err("dnsPolicy: None"),
            "Pod default/x: spec.dnsConfig.nameservers: at least one is required when spec.dnsPolicy is None"
        );
        assert!(err("dnsPolicy: Cluster")
            .starts_with("Pod default/x: spec.dnsPolicy: \"Cluster\" is not one of"));
        assert_eq!(
            err("dnsConfig: {nameservers: [nine]}"),
            "Pod default/x: spec.dnsConfig.nameservers[0]: \"nine\" is not an IP address"
        );
        let ok = desired_pods(&pod("dnsPolicy: None, dnsConfig: {nameservers: [192.0.2.53], options: [{name: ndots, value: \"1\"}]}"), &[]).unwrap();
        assert_eq!(ok[0].dns.policy, "None");
        assert_eq!(
            ok[0].dns.options,
            vec![("ndots".to_string(), Some("1".to_string()))]
        );
        assert_eq!(
            desired_pods(&pod("hostname: h"), &[]).unwrap()[0]
                .dns
                .policy,
            "ClusterFirst"
        );
    }

    #[test]
    fn pods_on_missing_nodes_are_refused_by_name() {
        let spec = lab(serde_json::json!(2));
        let m = manifests("apiVersion: v1\nkind: Pod\nmetadata: {name: x}\nspec: {nodeName: node-9, containers: [{name: c, image: x}]}\n");
        let e = check_node_names(&desired_pods(&m, &spec.nodes).unwrap(), &spec.nodes).unwrap_err();
        assert_eq!(
            e.to_string(),
            "Pod default/x: spec.nodeName: no node \"node-9\" (nodes: node-1, node-2)"
        );
    }

    #[test]
    fn host_network_pods_use_the_nodes_resolver_and_ports() {
        let spec = lab(serde_json::json!(1));
        let nodes = allocate_nodes(&spec, &[]).unwrap();
        let pod = |name: &str, extra: &str| {
            format!("apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}}}\nspec: {{hostNetwork: true, {extra} containers: [{{name: c, image: x, ports: [{{containerPort: 9100}}]}}]}}\n---\n")
        };
        let m = manifests(&(pod("a", "") + &pod("b", "dnsPolicy: ClusterFirstWithHostNet,")));
        let wants = desired_pods(&m, &spec.nodes).unwrap();
        assert!(wants.iter().all(|w| w.host_network));
        // The kubelet's rule: ClusterFirst means the node's resolver for a hostNetwork pod.
        assert_eq!(wants[0].dns.policy, "Default");
        assert_eq!(wants[1].dns.policy, "ClusterFirst");
        // Both listen on the node's 9100: they cannot share the only node.
        let placed = place(&wants, &nodes, &BTreeMap::new());
        assert_eq!(placed.bound.len(), 1, "{placed:?}");
        assert_eq!(placed.pending.len(), 1, "{placed:?}");
        // A probe the API server refuses names the container and field.
        let bad = manifests("apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: {containers: [{name: c, image: x, livenessProbe: {httpGet: {port: web}}}]}\n");
        assert_eq!(
            desired_pods(&bad, &spec.nodes).unwrap_err().to_string(),
            "Pod default/p: spec.containers[0].livenessProbe.httpGet.port: \"web\": no containerPort of this container has that name"
        );
    }

    #[test]
    fn running_pods_stay_put() {
        let spec = lab(serde_json::json!(3));
        let nodes = allocate_nodes(&spec, &[]).unwrap();
        let m = manifests("apiVersion: v1\nkind: Pod\nmetadata: {name: x}\nspec: {containers: [{name: c, image: x}]}\n");
        let wants = desired_pods(&m, &spec.nodes).unwrap();
        let running = BTreeMap::from([("default/x".to_string(), "node-3".to_string())]);
        assert_eq!(place(&wants, &nodes, &running).bound["default/x"], "node-3");
    }
}
