//! The server: UDP and TCP on one port, `/health`, `/ready` and `/metrics` over HTTP, and a
//! watcher that rebuilds the zone when the cluster state changes.
//!
//! Why not hickory-server's `Server`: it builds a request object, a response handle and the
//! answer through its record-set machinery for every query, in a task per request. Here a
//! UDP question the zone owns is answered inline on the receiving task (parse, one hash lookup,
//! encode, send), one `SO_REUSEPORT` socket per worker thread so the kernel spreads clients
//! over cores; only forwarded questions get a task of their own. hickory-proto still does all
//! wire-format work.

use crate::answer::{self, Step};
use crate::forward::{Forwarder, Upstream};
use crate::metrics::{Metrics, Transport};
use crate::rendered::Answers;
use crate::zone::{LiveZone, Zone, ZoneConfig};
use cluster::store::{Store, Update};
use hickory_proto::op::{Message, Query, ResponseCode};
use hickory_proto::rr::{Record, RecordType};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

/// Forwarded questions in flight at once; beyond it a question gets SERVFAIL at once rather
/// than memory without bound.
const MAX_IN_FLIGHT: usize = 10_000;
/// How long a TCP or HTTP client may stay silent.
const IDLE: Duration = Duration::from_secs(10);

pub struct Options {
    pub listen: SocketAddr,
    pub http: Option<SocketAddr>,
    /// Where cluster state comes from; `None`: a zone without cluster objects.
    pub source: Option<state::SourceArgs>,
    pub zone: ZoneConfig,
    pub upstreams: Vec<SocketAddr>,
    pub timeout: Duration,
    pub cache_size: usize,
    pub workers: usize,
    /// After each zone update, write the source's mark to `<dir>/<hostname>` (so a lab or a
    /// test can wait for every replica to catch up).
    pub status_dir: Option<PathBuf>,
    /// A hosts file whose names the zone answers, re-read when it changes (without a source:
    /// the lab internet's DNS, to which the lab publishes its Ingress hostnames).
    pub hosts: Option<PathBuf>,
}

pub struct Server {
    zone: RwLock<Arc<Answers>>,
    forwarder: Forwarder,
    metrics: Arc<Metrics>,
    ready: AtomicBool,
    in_flight: Semaphore,
}

/// A reply carrying an upstream's answer, after the zone's CNAME chain if any.
fn reply_from(request: &Message, prefix: Vec<Record>, up: Upstream, limit: usize) -> Vec<u8> {
    let mut m = answer::response(request, up.rcode);
    m.answers = prefix;
    m.answers.extend(up.answers);
    m.authorities = up.authorities;
    m.additionals = up.additionals;
    answer::encode(&m, limit)
}

/// The type of the first question, read straight off the wire (for metrics).
fn question_type(packet: &[u8]) -> RecordType {
    let mut i = 12;
    while let Some(&len) = packet.get(i) {
        if len == 0 || len & 0xc0 != 0 {
            break;
        }
        i += 1 + len as usize;
    }
    i += if packet.get(i).is_some_and(|l| l & 0xc0 != 0) {
        2
    } else {
        1
    };
    match packet.get(i..i + 2) {
        Some(t) => RecordType::from(u16::from_be_bytes([t[0], t[1]])),
        None => RecordType::Unknown(0),
    }
}

impl Server {
    pub fn new(opts: &Options, metrics: Arc<Metrics>) -> Server {
        Server {
            zone: RwLock::new(Arc::new(Answers::new(Zone::new(&opts.zone)))),
            forwarder: Forwarder::new(
                opts.upstreams.clone(),
                opts.timeout,
                opts.cache_size,
                metrics.clone(),
            ),
            metrics,
            ready: AtomicBool::new(opts.source.is_none()),
            in_flight: Semaphore::new(MAX_IN_FLIGHT),
        }
    }

    pub fn zone(&self) -> Arc<Answers> {
        self.zone.read().expect("zone").clone()
    }

    pub fn set_zone(&self, z: Zone) {
        self.metrics.zone_names.set(z.len() as i64);
        *self.zone.write().expect("zone") = Arc::new(Answers::new(z));
        self.ready.store(true, Ordering::Relaxed);
    }

    fn count(&self, transport: Transport, packet: &[u8], reply: &[u8]) {
        let rcode = reply.get(3).map_or(2, |b| b & 0x0f);
        self.metrics.count(transport, question_type(packet), rcode);
    }

    /// The reply to a forwarded question.
    async fn forward(
        &self,
        request: Box<Message>,
        query: Query,
        prefix: Vec<Record>,
        limit: usize,
    ) -> Vec<u8> {
        let up = if self.forwarder.upstreams.is_empty() {
            Upstream {
                // Not recursive without upstreams: REFUSED, as an authoritative-only server.
                rcode: if prefix.is_empty() {
                    ResponseCode::Refused
                } else {
                    ResponseCode::NoError
                },
                answers: Vec::new(),
                authorities: Vec::new(),
                additionals: Vec::new(),
            }
        } else {
            self.forwarder.resolve(&query).await
        };
        reply_from(&request, prefix, up, limit)
    }

    /// The reply to a forwarded question when the cache has its answer (no task, no wait).
    fn cached_reply(
        &self,
        request: &Message,
        query: &Query,
        prefix: Vec<Record>,
        limit: usize,
    ) -> Option<Vec<u8>> {
        let up = self.forwarder.cached(query)?;
        Some(reply_from(request, prefix, up, limit))
    }

    /// One message in, its reply out (`None`: silence), forwarding inline (TCP's path).
    async fn reply(&self, packet: &[u8], limit: usize) -> Option<Vec<u8>> {
        let step = self.zone().handle(packet, |_| limit);
        match step {
            Step::Reply(b) => Some(b),
            Step::Drop => None,
            Step::Forward {
                request,
                query,
                prefix,
            } => Some(self.forward(request, query, prefix, limit).await),
        }
    }
}

fn reuseport_udp(addr: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    use nix::sys::socket::{
        bind, setsockopt, socket, sockopt, AddressFamily, SockFlag, SockType, SockaddrStorage,
    };
    let family = if addr.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    let fd = socket(family, SockType::Datagram, SockFlag::SOCK_CLOEXEC, None)?;
    setsockopt(&fd, sockopt::ReusePort, &true)?;
    bind(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &SockaddrStorage::from(addr),
    )?;
    Ok(std::net::UdpSocket::from(fd))
}

/// One socket's receive loop (a blocking thread; see [`crate::udp`]).
fn udp_loop(server: Arc<Server>, sock: Arc<std::net::UdpSocket>, rt: tokio::runtime::Handle) {
    let mut batch = crate::udp::Batch::default();
    let mut replies = Vec::with_capacity(crate::udp::BATCH);
    loop {
        if batch.receive(&sock).is_err() {
            continue;
        }
        let answers = server.zone();
        for (packet, peer) in batch.packets() {
            match answers.handle(packet, answer::udp_limit) {
                Step::Reply(b) => {
                    server.count(Transport::Udp, packet, &b);
                    replies.push((b, peer));
                }
                Step::Drop => {}
                Step::Forward {
                    request,
                    query,
                    prefix,
                } => {
                    let limit = answer::udp_limit(&request);
                    if let Some(b) = server.cached_reply(&request, &query, prefix.clone(), limit) {
                        answers.remember_forwarded(packet, &b);
                        server.count(Transport::Udp, packet, &b);
                        replies.push((b, peer));
                        continue;
                    }
                    let Ok(permit) = server.in_flight.try_acquire() else {
                        let b = answer::encode(
                            &answer::response(&request, ResponseCode::ServFail),
                            limit,
                        );
                        server.count(Transport::Udp, packet, &b);
                        replies.push((b, peer));
                        continue;
                    };
                    permit.forget();
                    let Some(dest) = peer.socket_addr() else {
                        server.in_flight.add_permits(1);
                        continue;
                    };
                    let (server, sock, packet) = (server.clone(), sock.clone(), packet.to_vec());
                    rt.spawn(async move {
                        let b = server.forward(request, query, prefix, limit).await;
                        server.in_flight.add_permits(1);
                        server.zone().remember_forwarded(&packet, &b);
                        server.count(Transport::Udp, &packet, &b);
                        let _ = sock.send_to(&b, dest);
                    });
                }
            }
        }
        crate::udp::send_all(&sock, &mut replies);
        replies.clear();
    }
}

async fn tcp_conn(server: Arc<Server>, mut s: TcpStream) {
    loop {
        let Ok(Ok(len)) = tokio::time::timeout(IDLE, s.read_u16()).await else {
            return;
        };
        let mut buf = vec![0u8; len as usize];
        if !matches!(
            tokio::time::timeout(IDLE, s.read_exact(&mut buf)).await,
            Ok(Ok(_))
        ) {
            return;
        }
        let Some(b) = server.reply(&buf, 65535).await else {
            continue;
        };
        server.count(Transport::Tcp, &buf, &b);
        let mut framed = (b.len() as u16).to_be_bytes().to_vec();
        framed.extend_from_slice(&b);
        if s.write_all(&framed).await.is_err() {
            return;
        }
    }
}

async fn http_conn(server: Arc<Server>, mut s: TcpStream) {
    let mut buf = vec![0u8; 4096];
    let mut n = 0;
    while !buf[..n].windows(4).any(|w| w == b"\r\n\r\n") && n < buf.len() {
        match tokio::time::timeout(IDLE, s.read(&mut buf[n..])).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return,
            Ok(Ok(k)) => n += k,
        }
    }
    let head = String::from_utf8_lossy(&buf[..n]);
    let path = head.split_whitespace().nth(1).unwrap_or("/");
    let (status, body) = match path {
        "/health" => ("200 OK", "OK\n".to_string()),
        "/ready" if server.ready.load(Ordering::Relaxed) => ("200 OK", "OK\n".to_string()),
        "/ready" => (
            "503 Service Unavailable",
            "waiting for the first sync\n".to_string(),
        ),
        "/metrics" => ("200 OK", server.metrics.encode()),
        _ => (
            "404 Not Found",
            "try /health, /ready or /metrics\n".to_string(),
        ),
    };
    let _ = s
        .write_all(
            format!(
                "HTTP/1.1 {status}\r\ncontent-type: text/plain; version=0.0.4\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
        )
        .await;
}

/// Keeps the zone in step with the source: the first complete listing builds it, each later
/// batch of changes updates only the records of the objects it touches.
fn follow(
    server: Arc<Server>,
    updates: std::sync::mpsc::Receiver<Vec<Update>>,
    cfg: ZoneConfig,
    status_dir: Option<PathBuf>,
) {
    let status = status_dir.map(|d| state::replica_status_path(&d, ""));
    let metrics = server.metrics.source.clone();
    let mut store = Store::new();
    let mut live: Option<LiveZone> = None;
    while let Ok(mut batch) = updates.recv() {
        while let Ok(more) = updates.try_recv() {
            batch.extend(more);
        }
        let started = std::time::Instant::now();
        metrics.observe(&batch);
        let changes = store.apply(batch);
        for e in store.take_errors() {
            tracing::warn!("{e}");
        }
        if !store.synced() {
            continue;
        }
        match &mut live {
            Some(z) => {
                if z.apply(&store, &changes) {
                    server.set_zone(z.zone());
                }
            }
            None => {
                let z = live.insert(LiveZone::new(&cfg, &store));
                server.set_zone(z.zone());
                // The parsed objects were several times the zone's size.
                cluster::release_freed_memory();
            }
        }
        metrics.count(&store);
        metrics.synced("dns", started.elapsed());
        if let (Some(path), Some(mark)) = (&status, store.mark()) {
            let written = state::write_atomic(path, mark);
            if let Err(e) = written {
                tracing::warn!("{}: {e}", path.display());
            }
        }
    }
    tracing::warn!("the source ended; serving the last zone");
}

/// Keeps the zone's fixed records in step with a hosts file; after each load, the file's mark
/// goes to `<status dir>/<hostname>.hosts`.
fn follow_hosts(server: Arc<Server>, path: &std::path::Path, opts: &Options) -> Result<(), String> {
    let cfg = opts.zone.clone();
    let status = opts
        .status_dir
        .as_deref()
        .map(|d| state::replica_status_path(d, ".hosts"));
    let shown = path.display().to_string();
    state::file::watch_text(path.to_path_buf(), move |text| {
        let (records, problems) = crate::zone::parse_hosts(text);
        for p in problems {
            tracing::warn!("{shown}: {p}");
        }
        let mut cfg = cfg.clone();
        cfg.records.extend(records);
        server.set_zone(Zone::new(&cfg));
        if let Some(path) = &status {
            if let Err(e) = state::write_atomic(path, &state::file::text_mark(text)) {
                tracing::warn!("{}: {e}", path.display());
            }
        }
    })
}

/// Runs the server until the process is killed.
pub fn run(opts: Options) -> Result<(), String> {
    let metrics = Arc::new(Metrics::default());
    let server = Arc::new(Server::new(&opts, metrics));
    // The source runs on threads of its own (the kube source's runtime is not this one).
    let updates = match &opts.source {
        Some(source) => Some(source.start(crate::watches())?),
        None => None,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(opts.workers.max(1))
        .enable_all()
        .build()
        .map_err(|e| format!("starting the runtime: {e}"))?;
    rt.block_on(async {
        let bind_err =
            |what: &str, e: std::io::Error| format!("binding {what} {}: {e}", opts.listen);
        for _ in 0..opts.workers.max(1) {
            let sock = Arc::new(reuseport_udp(opts.listen).map_err(|e| bind_err("UDP", e))?);
            let (s, rt) = (server.clone(), tokio::runtime::Handle::current());
            std::thread::spawn(move || udp_loop(s, sock, rt));
        }
        let tcp = TcpListener::bind(opts.listen)
            .await
            .map_err(|e| bind_err("TCP", e))?;
        let s = server.clone();
        tokio::spawn(async move {
            while let Ok((conn, _)) = tcp.accept().await {
                tokio::spawn(tcp_conn(s.clone(), conn));
            }
        });
        if let Some(addr) = opts.http {
            let http = TcpListener::bind(addr)
                .await
                .map_err(|e| format!("binding HTTP {addr}: {e}"))?;
            let s = server.clone();
            tokio::spawn(async move {
                while let Ok((conn, _)) = http.accept().await {
                    tokio::spawn(http_conn(s.clone(), conn));
                }
            });
        }
        match updates {
            Some(updates) => {
                let (s, cfg, status) = (server.clone(), opts.zone.clone(), opts.status_dir.clone());
                std::thread::spawn(move || follow(s, updates, cfg, status));
            }
            None => match &opts.hosts {
                Some(path) => follow_hosts(server.clone(), path, &opts)?,
                None => server.set_zone(Zone::new(&opts.zone)),
            },
        }
        tracing::info!(
            "{} on {} (UDP, TCP), upstreams {:?}",
            opts.zone.domain,
            opts.listen,
            opts.upstreams
        );
        std::future::pending::<()>().await;
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn question_type_is_read_off_the_wire() {
        let mut m = Message::query();
        m.add_query(Query::query(
            "a.b.example.".parse().unwrap(),
            RecordType::SRV,
        ));
        assert_eq!(question_type(&m.to_vec().unwrap()), RecordType::SRV);
        assert_eq!(question_type(&[0; 5]), RecordType::Unknown(0));
    }
}
