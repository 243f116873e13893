//! Multi-document YAML manifests into typed objects. Kinds a part does not use yet are kept as
//! raw values, so a file written for a real cluster loads whole.

use crate::lab::LabSpec;
use crate::store::{Object, Resource};
use crate::{is_dns_subdomain, ModelError};
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use serde_json::Value;

#[derive(Debug, Clone, Default)]
pub struct Manifests {
    pub lab: Option<LabSpec>,
    pub pods: Vec<Pod>,
    pub deployments: Vec<Deployment>,
    pub stateful_sets: Vec<StatefulSet>,
    pub daemon_sets: Vec<DaemonSet>,
    pub nodes: Vec<Node>,
    pub namespaces: Vec<Namespace>,
    pub services: Vec<Service>,
    pub endpoint_slices: Vec<EndpointSlice>,
    pub network_policies: Vec<NetworkPolicy>,
    /// The edge's kinds (Ingress, IngressClass, Secret and the Gateway API's), typed.
    pub edge: Vec<Object>,
    /// Other kinds (ConfigMap, …), for the parts that will read them.
    pub other: Vec<Value>,
}

/// A namespaced object's namespace (default `default`) and name.
pub fn namespaced(
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
) -> (String, String) {
    (
        meta.namespace.clone().unwrap_or_else(|| "default".into()),
        meta.name.clone().unwrap_or_default(),
    )
}

/// "Kind namespace/name" for messages.
pub fn describe(kind: &str, namespace: Option<&str>, name: &str) -> String {
    match namespace {
        Some(ns) => format!("{kind} {ns}/{name}"),
        None => format!("{kind} {name}"),
    }
}

impl Manifests {
    /// Parses every document of `text`; `origin` (a file name) prefixes errors.
    pub fn parse(text: &str, origin: &str) -> Result<Manifests, ModelError> {
        // The default budget (1,024 documents, 250k nodes) fits a hand-written file, not a
        // cluster's worth of objects (the lab's, or 10k Services with their slices); aliases
        // stay bounded by the defaults.
        let options = serde_saphyr::options! {
            budget: serde_saphyr::budget! {
                max_documents: 10_000_000,
                max_nodes: 200_000_000,
                max_events: 800_000_000,
                max_total_scalar_bytes: 4 << 30,
            },
        };
        // One document at a time: each becomes a typed object before the next is read, so a
        // large file never sits in memory as generic values all at once.
        let mut reader = text.as_bytes();
        let mut m = Manifests::default();
        for (i, doc) in
            serde_saphyr::read_with_options::<_, Value>(&mut reader, options).enumerate()
        {
            let doc =
                doc.map_err(|e| ModelError::new(origin, "", format!("not valid YAML: {e}")))?;
            m.add(doc).map_err(|e| {
                ModelError::new(
                    format!("{origin} (document {}): {}", i + 1, e.object),
                    e.field,
                    e.message,
                )
            })?;
        }
        Ok(m)
    }

    /// Adds one object.
    pub fn add(&mut self, doc: Value) -> Result<(), ModelError> {
        if doc.is_null() {
            return Ok(());
        }
        let kind = doc.get("kind").and_then(Value::as_str).unwrap_or("");
        let name = doc
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or("");
        let ns = doc.pointer("/metadata/namespace").and_then(Value::as_str);
        if kind.is_empty() {
            return Err(ModelError::new("object", "kind", "missing"));
        }
        if doc.get("apiVersion").and_then(Value::as_str).is_none() {
            return Err(ModelError::new(
                describe(kind, ns, name),
                "apiVersion",
                "missing",
            ));
        }
        let object = describe(
            kind,
            if matches!(kind, "Node" | "Namespace" | "Lab") {
                None
            } else {
                Some(ns.unwrap_or("default"))
            },
            name,
        );
        let typed = |e: serde_json::Error| ModelError::new(&object, "", e.to_string());
        if kind == "List" || (kind.ends_with("List") && doc.get("items").is_some()) {
            let kind = kind.to_string();
            return self.add_list(&kind, doc);
        }
        match kind {
            "Lab" => {
                if self.lab.is_some() {
                    return Err(ModelError::new(
                        object,
                        "",
                        "a second Lab document; one file describes one lab",
                    ));
                }
                self.lab = Some(LabSpec::from_value(&doc)?);
                return Ok(());
            }
            _ if !is_dns_subdomain(name) => {
                return Err(ModelError::new(
                    object,
                    "metadata.name",
                    format!(
                        "{name:?} is not a valid name (lower-case letters, digits, '-' and '.')"
                    ),
                ))
            }
            "Pod" => self.pods.push(serde_json::from_value(doc).map_err(typed)?),
            "Deployment" => self
                .deployments
                .push(serde_json::from_value(doc).map_err(typed)?),
            "StatefulSet" => self
                .stateful_sets
                .push(serde_json::from_value(doc).map_err(typed)?),
            "DaemonSet" => self
                .daemon_sets
                .push(serde_json::from_value(doc).map_err(typed)?),
            "Node" => self.nodes.push(serde_json::from_value(doc).map_err(typed)?),
            "Namespace" => self
                .namespaces
                .push(serde_json::from_value(doc).map_err(typed)?),
            "Service" => self
                .services
                .push(serde_json::from_value(doc).map_err(typed)?),
            "EndpointSlice" => self
                .endpoint_slices
                .push(serde_json::from_value(doc).map_err(typed)?),
            "NetworkPolicy" => self
                .network_policies
                .push(serde_json::from_value(doc).map_err(typed)?),
            _ => match crate::store::Kind::EDGE
                .into_iter()
                .find(|k| k.name() == kind)
            {
                Some(kind) => self.edge.push(Object::from_value(kind, doc)?),
                None => self.other.push(doc),
            },
        }
        Ok(())
    }

    /// The items of a `List` (what `kubectl get -o yaml` writes) or of a typed list such as
    /// `ServiceList` (whose items may leave out the kind and apiVersion it implies).
    fn add_list(&mut self, kind: &str, mut doc: Value) -> Result<(), ModelError> {
        let api_version = doc.get("apiVersion").cloned().unwrap_or(Value::Null);
        let Some(Value::Array(items)) = doc.get_mut("items").map(Value::take) else {
            return Err(ModelError::new(kind, "items", "must be a list of objects"));
        };
        let implied = kind.strip_suffix("List").filter(|k| !k.is_empty());
        for (i, mut item) in items.into_iter().enumerate() {
            if let (Some(k), Some(fields)) = (implied, item.as_object_mut()) {
                fields.entry("kind").or_insert_with(|| Value::from(k));
                fields
                    .entry("apiVersion")
                    .or_insert_with(|| api_version.clone());
            }
            self.add(item).map_err(|e| {
                ModelError::new(
                    format!("{kind} items[{i}]: {}", e.object),
                    e.field,
                    e.message,
                )
            })?;
        }
        Ok(())
    }

    /// Adds everything from `other` (later files win nothing: duplicates are kept for the caller
    /// to judge).
    pub fn extend(&mut self, other: Manifests) -> Result<(), ModelError> {
        // Destructured, so a field added to `Manifests` cannot be forgotten here.
        let Manifests {
            lab,
            pods,
            deployments,
            stateful_sets,
            daemon_sets,
            nodes,
            namespaces,
            services,
            endpoint_slices,
            network_policies,
            edge,
            other,
        } = other;
        if let Some(l) = lab {
            if self.lab.is_some() {
                return Err(ModelError::new(
                    format!("Lab {}", l.name),
                    "",
                    "a second Lab document; one lab per run",
                ));
            }
            self.lab = Some(l);
        }
        self.pods.extend(pods);
        self.deployments.extend(deployments);
        self.stateful_sets.extend(stateful_sets);
        self.daemon_sets.extend(daemon_sets);
        self.nodes.extend(nodes);
        self.namespaces.extend(namespaces);
        self.services.extend(services);
        self.endpoint_slices.extend(endpoint_slices);
        self.network_policies.extend(network_policies);
        self.edge.extend(edge);
        self.other.extend(other);
        Ok(())
    }
}

impl Manifests {
    /// The objects of the kinds the cluster-state [`Store`](crate::store::Store) holds.
    pub fn into_objects(self) -> impl Iterator<Item = Object> {
        let Manifests {
            nodes,
            namespaces,
            pods,
            services,
            endpoint_slices,
            network_policies,
            edge,
            ..
        } = self;
        (nodes.into_iter().map(Resource::into_object))
            .chain(namespaces.into_iter().map(Resource::into_object))
            .chain(pods.into_iter().map(Resource::into_object))
            .chain(services.into_iter().map(Resource::into_object))
            .chain(
                endpoint_slices
                    .into_iter()
                    .map(|s| crate::slim::EndpointSlice::from(s).into_object()),
            )
            .chain(network_policies.into_iter().map(Resource::into_object))
            .chain(edge)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_are_read_item_by_item() {
        let m = Manifests::parse(
            "apiVersion: v1\nkind: List\nitems:\n- {apiVersion: v1, kind: Pod, metadata: {name: a}}\n- {apiVersion: v1, kind: Service, metadata: {name: s}, spec: {ports: [{port: 80}]}}\n---\napiVersion: v1\nkind: PodList\nitems:\n- {metadata: {name: b, namespace: shop}}\n",
            "list.yaml",
        )
        .unwrap();
        let pods: Vec<_> = m.pods.iter().map(|p| namespaced(&p.metadata)).collect();
        assert_eq!(
            pods,
            [("default".into(), "a".into()), ("shop".into(), "b".into())]
        );
        assert_eq!(m.services.len(), 1);
        let e = Manifests::parse(
            "apiVersion: v1\nkind: List\nitems:\n- {apiVersion: v1, kind: Pod, metadata: {name: Bad}}\n",
            "list.yaml",
        )
        .unwrap_err();
        assert!(e.object.contains("List items[0]: Pod default/Bad"), "{e}");
        assert_eq!(e.field, "metadata.name");
        let e = Manifests::parse("apiVersion: v1\nkind: List\nitems: 3\n", "l.yaml").unwrap_err();
        assert_eq!(e.field, "items");
    }

    #[test]
    fn reads_several_kinds_from_one_file() {
        let m = Manifests::parse(
            r#"
apiVersion: flatnet.dev/v1alpha1
kind: Lab
metadata: {name: t}
spec: {nodes: 2}
---
apiVersion: v1
kind: Pod
metadata: {name: web}
spec:
  containers: [{name: c, image: busybox, command: [sleep, "1000"]}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: api, namespace: shop}
spec:
  replicas: 3
  selector: {matchLabels: {app: api}}
  template:
    metadata: {labels: {app: api}}
    spec: {containers: [{name: c, image: x}]}
---
apiVersion: v1
kind: Service
metadata: {name: api}
spec: {ports: [{port: 80}]}
"#,
            "t.yaml",
        )
        .unwrap();
        assert_eq!(m.lab.unwrap().nodes.len(), 2);
        assert_eq!(m.pods.len(), 1);
        assert_eq!(m.deployments[0].spec.replicas, Some(3));
        assert_eq!(m.services.len(), 1);
        assert!(m.other.is_empty());
    }

    #[test]
    fn errors_say_which_document() {
        let e = Manifests::parse(
            "apiVersion: v1\nkind: Pod\nmetadata: {name: Bad_Name}\n",
            "x.yaml",
        )
        .unwrap_err();
        assert!(e.object.contains("x.yaml (document 1)"), "{e}");
        assert_eq!(e.field, "metadata.name");
        let e = Manifests::parse("kind: Pod\nmetadata: {name: a}\n", "x.yaml").unwrap_err();
        assert_eq!(e.field, "apiVersion", "{e}");
    }
}
