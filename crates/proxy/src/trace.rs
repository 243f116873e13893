//! The packet tracer: walks one packet through a planned [`Ruleset`] the way the kernel would
//! (filter lookups before DNAT, then the nat chains) and says where it ends. No kernel needed, so
//! every semantic is tested exhaustively; `flatnet explain` will print the same walk.

use crate::model::Proto;
use crate::plan::{Rule, Ruleset};
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
    for rule in rs.chains.get(chain).into_iter().flatten() {
        match rule {
            Rule::MasqUnlessFrom(c) => masq |= !c.contains(&p.src),
            Rule::Masq => masq = true,
            Rule::MasqIfFrom(ip) => masq |= *ip == p.src,
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
                return Verdict::Dnat(vec![Hop {
                    ip: *ip,
                    port: *port,
                    masquerade: masq,
                }])
            }
            Rule::ReturnIfFrom(c) if c.contains(&p.src) => return Verdict::Untouched,
            Rule::ReturnIfFrom(_) => {}
            Rule::Drop => return Verdict::Dropped,
        }
    }
    Verdict::Untouched
}

/// The walk as text for `flatnet lab explain`: which frontend matched and where the packet goes.
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
    let frontend = rs
        .service_ips
        .get(&key)
        .or_else(|| {
            p.to_node
                .then(|| rs.node_ports.get(&(p.proto, p.dport)))
                .flatten()
        })
        .and_then(|c| rs.comments.get(c))
        .map(|c| {
            if c.starts_with("hostPort") {
                format!(" ({c})")
            } else {
                format!(" (Service port {c})")
            }
        })
        .unwrap_or_default();
    match trace(rs, p) {
        Verdict::Untouched => format!("{what}: not a Service frontend; routed as is"),
        Verdict::Rejected => format!("{what}: a Service without usable endpoints: rejected at once (TCP reset / ICMP unreachable)"),
        Verdict::Dropped => format!("{what}{frontend}: dropped (source not allowed, or no endpoint on this node for a Local policy)"),
        Verdict::Dnat(hops) => {
            let mut o = format!("{what}{frontend}: DNAT to one of {}:", hops.len());
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
