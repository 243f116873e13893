//! `flatnet proxy bench`: what a sync costs at scale, in a throw-away namespace — the cold start
//! (empty kernel → full table), one Service added and one endpoint changed with N present
//! (plan, diff and apply), and a restarted agent adopting the table. Memory is the process's RSS, which
//! holds the objects as an agent does. Then the data path: TCP connection latency (p50/p99 of
//! `connect()`, which waits for the SYN's DNAT and the SYN-ACK) to a ClusterIP with 10 Services
//! in the table and with N, against the same endpoint dialled directly. The reference beside the
//! cold start: the same table written as text and loaded by `nft -f` (what the nftables package
//! offers, and how kube-proxy's nftables mode applies its rules), in a namespace of its own.

use crate::{Config, Proxy, Report};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
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

/// Service `i`'s slice; `shift` moves its addresses (an endpoint change).
fn slice(i: usize, endpoints: usize, shift: usize) -> EndpointSlice {
    let eps: Vec<_> = (0..endpoints)
        .map(|e| {
            serde_json::json!({"addresses": [nth([10, 128, 0, 2], i * endpoints + e + shift)],
                               "nodeName": format!("node-{}", e % 10), "conditions": {"ready": true}})
        })
        .collect();
    serde_json::from_value(serde_json::json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
        "metadata": {"name": format!("s{i}-x"), "namespace": "bench", "labels": {"kubernetes.io/service-name": format!("s{i}")}},
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}], "endpoints": eps}))
    .expect("an EndpointSlice")
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))?
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

/// Connections timed per size: rounds of this many, alternating with the 10-Service table.
const ROUND: usize = 500;
const ROUNDS: usize = 6;

/// Makes `tmp` a place to dial Service 0 from: its endpoints are local, a default route lets
/// ClusterIPs leave (DNAT then reroutes to the endpoint), a listener on :8080 accepts.
fn prepare_dialing(tmp: &netns::TempNetNs) -> Result<(), String> {
    let ip = |args: &[&str]| -> Result<(), String> {
        let out = std::process::Command::new("ip")
            .args(["-n", tmp.name()])
            .args(args)
            .output()
            .map_err(|e| format!("ip: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "ip {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    };
    ip(&["link", "set", "lo", "up"])?;
    ip(&[
        "link", "add", "bench0", "type", "veth", "peer", "name", "bench1",
    ])?;
    ip(&["link", "set", "bench0", "up"])?;
    ip(&["link", "set", "bench1", "up"])?;
    ip(&["route", "replace", "default", "dev", "bench0"])?;
    // Service 0's endpoints (10.128.0.2 onwards): a prefix on lo makes every address local.
    ip(&["addr", "add", "10.128.0.0/24", "dev", "lo"])?;
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

/// p50 and p99.
fn percentiles(mut v: Vec<Duration>) -> (Duration, Duration) {
    v.sort();
    (v[v.len() / 2], v[v.len() * 99 / 100])
}

fn us(d: Duration) -> String {
    format!("{:.0} µs", d.as_secs_f64() * 1e6)
}

/// The reference cold start: plan, render and `nft -f` of the same table into an empty namespace.
fn reference_cold_start(
    cfg: &Config,
    services: &[Service],
    slices: &[EndpointSlice],
) -> Result<Duration, String> {
    let tmp = netns::TempNetNs::new("fnb-nft")
        .map_err(|e| format!("a namespace for the run (needs root): {e}"))?;
    let t = Instant::now();
    let text = crate::plan(cfg, services, slices)
        .map_err(|e| e.to_string())?
        .render();
    tmp.ns()
        .run(|| nft::apply(&text))
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    Ok(t.elapsed())
}

/// Runs the sizes in `sizes` (Services × `endpoints` each), each in a namespace of its own.
pub fn run(sizes: &[usize], endpoints: usize) -> Result<(), String> {
    let cfg = Config {
        node: "node-0".into(),
        node_ips: vec!["172.18.0.2".parse().expect("ip")],
        cluster_cidr: "10.128.0.0/9".parse().expect("cidr"),
        service_cidr: "10.96.0.0/12".parse().expect("cidr"),
        node_ports: (30000, 32767),
    };
    // The 10-Service table every size's latency is compared with, alternately.
    let small = netns::TempNetNs::new("fnb-proxy")
        .map_err(|e| format!("a namespace for the run (needs root): {e}"))?;
    let mut small_proxy = small
        .ns()
        .run(|| Proxy::new(cfg.clone()))
        .map_err(|e| e.to_string())??;
    let ten: Vec<Service> = (0..10).map(service).collect();
    let ten_slices: Vec<EndpointSlice> = (0..10).map(|i| slice(i, endpoints, 0)).collect();
    small
        .ns()
        .run(|| {
            small_proxy.replace_all(&ten, &ten_slices, &[]);
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
    println!(
        "{:>8} {:>10} {:>12} {:>12} {:>12} {:>12} {:>14} {:>10}",
        "services",
        "endpoints",
        "cold start",
        "nft -f",
        "+1 service",
        "1 endpoint (median of 5)",
        "restart adopt",
        "RSS"
    );
    for &n in sizes {
        let tmp = netns::TempNetNs::new("fnb-proxy")
            .map_err(|e| format!("a namespace for the run (needs root): {e}"))?;
        let ns = tmp.ns();
        let services: Vec<Service> = (0..n).map(service).collect();
        let slices: Vec<EndpointSlice> = (0..n).map(|i| slice(i, endpoints, 0)).collect();
        let timed =
            |f: &mut dyn FnMut() -> Result<Report, String>| -> Result<(Duration, Report), String> {
                let t = Instant::now();
                let r = ns.run(f).map_err(|e| e.to_string())??;
                Ok((t.elapsed(), r))
            };
        let mut proxy = ns
            .run(|| Proxy::new(cfg.clone()))
            .map_err(|e| e.to_string())??;
        let (cold, _) = timed(&mut || {
            proxy.replace_all(&services, &slices, &[]);
            proxy.sync()
        })?;
        let by_text = reference_cold_start(&cfg, &services, &slices)?;
        let (added, _) = timed(&mut || {
            proxy.upsert_service(&service(n));
            proxy.upsert_slice(&slice(n, endpoints, 0));
            proxy.sync()
        })?;
        // One endpoint changed, five times (the last leaves the shift the restart below wants);
        // the median.
        let mut changes = Vec::new();
        let mut report = Report::default();
        for shift in [4_000_001, 4_000_002, 4_000_003, 4_000_004, 4_000_000] {
            let (t, r) = timed(&mut || {
                proxy.upsert_slice(&slice(n / 2, endpoints, shift));
                proxy.sync()
            })?;
            changes.push(t);
            report = r;
        }
        changes.sort();
        let one = changes[changes.len() / 2];
        let rss = rss_kib() / 1024;
        prepare_dialing(&tmp)?;
        let (mut big_t, mut small_t) = (Vec::new(), Vec::new());
        for _ in 0..ROUNDS {
            connects(&tmp, cluster_ip, ROUND, &mut big_t)?;
            connects(&small, cluster_ip, ROUND, &mut small_t)?;
        }
        latencies.push((n, percentiles(small_t), percentiles(big_t)));
        drop(proxy);
        // A restarted agent: a new process state adopts the table; nothing should be sent.
        let mut again = ns
            .run(|| Proxy::new(cfg.clone()))
            .map_err(|e| e.to_string())??;
        let (adopt, adopted) = timed(&mut || {
            again.replace_all(&services, &slices, &[]);
            again.upsert_service(&service(n));
            again.upsert_slice(&slice(n, endpoints, 0));
            again.upsert_slice(&slice(n / 2, endpoints, 4_000_000));
            again.sync()
        })?;
        println!(
            "{n:>8} {:>10} {:>12} {:>12} {:>12} {:>12} {:>14} {:>6} MiB   ({} objects for the endpoint change, {} after restart)",
            n * endpoints,
            ms(cold),
            ms(by_text),
            ms(added),
            ms(one),
            ms(adopt),
            rss,
            report.objects,
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
    for (n, (s50, s99), (b50, b99)) in latencies {
        println!(
            "  {n:>6} Services: {} / {}, 10 Services: {} / {}, ratio {:.2} / {:.2}",
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
