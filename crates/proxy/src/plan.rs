//! The service-proxy planner: Services + EndpointSlices + this node's facts → one nftables
//! table (`ip flatnet-proxy`), as a [`Ruleset`] the [`crate::trace`] tracer walks and
//! [`Ruleset::render`] writes out.
//!
//! Design: every lookup a packet makes is a map lookup, whatever the number of Services, and
//! endpoints are data, not rules, so that a change costs the kernel the change and never a walk
//! over the table (a new jump, NAT rule or `goto` element makes nf_tables re-validate every
//! chain it can reach; a data element does not).
//! - `service-ips` maps `daddr . l4proto . dport` of every ClusterIP, external IP and
//!   load-balancer IP to a chain; `service-nodeports` maps `l4proto . dport` on the node's own
//!   addresses. One element per frontend.
//! - The chains are shared, one per path and endpoint count N (`cluster-3`, `external-3`,
//!   `external-local-3-1`, and `nodeport-` ones): the path's masquerade rule, then
//!   `dnat ip to <frontend> . numgen random mod N map @endpoints`, which reads element
//!   `frontend . i` (0 ≤ i < N) of an endpoint map: exactly uniform. A frontend's N elements
//!   keep their index across changes, so replacing an endpoint is one element; only a new
//!   frontend or a new N moves a `goto` element.
//! - Paths: ClusterIPs masquerade clients from outside the cluster CIDR; external frontends
//!   masquerade everyone for `externalTrafficPolicy: Cluster`; for `Local`, pods take the cluster
//!   path and everyone else only this node's endpoints (`local-` maps), unmasqueraded, so the
//!   client address survives.
//! - `sessionAffinity: ClientIP` Services keep chains of their own (`svc_*`, `ep_*`; `ext_*`,
//!   `local_*`): a set of clients with timeouts per endpoint pins each client, and the set goes
//!   with its endpoint. Their changes cost a validation; everyone else's do not.
//! - Hairpin: postrouting masquerades a connection from an address to itself. Only a pod of
//!   this node that reached itself through a Service or hostPort sends such a packet here, so
//!   `hairpin` holds `a . a` for every address of the node's pod CIDR: fixed for the node, never
//!   touched by an endpoint change.
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
use crate::ruleset::{
    hash, Backend, IpKey, Key, Pool, PortKey, Rule, Ruleset, AFFINITY, ENDPOINTS, LOCAL_ENDPOINTS,
    NODEPORT_ENDPOINTS, NODEPORT_LOCAL_ENDPOINTS,
};
use cluster::manifests::namespaced;
use cluster::slim::EndpointSlice;
use cluster::store::slice_service;
use cluster::ModelError;
use ipnet::Ipv4Net;
use k8s_openapi::api::core::v1::{Pod, Service};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::Ipv4Addr;

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

/// Plans the whole table for this node: its [`node_part`] and every Service. Errors name the
/// Service and field (a ClusterIP outside the service CIDR, a NodePort outside the range or
/// taken twice).
pub fn plan(
    cfg: &Config,
    services: &[Service],
    slices: &[EndpointSlice],
) -> Result<Ruleset, ModelError> {
    let mut rs = node_part(cfg);
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
        let addresses = sp
            .cluster_ips
            .iter()
            .chain(&sp.external_ips)
            .chain(&sp.lb_ips);
        let frontends = addresses
            .map(|ip| Key::Ip((*ip, sp.proto, sp.port)))
            .chain(sp.node_port.map(|np| Key::Port((sp.proto, np))));
        for f in frontends {
            rs.frontends.insert(f, sp.id.clone());
        }
    }
    Ok(rs)
}

/// A pod's `hostPort`s, when it runs on this node with an IPv4 address and its own network: each mapping a chain that
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
        // A hostNetwork pod listens on the node's ports itself: nothing to forward.
        .filter(|s| s.host_network != Some(true))
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
        let rules = vec![Rule::Dnat(pod_ip, port, proto)];
        let chain = chain_name("hp", &id, &rules);
        rs.comments.insert(
            chain.clone(),
            format!(
                "hostPort {host_port}/{} -> {ns}/{name}:{port}",
                proto.as_str()
            ),
        );
        rs.chains.insert(chain.clone(), rules);
        let frontend = match host_ip {
            Some(ip) => {
                rs.service_ips.insert((ip, proto, host_port), chain.clone());
                Key::Ip((ip, proto, host_port))
            }
            None => {
                rs.node_ports.insert(key, chain.clone());
                Key::Port(key)
            }
        };
        let comment = rs.comments[&chain].clone();
        rs.frontends.insert(frontend, comment);
    }
    Ok(rs)
}

/// The most addresses of the pod CIDR the `hairpin` set covers (a /16; nodes get a /24 by
/// default).
const HAIRPIN_MAX: u32 = 1 << 16;

/// What the table holds for the node itself rather than for a Service: the `hairpin` pairs of
/// its pod CIDR (the first [`HAIRPIN_MAX`] addresses of a larger one), and the cluster CIDR
/// its table is written for.
pub fn node_part(cfg: &Config) -> Ruleset {
    let first = u32::from(cfg.pod_cidr.network());
    let size = 1u64 << (32 - cfg.pod_cidr.prefix_len());
    Ruleset {
        hairpin: (0..size.min(HAIRPIN_MAX as u64) as u32)
            .map(|i| Ipv4Addr::from(first + i))
            .collect(),
        cluster_cidr: Some(cfg.cluster_cidr),
        ..Ruleset::default()
    }
}

/// A frontend's endpoints by index, each address and port once.
fn pool(eps: &[&Endpoint]) -> Pool {
    let unique: BTreeSet<Backend> = eps.iter().map(|e| (e.ip, e.port)).collect();
    (0..).zip(unique).collect()
}

/// Which frontends a shared chain serves: addresses (`service-ips`) or NodePorts.
#[derive(Clone, Copy)]
enum Frontend {
    Ip,
    NodePort,
}

impl Frontend {
    fn prefix(self) -> &'static str {
        match self {
            Frontend::Ip => "",
            Frontend::NodePort => "nodeport-",
        }
    }
    fn maps(self) -> (&'static str, &'static str) {
        match self {
            Frontend::Ip => (ENDPOINTS, LOCAL_ENDPOINTS),
            Frontend::NodePort => (NODEPORT_ENDPOINTS, NODEPORT_LOCAL_ENDPOINTS),
        }
    }
    fn what(self) -> &'static str {
        match self {
            Frontend::Ip => "Service addresses",
            Frontend::NodePort => "NodePorts",
        }
    }
}

/// A shared chain, as its name says it: which frontends, which path and how many endpoints
/// (`nodeport-external-local-5-2`). What it holds follows from that and the cluster CIDR, so a
/// fragment keeps only its name ([`shared_chain`] gives the rest).
#[derive(Clone, Copy)]
enum SharedChain {
    /// Clients from outside the cluster masqueraded; one of N.
    Cluster(Frontend, u32),
    /// `externalTrafficPolicy: Cluster`: everyone masqueraded; one of N.
    External(Frontend, u32),
    /// `externalTrafficPolicy: Local` with N endpoints, M of them here: pods take the cluster
    /// path, others one of the M, unmasqueraded.
    ExternalLocal(Frontend, u32, u32),
}

impl SharedChain {
    fn frontend(self) -> Frontend {
        match self {
            SharedChain::Cluster(f, _)
            | SharedChain::External(f, _)
            | SharedChain::ExternalLocal(f, ..) => f,
        }
    }

    fn name(self) -> String {
        let prefix = self.frontend().prefix();
        match self {
            SharedChain::Cluster(_, n) => format!("{prefix}cluster-{n}"),
            SharedChain::External(_, n) => format!("{prefix}external-{n}"),
            SharedChain::ExternalLocal(_, n, m) => format!("{prefix}external-local-{n}-{m}"),
        }
    }

    fn parse(name: &str) -> Option<SharedChain> {
        let (f, path) = match name.strip_prefix("nodeport-") {
            Some(rest) => (Frontend::NodePort, rest),
            None => (Frontend::Ip, name),
        };
        // Only the form `name` writes (no sign, no leading zero).
        let count = |s: &str| s.parse::<u32>().ok().filter(|n| n.to_string() == s);
        if let Some(rest) = path.strip_prefix("external-local-") {
            let (n, m) = rest.split_once('-')?;
            Some(SharedChain::ExternalLocal(f, count(n)?, count(m)?))
        } else if let Some(n) = path.strip_prefix("external-") {
            Some(SharedChain::External(f, count(n)?))
        } else {
            Some(SharedChain::Cluster(
                f,
                count(path.strip_prefix("cluster-")?)?,
            ))
        }
    }

    fn rules(self, cluster_cidr: Ipv4Net) -> Vec<Rule> {
        let (map, local_map) = self.frontend().maps();
        match self {
            SharedChain::Cluster(_, n) => {
                vec![Rule::MasqUnlessFrom(cluster_cidr), Rule::Pick(map, n)]
            }
            SharedChain::External(_, n) => vec![Rule::Masq, Rule::Pick(map, n)],
            SharedChain::ExternalLocal(f, n, m) => vec![
                Rule::GotoIfFrom(cluster_cidr, SharedChain::Cluster(f, n).name()),
                Rule::Pick(local_map, m),
            ],
        }
    }

    fn comment(self) -> String {
        let f = self.frontend();
        let (map, local_map) = f.maps();
        match self {
            SharedChain::Cluster(_, n) => format!(
                "{}, cluster path: one of {n} in @{map}; clients from outside the cluster masqueraded",
                f.what()
            ),
            SharedChain::External(_, n) => format!(
                "{}, externalTrafficPolicy Cluster: one of {n} in @{map}, masqueraded",
                f.what()
            ),
            SharedChain::ExternalLocal(_, _, m) => format!(
                "{}, externalTrafficPolicy Local: pods as in-cluster, others one of {m} in @{local_map}, unmasqueraded",
                f.what()
            ),
        }
    }
}

/// A shared chain's rules and comment, from its name and the cluster CIDR; `None` for other
/// names.
pub fn shared_chain(name: &str, cluster_cidr: Ipv4Net) -> Option<(Vec<Rule>, String)> {
    let c = SharedChain::parse(name)?;
    Some((c.rules(cluster_cidr), c.comment()))
}

/// Adds a shared chain to a fragment: its name, and the cluster CIDR its rules test.
fn shared(rs: &mut Ruleset, cfg: &Config, chain: SharedChain) -> String {
    let name = chain.name();
    rs.shared.insert(name.clone());
    rs.cluster_cidr = Some(cfg.cluster_cidr);
    name
}

/// The endpoint maps a shared chain reads, with the number of elements it reads from each
/// (its frontend's pool sizes): what an applier adopting a table expects behind a map element
/// that goes to `chain`. Per-Service chains read none.
pub fn pools_read_by(chain: &str) -> Vec<(&'static str, u32)> {
    let Some(c) = SharedChain::parse(chain) else {
        return Vec::new();
    };
    let (map, local_map) = c.frontend().maps();
    match c {
        SharedChain::Cluster(_, n) | SharedChain::External(_, n) => vec![(map, n)],
        SharedChain::ExternalLocal(_, n, m) => vec![(map, n), (local_map, m)],
    }
}

/// The cluster path for `n` endpoints: clients from outside the cluster are masqueraded.
fn cluster_chain(rs: &mut Ruleset, cfg: &Config, f: Frontend, n: u32) -> String {
    shared(rs, cfg, SharedChain::Cluster(f, n))
}

/// The external path: everyone masqueraded (`Cluster` policy), or (`Local`, with `m` endpoints
/// here) pods on the cluster path and everyone else to this node's endpoints, unmasqueraded.
fn external_chain(
    rs: &mut Ruleset,
    cfg: &Config,
    f: Frontend,
    n: u32,
    local: Option<u32>,
) -> String {
    match local {
        None => shared(rs, cfg, SharedChain::External(f, n)),
        Some(m) => {
            // The chain it goes to for pods is in the table too.
            cluster_chain(rs, cfg, f, n);
            shared(rs, cfg, SharedChain::ExternalLocal(f, n, m))
        }
    }
}

fn add_port(rs: &mut Ruleset, cfg: &Config, sp: &SvcPort) {
    if sp.affinity.is_some() {
        return add_port_with_affinity(rs, cfg, sp);
    }
    let cluster_eps = usable(&sp.endpoints, &cfg.node, sp.internal_local);
    let any_eps = !usable(&sp.endpoints, &cfg.node, false).is_empty();
    let local_eps = usable(&sp.endpoints, &cfg.node, true);
    let (cluster, local) = (pool(&cluster_eps), pool(&local_eps));
    let (n, m) = (cluster.len() as u32, local.len() as u32);
    for ip in &sp.cluster_ips {
        let key = (*ip, sp.proto, sp.port);
        if cluster_eps.is_empty() {
            rs.no_endpoints.insert(key);
        } else {
            let chain = cluster_chain(rs, cfg, Frontend::Ip, n);
            rs.service_ips.insert(key, chain);
            rs.endpoints
                .insert((ENDPOINTS, Key::Ip(key)), cluster.clone());
        }
    }
    let Some(external) = external_path(rs, sp, any_eps) else {
        return;
    };
    let local_count = sp.external_local.then_some(m);
    let frontends = external.iter().map(|k| (Frontend::Ip, Key::Ip(*k))).chain(
        sp.node_port
            .map(|np| (Frontend::NodePort, Key::Port((sp.proto, np)))),
    );
    for (f, key) in frontends {
        let chain = external_chain(rs, cfg, f, n, local_count);
        let (cluster_map, local_map) = f.maps();
        if n > 0 {
            rs.endpoints.insert((cluster_map, key), cluster.clone());
        }
        if sp.external_local && m > 0 {
            rs.endpoints.insert((local_map, key), local.clone());
        }
        match key {
            Key::Ip(k) => {
                rs.service_ips.insert(k, chain);
            }
            Key::Port(k) => {
                rs.node_ports.insert(k, chain);
            }
        }
    }
    add_firewall(rs, cfg, sp, &external);
    if let Some(hc) = sp.health_check_node_port {
        rs.health_checks.insert(hc, local_eps.len());
    }
}

/// The external and load-balancer IPs that take the external path with the NodePort, or `None`
/// when there is nothing more to plan: no such frontend at all, or no usable endpoint anywhere
/// (then they are rejected).
fn external_path(rs: &mut Ruleset, sp: &SvcPort, any_eps: bool) -> Option<Vec<IpKey>> {
    let external: Vec<IpKey> = sp
        .external_ips
        .iter()
        .chain(&sp.lb_ips)
        .map(|ip| (*ip, sp.proto, sp.port))
        .collect();
    if external.is_empty() && sp.node_port.is_none() {
        return None;
    }
    if !any_eps {
        rs.no_endpoints.extend(external);
        rs.no_endpoint_node_ports
            .extend(sp.node_port.map(|np| (sp.proto, np)));
        return None;
    }
    Some(external)
}

/// `loadBalancerSourceRanges`: a chain per load-balancer IP that drops other sources.
fn add_firewall(rs: &mut Ruleset, cfg: &Config, sp: &SvcPort, external: &[IpKey]) {
    if sp.lb_source_ranges.is_empty() {
        return;
    }
    for key in external.iter().filter(|k| sp.lb_ips.contains(&k.0)) {
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
        rs.firewall.insert(*key, fw);
    }
}

/// A `sessionAffinity: ClientIP` Service port: chains of its own, one per endpoint with a set
/// of the clients it had.
fn add_port_with_affinity(rs: &mut Ruleset, cfg: &Config, sp: &SvcPort) {
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
        let mut rules = Vec::new();
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
    let Some(external) = external_path(rs, sp, any_eps) else {
        return;
    };
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
    for key in &external {
        rs.service_ips.insert(*key, ext.clone());
    }
    add_firewall(rs, cfg, sp, &external);
    if let Some(np) = sp.node_port {
        rs.node_ports.insert((sp.proto, np), ext.clone());
    }
    if let Some(hc) = sp.health_check_node_port {
        rs.health_checks.insert(hc, local_eps.len());
    }
}
