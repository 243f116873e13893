//! The service-proxy planner: Services + EndpointSlices + this node's facts → one nftables
//! table (`ip flatnet-proxy`), as a structure the [`crate::trace`] tracer walks and
//! [`Ruleset::render`] writes out.
//!
//! Design (kube-proxy's nftables mode, which this follows): every lookup a packet makes is one
//! verdict-map lookup, whatever the number of Services.
//! - `service-ips` maps `daddr . l4proto . dport` of every ClusterIP, external IP and
//!   load-balancer IP to the Service port's chain; `service-nodeports` maps `l4proto . dport` on
//!   the node's own addresses. Per Service port: 1 map element per frontend, 1–3 chains, and
//!   1 chain per endpoint.
//! - The Service chain `svc_*` picks an endpoint with `numgen random mod N` (a verdict map again),
//!   after pinning the client to its last endpoint when `sessionAffinity: ClientIP` (one set with
//!   timeouts per endpoint). External frontends go through `ext_*` first: masquerade for
//!   `externalTrafficPolicy: Cluster`; for `Local`, pods take the cluster path and everyone else
//!   only this node's endpoints, unmasqueraded, so the client address survives.
//! - An endpoint chain `ep_*` masquerades a pod reaching itself (hairpin) and DNATs.
//! - Services without endpoints are rejected at once by filter-hook lookups in
//!   `no-endpoint-services` / `no-endpoint-nodeports` (a nat chain cannot reject);
//!   `loadBalancerSourceRanges` are a filter-hook lookup in `firewall-ips` before DNAT.
//! - Masquerade is a mark (`0x4000`) set anywhere above and acted on once at postrouting.

use crate::model::{service_ports, usable, Config, Proto, SvcPort};
use cluster::manifests::namespaced;
use cluster::ModelError;
use ipnet::Ipv4Net;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write;
use std::net::Ipv4Addr;

pub const TABLE: &str = "ip flatnet-proxy";
pub const MASQ_MARK: u32 = 0x4000;

/// `daddr . l4proto . dport`
pub type IpKey = (Ipv4Addr, Proto, u16);
/// `l4proto . dport`
pub type PortKey = (Proto, u16);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rule {
    /// Mark for masquerade unless the source is inside this CIDR (the cluster).
    MasqUnlessFrom(Ipv4Net),
    /// Mark for masquerade.
    Masq,
    /// Mark for masquerade when the source is this address (a pod reaching itself).
    MasqIfFrom(Ipv4Addr),
    /// Continue in a chain when the source is inside this CIDR.
    GotoIfFrom(Ipv4Net, String),
    /// A client seen within the affinity timeout goes back to the endpoint it had (set name,
    /// endpoint chain).
    Sticky(String, String),
    /// Remember the client in this set (affinity).
    Remember(String, u32),
    /// One of these chains, at random.
    Random(Vec<String>),
    Goto(String),
    Dnat(Ipv4Addr, u16, Proto),
    Drop,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ruleset {
    pub service_ips: BTreeMap<IpKey, String>,
    pub node_ports: BTreeMap<PortKey, String>,
    pub no_endpoints: BTreeSet<IpKey>,
    pub no_endpoint_node_ports: BTreeSet<PortKey>,
    /// Load-balancer frontends with source ranges: traffic from elsewhere is dropped.
    pub firewall: BTreeMap<IpKey, Vec<Ipv4Net>>,
    pub chains: BTreeMap<String, Vec<Rule>>,
    /// Chain → the Service port it belongs to (a comment in the ruleset).
    pub comments: BTreeMap<String, String>,
    /// `healthCheckNodePort` → this node's endpoint count (for `externalTrafficPolicy: Local`).
    pub health_checks: BTreeMap<u16, usize>,
}

fn hash(s: &str) -> String {
    Sha256::digest(s.as_bytes())[..5]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A chain name: kind, a hash of what it serves, and a readable tail.
fn chain_name(kind: &str, id: &str) -> String {
    let tail: String = id
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .take(40)
        .collect();
    format!("{kind}_{}_{tail}", hash(id))
}

/// Plans the whole table for this node. Errors name the Service and field (a ClusterIP outside
/// the service CIDR, a NodePort outside the range or taken twice).
pub fn plan(
    cfg: &Config,
    services: &[Service],
    slices: &[EndpointSlice],
) -> Result<Ruleset, ModelError> {
    let mut rs = Ruleset::default();
    let mut node_port_owner: BTreeMap<PortKey, String> = BTreeMap::new();
    let mut sorted: Vec<&Service> = services.iter().collect();
    sorted.sort_by_key(|s| namespaced(&s.metadata));
    for svc in sorted {
        let (ns, name) = namespaced(&svc.metadata);
        let own: Vec<&EndpointSlice> = slices
            .iter()
            .filter(|s| {
                let (sns, _) = namespaced(&s.metadata);
                sns == ns
                    && s.metadata
                        .labels
                        .as_ref()
                        .and_then(|l| l.get("kubernetes.io/service-name"))
                        == Some(&name)
            })
            .collect();
        for (i, sp) in service_ports(cfg, svc, &own)?.into_iter().enumerate() {
            if let Some(np) = sp.node_port {
                if let Some(other) = node_port_owner.insert((sp.proto, np), sp.id.clone()) {
                    return Err(ModelError::new(
                        format!("Service {ns}/{name}"),
                        format!("spec.ports[{i}].nodePort"),
                        format!("{np}/{} is already used by {other}", sp.proto.as_str()),
                    ));
                }
            }
            add_port(&mut rs, cfg, &sp);
        }
    }
    Ok(rs)
}

fn add_port(rs: &mut Ruleset, cfg: &Config, sp: &SvcPort) {
    let svc = chain_name("svc", &sp.id);
    let ext = chain_name("ext", &sp.id);
    let cluster_eps = usable(&sp.endpoints, &cfg.node, sp.internal_local);
    let any_eps = !usable(&sp.endpoints, &cfg.node, false).is_empty();
    let local_eps = usable(&sp.endpoints, &cfg.node, true);
    let ep_chain =
        |e: &crate::model::Endpoint| chain_name("ep", &format!("{}/{}:{}", sp.id, e.ip, e.port));
    // Endpoint chains.
    let mut all_eps = cluster_eps.clone();
    all_eps.extend(local_eps.iter().copied());
    all_eps.sort();
    all_eps.dedup();
    for e in &all_eps {
        let name = ep_chain(e);
        let mut rules = vec![Rule::MasqIfFrom(e.ip)];
        if let Some(t) = sp.affinity {
            rules.push(Rule::Remember(format!("aff_{}", &name[3..]), t));
        }
        rules.push(Rule::Dnat(e.ip, e.port, sp.proto));
        rs.comments
            .insert(name.clone(), format!("{} -> {}:{}", sp.id, e.ip, e.port));
        rs.chains.insert(name, rules);
    }
    let pick = |eps: &[&crate::model::Endpoint]| -> Vec<Rule> {
        let mut rules = Vec::new();
        if sp.affinity.is_some() {
            for e in eps {
                let c = ep_chain(e);
                rules.push(Rule::Sticky(format!("aff_{}", &c[3..]), c));
            }
        }
        rules.push(Rule::Random(eps.iter().map(|e| ep_chain(e)).collect()));
        rules
    };
    // The cluster path: ClusterIPs, and pods using external frontends.
    let mut svc_rules = vec![Rule::MasqUnlessFrom(cfg.cluster_cidr)];
    svc_rules.extend(pick(&cluster_eps));
    let external_used =
        any_eps && (sp.node_port.is_some() || !sp.external_ips.is_empty() || !sp.lb_ips.is_empty());
    if !cluster_eps.is_empty() || external_used {
        rs.comments.insert(svc.clone(), sp.id.clone());
        rs.chains.insert(svc.clone(), svc_rules);
    }
    for ip in &sp.cluster_ips {
        let key = (*ip, sp.proto, sp.port);
        if cluster_eps.is_empty() {
            rs.no_endpoints.insert(key);
        } else {
            rs.service_ips.insert(key, svc.clone());
        }
    }
    // The external path.
    let external: Vec<IpKey> = sp
        .external_ips
        .iter()
        .chain(&sp.lb_ips)
        .map(|ip| (*ip, sp.proto, sp.port))
        .collect();
    if external.is_empty() && sp.node_port.is_none() {
        return;
    }
    if !any_eps {
        rs.no_endpoints.extend(external);
        rs.no_endpoint_node_ports
            .extend(sp.node_port.map(|np| (sp.proto, np)));
        return;
    }
    let ext_rules = if sp.external_local {
        let local = chain_name("local", &sp.id);
        let mut local_rules = pick(&local_eps);
        if local_eps.is_empty() {
            local_rules = vec![Rule::Drop];
        }
        rs.comments
            .insert(local.clone(), format!("{} (local endpoints)", sp.id));
        rs.chains.insert(local.clone(), local_rules);
        vec![
            Rule::GotoIfFrom(cfg.cluster_cidr, svc.clone()),
            Rule::Goto(local),
        ]
    } else {
        vec![Rule::Masq, Rule::Goto(svc.clone())]
    };
    rs.comments
        .insert(ext.clone(), format!("{} (external)", sp.id));
    rs.chains.insert(ext.clone(), ext_rules);
    for key in external {
        rs.service_ips.insert(key, ext.clone());
        if !sp.lb_source_ranges.is_empty() && sp.lb_ips.contains(&key.0) {
            let mut ranges = sp.lb_source_ranges.clone();
            // Nodes and pods may always reach it (as kube-proxy allows).
            ranges.push(cfg.cluster_cidr);
            ranges.extend(
                cfg.node_ips
                    .iter()
                    .map(|ip| Ipv4Net::new(*ip, 32).expect("/32")),
            );
            rs.firewall.insert(key, ranges);
        }
    }
    if let Some(np) = sp.node_port {
        rs.node_ports.insert((sp.proto, np), ext.clone());
    }
    if let Some(hc) = sp.health_check_node_port {
        rs.health_checks.insert(hc, local_eps.len());
    }
}

impl Ruleset {
    /// The whole table as one `nft -f` script (created fresh: `add table` + `delete table` first).
    pub fn render(&self) -> String {
        let mut o = String::new();
        let _ = writeln!(
            o,
            "add table {TABLE}\ndelete table {TABLE}\ntable {TABLE} {{"
        );
        let map = |o: &mut String, name: &str, key_type: &str, elems: Vec<String>| {
            let _ = writeln!(o, "  map {name} {{\n    type {key_type} : verdict");
            if !elems.is_empty() {
                let _ = writeln!(
                    o,
                    "    elements = {{\n      {}\n    }}",
                    elems.join(",\n      ")
                );
            }
            let _ = writeln!(o, "  }}");
        };
        const IP_KEY: &str = "ipv4_addr . inet_proto . inet_service";
        const PORT_KEY: &str = "inet_proto . inet_service";
        let ip_map = |o: &mut String, name: &str, elems: Vec<String>| map(o, name, IP_KEY, elems);
        let port_map =
            |o: &mut String, name: &str, elems: Vec<String>| map(o, name, PORT_KEY, elems);
        let k3 = |(ip, p, port): &IpKey| format!("{ip} . {} . {port}", p.as_str());
        let k2 = |(p, port): &PortKey| format!("{} . {port}", p.as_str());
        ip_map(
            &mut o,
            "service-ips",
            self.service_ips
                .iter()
                .map(|(k, c)| format!("{} : goto {c}", k3(k)))
                .collect(),
        );
        port_map(
            &mut o,
            "service-nodeports",
            self.node_ports
                .iter()
                .map(|(k, c)| format!("{} : goto {c}", k2(k)))
                .collect(),
        );
        ip_map(
            &mut o,
            "no-endpoint-services",
            self.no_endpoints
                .iter()
                .map(|k| format!("{} : goto reject-chain", k3(k)))
                .collect(),
        );
        port_map(
            &mut o,
            "no-endpoint-nodeports",
            self.no_endpoint_node_ports
                .iter()
                .map(|k| format!("{} : goto reject-chain", k2(k)))
                .collect(),
        );
        let mut fw_chains = Vec::new();
        ip_map(
            &mut o,
            "firewall-ips",
            self.firewall
                .iter()
                .map(|(k, ranges)| {
                    let c = chain_name("fw", &k3(k));
                    fw_chains.push((c.clone(), ranges));
                    format!("{} : goto {c}", k3(k))
                })
                .collect(),
        );
        let mut sets: BTreeMap<String, u32> = BTreeMap::new();
        for rules in self.chains.values() {
            for r in rules {
                if let Rule::Remember(set, t) = r {
                    sets.insert(set.clone(), *t);
                }
            }
        }
        for (set, t) in &sets {
            let _ = writeln!(o, "  set {set} {{\n    type ipv4_addr\n    flags dynamic,timeout\n    timeout {t}s\n  }}");
        }
        let _ = writeln!(
            o,
            "  chain reject-chain {{\n    reject\n  }}
  chain filter-prerouting {{
    type filter hook prerouting priority -110; policy accept;
    ip daddr . meta l4proto . th dport vmap @firewall-ips
  }}
  chain filter-input {{
    type filter hook input priority -10; policy accept;
    ct state new ip daddr . meta l4proto . th dport vmap @no-endpoint-services
    ct state new fib daddr type local meta l4proto . th dport vmap @no-endpoint-nodeports
  }}
  chain filter-forward {{
    type filter hook forward priority -10; policy accept;
    ct state new ip daddr . meta l4proto . th dport vmap @no-endpoint-services
  }}
  chain filter-output {{
    type filter hook output priority -10; policy accept;
    ct state new ip daddr . meta l4proto . th dport vmap @no-endpoint-services
    ct state new fib daddr type local meta l4proto . th dport vmap @no-endpoint-nodeports
  }}
  chain nat-prerouting {{
    type nat hook prerouting priority -100; policy accept;
    jump services
  }}
  chain nat-output {{
    type nat hook output priority -100; policy accept;
    jump services
  }}
  chain nat-postrouting {{
    type nat hook postrouting priority 100; policy accept;
    meta mark & {MASQ_MARK:#x} == 0 return
    meta mark set meta mark ^ {MASQ_MARK:#x}
    masquerade fully-random
  }}
  chain mark-for-masquerade {{
    meta mark set meta mark | {MASQ_MARK:#x}
  }}
  chain services {{
    ip daddr . meta l4proto . th dport vmap @service-ips
    fib daddr type local meta l4proto . th dport vmap @service-nodeports
  }}"
        );
        for (c, ranges) in fw_chains {
            let list: Vec<String> = ranges.iter().map(|r| r.to_string()).collect();
            let _ = writeln!(
                o,
                "  chain {c} {{\n    ip saddr != {{ {} }} drop\n  }}",
                list.join(", ")
            );
        }
        for (name, rules) in &self.chains {
            let _ = writeln!(o, "  chain {name} {{");
            if let Some(c) = self.comments.get(name) {
                let _ = writeln!(o, "    comment \"{}\"", c.replace('"', "'"));
            }
            for r in rules {
                let _ = writeln!(o, "    {}", render_rule(r));
            }
            let _ = writeln!(o, "  }}");
        }
        o.push_str("}\n");
        o
    }
}

fn render_rule(r: &Rule) -> String {
    match r {
        Rule::MasqUnlessFrom(c) => format!("ip saddr != {c} jump mark-for-masquerade"),
        Rule::Masq => "jump mark-for-masquerade".into(),
        Rule::MasqIfFrom(ip) => format!("ip saddr {ip} jump mark-for-masquerade"),
        Rule::GotoIfFrom(c, chain) => format!("ip saddr {c} goto {chain}"),
        Rule::Sticky(set, chain) => format!("ip saddr @{set} goto {chain}"),
        Rule::Remember(set, _) => format!("update @{set} {{ ip saddr }}"),
        // Only reachable through a path whose own endpoints are all elsewhere (e.g. internal
        // policy Local with none here): nothing to pick, the packet goes nowhere.
        Rule::Random(chains) if chains.is_empty() => "drop".into(),
        Rule::Random(chains) => {
            let arms: Vec<String> = chains
                .iter()
                .enumerate()
                .map(|(i, c)| format!("{i} : goto {c}"))
                .collect();
            format!(
                "numgen random mod {} vmap {{ {} }}",
                chains.len(),
                arms.join(", ")
            )
        }
        Rule::Goto(c) => format!("goto {c}"),
        Rule::Dnat(ip, port, p) => format!("meta l4proto {} dnat to {ip}:{port}", p.as_str()),
        Rule::Drop => "drop".into(),
    }
}

/// The changes that turn `old` into `new`, as one `nft -f` script (empty when nothing changed):
/// new chains first, then map and set elements, then the chains nothing refers to any more.
/// Unchanged chains and elements are not sent, so one Service's change costs its own lines.
pub fn diff(old: &Ruleset, new: &Ruleset) -> String {
    let mut o = String::new();
    let t = TABLE;
    let sets = |rs: &Ruleset| -> BTreeMap<String, u32> {
        rs.chains
            .values()
            .flatten()
            .filter_map(|r| match r {
                Rule::Remember(s, timeout) => Some((s.clone(), *timeout)),
                _ => None,
            })
            .collect()
    };
    let (old_sets, new_sets) = (sets(old), sets(new));
    for (s, timeout) in &new_sets {
        if old_sets.get(s) != Some(timeout) {
            let _ = writeln!(
                o,
                "add set {t} {s} {{ type ipv4_addr; flags dynamic,timeout; timeout {timeout}s; }}"
            );
        }
    }
    // Declare every changed chain before any rule refers to one.
    let changed: Vec<(&String, &Vec<Rule>)> = new
        .chains
        .iter()
        .filter(|(name, rules)| old.chains.get(*name) != Some(*rules))
        .collect();
    for (name, _) in &changed {
        let _ = writeln!(o, "add chain {t} {name}\nflush chain {t} {name}");
    }
    for (name, rules) in &changed {
        for r in *rules {
            let _ = writeln!(o, "add rule {t} {name} {}", render_rule(r));
        }
    }
    let k3 = |(ip, p, port): &IpKey| format!("{ip} . {} . {port}", p.as_str());
    let k2 = |(p, port): &PortKey| format!("{} . {port}", p.as_str());
    map_diff(
        &mut o,
        "service-ips",
        &old.service_ips,
        &new.service_ips,
        k3,
        |c| format!("goto {c}"),
    );
    map_diff(
        &mut o,
        "service-nodeports",
        &old.node_ports,
        &new.node_ports,
        k2,
        |c| format!("goto {c}"),
    );
    let reject = |s: &BTreeSet<IpKey>| s.iter().map(|k| (*k, ())).collect::<BTreeMap<_, _>>();
    let reject2 = |s: &BTreeSet<PortKey>| s.iter().map(|k| (*k, ())).collect::<BTreeMap<_, _>>();
    map_diff(
        &mut o,
        "no-endpoint-services",
        &reject(&old.no_endpoints),
        &reject(&new.no_endpoints),
        k3,
        |_| "goto reject-chain".into(),
    );
    map_diff(
        &mut o,
        "no-endpoint-nodeports",
        &reject2(&old.no_endpoint_node_ports),
        &reject2(&new.no_endpoint_node_ports),
        k2,
        |_| "goto reject-chain".into(),
    );
    if old.firewall != new.firewall {
        // Rare (source ranges changed): rewrite the firewall map and its chains whole.
        let _ = writeln!(o, "flush map {t} firewall-ips");
        for (k, ranges) in &new.firewall {
            let c = chain_name("fw", &k3(k));
            let list: Vec<String> = ranges.iter().map(|r| r.to_string()).collect();
            let _ = writeln!(o, "add chain {t} {c}\nflush chain {t} {c}\nadd rule {t} {c} ip saddr != {{ {} }} drop", list.join(", "));
            let _ = writeln!(o, "add element {t} firewall-ips {{ {} : goto {c} }}", k3(k));
        }
        for k in old
            .firewall
            .keys()
            .filter(|k| !new.firewall.contains_key(*k))
        {
            let _ = writeln!(o, "delete chain {t} {}", chain_name("fw", &k3(k)));
        }
    }
    for name in old.chains.keys().filter(|n| !new.chains.contains_key(*n)) {
        let _ = writeln!(o, "delete chain {t} {name}");
    }
    for s in old_sets.keys().filter(|s| !new_sets.contains_key(*s)) {
        let _ = writeln!(o, "delete set {t} {s}");
    }
    o
}

fn map_diff<K: Ord, V: PartialEq>(
    o: &mut String,
    map: &str,
    old: &BTreeMap<K, V>,
    new: &BTreeMap<K, V>,
    key: impl Fn(&K) -> String,
    verdict: impl Fn(&V) -> String,
) {
    let t = TABLE;
    for (k, v) in old {
        if new.get(k) != Some(v) {
            let _ = writeln!(o, "delete element {t} {map} {{ {} }}", key(k));
        }
    }
    for (k, v) in new {
        if old.get(k) != Some(v) {
            let _ = writeln!(o, "add element {t} {map} {{ {} : {} }}", key(k), verdict(v));
        }
    }
}
