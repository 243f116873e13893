//! The policy planner: policies, pods and namespaces → the data of table `ip flatnet-policy`,
//! kept up to date change by change.
//!
//! The table's chains are fixed ([`skeleton`]); everything that depends on the cluster is an
//! element ([`Entry`]) of its sets and maps:
//! - a **group** is the local pods one set of policies selects for a direction (with, for
//!   ingress, the same named ports): most pods of a Deployment share one. `ingress-ids` /
//!   `egress-ids` map each isolated local pod's address to its group's id (a mark value
//!   for the lookups that follow).
//! - a group's allows are keyed by its id: `…-any` (`id . peer`), for peers allowed on every
//!   port; `…-ports` (`id . peer . l4proto . port`); `…-protos` (`id . peer . l4proto`, every
//!   port of a protocol); `…-ranges` (the same fields as ranges, for ipBlocks, and protocols and
//!   `endPort`s of them). A peer pod is its address; an ipBlock minus its excepts is a few
//!   address ranges.
//! - `known-pods` holds this node's pods, `guard` the node's pod CIDR while any policy exists.
//!
//! How it scales: a group's allows are the sum of its policies' contributions, counted (two
//! rules allowing the same peer give one element, kept until both are gone). Each policy's
//! contribution is kept per direction as templates (named ingress ports stay names until a
//! group resolves them on its pods), so
//! - a pod's change (labels, address, ports) is tested against each policy's peers once and
//!   changes the elements of the groups of the policies it enters or leaves;
//! - a namespace's relabelling does that for the pods of the namespace, for the policies with
//!   namespace selectors;
//! - a policy's change recomputes its contribution (its peers among the pods: one namespace's
//!   pods for plain `podSelector` peers) and the groups of this node's pods in its namespace;
//! - elements are sent as a diff: one transaction of the elements that changed.

use crate::engine::{Cluster, Packet};
use crate::model::{namespace_labels, Direction, Key, Namespaces, Peer, PodFacts, Policy, PortRef};
use cluster::store::{Change, Kind, Store};
use cluster::{ModelError, Proto};
use ipnet::Ipv4Net;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use nft::MASQUERADE_MARK;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt::Write;
use std::net::Ipv4Addr;

pub const TABLE_NAME: &str = "flatnet-policy";
/// The table's comment: the version of its fixed part. A table with another is replaced.
pub const VERSION: &str = "flatnet network policy v3";
/// The nflog group denied packets are copied to.
pub const LOG_GROUP: u16 = 4021;

/// An allowed peer, without the group it belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Allow {
    /// A peer address, every protocol and port.
    Any(Ipv4Addr),
    /// A peer address, every port of one protocol (a rule's `protocol` without `port`): a hash
    /// lookup, where the same as a range costs a set of concatenated ranges' walk.
    Proto(Ipv4Addr, u8),
    /// A peer address, one protocol and port.
    Port(Ipv4Addr, u8, u16),
    /// Address, protocol and port ranges, inclusive.
    Range {
        addr: (Ipv4Addr, Ipv4Addr),
        proto: (u8, u8),
        port: (u16, u16),
    },
}

impl Allow {
    fn admits(&self, peer: Ipv4Addr, proto: u8, port: u16) -> bool {
        match *self {
            Allow::Any(a) => a == peer,
            Allow::Proto(a, p) => a == peer && p == proto,
            Allow::Port(a, p, n) => a == peer && p == proto && n == port,
            Allow::Range {
                addr,
                proto: pr,
                port: po,
            } => {
                (addr.0..=addr.1).contains(&peer)
                    && (pr.0..=pr.1).contains(&proto)
                    && (po.0..=po.1).contains(&port)
            }
        }
    }
}

/// One element of the table's sets and maps.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Entry {
    /// `guard`: the node's pod CIDR, while any policy exists.
    Guard(Ipv4Net),
    /// `known-pods`: a pod of this node.
    Known(Ipv4Addr),
    /// `ingress-ids` / `egress-ids`: an isolated local pod's address and its group's id.
    Id(Direction, Ipv4Addr, u32),
    /// A group's allowed peer (`…-any`, `…-protos`, `…-ports` or `…-ranges`).
    Allow(Direction, u32, Allow),
    /// `current-generation`: connections stamped with it were allowed by the rules in force.
    Current(u32),
    /// `generation`: the stamp an allowed connection gets (the same number).
    Stamp(u32),
}

impl Entry {
    /// The set or map the entry belongs to.
    pub fn set(&self) -> &'static str {
        use Direction::*;
        match self {
            Entry::Guard(_) => "guard",
            Entry::Known(_) => "known-pods",
            Entry::Id(Ingress, ..) => "ingress-ids",
            Entry::Id(Egress, ..) => "egress-ids",
            Entry::Allow(Ingress, _, Allow::Any(_)) => "ingress-any",
            Entry::Allow(Egress, _, Allow::Any(_)) => "egress-any",
            Entry::Allow(Ingress, _, Allow::Proto(..)) => "ingress-protos",
            Entry::Allow(Egress, _, Allow::Proto(..)) => "egress-protos",
            Entry::Allow(Ingress, _, Allow::Port(..)) => "ingress-ports",
            Entry::Allow(Egress, _, Allow::Port(..)) => "egress-ports",
            Entry::Allow(Ingress, _, Allow::Range { .. }) => "ingress-ranges",
            Entry::Allow(Egress, _, Allow::Range { .. }) => "egress-ranges",
            Entry::Current(_) => "current-generation",
            Entry::Stamp(_) => "generation",
        }
    }

    /// The element as `nft` writes it.
    pub fn render(&self) -> String {
        let r = |a: Ipv4Addr, b: Ipv4Addr| {
            if a == b {
                a.to_string()
            } else {
                format!("{a}-{b}")
            }
        };
        let n = |a: u32, b: u32| {
            if a == b {
                a.to_string()
            } else {
                format!("{a}-{b}")
            }
        };
        match self {
            Entry::Guard(net) => format!("{net} . 0.0.0.0/0"),
            Entry::Current(g) => format!("{g:#010x} . ip"),
            Entry::Stamp(g) => format!("ip : {g:#010x}"),
            Entry::Known(ip) => ip.to_string(),
            Entry::Id(_, ip, id) => format!("{ip} : {id:#010x}"),
            Entry::Allow(_, id, Allow::Any(ip)) => format!("{id:#010x} . {ip}"),
            Entry::Allow(_, id, Allow::Proto(ip, p)) => format!("{id:#010x} . {ip} . {p}"),
            Entry::Allow(_, id, Allow::Port(ip, p, port)) => {
                format!("{id:#010x} . {ip} . {p} . {port}")
            }
            Entry::Allow(_, id, Allow::Range { addr, proto, port }) => format!(
                "{id:#010x} . {} . {} . {}",
                r(addr.0, addr.1),
                n(proto.0 as u32, proto.1 as u32),
                n(port.0 as u32, port.1 as u32)
            ),
        }
    }
}

/// The sets and maps of the table, with their declarations, in the order [`skeleton`] declares
/// them.
pub const SETS: [(&str, &str); 14] = [
    ("guard", "type ipv4_addr . ipv4_addr; flags interval"),
    ("known-pods", "type ipv4_addr"),
    ("current-generation", "typeof ct mark . meta protocol"),
    ("generation", "typeof meta protocol : ct mark"),
    ("ingress-ids", "type ipv4_addr : mark"),
    ("egress-ids", "type ipv4_addr : mark"),
    ("ingress-any", "type mark . ipv4_addr"),
    ("ingress-protos", "type mark . ipv4_addr . inet_proto"),
    (
        "ingress-ports",
        "type mark . ipv4_addr . inet_proto . inet_service",
    ),
    (
        "ingress-ranges",
        "type mark . ipv4_addr . inet_proto . inet_service; flags interval",
    ),
    ("egress-any", "type mark . ipv4_addr"),
    ("egress-protos", "type mark . ipv4_addr . inet_proto"),
    (
        "egress-ports",
        "type mark . ipv4_addr . inet_proto . inet_service",
    ),
    (
        "egress-ranges",
        "type mark . ipv4_addr . inet_proto . inet_service; flags interval",
    ),
];

/// Sets the packet path fills, never the planner: each pod address denied in a direction,
/// with a counter per element (the agent turns their growth into `…_policy_denied_total`,
/// exactly, where the drop log is rate-limited). An address denied nothing for 10 minutes goes.
pub const DENIED_SETS: [(&str, &str); 2] = [
    ("egress-denied", DENIED_DECLARATION),
    ("ingress-denied", DENIED_DECLARATION),
];
const DENIED_DECLARATION: &str =
    "type ipv4_addr; size 65536; flags dynamic,timeout; timeout 10m; counter";

/// The table with its fixed chains and empty sets, except `guard`, which starts closed
/// (`0.0.0.0/0`): until the first load lands, no forwarded packet of an unknown pod passes.
///
/// A group's id travels from its map lookup to the set lookups in the packet's mark: per
/// packet, so packets of one connection checked at once on several CPUs never see each other's
/// (a connection's `ct mark` would be shared). The mark is given back as it came for the one bit
/// that matters after this hook, the service proxy's masquerade bit, read at postrouting.
pub fn skeleton() -> String {
    let mut o = format!("table ip {TABLE_NAME} {{\n  comment \"{VERSION}\"\n");
    for (name, declaration) in SETS.iter().chain(&DENIED_SETS) {
        let kind = if declaration.contains(" : ") {
            "map"
        } else {
            "set"
        };
        let _ = writeln!(o, "  {kind} {name} {{");
        for line in declaration.split("; ") {
            let _ = writeln!(o, "    {line}");
        }
        if *name == "guard" {
            o.push_str("    elements = { 0.0.0.0/0 . 0.0.0.0/0 }\n");
        }
        o.push_str("  }\n");
    }
    let _ = write!(
        o,
        r#"  chain forward {{
    type filter hook forward priority filter; policy accept;
    ct state related accept
    ct direction reply accept
    ct state invalid drop
    ct mark . meta protocol @current-generation accept
    ip saddr . ip daddr @guard ip saddr != @known-pods goto unknown-pod
    ip daddr . ip saddr @guard ip daddr != @known-pods goto unknown-pod
    meta mark & {MASQUERADE_MARK:#010x} == {MASQUERADE_MARK:#010x} goto masqueraded
    jump check
    meta mark set 0x00000000
  }}
  chain masqueraded {{
    jump check
    meta mark set {MASQUERADE_MARK:#010x}
  }}
  chain check {{
    meta mark set ip saddr map @egress-ids jump egress
    meta mark set ip daddr map @ingress-ids jump ingress
    ct mark set meta protocol map @generation
  }}
  chain egress {{
    meta mark . ip daddr @egress-any return
    meta mark . ip daddr . meta l4proto . th dport @egress-ports return
    meta mark . ip daddr . meta l4proto @egress-protos return
    meta mark . ip daddr . meta l4proto . th dport @egress-ranges return
    update @egress-denied {{ ip saddr }}
    limit rate 20/second burst 50 packets log prefix "egress " group {LOG_GROUP}
    goto deny
  }}
  chain ingress {{
    meta mark . ip saddr @ingress-any return
    meta mark . ip saddr . meta l4proto . th dport @ingress-ports return
    meta mark . ip saddr . meta l4proto @ingress-protos return
    meta mark . ip saddr . meta l4proto . th dport @ingress-ranges return
    update @ingress-denied {{ ip daddr }}
    limit rate 20/second burst 50 packets log prefix "ingress " group {LOG_GROUP}
    goto deny
  }}
  chain unknown-pod {{
    limit rate 20/second burst 50 packets log prefix "unknown-pod " group {LOG_GROUP}
    drop
  }}
  chain deny {{
    meta l4proto tcp reject with tcp reset
    reject with icmp type admin-prohibited
  }}
}}
"#
    );
    o
}

/// A policy's contribution before a group resolves it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Template {
    Allow(Allow),
    /// An ingress rule's named port: a number only on a destination pod.
    Named {
        addr: (Ipv4Addr, Ipv4Addr),
        proto: Proto,
        name: String,
    },
}

/// Changes to a policy's contribution: templates and how many more (or fewer) of each.
type Delta = Vec<(Template, i32)>;

/// Container ports by name, for resolving named ingress ports.
type Resolver = Vec<(String, Proto, u16)>;
/// A group: the policies selecting its pods (sorted) and, for ingress, the pods' named ports.
type GroupKey = (Vec<Key>, Resolver);

#[derive(Debug, Default)]
struct Group {
    id: u32,
    members: usize,
    /// Every allow of its policies, counted.
    allows: HashMap<Allow, u32>,
    /// The range allows as the kernel holds them: made disjoint ([`disjoint`]).
    ranges: BTreeSet<Allow>,
}

fn is_range(a: &Allow) -> bool {
    matches!(a, Allow::Range { .. })
}

/// The union of range allows as ranges that do not overlap, adjacent ones merged: the kernel's
/// set of concatenated ranges refuses an element that overlaps another, while rules and policies
/// overlap freely (an ipBlock and its except-less twin, two `endPort`s). Cut along addresses,
/// then protocols; ports are merged per cell.
fn disjoint<'a>(ranges: impl Iterator<Item = &'a Allow>) -> BTreeSet<Allow> {
    type Cell = ((u8, u8), (u16, u16));
    let boxes: Vec<((u32, u32), Cell)> = ranges
        .filter_map(|a| match a {
            Allow::Range { addr, proto, port } => {
                Some(((u32::from(addr.0), u32::from(addr.1)), (*proto, *port)))
            }
            _ => None,
        })
        .collect();
    /// Cuts `[lo, hi]` intervals at every start and end: the elementary intervals.
    fn cuts(bounds: impl Iterator<Item = (u64, u64)>) -> Vec<u64> {
        let mut xs: Vec<u64> = bounds.flat_map(|(a, b)| [a, b + 1]).collect();
        xs.sort_unstable();
        xs.dedup();
        xs
    }
    /// Protocol and port cells covering a set of (protocol, port) boxes, disjoint.
    fn cells(boxes: &[Cell]) -> Vec<Cell> {
        let xs = cuts(boxes.iter().map(|((a, b), _)| (*a as u64, *b as u64)));
        let mut out: Vec<Cell> = Vec::new();
        for w in xs.windows(2) {
            let (lo, hi) = (w[0], w[1] - 1);
            let mut ports: Vec<(u16, u16)> = boxes
                .iter()
                .filter(|((a, b), _)| (*a as u64) <= lo && (*b as u64) >= hi)
                .map(|(_, p)| *p)
                .collect();
            ports.sort_unstable();
            let mut merged: Vec<(u16, u16)> = Vec::new();
            for (a, b) in ports {
                match merged.last_mut() {
                    Some(last) if a as u32 <= last.1 as u32 + 1 => last.1 = last.1.max(b),
                    _ => merged.push((a, b)),
                }
            }
            for port in merged {
                // A cell that continues the previous protocols' identical port range grows.
                match out
                    .iter_mut()
                    .find(|(p, q)| *q == port && p.1 as u64 + 1 == lo)
                {
                    Some(c) => c.0 .1 = hi as u8,
                    None => out.push(((lo as u8, hi as u8), port)),
                }
            }
        }
        out.sort_unstable();
        out
    }
    let xs = cuts(boxes.iter().map(|((a, b), _)| (*a as u64, *b as u64)));
    let mut out = BTreeSet::new();
    let mut open: Option<(u64, u64, Vec<Cell>)> = None;
    let close = |o: Option<(u64, u64, Vec<Cell>)>, out: &mut BTreeSet<Allow>| {
        if let Some((lo, hi, cs)) = o {
            for (proto, port) in cs {
                out.insert(Allow::Range {
                    addr: (Ipv4Addr::from(lo as u32), Ipv4Addr::from(hi as u32)),
                    proto,
                    port,
                });
            }
        }
    };
    for w in xs.windows(2) {
        let (lo, hi) = (w[0], w[1] - 1);
        let covering: Vec<Cell> = boxes
            .iter()
            .filter(|((a, b), _)| (*a as u64) <= lo && (*b as u64) >= hi)
            .map(|(_, c)| *c)
            .collect();
        let cs = cells(&covering);
        match &mut open {
            Some((_, end, prev)) if *prev == cs && *end + 1 == lo => *end = hi,
            _ => {
                close(open.take(), &mut out);
                if !cs.is_empty() {
                    open = Some((lo, hi, cs));
                }
            }
        }
    }
    close(open, &mut out);
    out
}

#[derive(Debug, Default)]
struct Groups {
    by_key: HashMap<GroupKey, Group>,
    /// Each isolated local pod's group and address.
    member: HashMap<Key, (GroupKey, Ipv4Addr)>,
    of_policy: HashMap<Key, HashSet<GroupKey>>,
    free: Vec<u32>,
    next: u32,
}

/// The planner: the cluster's policy facts and the table's data, with the changes not yet
/// taken by the applier.
#[derive(Debug, Default)]
pub struct Planner {
    pub cluster: Cluster,
    node: String,
    pod_cidr: Option<Ipv4Net>,
    contrib: HashMap<(Key, Direction), HashMap<Template, u32>>,
    groups: [Groups; 2],
    /// Refused policies (their last good version, if any, stays in force).
    pub errors: BTreeMap<Key, ModelError>,
    pending: HashMap<Entry, i32>,
    /// Groups whose range allows changed since their ranges were last made disjoint.
    dirty: HashSet<(Direction, GroupKey)>,
    /// The generation of the rules in force: every change starts a new one.
    generation: u32,
}

fn di(d: Direction) -> usize {
    d as usize
}

const EVERYWHERE: (Ipv4Addr, Ipv4Addr) = (Ipv4Addr::UNSPECIFIED, Ipv4Addr::BROADCAST);

/// The allow for an address span and one port spec (`None`: the rule names no ports).
fn allow(addr: (Ipv4Addr, Ipv4Addr), proto: Option<Proto>, ports: (u16, u16)) -> Allow {
    let single = addr.0 == addr.1;
    match proto {
        None if single => Allow::Any(addr.0),
        None => Allow::Range {
            addr,
            proto: (0, 255),
            port: (0, 65535),
        },
        Some(p) if single && ports.0 == ports.1 => Allow::Port(addr.0, p.number(), ports.0),
        Some(p) if single && ports == (0, 65535) => Allow::Proto(addr.0, p.number()),
        Some(p) => Allow::Range {
            addr,
            proto: (p.number(), p.number()),
            port: ports,
        },
    }
}

fn resolve(t: &Template, resolver: &Resolver) -> Option<Allow> {
    match t {
        Template::Allow(a) => Some(*a),
        Template::Named { addr, proto, name } => resolver
            .iter()
            .find(|(n, p, _)| n == name && p == proto)
            .map(|(_, p, port)| allow(*addr, Some(*p), (*port, *port))),
    }
}

/// What one rule gives for a peer span: one template per port spec (all ports when none).
/// `destination` resolves egress named ports (the peer pod); ingress ones stay named.
fn expand(
    d: Direction,
    addr: (Ipv4Addr, Ipv4Addr),
    rule: &crate::model::Rule,
    destination: Option<&PodFacts>,
    out: &mut Vec<Template>,
) {
    if rule.ports.is_empty() {
        out.push(Template::Allow(allow(addr, None, (0, 0))));
        return;
    }
    for m in &rule.ports {
        match &m.port {
            PortRef::All => out.push(Template::Allow(allow(addr, Some(m.proto), (0, 65535)))),
            PortRef::Range(a, b) => out.push(Template::Allow(allow(addr, Some(m.proto), (*a, *b)))),
            PortRef::Named(name) => match d {
                Direction::Ingress => out.push(Template::Named {
                    addr,
                    proto: m.proto,
                    name: name.clone(),
                }),
                Direction::Egress => {
                    if let Some(n) = destination.and_then(|q| q.named_port(name, m.proto)) {
                        out.push(Template::Allow(allow(addr, Some(m.proto), (n, n))));
                    }
                }
            },
        }
    }
}

fn has_named(rule: &crate::model::Rule) -> bool {
    rule.ports
        .iter()
        .any(|m| matches!(m.port, PortRef::Named(_)))
}

/// The templates a policy's rules give without looking at pods: ipBlocks and "every peer".
fn static_templates(p: &Policy, d: Direction) -> Vec<Template> {
    let mut out = Vec::new();
    for rule in p.rules(d).into_iter().flatten() {
        let spans: Vec<(Ipv4Addr, Ipv4Addr)> = match &rule.peers {
            None => vec![EVERYWHERE],
            Some(peers) => peers
                .iter()
                .flat_map(|x| match x {
                    Peer::Block { cidr, except } => Peer::ranges(*cidr, except),
                    Peer::Pods { .. } => Vec::new(),
                })
                .collect(),
        };
        for span in spans {
            // Egress named ports exist only on pods: those come from `pod_templates`.
            expand(d, span, rule, None, &mut out);
        }
    }
    out
}

/// The templates pod `q` gives a policy as a peer.
fn pod_templates(c: &Cluster, p: &Policy, d: Direction, q: &PodFacts) -> Vec<Template> {
    let mut out = Vec::new();
    let Some(ip) = q.ip.filter(|_| !q.host_network) else {
        return out;
    };
    for rule in p.rules(d).into_iter().flatten() {
        let by_selector = rule
            .peers
            .iter()
            .flatten()
            .any(|x| c.selector_peer_matches(x, q));
        if by_selector {
            expand(d, (ip, ip), rule, Some(q), &mut out);
        } else if d == Direction::Egress && has_named(rule) {
            // A named port to an ipBlock or to everyone: only pods have names for ports.
            let covered = match &rule.peers {
                None => true,
                Some(peers) => peers.iter().any(|x| match x {
                    Peer::Block { cidr, except } => Peer::block_contains(cidr, except, ip),
                    Peer::Pods { .. } => false,
                }),
            };
            if covered {
                let named_only = crate::model::Rule {
                    peers: None,
                    ports: rule
                        .ports
                        .iter()
                        .filter(|m| matches!(m.port, PortRef::Named(_)))
                        .cloned()
                        .collect(),
                };
                expand(d, (ip, ip), &named_only, Some(q), &mut out);
            }
        }
    }
    out
}

/// Which namespaces' pods can be `p`'s peers in `d`.
enum Reach<'a> {
    /// Every pod (egress named ports to an ipBlock or to everyone).
    All,
    /// The policy's own namespace and those the selectors match.
    Namespaces(Vec<&'a crate::model::Selector>),
}

fn reach(p: &Policy, d: Direction) -> Reach<'_> {
    let mut selectors = Vec::new();
    for r in p.rules(d).into_iter().flatten() {
        match &r.peers {
            None if d == Direction::Egress && has_named(r) => return Reach::All,
            None => {}
            Some(peers) => {
                for x in peers {
                    match x {
                        Peer::Pods {
                            namespaces: Namespaces::Matching(s),
                            ..
                        } => selectors.push(s),
                        Peer::Block { .. } if d == Direction::Egress && has_named(r) => {
                            return Reach::All
                        }
                        _ => {}
                    }
                }
            }
        }
    }
    Reach::Namespaces(selectors)
}

fn uses_namespace_labels(p: &Policy) -> bool {
    Direction::BOTH.into_iter().any(|d| {
        p.rules(d).into_iter().flatten().any(|r| {
            r.peers.iter().flatten().any(|x| {
                matches!(
                    x,
                    Peer::Pods {
                        namespaces: Namespaces::Matching(_),
                        ..
                    }
                )
            })
        })
    })
}

fn count(map: &mut HashMap<Template, u32>, t: Template, n: i32) {
    let e = map.entry(t.clone()).or_insert(0);
    *e = (*e as i64 + n as i64) as u32;
    if *e == 0 {
        map.remove(&t);
    }
}

impl Planner {
    pub fn new(node: &str, pod_cidr: Option<Ipv4Net>) -> Planner {
        // Another agent's generations mean nothing to this one: starting from the clock, a
        // restarted agent re-checks every connection once.
        let clock = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.subsec_nanos() ^ d.as_secs() as u32);
        Planner {
            node: node.to_string(),
            pod_cidr,
            generation: clock.max(1),
            ..Planner::default()
        }
    }

    fn is_local(&self, p: &PodFacts) -> bool {
        p.node.as_deref() == Some(self.node.as_str()) && !p.host_network && p.ip.is_some()
    }

    fn mark(&mut self, e: Entry, n: i32) {
        let v = self.pending.entry(e.clone()).or_insert(0);
        *v += n;
        if *v == 0 {
            self.pending.remove(&e);
        }
    }

    /// The node's pod CIDR (for `guard`); `None` until the node has one.
    pub fn set_pod_cidr(&mut self, cidr: Option<Ipv4Net>) {
        let before = self.guard();
        self.pod_cidr = cidr;
        self.update_guard(before);
    }

    fn guard(&self) -> Option<Ipv4Net> {
        self.pod_cidr.filter(|_| !self.cluster.policies.is_empty())
    }

    fn update_guard(&mut self, before: Option<Ipv4Net>) {
        let now = self.guard();
        if before != now {
            if let Some(g) = before {
                self.mark(Entry::Guard(g), -1);
            }
            if let Some(g) = now {
                self.mark(Entry::Guard(g), 1);
            }
        }
    }

    /// Takes every Namespace, Pod and NetworkPolicy of `store`.
    pub fn take_store(&mut self, store: &Store) {
        for ns in store.list::<Namespace>() {
            self.namespace_changed(ns.metadata.name.as_deref().unwrap_or(""), Some(ns));
        }
        for p in store.list::<Pod>() {
            let f = PodFacts::from_pod(p);
            let key = cluster::manifests::namespaced(&p.metadata);
            self.pod_changed(&key, f);
        }
        for np in store.list::<NetworkPolicy>() {
            self.policy_changed(&cluster::manifests::namespaced(&np.metadata), Some(np));
        }
    }

    /// Takes what `changes` did to Namespaces, Pods and NetworkPolicies.
    pub fn take_changes(&mut self, changes: &[Change]) {
        for c in changes {
            match c.kind {
                Kind::Namespace => self.namespace_changed(&c.key.1, c.new_as::<Namespace>()),
                Kind::Pod => {
                    self.pod_changed(&c.key, c.new_as::<Pod>().and_then(PodFacts::from_pod))
                }
                Kind::NetworkPolicy => self.policy_changed(&c.key, c.new_as::<NetworkPolicy>()),
                _ => {}
            }
        }
    }

    /// A pod added, changed (`Some`) or gone (`None`).
    pub fn pod_changed(&mut self, key: &Key, new: Option<PodFacts>) {
        let old = self.cluster.pods.get(key).cloned();
        if old == new {
            return;
        }
        let c = &self.cluster;
        let deltas: Vec<(Key, Direction, Delta)> = c
            .policies
            .values()
            .flat_map(|p| Direction::BOTH.map(|d| (p, d)))
            .filter(|(p, d)| p.rules(*d).is_some())
            .filter_map(|(p, d)| {
                let of = |q: &Option<PodFacts>| {
                    q.as_ref()
                        .map(|q| pod_templates(c, p, d, q))
                        .unwrap_or_default()
                };
                let (before, after) = (of(&old), of(&new));
                (before != after).then(|| {
                    let delta = before.into_iter().map(|t| (t, -1));
                    (
                        p.key(),
                        d,
                        delta.chain(after.into_iter().map(|t| (t, 1))).collect(),
                    )
                })
            })
            .collect();
        for (k, d, delta) in deltas {
            self.contribute(&k, d, delta);
        }
        let was_local = old.as_ref().is_some_and(|p| self.is_local(p));
        self.cluster.set_pod(key, new.clone());
        let local = new.as_ref().is_some_and(|p| self.is_local(p));
        if was_local {
            self.mark(
                Entry::Known(
                    old.as_ref()
                        .and_then(|p| p.ip)
                        .expect("local pods have an address"),
                ),
                -1,
            );
        }
        if local {
            self.mark(
                Entry::Known(
                    new.as_ref()
                        .and_then(|p| p.ip)
                        .expect("local pods have an address"),
                ),
                1,
            );
        }
        if was_local || local {
            self.regroup(key);
        }
    }

    /// A namespace added, relabelled or gone.
    pub fn namespace_changed(&mut self, name: &str, ns: Option<&Namespace>) {
        let labels = ns.map(|n| namespace_labels(n).1);
        if self.cluster.namespaces.get(name) == labels.as_ref() {
            return;
        }
        let policies: Vec<Policy> = self
            .cluster
            .policies
            .values()
            .filter(|p| uses_namespace_labels(p))
            .cloned()
            .collect();
        let pods: Vec<PodFacts> = self.cluster.pods_in(name).cloned().collect();
        let templates = |c: &Cluster| -> Vec<Vec<Template>> {
            policies
                .iter()
                .flat_map(|p| Direction::BOTH.map(|d| (p, d)))
                .map(|(p, d)| {
                    pods.iter()
                        .flat_map(|q| pod_templates(c, p, d, q))
                        .collect()
                })
                .collect()
        };
        let before = templates(&self.cluster);
        match labels {
            Some(l) => self.cluster.namespaces.insert(name.to_string(), l),
            None => self.cluster.namespaces.remove(name),
        };
        let after = templates(&self.cluster);
        let keys: Vec<(Key, Direction)> = policies
            .iter()
            .flat_map(|p| Direction::BOTH.map(|d| (p.key(), d)))
            .collect();
        for ((k, d), (b, a)) in keys.into_iter().zip(before.into_iter().zip(after)) {
            if b != a {
                let delta = b
                    .into_iter()
                    .map(|t| (t, -1))
                    .chain(a.into_iter().map(|t| (t, 1)));
                self.contribute(&k, d, delta.collect());
            }
        }
    }

    /// A policy added, changed or gone. A policy that does not check out is refused: its
    /// last good version (or nothing) stays in force, and the error is kept in `errors`.
    pub fn policy_changed(&mut self, key: &Key, np: Option<&NetworkPolicy>) {
        let new = match np.map(Policy::parse) {
            None => None,
            Some(Ok(p)) => Some(p),
            Some(Err(e)) => {
                self.errors.insert(key.clone(), e);
                return;
            }
        };
        self.errors.remove(key);
        if self.cluster.policies.get(key) == new.as_ref() {
            return;
        }
        let guard_before = self.guard();
        for d in Direction::BOTH {
            let before: Vec<(Template, i32)> = self
                .contrib
                .get(&(key.clone(), d))
                .map(|m| m.iter().map(|(t, n)| (t.clone(), -(*n as i32))).collect())
                .unwrap_or_default();
            let after: Vec<(Template, i32)> = match &new {
                Some(p) if p.rules(d).is_some() => self
                    .full_contribution(p, d)
                    .into_iter()
                    .map(|t| (t, 1))
                    .collect(),
                _ => Vec::new(),
            };
            let mut delta = before;
            delta.extend(after);
            self.contribute(key, d, delta);
        }
        match new {
            Some(p) => self.cluster.policies.insert(key.clone(), p),
            None => self.cluster.policies.remove(key),
        };
        self.update_guard(guard_before);
        let local: Vec<Key> = self
            .cluster
            .pods_in(&key.0)
            .filter(|p| self.is_local(p))
            .map(|p| p.key())
            .collect();
        for pod in local {
            self.regroup(&pod);
        }
    }

    fn full_contribution(&self, p: &Policy, d: Direction) -> Vec<Template> {
        let mut out = static_templates(p, d);
        let c = &self.cluster;
        match reach(p, d) {
            Reach::All => {
                for q in c.pods.values() {
                    out.extend(pod_templates(c, p, d, q));
                }
            }
            // Namespaces first: a namespace selector rules out whole namespaces at once.
            Reach::Namespaces(selectors) => {
                for ns in c.by_namespace.keys() {
                    let labels = c.namespace_labels(ns);
                    if *ns == p.namespace || selectors.iter().any(|s| s.matches(&labels)) {
                        for q in c.pods_in(ns) {
                            out.extend(pod_templates(c, p, d, q));
                        }
                    }
                }
            }
        }
        out
    }

    /// Adds `delta` to a policy's contribution and to the groups it is part of.
    fn contribute(&mut self, policy: &Key, d: Direction, delta: Vec<(Template, i32)>) {
        let mut net: HashMap<Template, i32> = HashMap::new();
        for (t, n) in delta {
            *net.entry(t).or_insert(0) += n;
        }
        net.retain(|_, n| *n != 0);
        if net.is_empty() {
            return;
        }
        let c = self.contrib.entry((policy.clone(), d)).or_default();
        for (t, n) in &net {
            count(c, t.clone(), *n);
        }
        if c.is_empty() {
            self.contrib.remove(&(policy.clone(), d));
        }
        let g = &self.groups[di(d)];
        let keys: Vec<GroupKey> = g
            .of_policy
            .get(policy)
            .into_iter()
            .flatten()
            .cloned()
            .collect();
        for gk in keys {
            let mut changes = Vec::new();
            let mut ranges_changed = false;
            let group = self.groups[di(d)]
                .by_key
                .get_mut(&gk)
                .expect("indexed group");
            for (t, n) in &net {
                if let Some(a) = resolve(t, &gk.1) {
                    let e = group.allows.entry(a).or_insert(0);
                    let before = *e;
                    *e = (*e as i64 + *n as i64) as u32;
                    let after = *e;
                    if after == 0 {
                        group.allows.remove(&a);
                    }
                    let n = match (before, after) {
                        (0, x) if x > 0 => 1,
                        (x, 0) if x > 0 => -1,
                        _ => continue,
                    };
                    if is_range(&a) {
                        ranges_changed = true;
                    } else {
                        changes.push((Entry::Allow(d, group.id, a), n));
                    }
                }
            }
            for (e, n) in changes {
                self.mark(e, n);
            }
            if ranges_changed {
                self.dirty.insert((d, gk));
            }
        }
    }

    /// The group a local pod belongs to in `d` (`None`: not isolated).
    fn group_key(&self, pod: &PodFacts, d: Direction) -> Option<GroupKey> {
        let lo = (pod.namespace.clone(), String::new());
        let policies: Vec<&Policy> = self
            .cluster
            .policies
            .range(lo..)
            .take_while(|(k, _)| k.0 == pod.namespace)
            .map(|(_, p)| p)
            .filter(|p| p.rules(d).is_some() && p.selects(pod))
            .collect();
        if policies.is_empty() {
            return None;
        }
        let named = d == Direction::Ingress
            && policies
                .iter()
                .any(|p| p.rules(d).into_iter().flatten().any(has_named));
        let mut resolver = if named { pod.ports.clone() } else { Vec::new() };
        resolver.sort();
        Some((policies.iter().map(|p| p.key()).collect(), resolver))
    }

    /// Moves a local pod to the groups it now belongs to.
    fn regroup(&mut self, key: &Key) {
        let pod = self
            .cluster
            .pods
            .get(key)
            .filter(|p| self.is_local(p))
            .cloned();
        for d in Direction::BOTH {
            let want = pod
                .as_ref()
                .and_then(|p| Some((self.group_key(p, d)?, p.ip?)));
            let have = self.groups[di(d)].member.get(key).cloned();
            if want == have {
                continue;
            }
            if let Some((gk, ip)) = have {
                self.leave(d, key, &gk, ip);
            }
            if let Some((gk, ip)) = want {
                self.join(d, key, gk, ip);
            }
        }
    }

    fn leave(&mut self, d: Direction, pod: &Key, gk: &GroupKey, ip: Ipv4Addr) {
        let g = &mut self.groups[di(d)];
        g.member.remove(pod);
        let group = g.by_key.get_mut(gk).expect("member of a group");
        let id = group.id;
        group.members -= 1;
        let mut changes = vec![(Entry::Id(d, ip, id), -1)];
        if group.members == 0 {
            let group = g.by_key.remove(gk).expect("group");
            let kept = group.allows.keys().filter(|a| !is_range(a));
            for a in kept.chain(&group.ranges) {
                changes.push((Entry::Allow(d, id, *a), -1));
            }
            self.dirty.remove(&(d, gk.clone()));
            for p in &gk.0 {
                if let Some(set) = g.of_policy.get_mut(p) {
                    set.remove(gk);
                    if set.is_empty() {
                        g.of_policy.remove(p);
                    }
                }
            }
            g.free.push(id);
        }
        for (e, n) in changes {
            self.mark(e, n);
        }
    }

    fn join(&mut self, d: Direction, pod: &Key, gk: GroupKey, ip: Ipv4Addr) {
        let mut changes = Vec::new();
        if !self.groups[di(d)].by_key.contains_key(&gk) {
            let mut allows: HashMap<Allow, u32> = HashMap::new();
            for p in &gk.0 {
                for (t, n) in self.contrib.get(&(p.clone(), d)).into_iter().flatten() {
                    if let Some(a) = resolve(t, &gk.1) {
                        *allows.entry(a).or_insert(0) += n;
                    }
                }
            }
            let g = &mut self.groups[di(d)];
            let id = g.free.pop().unwrap_or_else(|| {
                g.next += 1;
                g.next
            });
            let ranges = disjoint(allows.keys());
            for a in allows.keys().filter(|a| !is_range(a)).chain(&ranges) {
                changes.push((Entry::Allow(d, id, *a), 1));
            }
            for p in &gk.0 {
                g.of_policy.entry(p.clone()).or_default().insert(gk.clone());
            }
            g.by_key.insert(
                gk.clone(),
                Group {
                    id,
                    members: 0,
                    allows,
                    ranges,
                },
            );
        }
        let g = &mut self.groups[di(d)];
        let group = g.by_key.get_mut(&gk).expect("group");
        group.members += 1;
        changes.push((Entry::Id(d, ip, group.id), 1));
        g.member.insert(pod.clone(), (gk, ip));
        for (e, n) in changes {
            self.mark(e, n);
        }
    }

    /// The changes since the last call, deletions first (`false`) then additions (`true`).
    pub fn take_pending(&mut self) -> Vec<(Entry, bool)> {
        self.settle_ranges();
        if !self.pending.is_empty() {
            // Connections allowed so far are checked again at their next packet.
            let next = self.generation.wrapping_add(1).max(1);
            for (old, new) in [
                (Entry::Current(self.generation), Entry::Current(next)),
                (Entry::Stamp(self.generation), Entry::Stamp(next)),
            ] {
                self.mark(old, -1);
                self.mark(new, 1);
            }
            self.generation = next;
        }
        let mut out: Vec<(Entry, bool)> = self
            .pending
            .drain()
            .map(|(e, n)| {
                debug_assert!(n == 1 || n == -1, "{e:?}: {n}");
                (e, n > 0)
            })
            .collect();
        out.sort_by(|a, b| a.1.cmp(&b.1).then_with(|| a.0.cmp(&b.0)));
        out
    }

    /// Makes the ranges of the groups whose range allows changed disjoint again, as changes.
    fn settle_ranges(&mut self) {
        for (d, gk) in std::mem::take(&mut self.dirty) {
            let Some(group) = self.groups[di(d)].by_key.get_mut(&gk) else {
                continue;
            };
            let now = disjoint(group.allows.keys());
            let id = group.id;
            let gone: Vec<Allow> = group.ranges.difference(&now).copied().collect();
            let new: Vec<Allow> = now.difference(&group.ranges).copied().collect();
            group.ranges = now;
            for a in gone {
                self.mark(Entry::Allow(d, id, a), -1);
            }
            for a in new {
                self.mark(Entry::Allow(d, id, a), 1);
            }
        }
    }

    /// Forgets pending changes, before a full load sends [`Planner::entries`].
    pub fn clear_pending(&mut self) {
        self.settle_ranges();
        self.pending.clear();
    }

    /// Every element the table should hold now (after [`Planner::take_pending`] or
    /// [`Planner::clear_pending`]).
    pub fn entries(&self) -> BTreeSet<Entry> {
        let mut out = BTreeSet::from([
            Entry::Current(self.generation),
            Entry::Stamp(self.generation),
        ]);
        if let Some(g) = self.guard() {
            out.insert(Entry::Guard(g));
        }
        for p in self.cluster.pods.values().filter(|p| self.is_local(p)) {
            out.insert(Entry::Known(p.ip.expect("local")));
        }
        for d in Direction::BOTH {
            let g = &self.groups[di(d)];
            for (gk, ip) in g.member.values() {
                out.insert(Entry::Id(d, *ip, g.by_key[gk].id));
            }
            for group in g.by_key.values() {
                for a in group.allows.keys().filter(|a| !is_range(a)) {
                    out.insert(Entry::Allow(d, group.id, *a));
                }
                for a in &group.ranges {
                    out.insert(Entry::Allow(d, group.id, *a));
                }
            }
        }
        out
    }

    /// The whole table as `nft -f` reads it (`--dry-run`).
    pub fn render(&self) -> String {
        let mut by_set: BTreeMap<&str, Vec<String>> = BTreeMap::new();
        for e in self.entries() {
            by_set.entry(e.set()).or_default().push(e.render());
        }
        let mut o = skeleton();
        o.insert_str(
            0,
            &format!("table ip {TABLE_NAME}\ndelete table ip {TABLE_NAME}\n"),
        );
        for (set, elems) in by_set {
            let _ = writeln!(o, "flush set ip {TABLE_NAME} {set}");
            let _ = writeln!(
                o,
                "add element ip {TABLE_NAME} {set} {{ {} }}",
                elems.join(", ")
            );
        }
        if self.guard().is_none() {
            let _ = writeln!(o, "flush set ip {TABLE_NAME} guard");
        }
        o
    }
}

/// What the table does with a packet's first look, walked over its elements as the chains walk
/// them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Traced {
    Accept,
    /// `unknown-pod`: a local address the agent has not planned, while policies exist.
    UnknownPod(Ipv4Addr),
    /// The pod's group in that direction allows no such peer and port.
    Denied(Direction, u32),
}

/// Walks `pkt` through the `forward` chain over `entries` (what the kernel holds).
pub fn trace(entries: &BTreeSet<Entry>, pkt: &Packet) -> Traced {
    let guard = |ip: Ipv4Addr| {
        entries
            .iter()
            .any(|e| matches!(e, Entry::Guard(n) if n.contains(&ip)))
    };
    let known = |ip: Ipv4Addr| entries.contains(&Entry::Known(ip));
    for ip in [pkt.src, pkt.dst] {
        if guard(ip) && !known(ip) {
            return Traced::UnknownPod(ip);
        }
    }
    let id = |d: Direction, ip: Ipv4Addr| {
        entries.iter().find_map(|e| match e {
            Entry::Id(x, a, id) if *x == d && *a == ip => Some(*id),
            _ => None,
        })
    };
    for (d, me, peer) in [
        (Direction::Egress, pkt.src, pkt.dst),
        (Direction::Ingress, pkt.dst, pkt.src),
    ] {
        let Some(gid) = id(d, me) else { continue };
        let ok = entries.iter().any(|e| match e {
            Entry::Allow(x, g, a) => *x == d && *g == gid && a.admits(peer, pkt.proto, pkt.port),
            _ => false,
        });
        if !ok {
            return Traced::Denied(d, gid);
        }
    }
    Traced::Accept
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn range(a: (u8, u8), p: (u8, u8), q: (u16, u16)) -> Allow {
        Allow::Range {
            addr: (Ipv4Addr::new(10, 0, 0, a.0), Ipv4Addr::new(10, 0, 0, a.1)),
            proto: p,
            port: q,
        }
    }

    fn span() -> impl Strategy<Value = (u8, u8)> {
        (0u8..12, 0u8..4).prop_map(|(a, w)| (a, a + w))
    }

    proptest! {
        /// Every point the ranges cover is covered by exactly one disjoint range, and no other.
        #[test]
        fn disjoint_ranges_cover_the_union_once(
            boxes in proptest::collection::vec((span(), span(), span()), 0..8)
        ) {
            let input: Vec<Allow> = boxes
                .iter()
                .map(|(a, p, q)| range(*a, *p, (q.0 as u16, q.1 as u16)))
                .collect();
            let out = disjoint(input.iter());
            for a in 0u8..17 {
                for p in 0u8..17 {
                    for q in 0u16..17 {
                        let ip = Ipv4Addr::new(10, 0, 0, a);
                        let want = input.iter().any(|r| r.admits(ip, p, q));
                        let got = out.iter().filter(|r| r.admits(ip, p, q)).count();
                        prop_assert_eq!(got, usize::from(want), "{:?} {} {}", ip, p, q);
                    }
                }
            }
        }
    }

    #[test]
    fn overlapping_port_ranges_merge_and_blocks_split() {
        let out = disjoint(
            [
                range((0, 9), (6, 6), (80, 90)),
                range((0, 9), (6, 6), (85, 100)),
            ]
            .iter(),
        );
        assert_eq!(
            out.into_iter().collect::<Vec<_>>(),
            [range((0, 9), (6, 6), (80, 100))]
        );
        let out = disjoint(
            [
                range((0, 9), (6, 6), (80, 80)),
                range((5, 5), (0, 255), (0, 65535)),
            ]
            .iter(),
        );
        assert_eq!(
            out.into_iter().collect::<Vec<_>>(),
            [
                range((0, 4), (6, 6), (80, 80)),
                range((5, 5), (0, 255), (0, 65535)),
                range((6, 9), (6, 6), (80, 80))
            ]
        );
    }
}
