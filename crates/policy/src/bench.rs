//! `flatnet policy bench`: what policy costs a node at scale, in throw-away namespaces. A cluster
//! of N pods (namespaces of 100, one pod in 100 on this node) and M policies of five shapes
//! (default deny; a named port from an app; a namespace selector with a pod selector; egress to
//! an ipBlock with an except; an `endPort` range from a set of apps) is planned and loaded cold;
//! then policy, pod-label and namespace-label changes are timed from the change to the kernel
//! holding it (the commit returns once the kernel enforces it); then the data path between two
//! real pods of a node that the policies select: TCP connections per second and iperf3
//! throughput, beside a node whose table holds no policy and one with no table, built side by
//! side and measured in turn.

use crate::apply::Applier;
use crate::model::PodFacts;
use crate::plan::Planner;
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use netns::measure::{ms, percentiles, pin_to_cpu, rss_kib, settle};
use netns::TempNetNs;
use serde_json::{json, Value};
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::process::Command;
use std::time::{Duration, Instant};

const PER_NAMESPACE: usize = 100;

fn namespace(j: usize, team: usize) -> Namespace {
    serde_json::from_value(json!({"metadata": {"name": format!("ns-{j}"), "labels": {"team": format!("team-{team}")}}}))
        .expect("a Namespace")
}

/// Pod `i`: every 100th is on this node (10.244.0.10 onwards), the rest elsewhere.
fn pod(i: usize, app: usize) -> PodFacts {
    let local = i.is_multiple_of(PER_NAMESPACE);
    let ip = if local {
        Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 244, 0, 10)) + (i / PER_NAMESPACE) as u32)
    } else {
        Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 245, 0, 0)) + i as u32)
    };
    PodFacts {
        namespace: format!("ns-{}", i / PER_NAMESPACE),
        name: format!("p-{i}"),
        labels: [
            ("app".to_string(), format!("app-{app}")),
            ("tier".to_string(), format!("t-{}", i % 3)),
            ("pod".to_string(), format!("p-{i}")),
        ]
        .into(),
        ip: Some(ip),
        node: Some(if local { "bench" } else { "other" }.into()),
        host_network: false,
        ports: vec![("http".into(), cluster::Proto::Tcp, 8080)],
    }
}

/// Pod `i`'s app: this node's pods take their namespace's digit, so that the namespace-selector
/// policies of their namespace select them and a namespace relabel reaches this node.
fn app_of(i: usize) -> usize {
    if i.is_multiple_of(PER_NAMESPACE) {
        (i / PER_NAMESPACE) % 10
    } else {
        i % 10
    }
}

fn np(ns: &str, name: &str, spec: Value) -> NetworkPolicy {
    serde_json::from_value(json!({"metadata": {"name": name, "namespace": ns}, "spec": spec}))
        .expect("a NetworkPolicy")
}

/// Policy `k` of the five shapes; `port` varies the named one (a policy change).
fn policy(k: usize, namespaces: usize, port: &str) -> NetworkPolicy {
    let ns = format!("ns-{}", k % namespaces);
    let name = format!("pol-{k}");
    let spec = match k % 5 {
        0 => json!({"podSelector": {}}),
        1 => json!({"podSelector": {"matchLabels": {"tier": "t-1"}},
            "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": format!("app-{}", k % 10)}}}], "ports": [{"port": port}]}]}),
        2 => json!({"podSelector": {"matchLabels": {"app": format!("app-{}", k % 10)}},
            "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": format!("team-{}", (k % namespaces) % 7)}},
                                   "podSelector": {"matchLabels": {"tier": "t-1"}}}], "ports": [{"port": 8080}]}]}),
        3 => json!({"podSelector": {"matchLabels": {"tier": "t-2"}}, "policyTypes": ["Egress"],
            "egress": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16"]}}], "ports": [{"port": 443}, {"port": 53, "protocol": "UDP"}]}]}),
        _ => json!({"podSelector": {},
            "ingress": [{"from": [{"podSelector": {"matchExpressions": [{"key": "app", "operator": "In", "values": ["app-1", "app-2", "app-3"]}]}}],
                         "ports": [{"port": 9000, "endPort": 9100}]}]}),
    };
    np(&ns, &name, spec)
}

/// The policies that let the data path's client (p-100) reach its server (p-0) on every TCP
/// port, beside those that isolate both.
fn data_path_policies() -> [NetworkPolicy; 2] {
    [
        np(
            "ns-0",
            "bench-in",
            json!({"podSelector": {"matchLabels": {"pod": "p-0"}},
            "ingress": [{"from": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"pod": "p-100"}}}], "ports": [{"protocol": "TCP"}]}]}),
        ),
        np(
            "ns-1",
            "bench-out",
            json!({"podSelector": {"matchLabels": {"pod": "p-100"}}, "policyTypes": ["Egress"],
            "egress": [{"to": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"pod": "p-0"}}}], "ports": [{"protocol": "TCP"}]}]}),
        ),
    ]
}

/// A node's bridge `cni0` (holding `gateway`, e.g. `10.244.0.1/24`) in `node`, and a pod
/// namespace attached to it for each address (same prefix length), as the CNI plugin's bridge
/// mode builds them: the bench's data path and the kernel tests' node.
pub fn bridged_pods(
    node: &TempNetNs,
    gateway: &str,
    addresses: &[Ipv4Addr],
) -> Result<Vec<TempNetNs>, String> {
    let prefix = gateway.split_once('/').map_or("24", |(_, p)| p);
    node.ip(&["link", "add", "cni0", "type", "bridge"])?;
    node.ip(&["addr", "add", gateway, "dev", "cni0"])?;
    node.ip(&["link", "set", "cni0", "up"])?;
    node.ip(&["link", "set", "lo", "up"])?;
    let mut pods = Vec::new();
    for (i, ip) in addresses.iter().enumerate() {
        let p = TempNetNs::new("fnt-polp").map_err(|e| e.to_string())?;
        let host = format!("veth{i}");
        let veth = ["link", "add", &host, "type", "veth", "peer", "name", "eth0"];
        node.ip(&[&veth[..], &["netns", p.name()]].concat())?;
        node.ip(&["link", "set", &host, "master", "cni0", "up"])?;
        p.ip(&["addr", "add", &format!("{ip}/{prefix}"), "dev", "eth0"])?;
        p.ip(&["link", "set", "eth0", "up"])?;
        p.ip(&["link", "set", "lo", "up"])?;
        pods.push(p);
    }
    Ok(pods)
}

/// A bridge in `node` and two pods on it: the server (10.244.0.10) and the client (.11).
fn data_path(node: &TempNetNs) -> Result<[TempNetNs; 2], String> {
    let server_ip = Ipv4Addr::new(10, 244, 0, 10);
    let mut pods = bridged_pods(
        node,
        "10.244.0.1/24",
        &[server_ip, Ipv4Addr::new(10, 244, 0, 11)],
    )?;
    let server = pods.remove(0);
    let client = pods.remove(0);
    server
        .ns()
        .run(|| -> Result<(), String> {
            let l = TcpListener::bind((server_ip, 8080)).map_err(|e| format!("listen: {e}"))?;
            std::thread::spawn(move || {
                pin_to_cpu(1);
                loop {
                    let _ = l.accept();
                }
            });
            Ok(())
        })
        .map_err(|e| e.to_string())??;
    Ok([server, client])
}

/// Connect latencies from each client to its server (10.244.0.10:8080 in its own node), taken
/// one connection per node in turn, on CPU 0 (the servers accept on CPU 1): every node sees the
/// same moments of the machine, so their medians compare where rounds taken one after the other
/// differed by a third on this VM. Each connection is closed with a reset, leaving no TIME_WAIT.
fn interleaved_connects(clients: &[&TempNetNs]) -> Result<Vec<Vec<Duration>>, String> {
    const BATCH: usize = 200;
    let to = SocketAddr::from(([10, 244, 0, 10], 8080));
    let mut took = vec![Vec::new(); clients.len()];
    for _ in 0..CONNECTIONS / BATCH {
        // A socket belongs to the namespace it is made in, whichever thread connects it.
        let mut sockets = Vec::new();
        for c in clients {
            let batch = c
                .ns()
                .run(|| -> std::io::Result<Vec<socket2::Socket>> {
                    (0..BATCH)
                        .map(|_| {
                            let s = socket2::Socket::new(
                                socket2::Domain::IPV4,
                                socket2::Type::STREAM,
                                None,
                            )?;
                            s.set_linger(Some(Duration::ZERO))?;
                            Ok(s)
                        })
                        .collect()
                })
                .map_err(|e| e.to_string())?
                .map_err(|e| format!("sockets: {e}"))?;
            sockets.push(batch);
        }
        let times = std::thread::scope(|scope| {
            scope
                .spawn(|| -> Result<Vec<Vec<Duration>>, String> {
                    pin_to_cpu(0);
                    let mut times = vec![Vec::with_capacity(BATCH); sockets.len()];
                    for i in 0..BATCH {
                        for k in (0..sockets.len()).map(|k| (k + i) % sockets.len()) {
                            let t = Instant::now();
                            sockets[k][i]
                                .connect_timeout(&to.into(), Duration::from_secs(2))
                                .map_err(|e| format!("connection to {to} in node {k}: {e}"))?;
                            times[k].push(t.elapsed());
                        }
                    }
                    Ok(times)
                })
                .join()
                .map_err(|_| "the connecting thread panicked".to_string())?
        })?;
        for (all, t) in took.iter_mut().zip(times) {
            all.extend(t);
        }
    }
    Ok(took)
}

/// iperf3 from the client to the server for 3 s: Gbit/s received.
fn iperf(server: &TempNetNs, client: &TempNetNs) -> Result<f64, String> {
    let mut s = Command::new("ip")
        .args([
            "netns",
            "exec",
            server.name(),
            "iperf3",
            "-s",
            "-1",
            "-p",
            "5201",
        ])
        .stdout(std::process::Stdio::null())
        .spawn()
        .map_err(|e| format!("iperf3 (install iperf3): {e}"))?;
    std::thread::sleep(Duration::from_millis(300));
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            client.name(),
            "iperf3",
            "-c",
            "10.244.0.10",
            "-p",
            "5201",
            "-t",
            "3",
            "-J",
        ])
        .output()
        .map_err(|e| format!("iperf3: {e}"))?;
    let _ = s.wait();
    let v: Value =
        serde_json::from_slice(&out.stdout).map_err(|e| format!("iperf3 output: {e}"))?;
    v.pointer("/end/sum_received/bits_per_second")
        .and_then(Value::as_f64)
        .map(|b| b / 1e9)
        .ok_or_else(|| format!("iperf3: {}", v.get("error").unwrap_or(&v)))
}

/// Connections timed per node.
const CONNECTIONS: usize = 4000;
/// iperf3 runs per node.
const IPERF_ROUNDS: usize = 5;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

pub fn run(pods: usize, policies: usize, changes: usize) -> Result<(), String> {
    let node = TempNetNs::new("fnb-pol")
        .map_err(|e| format!("a namespace for the run (needs root): {e}"))?;
    let namespaces = pods.div_ceil(PER_NAMESPACE).max(1);
    let rss0 = rss_kib();
    let t = Instant::now();
    let mut p = Planner::new("bench", Some("10.244.0.0/24".parse().expect("cidr")));
    for j in 0..namespaces {
        p.namespace_changed(&format!("ns-{j}"), Some(&namespace(j, j % 7)));
    }
    for i in 0..pods {
        let f = pod(i, app_of(i));
        p.pod_changed(&f.key(), Some(f));
    }
    let mut all: Vec<NetworkPolicy> = (0..policies)
        .map(|k| policy(k, namespaces, "http"))
        .collect();
    all.extend(data_path_policies());
    for n in &all {
        p.policy_changed(&cluster::manifests::namespaced(&n.metadata), Some(n));
    }
    let planned = t.elapsed();
    p.clear_pending();
    let entries = p.entries();
    let (mut applier, loaded) = node
        .ns()
        .run(|| -> Result<(Applier, Duration), String> {
            let mut a = Applier::new()?;
            let t = Instant::now();
            a.load(&entries)?;
            Ok((a, t.elapsed()))
        })
        .map_err(|e| e.to_string())??;
    let rss = rss_kib().saturating_sub(rss0);
    println!(
        "policy bench: {pods} pods ({} on this node), {} policies, {namespaces} namespaces",
        pods.div_ceil(PER_NAMESPACE),
        all.len()
    );
    println!(
        "  cold start: plan {}, kernel load {} ({} elements), total {}; planner memory {} MiB",
        ms(planned),
        ms(loaded),
        entries.len(),
        ms(planned + loaded),
        rss / 1024
    );
    drop(entries);

    // Changes, each timed from the change handed to the planner to the kernel's commit.
    let mut timed =
        |what: &str, change: &mut dyn FnMut(&mut Planner, usize)| -> Result<(), String> {
            let mut took = Vec::new();
            let mut sent = 0;
            for r in 0..changes {
                let t = Instant::now();
                change(&mut p, r);
                let pending = p.take_pending();
                node.ns()
                    .run(|| applier.apply(&pending))
                    .map_err(|e| e.to_string())??;
                took.push(t.elapsed());
                sent += pending.len();
            }
            let (p50, p99) = percentiles(took);
            println!(
                "  {what}: p50 {} p99 {} ({:.0} elements per change)",
                ms(p50),
                ms(p99),
                sent as f64 / changes.max(1) as f64
            );
            Ok(())
        };
    // Each change reaches this node's pods: a policy of the `endPort` shape (selecting every pod
    // of its namespace) widens or narrows its range; a peer pod of such a policy moves in and
    // out of its apps; a namespace moves between teams that namespace selectors name.
    let shaped = |k: usize| 4 + 5 * (k % (policies / 5).max(1));
    timed("policy change (its port range)", &mut |p, r| {
        let mut n = policy(shaped(r), namespaces, "http");
        let end = if r % 2 == 0 { 9200 } else { 9100 };
        n.spec
            .as_mut()
            .expect("spec")
            .ingress
            .as_mut()
            .expect("rules")[0]
            .ports
            .as_mut()
            .expect("ports")[0]
            .end_port = Some(end);
        p.policy_changed(&cluster::manifests::namespaced(&n.metadata), Some(&n));
    })?;
    timed("pod label change", &mut |p, r| {
        let ns = shaped(r) % namespaces;
        let i = ns * PER_NAMESPACE + 1 + (r * 7) % (PER_NAMESPACE - 1);
        let app = if r % 2 == 0 { 1 } else { 5 };
        let f = pod(i.min(pods - 1), app);
        p.pod_changed(&f.key(), Some(f));
    })?;
    timed("namespace label change", &mut |p, r| {
        let j = (r * 13) % namespaces;
        p.namespace_changed(&format!("ns-{j}"), Some(&namespace(j, (j + r + 1) % 7)));
    })?;

    // The data path, side by side on three nodes: this one, whose two pods the policies select
    // (default deny in ns-0 and the bench's own) and allow; a node without policies, whose table
    // holds only its pods (what every node has); a node with no table at all, where nothing is in
    // the way, not even connection tracking.
    let full = p.entries();
    let mut empty_planner = Planner::new("bench", Some("10.244.0.0/24".parse().expect("cidr")));
    for i in [0, PER_NAMESPACE] {
        let f = pod(i, app_of(i));
        empty_planner.pod_changed(&f.key(), Some(f));
    }
    empty_planner.clear_pending();
    let plain = TempNetNs::new("fnb-pol").map_err(|e| e.to_string())?;
    let bare = TempNetNs::new("fnb-pol").map_err(|e| e.to_string())?;
    for (n, entries) in [(&node, &full), (&plain, &empty_planner.entries())] {
        n.ns()
            .run(|| -> Result<(), String> {
                crate::apply::ensure_bridge_filtering()?;
                Applier::new()?.load(entries)
            })
            .map_err(|e| e.to_string())??;
    }
    drop(applier);
    let pairs = [data_path(&bare)?, data_path(&plain)?, data_path(&node)?];
    settle();
    let clients: Vec<&TempNetNs> = pairs.iter().map(|[_, c]| c).collect();
    let rates = interleaved_connects(&clients)?
        .into_iter()
        .map(|t| 1.0 / percentiles(t).0.as_secs_f64())
        .collect::<Vec<_>>();
    // Throughput cannot interleave finer than a run: rounds take the nodes in turn, each round
    // starting with another, and the ratio is taken within a round.
    let mut gbits: [Vec<f64>; 3] = Default::default();
    for round in 0..IPERF_ROUNDS {
        for k in (0..3).map(|k| (round + k) % 3) {
            let [server, client] = &pairs[k];
            gbits[k].push(iperf(server, client)?);
        }
    }
    eprintln!("  samples: Gbit/s {gbits:.2?}");
    let gbit_ratio = median(gbits[2].iter().zip(&gbits[1]).map(|(a, b)| a / b).collect());
    let [g0, g1, g2] = gbits.map(median);
    let [r0, r1, r2] = rates[..] else {
        unreachable!("one rate per node")
    };
    let n = all.len();
    println!("  new connections/s, pod to pod on this node (1 / median connect, {CONNECTIONS} per node, interleaved): {r2:.0} with {n} policies selecting both pods vs {r1:.0} with none: {:.3}x (no table at all, no connection tracking: {r0:.0}, {:.3}x)", r2 / r1, r2 / r0);
    println!("  iperf3 pod to pod: {g2:.2} Gbit/s with {n} policies vs {g1:.2} with none: {gbit_ratio:.3}x, median of {IPERF_ROUNDS} rounds' ratios (no table at all: {g0:.2}, {:.3}x)", g2 / g0);
    Ok(())
}
