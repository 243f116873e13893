//! `flatnet lab bench`: bring-up time by lab size, and pod-to-pod throughput (iperf3) against
//! raw baselines built by hand in the same run — a bare bridge with two veths, bare routed
//! namespaces, a bare VXLAN pair — so the ratio says what flatnet's path costs, not the machine.

use crate::infra::{self, create_ns, nl, wire};
use crate::Lab;
use ipnet::Ipv4Net;
use netlink::{LinkInfo, Request, RouteSpec, VxlanSpec};
use netns::NetNs;
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn lab_file(
    dir: &Path,
    name: &str,
    nodes: usize,
    backend: &str,
    workloads: &str,
) -> Result<std::path::PathBuf, String> {
    let p = dir.join(format!("{name}.yaml"));
    let text = format!(
        "apiVersion: flatnet.dev/v1alpha1\nkind: Lab\nmetadata: {{name: {name}}}\nspec: {{nodes: {nodes}, backend: {backend}}}\n---\n{workloads}"
    );
    std::fs::write(&p, text).map_err(|e| format!("{}: {e}", p.display()))?;
    Ok(p)
}

/// A directory for the bench's lab files, removed with it (the labs themselves live under the
/// root).
fn spec_dir() -> Result<tempfile::TempDir, String> {
    tempfile::tempdir().map_err(|e| format!("a directory for the bench's lab files: {e}"))
}

/// Brings up labs of `nodes` nodes and each pod count in `sizes`; prints seconds and ms per pod.
pub fn bring_up(root: &Path, nodes: usize, sizes: &[usize]) -> Result<(), String> {
    let files = spec_dir()?;
    println!("bring-up, {nodes} nodes, backend vxlan, one `flatnet serve` per pod");
    println!("{:>6} {:>10} {:>12}", "pods", "seconds", "ms per pod");
    for &n in sizes {
        let name = format!("bu{}", std::process::id() % 100_000);
        let workloads = format!(
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: web}}\nspec:\n  replicas: {n}\n  selector: {{matchLabels: {{app: web}}}}\n  template:\n    metadata: {{labels: {{app: web}}}}\n    spec: {{containers: [{{name: web, image: flatnet-serve}}]}}\n"
        );
        let f = lab_file(files.path(), &name, nodes, "vxlan", &workloads)?;
        let t = Instant::now();
        let lab = Lab::up(root, &[f]);
        let took = t.elapsed();
        let lab = lab?;
        // The Deployment's pods (the lab's DNS pods come up too, and are timed with them).
        let pods = lab
            .load()?
            .pods
            .iter()
            .filter(|p| p.namespace == "default")
            .count();
        lab.down()?;
        if pods != n {
            return Err(format!("{pods} of {n} pods came up"));
        }
        println!(
            "{n:>6} {:>10.2} {:>12.2}",
            took.as_secs_f64(),
            took.as_secs_f64() * 1e3 / n as f64
        );
    }
    Ok(())
}

/// Runs iperf3 from `client` to `server_ip` (a server started in `server`, listening on all its
/// addresses, so `server_ip` may also be a Service's); returns Gbit/s.
fn iperf(client: &NetNs, server: &NetNs, server_ip: Ipv4Addr, secs: u32) -> Result<f64, String> {
    let mut srv = Command::new("iperf3");
    srv.args(["-s", "-1"])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    infra::enter(&mut srv, server, "iperf-server", false, None);
    let mut srv = srv
        .spawn()
        .map_err(|e| format!("iperf3 (install the iperf3 package): {e}"))?;
    std::thread::sleep(Duration::from_millis(200));
    let mut cli = Command::new("iperf3");
    cli.args(["-c", &server_ip.to_string(), "-t", &secs.to_string(), "-J"]);
    infra::enter(&mut cli, client, "iperf-client", false, None);
    let out = cli.output().map_err(|e| format!("iperf3: {e}"))?;
    let _ = srv.kill();
    let _ = srv.wait();
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).map_err(|e| format!("iperf3 output: {e}"))?;
    v.pointer("/end/sum_received/bits_per_second")
        .and_then(|b| b.as_f64())
        .map(|b| b / 1e9)
        .ok_or_else(|| format!("iperf3 gave no result: {}", v.get("error").unwrap_or(&v)))
}

fn addr(ns: &NetNs, idx: u32, name: &str, cidr: &str) -> Result<(), String> {
    infra::address(
        ns,
        idx,
        name,
        cidr.parse::<Ipv4Net>().map_err(|e| e.to_string())?,
        None,
    )
}

fn route(ns: &NetNs, dst: &str, gw: &str, dev: u32, onlink: bool) -> Result<(), String> {
    let mut r = RouteSpec::new(
        dst.parse()
            .map_err(|e: ipnet::AddrParseError| e.to_string())?,
        Some(
            gw.parse()
                .map_err(|e: std::net::AddrParseError| e.to_string())?,
        ),
        dev,
    );
    r.onlink = onlink;
    nl(ns)?
        .run(Request::add_route(&r))
        .map(drop)
        .map_err(|e| e.to_string())
}

/// The raw baselines, built in namespaces of pseudo-lab `raw`: returns (bridge, routed, vxlan)
/// as (client, server, server IP) triples.
fn raw_baselines(raw: &str) -> Result<Vec<(String, NetNs, NetNs, Ipv4Addr)>, String> {
    let ns = |role: &str| create_ns(&infra::ns_name(raw, role));
    let mut out = Vec::new();
    // A bridge with two veths.
    let h = ns("bridge")?;
    let (a, b) = (ns("bridge-a")?, ns("bridge-b")?);
    let br = infra::bridge(&h, "br0", None)?;
    let ia = wire(&h, "va", Some(br), &a, "eth0", 1500)?;
    let ib = wire(&h, "vb", Some(br), &b, "eth0", 1500)?;
    addr(&a, ia, "eth0", "10.99.0.2/24")?;
    addr(&b, ib, "eth0", "10.99.0.3/24")?;
    out.push((
        "bare bridge, two veths".to_string(),
        a,
        b,
        "10.99.0.3".parse().expect("ip"),
    ));
    // Routed and VXLAN: pod A — node 1 — underlay bridge — node 2 — pod B.
    for vx in [false, true] {
        let tag = if vx { "vx" } else { "rt" };
        let mtu = if vx { 1450 } else { 1500 };
        let u = ns(&format!("{tag}-u"))?;
        let (n1, n2) = (ns(&format!("{tag}-n1"))?, ns(&format!("{tag}-n2"))?);
        let (a, b) = (ns(&format!("{tag}-a"))?, ns(&format!("{tag}-b"))?);
        let ub = infra::bridge(&u, "ul0", None)?;
        let e1 = wire(&u, "p1", Some(ub), &n1, "eth0", 1500)?;
        let e2 = wire(&u, "p2", Some(ub), &n2, "eth0", 1500)?;
        addr(&n1, e1, "eth0", "172.30.0.2/24")?;
        addr(&n2, e2, "eth0", "172.30.0.3/24")?;
        // Each node bridges its pod like cni0 does, the gateway address on the bridge.
        let mut pod_ends = Vec::new();
        for (n, pod, gw, name) in [
            (&n1, &a, "10.98.1.1/24", "vpa"),
            (&n2, &b, "10.98.2.1/24", "vpb"),
        ] {
            let br = infra::bridge(n, "br0", Some(mtu))?;
            addr(n, br, "br0", gw)?;
            pod_ends.push(wire(n, name, Some(br), pod, "eth0", mtu)?);
            infra::sysctl(n, "net/ipv4/ip_forward", "1")?;
        }
        let (pa, pb) = (pod_ends[0], pod_ends[1]);
        addr(&a, pa, "eth0", "10.98.1.2/24")?;
        addr(&b, pb, "eth0", "10.98.2.2/24")?;
        route(&a, "0.0.0.0/0", "10.98.1.1", pa, false)?;
        route(&b, "0.0.0.0/0", "10.98.2.1", pb, false)?;
        if vx {
            let macs = [[0x02, 0, 0, 0, 0, 1], [0x02, 0, 0, 0, 0, 2]];
            for (i, (n, local, dev, peer_ip, peer_net, peer_vtep)) in [
                (
                    &n1,
                    "172.30.0.2",
                    e1,
                    "172.30.0.3",
                    "10.98.2.0/24",
                    "10.98.2.0",
                ),
                (
                    &n2,
                    "172.30.0.3",
                    e2,
                    "172.30.0.2",
                    "10.98.1.0/24",
                    "10.98.1.0",
                ),
            ]
            .into_iter()
            .enumerate()
            {
                let c = nl(n)?;
                c.run(Request::create_vxlan(&VxlanSpec {
                    name: "vx0".into(),
                    vni: 7,
                    local: local.parse().expect("ip"),
                    dev,
                    port: 4789,
                    mtu: 1450,
                    mac: macs[i],
                }))
                .map_err(|e| e.to_string())?;
                let vidx = c
                    .link_by_name("vx0")
                    .map_err(|e| e.to_string())?
                    .ok_or("vx0 missing")?
                    .index();
                let peer_mac = macs[1 - i];
                c.apply(vec![
                    Request::replace_neighbour(vidx, peer_vtep.parse().expect("ip"), peer_mac),
                    Request::replace_fdb(vidx, peer_mac, peer_ip.parse().expect("ip")),
                ])
                .map_err(|e| e.to_string())?;
                route(n, peer_net, peer_vtep, vidx, true)?;
            }
            out.push((
                "bare VXLAN pair, bridged pods".to_string(),
                a,
                b,
                "10.98.2.2".parse().expect("ip"),
            ));
        } else {
            route(&n1, "10.98.2.0/24", "172.30.0.3", e1, false)?;
            route(&n2, "10.98.1.0/24", "172.30.0.2", e2, false)?;
            out.push((
                "bare routed nodes, bridged pods".to_string(),
                a,
                b,
                "10.98.2.2".parse().expect("ip"),
            ));
        }
    }
    Ok(out)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// iperf3 through flatnet's paths and the raw baselines, alternating, `rounds` times each;
/// prints medians and ratios.
pub fn throughput(root: &Path, secs: u32, rounds: usize) -> Result<(), String> {
    let raw = format!("raw{}", std::process::id() % 100_000);
    let files = spec_dir()?;
    let mut labs: Vec<Lab> = Vec::new();
    let result = (|| -> Result<(), String> {
        let baselines = raw_baselines(&raw)?;
        let workloads = "apiVersion: v1\nkind: Pod\nmetadata: {name: client}\nspec: {nodeName: node-1, containers: [{name: c, image: x, command: [sleep, infinity]}]}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: near}\nspec: {nodeName: node-1, containers: [{name: c, image: x, command: [sleep, infinity]}]}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: far, labels: {app: far}}\nspec: {nodeName: node-2, containers: [{name: c, image: x, command: [sleep, infinity]}]}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: far}\nspec: {selector: {app: far}, ports: [{port: 5201}]}\n";
        // (label, client, server, server IP, baseline index)
        let mut paths: Vec<(String, NetNs, NetNs, Ipv4Addr, usize)> = Vec::new();
        // (client, server, pod IP, ClusterIP) of the host-gw lab's cross-node pair
        let mut via_service = None;
        for backend in ["host-gw", "vxlan"] {
            let name = format!("ip{}{}", &backend[..2], std::process::id() % 10_000);
            let f = lab_file(files.path(), &name, 2, backend, workloads)?;
            let lab = Lab::up(root, &[f])?;
            let s = lab.load()?;
            labs.push(lab);
            let pod = |n: &str| -> Result<(NetNs, Ipv4Addr), String> {
                let p = s.pods.iter().find(|p| p.name == n).ok_or("pod missing")?;
                Ok((infra::open_ns(&p.netns)?, p.ip.ok_or("pod without IP")?))
            };
            let (far, far_ip) = pod("far")?;
            if backend == "host-gw" {
                let (near, near_ip) = pod("near")?;
                paths.push((
                    "same node: flatnet bridge".into(),
                    pod("client")?.0,
                    near,
                    near_ip,
                    0,
                ));
                let cluster_ip = s
                    .services
                    .iter()
                    .find_map(|svc| {
                        svc.spec
                            .as_ref()?
                            .cluster_ip
                            .as_deref()?
                            .parse::<Ipv4Addr>()
                            .ok()
                    })
                    .ok_or("the far Service has no ClusterIP")?;
                via_service = Some((pod("client")?.0, pod("far")?.0, far_ip, cluster_ip));
                paths.push((
                    "cross node: flatnet host-gw".into(),
                    pod("client")?.0,
                    far,
                    far_ip,
                    1,
                ));
            } else {
                paths.push((
                    "cross node: flatnet vxlan".into(),
                    pod("client")?.0,
                    far,
                    far_ip,
                    2,
                ));
            }
        }
        println!("iperf3, {secs} s per run, median of {rounds} alternating runs");
        println!(
            "{:<30} {:>8} {:<38} {:>8} {:>7}",
            "flatnet path", "Gbit/s", "raw baseline (same topology, by hand)", "Gbit/s", "ratio"
        );
        for (label, c, srv, ip, base) in &paths {
            let (blabel, bc, bsrv, bip) = &baselines[*base];
            let (mut ours, mut theirs) = (Vec::new(), Vec::new());
            for r in 0..rounds {
                if r % 2 == 0 {
                    ours.push(iperf(c, srv, *ip, secs)?);
                    theirs.push(iperf(bc, bsrv, *bip, secs)?);
                } else {
                    theirs.push(iperf(bc, bsrv, *bip, secs)?);
                    ours.push(iperf(c, srv, *ip, secs)?);
                }
            }
            let (o, t) = (median(ours), median(theirs));
            println!("{label:<30} {o:>8.2} {blabel:<38} {t:>8.2} {:>6.2}x", o / t);
        }
        if let Some((c, srv, pod_ip, cluster_ip)) = via_service {
            let (mut svc, mut direct) = (Vec::new(), Vec::new());
            for r in 0..rounds {
                if r % 2 == 0 {
                    svc.push(iperf(&c, &srv, cluster_ip, secs)?);
                    direct.push(iperf(&c, &srv, pod_ip, secs)?);
                } else {
                    direct.push(iperf(&c, &srv, pod_ip, secs)?);
                    svc.push(iperf(&c, &srv, cluster_ip, secs)?);
                }
            }
            let (o, t) = (median(svc), median(direct));
            println!(
                "{:<30} {o:>8.2} {:<38} {t:>8.2} {:>6.2}x",
                "host-gw via ClusterIP",
                "the same pod by its IP",
                o / t
            );
        }
        Ok(())
    })();
    for lab in labs {
        let _ = lab.down();
    }
    infra::teardown(&raw);
    result
}
