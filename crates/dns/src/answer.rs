//! One query → one response, without I/O: parsing, the protocol's rules (opcode, class, EDNS
//! version, one question), the zone's answer, negative answers with the SOA, truncation.
//! Questions the zone does not own come back as [`Step::Forward`] for the forwarder.

use crate::zone::{Answer, Zone};
use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};

/// The UDP payload size flatnet advertises and accepts at most (RFC 9715's advice: no IP
/// fragmentation).
pub const MAX_UDP: u16 = 1232;

/// What to do with one incoming message.
#[derive(Debug)]
pub enum Step {
    Reply(Vec<u8>),
    /// Ask the upstream servers for `query`; `prefix` (a CNAME chain from the zone) goes
    /// before their answers.
    Forward {
        request: Box<Message>,
        query: Query,
        prefix: Vec<Record>,
    },
    /// Not a query we answer (a response, or too short to carry an ID): silence.
    Drop,
}

/// The largest response `request` accepts over UDP (512 without EDNS).
pub fn udp_limit(request: &Message) -> usize {
    request
        .edns
        .as_ref()
        .map_or(512, |e| e.max_payload().clamp(512, MAX_UDP)) as usize
}

/// A response skeleton for `request`: its ID, question, RD and CD bits, and an OPT record when
/// it had one.
pub fn response(request: &Message, rcode: ResponseCode) -> Message {
    let mut m = Message::new(
        request.metadata.id,
        MessageType::Response,
        request.metadata.op_code,
    );
    m.metadata.recursion_desired = request.metadata.recursion_desired;
    m.metadata.checking_disabled = request.metadata.checking_disabled;
    m.metadata.recursion_available = true;
    m.metadata.response_code = rcode;
    m.queries = request.queries.clone();
    if request.edns.is_some() {
        let mut e = Edns::new();
        e.set_max_payload(MAX_UDP);
        m.edns = Some(e);
    }
    m
}

/// Encodes `m`; a message longer than `limit` goes out with the TC bit and no records, so the
/// client asks again over TCP.
pub fn encode(m: &Message, limit: usize) -> Vec<u8> {
    match m.to_vec() {
        Ok(b) if b.len() <= limit => b,
        _ => {
            let mut t = Message::new(m.metadata.id, MessageType::Response, m.metadata.op_code);
            t.metadata = m.metadata;
            t.metadata.truncation = true;
            t.queries = m.queries.clone();
            t.edns = m.edns.clone();
            match t.to_vec() {
                Ok(b) if b.len() <= limit => b,
                // Even the question does not fit (a 255-byte name in 512 bytes cannot happen,
                // but be safe): header only.
                _ => {
                    t.queries.clear();
                    t.to_vec().unwrap_or_default()
                }
            }
        }
    }
}

/// A FORMERR for bytes that did not parse, when at least the header did (RFC 1035: answer
/// what can be answered; RFC 6891 §7: never answer a response).
fn format_error(packet: &[u8]) -> Step {
    if packet.len() < 12 || packet[2] & 0x80 != 0 {
        return Step::Drop;
    }
    let mut b = packet[..12].to_vec();
    b[2] = 0x80 | (packet[2] & 0x79); // QR, opcode and RD kept
    b[3] = ResponseCode::FormErr.low();
    b[4..12].fill(0);
    Step::Reply(b)
}

/// Answers what the zone owns; everything else becomes a [`Step::Forward`].
pub fn handle(zone: &Zone, packet: &[u8], limit_of: impl Fn(&Message) -> usize) -> Step {
    let request = match Message::from_vec(packet) {
        Ok(m) => m,
        Err(_) => return format_error(packet),
    };
    if request.metadata.message_type != MessageType::Query {
        return Step::Drop;
    }
    let limit = limit_of(&request);
    let refuse = |rcode| Step::Reply(encode(&response(&request, rcode), limit));
    if request.metadata.op_code != OpCode::Query {
        return refuse(ResponseCode::NotImp);
    }
    if let Some(e) = &request.edns {
        if e.version() > 0 {
            return refuse(ResponseCode::BADVERS);
        }
    }
    if request.queries.len() != 1 {
        return refuse(ResponseCode::FormErr);
    }
    let query = request.queries[0].clone();
    if query.query_class() != DNSClass::IN {
        return refuse(ResponseCode::Refused);
    }
    if matches!(
        query.query_type(),
        RecordType::AXFR | RecordType::IXFR | RecordType::OPT
    ) {
        return refuse(ResponseCode::Refused);
    }
    let mut m = response(&request, ResponseCode::NoError);
    match zone.lookup(query.name(), query.query_type()) {
        Answer::Outside => {
            return Step::Forward {
                request: Box::new(request),
                query,
                prefix: Vec::new(),
            }
        }
        Answer::Records(answers, extra) => {
            m.metadata.authoritative = true;
            if let Some(target) = cname_to_follow(&answers, query.query_type()) {
                return follow(zone, request, query, answers, target, limit);
            }
            m.answers = answers;
            m.additionals = extra;
        }
        Answer::NoData => negative(zone, &mut m, ResponseCode::NoError),
        Answer::NxDomain => negative(zone, &mut m, ResponseCode::NXDomain),
    }
    Step::Reply(encode(&m, limit))
}

fn negative(zone: &Zone, m: &mut Message, rcode: ResponseCode) {
    m.metadata.authoritative = true;
    m.metadata.response_code = rcode;
    m.authorities.push(zone.soa().clone());
}

/// The target when `answers` is a lone CNAME and the question asked for something else.
fn cname_to_follow(answers: &[Record], qtype: RecordType) -> Option<Name> {
    match answers {
        [r] if qtype != RecordType::CNAME => match &r.data {
            RData::CNAME(c) => Some(c.0.clone()),
            _ => None,
        },
        _ => None,
    }
}

/// Follows a CNAME (ExternalName): inside the zone by lookup (a few hops at most), outside by
/// forwarding the target's question with the chain so far as the answer's prefix.
fn follow(
    zone: &Zone,
    request: Message,
    query: Query,
    mut chain: Vec<Record>,
    mut target: Name,
    limit: usize,
) -> Step {
    for _ in 0..8 {
        match zone.lookup(&target, query.query_type()) {
            Answer::Outside => {
                let mut q = query.clone();
                q.set_name(target);
                return Step::Forward {
                    request: Box::new(request),
                    query: q,
                    prefix: chain,
                };
            }
            Answer::Records(more, extra) => {
                let next = cname_to_follow(&more, query.query_type());
                chain.extend(more);
                match next {
                    Some(t) => target = t,
                    None => {
                        let mut m = response(&request, ResponseCode::NoError);
                        m.metadata.authoritative = true;
                        m.answers = chain;
                        m.additionals = extra;
                        return Step::Reply(encode(&m, limit));
                    }
                }
            }
            negative_answer => {
                let mut m = response(&request, ResponseCode::NoError);
                m.answers = chain;
                let rcode = if negative_answer == Answer::NxDomain {
                    ResponseCode::NXDomain
                } else {
                    ResponseCode::NoError
                };
                negative(zone, &mut m, rcode);
                return Step::Reply(encode(&m, limit));
            }
        }
    }
    Step::Reply(encode(&response(&request, ResponseCode::ServFail), limit))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::zone::ZoneConfig;
    use cluster::ClusterState;
    use std::str::FromStr;

    fn zone() -> Zone {
        let state = ClusterState {
            services: vec![
                serde_json::from_value(serde_json::json!({"metadata": {"name": "web"},
                    "spec": {"clusterIP": "10.96.0.20"}}))
                .unwrap(),
                serde_json::from_value(serde_json::json!({"metadata": {"name": "ext"},
                    "spec": {"type": "ExternalName", "externalName": "www.example.org"}}))
                .unwrap(),
                serde_json::from_value(serde_json::json!({"metadata": {"name": "alias"},
                    "spec": {"type": "ExternalName", "externalName": "web.default.svc.cluster.local"}}))
                .unwrap(),
            ],
            ..ClusterState::default()
        };
        Zone::build(&ZoneConfig::default(), &state)
    }

    fn query(name: &str, t: RecordType, edns: bool) -> Message {
        let mut m = Message::query();
        m.metadata.recursion_desired = true;
        m.add_query(Query::query(Name::from_ascii(name).unwrap(), t));
        if edns {
            let mut e = Edns::new();
            e.set_max_payload(4096);
            m.edns = Some(e);
        }
        m
    }

    fn ask(z: &Zone, m: &Message) -> Message {
        match handle(z, &m.to_vec().unwrap(), udp_limit) {
            Step::Reply(b) => Message::from_vec(&b).unwrap(),
            other => panic!("expected a reply, got {other:?}"),
        }
    }

    #[test]
    fn answers_keep_id_question_and_flags() {
        let q = query("Web.Default.svc.cluster.local.", RecordType::A, true);
        let r = ask(&zone(), &q);
        assert_eq!(r.metadata.id, q.metadata.id);
        assert!(r.metadata.authoritative && r.metadata.recursion_desired);
        assert_eq!(r.queries, q.queries);
        assert_eq!(
            r.answers[0].name.to_ascii(),
            "Web.Default.svc.cluster.local."
        );
        assert!(r.edns.is_some(), "an OPT record answers an OPT record");
    }

    #[test]
    fn negative_answers_carry_the_soa() {
        let z = zone();
        let r = ask(
            &z,
            &query("nope.default.svc.cluster.local.", RecordType::A, false),
        );
        assert_eq!(r.metadata.response_code, ResponseCode::NXDomain);
        assert_eq!(r.authorities[0].record_type(), RecordType::SOA);
        assert_eq!(r.authorities[0].ttl, 30);
        let r = ask(
            &z,
            &query("web.default.svc.cluster.local.", RecordType::AAAA, false),
        );
        assert_eq!(r.metadata.response_code, ResponseCode::NoError);
        assert!(r.answers.is_empty());
        assert_eq!(r.authorities.len(), 1);
    }

    #[test]
    fn cnames_are_followed_inside_and_handed_on_outside() {
        let z = zone();
        let r = ask(
            &z,
            &query("alias.default.svc.cluster.local.", RecordType::A, false),
        );
        let types: Vec<RecordType> = r.answers.iter().map(Record::record_type).collect();
        assert_eq!(types, [RecordType::CNAME, RecordType::A]);
        let q = query("ext.default.svc.cluster.local.", RecordType::A, false);
        match handle(&z, &q.to_vec().unwrap(), udp_limit) {
            Step::Forward { query, prefix, .. } => {
                assert_eq!(query.name().to_ascii(), "www.example.org.");
                assert_eq!(prefix.len(), 1);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn bad_input_gets_formerr_or_silence() {
        let z = zone();
        // Garbage with a header: FORMERR echoing the ID.
        let mut junk = vec![0xab, 0xcd, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        junk.extend([0xc0, 0x0c, 0, 1, 0, 1]); // a name pointing at itself
        match handle(&z, &junk, udp_limit) {
            Step::Reply(b) => {
                assert_eq!(&b[..2], &[0xab, 0xcd]);
                assert_eq!(b[3] & 0x0f, 1);
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(handle(&z, &[1, 2, 3], udp_limit), Step::Drop));
        // A response is never answered.
        let mut resp = query("web.default.svc.cluster.local.", RecordType::A, false);
        resp.metadata.message_type = MessageType::Response;
        assert!(matches!(
            handle(&z, &resp.to_vec().unwrap(), udp_limit),
            Step::Drop
        ));
        // Two questions, another class, another opcode, EDNS version 1.
        let mut two = query("a.cluster.local.", RecordType::A, false);
        two.add_query(Query::query(
            Name::from_str("b.cluster.local.").unwrap(),
            RecordType::A,
        ));
        assert_eq!(ask(&z, &two).metadata.response_code, ResponseCode::FormErr);
        let mut chaos = query("version.bind.", RecordType::TXT, false);
        chaos.queries[0].set_query_class(DNSClass::CH);
        assert_eq!(
            ask(&z, &chaos).metadata.response_code,
            ResponseCode::Refused
        );
        let mut notify = query("cluster.local.", RecordType::SOA, false);
        notify.metadata.op_code = OpCode::Notify;
        assert_eq!(
            ask(&z, &notify).metadata.response_code,
            ResponseCode::NotImp
        );
        let mut v1 = query("web.default.svc.cluster.local.", RecordType::A, true);
        v1.edns.as_mut().unwrap().set_version(1);
        assert_eq!(
            u16::from(ask(&z, &v1).metadata.response_code),
            16,
            "BADVERS"
        );
    }

    #[test]
    fn oversize_answers_are_truncated_for_udp() {
        let mut state = ClusterState::default();
        let eps: Vec<String> = (1..=100).map(|i| format!("10.244.1.{i}")).collect();
        state.services.push(
            serde_json::from_value(serde_json::json!({"metadata": {"name": "big"},
                "spec": {"clusterIP": "None"}}))
            .unwrap(),
        );
        state.endpoint_slices.push(serde_json::from_value(serde_json::json!({
            "metadata": {"name": "big-1", "labels": {"kubernetes.io/service-name": "big"}},
            "addressType": "IPv4",
            "endpoints": eps.iter().map(|a| serde_json::json!({"addresses": [a]})).collect::<Vec<_>>()
        })).unwrap());
        let z = Zone::build(&ZoneConfig::default(), &state);
        let q = query("big.default.svc.cluster.local.", RecordType::A, false);
        let r = ask(&z, &q);
        assert!(r.metadata.truncation && r.answers.is_empty());
        match handle(&z, &q.to_vec().unwrap(), |_| 65535) {
            Step::Reply(b) => assert_eq!(Message::from_vec(&b).unwrap().answers.len(), 100),
            other => panic!("{other:?}"),
        }
        // With EDNS 4096 the client still gets at most MAX_UDP bytes.
        let r = ask(
            &z,
            &query("big.default.svc.cluster.local.", RecordType::A, true),
        );
        assert!(r.metadata.truncation);
    }

    proptest::proptest! {
        #[test]
        fn never_panics_on_random_bytes(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..600)) {
            let _ = handle(&zone(), &bytes, udp_limit);
        }

        #[test]
        fn never_panics_on_mutated_queries(flips in proptest::collection::vec((0usize..64, proptest::num::u8::ANY), 1..8)) {
            let mut b = query("web.default.svc.cluster.local.", RecordType::SRV, true).to_vec().unwrap();
            for (i, v) in flips {
                let n = b.len();
                b[i % n] = v;
            }
            let _ = handle(&zone(), &b, udp_limit);
        }
    }
}
