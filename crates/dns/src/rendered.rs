//! Rendered answers: the zone's reply to a question, encoded once and reused. A plain query
//! (one question, no compression in it, at most an EDNS0 OPT without the DO bit) is read straight
//! off the wire and its reply is a copy of the stored bytes with the query's ID, RD and CD bits
//! and the query's own spelling of the name patched in (answers point at the question's name,
//! so they take its spelling too). Everything else, and every first sight of a question, goes
//! through [`crate::answer::handle`]. The store belongs to one version of the zone and is
//! dropped with it, so it is never stale; it is cleared when it reaches its bound.

use crate::answer::{self, Step};
use crate::zone::Zone;
use std::collections::HashMap;
use std::sync::RwLock;

/// Entries kept at most (then the store starts over).
const MAX_ENTRIES: usize = 100_000;
/// Only replies that fit any client's UDP limit are stored.
const MAX_STORED: usize = 512;

/// Lower-case wire name, type, class, EDNS present: as one byte string, so a lookup can borrow
/// it from a stack buffer.
type Key = Box<[u8]>;
/// The longest key: a 255-byte name, 2 + 2 + 1.
const MAX_KEY: usize = 260;

/// A zone and the replies rendered from it.
pub struct Answers {
    pub zone: Zone,
    rendered: RwLock<HashMap<Key, Box<[u8]>>>,
}

/// The parts of a plain query that key and patch a rendered reply.
struct Plain {
    name_end: usize,
    qtype: u16,
    qclass: u16,
    edns: bool,
}

/// Reads a plain query; `None` for anything else (left to the full parser).
fn plain(p: &[u8]) -> Option<Plain> {
    let h = p.get(..12)?;
    // QR=0, opcode 0; QDCOUNT 1, ANCOUNT 0, NSCOUNT 0, ARCOUNT ≤ 1.
    if h[2] & 0xf8 != 0 || h[4..10] != [0, 1, 0, 0, 0, 0] || h[10] != 0 || h[11] > 1 {
        return None;
    }
    let mut i = 12;
    loop {
        let len = *p.get(i)? as usize;
        if len == 0 {
            i += 1;
            break;
        }
        if len > 63 {
            return None; // a pointer or an extended label type
        }
        i += 1 + len;
        if i - 12 > 255 {
            return None;
        }
    }
    let name_end = i;
    let t = p.get(i..i + 4)?;
    let (qtype, qclass) = (
        u16::from_be_bytes([t[0], t[1]]),
        u16::from_be_bytes([t[2], t[3]]),
    );
    i += 4;
    let edns = h[11] == 1;
    if edns {
        // OPT: root name, type 41, class = payload size, TTL = ext-rcode, version, flags.
        let o = p.get(i..i + 11)?;
        if o[0] != 0 || o[1..3] != [0, 41] || o[6] != 0 || o[7] & 0x80 != 0 {
            return None; // not OPT, a version above 0, or DNSSEC OK
        }
        i += 11 + u16::from_be_bytes([o[9], o[10]]) as usize;
    }
    (i == p.len()).then_some(Plain {
        name_end,
        qtype,
        qclass,
        edns,
    })
}

impl Answers {
    pub fn new(zone: Zone) -> Answers {
        Answers {
            zone,
            rendered: RwLock::new(HashMap::new()),
        }
    }

    /// The reply to `packet`, from the store when it can be.
    pub fn handle(
        &self,
        packet: &[u8],
        limit_of: impl Fn(&hickory_proto::op::Message) -> usize,
    ) -> Step {
        let Some(q) = plain(packet) else {
            return answer::handle(&self.zone, packet, limit_of);
        };
        let name = &packet[12..q.name_end];
        let mut buf = [0u8; MAX_KEY];
        let n = name.len();
        buf[..n].copy_from_slice(name);
        buf[..n].make_ascii_lowercase();
        buf[n..n + 2].copy_from_slice(&q.qtype.to_be_bytes());
        buf[n + 2..n + 4].copy_from_slice(&q.qclass.to_be_bytes());
        buf[n + 4] = u8::from(q.edns);
        let key = &buf[..n + 5];
        let stored = self.rendered.read().expect("rendered").get(key).cloned();
        let template = match stored {
            Some(t) => t,
            None => {
                // Rendered from the canonical form of the question: ID 0, no flags, lower case.
                let mut canonical = packet.to_vec();
                canonical[..4].copy_from_slice(&[0, 0, 0, 0]);
                canonical[12..q.name_end].make_ascii_lowercase();
                match answer::handle(&self.zone, &canonical, &limit_of) {
                    Step::Reply(b)
                        if b.len() <= MAX_STORED && b.get(12..q.name_end) == Some(&key[..n]) =>
                    {
                        let b: Box<[u8]> = b.into();
                        let mut store = self.rendered.write().expect("rendered");
                        if store.len() >= MAX_ENTRIES {
                            store.clear();
                        }
                        store.insert(key.into(), b.clone());
                        b
                    }
                    // Too big to store, or forwarded: the full path, with the query as it came.
                    _ => return answer::handle(&self.zone, packet, limit_of),
                }
            }
        };
        let mut reply = template.into_vec();
        reply[..2].copy_from_slice(&packet[..2]);
        reply[2] = (reply[2] & !0x01) | (packet[2] & 0x01); // RD
        reply[3] = (reply[3] & !0x10) | (packet[3] & 0x10); // CD
        reply[12..q.name_end].copy_from_slice(name);
        Step::Reply(reply)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::zone::ZoneConfig;
    use cluster::ClusterState;
    use hickory_proto::op::{Edns, Message, Query};
    use hickory_proto::rr::{Name, RecordType};

    fn answers() -> Answers {
        let state = ClusterState {
            services: vec![
                serde_json::from_value(serde_json::json!({"metadata": {"name": "web"},
                "spec": {"clusterIP": "10.96.0.20"}}))
                .unwrap(),
            ],
            ..ClusterState::default()
        };
        Answers::new(Zone::build(&ZoneConfig::default(), &state))
    }

    fn query(id: u16, name: &str, rd: bool, edns: bool) -> Vec<u8> {
        let mut m = Message::query();
        m.metadata.id = id;
        m.metadata.recursion_desired = rd;
        m.add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
        if edns {
            m.edns = Some(Edns::new());
        }
        m.to_vec().unwrap()
    }

    fn reply(a: &Answers, q: &[u8]) -> Vec<u8> {
        match a.handle(q, answer::udp_limit) {
            Step::Reply(b) => b,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn stored_replies_equal_fresh_ones() {
        let a = answers();
        for (id, name, rd, edns) in [
            (1, "web.default.svc.cluster.local.", true, false),
            (2, "WEB.default.svc.Cluster.local.", false, false),
            (3, "web.default.svc.cluster.local.", true, true),
            (4, "nope.default.svc.cluster.local.", true, false),
            (5, "Nope.default.svc.cluster.local.", false, true),
        ] {
            let q = query(id, name, rd, edns);
            let fresh = match answer::handle(&a.zone, &q, answer::udp_limit) {
                Step::Reply(b) => b,
                other => panic!("{other:?}"),
            };
            assert_eq!(reply(&a, &q), fresh, "first: {name}");
            assert_eq!(reply(&a, &q), fresh, "stored: {name}");
            let m = Message::from_vec(&reply(&a, &q)).unwrap();
            if let Some(r) = m.answers.first() {
                assert_eq!(r.name.to_ascii(), name, "the query's spelling");
            }
        }
        assert_eq!(
            a.rendered.read().unwrap().len(),
            4,
            "one entry per name, type and EDNS"
        );
    }

    #[test]
    fn other_queries_take_the_full_path() {
        let a = answers();
        let q = query(7, "example.org.", true, false);
        assert!(matches!(
            a.handle(&q, answer::udp_limit),
            Step::Forward { .. }
        ));
        assert!(a.rendered.read().unwrap().is_empty());
        assert!(plain(&[0; 11]).is_none());
        let mut trailing = query(8, "web.default.svc.cluster.local.", true, false);
        trailing.push(0);
        assert!(plain(&trailing).is_none());
    }
}
