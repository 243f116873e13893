//! The table the planner produces: a [`Ruleset`] (maps, their elements and chains), the diff
//! that turns one into another, and its text as `nft -f` reads it. The applier sends the same
//! objects natively; the tracer walks them.

use crate::model::Proto;
use ipnet::Ipv4Net;
use sha2::{Digest, Sha256};
use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fmt::Write;
use std::net::Ipv4Addr;

pub const TABLE_NAME: &str = "flatnet-proxy";
pub const TABLE: &str = "ip flatnet-proxy";
pub const MASQ_MARK: u32 = nft::MASQUERADE_MARK;
/// The chain that marks a packet for masquerade.
pub const MASQUERADE_CHAIN: &str = "mark-for-masquerade";
pub const REJECT_CHAIN: &str = "reject-chain";
/// The prefix of affinity sets.
pub const AFFINITY: &str = "aff";

/// The five verdict maps, in the order a packet meets them.
pub const IP_MAPS: [&str; 3] = ["firewall-ips", "no-endpoint-services", "service-ips"];
pub const PORT_MAPS: [&str; 2] = ["no-endpoint-nodeports", "service-nodeports"];

/// The endpoint maps: `frontend . index → endpoint address . port`, read by `numgen random mod
/// N`. A frontend is `daddr . l4proto . dport` in the first two, `l4proto . dport` (NodePorts)
/// in the others; `local-` ones hold only this node's endpoints (`externalTrafficPolicy: Local`).
pub const ENDPOINTS: &str = "endpoints";
pub const LOCAL_ENDPOINTS: &str = "local-endpoints";
pub const NODEPORT_ENDPOINTS: &str = "nodeport-endpoints";
pub const NODEPORT_LOCAL_ENDPOINTS: &str = "nodeport-local-endpoints";
pub const ENDPOINT_MAPS: [&str; 4] = [
    ENDPOINTS,
    LOCAL_ENDPOINTS,
    NODEPORT_ENDPOINTS,
    NODEPORT_LOCAL_ENDPOINTS,
];
/// The set of `a . a` pairs: a connection from an address to itself (a pod that reached itself
/// through a Service) is masqueraded at postrouting.
pub const HAIRPIN: &str = "hairpin";

/// The `ledger` map: how many elements each of the [`COUNTED`] sets holds, keyed by its place in
/// that list (the element's comment names it). Every transaction that adds or deletes elements
/// writes the new counts in the same transaction, so an agent that finds, by key, as many
/// elements as the ledger counts knows there are no others, without listing the set — a listing
/// walks the set from its start again for every message it fills.
pub const LEDGER: &str = "ledger";
pub const COUNTED: [&str; 10] = [
    IP_MAPS[0],
    IP_MAPS[1],
    IP_MAPS[2],
    PORT_MAPS[0],
    PORT_MAPS[1],
    ENDPOINTS,
    LOCAL_ENDPOINTS,
    NODEPORT_ENDPOINTS,
    NODEPORT_LOCAL_ENDPOINTS,
    HAIRPIN,
];

/// A set's place in the ledger.
pub fn ledger_index(set: &str) -> Option<usize> {
    COUNTED.iter().position(|s| *s == set)
}

/// Chain kinds by name prefix, referrers before what they refer to (`ext_` goes to `local_` and
/// `svc_`, those to `ep_`; `external-local-` to `cluster-`): the order in which they can be
/// deleted. Per-Service chains have a `_` after their kind, shared ones a `-`.
const CHAIN_KINDS: [&str; 12] = [
    "ext_",
    "local_",
    "svc_",
    "ep_",
    "fw_",
    "hp_",
    "external-local-",
    "nodeport-external-local-",
    "external-",
    "nodeport-external-",
    "cluster-",
    "nodeport-cluster-",
];

/// A planned chain's place in [`CHAIN_KINDS`]; `None` for the table's fixed chains.
pub fn chain_rank(name: &str) -> Option<usize> {
    CHAIN_KINDS.iter().position(|k| name.starts_with(k))
}

/// `daddr . l4proto . dport`
pub type IpKey = (Ipv4Addr, Proto, u16);
/// `l4proto . dport`
pub type PortKey = (Proto, u16);
/// An endpoint's address and port.
pub type Backend = (Ipv4Addr, u16);
/// One frontend's endpoints by index.
pub type Pool = BTreeMap<u32, Backend>;

/// Pools of up to this many endpoints carry their order in their seal (two hex digits each, in
/// the 255 bytes a comment can hold).
const SEAL_ORDER_MAX: usize = 100;

/// A pool's seal, the comment of its element 0: a digest of the whole pool (index, address,
/// port) and, when the order is not the sorted one and the pool is small enough, the order as
/// indices into the sorted endpoints. Every change to a pool rewrites element 0, in the same
/// transaction, so the seal always describes the pool the kernel holds. A restarted agent asks
/// only for element 0 of each pool ([`unseal`]): the rest need not cross netlink.
pub fn seal(pool: &Pool) -> String {
    let mut h = Sha256::new();
    for (i, (ip, port)) in pool {
        h.update(i.to_be_bytes());
        h.update(ip.octets());
        h.update(port.to_be_bytes());
    }
    let mut out = hex(&h.finalize()[..8]);
    let mut sorted: Vec<&Backend> = pool.values().collect();
    sorted.sort();
    let order: Vec<usize> = pool
        .values()
        .map(|b| sorted.binary_search(&b).expect("its own endpoint"))
        .collect();
    let in_order = order.iter().enumerate().all(|(i, o)| i == *o);
    if !in_order && order.len() <= SEAL_ORDER_MAX {
        out.push(' ');
        order.iter().for_each(|o| {
            let _ = write!(out, "{o:02x}");
        });
    }
    out
}

/// The pool that `planned` (the endpoints, in any order) would be if the kernel's pool carries
/// `seal`: `None` when the seal does not vouch for exactly these endpoints.
pub fn unseal(seal_text: &str, planned: &Pool) -> Option<Pool> {
    let mut sorted: Vec<Backend> = planned.values().copied().collect();
    sorted.sort();
    let order: Vec<usize> = match seal_text.split_once(' ') {
        None => (0..sorted.len()).collect(),
        Some((_, hex)) => (0..hex.len())
            .step_by(2)
            .map(|i| usize::from_str_radix(hex.get(i..i + 2)?, 16).ok())
            .collect::<Option<_>>()?,
    };
    if order.len() != sorted.len() {
        return None;
    }
    let pool: Pool = (0u32..)
        .zip(&order)
        .map(|(i, o)| Some((i, *sorted.get(*o)?)))
        .collect::<Option<_>>()?;
    (seal(&pool) == seal_text).then_some(pool)
}

/// A map key of either shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Key {
    Ip(IpKey),
    Port(PortKey),
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Rule {
    /// Mark for masquerade unless the source is inside this CIDR (the cluster).
    MasqUnlessFrom(Ipv4Net),
    /// Mark for masquerade.
    Masq,
    /// Continue in a chain when the source is inside this CIDR.
    GotoIfFrom(Ipv4Net, String),
    /// A client seen within the affinity timeout goes back to the endpoint it had (set name,
    /// endpoint chain).
    Sticky(String, String),
    /// Remember the client in this set (affinity).
    Remember(String, u32),
    /// One of these chains, uniformly at random (see [`random_arms`]).
    Random(Vec<String>),
    /// DNAT to element `numgen random mod N` of the packet's frontend in this endpoint map
    /// (map, N); with N = 0 nothing can be picked: drop.
    Pick(&'static str, u32),
    Goto(String),
    Dnat(Ipv4Addr, u16, Proto),
    /// Leave the chain (the packet goes on) when the source is inside this CIDR.
    ReturnIfFrom(Ipv4Net),
    Drop,
}

/// A node's table, or one Service's share of it (a fragment: see [`crate::plan::plan_service`]).
/// Per-Service chains are named after their content, so two rulesets with a chain of the same
/// name agree on its rules; that makes a diff a matter of names, and lets an applier adopt a
/// table by listing names. Shared chains are named by what they do (`cluster-3`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ruleset {
    pub service_ips: BTreeMap<IpKey, String>,
    pub node_ports: BTreeMap<PortKey, String>,
    pub no_endpoints: BTreeSet<IpKey>,
    pub no_endpoint_node_ports: BTreeSet<PortKey>,
    /// Load-balancer frontends with source ranges → the chain that drops other sources.
    pub firewall: BTreeMap<IpKey, String>,
    /// The endpoint maps' elements: (map, frontend) → index → endpoint.
    pub endpoints: BTreeMap<(&'static str, Key), Pool>,
    /// Frontend → what it serves (`namespace/name:port`, or a hostPort), for explanations.
    pub frontends: BTreeMap<Key, String>,
    /// Addresses masqueraded when they reach themselves (the `hairpin` set): the node part's
    /// (see [`crate::plan::node_part`]).
    pub hairpin: BTreeSet<Ipv4Addr>,
    /// Per-Service chains (affinity, source ranges, hostPorts).
    pub chains: BTreeMap<String, Vec<Rule>>,
    /// Shared chains (one per path and endpoint count) this ruleset's elements go to, by name:
    /// their rules and comments follow from it (see [`Ruleset::chain_rules`]).
    pub shared: BTreeSet<String>,
    /// Per-Service chain → the Service port it belongs to (a comment in the ruleset).
    pub comments: BTreeMap<String, String>,
    /// `healthCheckNodePort` → this node's endpoint count (for `externalTrafficPolicy: Local`).
    pub health_checks: BTreeMap<u16, usize>,
    /// Affinity sets (one per endpoint of a `sessionAffinity: ClientIP` Service) → timeout.
    pub sets: BTreeMap<String, u32>,
    /// Pools found in the kernel whose element 0 does not carry their [`seal`] (an older agent
    /// wrote them): the next diff rewrites that element.
    pub unsealed: BTreeSet<(&'static str, Key)>,
    /// The cluster CIDR that the shared chains test (the node part's). Their names do not say
    /// it, so the table's comment does ([`table_comment`]): a table written for another CIDR
    /// is replaced whole, not adopted.
    pub cluster_cidr: Option<Ipv4Net>,
}

pub(crate) fn hash(s: &str) -> String {
    hex(&Sha256::digest(s.as_bytes())[..5])
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// An endpoint map's key shape: a frontend address or a NodePort.
pub fn keyed_by_ip(map: &str) -> bool {
    map == ENDPOINTS || map == LOCAL_ENDPOINTS
}

/// The declarations of the fixed part: the maps and sets every Service shares.
fn declarations() -> String {
    let mut o = String::new();
    for name in IP_MAPS.iter().chain(&PORT_MAPS) {
        let key = if IP_MAPS.contains(name) {
            "ipv4_addr . inet_proto . inet_service"
        } else {
            "inet_proto . inet_service"
        };
        let _ = writeln!(o, "  map {name} {{\n    type {key} : verdict\n  }}");
    }
    for name in ENDPOINT_MAPS {
        let frontend = if keyed_by_ip(name) {
            "ip daddr . meta l4proto . th dport"
        } else {
            "meta l4proto . th dport"
        };
        let _ = writeln!(
            o,
            "  map {name} {{\n    typeof {frontend} . numgen random mod 1 : ip daddr . th dport\n  }}"
        );
    }
    let _ = writeln!(
        o,
        "  set {HAIRPIN} {{\n    type ipv4_addr . ipv4_addr\n  }}"
    );
    let _ = writeln!(o, "  map {LEDGER} {{\n    type mark : mark\n  }}");
    o
}

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
    ip saddr . ip daddr @{HAIRPIN} jump {MASQUERADE_CHAIN}
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

/// The chains, maps and sets of the fixed part: what the kernel counts in the table besides
/// the planned chains and affinity sets.
pub fn fixed_object_count() -> usize {
    let count = |text: String, prefixes: &[&str]| {
        text.lines()
            .filter(|l| prefixes.iter().any(|p| l.starts_with(p)))
            .count()
    };
    count(fixed_chains(), &["  chain "]) + count(declarations(), &["  map ", "  set "])
}

/// The table's comment: names the version of the fixed part and the cluster CIDR the shared
/// chains test, so an applier adopts a table only when both are the ones it would write.
pub fn table_comment(cluster_cidr: Option<Ipv4Net>) -> String {
    let version = format!(
        "flatnet service proxy {}",
        hash(&(declarations() + &fixed_chains()))
    );
    match cluster_cidr {
        Some(c) => format!("{version}, cluster {c}"),
        None => version,
    }
}

/// The cluster CIDR a table's comment names, if the comment is one this build writes.
pub fn comment_cluster_cidr(comment: &str) -> Option<Option<Ipv4Net>> {
    let rest = comment.strip_prefix(&table_comment(None))?;
    match rest.strip_prefix(", cluster ") {
        Some(c) => Some(Some(c.parse().ok()?)),
        None => rest.is_empty().then_some(None),
    }
}

fn k3((ip, p, port): &IpKey) -> String {
    format!("{ip} . {} . {port}", p.as_str())
}

fn k2((p, port): &PortKey) -> String {
    format!("{} . {port}", p.as_str())
}

fn key_text(k: &Key) -> String {
    match k {
        Key::Ip(k) => k3(k),
        Key::Port(k) => k2(k),
    }
}

/// One verdict map's changes: its name, keys to delete, then elements (key, chain) to add.
pub type MapChange = (&'static str, Vec<Key>, Vec<(Key, String)>);
/// One endpoint map's changes: its name, (frontend, index) to delete, then elements to add.
/// An endpoint map's elements to delete, then to add (element 0 with its pool's [`seal`]).
pub type EndpointChange = (
    &'static str,
    Vec<(Key, u32)>,
    Vec<(Key, u32, Backend, Option<String>)>,
);

/// The changes that turn one ruleset into another, by name (see [`Ruleset`]). An applier sends
/// them in this order, so nothing is ever referred to before it exists or after it is gone:
/// new sets, new chains, map elements, then the chains and sets nothing refers to any more.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Diff {
    pub new_sets: Vec<(String, u32)>,
    /// Name, rules, comment.
    pub new_chains: Vec<(String, Vec<Rule>, Option<String>)>,
    pub maps: Vec<MapChange>,
    pub endpoints: Vec<EndpointChange>,
    /// Hairpin addresses to delete, then to add.
    pub hairpin: (Vec<Ipv4Addr>, Vec<Ipv4Addr>),
    pub gone_chains: Vec<String>,
    pub gone_sets: Vec<String>,
}

/// Adds `delete` and `add` to the change of `name` in `changes`.
fn add_change<D, A>(
    changes: &mut Vec<(&'static str, Vec<D>, Vec<A>)>,
    name: &'static str,
    delete: Vec<D>,
    add: Vec<A>,
) {
    if delete.is_empty() && add.is_empty() {
        return;
    }
    match changes.iter_mut().find(|(m, ..)| *m == name) {
        Some((_, d, a)) => {
            d.extend(delete);
            a.extend(add);
        }
        None => changes.push((name, delete, add)),
    }
}

impl Diff {
    pub fn is_empty(&self) -> bool {
        self.size() == 0
    }

    /// Whether no map or set element is deleted (nothing the kernel holds is replaced).
    pub fn adds_only(&self) -> bool {
        self.endpoints.iter().all(|(_, d, _)| d.is_empty())
            && self.maps.iter().all(|(_, d, _)| d.is_empty())
            && self.hairpin.0.is_empty()
    }

    /// Adds the diff of another, disjoint fragment.
    pub fn extend(&mut self, other: Diff) {
        self.new_sets.extend(other.new_sets);
        self.new_chains.extend(other.new_chains);
        self.gone_chains.extend(other.gone_chains);
        self.gone_sets.extend(other.gone_sets);
        self.hairpin.0.extend(other.hairpin.0);
        self.hairpin.1.extend(other.hairpin.1);
        for (map, delete, add) in other.maps {
            add_change(&mut self.maps, map, delete, add);
        }
        for (map, delete, add) in other.endpoints {
            add_change(&mut self.endpoints, map, delete, add);
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
            + self
                .endpoints
                .iter()
                .map(|(_, d, a)| d.len() + a.len())
                .sum::<usize>()
            + self.hairpin.0.len()
            + self.hairpin.1.len()
            + self.gone_chains.len()
            + self.gone_sets.len()
    }
}

/// `new` (the planner's endpoints in any order) placed so that endpoints `old` already holds
/// keep their index: a change moves only what changed. When the pool shrinks, endpoints beyond
/// its new size move into the holes.
fn keep_positions(new: &Pool, old: &Pool) -> Pool {
    let n = new.len() as u32;
    let wanted: HashSet<&Backend> = new.values().collect();
    let mut out = Pool::new();
    let mut placed: HashSet<&Backend> = HashSet::new();
    for (i, b) in old {
        if *i < n && wanted.contains(b) && placed.insert(b) {
            out.insert(*i, *b);
        }
    }
    let mut rest = new.values().filter(|b| !placed.contains(b));
    for i in 0..n {
        out.entry(i)
            .or_insert_with(|| *rest.next().expect("as many endpoints as holes"));
    }
    out
}

impl Ruleset {
    /// A chain's rules: a per-Service chain's own, a shared chain's from its name and the
    /// cluster CIDR.
    pub fn chain_rules(&self, name: &str) -> Option<Cow<'_, [Rule]>> {
        match self.chains.get(name) {
            Some(rules) => Some(Cow::Borrowed(rules)),
            None => Some(Cow::Owned(self.shared_chain(name)?.0)),
        }
    }

    /// A chain's comment (what it does, or which Service port it serves).
    pub fn chain_comment(&self, name: &str) -> Option<Cow<'_, str>> {
        match self.comments.get(name) {
            Some(c) => Some(Cow::Borrowed(c)),
            None => Some(Cow::Owned(self.shared_chain(name)?.1)),
        }
    }

    fn shared_chain(&self, name: &str) -> Option<(Vec<Rule>, String)> {
        let cidr = self.cluster_cidr.filter(|_| self.shared.contains(name))?;
        crate::plan::shared_chain(name, cidr)
    }

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
        self.endpoints.extend(other.endpoints);
        self.frontends.extend(other.frontends);
        self.hairpin.extend(other.hairpin);
        self.chains.extend(other.chains);
        self.shared.extend(other.shared);
        self.comments.extend(other.comments);
        self.health_checks.extend(other.health_checks);
        self.sets.extend(other.sets);
        self.unsealed.extend(other.unsealed);
        self.cluster_cidr = self.cluster_cidr.or(other.cluster_cidr);
    }

    /// Reorders this ruleset's endpoint pools so that what `old` (the kernel's) holds keeps its
    /// index (see [`keep_positions`]).
    pub fn keep_positions(&mut self, old: &Ruleset) {
        for (key, pool) in &mut self.endpoints {
            if let Some(held) = old.endpoints.get(key) {
                *pool = keep_positions(pool, held);
            }
        }
    }

    /// Verdict map `map`'s elements in this ruleset: key and target chain.
    pub fn verdict_elements(&self, map: &str) -> Vec<(Key, &str)> {
        fn ip(m: &BTreeMap<IpKey, String>) -> Vec<(Key, &str)> {
            m.iter().map(|(k, c)| (Key::Ip(*k), c.as_str())).collect()
        }
        match map {
            "firewall-ips" => ip(&self.firewall),
            "no-endpoint-services" => (self.no_endpoints.iter())
                .map(|k| (Key::Ip(*k), REJECT_CHAIN))
                .collect(),
            "service-ips" => ip(&self.service_ips),
            "no-endpoint-nodeports" => (self.no_endpoint_node_ports.iter())
                .map(|k| (Key::Port(*k), REJECT_CHAIN))
                .collect(),
            "service-nodeports" => (self.node_ports.iter())
                .map(|(k, c)| (Key::Port(*k), c.as_str()))
                .collect(),
            _ => Vec::new(),
        }
    }

    /// Every verdict map's elements, keyed as the kernel holds them (target chain by name).
    pub fn map_elements(&self) -> BTreeMap<&'static str, BTreeMap<Key, String>> {
        (IP_MAPS.iter().chain(&PORT_MAPS))
            .map(|map| {
                let elements = self.verdict_elements(map).into_iter();
                (*map, elements.map(|(k, c)| (k, c.to_string())).collect())
            })
            .collect()
    }

    /// How many elements each of the [`COUNTED`] sets holds: the ledger's content.
    pub fn counts(&self) -> [u32; COUNTED.len()] {
        let mut n = [0u32; COUNTED.len()];
        for map in IP_MAPS.iter().chain(&PORT_MAPS) {
            n[ledger_index(map).expect("counted")] = self.verdict_elements(map).len() as u32;
        }
        for ((map, _), pool) in &self.endpoints {
            n[ledger_index(map).expect("counted")] += pool.len() as u32;
        }
        n[ledger_index(HAIRPIN).expect("counted")] = self.hairpin.len() as u32;
        n
    }

    /// The whole table as one `nft -f` script (created fresh: `add table` + `delete table`
    /// first). What the native applier builds is the same table.
    pub fn render(&self) -> String {
        let mut o = String::new();
        let _ = writeln!(
            o,
            "add table {TABLE}\ndelete table {TABLE}\ntable {TABLE} {{\n  comment {}",
            nft::quote(&table_comment(self.cluster_cidr))
        );
        o.push_str(&declarations());
        for (set, t) in &self.sets {
            let _ = writeln!(o, "  set {set} {{\n    type ipv4_addr\n    flags dynamic,timeout\n    timeout {t}s\n  }}");
        }
        o.push_str(&fixed_chains());
        for name in self.chains.keys().chain(&self.shared) {
            let _ = writeln!(o, "  chain {name} {{");
            if let Some(c) = self.chain_comment(name) {
                let _ = writeln!(o, "    comment {}", nft::quote(&c));
            }
            for r in self.chain_rules(name).unwrap_or_default().iter() {
                let _ = writeln!(o, "    {}", render_rule(r));
            }
            let _ = writeln!(o, "  }}");
        }
        o.push_str("}\n");
        // Elements once every chain they name exists.
        let mut elements: Vec<(&str, Vec<String>)> = Vec::new();
        for (name, list) in self.map_elements() {
            let list = list
                .iter()
                .map(|(k, c)| format!("{} : goto {c}", key_text(k)))
                .collect();
            elements.push((name, list));
        }
        for map in ENDPOINT_MAPS {
            let list = self
                .endpoints
                .iter()
                .filter(|((m, _), _)| *m == map)
                .flat_map(|((_, k), pool)| {
                    let sealed = seal(pool);
                    pool.iter().map(move |(i, (ip, port))| {
                        let comment = match i {
                            0 => format!(" comment {}", nft::quote(&sealed)),
                            _ => String::new(),
                        };
                        format!("{} . {i}{comment} : {ip} . {port}", key_text(k))
                    })
                })
                .collect();
            elements.push((map, list));
        }
        let hairpin = self.hairpin.iter().map(|a| format!("{a} . {a}")).collect();
        elements.push((HAIRPIN, hairpin));
        let ledger = (self.counts().iter().enumerate())
            .filter(|(_, n)| **n > 0)
            .map(|(i, n)| format!("{i} comment {} : {n}", nft::quote(COUNTED[i])))
            .collect();
        elements.push((LEDGER, ledger));
        for (name, list) in elements.into_iter().filter(|(_, l)| !l.is_empty()) {
            let _ = writeln!(
                o,
                "add element {TABLE} {name} {{\n  {}\n}}",
                list.join(",\n  ")
            );
        }
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
        Rule::Pick(_, 0) => "drop".into(),
        Rule::Pick(map, n) => format!(
            "dnat ip to {} . numgen random mod {n} map @{map}",
            if keyed_by_ip(map) {
                "ip daddr . meta l4proto . th dport"
            } else {
                "meta l4proto . th dport"
            }
        ),
        Rule::Goto(c) => format!("goto {c}"),
        Rule::Dnat(ip, port, p) => format!("meta l4proto {} dnat to {ip}:{port}", p.as_str()),
        Rule::ReturnIfFrom(c) => format!("ip saddr {c} return"),
        Rule::Drop => "drop".into(),
    }
}

/// What turns table `old` into table `new`. Chains are compared by name only (names say what
/// they hold), so the cost is that of the two rulesets' sizes, and nothing unchanged is sent.
pub fn diff(old: &Ruleset, new: &Ruleset) -> Diff {
    diff_all(old, &[new])
}

/// What turns table `old` into the union of `new`'s disjoint fragments (a node's table as its
/// Services' fragments), without merging them into one ruleset first.
pub fn diff_all(old: &Ruleset, new: &[&Ruleset]) -> Diff {
    diff_parts(old, new, true)
}

/// What turns fragment `old` into fragment `new` in their own objects, leaving out the shared
/// chains that other fragments may hold too: those are the caller's to count (see
/// [`crate::sync`]).
pub fn diff_own(old: &Ruleset, new: &Ruleset) -> Diff {
    diff_parts(old, &[new], false)
}

fn diff_parts(old: &Ruleset, new: &[&Ruleset], with_shared: bool) -> Diff {
    let mut d = Diff::default();
    let mut wanted_chains: HashSet<&str> = HashSet::new();
    let mut wanted_sets: HashSet<&str> = HashSet::new();
    let mut new_maps: BTreeMap<&'static str, BTreeMap<Key, String>> = BTreeMap::new();
    let mut new_pools: BTreeMap<(&'static str, Key), &Pool> = BTreeMap::new();
    for f in new {
        for (set, timeout) in &f.sets {
            wanted_sets.insert(set);
            if !old.sets.contains_key(set) {
                d.new_sets.push((set.clone(), *timeout));
            }
        }
        let shared = f.shared.iter().filter(|_| with_shared);
        for name in f.chains.keys().chain(shared) {
            let held = old.chains.contains_key(name) || old.shared.contains(name);
            if wanted_chains.insert(name) && !held {
                d.new_chains.push((
                    name.clone(),
                    f.chain_rules(name).unwrap_or_default().into_owned(),
                    f.chain_comment(name).map(Cow::into_owned),
                ));
            }
        }
        for (map, elements) in f.map_elements() {
            new_maps.entry(map).or_default().extend(elements);
        }
        new_pools.extend(f.endpoints.iter().map(|(k, p)| (*k, p)));
    }
    d.gone_chains = old
        .chains
        .keys()
        .chain(old.shared.iter().filter(|_| with_shared))
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
        add_change(&mut d.maps, map, delete, add);
    }
    let empty = Pool::new();
    for ((map, key), held) in &old.endpoints {
        let want = new_pools.remove(&(*map, *key)).unwrap_or(&empty);
        if held == want && !old.unsealed.contains(&(*map, *key)) {
            continue;
        }
        // Element 0 carries the seal: rewritten whenever anything in its pool changes.
        let changed = |i: &u32, b: &Backend, other: &Pool| *i == 0 || other.get(i) != Some(b);
        let delete = held
            .iter()
            .filter(|(i, b)| changed(i, b, want))
            .map(|(i, _)| (*key, *i))
            .collect();
        let add = sealed_elements(*key, want, |i, b| changed(i, b, held));
        add_change(&mut d.endpoints, map, delete, add);
    }
    for ((map, key), want) in new_pools {
        let add = sealed_elements(key, want, |_, _| true);
        add_change(&mut d.endpoints, map, Vec::new(), add);
    }
    let wanted: BTreeSet<Ipv4Addr> = new.iter().flat_map(|f| f.hairpin.iter().copied()).collect();
    d.hairpin = (
        old.hairpin.difference(&wanted).copied().collect(),
        wanted.difference(&old.hairpin).copied().collect(),
    );
    d
}

/// The elements of `pool` that `pick` picks, element 0 with the pool's seal.
fn sealed_elements(
    key: Key,
    pool: &Pool,
    pick: impl Fn(&u32, &Backend) -> bool,
) -> Vec<(Key, u32, Backend, Option<String>)> {
    pool.iter()
        .filter(|(i, b)| pick(i, b))
        .map(|(i, b)| (key, *i, *b, (*i == 0).then(|| seal(pool))))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(ips: &[u8]) -> Pool {
        ips.iter()
            .enumerate()
            .map(|(i, n)| (i as u32, (Ipv4Addr::new(10, 0, 0, *n), 80)))
            .collect()
    }

    #[test]
    fn a_seal_vouches_for_exactly_its_pool_in_its_order() {
        let sorted = pool(&[1, 2, 3, 4]);
        let sealed = seal(&sorted);
        assert!(!sealed.contains(' '), "sorted: no order needed: {sealed}");
        // The planned endpoints come in any order; the seal puts them in the kernel's.
        let planned = pool(&[4, 3, 2, 1]);
        assert_eq!(unseal(&sealed, &planned), Some(sorted.clone()));
        // A pool reordered by a change carries its order.
        let moved = keep_positions(&pool(&[1, 3, 4, 9]), &sorted);
        let sealed = seal(&moved);
        assert_eq!(unseal(&sealed, &pool(&[9, 4, 3, 1])), Some(moved));
        // Other endpoints, one more, one fewer, or a damaged seal: no.
        assert_eq!(unseal(&sealed, &pool(&[1, 3, 4, 8])), None);
        assert_eq!(unseal(&sealed, &pool(&[1, 3, 4, 9, 10])), None);
        assert_eq!(unseal(&sealed, &pool(&[1, 3, 4])), None);
        assert_eq!(unseal(&sealed[1..], &pool(&[1, 3, 4, 9])), None);
        assert_eq!(unseal("", &pool(&[1, 3, 4, 9])), None);
        // Too large to carry its order: a reordered pool is not vouched for (it is read).
        let big: Vec<u8> = (1..=200).collect();
        let mut reordered = pool(&big);
        reordered.insert(0, (Ipv4Addr::new(10, 0, 0, 250), 80));
        let sealed = seal(&reordered);
        assert!(!sealed.contains(' '));
        let mut planned: Vec<u8> = (2..=200).collect();
        planned.push(250);
        assert_eq!(unseal(&sealed, &pool(&planned)), None);
    }

    #[test]
    fn kept_positions_move_only_what_changed() {
        let old = pool(&[1, 2, 3, 4]);
        // 2 replaced by 9: 9 takes its index, nothing else moves.
        let new = keep_positions(&pool(&[1, 3, 4, 9]), &old);
        assert_eq!(new, pool(&[1, 9, 3, 4]));
        // 2 removed: the last one moves into its hole.
        let new = keep_positions(&pool(&[1, 3, 4]), &old);
        assert_eq!(new, pool(&[1, 4, 3]));
        // One added: appended.
        let new = keep_positions(&pool(&[1, 2, 3, 4, 5]), &old);
        assert_eq!(new, pool(&[1, 2, 3, 4, 5]));
    }
}
