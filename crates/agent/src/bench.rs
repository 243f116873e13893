//! `flatnet state bench`: how long one change takes from its source to the kernel and to DNS
//! answers, with N Services × E endpoints present, for each source. A throw-away namespace is
//! the node (`eth0` at 172.18.0.2/24); `flatnet agent` and `flatnet dns` run in it as they
//! would on a node, fed by the `file` source (a directory of one file per object, as the lab
//! writes it) or the `kube` source (the stand-in API server on the namespace's loopback). Each
//! change is timed from the write (a file renamed into place, or the API server's commit) to
//! the moment a probe sees it:
//! - an EndpointSlice change: a Service's endpoints become one local address, and a `connect()`
//!   to its ClusterIP is answered (the packet takes the new DNAT); and a headless Service's
//!   slice gains an address, and the DNS answer holds it;
//! - a new Service (with its slice): its ClusterIP answers a `connect()`, its name resolves;
//! - a new Node: the route to its pod CIDR is in the kernel (netlink).
//!
//! Also reported: the CPU the agent and the DNS server spent per change (from /proc), and their
//! memory.

use netlink::Netlink;
use serde_json::{json, Value};
use state::standin::ApiServer;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The local endpoint changed Services point at.
const LOCAL_EP: &str = "10.250.0.1";
const DNS_PORT: u16 = 5353;

#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub sizes: Vec<usize>,
    pub endpoints: usize,
    /// Changes timed per kind.
    pub changes: usize,
}

fn nth(base: [u8; 4], n: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::from(base)) + n as u32)
}

fn service(name: &str, ip: Option<Ipv4Addr>) -> Value {
    let ip = ip.map_or("None".to_string(), |i| i.to_string());
    json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": "bench"},
           "spec": {"clusterIP": ip, "clusterIPs": [ip], "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}})
}

fn slice(svc: &str, ips: &[Ipv4Addr]) -> Value {
    let eps: Vec<Value> = ips
        .iter()
        .map(|ip| json!({"addresses": [ip.to_string()], "nodeName": "node-2", "conditions": {"ready": true}}))
        .collect();
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
           "metadata": {"name": format!("{svc}-x"), "namespace": "bench",
                        "labels": {"kubernetes.io/service-name": svc}},
           "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}], "endpoints": eps})
}

fn node(i: usize) -> Value {
    json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": format!("node-{i}")},
           "spec": {"podCIDR": format!("10.244.{i}.0/24")},
           "status": {"addresses": [{"type": "InternalIP", "address": nth([172, 18, 0, 1], i).to_string()}]}})
}

/// Where the objects go: files or the stand-in API server.
enum Feed {
    File(PathBuf),
    Kube(ApiServer),
}

impl Feed {
    fn put(&self, o: &Value) -> Result<(), String> {
        match self {
            Feed::File(dir) => {
                let kind = o["kind"].as_str().unwrap_or_default().to_ascii_lowercase();
                let ns = o["metadata"]["namespace"].as_str().unwrap_or("cluster");
                let name = o["metadata"]["name"].as_str().unwrap_or_default();
                let sub = dir.join(kind);
                let path = sub.join(format!("{ns}.{name}.json"));
                let tmp = sub.join(format!("{ns}.{name}.tmp"));
                std::fs::create_dir_all(&sub)
                    .and_then(|()| std::fs::write(&tmp, o.to_string()))
                    .and_then(|()| std::fs::rename(&tmp, &path))
                    .map_err(|e| format!("{}: {e}", path.display()))
            }
            Feed::Kube(api) => api.apply(o.clone()).map(drop),
        }
    }
}

/// A process of ours, killed when dropped.
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Daemon {
    /// User and system CPU time so far (system time includes the kernel's work for its
    /// netlink messages: nf_tables validating the table on commit).
    fn cpu(&self) -> (Duration, Duration) {
        let stat =
            std::fs::read_to_string(format!("/proc/{}/stat", self.0.id())).unwrap_or_default();
        let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
        let f: Vec<u64> = rest
            .split_whitespace()
            .map(|x| x.parse().unwrap_or(0))
            .collect();
        // USER_HZ is 100 on Linux.
        let ticks = |i: usize| Duration::from_millis(f.get(i).copied().unwrap_or(0) * 10);
        (ticks(11), ticks(12))
    }

    fn rss_mib(&self) -> f64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.0.id()))
            .ok()
            .and_then(|s| {
                let kib: f64 = s
                    .lines()
                    .find(|l| l.starts_with("VmRSS:"))?
                    .split_whitespace()
                    .nth(1)?
                    .parse()
                    .ok()?;
                Some(kib / 1024.0)
            })
            .unwrap_or(0.0)
    }
}

fn sh(ns: &str, cmd: &str) -> Result<(), String> {
    let ok = Command::new("ip")
        .args(["netns", "exec", ns])
        .args(cmd.split(' '))
        .status()
        .map_err(|e| e.to_string())?;
    ok.success()
        .then_some(())
        .ok_or_else(|| format!("{cmd} failed"))
}

/// A DNS query for `name` (A) over UDP; the answer's addresses.
fn resolve(sock: &UdpSocket, name: &str) -> Vec<Ipv4Addr> {
    use hickory_proto::op::{Message, Query};
    use hickory_proto::rr::{Name, RData, RecordType};
    let mut m = Message::query();
    m.add_query(Query::query(
        Name::from_ascii(name).expect("a name"),
        RecordType::A,
    ));
    let _ = sock.send(&m.to_vec().expect("a query"));
    let mut buf = [0u8; 4096];
    let Ok(n) = sock.recv(&mut buf) else {
        return Vec::new();
    };
    Message::from_vec(&buf[..n])
        .map(|r| {
            r.answers
                .iter()
                .filter_map(|a| match &a.data {
                    RData::A(a) => Some(a.0),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Whether `ip:80` answers (the SYN's DNAT reached the local endpoint). Each attempt comes from
/// a source port of its own: a port the kernel handed out again would match the conntrack
/// entry of an earlier, unanswered SYN and follow that one's DNAT to the old endpoint.
fn answers(ip: Ipv4Addr) -> bool {
    use std::sync::atomic::{AtomicU16, Ordering};
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let port = 20_000 + NEXT.fetch_add(1, Ordering::Relaxed) % 40_000;
    let Ok(s) = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None) else {
        return false;
    };
    let _ = s.set_reuse_address(true);
    if s.bind(&SocketAddr::from(([0, 0, 0, 0], port)).into())
        .is_err()
    {
        return false;
    }
    s.connect_timeout(&SocketAddr::from((ip, 80)).into(), Duration::from_millis(3))
        .is_ok()
}

/// Polls `probe` until true (30 s at most); the time since `from`.
fn until(from: Instant, mut probe: impl FnMut() -> bool) -> Option<Duration> {
    while from.elapsed() < Duration::from_secs(30) {
        if probe() {
            return Some(from.elapsed());
        }
        std::thread::sleep(Duration::from_micros(500));
    }
    None
}

fn since(now: (Duration, Duration), then: (Duration, Duration)) -> (Duration, Duration) {
    (now.0.saturating_sub(then.0), now.1.saturating_sub(then.1))
}

fn pct(v: &mut [Duration], p: f64) -> String {
    if v.is_empty() {
        return "—".into();
    }
    v.sort();
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    format!("{:.1}", v[i].as_secs_f64() * 1e3)
}

struct Row {
    source: &'static str,
    services: usize,
    ready: Duration,
    /// (what, kernel times, DNS times)
    kinds: Vec<(&'static str, Vec<Duration>, Vec<Duration>)>,
    /// (user, system) CPU over the changes.
    agent_cpu: (Duration, Duration),
    dns_cpu: (Duration, Duration),
    changes: usize,
    agent_rss: f64,
    dns_rss: f64,
}

/// One size, one source.
fn run_one(exe: &Path, n: usize, o: &BenchOptions, kube: bool) -> Result<Row, String> {
    let tmp = tempfile::tempdir().map_err(|e| e.to_string())?;
    let ns = netns::TempNetNs::new("fn-statebench").map_err(|e| e.to_string())?;
    for cmd in [
        "ip link set lo up",
        "ip link add eth0 type veth peer name eth0p",
        "ip link set eth0p up",
        "ip addr add 172.18.0.2/16 dev eth0",
        "ip link set eth0 up",
        // ClusterIPs are routed somewhere (as on any node) before the DNAT picks an endpoint.
        "ip route add default dev eth0",
    ] {
        sh(ns.name(), cmd)?;
    }
    sh(ns.name(), &format!("ip addr add {LOCAL_EP}/32 dev lo"))?;
    let net_conf = tmp.path().join("net-conf.json");
    std::fs::write(
        &net_conf,
        r#"{"Network": "10.244.0.0/16", "Backend": {"Type": "host-gw"}}"#,
    )
    .map_err(|e| e.to_string())?;
    let feed = if kube {
        let api = ns.ns().run(ApiServer::start).map_err(|e| e.to_string())??;
        api.write_kubeconfig(&tmp.path().join("kubeconfig"))
            .map_err(|e| e.to_string())?;
        Feed::Kube(api)
    } else {
        Feed::File(tmp.path().join("cluster"))
    };
    // The state present: nodes 1 and 2, N Services with E endpoints on node 2 (unreachable:
    // eth0 is a dummy), one headless Service for the DNS probe.
    feed.put(&node(1))?;
    feed.put(&node(2))?;
    for i in 0..n {
        let name = format!("s{i}");
        feed.put(&service(&name, Some(nth([10, 96, 0, 100], i))))?;
        let eps: Vec<Ipv4Addr> = (0..o.endpoints)
            .map(|e| nth([10, 244, 2, 2], (i * o.endpoints + e) % 250))
            .collect();
        feed.put(&slice(&name, &eps))?;
    }
    feed.put(&service("headless", None))?;
    feed.put(&slice("headless", &[nth([10, 244, 2, 2], 0)]))?;
    let source: Vec<String> = match &feed {
        Feed::File(dir) => vec![
            "--source".into(),
            "file".into(),
            "--dir".into(),
            dir.display().to_string(),
        ],
        Feed::Kube(_) => vec![
            "--source".into(),
            "kube".into(),
            "--kubeconfig".into(),
            tmp.path().join("kubeconfig").display().to_string(),
        ],
    };
    let spawn = |args: Vec<String>, log: &str| -> Result<Daemon, String> {
        let log = std::fs::File::create(tmp.path().join(log)).map_err(|e| e.to_string())?;
        Command::new("ip")
            .args(["netns", "exec", ns.name()])
            .arg(exe)
            .args(args)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map(Daemon)
            .map_err(|e| e.to_string())
    };
    let started = Instant::now();
    let mut agent_args: Vec<String> = ["agent", "--node", "node-1", "--http", "127.0.0.1:10256"]
        .map(String::from)
        .to_vec();
    agent_args.extend(["--net-conf".into(), net_conf.display().to_string()]);
    agent_args.extend(source.clone());
    let agent = spawn(agent_args, "agent.log")?;
    let mut dns_args: Vec<String> = [
        "dns",
        "--listen",
        "127.0.0.1:5353",
        "--http",
        "127.0.0.1:18080",
        "--no-forward",
        "--workers",
        "1",
    ]
    .map(String::from)
    .to_vec();
    dns_args.extend(source);
    let dns = spawn(dns_args, "dns.log")?;

    // Probes live in the namespace: a thread entered into it for good.
    let (tx, rx) = std::sync::mpsc::channel::<Box<dyn FnOnce() + Send>>();
    let ns_handle = netns::NetNs::open(ns.path()).map_err(|e| e.to_string())?;
    let prober = std::thread::spawn(move || {
        ns_handle.enter().expect("entering the bench namespace");
        for job in rx {
            job();
        }
    });
    let in_ns = |f: Box<dyn FnOnce() + Send>| tx.send(f).map_err(|e| e.to_string());
    let (rtx, rrx) = std::sync::mpsc::channel::<Result<Row, String>>();
    let last = nth([10, 96, 0, 100], n - 1);
    let opts = o.clone();
    let work: Box<dyn FnOnce() + Send> = Box::new(move || {
        let result = (|| {
            let listener = TcpListener::bind((LOCAL_EP, 8080)).map_err(|e| e.to_string())?;
            listener.set_nonblocking(true).map_err(|e| e.to_string())?;
            let udp = UdpSocket::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
            udp.connect(("127.0.0.1", DNS_PORT))
                .map_err(|e| e.to_string())?;
            udp.set_read_timeout(Some(Duration::from_millis(20)))
                .map_err(|e| e.to_string())?;
            let nl = Netlink::connect().map_err(|e| e.to_string())?;
            let has_route = |i: usize| {
                let want: ipnet::IpNet = format!("10.244.{i}.0/24").parse().expect("a CIDR");
                nl.routes(true)
                    .map(|rs| rs.iter().any(|r| r.dst == want))
                    .unwrap_or(false)
            };
            // Ready: the last Service's rules and the headless name are in place.
            let mut probe_slice = slice(&format!("s{}", n - 1), &[LOCAL_EP.parse().unwrap()]);
            feed.put(&probe_slice)?;
            let ready_probe =
                || answers(last) && !resolve(&udp, "headless.bench.svc.cluster.local.").is_empty();
            if until(started, ready_probe).is_none() {
                return Err(format!(
                    "the agent and DNS server did not load {n} Services within 30 s (ClusterIP {last} answers: {}; DNS answers: {:?})",
                    answers(last),
                    resolve(&udp, "headless.bench.svc.cluster.local.")
                ));
            }
            let ready = started.elapsed();
            while listener.accept().is_ok() {}
            let (cpu_a, cpu_d) = (agent.cpu(), dns.cpu());
            let mut slices = (Vec::new(), Vec::new());
            let mut services = (Vec::new(), Vec::new());
            let mut nodes = Vec::new();
            for k in 0..opts.changes {
                // An EndpointSlice: Service k's endpoints become the local one.
                let i = k % (n - 1);
                probe_slice = slice(&format!("s{i}"), &[LOCAL_EP.parse().unwrap()]);
                let t = Instant::now();
                feed.put(&probe_slice)?;
                slices
                    .0
                    .extend(until(t, || answers(nth([10, 96, 0, 100], i))));
                let addr = nth([10, 244, 3, 0], k + 1);
                let t = Instant::now();
                feed.put(&slice("headless", &[nth([10, 244, 2, 2], 0), addr]))?;
                slices.1.extend(until(t, || {
                    resolve(&udp, "headless.bench.svc.cluster.local.").contains(&addr)
                }));
                // A new Service with its slice.
                let name = format!("new{k}");
                let ip = nth([10, 100, 0, 1], k);
                let t = Instant::now();
                feed.put(&service(&name, Some(ip)))?;
                feed.put(&slice(&name, &[LOCAL_EP.parse().unwrap()]))?;
                services.0.extend(until(t, || answers(ip)));
                let fqdn = format!("{name}.bench.svc.cluster.local.");
                services.1.extend(until(t, || resolve(&udp, &fqdn) == [ip]));
                // A new Node.
                let t = Instant::now();
                feed.put(&node(10 + k))?;
                nodes.extend(until(t, || has_route(10 + k)));
                while listener.accept().is_ok() {}
            }
            std::thread::sleep(Duration::from_millis(300));
            let changes = 4 * opts.changes;
            Ok(Row {
                source: if kube { "kube" } else { "file" },
                services: n,
                ready,
                kinds: vec![
                    ("EndpointSlice", slices.0, slices.1),
                    ("Service", services.0, services.1),
                    ("Node", nodes, Vec::new()),
                ],
                agent_cpu: since(agent.cpu(), cpu_a),
                dns_cpu: since(dns.cpu(), cpu_d),
                changes,
                agent_rss: agent.rss_mib(),
                dns_rss: dns.rss_mib(),
            })
        })();
        let _ = rtx.send(result);
    });
    in_ns(work)?;
    let row = rrx.recv().map_err(|e| e.to_string())?;
    drop(tx);
    let _ = prober.join();
    row.map_err(|e| {
        let tail = |f: &str| {
            let text = std::fs::read_to_string(tmp.path().join(f)).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(5)..].join("\n")
        };
        format!(
            "{e}\nagent:\n{}\ndns:\n{}",
            tail("agent.log"),
            tail("dns.log")
        )
    })
}

/// Runs every size with both sources; returns the report.
pub fn run(o: &BenchOptions) -> Result<String, String> {
    if !netns::can_create() {
        return Err("the bench needs root (it creates a network namespace)".into());
    }
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut out = format!(
        "propagation: one change → kernel / DNS answer, {} changes of each kind (ms, p50 / p99)\n\n",
        o.changes
    );
    out += "| source | Services × endpoints | loaded in | EndpointSlice → kernel | → DNS | Service → kernel | → DNS | Node → kernel | CPU per change, user + system: agent / dns | RSS: agent / dns |\n|---|---|---|---|---|---|---|---|---|---|\n";
    for &n in &o.sizes {
        for kube in [false, true] {
            let mut r = run_one(&exe, n.max(2), o, kube)?;
            let mut cell = |i: usize, dns: bool| {
                let v = if dns {
                    &mut r.kinds[i].2
                } else {
                    &mut r.kinds[i].1
                };
                format!("{} / {}", pct(v, 0.5), pct(v, 0.99))
            };
            let cells = [
                cell(0, false),
                cell(0, true),
                cell(1, false),
                cell(1, true),
                cell(2, false),
            ];
            let per = |d: Duration| d.as_secs_f64() * 1e3 / r.changes as f64;
            out += &format!(
                "| {} | {} × {} | {:.1} s | {} | {:.2} + {:.2} / {:.2} + {:.2} ms | {:.0} / {:.0} MiB |\n",
                r.source,
                r.services,
                o.endpoints,
                r.ready.as_secs_f64(),
                cells.join(" | "),
                per(r.agent_cpu.0),
                per(r.agent_cpu.1),
                per(r.dns_cpu.0),
                per(r.dns_cpu.1),
                r.agent_rss,
                r.dns_rss,
            );
            eprintln!("{out}");
        }
    }
    Ok(out)
}
