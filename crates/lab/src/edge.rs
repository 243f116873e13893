//! The lab's ingress controller, installed as ingress controllers are on real clusters: a
//! `kube-system/flatnet-ingress` Deployment of `flatnet ingress` behind a LoadBalancer Service
//! of the same name (`externalTrafficPolicy: Local`, so the edge sees the client's address),
//! with the IngressClass and GatewayClass `flatnet` (the IngressClass is the lab's default).
//! Ingress, IngressClass, Secret and Gateway API objects are published into the cluster
//! directory the controller reads. The lab then plays external-dns: the hostnames of the
//! Ingresses and HTTPRoutes the controller took go, with the address it published, into the
//! hosts file the lab internet's DNS serves. Manifests that define any of these objects
//! themselves replace the lab's.

use crate::PodRecord;
use cluster::gateway::{Gateway, HttpRoute, ParentRef};
use cluster::manifests::namespaced;
use cluster::store::{Kind, Object};
use cluster::Manifests;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::api::networking::v1::Ingress;
use k8s_openapi::ByteString;
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

pub const NAMESPACE: &str = "kube-system";
/// The Deployment's and the Service's name.
pub const NAME: &str = "flatnet-ingress";
/// The IngressClass and GatewayClass the lab installs.
pub const CLASS: &str = "flatnet";
/// The label the Service selects.
pub const APP_LABEL: (&str, &str) = ("app.kubernetes.io/name", "flatnet-ingress");
/// The controller's statuses, under the lab directory.
pub const STATUS_FILE: &str = "status/ingress/ingress-status.json";

fn is_ours(o: &Object) -> bool {
    match o {
        Object::IngressClass(c) => {
            c.spec.as_ref().and_then(|s| s.controller.as_deref())
                == Some(ingress::ingress::CONTROLLER)
        }
        Object::GatewayClass(c) => c.spec.controller_name == ingress::ingress::CONTROLLER,
        _ => false,
    }
}

/// Adds the controller's Service, Deployment, IngressClass and GatewayClass, each unless the
/// manifests have their own.
pub fn add_builtin(m: &mut Manifests, exe: &Path, lab_dir: &Path) -> Result<(), String> {
    let (k, v) = APP_LABEL;
    let has_service = m
        .services
        .iter()
        .any(|s| namespaced(&s.metadata) == (NAMESPACE.into(), NAME.into()));
    let has_deployment = m
        .deployments
        .iter()
        .any(|d| namespaced(&d.metadata) == (NAMESPACE.into(), NAME.into()));
    let has = |kind: Kind| m.edge.iter().any(|o| o.kind() == kind && is_ours(o));
    let (has_ingress_class, has_gateway_class) = (has(Kind::IngressClass), has(Kind::GatewayClass));
    let mut add = Vec::new();
    if !has_service {
        add.push(json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": NAME, "namespace": NAMESPACE, "labels": {k: v}},
            "spec": {"type": "LoadBalancer", "externalTrafficPolicy": "Local", "selector": {k: v}, "ports": [
                {"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"},
                {"name": "https", "port": 443, "targetPort": "https", "protocol": "TCP"}]}}));
    }
    if !has_deployment {
        let argv = [
            exe.display().to_string(),
            "ingress".into(),
            "--dir".into(),
            lab_dir.join("cluster").display().to_string(),
            "--publish-service".into(),
            format!("{NAMESPACE}/{NAME}"),
            "--status-dir".into(),
            lab_dir.join("status/ingress").display().to_string(),
        ];
        add.push(json!({"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": NAME, "namespace": NAMESPACE, "labels": {k: v}},
            "spec": {"replicas": 1, "selector": {"matchLabels": {k: v}}, "template": {
                "metadata": {"labels": {k: v}},
                "spec": {"containers": [{"name": "controller", "command": argv, "ports": [
                    {"name": "http", "containerPort": 80, "protocol": "TCP"},
                    {"name": "https", "containerPort": 443, "protocol": "TCP"},
                    {"name": "metrics", "containerPort": 10254, "protocol": "TCP"}]}]}}}}));
    }
    if !has_ingress_class {
        add.push(json!({"apiVersion": "networking.k8s.io/v1", "kind": "IngressClass",
            "metadata": {"name": CLASS, "annotations": {"ingressclass.kubernetes.io/is-default-class": "true"}},
            "spec": {"controller": ingress::ingress::CONTROLLER}}));
    }
    if !has_gateway_class {
        add.push(
            json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "GatewayClass",
            "metadata": {"name": CLASS}, "spec": {"controllerName": ingress::ingress::CONTROLLER}}),
        );
    }
    for doc in add {
        m.add(doc).map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// Whether `p` is a controller pod (it reports the state it loaded).
pub fn is_controller_pod(p: &PodRecord) -> bool {
    p.namespace == NAMESPACE && p.labels.get(APP_LABEL.0).map(String::as_str) == Some(APP_LABEL.1)
}

/// The edge's objects as the API server stores them (namespace defaulted, a Secret's
/// `stringData` folded into `data`), by path under the lab's `cluster/` directory.
pub fn objects(m: &Manifests) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for o in &m.edge {
        let kind = o.kind();
        let mut v = match o {
            Object::Secret(s) if s.string_data.is_some() => {
                let mut s = Secret::clone(s);
                let data = s.data.get_or_insert_with(Default::default);
                for (key, text) in s.string_data.take().unwrap_or_default() {
                    data.insert(key, ByteString(text.into_bytes()));
                }
                Object::Secret(Box::new(s)).to_value()
            }
            _ => o.to_value(),
        }
        .expect("json");
        let (ns, name) = key(o);
        if kind.namespaced() {
            v["metadata"]["namespace"] = ns.clone().into();
        }
        let file = if ns.is_empty() {
            format!("{name}.json")
        } else {
            format!("{ns}.{name}.json")
        };
        out.insert(format!("{}/{file}", kind.api_resource().1), v.to_string());
    }
    out
}

/// The `cluster/` subdirectories [`objects`] writes.
pub fn object_dirs() -> Vec<String> {
    (Kind::EDGE.iter())
        .map(|k| format!("cluster/{}", k.api_resource().1))
        .collect()
}

/// An edge object's namespace (defaulted to `default`, as the API server does) and name.
pub fn key(o: &Object) -> (String, String) {
    let (ns, name) = o.key();
    if o.kind().namespaced() && ns.is_empty() {
        ("default".into(), name)
    } else {
        (ns, name)
    }
}

fn addresses(v: &Value, pointer: &str, field: &str) -> Vec<String> {
    (v.pointer(pointer)
        .and_then(Value::as_array)
        .into_iter()
        .flatten())
    .filter_map(|a| a.get(field)?.as_str().map(str::to_string))
    .collect()
}

fn exact(host: &str) -> bool {
    !host.is_empty() && !host.starts_with('*')
}

/// The hosts file the lab internet's DNS serves, as external-dns would fill a zone: each
/// hostname of an Ingress the controller took, and of an HTTPRoute a Gateway accepted (or,
/// for a route without hostnames, its Gateway's listener hostnames), with the address the
/// controller published for it. Wildcard hostnames have no record.
pub fn hosts(m: &Manifests, status: &Value) -> String {
    let status_key = |v: &Value| {
        let s = |f: &str| {
            v.get(f)
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string()
        };
        (s("namespace"), s("name"))
    };
    let find = |kind: Kind, k: &(String, String)| {
        (m.edge.iter()).find(|o| o.kind() == kind && key(o) == *k)
    };
    let mut records: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut add = |ips: &[String], host: &str| {
        if exact(host) {
            for ip in ips {
                records
                    .entry(ip.clone())
                    .or_default()
                    .insert(host.to_string());
            }
        }
    };
    for i in status
        .get("ingresses")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let ips = addresses(i, "/loadBalancer/ingress", "ip");
        let Some(Object::Ingress(ing)) = find(Kind::Ingress, &status_key(i)) else {
            continue;
        };
        let spec = Ingress::clone(ing).spec.unwrap_or_default();
        for r in spec.rules.unwrap_or_default() {
            add(&ips, r.host.as_deref().unwrap_or_default());
        }
        for t in spec.tls.unwrap_or_default() {
            for h in t.hosts.unwrap_or_default() {
                add(&ips, &h);
            }
        }
    }
    let gateways: BTreeMap<(String, String), Vec<String>> = (status.get("gateways"))
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|g| (status_key(g), addresses(g, "/addresses", "value")))
        .collect();
    for r in status
        .get("httpRoutes")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let (route_ns, name) = status_key(r);
        let Some(Object::HttpRoute(route)) = find(Kind::HttpRoute, &(route_ns.clone(), name))
        else {
            continue;
        };
        let route: &HttpRoute = route;
        for p in r
            .get("parents")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let accepted = (p
                .get("conditions")
                .and_then(Value::as_array)
                .into_iter()
                .flatten())
            .any(|c| c["type"] == "Accepted" && c["status"] == "True");
            let Ok(parent) = serde_json::from_value::<ParentRef>(p["parentRef"].clone()) else {
                continue;
            };
            let gw = (
                parent.namespace.clone().unwrap_or(route_ns.clone()),
                parent.name,
            );
            let Some(ips) = gateways.get(&gw).filter(|_| accepted) else {
                continue;
            };
            if route.spec.hostnames.is_empty() {
                if let Some(Object::Gateway(g)) = find(Kind::Gateway, &gw) {
                    let g: &Gateway = g;
                    for l in &g.spec.listeners {
                        add(ips, l.hostname.as_deref().unwrap_or_default());
                    }
                }
            }
            for h in &route.spec.hostnames {
                add(ips, h);
            }
        }
    }
    let mut out = String::from(
        "# written by the lab (external-dns's part): Ingress and HTTPRoute hostnames\n",
    );
    for (ip, names) in records {
        out += &format!("{ip} {}\n", names.into_iter().collect::<Vec<_>>().join(" "));
    }
    out
}

fn condition(conditions: &Value, kind: &str) -> String {
    (conditions.as_array().into_iter().flatten())
        .find(|c| c["type"] == kind)
        .map(|c| {
            let status = c["status"].as_str().unwrap_or("Unknown");
            match c["reason"].as_str() {
                Some(r) if status != "True" => format!("{status} ({r})"),
                _ => status.to_string(),
            }
        })
        .unwrap_or_else(|| "Unknown".into())
}

/// `kubectl get ingress,gateway,httproute -A` as tables, from the controller's statuses (empty
/// without any of these objects).
pub fn table(m: &Manifests, status: &Value) -> String {
    let mut out = String::new();
    let ingresses: Vec<&Object> = m
        .edge
        .iter()
        .filter(|o| o.kind() == Kind::Ingress)
        .collect();
    let claimed: BTreeMap<(String, String), Vec<String>> = (status.get("ingresses"))
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|i| {
            let s = |f: &str| i[f].as_str().unwrap_or_default().to_string();
            (
                (s("namespace"), s("name")),
                addresses(i, "/loadBalancer/ingress", "ip"),
            )
        })
        .collect();
    if !ingresses.is_empty() {
        out += &format!(
            "\n{:<12} {:<24} {:<10} {:<36} {:<16} {}\n",
            "NAMESPACE", "INGRESS", "CLASS", "HOSTS", "ADDRESS", "PORTS"
        );
        for o in ingresses {
            let Object::Ingress(i) = o else { continue };
            let (ns, name) = namespaced(&i.metadata);
            let spec = i.spec.clone().unwrap_or_default();
            let hosts: Vec<String> = (spec.rules.iter().flatten())
                .map(|r| r.host.clone().unwrap_or_else(|| "*".into()))
                .collect();
            let address = claimed
                .get(&(ns.clone(), name.clone()))
                .map(|a| a.join(","));
            let ports = if spec.tls.as_ref().is_some_and(|t| !t.is_empty()) {
                "80, 443"
            } else {
                "80"
            };
            out += &format!(
                "{:<12} {:<24} {:<10} {:<36} {:<16} {}\n",
                ns,
                name,
                spec.ingress_class_name.as_deref().unwrap_or("<default>"),
                if hosts.is_empty() {
                    "*".into()
                } else {
                    hosts.join(",")
                },
                address.unwrap_or_else(|| "<not ours>".into()),
                ports
            );
        }
    }
    let list = |f: &str| {
        status
            .get(f)
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default()
    };
    let gateways = list("gateways");
    if !gateways.is_empty() {
        out += &format!(
            "\n{:<12} {:<24} {:<16} {:<14} {}\n",
            "NAMESPACE", "GATEWAY", "ADDRESS", "ACCEPTED", "PROGRAMMED"
        );
        for g in &gateways {
            out += &format!(
                "{:<12} {:<24} {:<16} {:<14} {}\n",
                g["namespace"].as_str().unwrap_or_default(),
                g["name"].as_str().unwrap_or_default(),
                addresses(g, "/addresses", "value").join(","),
                condition(&g["conditions"], "Accepted"),
                condition(&g["conditions"], "Programmed"),
            );
        }
    }
    let routes = list("httpRoutes");
    if !routes.is_empty() {
        out += &format!(
            "\n{:<12} {:<24} {:<24} {:<22} {}\n",
            "NAMESPACE", "HTTPROUTE", "PARENT", "ACCEPTED", "RESOLVED-REFS"
        );
        for r in &routes {
            for p in r["parents"].as_array().into_iter().flatten() {
                out += &format!(
                    "{:<12} {:<24} {:<24} {:<22} {}\n",
                    r["namespace"].as_str().unwrap_or_default(),
                    r["name"].as_str().unwrap_or_default(),
                    p["parentRef"]["name"].as_str().unwrap_or_default(),
                    condition(&p["conditions"], "Accepted"),
                    condition(&p["conditions"], "ResolvedRefs"),
                );
            }
        }
    }
    let problems = list("problems");
    for p in &problems {
        out += &format!("ingress: {}\n", p.as_str().unwrap_or_default());
    }
    out
}
