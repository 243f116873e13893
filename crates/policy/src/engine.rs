//! The policy decision as one pure function of (packet, pods, namespaces, policies), as
//! kube-network-policies' engine is: [`Cluster::decide`]. The planner compiles the same
//! semantics into sets; the tracer, `explain` and the truth tables ask this function, so a
//! planner bug shows up as a disagreement between the two.

use crate::model::{
    Direction, Key, Labels, Namespaces, Peer, PodFacts, Policy, PortMatch, PortRef,
};
use cluster::Proto;
use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;

/// What the policies read: pods, namespaces' labels and the policies, indexed.
#[derive(Debug, Default, Clone)]
pub struct Cluster {
    pub pods: HashMap<Key, PodFacts>,
    /// Pods by address (hostNetwork pods are not here: their address is their node's).
    pub by_ip: HashMap<Ipv4Addr, Key>,
    /// Pods by namespace (for peers that only look in one namespace).
    pub by_namespace: HashMap<String, std::collections::BTreeSet<String>>,
    pub namespaces: HashMap<String, Labels>,
    pub policies: BTreeMap<Key, Policy>,
}

/// A packet's first-look fields: addresses, IP protocol number and destination port (0 for
/// protocols without ports).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Packet {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub proto: u8,
    pub port: u16,
}

/// One end's share of a verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Side {
    /// No policy of that direction selects the pod: everything passes.
    NotIsolated,
    /// `policy`'s rule (0-based) allows it.
    Allowed { policy: Key, rule: usize },
    /// Every selecting policy's rules were tried; `why` says, per policy, why none matched.
    Denied {
        policies: Vec<Key>,
        why: Vec<String>,
    },
}

/// A verdict with its reasons: the source pod's egress and the destination pod's ingress
/// (`None`: that end is not a pod policies can select).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub egress: Option<(Key, Side)>,
    pub ingress: Option<(Key, Side)>,
}

impl Decision {
    pub fn allowed(&self) -> bool {
        [&self.egress, &self.ingress]
            .into_iter()
            .flatten()
            .all(|(_, s)| !matches!(s, Side::Denied { .. }))
    }

    /// The verdict in words, one line per side.
    pub fn explain(&self) -> String {
        let mut out = Vec::new();
        for (d, side) in [
            (Direction::Egress, &self.egress),
            (Direction::Ingress, &self.ingress),
        ] {
            let Some(((ns, pod), s)) = side else { continue };
            let what = format!("{} of pod {ns}/{pod}", d.as_str());
            out.push(match s {
                Side::NotIsolated => format!("{what}: allowed (no policy selects it for {})", d.as_str()),
                Side::Allowed { policy, rule } => format!(
                    "{what}: allowed by NetworkPolicy {}/{} {}[{rule}]",
                    policy.0,
                    policy.1,
                    d.as_str()
                ),
                Side::Denied { policies, why } => {
                    let names: Vec<String> = policies.iter().map(|(n, p)| format!("{n}/{p}")).collect();
                    format!(
                        "{what}: DENIED: isolated by NetworkPolicy {} and no rule allows it:\n    {}",
                        names.join(", "),
                        why.join("\n    ")
                    )
                }
            });
        }
        if out.is_empty() {
            out.push("allowed: neither end is a pod a policy can select".into());
        }
        out.join("\n")
    }
}

impl Cluster {
    /// Adds or replaces a pod (`None` in `new` removes it).
    pub fn set_pod(&mut self, key: &Key, new: Option<PodFacts>) {
        if let Some(old) = self.pods.remove(key) {
            if let Some(ip) = old.ip.filter(|_| !old.host_network) {
                if self.by_ip.get(&ip) == Some(key) {
                    self.by_ip.remove(&ip);
                }
            }
            if let Some(set) = self.by_namespace.get_mut(&key.0) {
                set.remove(&key.1);
            }
        }
        if let Some(p) = new {
            if let Some(ip) = p.ip.filter(|_| !p.host_network) {
                self.by_ip.insert(ip, key.clone());
            }
            self.by_namespace
                .entry(key.0.clone())
                .or_default()
                .insert(key.1.clone());
            self.pods.insert(key.clone(), p);
        }
    }

    /// A namespace's labels; one without a Namespace object has the label the API server
    /// would give it.
    pub fn namespace_labels(&self, ns: &str) -> Cow<'_, Labels> {
        match self.namespaces.get(ns) {
            Some(l) => Cow::Borrowed(l),
            None => Cow::Owned(Labels::from([(
                "kubernetes.io/metadata.name".to_string(),
                ns.to_string(),
            )])),
        }
    }

    /// The pods of one namespace.
    pub fn pods_in<'a>(&'a self, ns: &'a str) -> impl Iterator<Item = &'a PodFacts> + 'a {
        self.by_namespace
            .get(ns)
            .into_iter()
            .flatten()
            .filter_map(move |n| self.pods.get(&(ns.to_string(), n.clone())))
    }

    /// Whether a selector peer matches `pod` (hostNetwork pods never do).
    pub fn selector_peer_matches(&self, peer: &Peer, pod: &PodFacts) -> bool {
        let Peer::Pods { namespaces, pods } = peer else {
            return false;
        };
        !pod.host_network
            && match namespaces {
                Namespaces::Own(ns) => *ns == pod.namespace,
                Namespaces::Matching(s) => s.matches(&self.namespace_labels(&pod.namespace)),
            }
            && pods.matches(&pod.labels)
    }

    /// The pod policies can select at `ip`.
    pub fn pod_at(&self, ip: Ipv4Addr) -> Option<&PodFacts> {
        self.by_ip.get(&ip).and_then(|k| self.pods.get(k))
    }

    /// The policies that isolate `pod` in direction `d` (select it and have that policy type).
    pub fn isolating(&self, pod: &PodFacts, d: Direction) -> Vec<Key> {
        (self.policies.values())
            .filter(|p| p.selects(pod) && p.rules(d).is_some())
            .map(|p| p.key())
            .collect()
    }

    /// The verdict on a packet that reaches `dst:port` (after any DNAT) in words, for `explain`:
    /// allowed, or denied naming the policies that isolate the pod and why none of their rules
    /// matched. `src_node` names the node when the source is one (or a hostNetwork pod on it):
    /// a node's traffic to its own pods never crosses the forward hook and always passes; to
    /// another node's pods it is an address like any other.
    pub fn verdict_text(&self, pkt: &Packet, src_node: Option<&str>) -> String {
        if let Some(node) = src_node {
            let dst_node = self.pod_at(pkt.dst).and_then(|d| d.node.as_deref());
            if dst_node == Some(node) {
                return format!(
                    "policy: allowed (traffic from node {node} to its own pods always passes)"
                );
            }
        }
        if pkt.src == pkt.dst {
            return "policy: allowed (a pod's traffic to itself never leaves it)".into();
        }
        let d = self.decide(pkt);
        let head = if d.allowed() {
            "policy: allowed"
        } else {
            "policy: DENIED"
        };
        format!(
            "{head} ({}:{})\n  {}",
            pkt.dst,
            pkt.port,
            d.explain().replace('\n', "\n  ")
        )
    }

    /// The verdict on `pkt`: the source's egress and the destination's ingress, each allowed
    /// when no policy isolates that pod in that direction or some rule of some isolating policy
    /// matches.
    pub fn decide(&self, pkt: &Packet) -> Decision {
        let src = self.pod_at(pkt.src);
        let dst = self.pod_at(pkt.dst);
        Decision {
            egress: src.map(|s| (s.key(), self.side(Direction::Egress, s, pkt.dst, dst, pkt))),
            ingress: dst.map(|d| (d.key(), self.side(Direction::Ingress, d, pkt.src, src, pkt))),
        }
    }

    /// One end's verdict: `subject` is the pod whose policies apply; `peer_ip`/`peer` the other
    /// end. Named ports resolve on the destination pod.
    fn side(
        &self,
        d: Direction,
        subject: &PodFacts,
        peer_ip: Ipv4Addr,
        peer: Option<&PodFacts>,
        pkt: &Packet,
    ) -> Side {
        let destination = match d {
            Direction::Ingress => Some(subject),
            Direction::Egress => peer,
        };
        let mut isolating = Vec::new();
        let mut why = Vec::new();
        for p in self.policies.values().filter(|p| p.selects(subject)) {
            let Some(rules) = p.rules(d) else { continue };
            isolating.push(p.key());
            if rules.is_empty() {
                why.push(format!(
                    "{}/{}: no {} rules (denies all)",
                    p.namespace,
                    p.name,
                    d.as_str()
                ));
            }
            for (i, r) in rules.iter().enumerate() {
                let peer_ok = match &r.peers {
                    None => Ok(()),
                    Some(list) => {
                        if list.iter().any(|x| match x {
                            Peer::Block { cidr, except } => {
                                Peer::block_contains(cidr, except, peer_ip)
                            }
                            Peer::Pods { .. } => {
                                peer.is_some_and(|q| self.selector_peer_matches(x, q))
                            }
                        }) {
                            Ok(())
                        } else {
                            let who = match peer {
                                Some(q) => format!("{peer_ip} (pod {}/{})", q.namespace, q.name),
                                None => format!("{peer_ip} (not a pod)"),
                            };
                            let l: Vec<String> = list.iter().map(|x| x.to_string()).collect();
                            Err(format!("{who} is not one of: {}", l.join("; ")))
                        }
                    }
                };
                let port_ok = if r.ports.is_empty()
                    || r.ports.iter().any(|m| port_matches(m, pkt, destination))
                {
                    Ok(())
                } else {
                    let l: Vec<String> = r.ports.iter().map(|m| m.to_string()).collect();
                    Err(format!(
                        "{} is not one of: {}",
                        describe_port(pkt),
                        l.join(", ")
                    ))
                };
                match (peer_ok, port_ok) {
                    (Ok(()), Ok(())) => {
                        return Side::Allowed {
                            policy: p.key(),
                            rule: i,
                        }
                    }
                    (Err(e), _) | (Ok(()), Err(e)) => why.push(format!(
                        "{}/{} {}[{i}]: {e}",
                        p.namespace,
                        p.name,
                        d.as_str()
                    )),
                }
            }
        }
        if isolating.is_empty() {
            Side::NotIsolated
        } else {
            Side::Denied {
                policies: isolating,
                why,
            }
        }
    }
}

fn describe_port(pkt: &Packet) -> String {
    match Proto::from_number(pkt.proto) {
        Some(p) => format!("port {}/{}", pkt.port, p.as_str().to_ascii_uppercase()),
        None => format!("IP protocol {}", pkt.proto),
    }
}

/// Whether a rule's port matches: the protocol, then the port (named ports looked up on the
/// destination pod, which must have that port under that name and protocol).
fn port_matches(m: &PortMatch, pkt: &Packet, destination: Option<&PodFacts>) -> bool {
    if m.proto.number() != pkt.proto {
        return false;
    }
    match &m.port {
        PortRef::All => true,
        PortRef::Range(a, b) => (*a..=*b).contains(&pkt.port),
        PortRef::Named(n) => destination.and_then(|d| d.named_port(n, m.proto)) == Some(pkt.port),
    }
}

impl Packet {
    /// The packet in an IPv4 header and what follows (an nflog copy): `None` for anything else.
    pub fn parse(b: &[u8]) -> Option<Packet> {
        if b.len() < 20 || b[0] >> 4 != 4 {
            return None;
        }
        let ihl = usize::from(b[0] & 0xf) * 4;
        let proto = b[9];
        let addr = |at: usize| Ipv4Addr::new(b[at], b[at + 1], b[at + 2], b[at + 3]);
        let port = match Proto::from_number(proto) {
            Some(_) if b.len() >= ihl + 4 => u16::from_be_bytes([b[ihl + 2], b[ihl + 3]]),
            _ => 0,
        };
        Some(Packet {
            src: addr(12),
            dst: addr(16),
            proto,
            port,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_nflog_copy_reads_as_a_packet() {
        // IPv4 (IHL 5), TCP, 10.244.0.2 → 10.244.2.2, ports 40000 → 8080.
        let mut b = vec![
            0x45, 0, 0, 40, 0, 0, 0x40, 0, 64, 6, 0, 0, 10, 244, 0, 2, 10, 244, 2, 2,
        ];
        b.extend_from_slice(&40000u16.to_be_bytes());
        b.extend_from_slice(&8080u16.to_be_bytes());
        let p = Packet::parse(&b).unwrap();
        assert_eq!(
            (p.src, p.dst, p.proto, p.port),
            (
                Ipv4Addr::new(10, 244, 0, 2),
                Ipv4Addr::new(10, 244, 2, 2),
                6,
                8080
            )
        );
        // ICMP has no port; IPv6 and short copies are not read.
        b[9] = 1;
        assert_eq!(Packet::parse(&b).unwrap().port, 0);
        b[0] = 0x60;
        assert!(Packet::parse(&b).is_none());
        assert!(Packet::parse(&b[..10]).is_none());
    }
}
