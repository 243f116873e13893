//! `flatnet proxy bench`: what a sync costs at scale, in throw-away namespaces — the cold start
//! (empty kernel → full table), one Service added and one endpoint changed with N present
//! (plan, diff and apply), and a restarted agent adopting the table. Each figure is wall time
//! and, beside it, the kernel's share: the time spent in exchanges with the kernel, where a
//! netlink commit runs. Memory is the process's RSS while it holds the objects as an agent does. The reference,
//! in the same run and namespace-for-namespace: the same Services in the structure this proxy
//! had before its endpoints moved into data maps — a chain per Service that picks one of N
//! endpoint chains with `numgen` arms, a chain per endpoint that DNATs — sent by the same
//! applier. Then the data path: TCP connection latency (p50/p99 of `connect()`, which waits for
//! the SYN's DNAT and the SYN-ACK) to a ClusterIP with 10 Services in the table and with N,
//! against the same endpoint dialled directly.

use crate::ruleset::{diff, Rule, Ruleset};
use crate::{Applier, Config, Proto, Proxy};
use cluster::slim::EndpointSlice;
use cluster::{Resource, Store, Update};
use k8s_openapi::api::core::v1::Service;
use netns::measure::{ms, percentiles, rss_kib, settle};
use std::time::{Duration, Instant};

fn nth(base: [u8; 4], n: usize) -> String {
    std::net::Ipv4Addr::from(u32::from(std::net::Ipv4Addr::from(base)) + n as u32).to_string()
}

fn service(i: usize) -> Service {
    serde_json::from_value(serde_json::json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": format!("s{i}"), "namespace": "bench"},
        "spec": {"clusterIP": nth([10, 96, 0, 1], i), "ports": [{"name": "http", "port": 80}]}}))
    .expect("a Service")
}

/// Endpoint `e` of Service `i`; `shift` moves the first one (an endpoint change).
fn endpoint(i: usize, e: usize, endpoints: usize, shift: usize) -> String {
    let shift = if e == 0 { shift } else { 0 };
    nth([10, 128, 0, 2], i * endpoints + e + shift)
}

/// Service `i`'s slice.
fn slice(i: usize, endpoints: usize, shift: usize) -> EndpointSlice {
    let eps: Vec<_> = (0..endpoints)
        .map(|e| {
            serde_json::json!({"addresses": [endpoint(i, e, endpoints, shift)],
                               "nodeName": format!("node-{}", e % 10), "conditions": {"ready": true}})
        })
        .collect();
    serde_json::from_value(serde_json::json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
        "metadata": {"name": format!("s{i}-x"), "namespace": "bench", "labels": {"kubernetes.io/service-name": format!("s{i}")}},
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}], "endpoints": eps}))
    .expect("an EndpointSlice")
}

/// A store holding `n` Services with `endpoints` each.
fn store_of(n: usize, endpoints: usize) -> Store {
    let mut store = Store::new();
    let services = (0..n).map(|i| Update::apply(service(i).into_object()));
    let slices = (0..n).map(|i| Update::apply(slice(i, endpoints, 0).into_object()));
    store.apply(services.chain(slices));
    store
}

/// Connections timed per size: rounds of this many, alternating with the 10-Service table.
const ROUND: usize = 500;
const ROUNDS: usize = 6;

/// Makes `tmp` a place to dial Service 0 from: its endpoints are local, a default route lets
/// ClusterIPs leave (DNAT then reroutes to the endpoint), a listener on :8080 accepts.
fn prepare_dialing(tmp: &netns::TempNetNs) -> Result<(), String> {
    let ip = |args: &[&str]| tmp.ip(args);
    ip(&["link", "set", "lo", "up"])?;
    ip(&[
        "link", "add", "bench0", "type", "veth", "peer", "name", "bench1",
    ])?;
    ip(&["link", "set", "bench0", "up"])?;
    ip(&["link", "set", "bench1", "up"])?;
    ip(&["route", "replace", "default", "dev", "bench0"])?;
    // Service 0's endpoints (10.128.0.2 onwards, up to 65k of them): a prefix on lo makes
    // every address local.
    ip(&["addr", "add", "10.128.0.0/16", "dev", "lo"])?;
    tmp.ns()
        .run(|| -> Result<(), String> {
            let listener =
                std::net::TcpListener::bind("0.0.0.0:8080").map_err(|e| format!("listen: {e}"))?;
            // Accepts until the process ends (the bench is a short-lived command).
            std::thread::spawn(move || loop {
                let _ = listener.accept();
            });
            Ok(())
        })
        .map_err(|e| e.to_string())?
}

/// `count` timed `connect()`s to `to` from inside `tmp`.
fn connects(
    tmp: &netns::TempNetNs,
    to: std::net::SocketAddr,
    count: usize,
    into: &mut Vec<Duration>,
) -> Result<(), String> {
    tmp.ns()
        .run(|| -> Result<(), String> {
            for _ in 0..count {
                let t = Instant::now();
                std::net::TcpStream::connect_timeout(&to, Duration::from_secs(2))
                    .map_err(|e| format!("connecting to {to}: {e}"))?;
                into.push(t.elapsed());
            }
            Ok(())
        })
        .map_err(|e| e.to_string())?
}

fn us(d: Duration) -> String {
    format!("{:.0} µs", d.as_secs_f64() * 1e6)
}

/// A cost: wall time and the kernel's share of it (the thread's system time).
#[derive(Debug, Clone, Copy, Default, PartialEq, PartialOrd)]
struct Cost {
    wall: Duration,
    kernel: Duration,
}

impl std::fmt::Display for Cost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", ms(self.wall), ms(self.kernel))
    }
}

/// Runs `f` in `ns`: its wall time, and the kernel's share — the time spent in exchanges with
/// it, a running total that was `before` and that `f` returns with its result.
fn timed<T>(
    ns: &netns::NetNs,
    before: Duration,
    f: impl FnOnce() -> Result<(T, Duration), String>,
) -> Result<(Cost, T), String> {
    let t = Instant::now();
    let (out, after) = ns.run(f).map_err(|e| e.to_string())??;
    let cost = Cost {
        wall: t.elapsed(),
        kernel: after.saturating_sub(before),
    };
    Ok((cost, out))
}

/// The median of five.
fn median(mut v: Vec<Cost>) -> Cost {
    v.sort_by_key(|c| c.wall);
    v[v.len() / 2]
}

/// Service `i` in the structure this proxy had before data maps: a chain per endpoint that DNATs
/// and a chain per Service that picks one with `numgen` arms (the hairpin rule each endpoint
/// chain also had is left out, so the reference is slightly cheaper than what it stands for).
fn chains_per_endpoint(cfg: &Config, i: usize, endpoints: usize, shift: usize) -> Ruleset {
    let mut rs = Ruleset::default();
    let mut arms = Vec::new();
    for e in 0..endpoints {
        let addr: std::net::Ipv4Addr = endpoint(i, e, endpoints, shift).parse().expect("ip");
        let chain = format!("ep_{i}_{addr}");
        rs.chains
            .insert(chain.clone(), vec![Rule::Dnat(addr, 8080, Proto::Tcp)]);
        arms.push(chain);
    }
    let svc = format!("svc_{i}_{shift}");
    rs.chains.insert(
        svc.clone(),
        vec![Rule::MasqUnlessFrom(cfg.cluster_cidr), Rule::Random(arms)],
    );
    let ip = nth([10, 96, 0, 1], i).parse().expect("ip");
    rs.service_ips.insert((ip, Proto::Tcp, 80), svc);
    rs
}

/// Cold start, one Service added and one endpoint changed (median of five) in the old
/// structure, in a namespace of its own.
fn reference(cfg: &Config, n: usize, endpoints: usize) -> Result<[Cost; 3], String> {
    let tmp = netns::TempNetNs::new("fnb-ref")
        .map_err(|e| format!("a namespace for the run (needs root): {e}"))?;
    let ns = tmp.ns();
    let mut applier = ns.run(Applier::new).map_err(|e| e.to_string())??;
    let mut held = Ruleset::default();
    for i in 0..n {
        held.merge(chains_per_endpoint(cfg, i, endpoints, 0));
    }
    let (cold, _) = timed(ns, applier.kernel_time(), || {
        let empty = applier.adopt(&[])?;
        applier.apply(&diff(&empty, &held))?;
        Ok(((), applier.kernel_time()))
    })?;
    let (added, _) = timed(ns, applier.kernel_time(), || {
        let new = chains_per_endpoint(cfg, n, endpoints, 0);
        applier.apply(&diff(&Ruleset::default(), &new))?;
        Ok(((), applier.kernel_time()))
    })?;
    let mut changes = Vec::new();
    let mut shift = 0;
    for next in [4_000_001, 4_000_002, 4_000_003, 4_000_004, 4_000_000] {
        let old = chains_per_endpoint(cfg, n / 2, endpoints, shift);
        let new = chains_per_endpoint(cfg, n / 2, endpoints, next);
        let (c, _) = timed(ns, applier.kernel_time(), || {
            applier.apply(&diff(&old, &new))?;
            Ok(((), applier.kernel_time()))
        })?;
        changes.push(c);
        shift = next;
    }
    Ok([cold, added, median(changes)])
}

/// `"10000"` (with `endpoints` each) or `"1000x1000"`: Services and endpoints per Service.
pub fn parse_shape(s: &str, endpoints: usize) -> Result<(usize, usize), String> {
    let number = |t: &str| {
        t.trim()
            .parse::<usize>()
            .map_err(|_| format!("{s:?}: expected SERVICES or SERVICESxENDPOINTS, e.g. 1000x1000"))
    };
    match s.split_once('x') {
        Some((n, e)) => Ok((number(n)?, number(e)?)),
        None => Ok((number(s)?, endpoints)),
    }
}

/// Runs each shape (Services, endpoints per Service), each in namespaces of its own.
pub fn run(shapes: &[(usize, usize)]) -> Result<(), String> {
    let cfg = Config {
        node: "node-0".into(),
        node_ips: vec!["172.18.0.2".parse().expect("ip")],
        cluster_cidr: "10.128.0.0/9".parse().expect("cidr"),
        service_cidr: "10.96.0.0/12".parse().expect("cidr"),
        pod_cidr: "10.128.0.0/24".parse().expect("cidr"),
        node_ports: (30000, 32767),
    };
    // The 10-Service table every size's latency is compared with, alternately.
    let small = netns::TempNetNs::new("fnb-proxy")
        .map_err(|e| format!("a namespace for the run (needs root): {e}"))?;
    let mut small_proxy = small
        .ns()
        .run(|| Proxy::new(cfg.clone()))
        .map_err(|e| e.to_string())??;
    let ten = store_of(10, 10);
    small
        .ns()
        .run(|| {
            small_proxy.take_store(&ten);
            small_proxy.sync()
        })
        .map_err(|e| e.to_string())??;
    prepare_dialing(&small)?;
    let cluster_ip: std::net::SocketAddr = format!("{}:80", nth([10, 96, 0, 1], 0))
        .parse()
        .expect("addr");
    let direct: std::net::SocketAddr = format!("{}:8080", nth([10, 128, 0, 2], 0))
        .parse()
        .expect("addr");
    let mut latencies = Vec::new();
    println!("Each cell: wall time (the kernel's share). `before` is the structure with a chain per Service and per endpoint, in the same run.");
    println!(
        "{:>8} {:>9} | {:>22} {:>22} | {:>22} {:>22} | {:>22} {:>22} | {:>22} {:>8}",
        "services",
        "endpoints",
        "cold start",
        "before",
        "+1 service",
        "before",
        "1 endpoint changed",
        "before",
        "restart, adopt",
        "RSS"
    );
    for &(n, endpoints) in shapes {
        settle();
        let tmp = netns::TempNetNs::new("fnb-proxy")
            .map_err(|e| format!("a namespace for the run (needs root): {e}"))?;
        let ns = tmp.ns();
        let mut proxy = ns
            .run(|| Proxy::new(cfg.clone()))
            .map_err(|e| e.to_string())??;
        // The objects live in a store, as in the agent, which the proxy shares; kept for the
        // size's whole run (freeing them at once would bill glibc's consolidation of their
        // chunks to the next timed step).
        let mut store = store_of(n, endpoints);
        let (cold, _) = timed(ns, proxy.kernel_time(), || {
            proxy.take_store(&store);
            Ok((proxy.sync()?, proxy.kernel_time()))
        })?;
        // Objects are made before each timed step: parsing them is the source's work.
        let new = [
            Update::apply(service(n).into_object()),
            Update::apply(slice(n, endpoints, 0).into_object()),
        ];
        let (added, _) = timed(ns, proxy.kernel_time(), || {
            proxy.take_changes(&store.apply(new));
            Ok((proxy.sync()?, proxy.kernel_time()))
        })?;
        // One endpoint changed, five times (the last puts it back); the median.
        let mut changes = Vec::new();
        let mut objects = 0;
        for shift in [4_000_001, 4_000_002, 4_000_003, 4_000_004, 0] {
            let update = Update::apply(slice(n / 2, endpoints, shift).into_object());
            let (c, r) = timed(ns, proxy.kernel_time(), || {
                proxy.take_changes(&store.apply([update]));
                Ok((proxy.sync()?, proxy.kernel_time()))
            })?;
            changes.push(c);
            objects = r.objects;
        }
        let changed = median(changes);
        let rss = rss_kib() / 1024;
        prepare_dialing(&tmp)?;
        // The kernel grows a big map's hash table in the background after a load; lookups
        // during a resize check both tables, which is not what a settled node pays.
        settle();
        let (mut big_t, mut small_t) = (Vec::new(), Vec::new());
        for _ in 0..ROUNDS {
            connects(&tmp, cluster_ip, ROUND, &mut big_t)?;
            connects(&small, cluster_ip, ROUND, &mut small_t)?;
        }
        latencies.push((n, endpoints, percentiles(small_t), percentiles(big_t)));
        // A restarted agent: a new process state adopts the table; nothing should be sent. The
        // first proxy lives on until then: a restarted agent starts on a clean heap, and its
        // freed chunks would bill glibc's consolidation to the adoption.
        let mut again = ns
            .run(|| Proxy::new(cfg.clone()))
            .map_err(|e| e.to_string())??;
        settle();
        let (adopt, adopted) = timed(ns, again.kernel_time(), || {
            again.take_store(&store);
            Ok((again.sync()?, again.kernel_time()))
        })?;
        drop((again, proxy, store, tmp));
        settle();
        let [ref_cold, ref_added, ref_changed] = reference(&cfg, n, endpoints)?;
        println!(
            "{n:>8} {:>9} | {:>22} {:>22} | {:>22} {:>22} | {:>22} {:>22} | {:>22} {:>4} MiB   ({objects} objects for the endpoint change, {} after restart)",
            n * endpoints,
            cold.to_string(),
            ref_cold.to_string(),
            added.to_string(),
            ref_added.to_string(),
            changed.to_string(),
            ref_changed.to_string(),
            adopt.to_string(),
            rss,
            adopted.objects,
        );
    }
    let mut direct_t = Vec::new();
    connects(&small, direct, ROUND * ROUNDS, &mut direct_t)?;
    let (d50, d99) = percentiles(direct_t);
    println!("\nTCP connect() latency to Service 0, {} connections per table in alternating rounds (p50 / p99):", ROUND * ROUNDS);
    println!(
        "  the endpoint dialled directly:  {} / {}",
        us(d50),
        us(d99)
    );
    for (n, e, (s50, s99), (b50, b99)) in latencies {
        println!(
            "  {n:>6} Services × {e}: {} / {}, 10 Services: {} / {}, ratio {:.2} / {:.2}",
            us(b50),
            us(b99),
            us(s50),
            us(s99),
            b50.as_secs_f64() / s50.as_secs_f64(),
            b99.as_secs_f64() / s99.as_secs_f64()
        );
    }
    Ok(())
}
