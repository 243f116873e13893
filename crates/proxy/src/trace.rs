//! The packet tracer: walks one packet through a planned [`Ruleset`] the way the kernel would
//! (filter lookups before DNAT, then the nat chains) and says where it ends. No kernel needed, so
//! every semantic is tested exhaustively; `flatnet explain` will print the same walk.

use crate::model::Proto;
use crate::ruleset::{keyed_by_ip, Key, Rule, Ruleset};
use std::net::Ipv4Addr;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Packet {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub proto: Proto,
    pub dport: u16,
    /// `dst` is one of this node's addresses (NodePorts apply).
    pub to_node: bool,
}

/// Where one endpoint choice leads.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Hop {
    pub ip: Ipv4Addr,
    pub port: u16,
    /// The source is rewritten to the node's address on the way out.
    pub masquerade: bool,
}

impl Hop {
    /// The hop as the packet takes it: a client reaching itself is masqueraded (hairpin).
    fn new(rs: &Ruleset, p: &Packet, ip: Ipv4Addr, port: u16, masq: bool) -> Hop {
        let hairpin = ip == p.src && rs.hairpin.contains(&ip);
        Hop {
            ip,
            port,
            masquerade: masq || hairpin,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Not a Service frontend: the packet goes on untouched.
    Untouched,
    /// A Service without usable endpoints: TCP reset / ICMP unreachable at once.
    Rejected,
    Dropped,
    /// DNAT to one of these (random choice, or the client's affinity).
    Dnat(Vec<Hop>),
}

pub fn trace(rs: &Ruleset, p: &Packet) -> Verdict {
    let key = (p.dst, p.proto, p.dport);
    if let Some(fw) = rs.firewall.get(&key) {
        if walk(rs, fw, p, false, 0) == Verdict::Dropped {
            return Verdict::Dropped;
        }
    }
    if rs.no_endpoints.contains(&key)
        || (p.to_node && rs.no_endpoint_node_ports.contains(&(p.proto, p.dport)))
    {
        return Verdict::Rejected;
    }
    let chain = rs.service_ips.get(&key).or_else(|| {
        p.to_node
            .then(|| rs.node_ports.get(&(p.proto, p.dport)))
            .flatten()
    });
    match chain {
        None => Verdict::Untouched,
        Some(c) => walk(rs, c, p, false, 0),
    }
}

fn walk(rs: &Ruleset, chain: &str, p: &Packet, mut masq: bool, depth: usize) -> Verdict {
    if depth > 16 {
        return Verdict::Dropped; // a loop would be a planner bug; the kernel refuses loops too
    }
    let rules = rs.chain_rules(chain).unwrap_or_default();
    for rule in rules.iter() {
        match rule {
            Rule::MasqUnlessFrom(c) => masq |= !c.contains(&p.src),
            Rule::Masq => masq = true,
            Rule::GotoIfFrom(c, next) if c.contains(&p.src) => {
                return walk(rs, next, p, masq, depth + 1)
            }
            Rule::GotoIfFrom(..) | Rule::Sticky(..) | Rule::Remember(..) => {}
            Rule::Goto(next) => return walk(rs, next, p, masq, depth + 1),
            Rule::Random(chains) => {
                let mut hops = Vec::new();
                for c in chains {
                    match walk(rs, c, p, masq, depth + 1) {
                        Verdict::Dnat(h) => hops.extend(h),
                        other => return other,
                    }
                }
                if hops.is_empty() {
                    return Verdict::Dropped;
                }
                hops.sort();
                return Verdict::Dnat(hops);
            }
            Rule::Dnat(ip, port, _) => {
                return Verdict::Dnat(vec![Hop::new(rs, p, *ip, *port, masq)])
            }
            Rule::Pick(map, n) => {
                let key = if keyed_by_ip(map) {
                    Key::Ip((p.dst, p.proto, p.dport))
                } else {
                    Key::Port((p.proto, p.dport))
                };
                let pool = rs.endpoints.get(&(*map, key));
                let mut hops: Vec<Hop> = (0..*n)
                    .filter_map(|i| pool?.get(&i))
                    .map(|(ip, port)| Hop::new(rs, p, *ip, *port, masq))
                    .collect();
                if hops.is_empty() {
                    return Verdict::Dropped;
                }
                hops.sort();
                return Verdict::Dnat(hops);
            }
            Rule::ReturnIfFrom(c) if c.contains(&p.src) => return Verdict::Untouched,
            Rule::ReturnIfFrom(_) => {}
            Rule::Drop => return Verdict::Dropped,
        }
    }
    Verdict::Untouched
}

/// The walk as text for `flatnet lab explain`: which frontend matched and where the packet goes.
/// Where a packet goes on from this node: the endpoints it may be DNATed to, itself when it is
/// no Service's, nothing when it is refused (what a policy then judges).
pub fn destinations(rs: &Ruleset, p: &Packet) -> Vec<(Ipv4Addr, u16)> {
    match trace(rs, p) {
        Verdict::Dnat(hops) => hops.iter().map(|h| (h.ip, h.port)).collect(),
        Verdict::Untouched => vec![(p.dst, p.dport)],
        Verdict::Rejected | Verdict::Dropped => Vec::new(),
    }
}

/// `IP:PORT[/tcp|udp|sctp]`, as `explain` takes a destination.
pub fn parse_target(to: &str) -> Result<(Ipv4Addr, u16, Proto), String> {
    let (addr, proto) = to.split_once('/').unwrap_or((to, "tcp"));
    let proto =
        Proto::parse(Some(&proto.to_ascii_uppercase())).ok_or("protocol: use tcp, udp or sctp")?;
    let (ip, port) = addr.rsplit_once(':').ok_or("use IP:PORT[/proto]")?;
    let ip = ip
        .parse()
        .map_err(|_| format!("{ip:?} is not an IPv4 address"))?;
    let port = port
        .parse()
        .map_err(|_| format!("{port:?} is not a port"))?;
    Ok((ip, port, proto))
}

pub fn explain(rs: &Ruleset, p: &Packet) -> String {
    let what = format!(
        "{} {}:{} -> {}:{}",
        p.proto.as_str(),
        p.src,
        "*",
        p.dst,
        p.dport
    );
    let key = (p.dst, p.proto, p.dport);
    let port_key = (p.proto, p.dport);
    let (served, chain) = match rs.service_ips.get(&key) {
        Some(c) => (rs.frontends.get(&Key::Ip(key)), Some(c)),
        None if p.to_node => (
            rs.frontends.get(&Key::Port(port_key)),
            rs.node_ports.get(&port_key),
        ),
        None => (None, None),
    };
    let frontend = served
        .map(|c| {
            if c.starts_with("hostPort") {
                format!(" ({c})")
            } else {
                format!(" (Service port {c})")
            }
        })
        .unwrap_or_default();
    let path = chain
        .and_then(|c| Some(format!("\n  via chain {c}: {}", rs.chain_comment(c)?)))
        .unwrap_or_default();
    match trace(rs, p) {
        Verdict::Untouched => format!("{what}: not a Service frontend; routed as is"),
        Verdict::Rejected => format!("{what}: a Service without usable endpoints: rejected at once (TCP reset / ICMP unreachable)"),
        Verdict::Dropped => format!("{what}{frontend}: dropped (source not allowed, or no endpoint on this node for a Local policy)"),
        Verdict::Dnat(hops) => {
            let mut o = format!("{what}{frontend}: DNAT to one of {}:{path}", hops.len());
            for h in hops {
                o += &format!(
                    "\n  {}:{}{}",
                    h.ip,
                    h.port,
                    if h.masquerade { "  (source masqueraded to the node's address)" } else { "  (source kept)" }
                );
            }
            o
        }
    }
}
