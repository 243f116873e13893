//! Forwarding with a cache: questions outside the cluster zone go to the upstream servers, in
//! order, each tried over UDP (again over TCP when the answer comes back truncated) within a
//! timeout, the next one on a timeout, an error or SERVFAIL. Answers are cached for their TTL
//! (the smallest in the answer); NXDOMAIN and NODATA for the SOA's negative TTL (RFC 2308);
//! failures are not cached. The cache is bounded: when full, expired entries go first, then an
//! arbitrary tenth.

use crate::metrics::Metrics;
use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{RData, Record};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// An upstream answer as cached: its rcode and sections (OPT stripped).
#[derive(Debug, Clone)]
pub struct Upstream {
    pub rcode: ResponseCode,
    pub answers: Vec<Record>,
    pub authorities: Vec<Record>,
    pub additionals: Vec<Record>,
}

struct Entry {
    answer: Arc<Upstream>,
    stored: Instant,
    ttl: u32,
}

type CacheKey = (String, u16, u16);

pub struct Forwarder {
    pub upstreams: Vec<SocketAddr>,
    pub timeout: Duration,
    max_entries: usize,
    /// The longest a positive answer is kept, whatever its TTL.
    max_ttl: u32,
    cache: Mutex<HashMap<CacheKey, Entry>>,
    metrics: Arc<Metrics>,
}

fn cache_key(q: &Query) -> CacheKey {
    (
        crate::zone::key(q.name()),
        u16::from(q.query_type()),
        u16::from(q.query_class()),
    )
}

/// How long an answer may be cached; `None`: not at all.
fn cache_ttl(u: &Upstream, max_ttl: u32) -> Option<u32> {
    match u.rcode {
        ResponseCode::NoError if !u.answers.is_empty() => u
            .answers
            .iter()
            .map(|r| r.ttl)
            .min()
            .map(|t| t.min(max_ttl)),
        ResponseCode::NoError | ResponseCode::NXDomain => {
            u.authorities.iter().find_map(|r| match &r.data {
                RData::SOA(soa) => Some(r.ttl.min(soa.minimum).min(max_ttl)),
                _ => None,
            })
        }
        _ => None,
    }
}

fn aged(records: &[Record], age: u32) -> Vec<Record> {
    records
        .iter()
        .map(|r| {
            let mut r = r.clone();
            r.ttl = r.ttl.saturating_sub(age);
            r
        })
        .collect()
}

impl Forwarder {
    pub fn new(
        upstreams: Vec<SocketAddr>,
        timeout: Duration,
        max_entries: usize,
        metrics: Arc<Metrics>,
    ) -> Forwarder {
        Forwarder {
            upstreams,
            timeout,
            max_entries,
            max_ttl: 3600,
            cache: Mutex::new(HashMap::new()),
            metrics,
        }
    }

    /// A cached answer, its TTLs lowered by its age (a hit is counted).
    pub fn cached(&self, q: &Query) -> Option<Upstream> {
        let hit = self.lookup(q);
        if hit.is_some() {
            self.metrics.cache_hits.inc();
        }
        hit
    }

    fn lookup(&self, q: &Query) -> Option<Upstream> {
        let cache = self.cache.lock().expect("cache");
        let e = cache.get(&cache_key(q))?;
        let age = e.stored.elapsed().as_secs() as u32;
        if age >= e.ttl {
            return None;
        }
        let a = &e.answer;
        Some(Upstream {
            rcode: a.rcode,
            answers: aged(&a.answers, age),
            authorities: aged(&a.authorities, age),
            additionals: aged(&a.additionals, age),
        })
    }

    fn store(&self, q: &Query, answer: Upstream) {
        let Some(ttl) = cache_ttl(&answer, self.max_ttl).filter(|t| *t > 0) else {
            return;
        };
        let mut cache = self.cache.lock().expect("cache");
        if cache.len() >= self.max_entries {
            cache.retain(|_, e| e.stored.elapsed().as_secs() < u64::from(e.ttl));
            if cache.len() >= self.max_entries {
                let drop: Vec<CacheKey> = cache
                    .keys()
                    .take(self.max_entries / 10 + 1)
                    .cloned()
                    .collect();
                for k in drop {
                    cache.remove(&k);
                }
            }
        }
        cache.insert(
            cache_key(q),
            Entry {
                answer: Arc::new(answer),
                stored: Instant::now(),
                ttl,
            },
        );
        self.metrics.cache_entries.set(cache.len() as i64);
    }

    /// The answer to `q`: from the cache, else from the first upstream that gives one.
    pub async fn resolve(&self, q: &Query) -> Upstream {
        if let Some(hit) = self.cached(q) {
            return hit;
        }
        self.metrics.cache_misses.inc();
        let mut last = ResponseCode::ServFail;
        for up in &self.upstreams {
            let started = Instant::now();
            match self.exchange(*up, q).await {
                Ok(m)
                    if m.metadata.response_code != ResponseCode::ServFail
                        && m.metadata.response_code != ResponseCode::Refused =>
                {
                    self.metrics
                        .upstream_seconds
                        .observe(started.elapsed().as_secs_f64());
                    let answer = Upstream {
                        rcode: m.metadata.response_code,
                        answers: m.answers,
                        authorities: m.authorities,
                        additionals: m.additionals,
                    };
                    self.store(q, answer.clone());
                    return answer;
                }
                Ok(m) => last = m.metadata.response_code,
                Err(_) => {}
            }
            self.metrics.upstream_failures.inc();
        }
        Upstream {
            rcode: if last == ResponseCode::Refused {
                last
            } else {
                ResponseCode::ServFail
            },
            answers: Vec::new(),
            authorities: Vec::new(),
            additionals: Vec::new(),
        }
    }

    /// One upstream's answer: UDP, and TCP if that came back truncated.
    async fn exchange(&self, up: SocketAddr, q: &Query) -> std::io::Result<Message> {
        let mut m = Message::new(rand_id(), MessageType::Query, OpCode::Query);
        m.metadata.recursion_desired = true;
        m.add_query(q.clone());
        let mut e = Edns::new();
        e.set_max_payload(crate::answer::MAX_UDP);
        m.edns = Some(e);
        let bytes = m.to_vec().map_err(std::io::Error::other)?;
        let id = m.metadata.id;
        let r = tokio::time::timeout(self.timeout, udp(up, &bytes, id, q))
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer"))??;
        if !r.metadata.truncation {
            return Ok(r);
        }
        tokio::time::timeout(self.timeout, tcp(up, &bytes, id, q))
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer over TCP"))?
    }
}

fn rand_id() -> u16 {
    let mut b = [0u8; 2];
    // getrandom(2) through std's hasher seed would be indirect; /dev/urandom never blocks.
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        use std::io::Read;
        let _ = f.read_exact(&mut b);
    }
    u16::from_ne_bytes(b)
}

fn matches(r: &Message, id: u16, q: &Query) -> bool {
    r.metadata.id == id
        && r.metadata.message_type == MessageType::Response
        && r.queries.len() == 1
        && crate::zone::key(r.queries[0].name()) == crate::zone::key(q.name())
        && r.queries[0].query_type() == q.query_type()
}

/// A fresh socket (a random source port) per question, answers from elsewhere ignored.
async fn udp(up: SocketAddr, bytes: &[u8], id: u16, q: &Query) -> std::io::Result<Message> {
    let local: SocketAddr = if up.is_ipv4() {
        "0.0.0.0:0".parse().expect("addr")
    } else {
        "[::]:0".parse().expect("addr")
    };
    let sock = tokio::net::UdpSocket::bind(local).await?;
    sock.connect(up).await?;
    sock.send(bytes).await?;
    let mut buf = vec![0u8; 65535];
    loop {
        let n = sock.recv(&mut buf).await?;
        if let Ok(m) = Message::from_vec(&buf[..n]) {
            if matches(&m, id, q) {
                return Ok(m);
            }
        }
    }
}

async fn tcp(up: SocketAddr, bytes: &[u8], id: u16, q: &Query) -> std::io::Result<Message> {
    let mut s = tokio::net::TcpStream::connect(up).await?;
    let mut framed = (bytes.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(bytes);
    s.write_all(&framed).await?;
    let len = s.read_u16().await? as usize;
    let mut buf = vec![0u8; len];
    s.read_exact(&mut buf).await?;
    let m = Message::from_vec(&buf).map_err(std::io::Error::other)?;
    if matches(&m, id, q) {
        Ok(m)
    } else {
        Err(std::io::Error::other("an answer to another question"))
    }
}

/// The `nameserver` lines of a resolv.conf, port 53.
pub fn resolv_conf_servers(text: &str) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            (w.next() == Some("nameserver")).then(|| w.next())?
        })
        .filter_map(|a| a.parse::<std::net::IpAddr>().ok())
        .map(|ip| SocketAddr::new(ip, 53))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::rr::rdata::{A, SOA};
    use hickory_proto::rr::Name;
    use std::str::FromStr;

    fn rec(ttl: u32, data: RData) -> Record {
        Record::from_rdata(Name::from_str("x.example.").unwrap(), ttl, data)
    }

    #[test]
    fn ttls_follow_rfc_2308() {
        let a = |ttl| rec(ttl, RData::A(A("192.0.2.1".parse().unwrap())));
        let soa = |ttl, min| {
            rec(
                ttl,
                RData::SOA(SOA::new(Name::root(), Name::root(), 1, 1, 1, 1, min)),
            )
        };
        let up = |rcode, answers, authorities| Upstream {
            rcode,
            answers,
            authorities,
            additionals: Vec::new(),
        };
        assert_eq!(
            cache_ttl(
                &up(ResponseCode::NoError, vec![a(300), a(60)], vec![]),
                3600
            ),
            Some(60)
        );
        assert_eq!(
            cache_ttl(&up(ResponseCode::NoError, vec![a(90000)], vec![]), 3600),
            Some(3600)
        );
        assert_eq!(
            cache_ttl(
                &up(ResponseCode::NXDomain, vec![], vec![soa(900, 120)]),
                3600
            ),
            Some(120)
        );
        assert_eq!(
            cache_ttl(&up(ResponseCode::NoError, vec![], vec![soa(60, 120)]), 3600),
            Some(60)
        );
        assert_eq!(
            cache_ttl(&up(ResponseCode::NXDomain, vec![], vec![]), 3600),
            None
        );
        assert_eq!(
            cache_ttl(&up(ResponseCode::ServFail, vec![], vec![]), 3600),
            None
        );
    }

    #[test]
    fn the_cache_is_bounded_and_ages_ttls() {
        let f = Forwarder::new(
            Vec::new(),
            Duration::from_secs(1),
            10,
            Arc::new(Metrics::default()),
        );
        for i in 0..25 {
            let q = Query::query(
                Name::from_str(&format!("n{i}.example.")).unwrap(),
                hickory_proto::rr::RecordType::A,
            );
            f.store(
                &q,
                Upstream {
                    rcode: ResponseCode::NoError,
                    answers: vec![rec(100, RData::A(A("192.0.2.1".parse().unwrap())))],
                    authorities: Vec::new(),
                    additionals: Vec::new(),
                },
            );
        }
        assert!(f.cache.lock().unwrap().len() <= 10);
        let q = Query::query(
            Name::from_str("n24.example.").unwrap(),
            hickory_proto::rr::RecordType::A,
        );
        assert_eq!(f.lookup(&q).unwrap().answers[0].ttl, 100);
    }

    #[test]
    fn resolv_conf_lines() {
        let text =
            "# comment\nsearch x\nnameserver 203.0.113.10\nnameserver ::1\nnameserver bogus\n";
        assert_eq!(
            resolv_conf_servers(text),
            vec![
                "203.0.113.10:53".parse().unwrap(),
                "[::1]:53".parse().unwrap()
            ]
        );
    }
}
