//! `flatnet ingress bench`: wrk against flatnet, nginx and haproxy in one run, each configured
//! with the same routes (one measured route and `routes` others, by host) in front of the same
//! origin, each proxy with one worker pinned to one CPU and wrk and the origin pinned to another;
//! requests/s and p99 at `connections` connections over plain HTTP/1.1 keep-alive and over TLS,
//! rounds interleaved and the median taken. Then flatnet alone with 5,000 Ingresses: how long
//! a changed route takes to be served (file written → first answer by the new route), and the
//! controller's resident memory. Everything listens on 127.0.0.1; the bench ends only what it
//! started.

use netns::measure::{need, percentiles, spawn_pinned, Pinned};
use serde_json::json;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

pub struct BenchOptions {
    pub seconds: u32,
    pub connections: u32,
    pub rounds: usize,
    /// Routes besides the measured one.
    pub routes: usize,
    /// Ingresses present when route changes are timed.
    pub big_routes: usize,
    pub changes: usize,
    pub proxy_cpu: usize,
    pub client_cpu: usize,
}

/// The host and path wrk asks for.
const HOST: &str = "shop.bench";
const PATH: &str = "/shop/item";

fn free_port() -> Result<u16, String> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    Ok(l.local_addr().map_err(|e| e.to_string())?.port())
}

/// One HTTP/1.1 request on a keep-alive connection; the status code.
fn request(c: &mut BufReader<TcpStream>, host: &str, path: &str) -> std::io::Result<u16> {
    write!(
        c.get_mut(),
        "GET {path} HTTP/1.1\r\nhost: {host}\r\nuser-agent: bench\r\n\r\n"
    )?;
    let mut line = String::new();
    c.read_line(&mut line)?;
    let code: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let mut len = 0usize;
    loop {
        line.clear();
        if c.read_line(&mut line)? == 0 || line == "\r\n" {
            break;
        }
        if let Some((n, v)) = line.split_once(':') {
            if n.eq_ignore_ascii_case("content-length") {
                len = v.trim().parse().unwrap_or(0);
            }
        }
    }
    let mut body = vec![0u8; len];
    c.read_exact(&mut body)?;
    Ok(code)
}

fn connect(port: u16) -> std::io::Result<BufReader<TcpStream>> {
    let s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.set_nodelay(true)?;
    Ok(BufReader::new(s))
}

/// Waits until `host``path` on `port` answers 200; the error carries the end of `log`.
fn wait_serving(
    port: u16,
    host: &str,
    path: &str,
    what: &str,
    log: &Path,
) -> Result<Duration, String> {
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(60) {
        if let Ok(200) = connect(port).and_then(|mut c| request(&mut c, host, path)) {
            return Ok(started.elapsed());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let tail: Vec<&str> = text.lines().rev().take(10).collect();
    Err(format!(
        "{what} did not serve {host}{path} on port {port} within 60 s; {}:\n{}",
        log.display(),
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    ))
}

/// The flatnet manifests: the origin as a Service with one endpoint, the TLS Secret, and one
/// Ingress per route.
fn flatnet_manifests(dir: &Path, origin: u16, routes: usize, cert: &(String, String)) {
    let write = |name: &str, v: serde_json::Value| {
        std::fs::write(dir.join(format!("{name}.json")), v.to_string()).expect("bench dir");
    };
    write(
        "class",
        json!({"apiVersion": "networking.k8s.io/v1", "kind": "IngressClass",
        "metadata": {"name": "flatnet", "annotations": {"ingressclass.kubernetes.io/is-default-class": "true"}},
        "spec": {"controller": crate::ingress::CONTROLLER}}),
    );
    write(
        "origin-svc",
        json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "origin", "namespace": "default"},
        "spec": {"ports": [{"name": "http", "port": 80, "targetPort": origin}]}}),
    );
    write(
        "origin-eps",
        json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "origin-1", "namespace": "default", "labels": {"kubernetes.io/service-name": "origin"}},
        "addressType": "IPv4", "endpoints": [{"addresses": ["127.0.0.1"], "conditions": {"ready": true}}],
        "ports": [{"name": "http", "port": origin, "protocol": "TCP"}]}),
    );
    let b64 = |s: &str| {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(s)
    };
    write(
        "tls",
        json!({"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
        "metadata": {"name": "bench-tls", "namespace": "default"},
        "data": {"tls.crt": b64(&cert.0), "tls.key": b64(&cert.1)}}),
    );
    let backend = json!({"service": {"name": "origin", "port": {"name": "http"}}});
    write(
        "shop",
        json!({"apiVersion": "networking.k8s.io/v1", "kind": "Ingress",
        "metadata": {"name": "shop", "namespace": "default"},
        "spec": {"tls": [{"hosts": [HOST], "secretName": "bench-tls"}],
                 "rules": [{"host": HOST, "http": {"paths": [{"path": "/shop", "pathType": "Prefix", "backend": backend}]}}]}}),
    );
    for i in 0..routes {
        write(
            &format!("app-{i}"),
            route_ingress(&format!("app-{i}"), &format!("app-{i}.bench")),
        );
    }
}

fn route_ingress(name: &str, host: &str) -> serde_json::Value {
    json!({"apiVersion": "networking.k8s.io/v1", "kind": "Ingress",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"rules": [{"host": host, "http": {"paths": [{"path": "/", "pathType": "Prefix",
            "backend": {"service": {"name": "origin", "port": {"name": "http"}}}}]}}]}})
}

fn nginx_conf(dir: &Path, listen: Option<(u16, u16)>, origin: u16, routes: usize) -> String {
    let d = dir.display();
    let mut c = format!(
        "worker_processes 1;\nuser root;\npid {d}/nginx-{origin}.pid;\nerror_log {d}/nginx-{origin}-error.log warn;\ndaemon off;\n\
         events {{ worker_connections 4096; }}\nhttp {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n\
         keepalive_requests 1000000;\n"
    );
    match listen {
        // The origin: a fixed answer.
        None => {
            c += &format!(
                "  server {{ listen 127.0.0.1:{origin} reuseport backlog=4096; location / {{ return 200 \"ok\\n\"; }} }}\n}}\n"
            );
        }
        Some((http, https)) => {
            c += &format!(
                "  upstream origin {{ server 127.0.0.1:{origin}; keepalive 128; }}\n\
                 map $http_upgrade $connection_upgrade {{ default upgrade; '' ''; }}\n\
                 server {{\n    listen 127.0.0.1:{http};\n    listen 127.0.0.1:{https} ssl http2;\n    server_name {HOST};\n\
                 ssl_certificate {d}/cert.pem;\n    ssl_certificate_key {d}/key.pem;\n\
                 location /shop {{ proxy_pass http://origin; proxy_http_version 1.1; proxy_set_header Host $host;\n\
                 proxy_set_header Connection $connection_upgrade; proxy_set_header Upgrade $http_upgrade;\n\
                 proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for; proxy_set_header X-Forwarded-Proto $scheme; }}\n  }}\n"
            );
            for i in 0..routes {
                c += &format!(
                    "  server {{ listen 127.0.0.1:{http}; server_name app-{i}.bench; location / {{ proxy_pass http://origin; proxy_http_version 1.1; proxy_set_header Connection \"\"; }} }}\n"
                );
            }
            c += "}\n";
        }
    }
    c
}

fn haproxy_conf(dir: &Path, http: u16, https: u16, origin: u16, routes: usize) -> String {
    let d = dir.display();
    let apps: Vec<String> = (0..routes).map(|i| format!("app-{i}.bench")).collect();
    let mut c = format!(
        "global\n  nbthread 1\n  maxconn 4096\n\ndefaults\n  mode http\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n  option forwardfor\n  http-reuse always\n\n\
         frontend edge\n  bind 127.0.0.1:{http}\n  bind 127.0.0.1:{https} ssl crt {d}/combined.pem alpn h2,http/1.1\n\
         acl shop hdr(host),field(1,:) -i {HOST}\n  acl shop_path path_beg /shop\n  use_backend origin if shop shop_path\n"
    );
    // An ACL named on several lines is their union (one line takes at most 64 words).
    for chunk in apps.chunks(50) {
        c += &format!("  acl apps hdr(host),field(1,:) -i {}\n", chunk.join(" "));
    }
    if !apps.is_empty() {
        c += "  use_backend origin if apps\n";
    }
    c += &format!("\nbackend origin\n  server o1 127.0.0.1:{origin}\n");
    c
}

/// wrk's figures: requests/s, p99, and answers that were not 2xx/3xx.
#[derive(Debug, Clone, Copy, Default)]
struct Figures {
    rate: f64,
    p99: Duration,
    bad: u64,
}

fn parse_duration(s: &str) -> Option<Duration> {
    let (n, unit) = s.split_at(s.find(|c: char| c.is_ascii_alphabetic())?);
    let n: f64 = n.parse().ok()?;
    let secs = match unit {
        "us" => n / 1e6,
        "ms" => n / 1e3,
        "s" => n,
        "m" => n * 60.0,
        _ => return None,
    };
    Some(Duration::from_secs_f64(secs))
}

fn wrk(o: &BenchOptions, url: &str, host: &str) -> Result<Figures, String> {
    let out = Command::new("taskset")
        .args(["-c", &o.client_cpu.to_string(), "wrk", "-t1"])
        .arg(format!("-c{}", o.connections))
        .arg(format!("-d{}s", o.seconds))
        .args(["--latency", "-H"])
        .arg(format!("Host: {host}"))
        .arg(url)
        .output()
        .map_err(|e| format!("wrk: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut f = Figures::default();
    for line in text.lines().map(str::trim) {
        if let Some(r) = line.strip_prefix("Requests/sec:") {
            f.rate = r.trim().parse().unwrap_or(0.0);
        } else if let Some(p) = line.strip_prefix("99%") {
            f.p99 = parse_duration(p.trim()).unwrap_or_default();
        } else if let Some(n) = line.strip_prefix("Non-2xx or 3xx responses:") {
            f.bad += n.trim().parse::<u64>().unwrap_or(0);
        } else if line.starts_with("Socket errors:") {
            f.bad += (line.split(|c: char| !c.is_ascii_digit()))
                .filter_map(|n| n.parse::<u64>().ok())
                .sum::<u64>();
        }
    }
    if f.rate == 0.0 {
        return Err(format!(
            "wrk {url}: no rate in its output:\n{text}{}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(f)
}

fn median(mut v: Vec<Figures>) -> Figures {
    v.sort_by(|a, b| a.rate.total_cmp(&b.rate));
    let mut m = v[v.len() / 2];
    m.bad = v.iter().map(|f| f.bad).sum();
    let mut p = v.iter().map(|f| f.p99).collect::<Vec<_>>();
    p.sort();
    m.p99 = p[p.len() / 2];
    m
}

pub fn run(o: &BenchOptions) -> Result<String, String> {
    for (cmd, pkg) in [
        ("wrk", "wrk"),
        ("nginx", "nginx-light"),
        ("haproxy", "haproxy"),
        ("taskset", "util-linux"),
    ] {
        need(cmd, pkg)?;
    }
    let tmp = tempfile::tempdir().map_err(|e| e.to_string())?;
    let dir = tmp.path();
    for d in ["body", "proxy", "flatnet", "big"] {
        std::fs::create_dir_all(dir.join(d)).map_err(|e| e.to_string())?;
    }
    let cert =
        rcgen::generate_simple_self_signed(vec![HOST.to_string()]).map_err(|e| e.to_string())?;
    let (cert_pem, key_pem) = (cert.cert.pem(), cert.key_pair.serialize_pem());
    std::fs::write(dir.join("cert.pem"), &cert_pem).map_err(|e| e.to_string())?;
    std::fs::write(dir.join("key.pem"), &key_pem).map_err(|e| e.to_string())?;
    std::fs::write(dir.join("combined.pem"), format!("{cert_pem}{key_pem}"))
        .map_err(|e| e.to_string())?;
    let exe = std::env::current_exe()
        .map_err(|e| e.to_string())?
        .display()
        .to_string();
    let p = |f: &str| dir.join(f);
    let conf = |name: &str, text: String| -> Result<PathBuf, String> {
        let path = dir.join(name);
        std::fs::write(&path, text).map_err(|e| e.to_string())?;
        Ok(path)
    };

    // The origin: nginx answering every request itself, on the client's CPU.
    let origin = free_port()?;
    let origin_conf = conf("origin.conf", nginx_conf(dir, None, origin, 0))?;
    let _origin = spawn_pinned(
        o.client_cpu,
        &[
            "nginx".into(),
            "-c".into(),
            origin_conf.display().to_string(),
        ],
        &p("origin.log"),
    )?;
    wait_serving(origin, "origin", "/", "the origin", &p("origin.log"))?;

    let mut proxies: Vec<(&str, u16, u16, Pinned)> = Vec::new();
    let (fh, fs, fstatus) = (free_port()?, free_port()?, free_port()?);
    flatnet_manifests(
        &dir.join("flatnet"),
        origin,
        o.routes,
        &(cert_pem.clone(), key_pem.clone()),
    );
    let flatnet_argv = |d: &str, http: u16, https: u16, status: u16| -> Vec<String> {
        vec![
            exe.clone(),
            "ingress".into(),
            "--dir".into(),
            dir.join(d).display().to_string(),
            "--http".into(),
            format!("127.0.0.1:{http}"),
            "--https".into(),
            format!("127.0.0.1:{https}"),
            "--status".into(),
            format!("127.0.0.1:{status}"),
            "--workers".into(),
            "1".into(),
        ]
    };
    proxies.push((
        "flatnet",
        fh,
        fs,
        spawn_pinned(
            o.proxy_cpu,
            &flatnet_argv("flatnet", fh, fs, fstatus),
            &p("flatnet.log"),
        )?,
    ));
    let (nh, ns) = (free_port()?, free_port()?);
    let nconf = conf(
        "nginx.conf",
        nginx_conf(dir, Some((nh, ns)), origin, o.routes),
    )?;
    proxies.push((
        "nginx",
        nh,
        ns,
        spawn_pinned(
            o.proxy_cpu,
            &["nginx".into(), "-c".into(), nconf.display().to_string()],
            &p("nginx.log"),
        )?,
    ));
    let (hh, hs) = (free_port()?, free_port()?);
    let hconf = conf("haproxy.cfg", haproxy_conf(dir, hh, hs, origin, o.routes))?;
    proxies.push((
        "haproxy",
        hh,
        hs,
        spawn_pinned(
            o.proxy_cpu,
            &["haproxy".into(), "-f".into(), hconf.display().to_string()],
            &p("haproxy.log"),
        )?,
    ));
    for (name, http, _, _) in &proxies {
        let log = p(&format!("{name}.log"));
        wait_serving(*http, HOST, PATH, name, &log)?;
        wait_serving(*http, "app-0.bench", "/", name, &log)?;
    }

    let mut report = format!(
        "flatnet ingress bench: wrk -t1 -c{} -d{}s, {} rounds interleaved (median); each proxy one worker on CPU {}, wrk and the origin (nginx) on CPU {}; {} routes besides the measured one\n\n",
        o.connections, o.seconds, o.rounds, o.proxy_cpu, o.client_cpu, o.routes
    );
    let _ = writeln!(
        report,
        "{:<8} {:<9} {:>12} {:>10} {:>8} {:>16}",
        "MODE", "PROXY", "REQUESTS/S", "P99", "ERRORS", "RATE VS HAPROXY"
    );
    for tls in [false, true] {
        let mut runs: Vec<Vec<Figures>> = vec![Vec::new(); proxies.len()];
        for _ in 0..o.rounds.max(1) {
            for (i, (_, http, https, _)) in proxies.iter().enumerate() {
                let url = if tls {
                    format!("https://127.0.0.1:{https}{PATH}")
                } else {
                    format!("http://127.0.0.1:{http}{PATH}")
                };
                netns::measure::settle();
                runs[i].push(wrk(o, &url, HOST)?);
            }
        }
        let figures: Vec<Figures> = runs.into_iter().map(median).collect();
        let haproxy = figures[2];
        for ((name, ..), f) in proxies.iter().zip(&figures) {
            let _ = writeln!(
                report,
                "{:<8} {:<9} {:>12.0} {:>10} {:>8} {:>15.2}×",
                if tls { "TLS" } else { "HTTP/1.1" },
                name,
                f.rate,
                netns::measure::ms(f.p99),
                f.bad,
                f.rate / haproxy.rate
            );
        }
    }
    drop(proxies);

    // 5,000 Ingresses: a change served, and the controller's memory.
    let (bh, bs, bstatus) = (free_port()?, free_port()?, free_port()?);
    flatnet_manifests(&dir.join("big"), origin, o.big_routes, &(cert_pem, key_pem));
    let big = spawn_pinned(
        o.proxy_cpu,
        &flatnet_argv("big", bh, bs, bstatus),
        &p("big.log"),
    )?;
    let last = format!("app-{}.bench", o.big_routes.saturating_sub(1));
    let cold = wait_serving(bh, &last, "/", "flatnet with many routes", &p("big.log"))?;
    netns::measure::pin_to_cpu(o.client_cpu);
    let mut conn = connect(bh).map_err(|e| e.to_string())?;
    let mut took = Vec::new();
    for i in 0..o.changes {
        let host = format!("changed-{i}.bench");
        let text = route_ingress("changing", &host).to_string();
        let tmp = dir.join("big/changing.json.tmp");
        std::fs::write(&tmp, text).map_err(|e| e.to_string())?;
        let started = Instant::now();
        std::fs::rename(&tmp, dir.join("big/changing.json")).map_err(|e| e.to_string())?;
        loop {
            let code =
                request(&mut conn, &host, "/").map_err(|e| format!("polling the change: {e}"))?;
            if code == 200 {
                took.push(started.elapsed());
                break;
            }
            if started.elapsed() > Duration::from_secs(10) {
                return Err(format!("change {i} not served within 10 s"));
            }
        }
        // Between changes, the table is idle again (as in a cluster: changes come apart).
        std::thread::sleep(Duration::from_millis(20));
    }
    let (p50, p99) = percentiles(took);
    let _ = write!(
        report,
        "\n{} Ingresses: first served {:.2} s after start; a changed route served after p50 {}, p99 {} ({} changes, file written → first 200); controller RSS {:.1} MiB\n",
        o.big_routes + 1,
        cold.as_secs_f64(),
        netns::measure::ms(p50),
        netns::measure::ms(p99),
        o.changes,
        big.rss_kib() as f64 / 1024.0
    );
    Ok(report)
}

/// `flatnet ingress bench`.
#[derive(clap::Subcommand)]
pub enum IngressTool {
    /// wrk against flatnet, nginx and haproxy with the same routes (plain HTTP/1.1 and TLS),
    /// then a route change's latency and the memory with 5,000 Ingresses. Needs wrk, nginx and
    /// haproxy.
    Bench {
        #[arg(long, default_value_t = 5)]
        seconds: u32,
        #[arg(long, default_value_t = 50)]
        connections: u32,
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// Routes besides the measured one, in every proxy.
        #[arg(long, default_value_t = 100)]
        routes: usize,
        /// Ingresses present while route changes are timed.
        #[arg(long, default_value_t = 5000)]
        big_routes: usize,
        #[arg(long, default_value_t = 200)]
        changes: usize,
        #[arg(long, default_value_t = 0)]
        proxy_cpu: usize,
        #[arg(long, default_value_t = 1)]
        client_cpu: usize,
    },
}

pub fn tool(t: IngressTool) -> std::process::ExitCode {
    let IngressTool::Bench {
        seconds,
        connections,
        rounds,
        routes,
        big_routes,
        changes,
        proxy_cpu,
        client_cpu,
    } = t;
    let o = BenchOptions {
        seconds,
        connections,
        rounds,
        routes,
        big_routes,
        changes: changes.max(1),
        proxy_cpu,
        client_cpu,
    };
    match run(&o) {
        Ok(report) => {
            println!("{report}");
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
