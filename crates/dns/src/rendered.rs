//! Rendered answers: the zone's reply to a question, encoded once and reused. A plain query
//! (one question, no compression in it, at most an EDNS0 OPT without the DO bit) is read straight
//! off the wire and its reply is a copy of the stored bytes with the query's ID, RD and CD bits
//! and the query's own spelling of the name patched in (answers point at the question's name,
//! so they take its spelling too). Everything else, and every first sight of a question, goes
//! through [`crate::answer::handle`]. The store belongs to one version of the zone and is
//! dropped with it, so it is never stale; it is cleared when it reaches its bound. Replies to
//! forwarded questions are kept the same way for a second (their TTLs age by the second).

use crate::answer::{self, Step};
use crate::zone::Zone;
use std::collections::HashMap;
use std::sync::RwLock;
use std::time::{Duration, Instant};

/// Entries kept at most (then the store starts over).
const MAX_ENTRIES: usize = 100_000;
/// Only replies that fit any client's UDP limit are stored.
const MAX_STORED: usize = 512;

/// Lower-case wire name, type, class, EDNS present: as one byte string, so a lookup can borrow
/// it from a stack buffer.
type Key = Box<[u8]>;
/// The longest key: a 255-byte name, 2 + 2 + 1.
const MAX_KEY: usize = 260;

/// How long a reply built from a cached upstream answer is reused as it is.
const FORWARDED_FOR: Duration = Duration::from_secs(1);

#[derive(Clone)]
enum Stored {
    Reply(Box<[u8]>),
    /// Not the zone's: the question goes to the forwarder (see `forwarded`).
    Forwarded,
}

/// A zone and the replies rendered from it, and replies recently built for forwarded questions.
pub struct Answers {
    pub zone: Zone,
    rendered: Store<Stored>,
    /// When each was built, and the reply.
    forwarded: Store<(Instant, Box<[u8]>)>,
}

type Store<V> = RwLock<HashMap<Key, V>>;

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

/// A question's key in a stack buffer, and the name's length in it.
fn key_of(packet: &[u8], q: &Plain) -> ([u8; MAX_KEY], usize) {
    let name = &packet[12..q.name_end];
    let mut buf = [0u8; MAX_KEY];
    let n = name.len();
    buf[..n].copy_from_slice(name);
    buf[..n].make_ascii_lowercase();
    buf[n..n + 2].copy_from_slice(&q.qtype.to_be_bytes());
    buf[n + 2..n + 4].copy_from_slice(&q.qclass.to_be_bytes());
    buf[n + 4] = u8::from(q.edns);
    (buf, n)
}

/// `template` answering `packet`: its ID, RD and CD bits and its spelling of the name.
fn patched(template: &[u8], packet: &[u8], name_end: usize) -> Vec<u8> {
    let mut reply = template.to_vec();
    reply[..2].copy_from_slice(&packet[..2]);
    reply[2] = (reply[2] & !0x01) | (packet[2] & 0x01); // RD
    reply[3] = (reply[3] & !0x10) | (packet[3] & 0x10); // CD
    reply[12..name_end].copy_from_slice(&packet[12..name_end]);
    reply
}

fn bounded_insert<V>(map: &Store<V>, key: &[u8], value: V) {
    let mut store = map.write().expect("rendered");
    if store.len() >= MAX_ENTRIES {
        store.clear();
    }
    store.insert(key.into(), value);
}

impl Answers {
    pub fn new(zone: Zone) -> Answers {
        Answers {
            zone,
            rendered: RwLock::new(HashMap::new()),
            forwarded: RwLock::new(HashMap::new()),
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
        let (buf, n) = key_of(packet, &q);
        let key = &buf[..n + 5];
        let stored = self.rendered.read().expect("rendered").get(key).cloned();
        let template = match stored {
            Some(Stored::Reply(t)) => t,
            Some(Stored::Forwarded) => {
                let fresh = self
                    .forwarded
                    .read()
                    .expect("rendered")
                    .get(key)
                    .and_then(|(at, t)| (at.elapsed() < FORWARDED_FOR).then(|| t.clone()));
                match fresh {
                    Some(t) => t,
                    None => return answer::handle(&self.zone, packet, limit_of),
                }
            }
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
                        bounded_insert(&self.rendered, key, Stored::Reply(b.clone()));
                        b
                    }
                    step => {
                        if matches!(&step, Step::Forward { prefix, .. } if prefix.is_empty()) {
                            bounded_insert(&self.rendered, key, Stored::Forwarded);
                        }
                        // Too big to store, or forwarded: the full path, with the query as it came.
                        return answer::handle(&self.zone, packet, limit_of);
                    }
                }
            }
        };
        Step::Reply(patched(&template, packet, q.name_end))
    }

    /// Keeps `reply` (built from an upstream's or the cache's answer to `packet`) to answer the
    /// same question for the next [`FORWARDED_FOR`]: its TTLs are then at most that stale.
    pub fn remember_forwarded(&self, packet: &[u8], reply: &[u8]) {
        let Some(q) = plain(packet) else {
            return;
        };
        let truncated = reply.get(2).is_some_and(|b| b & 0x02 != 0);
        if reply.len() > MAX_STORED
            || truncated
            || reply.get(12..q.name_end) != packet.get(12..q.name_end)
        {
            return;
        }
        let (buf, n) = key_of(packet, &q);
        bounded_insert(
            &self.forwarded,
            &buf[..n + 5],
            (Instant::now(), reply.into()),
        );
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
        assert!(
            a.forwarded.read().unwrap().is_empty(),
            "nothing built for it yet"
        );
        assert!(plain(&[0; 11]).is_none());
        let mut trailing = query(8, "web.default.svc.cluster.local.", true, false);
        trailing.push(0);
        assert!(plain(&trailing).is_none());
    }

    #[test]
    fn forwarded_replies_are_reused_for_a_second() {
        let a = answers();
        let q = query(7, "example.org.", true, false);
        assert!(matches!(
            a.handle(&q, answer::udp_limit),
            Step::Forward { .. }
        ));
        // What the server built from the upstream's answer.
        let mut m = Message::from_vec(&q).unwrap();
        m.metadata.message_type = hickory_proto::op::MessageType::Response;
        m.add_answer(hickory_proto::rr::Record::from_rdata(
            Name::from_ascii("example.org.").unwrap(),
            60,
            hickory_proto::rr::RData::A(hickory_proto::rr::rdata::A("192.0.2.1".parse().unwrap())),
        ));
        a.remember_forwarded(&q, &m.to_vec().unwrap());
        let again = query(8, "Example.ORG.", false, false);
        let r = Message::from_vec(&reply(&a, &again)).unwrap();
        assert_eq!(r.metadata.id, 8);
        assert!(!r.metadata.recursion_desired);
        assert_eq!(r.answers[0].name.to_ascii(), "Example.ORG.");
        assert_eq!(r.queries[0].name().to_ascii(), "Example.ORG.");
    }
}
