//! NetworkPolicies and Namespaces in the lab: checked as the API server checks them before
//! anything is written, published where the agents read them (Namespaces with the
//! `kubernetes.io/metadata.name` label the API server puts on every one), listed by `lab
//! status`, and their verdict on a packet for `lab explain`.

use cluster::manifests::namespaced;
use cluster::{Manifests, Store};
use policy::model::{Direction, Policy};
use std::collections::BTreeMap;
use std::net::Ipv4Addr;

/// Refuses a policy the API server would refuse (the error names the policy and field).
pub fn check(m: &Manifests) -> Result<(), String> {
    for np in &m.network_policies {
        Policy::parse(np).map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// The files the agents read, by path under the lab's `cluster/` directory.
pub fn objects(m: &Manifests) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for ns in &m.namespaces {
        let mut ns = ns.clone();
        let name = ns.metadata.name.clone().unwrap_or_default();
        ns.metadata
            .labels
            .get_or_insert_with(Default::default)
            .insert("kubernetes.io/metadata.name".into(), name.clone());
        let mut v = serde_json::to_value(&ns).expect("json");
        v["apiVersion"] = "v1".into();
        v["kind"] = "Namespace".into();
        out.insert(format!("namespaces/{name}.json"), v.to_string());
    }
    for np in &m.network_policies {
        let (ns, name) = namespaced(&np.metadata);
        let mut v = serde_json::to_value(np).expect("json");
        v["apiVersion"] = "networking.k8s.io/v1".into();
        v["kind"] = "NetworkPolicy".into();
        v["metadata"]["namespace"] = ns.clone().into();
        out.insert(format!("networkpolicies/{ns}.{name}.json"), v.to_string());
    }
    out
}

/// `kubectl get networkpolicies -A` as a table (empty without policies).
pub fn table(m: &Manifests) -> String {
    if m.network_policies.is_empty() {
        return String::new();
    }
    let mut out = format!(
        "\n{:<12} {:<28} {:<28} {}\n",
        "NAMESPACE", "NETWORKPOLICY", "POD-SELECTOR", "POLICY-TYPES"
    );
    for np in &m.network_policies {
        let (ns, name) = namespaced(&np.metadata);
        let (selector, types) = match Policy::parse(np) {
            Ok(p) => {
                let types: Vec<&str> = Direction::BOTH
                    .into_iter()
                    .filter(|d| p.rules(*d).is_some())
                    .map(|d| {
                        if d == Direction::Ingress {
                            "Ingress"
                        } else {
                            "Egress"
                        }
                    })
                    .collect();
                (p.selector.to_string(), types.join(","))
            }
            Err(e) => ("<refused>".into(), e.to_string()),
        };
        out += &format!("{ns:<12} {name:<28} {selector:<28} {types}\n");
    }
    out
}

/// The policy verdict on a packet that reaches `dst:port` (after any DNAT).
pub fn verdict(
    store: &Store,
    src: Ipv4Addr,
    dst: Ipv4Addr,
    proto: cluster::Proto,
    port: u16,
    src_node: Option<&str>,
) -> String {
    let mut planner = policy::plan::Planner::new("", None);
    planner.take_store(store);
    let pkt = policy::Packet {
        src,
        dst,
        proto: proto.number(),
        port,
    };
    planner.cluster.verdict_text(&pkt, src_node)
}
