//! `flatnet proxy bench`: what a sync costs at scale, in a throw-away namespace — the cold start
//! (empty kernel → full table), one Service added and one endpoint changed with N present
//! (plan, diff and apply), and a restarted agent adopting the table. Memory is the process's RSS, which
//! holds the objects as an agent does.

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

/// Runs the sizes in `sizes` (Services × `endpoints` each), each in a namespace of its own.
pub fn run(sizes: &[usize], endpoints: usize) -> Result<(), String> {
    let cfg = Config {
        node: "node-0".into(),
        node_ips: vec!["172.18.0.2".parse().expect("ip")],
        cluster_cidr: "10.128.0.0/9".parse().expect("cidr"),
        service_cidr: "10.96.0.0/12".parse().expect("cidr"),
        node_ports: (30000, 32767),
    };
    println!(
        "{:>8} {:>10} {:>12} {:>12} {:>12} {:>14} {:>10}",
        "services", "endpoints", "cold start", "+1 service", "1 endpoint", "restart adopt", "RSS"
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
            proxy.replace_all(&services, &slices);
            proxy.sync()
        })?;
        let (added, _) = timed(&mut || {
            proxy.upsert_service(&service(n));
            proxy.upsert_slice(&slice(n, endpoints, 0));
            proxy.sync()
        })?;
        let (one, report) = timed(&mut || {
            proxy.upsert_slice(&slice(n / 2, endpoints, 4_000_000));
            proxy.sync()
        })?;
        let rss = rss_kib() / 1024;
        drop(proxy);
        // A restarted agent: a new process state adopts the table; nothing should be sent.
        let mut again = ns
            .run(|| Proxy::new(cfg.clone()))
            .map_err(|e| e.to_string())??;
        let (adopt, adopted) = timed(&mut || {
            again.replace_all(&services, &slices);
            again.upsert_service(&service(n));
            again.upsert_slice(&slice(n, endpoints, 0));
            again.upsert_slice(&slice(n / 2, endpoints, 4_000_000));
            again.sync()
        })?;
        println!(
            "{n:>8} {:>10} {:>12} {:>12} {:>12} {:>14} {:>6} MiB   ({} objects for the endpoint change, {} after restart)",
            n * endpoints,
            ms(cold),
            ms(added),
            ms(one),
            ms(adopt),
            rss,
            report.objects,
            adopted.objects,
        );
    }
    Ok(())
}
