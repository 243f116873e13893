//! Services and EndpointSlices, reduced to what the proxy programs: one [`SvcPort`] per
//! (Service, port), with its frontends (cluster IPs, NodePort, external and load-balancer IPs),
//! its policies and its endpoints. Like kube-proxy, ports are matched to EndpointSlice ports by
//! name: the EndpointSlice controller has already resolved named `targetPort`s to numbers.

use cluster::manifests::{describe, namespaced};
use cluster::slim::EndpointSlice;
use cluster::ModelError;
use ipnet::Ipv4Net;
use k8s_openapi::api::core::v1::Service;
use std::net::Ipv4Addr;

/// What a node's proxy needs to know besides the objects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub node: String,
    pub node_ips: Vec<Ipv4Addr>,
    pub cluster_cidr: Ipv4Net,
    pub service_cidr: Ipv4Net,
    /// This node's pod CIDR: every pod here has its address in it (see [`crate::plan::node_part`]).
    pub pod_cidr: Ipv4Net,
    /// Inclusive NodePort range (default 30000-32767).
    pub node_ports: (u16, u16),
}

pub use cluster::Proto;

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Endpoint {
    pub ip: Ipv4Addr,
    pub port: u16,
    pub node: Option<compact_str::CompactString>,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SvcPort {
    /// `namespace/name:port` (the port's name, or its number when unnamed).
    pub id: String,
    pub proto: Proto,
    pub port: u16,
    pub cluster_ips: Vec<Ipv4Addr>,
    pub node_port: Option<u16>,
    pub external_ips: Vec<Ipv4Addr>,
    pub lb_ips: Vec<Ipv4Addr>,
    pub lb_source_ranges: Vec<Ipv4Net>,
    /// `sessionAffinity: ClientIP` and its timeout in seconds.
    pub affinity: Option<u32>,
    pub external_local: bool,
    pub internal_local: bool,
    pub health_check_node_port: Option<u16>,
    pub endpoints: Vec<Endpoint>,
}

fn ip(object: &str, field: &str, s: &str) -> Result<Ipv4Addr, ModelError> {
    s.parse()
        .map_err(|_| ModelError::new(object, field, format!("{s:?} is not an IPv4 address")))
}

/// The Service's ports as the proxy programs them, or none for headless and ExternalName
/// Services (nothing to proxy: DNS answers for them).
pub fn service_ports(
    cfg: &Config,
    svc: &Service,
    slices: &[&EndpointSlice],
) -> Result<Vec<SvcPort>, ModelError> {
    let (ns, name) = namespaced(&svc.metadata);
    let object = describe("Service", Some(&ns), &name);
    let Some(spec) = &svc.spec else {
        return Ok(Vec::new());
    };
    let ty = spec.type_.as_deref().unwrap_or("ClusterIP");
    if ty == "ExternalName" || spec.cluster_ip.as_deref() == Some("None") {
        return Ok(Vec::new());
    }
    let mut cluster_ips = Vec::new();
    for (i, s) in spec
        .cluster_ips
        .clone()
        .unwrap_or_else(|| spec.cluster_ip.iter().cloned().collect())
        .iter()
        .enumerate()
    {
        let Ok(a) = s.parse::<Ipv4Addr>() else {
            continue; // the IPv6 family of a dual-stack Service: not proxied by this table
        };
        if !cfg.service_cidr.contains(&a) {
            return Err(ModelError::new(
                &object,
                if i == 0 {
                    "spec.clusterIP".to_string()
                } else {
                    format!("spec.clusterIPs[{i}]")
                },
                format!("{a} is outside the service CIDR {}", cfg.service_cidr),
            ));
        }
        cluster_ips.push(a);
    }
    if cluster_ips.is_empty() {
        return Ok(Vec::new()); // no cluster IP allocated yet
    }
    let external_ips = spec
        .external_ips
        .iter()
        .flatten()
        .enumerate()
        .map(|(i, s)| ip(&object, &format!("spec.externalIPs[{i}]"), s))
        .collect::<Result<Vec<_>, _>>()?;
    let lb_ips: Vec<Ipv4Addr> = if ty == "LoadBalancer" {
        svc.status
            .as_ref()
            .and_then(|s| s.load_balancer.as_ref())
            .and_then(|l| l.ingress.as_ref())
            .into_iter()
            .flatten()
            .filter_map(|i| i.ip.as_deref()?.parse().ok())
            .collect()
    } else {
        Vec::new()
    };
    let lb_source_ranges = spec
        .load_balancer_source_ranges
        .iter()
        .flatten()
        .enumerate()
        .map(|(i, r)| {
            r.trim().parse::<Ipv4Net>().map_err(|_| {
                ModelError::new(
                    &object,
                    format!("spec.loadBalancerSourceRanges[{i}]"),
                    format!("{r:?} is not an IPv4 CIDR"),
                )
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let affinity = (spec.session_affinity.as_deref() == Some("ClientIP")).then(|| {
        spec.session_affinity_config
            .as_ref()
            .and_then(|c| c.client_ip.as_ref())
            .and_then(|c| c.timeout_seconds)
            .map(|t| t.clamp(1, 86400) as u32)
            .unwrap_or(10800)
    });
    let external_local = spec.external_traffic_policy.as_deref() == Some("Local")
        && matches!(ty, "NodePort" | "LoadBalancer");
    let mut out = Vec::new();
    for (i, p) in spec.ports.iter().flatten().enumerate() {
        let field = |f: &str| format!("spec.ports[{i}].{f}");
        let proto = Proto::parse(p.protocol.as_deref()).ok_or_else(|| {
            ModelError::new(&object, field("protocol"), "must be TCP, UDP or SCTP")
        })?;
        let port = u16::try_from(p.port)
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| {
                ModelError::new(&object, field("port"), format!("{} is not 1-65535", p.port))
            })?;
        let node_port = match (ty, p.node_port) {
            ("NodePort" | "LoadBalancer", Some(n)) => {
                let ok = u16::try_from(n)
                    .ok()
                    .filter(|n| (cfg.node_ports.0..=cfg.node_ports.1).contains(n));
                Some(ok.ok_or_else(|| {
                    ModelError::new(
                        &object,
                        field("nodePort"),
                        format!(
                            "{n} is outside the NodePort range {}-{}",
                            cfg.node_ports.0, cfg.node_ports.1
                        ),
                    )
                })?)
            }
            _ => None,
        };
        let port_name = p.name.clone().unwrap_or_default();
        let mut endpoints = Vec::new();
        for slice in slices {
            if slice.address_type != "IPv4" {
                continue;
            }
            let Some(sp) = slice.ports.iter().flatten().find(|sp| {
                sp.name.clone().unwrap_or_default() == port_name
                    && Proto::parse(sp.protocol.as_deref()) == Some(proto)
            }) else {
                continue;
            };
            let Some(target) = sp.port.and_then(|n| u16::try_from(n).ok()) else {
                continue;
            };
            for e in slice.endpoints.iter().flatten() {
                let c = e.conditions.clone().unwrap_or_default();
                // The API's defaults: a missing ready or serving counts as true.
                let ready = c.ready.unwrap_or(true);
                for a in &e.addresses {
                    if let Ok(addr) = a.parse() {
                        endpoints.push(Endpoint {
                            ip: addr,
                            port: target,
                            node: e.node_name.clone(),
                            ready,
                            serving: c.serving.unwrap_or(ready),
                            terminating: c.terminating.unwrap_or(false),
                        });
                    }
                }
            }
        }
        endpoints.sort();
        endpoints.dedup();
        out.push(SvcPort {
            id: format!(
                "{ns}/{name}:{}",
                if port_name.is_empty() {
                    port.to_string()
                } else {
                    port_name
                }
            ),
            proto,
            port,
            cluster_ips: cluster_ips.clone(),
            node_port,
            external_ips: external_ips.clone(),
            lb_ips: lb_ips.clone(),
            lb_source_ranges: lb_source_ranges.clone(),
            affinity,
            external_local,
            internal_local: spec.internal_traffic_policy.as_deref() == Some("Local"),
            health_check_node_port: spec
                .health_check_node_port
                .filter(|_| external_local)
                .and_then(|n| u16::try_from(n).ok()),
            endpoints,
        });
    }
    Ok(out)
}

/// The endpoints traffic may go to, as kube-proxy picks them: ready ones; if none is ready,
/// those still serving while terminating; `local_only` keeps this node's.
pub fn usable<'a>(eps: &'a [Endpoint], node: &str, local_only: bool) -> Vec<&'a Endpoint> {
    let pool: Vec<&Endpoint> = eps
        .iter()
        .filter(|e| !local_only || e.node.as_deref() == Some(node))
        .collect();
    let ready: Vec<&Endpoint> = pool.iter().copied().filter(|e| e.ready).collect();
    if !ready.is_empty() {
        return ready;
    }
    pool.into_iter()
        .filter(|e| e.serving && e.terminating)
        .collect()
}
