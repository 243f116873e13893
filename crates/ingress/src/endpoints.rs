//! Where a backend's requests go: the ready endpoints of a Service port, straight from its
//! EndpointSlices (not through the ClusterIP, as ingress-nginx and Envoy do: the edge balances
//! per request and retries a failed connection on another endpoint).

use crate::table::ServicePort;
use cluster::manifests::namespaced;
use cluster::slim::EndpointSlice;
use k8s_openapi::api::core::v1::Service;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

/// Why a backend has nowhere to send to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unavailable {
    NoService,
    NoPort,
    NoReadyEndpoints,
}

impl std::fmt::Display for Unavailable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Unavailable::NoService => "no such Service",
            Unavailable::NoPort => "the Service has no such port",
            Unavailable::NoReadyEndpoints => "no ready endpoints",
        })
    }
}

#[derive(Debug, Default)]
struct ServiceEndpoints {
    /// The Service's ports: number, name ("" when unnamed).
    ports: Vec<(u16, String)>,
    /// Ready endpoint addresses by port name.
    ready: HashMap<String, Arc<[SocketAddr]>>,
}

/// Ready endpoints of every Service, by namespace, then name (looked up per request by `&str`,
/// without building a key).
#[derive(Debug, Default)]
pub struct Endpoints {
    services: HashMap<String, HashMap<String, ServiceEndpoints>>,
}

impl Endpoints {
    pub fn build<'a>(
        services: impl IntoIterator<Item = &'a Service>,
        slices: impl IntoIterator<Item = &'a EndpointSlice>,
    ) -> Endpoints {
        let mut out = Endpoints::default();
        for s in services {
            let (ns, name) = namespaced(&s.metadata);
            let ports = s
                .spec
                .iter()
                .flat_map(|sp| sp.ports.iter().flatten())
                .filter_map(|p| {
                    Some((
                        u16::try_from(p.port).ok()?,
                        p.name.clone().unwrap_or_default(),
                    ))
                })
                .collect();
            out.services
                .entry(ns)
                .or_default()
                .entry(name)
                .or_default()
                .ports = ports;
        }
        let mut ready: HashMap<(String, String, String), Vec<SocketAddr>> = HashMap::new();
        for slice in slices {
            let Some(svc) = slice
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get("kubernetes.io/service-name"))
            else {
                continue;
            };
            let (ns, _) = namespaced(&slice.metadata);
            for port in slice.ports.iter().flatten() {
                let Some(number) = port.port.and_then(|p| u16::try_from(p).ok()) else {
                    continue;
                };
                let list = ready
                    .entry((
                        ns.clone(),
                        svc.clone(),
                        port.name.clone().unwrap_or_default(),
                    ))
                    .or_default();
                for e in slice.endpoints.iter().flatten() {
                    // A missing `ready` means ready, as the API defines.
                    if e.conditions.as_ref().and_then(|c| c.ready) == Some(false) {
                        continue;
                    }
                    list.extend(
                        e.addresses
                            .iter()
                            .filter_map(|a| a.parse::<IpAddr>().ok())
                            .map(|ip| SocketAddr::new(ip, number)),
                    );
                }
            }
        }
        for ((ns, svc, port), mut addrs) in ready {
            addrs.sort();
            addrs.dedup();
            if let Some(s) = out.services.get_mut(&ns).and_then(|m| m.get_mut(&svc)) {
                s.ready.insert(port, addrs.into());
            }
        }
        out
    }

    /// The ready endpoints behind Service `namespace/name`'s port `port`.
    pub fn resolve(
        &self,
        namespace: &str,
        name: &str,
        port: &ServicePort,
    ) -> Result<Arc<[SocketAddr]>, Unavailable> {
        let s = self
            .services
            .get(namespace)
            .and_then(|m| m.get(name))
            .ok_or(Unavailable::NoService)?;
        let port_name = s
            .ports
            .iter()
            .find(|(n, pn)| match port {
                ServicePort::Number(x) => n == x,
                ServicePort::Name(x) => pn == x,
            })
            .map(|(_, pn)| pn)
            .ok_or(Unavailable::NoPort)?;
        s.ready
            .get(port_name)
            .filter(|a| !a.is_empty())
            .cloned()
            .ok_or(Unavailable::NoReadyEndpoints)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn ports_by_number_or_name_and_only_ready_endpoints() {
        let svc: Service = serde_json::from_value(json!({
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {"ports": [{"name": "http", "port": 80, "targetPort": 8080}, {"name": "admin", "port": 9000}]}
        }))
        .unwrap();
        let slice: EndpointSlice = serde_json::from_value(json!({
            "metadata": {"name": "web-1", "namespace": "shop", "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080}, {"name": "admin", "port": 9001}],
            "endpoints": [
                {"addresses": ["10.244.0.5"], "conditions": {"ready": true}},
                {"addresses": ["10.244.1.5"]},
                {"addresses": ["10.244.2.5"], "conditions": {"ready": false}}
            ]
        }))
        .unwrap();
        let e = Endpoints::build([&svc], [&slice]);
        let want: Vec<SocketAddr> = vec![
            "10.244.0.5:8080".parse().unwrap(),
            "10.244.1.5:8080".parse().unwrap(),
        ];
        assert_eq!(
            &*e.resolve("shop", "web", &ServicePort::Number(80)).unwrap(),
            &want[..]
        );
        assert_eq!(
            &*e.resolve("shop", "web", &ServicePort::Name("http".into()))
                .unwrap(),
            &want[..]
        );
        assert_eq!(
            e.resolve("shop", "web", &ServicePort::Number(9000))
                .unwrap()
                .len(),
            2
        );
        assert_eq!(
            e.resolve("shop", "web", &ServicePort::Number(81)),
            Err(Unavailable::NoPort)
        );
        assert_eq!(
            e.resolve("shop", "nope", &ServicePort::Number(80)),
            Err(Unavailable::NoService)
        );
        let empty = Endpoints::build([&svc], []);
        assert_eq!(
            empty.resolve("shop", "web", &ServicePort::Number(80)),
            Err(Unavailable::NoReadyEndpoints)
        );
    }
}
