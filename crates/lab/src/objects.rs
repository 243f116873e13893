//! `lab apply` and `lab delete`: the stored manifests changed by kind, namespace and name (as the
//! API server keys objects), checked before anything is written, then reconciled.

use crate::{edge, io, plan, policies, read_files, write_atomic, Lab};
use cluster::manifests::namespaced;
use cluster::store::Kind;
use cluster::Manifests;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde_json::Value;
use std::path::PathBuf;

impl Lab {
    /// Adds the objects in `files` to the lab (same name: replaced) and reconciles.
    pub fn apply(&self, files: &[PathBuf]) -> Result<(), String> {
        let m = read_files(files)?;
        let s = self.load()?;
        // The file `lab up` took may be applied again; a different Lab document may not.
        if m.lab.as_ref().is_some_and(|l| *l != s.spec) {
            return Err(
                "the Lab document differs from the running lab's; change a lab with `lab up` (it rebuilds) or `lab node add|remove`".into(),
            );
        }
        let mut all = self.manifests()?;
        let incoming = plan::desired_pods(&m, &s.spec.nodes).map_err(|e| e.to_string())?;
        plan::check_node_names(&incoming, &s.spec.nodes).map_err(|e| e.to_string())?;
        let incoming_keys: Vec<(String, String)> = m
            .pods
            .iter()
            .map(|p| ("Pod", namespaced(&p.metadata)))
            .chain(
                m.deployments
                    .iter()
                    .map(|d| ("Deployment", namespaced(&d.metadata))),
            )
            .chain(
                m.stateful_sets
                    .iter()
                    .map(|d| ("StatefulSet", namespaced(&d.metadata))),
            )
            .chain(
                m.daemon_sets
                    .iter()
                    .map(|d| ("DaemonSet", namespaced(&d.metadata))),
            )
            .chain(
                m.services
                    .iter()
                    .map(|d| ("Service", namespaced(&d.metadata))),
            )
            .chain(
                m.namespaces
                    .iter()
                    .map(|d| ("Namespace", namespaced(&d.metadata))),
            )
            .chain(
                m.network_policies
                    .iter()
                    .map(|d| ("NetworkPolicy", namespaced(&d.metadata))),
            )
            .map(|(k, (ns, n))| (k.to_string(), format!("{ns}/{n}")))
            .collect();
        let replaced = |kind: &str, meta: &ObjectMeta| {
            let (ns, n) = namespaced(meta);
            incoming_keys.contains(&(kind.to_string(), format!("{ns}/{n}")))
        };
        all.pods.retain(|p| !replaced("Pod", &p.metadata));
        all.deployments
            .retain(|d| !replaced("Deployment", &d.metadata));
        all.stateful_sets
            .retain(|d| !replaced("StatefulSet", &d.metadata));
        all.daemon_sets
            .retain(|d| !replaced("DaemonSet", &d.metadata));
        all.services.retain(|d| !replaced("Service", &d.metadata));
        all.services.extend(m.services);
        // Refused before anything changes: errors name the Service and field.
        Lab::checked_services(&mut s.clone(), &all.services)?;
        all.pods.extend(m.pods);
        all.deployments.extend(m.deployments);
        all.stateful_sets.extend(m.stateful_sets);
        all.daemon_sets.extend(m.daemon_sets);
        all.namespaces
            .retain(|d| !replaced("Namespace", &d.metadata));
        all.namespaces.extend(m.namespaces);
        all.network_policies
            .retain(|d| !replaced("NetworkPolicy", &d.metadata));
        all.network_policies.extend(m.network_policies);
        // Refused before anything changes: errors name the policy and field.
        policies::check(&all)?;
        // The edge's objects: replaced by kind, namespace and name.
        let incoming_edge: Vec<_> = m.edge.iter().map(|o| (o.kind(), edge::key(o))).collect();
        all.edge
            .retain(|o| !incoming_edge.contains(&(o.kind(), edge::key(o))));
        all.edge.extend(m.edge);
        all.other.extend(m.other);
        self.write_manifests(&all)?;
        self.reconcile()
    }

    /// Rewrites the stored manifests as one file.
    fn write_manifests(&self, m: &Manifests) -> Result<(), String> {
        let dir = self.dir.join("manifests");
        // The Lab document is not stored again: the lab's spec lives in state.json.
        fn values<T: serde::Serialize>(objects: &[T]) -> impl Iterator<Item = Value> + '_ {
            objects
                .iter()
                .map(|o| serde_json::to_value(o).expect("json"))
        }
        let mut docs: Vec<Value> = Vec::new();
        docs.extend(values(&m.pods));
        docs.extend(values(&m.deployments));
        docs.extend(values(&m.stateful_sets));
        docs.extend(values(&m.daemon_sets));
        docs.extend(values(&m.services));
        docs.extend(values(&m.namespaces));
        docs.extend(values(&m.network_policies).map(|mut v| {
            v["apiVersion"] = "networking.k8s.io/v1".into();
            v["kind"] = "NetworkPolicy".into();
            v
        }));
        docs.extend(m.edge.iter().map(|o| o.to_value().expect("json")));
        docs.extend(m.other.iter().cloned());
        let text: Vec<String> = docs
            .iter()
            .map(|d| serde_json::to_string(d).expect("json"))
            .collect();
        for e in std::fs::read_dir(&dir)
            .map_err(|e| io(dir.display(), e))?
            .flatten()
        {
            let _ = std::fs::remove_file(e.path());
        }
        write_atomic(&dir.join("00-applied.yaml"), &text.join("\n---\n"))
    }

    /// Removes a Pod, Deployment, StatefulSet, DaemonSet, Service, NetworkPolicy or one of the
    /// edge's kinds (Ingress, IngressClass, Secret, GatewayClass, Gateway, HTTPRoute,
    /// ReferenceGrant) by name and reconciles.
    pub fn delete(&self, kind: &str, name: &str, namespace: &str) -> Result<(), String> {
        let mut all = self.manifests()?;
        let matches =
            |meta: &ObjectMeta| namespaced(meta) == (namespace.to_string(), name.to_string());
        let count = |m: &Manifests| {
            m.pods.len()
                + m.deployments.len()
                + m.stateful_sets.len()
                + m.daemon_sets.len()
                + m.services.len()
                + m.network_policies.len()
                + m.edge.len()
        };
        let before = count(&all);
        match kind.to_ascii_lowercase().as_str() {
            "pod" | "pods" | "po" => all.pods.retain(|p| !matches(&p.metadata)),
            "deployment" | "deployments" | "deploy" => {
                all.deployments.retain(|d| !matches(&d.metadata))
            }
            "statefulset" | "statefulsets" | "sts" => {
                all.stateful_sets.retain(|d| !matches(&d.metadata))
            }
            "daemonset" | "daemonsets" | "ds" => all.daemon_sets.retain(|d| !matches(&d.metadata)),
            "service" | "services" | "svc" => all.services.retain(|s| !matches(&s.metadata)),
            "networkpolicy" | "networkpolicies" | "netpol" => {
                all.network_policies.retain(|p| !matches(&p.metadata))
            }
            other => match edge_kind(other) {
                Some(kind) => {
                    let ns = if kind.namespaced() { namespace } else { "" };
                    let key = (ns.to_string(), name.to_string());
                    all.edge.retain(|o| o.kind() != kind || edge::key(o) != key)
                }
                None => {
                    return Err(format!(
                        "kind {other:?}: the lab deletes pod, deployment, statefulset, daemonset, service, networkpolicy, ingress, ingressclass, secret, gatewayclass, gateway, httproute or referencegrant"
                    ))
                }
            },
        }
        if count(&all) == before {
            return Err(format!("{kind} {namespace}/{name} not found"));
        }
        self.write_manifests(&all)?;
        self.reconcile()
    }
}

/// The edge's kind `kubectl delete` would take by this name (kind, plural or short name).
fn edge_kind(name: &str) -> Option<Kind> {
    Kind::EDGE.into_iter().find(|k| {
        let short = match k {
            Kind::Ingress => "ing",
            Kind::Gateway => "gtw",
            _ => "",
        };
        name == k.name().to_ascii_lowercase() || name == k.api_resource().1 || name == short
    })
}
