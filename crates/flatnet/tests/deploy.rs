//! The manifests of `deploy/`: every document parses as its API type with no field the type
//! lacks (a typo would be dropped silently by the API server's decoder too), and the RBAC rules
//! of each component are exactly what the code watches (`agent::KINDS`, `dns::KINDS`,
//! `ingress::daemon::KINDS`): get,
//! list and watch on each kind, nothing else. A new watch without its rule fails here.

use cluster::Kind;
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::IngressClass;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

fn deploy_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../deploy")
}

/// Every YAML document of `deploy/*.yaml`, in the order `kubectl apply -f deploy/` takes them.
fn documents() -> Vec<(String, Value)> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(deploy_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    let mut out = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        for doc in serde_saphyr::from_multiple::<Value>(&text).unwrap() {
            if !doc.is_null() {
                out.push((f.file_name().unwrap().to_string_lossy().into_owned(), doc));
            }
        }
    }
    out
}

/// Drops nulls and empty maps so a round trip through the typed object compares equal.
fn normalized(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k.clone(), normalized(v)))
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(normalized).collect()),
        _ => v.clone(),
    }
}

fn typed<T: serde::de::DeserializeOwned + serde::Serialize>(file: &str, doc: &Value) -> T {
    let t: T = serde_json::from_value(doc.clone())
        .unwrap_or_else(|e| panic!("{file}: {} does not parse: {e}", doc["kind"]));
    let back = serde_json::to_value(&t).unwrap();
    assert_eq!(
        normalized(&back),
        normalized(doc),
        "{file}: a field of this {} is not part of its API type",
        doc["kind"]
    );
    t
}

#[test]
fn every_manifest_parses_as_its_api_type() {
    let docs = documents();
    assert!(!docs.is_empty());
    for (file, doc) in &docs {
        match doc["kind"].as_str().unwrap() {
            "Namespace" => drop(typed::<Namespace>(file, doc)),
            "ServiceAccount" => drop(typed::<ServiceAccount>(file, doc)),
            "ClusterRole" => drop(typed::<ClusterRole>(file, doc)),
            "ClusterRoleBinding" => drop(typed::<ClusterRoleBinding>(file, doc)),
            "ConfigMap" => {
                let cm = typed::<ConfigMap>(file, doc);
                let conf = &cm.data.unwrap()["net-conf.json"];
                let p = std::env::temp_dir().join(format!("net-conf-{}.json", std::process::id()));
                std::fs::write(&p, conf).unwrap();
                let read = agent::read_net_conf(&p);
                std::fs::remove_file(&p).unwrap();
                read.unwrap();
            }
            "DaemonSet" => {
                let ds = typed::<DaemonSet>(file, doc);
                let pod = ds.spec.template.spec.unwrap();
                assert_eq!(pod.host_network, Some(true));
                let tolerations = pod.tolerations.unwrap();
                assert!(tolerations
                    .iter()
                    .any(|t| t.operator.as_deref() == Some("Exists") && t.key.is_none()));
                let init = &pod.init_containers.unwrap()[0];
                assert!(init
                    .command
                    .as_ref()
                    .unwrap()
                    .iter()
                    .any(|a| a == "install-cni"));
                let agent = &pod.containers[0];
                let caps = agent
                    .security_context
                    .as_ref()
                    .unwrap()
                    .capabilities
                    .as_ref()
                    .unwrap();
                let added: BTreeSet<&str> = caps.add.iter().flatten().map(String::as_str).collect();
                assert_eq!(added, BTreeSet::from(["NET_ADMIN", "NET_RAW"]));
                let mounts: BTreeSet<&str> = agent
                    .volume_mounts
                    .iter()
                    .flatten()
                    .map(|m| m.mount_path.as_str())
                    .collect();
                for m in ["/host/etc/cni/net.d", "/host/opt/cni/bin", "/run/netns"] {
                    assert!(mounts.contains(m), "the agent mounts {m}");
                }
            }
            "Deployment" => {
                let d = typed::<Deployment>(file, doc);
                let pod = d.spec.template.spec.unwrap();
                assert!(pod.affinity.unwrap().pod_anti_affinity.is_some());
                let probe = pod.containers[0].readiness_probe.as_ref().unwrap();
                let ready = match d.metadata.name.as_deref() {
                    Some("flatnet-dns") => "/ready",
                    Some("flatnet-ingress") => "/readyz",
                    other => panic!("{file}: a Deployment {other:?} the test does not know"),
                };
                assert_eq!(
                    probe.http_get.as_ref().unwrap().path.as_deref(),
                    Some(ready)
                );
            }
            "Service" => {
                let s = typed::<Service>(file, doc);
                let spec = s.spec.unwrap();
                match s.metadata.name.as_deref() {
                    Some("kube-dns") => {
                        assert_eq!(spec.cluster_ip.as_deref(), Some("10.96.0.10"))
                    }
                    Some("flatnet-ingress") => {
                        assert_eq!(spec.type_.as_deref(), Some("LoadBalancer"));
                        assert_eq!(spec.external_traffic_policy.as_deref(), Some("Local"));
                    }
                    other => panic!("{file}: a Service {other:?} the test does not know"),
                }
            }
            "IngressClass" => {
                let c = typed::<IngressClass>(file, doc);
                assert_eq!(
                    c.spec.unwrap().controller.as_deref(),
                    Some(ingress::ingress::CONTROLLER)
                );
            }
            "PodDisruptionBudget" => drop(typed::<PodDisruptionBudget>(file, doc)),
            other => panic!("{file}: a {other} the test does not know"),
        }
    }
}

/// (API group, resource) → verbs granted to the service account `namespace/name`.
fn granted(namespace: &str, name: &str) -> BTreeMap<(String, String), BTreeSet<String>> {
    let docs = documents();
    let roles: BTreeMap<String, ClusterRole> = docs
        .iter()
        .filter(|(_, d)| d["kind"] == "ClusterRole")
        .map(|(_, d)| {
            let r: ClusterRole = serde_json::from_value(d.clone()).unwrap();
            (r.metadata.name.clone().unwrap(), r)
        })
        .collect();
    let mut out: BTreeMap<(String, String), BTreeSet<String>> = BTreeMap::new();
    for (_, d) in docs
        .iter()
        .filter(|(_, d)| d["kind"] == "ClusterRoleBinding")
    {
        let b: ClusterRoleBinding = serde_json::from_value(d.clone()).unwrap();
        let bound = b.subjects.iter().flatten().any(|s| {
            s.kind == "ServiceAccount"
                && s.name == name
                && s.namespace.as_deref() == Some(namespace)
        });
        if !bound {
            continue;
        }
        let role = &roles[&b.role_ref.name];
        for rule in role.rules.iter().flatten() {
            for g in rule.api_groups.iter().flatten() {
                for r in rule.resources.iter().flatten() {
                    out.entry((g.clone(), r.clone()))
                        .or_default()
                        .extend(rule.verbs.iter().cloned());
                }
            }
        }
    }
    out
}

fn wanted(kinds: &[Kind]) -> BTreeMap<(String, String), BTreeSet<String>> {
    kinds
        .iter()
        .map(|k| {
            let (g, r) = k.api_resource();
            (
                (g.to_string(), r.to_string()),
                ["get", "list", "watch"].map(String::from).into(),
            )
        })
        .collect()
}

/// The service account the workload `kind`/`name` runs as.
fn service_account(kind: &str, name: &str) -> (String, String) {
    let (_, d) = documents()
        .into_iter()
        .find(|(_, d)| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap();
    (
        d["metadata"]["namespace"].as_str().unwrap().to_string(),
        d["spec"]["template"]["spec"]["serviceAccountName"]
            .as_str()
            .unwrap()
            .to_string(),
    )
}

#[test]
fn rbac_is_exactly_what_the_code_watches() {
    let (ns, sa) = service_account("DaemonSet", "flatnet-agent");
    assert_eq!(
        granted(&ns, &sa),
        wanted(&agent::KINDS),
        "the agent's ClusterRole"
    );
    let (ns, sa) = service_account("Deployment", "flatnet-dns");
    assert_eq!(
        granted(&ns, &sa),
        wanted(&dns::KINDS),
        "the DNS server's ClusterRole"
    );
    let (ns, sa) = service_account("Deployment", "flatnet-ingress");
    assert_eq!(
        granted(&ns, &sa),
        wanted(&ingress::daemon::KINDS),
        "the edge's ClusterRole"
    );
    // The watches are built from the same lists.
    let watched: BTreeSet<Kind> = agent::watches().iter().map(|w| w.kind).collect();
    assert_eq!(watched, agent::KINDS.into_iter().collect());
    let watched: BTreeSet<Kind> = dns::watches().iter().map(|w| w.kind).collect();
    assert_eq!(watched, dns::KINDS.into_iter().collect());
    let watched: BTreeSet<Kind> = (ingress::daemon::watches().iter())
        .map(|w| w.kind)
        .collect();
    assert_eq!(watched, ingress::daemon::KINDS.into_iter().collect());
}

#[test]
fn the_gateway_class_names_the_edge() {
    let text = std::fs::read_to_string(deploy_dir().join("gateway-api/gatewayclass.yaml")).unwrap();
    let doc: Value = serde_saphyr::from_str(&text).unwrap();
    assert_eq!(doc["apiVersion"], "gateway.networking.k8s.io/v1");
    let class: cluster::gateway::GatewayClass = serde_json::from_value(doc).unwrap();
    assert_eq!(class.spec.controller_name, ingress::ingress::CONTROLLER);
}
