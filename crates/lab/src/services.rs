//! Services in the lab: the control-plane jobs a real cluster does for them — ClusterIP and
//! NodePort allocation (the API server's), EndpointSlices from the pods a selector matches (the
//! EndpointSlice controller's) — published as files the agents' `file` source reads.

use crate::{PodRecord, State};
use cluster::manifests::namespaced;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

/// The lab's first ClusterIP offset: .1 is the API server's and .10 the cluster DNS's by
/// convention, so allocation starts above both.
const FIRST_OFFSET: u32 = 20;
pub const NODE_PORTS: (u16, u16) = (30000, 32767);

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Allocations {
    /// `namespace/name` → ClusterIP
    pub cluster_ips: BTreeMap<String, Ipv4Addr>,
    /// `namespace/name/<port index>` → NodePort
    pub node_ports: BTreeMap<String, u16>,
    /// `namespace/name` → load-balancer IP
    #[serde(default)]
    pub lb_ips: BTreeMap<String, Ipv4Addr>,
}

/// `allocs[key]` if it has one; else the first free candidate, recorded as used and allocated.
fn sticky<V: Copy + Ord>(
    allocs: &mut BTreeMap<String, V>,
    used: &mut BTreeSet<V>,
    key: &str,
    mut candidates: impl Iterator<Item = V>,
    full: impl FnOnce() -> String,
) -> Result<V, String> {
    if let Some(v) = allocs.get(key) {
        return Ok(*v);
    }
    let v = candidates.find(|v| !used.contains(v)).ok_or_else(full)?;
    used.insert(v);
    allocs.insert(key.to_string(), v);
    Ok(v)
}

fn key(svc: &Service) -> String {
    let (ns, name) = namespaced(&svc.metadata);
    format!("{ns}/{name}")
}

/// Fills in ClusterIPs and NodePorts (kept across syncs in `s.allocations`) and returns the
/// Services as the API server would store them.
pub fn allocate(s: &mut State, services: &[Service]) -> Result<Vec<Service>, String> {
    let live: BTreeSet<String> = services.iter().map(key).collect();
    s.allocations.cluster_ips.retain(|k, _| live.contains(k));
    s.allocations.lb_ips.retain(|k, _| live.contains(k));
    let mut used_lb: BTreeSet<Ipv4Addr> = s.allocations.lb_ips.values().copied().collect();
    s.allocations
        .node_ports
        .retain(|k, _| live.contains(k.rsplit_once('/').map_or(k.as_str(), |(svc, _)| svc)));
    let cidr = s.spec.service_cidr;
    let mut used_ips: BTreeSet<Ipv4Addr> = services
        .iter()
        .filter_map(|svc| svc.spec.as_ref()?.cluster_ip.as_deref()?.parse().ok())
        .collect();
    used_ips.extend(s.allocations.cluster_ips.values().copied());
    let mut used_ports: BTreeSet<u16> = services
        .iter()
        .flat_map(|svc| svc.spec.iter().flat_map(|sp| sp.ports.iter().flatten()))
        .filter_map(|p| p.node_port.and_then(|n| u16::try_from(n).ok()))
        .collect();
    used_ports.extend(s.allocations.node_ports.values().copied());
    let mut out = Vec::new();
    for svc in services {
        let k = key(svc);
        let mut svc = svc.clone();
        let spec = svc.spec.get_or_insert_with(Default::default);
        let ty = spec.type_.clone().unwrap_or_else(|| "ClusterIP".into());
        if ty != "ExternalName" && spec.cluster_ip.as_deref().is_none_or(str::is_empty) {
            let base = u32::from(cidr.network());
            let ip = sticky(
                &mut s.allocations.cluster_ips,
                &mut used_ips,
                &k,
                (FIRST_OFFSET..(1u32 << (32 - cidr.prefix_len())) - 1)
                    .map(|o| Ipv4Addr::from(base + o)),
                || format!("Service {k}: spec.clusterIP: the service CIDR {cidr} is full"),
            )?;
            spec.cluster_ip = Some(ip.to_string());
            spec.cluster_ips = Some(vec![ip.to_string()]);
        }
        if ty == "LoadBalancer" {
            let pool = s.spec.load_balancer_pool;
            let ip = sticky(
                &mut s.allocations.lb_ips,
                &mut used_lb,
                &k,
                pool.hosts(),
                || format!("Service {k}: the load-balancer pool {pool} is full"),
            )?;
            svc.status = serde_json::from_value(
                json!({"loadBalancer": {"ingress": [{"ip": ip.to_string()}]}}),
            )
            .ok();
        }
        let spec = svc.spec.get_or_insert_with(Default::default);
        if matches!(ty.as_str(), "NodePort" | "LoadBalancer") {
            for (i, p) in spec.ports.iter_mut().flatten().enumerate() {
                if p.node_port.is_some() {
                    continue;
                }
                let port = sticky(
                    &mut s.allocations.node_ports,
                    &mut used_ports,
                    &format!("{k}/{i}"),
                    NODE_PORTS.0..=NODE_PORTS.1,
                    || format!("Service {k}: spec.ports[{i}].nodePort: the NodePort range is full"),
                )?;
                p.node_port = Some(i32::from(port));
            }
        }
        let local = spec.external_traffic_policy.as_deref() == Some("Local");
        if ty == "LoadBalancer" && local && spec.health_check_node_port.is_none() {
            let port = sticky(
                &mut s.allocations.node_ports,
                &mut used_ports,
                &format!("{k}/health"),
                NODE_PORTS.0..=NODE_PORTS.1,
                || format!("Service {k}: spec.healthCheckNodePort: the NodePort range is full"),
            )?;
            spec.health_check_node_port = Some(i32::from(port));
        }
        out.push(svc);
    }
    Ok(out)
}

/// The EndpointSlice of one Service: its selector's pods in its namespace, ready while their
/// processes run; named `targetPort`s resolved through each pod's declared ports.
pub fn endpoint_slice(svc: &Service, pods: &[PodRecord]) -> Option<EndpointSlice> {
    let (ns, name) = namespaced(&svc.metadata);
    let spec = svc.spec.as_ref()?;
    let selector = spec.selector.as_ref().filter(|s| !s.is_empty())?;
    let members: Vec<&PodRecord> = pods
        .iter()
        .filter(|p| {
            p.namespace == ns
                && p.ip.is_some()
                && selector.iter().all(|(k, v)| p.labels.get(k) == Some(v))
        })
        .collect();
    let first = members.first();
    let ports: Vec<_> = spec
        .ports
        .iter()
        .flatten()
        .filter_map(|p| {
            let target = match &p.target_port {
                None => u16::try_from(p.port).ok()?,
                Some(IntOrString::Int(n)) => u16::try_from(*n).ok()?,
                Some(IntOrString::String(named)) => first?.ports.iter().find(|cp| &cp.name == named)?.port,
            };
            Some(json!({"name": p.name.clone().unwrap_or_default(), "port": target, "protocol": p.protocol.clone().unwrap_or_else(|| "TCP".into())}))
        })
        .collect();
    let endpoints: Vec<_> = members
        .iter()
        .map(|p| {
            let r = p.is_ready();
            // The EndpointSlice controller's rule: a pod whose subdomain names this Service
            // is known by its hostname.
            let hostname = p.hostname.as_ref().filter(|_| p.subdomain.as_deref() == Some(name.as_str()));
            json!({"addresses": [p.ip.expect("filtered").to_string()], "nodeName": p.node, "hostname": hostname,
                   "conditions": {"ready": r, "serving": r, "terminating": false},
                   "targetRef": {"kind": "Pod", "namespace": p.namespace, "name": p.name}})
        })
        .collect();
    serde_json::from_value(json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
        "metadata": {"name": format!("{name}-lab"), "namespace": ns,
                     "labels": {"kubernetes.io/service-name": name, "endpointslice.kubernetes.io/managed-by": "flatnet-lab"}},
        "ports": ports, "endpoints": endpoints
    }))
    .ok()
}

/// The ready endpoints of `svc` as `ip:port` (its first port) and the node each runs on.
pub fn ready_endpoints(svc: &Service, pods: &[PodRecord]) -> Vec<(String, Option<String>)> {
    let Some(slice) = endpoint_slice(svc, pods) else {
        return Vec::new();
    };
    let port = slice
        .ports
        .iter()
        .flatten()
        .next()
        .and_then(|p| p.port)
        .unwrap_or(0);
    slice
        .endpoints
        .into_iter()
        .flatten()
        .filter(|e| e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(false))
        .flat_map(|e| {
            let node = e.node_name.clone();
            e.addresses
                .into_iter()
                .map(move |a| (format!("{a}:{port}"), node.clone()))
        })
        .collect()
}
