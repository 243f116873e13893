//! `flatnet dns bench`: dnsperf against flatnet, unbound and knot in the same run, loaded with
//! the same records, each server pinned to one core and dnsperf to another; internal names
//! (the cluster zone) and external names (forwarded once, then answered from the cache; knot
//! is authoritative only, so it has no external figure). Then the memory of flatnet holding
//! 10k Services and 100k endpoints. Everything listens on 127.0.0.1; the "external" zone is a
//! `flatnet dns` authoritative server on another port, so nothing leaves the machine.

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

pub struct BenchOptions {
    pub services: usize,
    pub seconds: u32,
    pub server_cpu: usize,
    pub client_cpu: usize,
}

use netns::measure::{need, spawn_pinned as spawn};

fn service_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 0)) + 20 + i as u32)
}

fn endpoint_ip(i: usize, j: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 244, 0, 0)) + (i * 16 + j) as u32)
}

/// Services `svc-<i>` in `default`, every other one headless, each with `endpoints` endpoints,
/// as one manifest file.
fn manifests(services: usize, endpoints: usize) -> String {
    let mut docs = Vec::with_capacity(services * 2);
    for i in 0..services {
        let headless = i % 2 == 1;
        let ip = if headless {
            "None".to_string()
        } else {
            service_ip(i).to_string()
        };
        docs.push(
            serde_json::json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": format!("svc-{i}"), "namespace": "default"},
            "spec": {"clusterIP": ip, "ports": [{"name": "http", "port": 80}]}})
            .to_string(),
        );
        let eps: Vec<_> = (0..endpoints)
            .map(|j| serde_json::json!({"addresses": [endpoint_ip(i, j).to_string()], "conditions": {"ready": true}}))
            .collect();
        docs.push(
            serde_json::json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "addressType": "IPv4",
            "metadata": {"name": format!("svc-{i}-1"), "namespace": "default",
                         "labels": {"kubernetes.io/service-name": format!("svc-{i}")}},
            "endpoints": eps, "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]})
            .to_string(),
        );
    }
    docs.join("\n---\n")
}

/// The same A records as zone-file lines (what unbound and knot load).
fn zone_lines(services: usize, endpoints: usize) -> Vec<String> {
    let mut out = Vec::new();
    for i in 0..services {
        let name = format!("svc-{i}.default.svc.cluster.local.");
        if i % 2 == 1 {
            for j in 0..endpoints {
                out.push(format!("{name} 30 IN A {}", endpoint_ip(i, j)));
            }
        } else {
            out.push(format!("{name} 30 IN A {}", service_ip(i)));
        }
    }
    out
}

const EXTERNAL_NAMES: usize = 100;

fn wait_answering(port: u16, name: &str) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        let out = Command::new("dig")
            .args([
                "+short",
                "+time=1",
                "+tries=1",
                "-p",
                &port.to_string(),
                "@127.0.0.1",
                name,
            ])
            .output();
        if out.is_ok_and(|o| !o.stdout.is_empty()) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Err(format!(
        "the server on port {port} did not answer {name} within 60 s"
    ))
}

fn dnsperf(o: &BenchOptions, port: u16, queries: &Path) -> Result<f64, String> {
    let out = Command::new("taskset")
        .args([
            "-c",
            &o.client_cpu.to_string(),
            "dnsperf",
            "-s",
            "127.0.0.1",
            "-p",
        ])
        .arg(port.to_string())
        .arg("-d")
        .arg(queries)
        .args(["-l", &o.seconds.to_string(), "-c", "4", "-q", "200"])
        .output()
        .map_err(|e| format!("dnsperf: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.trim().strip_prefix("Queries per second:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| {
            format!(
                "dnsperf printed no rate:\n{text}{}",
                String::from_utf8_lossy(&out.stderr)
            )
        })
}

#[derive(Clone, Copy)]
struct Rate {
    qps: f64,
    /// The server's CPU time (user + system, all threads) per answered query.
    cpu_us: f64,
}

/// User + system CPU time of a process so far, in clock ticks (fields 14 and 15 of stat).
fn cpu_ticks(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|t| {
            let f: Vec<u64> = t
                .rsplit_once(')')?
                .1
                .split_whitespace()
                .skip(11)
                .take(2)
                .filter_map(|v| v.parse().ok())
                .collect();
            Some(f.iter().sum())
        })
        .unwrap_or(0)
}

/// dnsperf's rate, and what the server spent per query meanwhile: on a machine where dnsperf
/// saturates its core first, CPU per query is what tells the servers' capacity apart.
fn measure(o: &BenchOptions, port: u16, pid: u32, queries: &Path) -> Result<Rate, String> {
    let ticks = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64;
    let before = cpu_ticks(pid);
    let qps = dnsperf(o, port, queries)?;
    let cpu = (cpu_ticks(pid) - before) as f64 / ticks;
    Ok(Rate {
        qps,
        cpu_us: cpu * 1e6 / (qps * f64::from(o.seconds)).max(1.0),
    })
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

fn ready(http_port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", http_port)) else {
        return false;
    };
    let _ = s.write_all(b"GET /ready HTTP/1.1\r\nhost: x\r\n\r\n");
    let mut buf = String::new();
    let _ = s.read_to_string(&mut buf);
    buf.starts_with("HTTP/1.1 200")
}

pub fn run(o: &BenchOptions) -> Result<String, String> {
    for (cmd, pkg) in [
        ("dnsperf", "dnsperf"),
        ("unbound", "unbound"),
        ("knotd", "knot"),
        ("dig", "dnsutils"),
        ("taskset", "util-linux"),
    ] {
        need(cmd, pkg)?;
    }
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let dir = std::env::temp_dir().join(format!("flatnet-dns-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("cluster")).map_err(|e| e.to_string())?;
    match bench(o, &exe, &dir) {
        Ok(r) => {
            let _ = std::fs::remove_dir_all(&dir);
            Ok(r)
        }
        Err(e) => Err(format!("{e} (logs in {})", dir.display())),
    }
}

fn bench(o: &BenchOptions, exe: &Path, dir: &Path) -> Result<String, String> {
    let endpoints = 4;
    let p = |n: &str| dir.join(n);
    let s = |v: &str| v.to_string();
    let exe_s = exe.display().to_string();
    std::fs::write(p("cluster/services.yaml"), manifests(o.services, endpoints))
        .map_err(|e| e.to_string())?;
    // The "internet": an authoritative example.com with EXTERNAL_NAMES names.
    let mut upstream = vec![
        exe_s.clone(),
        s("dns"),
        s("--listen"),
        s("127.0.0.1:15300"),
        s("--domain"),
        s("example.com"),
        s("--no-forward"),
        s("--http"),
        s(""),
    ];
    for i in 0..EXTERNAL_NAMES {
        upstream.extend([
            s("--record"),
            format!("h{i}.example.com=192.0.2.{}", i % 250 + 1),
        ]);
    }
    let _up = spawn(o.client_cpu, &upstream, &p("upstream.log"))?;
    // flatnet.
    let flatnet = spawn(
        o.server_cpu,
        &[
            exe_s.clone(),
            s("dns"),
            s("--listen"),
            s("127.0.0.1:15301"),
            s("--dir"),
            p("cluster").display().to_string(),
            s("--upstream"),
            s("127.0.0.1:15300"),
            s("--http"),
            s("127.0.0.1:15380"),
            s("--workers"),
            s("1"),
        ],
        &p("flatnet.log"),
    )?;
    // unbound: the same records as local data, example.com forwarded.
    let records = zone_lines(o.services, endpoints);
    let mut conf = format!(
        "server:\n  interface: 127.0.0.1@15302\n  port: 15302\n  do-daemonize: no\n  username: \"\"\n  chroot: \"\"\n  directory: \"{d}\"\n  pidfile: \"{d}/unbound.pid\"\n  num-threads: 1\n  use-syslog: no\n  logfile: \"\"\n  verbosity: 0\n  access-control: 127.0.0.0/8 allow\n  do-not-query-localhost: no\n  do-ip6: no\n  local-zone: \"cluster.local.\" static\n",
        d = dir.display()
    );
    for r in &records {
        let _ = writeln!(conf, "  local-data: \"{r}\"");
    }
    conf.push_str("forward-zone:\n  name: \"example.com.\"\n  forward-addr: 127.0.0.1@15300\n");
    std::fs::write(p("unbound.conf"), conf).map_err(|e| e.to_string())?;
    let unbound = spawn(
        o.server_cpu,
        &[
            s("unbound"),
            s("-d"),
            s("-c"),
            p("unbound.conf").display().to_string(),
        ],
        &p("unbound.log"),
    )?;
    // knot: the same records as a zone file.
    let mut zone = s("$ORIGIN cluster.local.\n$TTL 30\n@ IN SOA ns.dns.cluster.local. hostmaster.cluster.local. 1 7200 1800 86400 30\n@ IN NS ns.dns.cluster.local.\nns.dns IN A 10.96.0.10\n");
    for r in &records {
        let _ = writeln!(zone, "{r}");
    }
    std::fs::write(p("cluster.local.zone"), zone).map_err(|e| e.to_string())?;
    std::fs::create_dir_all(p("knot")).map_err(|e| e.to_string())?;
    let knot_conf = format!(
        "server:\n  listen: 127.0.0.1@15303\n  rundir: \"{d}/knot\"\n  udp-workers: 1\n  tcp-workers: 1\n  background-workers: 1\ndatabase:\n  storage: \"{d}/knot\"\nlog:\n  - target: stderr\n    any: error\nzone:\n  - domain: cluster.local\n    file: \"{d}/cluster.local.zone\"\n    storage: \"{d}/knot\"\n",
        d = dir.display()
    );
    std::fs::write(p("knot.conf"), knot_conf).map_err(|e| e.to_string())?;
    let knot = spawn(
        o.server_cpu,
        &[s("knotd"), s("-c"), p("knot.conf").display().to_string()],
        &p("knot.log"),
    )?;

    let probe = format!("svc-{}.default.svc.cluster.local", o.services - 1);
    for port in [15301, 15302, 15303] {
        wait_answering(port, &probe)?;
    }
    wait_answering(15300, "h0.example.com")?;
    // Query files: every Service name in turn; the external names (each cached after its
    // first query).
    let internal: String = (0..o.services)
        .map(|i| format!("svc-{i}.default.svc.cluster.local A\n"))
        .collect();
    let external: String = (0..EXTERNAL_NAMES)
        .map(|i| format!("h{i}.example.com A\n"))
        .collect();
    std::fs::write(p("internal.txt"), internal).map_err(|e| e.to_string())?;
    std::fs::write(p("external.txt"), external).map_err(|e| e.to_string())?;

    // (name, per query file: rate and the server's CPU time per query)
    let mut rows: Vec<(&str, Vec<Option<Rate>>)> = Vec::new();
    for (name, port, pid, external) in [
        ("flatnet", 15301, flatnet.0.id(), true),
        ("unbound", 15302, unbound.0.id(), true),
        ("knot", 15303, knot.0.id(), false),
    ] {
        let mut rates = vec![Some(measure(o, port, pid, &p("internal.txt"))?)];
        rates.push(if external {
            Some(measure(o, port, pid, &p("external.txt"))?)
        } else {
            None
        });
        rows.push((name, rates));
    }
    let mut out = format!(
        "dnsperf, {} s per run, server on CPU {}, dnsperf on CPU {}; {} Services ({} endpoints per headless one)\n\n| server | cluster names qps | CPU µs/query | external names (cached) qps | CPU µs/query |\n| --- | --- | --- | --- | --- |\n",
        o.seconds, o.server_cpu, o.client_cpu, o.services, endpoints
    );
    let cell = |r: &Option<Rate>| match r {
        Some(r) => format!("{:.0} | {:.2}", r.qps, r.cpu_us),
        None => "— | —".to_string(),
    };
    for (name, rates) in &rows {
        let _ = writeln!(
            out,
            "| {name} | {} | {} |",
            cell(&rates[0]),
            cell(&rates[1])
        );
    }
    for (i, what) in ["cluster names", "external names"].iter().enumerate() {
        let ours = rows[0].1[i].expect("flatnet runs both");
        let others: Vec<Rate> = rows[1..].iter().filter_map(|r| r.1[i]).collect();
        let best_qps = others.iter().map(|r| r.qps).fold(0.0, f64::max);
        let best_cpu = others
            .iter()
            .map(|r| r.cpu_us)
            .fold(f64::INFINITY, f64::min);
        let _ = writeln!(
            out,
            "{what}: flatnet / the best other: {:.2}× the rate, {:.2}× the queries per CPU second",
            ours.qps / best_qps,
            best_cpu / ours.cpu_us
        );
    }
    let _ = writeln!(
        out,
        "flatnet RSS after the runs: {:.1} MiB",
        rss_kib(flatnet.0.id()) as f64 / 1024.0
    );
    drop(flatnet);

    // Memory with 10k Services and 100k endpoints.
    std::fs::write(p("cluster/services.yaml"), manifests(10_000, 10)).map_err(|e| e.to_string())?;
    let started = Instant::now();
    let big = spawn(
        o.server_cpu,
        &[
            exe_s,
            s("dns"),
            s("--listen"),
            s("127.0.0.1:15304"),
            s("--dir"),
            p("cluster").display().to_string(),
            s("--no-forward"),
            s("--http"),
            s("127.0.0.1:15381"),
            s("--workers"),
            s("1"),
        ],
        &p("big.log"),
    )?;
    while !ready(15381) {
        if started.elapsed() > Duration::from_secs(120) {
            return Err("flatnet dns did not load 10k Services within 120 s".into());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = writeln!(
        out,
        "flatnet with 10,000 Services and 100,000 endpoints (half headless: 50,000 endpoint names): ready in {:.1} s, RSS {:.1} MiB",
        started.elapsed().as_secs_f64(),
        rss_kib(big.0.id()) as f64 / 1024.0
    );
    Ok(out)
}
