//! Cluster DNS in the lab, set up as kubeadm sets up CoreDNS: a `kube-system/kube-dns` Service at
//! the tenth address of the service CIDR in front of a Deployment of `flatnet dns` pods (two
//! replicas) reading the lab's cluster directory, forwarding other names to the lab internet's
//! own DNS server (`example.com`, never the host's resolver). Every pod gets the resolv.conf the
//! kubelet writes for `dnsPolicy: ClusterFirst`. Manifests that define `kube-system/kube-dns`
//! themselves replace both objects.

use crate::plan::PodDns;
use crate::PodRecord;
use cluster::manifests::namespaced;
use cluster::Manifests;
use ipnet::Ipv4Net;
use serde_json::json;
use std::net::Ipv4Addr;
use std::path::Path;

pub const NAMESPACE: &str = "kube-system";
pub const SERVICE: &str = "kube-dns";
pub const DEPLOYMENT: &str = "flatnet-dns";
/// The label the Service selects (CoreDNS's).
pub const APP_LABEL: (&str, &str) = ("k8s-app", "kube-dns");
pub const CLUSTER_DOMAIN: &str = "cluster.local";
/// The lab internet's zone, served at its host address.
pub const INTERNET_DOMAIN: &str = "example.com";

/// The DNS Service's ClusterIP: the tenth address of the service CIDR (10.96.0.10).
pub fn service_ip(service_cidr: Ipv4Net) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(service_cidr.network()) + 10)
}

/// A pod's /etc/resolv.conf, as the kubelet writes it: from the policy (`ClusterFirst`: the
/// cluster DNS, the namespace's search list, `ndots:5`; `Default`: the node's resolver, which in
/// the lab is the lab internet's `node_dns`; `None`: nothing), then `dnsConfig` appended
/// (nameservers and searches without duplicates, options merged by name, the pod's winning).
pub fn resolv_conf(
    namespace: &str,
    dns: &PodDns,
    cluster_dns: Ipv4Addr,
    node_dns: Ipv4Addr,
) -> String {
    let base = match dns.policy.as_str() {
        "None" => PodDns::default(),
        "Default" => PodDns {
            nameservers: vec![node_dns.to_string()],
            ..PodDns::default()
        },
        _ => PodDns {
            nameservers: vec![cluster_dns.to_string()],
            searches: vec![
                format!("{namespace}.svc.{CLUSTER_DOMAIN}"),
                format!("svc.{CLUSTER_DOMAIN}"),
                CLUSTER_DOMAIN.to_string(),
            ],
            options: vec![("ndots".to_string(), Some("5".to_string()))],
            ..PodDns::default()
        },
    };
    let PodDns {
        nameservers: mut servers,
        mut searches,
        mut options,
        ..
    } = base;
    for s in &dns.nameservers {
        if !servers.contains(s) {
            servers.push(s.clone());
        }
    }
    for s in &dns.searches {
        if !searches.contains(s) {
            searches.push(s.clone());
        }
    }
    for (name, value) in &dns.options {
        options.retain(|(n, _)| n != name);
        options.push((name.clone(), value.clone()));
    }
    let mut out = String::new();
    if !searches.is_empty() {
        out.push_str(&format!("search {}\n", searches.join(" ")));
    }
    for s in &servers {
        out.push_str(&format!("nameserver {s}\n"));
    }
    if !options.is_empty() {
        let opts: Vec<String> = options
            .iter()
            .map(|(n, v)| match v {
                Some(v) => format!("{n}:{v}"),
                None => n.clone(),
            })
            .collect();
        out.push_str(&format!("options {}\n", opts.join(" ")));
    }
    out
}

/// Adds the kube-dns Service and the DNS Deployment unless the manifests have their own.
pub fn add_builtin(
    m: &mut Manifests,
    service_cidr: Ipv4Net,
    exe: &Path,
    lab_dir: &Path,
    upstream: Ipv4Addr,
) -> Result<(), String> {
    if m.services
        .iter()
        .any(|s| namespaced(&s.metadata) == (NAMESPACE.into(), SERVICE.into()))
    {
        return Ok(());
    }
    let (k, v) = APP_LABEL;
    let service = json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": SERVICE, "namespace": NAMESPACE, "labels": {k: v}},
        "spec": {"clusterIP": service_ip(service_cidr).to_string(), "selector": {k: v}, "ports": [
            {"name": "dns", "port": 53, "targetPort": 53, "protocol": "UDP"},
            {"name": "dns-tcp", "port": 53, "targetPort": 53, "protocol": "TCP"},
            {"name": "metrics", "port": 9153, "targetPort": 8080, "protocol": "TCP"}]}});
    let argv = [
        exe.display().to_string(),
        "dns".into(),
        "--dir".into(),
        lab_dir.join("cluster").display().to_string(),
        "--upstream".into(),
        upstream.to_string(),
        "--workers".into(),
        "1".into(),
        "--status-dir".into(),
        lab_dir.join("status/dns").display().to_string(),
    ];
    let deployment = json!({"apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": DEPLOYMENT, "namespace": NAMESPACE, "labels": {k: v}},
        "spec": {"replicas": 2, "selector": {"matchLabels": {k: v}}, "template": {
            "metadata": {"labels": {k: v}},
            "spec": {"containers": [{"name": "dns", "command": argv, "ports": [
                {"name": "dns", "containerPort": 53, "protocol": "UDP"},
                {"name": "dns-tcp", "containerPort": 53, "protocol": "TCP"},
                {"name": "metrics", "containerPort": 8080, "protocol": "TCP"}]}]}}}});
    m.add(service).map_err(|e| e.to_string())?;
    m.add(deployment).map_err(|e| e.to_string())
}

/// The command line of the lab internet's DNS server (authoritative for `example.com`, and
/// answering the names of `hosts`, which the lab keeps; after each load of it, its mark goes to
/// `status_dir`).
pub fn internet_argv(exe: &Path, host: Ipv4Addr, hosts: &Path, status_dir: &Path) -> Vec<String> {
    let mut argv = vec![
        exe.display().to_string(),
        "dns".into(),
        "--listen".into(),
        format!("{host}:53"),
        "--domain".into(),
        INTERNET_DOMAIN.into(),
        "--no-forward".into(),
        "--http".into(),
        String::new(),
        "--workers".into(),
        "1".into(),
        "--hosts".into(),
        hosts.display().to_string(),
        "--status-dir".into(),
        status_dir.display().to_string(),
    ];
    for name in [
        INTERNET_DOMAIN.to_string(),
        format!("www.{INTERNET_DOMAIN}"),
    ] {
        argv.push("--record".into());
        argv.push(format!("{name}={host}"));
    }
    argv
}

/// Whether `p` is one of the DNS pods (its server reports the state it loaded).
pub fn is_dns_pod(p: &PodRecord) -> bool {
    p.namespace == NAMESPACE && p.labels.get(APP_LABEL.0).map(String::as_str) == Some(APP_LABEL.1)
}

/// The running pods as Pod objects (what the kubelet reports to the API server), one file name
/// and text each: DNS answers
/// `a-b-c-d.<ns>.pod` names only for pods that exist, and each node's proxy serves the
/// hostPorts of its pods.
pub fn pod_objects(pods: &[PodRecord]) -> Vec<(String, String)> {
    pods.iter()
        .filter_map(|p| {
            let ip = p.ip?;
            // The declared ports, hostPorts among them (the node's service proxy serves those).
            let ports: Vec<_> = p
                .ports
                .iter()
                .map(|x| json!({"name": x.name, "containerPort": x.port, "protocol": x.protocol,
                                "hostPort": x.host_port, "hostIP": x.host_ip}))
                .collect();
            let pod = json!({"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": p.name, "namespace": p.namespace, "labels": p.labels},
                "spec": {"nodeName": p.node, "hostname": p.hostname, "subdomain": p.subdomain,
                         "hostNetwork": p.host_network, "containers": [{"name": "main", "ports": ports}]},
                "status": {"phase": "Running", "podIP": ip.to_string(), "podIPs": [{"ip": ip.to_string()}],
                           "conditions": [{"type": "Ready", "status": if p.is_ready() { "True" } else { "False" }}]}});
            Some((format!("{}.{}.json", p.namespace, p.name), pod.to_string()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolv_conf_is_the_kubelets() {
        let cluster = service_ip("10.96.0.0/12".parse().unwrap());
        let node: Ipv4Addr = "203.0.113.10".parse().unwrap();
        let dns = |policy: &str| PodDns {
            policy: policy.into(),
            ..PodDns::default()
        };
        assert_eq!(
            resolv_conf("shop", &dns("ClusterFirst"), cluster, node),
            "search shop.svc.cluster.local svc.cluster.local cluster.local\nnameserver 10.96.0.10\noptions ndots:5\n"
        );
        assert_eq!(
            resolv_conf("shop", &dns("Default"), cluster, node),
            "nameserver 203.0.113.10\n"
        );
        let custom = PodDns {
            policy: "ClusterFirst".into(),
            nameservers: vec!["10.96.0.10".into(), "192.0.2.53".into()],
            searches: vec!["example.com".into()],
            options: vec![("ndots".into(), Some("2".into())), ("edns0".into(), None)],
        };
        assert_eq!(
            resolv_conf("shop", &custom, cluster, node),
            "search shop.svc.cluster.local svc.cluster.local cluster.local example.com\nnameserver 10.96.0.10\nnameserver 192.0.2.53\noptions ndots:2 edns0\n"
        );
        let none = PodDns {
            policy: "None".into(),
            nameservers: vec!["192.0.2.53".into()],
            ..PodDns::default()
        };
        assert_eq!(
            resolv_conf("shop", &none, cluster, node),
            "nameserver 192.0.2.53\n"
        );
    }

    #[test]
    fn builtin_objects_give_way_to_the_users() {
        let mut m = Manifests::default();
        let add = |m: &mut Manifests| {
            let cidr = "10.96.0.0/12".parse().unwrap();
            let (exe, dir) = (Path::new("/x/flatnet"), Path::new("/lab"));
            add_builtin(m, cidr, exe, dir, Ipv4Addr::LOCALHOST).unwrap();
        };
        add(&mut m);
        assert_eq!(m.services.len(), 1);
        assert_eq!(m.deployments.len(), 1);
        assert_eq!(
            m.services[0].spec.as_ref().unwrap().cluster_ip.as_deref(),
            Some("10.96.0.10")
        );
        let before = m.deployments.len();
        add(&mut m);
        assert_eq!(
            m.deployments.len(),
            before,
            "kube-dns already there: nothing added"
        );
    }
}
