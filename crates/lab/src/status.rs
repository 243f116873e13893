//! `lab status`: nodes, pods, policies and Services as `kubectl get -o wide` shows them, or the
//! state as JSON.

use crate::infra::Proc;
use crate::{edge, policies, services, Lab, INTERNET_HOST};
use cluster::manifests::namespaced;
use k8s_openapi::api::core::v1::Service;
use serde_json::{json, Value};

impl Lab {
    /// `kubectl get nodes,pods -o wide` in one table, or the state as JSON.
    pub fn status(&self, json_out: bool) -> Result<String, String> {
        let s = self.load()?;
        if json_out {
            let pods: Vec<Value> = s
                .pods
                .iter()
                .map(|p| json!({"namespace": p.namespace, "name": p.name, "node": p.node, "ip": p.ip, "status": p.status(),
                    "ready": p.is_ready(), "restarts": p.restarts, "hostNetwork": p.host_network}))
                .chain(s.pending.iter().map(|(k, why)| json!({"key": k, "status": "Pending", "reason": why})))
                .collect();
            let nodes: Vec<Value> = s
                .nodes
                .iter()
                .map(|n| json!({"name": n.name, "ip": n.ip, "podCIDR": n.pod_cidr, "subnet": n.underlay,
                    "agent": if s.agents.get(&n.name).is_some_and(Proc::alive) { "Running" } else { "Down" }}))
                .collect();
            let services: Vec<Value> = s.services.iter().map(service_row).collect();
            let policies: Vec<Value> = (self.manifests()?.network_policies.iter())
                .map(|p| {
                    let (ns, name) = namespaced(&p.metadata);
                    json!({"namespace": ns, "name": name})
                })
                .collect();
            return Ok(serde_json::to_string_pretty(&json!({"lab": s.spec.name, "backend": s.spec.backend.as_str(), "services": services,
                "networkPolicies": policies, "ingress": self.edge_status(),
                "clusterCIDR": s.spec.cluster_cidr, "serviceCIDR": s.spec.service_cidr, "nodes": nodes, "pods": pods,
                "internet": INTERNET_HOST}))
            .expect("json"));
        }
        let mut out = format!(
            "lab {} (backend {}, cluster {}, internet {INTERNET_HOST})\n\n",
            s.spec.name,
            s.spec.backend.as_str(),
            s.spec.cluster_cidr
        );
        out += &format!(
            "{:<16} {:<8} {:<16} {:<18} {}\n",
            "NODE", "AGENT", "INTERNAL-IP", "POD-CIDR", "SUBNET"
        );
        for n in &s.nodes {
            let agent = if s.agents.get(&n.name).is_some_and(Proc::alive) {
                "Running"
            } else {
                "Down"
            };
            out += &format!(
                "{:<16} {:<8} {:<16} {:<18} {}\n",
                n.name,
                agent,
                n.ip,
                n.pod_cidr.to_string(),
                n.underlay
            );
        }
        out += &format!(
            "\n{:<12} {:<36} {:<6} {:<10} {:<9} {:<16} {}\n",
            "NAMESPACE", "NAME", "READY", "STATUS", "RESTARTS", "IP", "NODE"
        );
        for p in &s.pods {
            out += &format!(
                "{:<12} {:<36} {:<6} {:<10} {:<9} {:<16} {}\n",
                p.namespace,
                p.name,
                p.ready_column(),
                p.status(),
                p.restarts,
                p.ip.map(|i| i.to_string()).unwrap_or_default(),
                p.node
            );
        }
        for (k, why) in &s.pending {
            let (ns, name) = k.split_once('/').unwrap_or(("", k));
            out += &format!(
                "{ns:<12} {name:<36} {:<6} {:<10} {:<9} {:<16} {why}\n",
                "0/0", "Pending", 0, "<none>"
            );
        }
        let m = self.manifests()?;
        out += &policies::table(&m);
        if !s.services.is_empty() {
            out += &format!(
                "\n{:<12} {:<20} {:<13} {:<15} {:<15} {:<24} {}\n",
                "NAMESPACE", "SERVICE", "TYPE", "CLUSTER-IP", "EXTERNAL-IP", "PORT(S)", "ENDPOINTS"
            );
            for svc in &s.services {
                let r = service_row(svc);
                let eps: Vec<String> = services::ready_endpoints(svc, &s.pods)
                    .into_iter()
                    .map(|(addr, _)| addr)
                    .collect();
                out += &format!(
                    "{:<12} {:<20} {:<13} {:<15} {:<15} {:<24} {}\n",
                    r["namespace"].as_str().unwrap_or(""),
                    r["name"].as_str().unwrap_or(""),
                    r["type"].as_str().unwrap_or(""),
                    r["clusterIP"].as_str().unwrap_or(""),
                    match r["externalIP"].as_str() {
                        Some("") | None => "<none>",
                        Some(ip) => ip,
                    },
                    r["ports"].as_str().unwrap_or(""),
                    if eps.is_empty() {
                        "<none>".to_string()
                    } else {
                        eps.join(",")
                    }
                );
            }
        }
        out += &edge::table(&m, &self.edge_status());
        Ok(out)
    }

    /// The ingress controller's statuses (Ingress addresses, Gateway API conditions, problems).
    pub(crate) fn edge_status(&self) -> Value {
        std::fs::read_to_string(self.dir.join(edge::STATUS_FILE))
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or(Value::Null)
    }
}

/// One Service as `kubectl get svc` shows it.
fn service_row(svc: &Service) -> Value {
    let (ns, name) = namespaced(&svc.metadata);
    let spec = svc.spec.clone().unwrap_or_default();
    let ports: Vec<String> = spec
        .ports
        .iter()
        .flatten()
        .map(|p| {
            let proto = p.protocol.clone().unwrap_or_else(|| "TCP".into());
            match p.node_port {
                Some(np) => format!("{}:{np}/{proto}", p.port),
                None => format!("{}/{proto}", p.port),
            }
        })
        .collect();
    let lb: Vec<String> = svc
        .status
        .iter()
        .filter_map(|st| st.load_balancer.as_ref()?.ingress.clone())
        .flatten()
        .filter_map(|i| i.ip)
        .collect();
    json!({"namespace": ns, "name": name, "type": spec.type_.unwrap_or_else(|| "ClusterIP".into()),
           "clusterIP": spec.cluster_ip.unwrap_or_default(), "externalIP": lb.join(","), "ports": ports.join(",")})
}
