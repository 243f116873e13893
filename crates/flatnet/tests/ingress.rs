//! `flatnet ingress` as a process on loopback, fed by the file source: what it routes follows
//! the manifests as they change, a Gateway listener's port is bound when it appears, statuses
//! are written, and SIGTERM lets a request in flight finish.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_flatnet");

/// A free loopback port (bound, then released).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// An HTTP backend on loopback answering `backend=NAME path=P`, after `?sleep=MS` if asked.
fn backend(name: &'static str) -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            std::thread::spawn(move || {
                let mut s = s;
                let mut buf = [0u8; 4096];
                let n = s.read(&mut buf).unwrap_or(0);
                let head = String::from_utf8_lossy(&buf[..n]).to_string();
                let path = head.split_whitespace().nth(1).unwrap_or("/").to_string();
                if let Some(ms) = path.split("sleep=").nth(1).and_then(|v| v.parse().ok()) {
                    std::thread::sleep(Duration::from_millis(ms));
                }
                let body = format!("backend={name} path={path}");
                let _ = write!(
                    s,
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
            });
        }
    });
    port
}

/// A GET through the edge: status and body.
fn get(port: u16, host: &str, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect_timeout(
        &SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_secs(2),
    )
    .ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n\r\n");
    s.write_all(request.as_bytes()).ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let status = out.split_whitespace().nth(1)?.parse().ok()?;
    Some((
        status,
        out.split("\r\n\r\n").nth(1).unwrap_or("").to_string(),
    ))
}

fn service(name: &str, port: u16) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: shop}}\nspec: {{ports: [{{name: http, port: 80}}]}}\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}-1, namespace: shop, labels: {{kubernetes.io/service-name: {name}}}}}\n\
         addressType: IPv4\nports: [{{name: http, port: {port}}}]\nendpoints: [{{addresses: [127.0.0.1]}}]\n---\n"
    )
}

fn ingress(path: &str, svc: &str) -> String {
    format!(
        "apiVersion: networking.k8s.io/v1\nkind: Ingress\nmetadata: {{name: shop, namespace: shop}}\n\
         spec:\n  ingressClassName: flatnet\n  rules:\n  - host: shop.example.com\n    http:\n      paths:\n      \
         - {{path: {path}, pathType: Prefix, backend: {{service: {{name: {svc}, port: {{number: 80}}}}}}}}\n"
    )
}

fn write(dir: &Path, file: &str, text: &str) {
    let tmp = dir.join(format!(".{file}.tmp"));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, dir.join(file)).unwrap();
}

struct Edge(Child);

impl Drop for Edge {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Polls until `f` holds (up to 5 s); how long it took.
fn until(what: &str, mut f: impl FnMut() -> bool) -> Duration {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < Duration::from_secs(5), "{what}");
        std::thread::sleep(Duration::from_millis(5));
    }
    t.elapsed()
}

#[test]
fn follows_the_manifests_and_drains_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let (m, status) = (dir.path().join("m"), dir.path().join("status"));
    std::fs::create_dir_all(&m).unwrap();
    std::fs::create_dir_all(&status).unwrap();
    let (v1, v2) = (backend("v1"), backend("v2"));
    write(&m, "class.yaml", "apiVersion: networking.k8s.io/v1\nkind: IngressClass\nmetadata: {name: flatnet}\nspec: {controller: flatnet.dev/ingress}\n");
    write(
        &m,
        "services.yaml",
        &(service("v1", v1) + &service("v2", v2)),
    );
    write(&m, "ingress.yaml", &ingress("/", "v1"));
    let (http, https, admin) = (free_port(), free_port(), free_port());
    let child = Command::new(BIN)
        .args(["ingress", "--source", "file", "--dir"])
        .arg(&m)
        .args([
            "--http",
            &format!("127.0.0.1:{http}"),
            "--https",
            &format!("127.0.0.1:{https}"),
        ])
        .args([
            "--status",
            &format!("127.0.0.1:{admin}"),
            "--publish-address",
            "198.51.100.7",
            "--status-dir",
        ])
        .arg(&status)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut edge = Edge(child);
    until("the edge serves v1", || {
        get(http, "shop.example.com", "/a")
            .is_some_and(|(c, b)| c == 200 && b.starts_with("backend=v1"))
    });
    assert_eq!(get(http, "other.example.com", "/a").unwrap().0, 404);
    assert_eq!(get(admin, "x", "/readyz").unwrap().0, 200);
    let s: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(status.join("ingress-status.json")).unwrap())
            .unwrap();
    assert_eq!(
        s["ingresses"][0]["loadBalancer"]["ingress"][0]["ip"], "198.51.100.7",
        "{s}"
    );

    // A route change is served once the file lands.
    write(&m, "ingress.yaml", &ingress("/", "v2"));
    let took = until("the change is served", || {
        get(http, "shop.example.com", "/a").is_some_and(|(_, b)| b.starts_with("backend=v2"))
    });
    eprintln!("route change served after {took:?}");

    // A Gateway with a listener on a port of its own, and an HTTPRoute splitting nothing.
    let gw_port = free_port();
    write(&m, "gateway.yaml", &format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: GatewayClass\nmetadata: {{name: flatnet}}\nspec: {{controllerName: flatnet.dev/ingress}}\n---\n\
         apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {{name: gw, namespace: shop}}\n\
         spec: {{gatewayClassName: flatnet, listeners: [{{name: web, port: {gw_port}, protocol: HTTP}}]}}\n---\n\
         apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: r, namespace: shop}}\n\
         spec: {{parentRefs: [{{name: gw}}], hostnames: [api.example.com], rules: [{{backendRefs: [{{name: v1, port: 80}}]}}]}}\n"
    ));
    until("the Gateway's port answers", || {
        get(gw_port, "api.example.com", "/g")
            .is_some_and(|(c, b)| c == 200 && b.starts_with("backend=v1"))
    });
    let s: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(status.join("ingress-status.json")).unwrap())
            .unwrap();
    assert_eq!(
        s["httpRoutes"][0]["parents"][0]["conditions"][0]["status"], "True",
        "{s}"
    );
    assert_eq!(s["gateways"][0]["listeners"][0]["attachedRoutes"], 1, "{s}");
    let metrics = get(admin, "x", "/metrics").unwrap().1;
    assert!(
        metrics.contains(
            "flatnet_ingress_requests_total{route=\"HTTPRoute shop/r rule 0\",code=\"200\"}"
        ),
        "{metrics}"
    );

    // SIGTERM: a request in flight finishes; then the process exits.
    let slow = std::thread::spawn(move || get(http, "shop.example.com", "/a?sleep=700"));
    std::thread::sleep(Duration::from_millis(200));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(edge.0.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let (code, body) = slow.join().unwrap().expect("an answer");
    assert_eq!(
        (code, body.starts_with("backend=v2")),
        (200, true),
        "{body}"
    );
    let t = Instant::now();
    while edge.0.try_wait().unwrap().is_none() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "still running after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        TcpStream::connect(("127.0.0.1", http)).is_err(),
        "no longer accepting"
    );
}
