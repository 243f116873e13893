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
//! - The Service chain `svc_*` picks an endpoint at random (`numgen random mod N−i` per arm, see
//!   [`random_arms`]), after pinning the client to its last endpoint when `sessionAffinity: ClientIP` (one set with
//!   timeouts per endpoint). External frontends go through `ext_*` first: masquerade for
//!   `externalTrafficPolicy: Cluster`; for `Local`, pods take the cluster path and everyone else
//!   only this node's endpoints, unmasqueraded, so the client address survives.
//! - An endpoint chain `ep_*` masquerades a pod reaching itself (hairpin) and DNATs.
//! - Services without endpoints are rejected at once by filter-hook lookups in
//!   `no-endpoint-services` / `no-endpoint-nodeports` (a nat chain cannot reject);
//!   `loadBalancerSourceRanges` are a filter-hook lookup in `firewall-ips` before DNAT, for new
//!   connections only (as kube-proxy does), so packets of established flows skip it.
//! - Masquerade is a mark (`0x4000`) set anywhere above and acted on once at postrouting.
//! - A pod's `hostPort`s on this node (see [`plan_host_ports`]) are entries of the same maps:
//!   `l4proto . hostPort` in `service-nodeports` (or `hostIP . l4proto . hostPort` in
//!   `service-ips`) to an `hp_*` chain that DNATs to the pod, keeping the client's address as the
//!   portmap plugin does.

use crate::model::{service_ports, usable, Config, Endpoint, Proto, SvcPort};
use cluster::manifests::namespaced;
use cluster::store::slice_service;
use cluster::ModelError;
use ipnet::Ipv4Net;
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt::Write;
use std::net::Ipv4Addr;

pub const TABLE_NAME: &str = "flatnet-proxy";
pub const TABLE: &str = "ip flatnet-proxy";
pub const MASQ_MARK: u32 = 0x4000;
/// The chain that marks a packet for masquerade.
pub const MASQUERADE_CHAIN: &str = "mark-for-masquerade";
/// Per-Service chain kinds (the name's prefix), referrers before what they refer to (`ext` goes
/// to `local` and `svc`, those to `ep`): the order in which they can be deleted.
pub const CHAIN_KINDS: [&str; 6] = ["ext", "local", "svc", "ep", "fw", "hp"];
/// The prefix of affinity sets.
pub const AFFINITY: &str = "aff";

/// A per-Service chain's place in [`CHAIN_KINDS`]; `None` for the table's fixed chains.
pub fn chain_kind(name: &str) -> Option<usize> {
    let (kind, _) = name.split_once('_')?;
    CHAIN_KINDS.iter().position(|k| *k == kind)
}

/// `daddr . l4proto . dport`
pub type IpKey = (Ipv4Addr, Proto, u16);
/// `l4proto . dport`
pub type PortKey = (Proto, u16);

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
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
    /// One of these chains, uniformly at random (see [`random_arms`]).
    Random(Vec<String>),
    Goto(String),
    Dnat(Ipv4Addr, u16, Proto),
    /// Leave the chain (the packet goes on) when the source is inside this CIDR.
    ReturnIfFrom(Ipv4Net),
    Drop,
}

/// A node's table, or one Service's share of it (a fragment: see [`plan_service`]). Chains are
/// named after their content, so two rulesets with a chain of the same name agree on its rules;
/// that makes a diff a matter of names, and lets an applier adopt a table by listing names.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ruleset {
    pub service_ips: BTreeMap<IpKey, String>,
    pub node_ports: BTreeMap<PortKey, String>,
    pub no_endpoints: BTreeSet<IpKey>,
    pub no_endpoint_node_ports: BTreeSet<PortKey>,
    /// Load-balancer frontends with source ranges → the chain that drops other sources.
    pub firewall: BTreeMap<IpKey, String>,
    pub chains: BTreeMap<String, Vec<Rule>>,
    /// Chain → the Service port it belongs to (a comment in the ruleset).
    pub comments: BTreeMap<String, String>,
    /// `healthCheckNodePort` → this node's endpoint count (for `externalTrafficPolicy: Local`).
    pub health_checks: BTreeMap<u16, usize>,
    /// Affinity sets (one per endpoint of a `sessionAffinity: ClientIP` Service) → timeout.
    pub sets: BTreeMap<String, u32>,
}

fn hash(s: &str) -> String {
    Sha256::digest(s.as_bytes())[..5]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A chain or set name: kind, a hash of what it serves and does, and a readable tail.
fn object_name(kind: &str, id: &str, content: &str) -> String {
    let tail: String = id
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .take(40)
        .collect();
    format!("{kind}_{}_{tail}", hash(&format!("{id}|{content}")))
}

fn chain_name(kind: &str, id: &str, rules: &[Rule]) -> String {
    object_name(kind, id, &format!("{rules:?}"))
}

/// What a fragment of the table belongs to: a Service's namespace and name, or, for a pod's
/// hostPorts, its namespace and `pod/<name>` (a Service name has no slash: the two never meet).
pub type ServiceKey = (String, String);

/// The fragment key of a pod's hostPorts.
pub fn pod_key(namespace: &str, name: &str) -> ServiceKey {
    (namespace.to_string(), format!("pod/{name}"))
}

/// The EndpointSlices of each Service (by the `kubernetes.io/service-name` label).
fn slices_by_service(slices: &[EndpointSlice]) -> HashMap<ServiceKey, Vec<&EndpointSlice>> {
    let mut by: HashMap<ServiceKey, Vec<&EndpointSlice>> = HashMap::new();
    for s in slices {
        if let Some(svc) = slice_service(s) {
            by.entry(svc).or_default().push(s);
        }
    }
    by
}

/// Plans the whole table for this node. Errors name the Service and field (a ClusterIP outside
/// the service CIDR, a NodePort outside the range or taken twice).
pub fn plan(
    cfg: &Config,
    services: &[Service],
    slices: &[EndpointSlice],
) -> Result<Ruleset, ModelError> {
    let mut rs = Ruleset::default();
    let by_service = slices_by_service(slices);
    let mut sorted: Vec<&Service> = services.iter().collect();
    sorted.sort_by_key(|s| namespaced(&s.metadata));
    let mut node_port_owner: HashMap<PortKey, String> = HashMap::new();
    for svc in sorted {
        let key = namespaced(&svc.metadata);
        let own = by_service.get(&key).map(Vec::as_slice).unwrap_or_default();
        let fragment = plan_service(cfg, svc, own, |port| node_port_owner.get(&port).cloned())?;
        for port in fragment.claimed_node_ports() {
            node_port_owner.insert(*port, format!("{}/{}", key.0, key.1));
        }
        rs.merge(fragment);
    }
    Ok(rs)
}

/// [`plan`] plus the hostPorts of `pods` (those on this node): the node's whole table, as
/// `--dry-run` prints it and `explain` walks it.
pub fn plan_node(
    cfg: &Config,
    services: &[Service],
    slices: &[EndpointSlice],
    pods: &[Pod],
) -> Result<Ruleset, ModelError> {
    let mut rs = plan(cfg, services, slices)?;
    for pod in pods {
        rs.merge(plan_host_ports(cfg, pod, |_| None)?);
    }
    Ok(rs)
}

/// One Service's fragment of the table, from its own EndpointSlices. `taken` says which other
/// Service already holds a NodePort, if any.
pub fn plan_service(
    cfg: &Config,
    svc: &Service,
    own: &[&EndpointSlice],
    taken: impl Fn(PortKey) -> Option<String>,
) -> Result<Ruleset, ModelError> {
    let (ns, name) = namespaced(&svc.metadata);
    let mut rs = Ruleset::default();
    let mut mine = BTreeSet::new();
    for (i, sp) in service_ports(cfg, svc, own)?.into_iter().enumerate() {
        if let Some(np) = sp.node_port {
            let key = (sp.proto, np);
            if let Some(other) =
                taken(key).or_else(|| (!mine.insert(key)).then(|| format!("{ns}/{name} itself")))
            {
                return Err(ModelError::new(
                    format!("Service {ns}/{name}"),
                    format!("spec.ports[{i}].nodePort"),
                    format!("{np}/{} is already used by {other}", sp.proto.as_str()),
                ));
            }
        }
        add_port(&mut rs, cfg, &sp);
    }
    Ok(rs)
}

/// A pod's `hostPort`s, when it runs on this node with an IPv4 address: each mapping a chain that
/// DNATs to the pod (masquerading the pod reaching itself), entered from `service-nodeports` on
/// every node address, or from `service-ips` on its `hostIP`. Errors name the pod and field (a
/// hostPort another Service or pod holds here). `taken` says who holds a port, if anyone.
pub fn plan_host_ports(
    cfg: &Config,
    pod: &Pod,
    taken: impl Fn(PortKey) -> Option<String>,
) -> Result<Ruleset, ModelError> {
    let (ns, name) = namespaced(&pod.metadata);
    let mut rs = Ruleset::default();
    let Some(spec) = pod
        .spec
        .as_ref()
        .filter(|s| s.node_name.as_deref() == Some(&cfg.node))
    else {
        return Ok(rs);
    };
    let pod_ip = pod.status.as_ref().and_then(|s| s.pod_ip.as_deref());
    let Some(pod_ip) = pod_ip.and_then(|ip| ip.parse::<Ipv4Addr>().ok()) else {
        return Ok(rs);
    };
    let object = format!("Pod {ns}/{name}");
    let mut mine = BTreeSet::new();
    for p in cluster::pod_ports(&object, spec)? {
        let Some(host_port) = p.host_port else {
            continue;
        };
        let proto = Proto::parse(Some(&p.protocol)).expect("pod_ports checks the protocol");
        let host_ip = match p.host_ip {
            None => None,
            Some(std::net::IpAddr::V4(ip)) if ip.is_unspecified() => None,
            Some(std::net::IpAddr::V4(ip)) => Some(ip),
            Some(std::net::IpAddr::V6(_)) => continue, // this table is IPv4's
        };
        let key = (proto, host_port);
        if host_ip.is_none() {
            if let Some(other) =
                taken(key).or_else(|| (!mine.insert(key)).then(|| format!("{ns}/{name} itself")))
            {
                return Err(ModelError::new(
                    &object,
                    format!("{}.hostPort", p.path),
                    format!("{host_port}/{} is already used by {other}", proto.as_str()),
                ));
            }
        }
        let port = p.container_port;
        let id = format!("{ns}/{name}:{host_port}/{}", proto.as_str());
        let rules = vec![Rule::MasqIfFrom(pod_ip), Rule::Dnat(pod_ip, port, proto)];
        let chain = chain_name("hp", &id, &rules);
        rs.comments.insert(
            chain.clone(),
            format!(
                "hostPort {host_port}/{} -> {ns}/{name}:{port}",
                proto.as_str()
            ),
        );
        rs.chains.insert(chain.clone(), rules);
        match host_ip {
            Some(ip) => rs.service_ips.insert((ip, proto, host_port), chain),
            None => rs.node_ports.insert(key, chain),
        };
    }
    Ok(rs)
}

fn add_port(rs: &mut Ruleset, cfg: &Config, sp: &SvcPort) {
    let cluster_eps = usable(&sp.endpoints, &cfg.node, sp.internal_local);
    let any_eps = !usable(&sp.endpoints, &cfg.node, false).is_empty();
    let local_eps = usable(&sp.endpoints, &cfg.node, true);
    // Endpoint chains (and their affinity sets), named by what they do.
    let mut all_eps = cluster_eps.clone();
    all_eps.extend(local_eps.iter().copied());
    all_eps.sort();
    all_eps.dedup();
    let mut ep_chains: BTreeMap<&Endpoint, (String, Option<String>)> = BTreeMap::new();
    for e in &all_eps {
        let ep_id = format!("{}/{}:{}", sp.id, e.ip, e.port);
        let mut rules = vec![Rule::MasqIfFrom(e.ip)];
        let set = sp.affinity.map(|t| {
            let set = object_name(AFFINITY, &ep_id, &t.to_string());
            rules.push(Rule::Remember(set.clone(), t));
            rs.sets.insert(set.clone(), t);
            set
        });
        rules.push(Rule::Dnat(e.ip, e.port, sp.proto));
        let name = chain_name("ep", &ep_id, &rules);
        rs.comments
            .insert(name.clone(), format!("{} -> {}:{}", sp.id, e.ip, e.port));
        rs.chains.insert(name.clone(), rules);
        ep_chains.insert(e, (name, set));
    }
    let pick = |eps: &[&Endpoint]| -> Vec<Rule> {
        let mut rules = Vec::new();
        for e in eps {
            if let (chain, Some(set)) = &ep_chains[e] {
                rules.push(Rule::Sticky(set.clone(), chain.clone()));
            }
        }
        rules.push(Rule::Random(
            eps.iter().map(|e| ep_chains[e].0.clone()).collect(),
        ));
        rules
    };
    // The cluster path: ClusterIPs, and pods using external frontends.
    let mut svc_rules = vec![Rule::MasqUnlessFrom(cfg.cluster_cidr)];
    svc_rules.extend(pick(&cluster_eps));
    let svc = chain_name("svc", &sp.id, &svc_rules);
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
        let mut local_rules = pick(&local_eps);
        if local_eps.is_empty() {
            local_rules = vec![Rule::Drop];
        }
        let local = chain_name("local", &sp.id, &local_rules);
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
    let ext = chain_name("ext", &sp.id, &ext_rules);
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
            let mut rules: Vec<Rule> = ranges.into_iter().map(Rule::ReturnIfFrom).collect();
            rules.push(Rule::Drop);
            let fw = chain_name("fw", &format!("{}@{}", sp.id, key.0), &rules);
            rs.comments.insert(
                fw.clone(),
                format!("{} (source ranges of {})", sp.id, key.0),
            );
            rs.chains.insert(fw.clone(), rules);
            rs.firewall.insert(key, fw);
        }
    }
    if let Some(np) = sp.node_port {
        rs.node_ports.insert((sp.proto, np), ext.clone());
    }
    if let Some(hc) = sp.health_check_node_port {
        rs.health_checks.insert(hc, local_eps.len());
    }
}

/// The five verdict maps, in the order a packet meets them.
pub const IP_MAPS: [&str; 3] = ["firewall-ips", "no-endpoint-services", "service-ips"];
pub const PORT_MAPS: [&str; 2] = ["no-endpoint-nodeports", "service-nodeports"];
pub const REJECT_CHAIN: &str = "reject-chain";

/// The fixed part of the table: base chains and helpers every Service shares.
fn fixed_chains() -> String {
    format!(
        "  chain {REJECT_CHAIN} {{
    reject
  }}
  chain filter-prerouting {{
    type filter hook prerouting priority -110; policy accept;
    ct state new ip daddr . meta l4proto . th dport vmap @firewall-ips
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
  chain {MASQUERADE_CHAIN} {{
    meta mark set meta mark | {MASQ_MARK:#x}
  }}
  chain services {{
    ip daddr . meta l4proto . th dport vmap @service-ips
    fib daddr type local meta l4proto . th dport vmap @service-nodeports
  }}
"
    )
}

/// The chains and maps of the fixed part: what the kernel counts in the table besides the
/// per-Service chains and affinity sets.
pub fn fixed_object_count() -> usize {
    fixed_chains()
        .lines()
        .filter(|l| l.starts_with("  chain "))
        .count()
        + IP_MAPS.len()
        + PORT_MAPS.len()
}

/// The table's comment: names the version of the fixed part, so an applier adopts a table
/// only when its fixed part is the one this build writes.
pub fn table_comment() -> String {
    format!("flatnet service proxy {}", hash(&fixed_chains()))
}

fn k3((ip, p, port): &IpKey) -> String {
    format!("{ip} . {} . {port}", p.as_str())
}

fn k2((p, port): &PortKey) -> String {
    format!("{} . {port}", p.as_str())
}

/// A map key of either shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Key {
    Ip(IpKey),
    Port(PortKey),
}

/// One map's changes: its name, keys to delete, then elements (key, chain) to add.
pub type MapChange = (&'static str, Vec<Key>, Vec<(Key, String)>);

/// The changes that turn one ruleset into another, by name (see [`Ruleset`]). An applier sends
/// them in this order, so nothing is ever referred to before it exists or after it is gone:
/// new sets, new chains, map elements, then the chains and sets nothing refers to any more.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Diff {
    pub new_sets: Vec<(String, u32)>,
    /// Name, rules, comment.
    pub new_chains: Vec<(String, Vec<Rule>, Option<String>)>,
    pub maps: Vec<MapChange>,
    pub gone_chains: Vec<String>,
    pub gone_sets: Vec<String>,
}

impl Diff {
    pub fn is_empty(&self) -> bool {
        self.new_sets.is_empty()
            && self.new_chains.is_empty()
            && self.maps.is_empty()
            && self.gone_chains.is_empty()
            && self.gone_sets.is_empty()
    }

    /// Adds the diff of another, disjoint fragment.
    pub fn extend(&mut self, other: Diff) {
        self.new_sets.extend(other.new_sets);
        self.new_chains.extend(other.new_chains);
        self.gone_chains.extend(other.gone_chains);
        self.gone_sets.extend(other.gone_sets);
        for (map, delete, add) in other.maps {
            match self.maps.iter_mut().find(|(m, ..)| *m == map) {
                Some((_, d, a)) => {
                    d.extend(delete);
                    a.extend(add);
                }
                None => self.maps.push((map, delete, add)),
            }
        }
    }

    /// Objects touched (chains, rules, elements, sets): what a sync costs the kernel.
    pub fn size(&self) -> usize {
        self.new_sets.len()
            + self
                .new_chains
                .iter()
                .map(|(_, r, _)| 1 + r.len())
                .sum::<usize>()
            + self
                .maps
                .iter()
                .map(|(_, d, a)| d.len() + a.len())
                .sum::<usize>()
            + self.gone_chains.len()
            + self.gone_sets.len()
    }
}

impl Ruleset {
    /// The NodePorts this ruleset serves or rejects on.
    pub fn claimed_node_ports(&self) -> impl Iterator<Item = &PortKey> {
        self.node_ports.keys().chain(&self.no_endpoint_node_ports)
    }

    /// Adds a disjoint fragment (another Service's) to this ruleset.
    pub fn merge(&mut self, other: Ruleset) {
        self.service_ips.extend(other.service_ips);
        self.node_ports.extend(other.node_ports);
        self.no_endpoints.extend(other.no_endpoints);
        self.no_endpoint_node_ports
            .extend(other.no_endpoint_node_ports);
        self.firewall.extend(other.firewall);
        self.chains.extend(other.chains);
        self.comments.extend(other.comments);
        self.health_checks.extend(other.health_checks);
        self.sets.extend(other.sets);
    }

    /// Every map's elements, keyed as the kernel holds them (target chain by name).
    pub fn map_elements(&self) -> BTreeMap<&'static str, BTreeMap<Key, String>> {
        let ip = |m: &BTreeMap<IpKey, String>| {
            m.iter()
                .map(|(k, c)| (Key::Ip(*k), c.clone()))
                .collect::<BTreeMap<_, _>>()
        };
        let port = |m: &BTreeMap<PortKey, String>| {
            m.iter()
                .map(|(k, c)| (Key::Port(*k), c.clone()))
                .collect::<BTreeMap<_, _>>()
        };
        let reject_ip = self
            .no_endpoints
            .iter()
            .map(|k| (Key::Ip(*k), REJECT_CHAIN.to_string()))
            .collect();
        let reject_port = self
            .no_endpoint_node_ports
            .iter()
            .map(|k| (Key::Port(*k), REJECT_CHAIN.to_string()))
            .collect();
        BTreeMap::from([
            ("firewall-ips", ip(&self.firewall)),
            ("no-endpoint-services", reject_ip),
            ("service-ips", ip(&self.service_ips)),
            ("no-endpoint-nodeports", reject_port),
            ("service-nodeports", port(&self.node_ports)),
        ])
    }

    /// The whole table as one `nft -f` script (created fresh: `add table` + `delete table`
    /// first). What the native applier builds is the same table.
    pub fn render(&self) -> String {
        let mut o = String::new();
        let _ = writeln!(
            o,
            "add table {TABLE}\ndelete table {TABLE}\ntable {TABLE} {{\n  comment {}",
            nft::quote(&table_comment())
        );
        for (name, elements) in self.map_elements() {
            let key_type = if IP_MAPS.contains(&name) {
                "ipv4_addr . inet_proto . inet_service"
            } else {
                "inet_proto . inet_service"
            };
            let _ = writeln!(o, "  map {name} {{\n    type {key_type} : verdict");
            if !elements.is_empty() {
                let list: Vec<String> = elements
                    .iter()
                    .map(|(k, c)| match k {
                        Key::Ip(k) => format!("{} : goto {c}", k3(k)),
                        Key::Port(k) => format!("{} : goto {c}", k2(k)),
                    })
                    .collect();
                let _ = writeln!(
                    o,
                    "    elements = {{\n      {}\n    }}",
                    list.join(",\n      ")
                );
            }
            let _ = writeln!(o, "  }}");
        }
        for (set, t) in &self.sets {
            let _ = writeln!(o, "  set {set} {{\n    type ipv4_addr\n    flags dynamic,timeout\n    timeout {t}s\n  }}");
        }
        o.push_str(&fixed_chains());
        for (name, rules) in &self.chains {
            let _ = writeln!(o, "  chain {name} {{");
            if let Some(c) = self.comments.get(name) {
                let _ = writeln!(o, "    comment {}", nft::quote(c));
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

/// The arms of a uniform random pick over `chains`, one rule each: arm `i` takes the packet
/// with probability 1/(N−i) of what reaches it (`numgen random mod (N−i)` is 0), the last takes
/// the rest; each endpoint ends up with 1/N. Plain rules rather than one `numgen … vmap`, whose
/// anonymous map costs the kernel a walk over every set of the table when it is created.
pub fn random_arms(chains: &[String]) -> impl Iterator<Item = (Option<u32>, &String)> {
    let n = chains.len() as u32;
    chains
        .iter()
        .enumerate()
        .map(move |(i, c)| ((i as u32 + 1 < n).then_some(n - i as u32), c))
}

fn render_rule(r: &Rule) -> String {
    match r {
        Rule::MasqUnlessFrom(c) => format!("ip saddr != {c} jump {MASQUERADE_CHAIN}"),
        Rule::Masq => format!("jump {MASQUERADE_CHAIN}"),
        Rule::MasqIfFrom(ip) => format!("ip saddr {ip} jump {MASQUERADE_CHAIN}"),
        Rule::GotoIfFrom(c, chain) => format!("ip saddr {c} goto {chain}"),
        Rule::Sticky(set, chain) => format!("ip saddr @{set} goto {chain}"),
        Rule::Remember(set, _) => format!("update @{set} {{ ip saddr }}"),
        // Only reachable through a path whose own endpoints are all elsewhere (e.g. internal
        // policy Local with none here): nothing to pick, the packet goes nowhere.
        Rule::Random(chains) if chains.is_empty() => "drop".into(),
        Rule::Random(chains) => random_arms(chains)
            .map(|(modulus, c)| match modulus {
                Some(m) => format!("numgen random mod {m} 0 goto {c}"),
                None => format!("goto {c}"),
            })
            .collect::<Vec<_>>()
            .join("\n    "),
        Rule::Goto(c) => format!("goto {c}"),
        Rule::Dnat(ip, port, p) => format!("meta l4proto {} dnat to {ip}:{port}", p.as_str()),
        Rule::ReturnIfFrom(c) => format!("ip saddr {c} return"),
        Rule::Drop => "drop".into(),
    }
}

/// What turns `old` into `new`. Chains are compared by name only (names hash their rules), so
/// the cost is that of the two rulesets' sizes, and nothing unchanged is sent.
pub fn diff(old: &Ruleset, new: &Ruleset) -> Diff {
    diff_all(old, &[new])
}

/// What turns `old` into the union of `new`'s disjoint fragments (a node's table as its Services'
/// fragments), without merging them into one ruleset first.
pub fn diff_all(old: &Ruleset, new: &[&Ruleset]) -> Diff {
    let mut d = Diff::default();
    let mut wanted_chains: HashSet<&str> = HashSet::new();
    let mut wanted_sets: HashSet<&str> = HashSet::new();
    let mut new_maps: BTreeMap<&'static str, BTreeMap<Key, String>> = BTreeMap::new();
    for f in new {
        for (set, timeout) in &f.sets {
            wanted_sets.insert(set);
            if !old.sets.contains_key(set) {
                d.new_sets.push((set.clone(), *timeout));
            }
        }
        for (name, rules) in &f.chains {
            wanted_chains.insert(name);
            if !old.chains.contains_key(name) {
                d.new_chains
                    .push((name.clone(), rules.clone(), f.comments.get(name).cloned()));
            }
        }
        for (map, elements) in f.map_elements() {
            new_maps.entry(map).or_default().extend(elements);
        }
    }
    d.gone_chains = old
        .chains
        .keys()
        .filter(|n| !wanted_chains.contains(n.as_str()))
        .cloned()
        .collect();
    d.gone_sets = old
        .sets
        .keys()
        .filter(|s| !wanted_sets.contains(s.as_str()))
        .cloned()
        .collect();
    for (map, old_elements) in old.map_elements() {
        let new_elements = new_maps.remove(map).unwrap_or_default();
        let delete: Vec<Key> = old_elements
            .iter()
            .filter(|(k, c)| new_elements.get(*k) != Some(*c))
            .map(|(k, _)| *k)
            .collect();
        let add: Vec<(Key, String)> = new_elements
            .into_iter()
            .filter(|(k, c)| old_elements.get(k) != Some(c))
            .collect();
        if !delete.is_empty() || !add.is_empty() {
            d.maps.push((map, delete, add));
        }
    }
    d
}
