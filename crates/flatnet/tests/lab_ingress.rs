//! The ingress controller in the lab, as a user meets it: `examples/ingress.yaml` applied, then
//! requests from the lab internet by name (its DNS answers the Ingress and HTTPRoute
//! hostnames) over HTTP/1.1, HTTP/2 and TLS with SNI, a WebSocket, a weighted split, and a
//! route flipped twenty times under a client that never pauses. Needs root.

mod common;

use common::*;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

const EXAMPLE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/ingress.yaml");

/// `lab exec --internet -- ARGS`, which must succeed; its output.
fn internet(lab: &TestLab, args: &[&str]) -> String {
    let mut all = vec!["exec", "--internet", "--"];
    all.extend(args);
    let out = lab.flatnet(&all);
    assert!(
        out.status.success(),
        "{args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A lab of two nodes with the example applied; the address the controller published.
fn lab_with_example() -> Option<(TestLab, String)> {
    let lab = TestLab::new()?;
    lab.up(&lab.file("{nodes: 2, backend: vxlan}", ""));
    lab.apply(Path::new(EXAMPLE));
    let st = lab.status();
    let address = st["ingress"]["address"]
        .as_str()
        .unwrap_or_else(|| panic!("no published address: {}", st["ingress"]))
        .to_string();
    Some((lab, address))
}

/// The example Secret's certificate, as a PEM file for curl's `--cacert`.
fn example_certificate(dir: &Path) -> String {
    let text = std::fs::read_to_string(EXAMPLE).unwrap();
    let pem: Vec<&str> = text
        .lines()
        .skip_while(|l| !l.contains("BEGIN CERTIFICATE"))
        .take_while(|l| !l.contains("tls.key"))
        .map(str::trim)
        .collect();
    let path = dir.join("example-com.pem");
    std::fs::write(&path, pem.join("\n") + "\n").unwrap();
    path.display().to_string()
}

#[test]
fn the_lab_internet_reaches_services_by_name_over_http1_http2_tls_and_websockets() {
    let Some((lab, address)) = lab_with_example() else {
        return;
    };
    let st = lab.status();
    let lb = st["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "flatnet-ingress")
        .expect("the controller's Service");
    assert_eq!(lb["type"], "LoadBalancer");
    assert_eq!(lb["externalIP"], address.as_str());
    let ing = &st["ingress"]["ingresses"][0];
    assert_eq!(ing["name"], "myonlinestore");
    assert_eq!(ing["loadBalancer"]["ingress"][0]["ip"], address.as_str());
    let cond = |v: &serde_json::Value, kind: &str| {
        (v.as_array().unwrap().iter())
            .find(|c| c["type"] == kind)
            .map(|c| c["status"].as_str().unwrap().to_string())
    };
    let gw = &st["ingress"]["gateways"][0];
    assert_eq!(
        cond(&gw["conditions"], "Programmed").as_deref(),
        Some("True")
    );
    let route = &st["ingress"]["httpRoutes"][0]["parents"][0];
    assert_eq!(
        cond(&route["conditions"], "Accepted").as_deref(),
        Some("True")
    );

    let w = ["-s", "-w", " %{http_code} %{http_version}\n"];
    let get = |extra: &[&str], url: &str| {
        let mut args = vec!["curl"];
        args.extend(w);
        args.extend(extra);
        args.push(url);
        internet(&lab, &args)
    };
    // HTTP/1.1 by name, routed by path; the backend sees the client in X-Forwarded-For (the
    // Service keeps the client's address: externalTrafficPolicy Local).
    let shop = get(&[], "http://shop.example.com/shop/cart");
    assert!(shop.starts_with("pod=shop-"), "{shop}");
    assert!(shop.contains("forwarded-for=203.0.113.10"), "{shop}");
    assert!(shop.ends_with(" 200 1.1\n"), "{shop}");
    let video = get(&[], "http://shop.example.com/watch/1");
    assert!(video.starts_with("pod=video-"), "{video}");
    // No rule matches: the Ingress's defaultBackend. An unknown host: 404.
    let other = get(&[], "http://shop.example.com/elsewhere");
    assert!(other.starts_with("pod=shop-"), "{other}");
    let resolve = format!("nope.example.com:80:{address}");
    let unknown = get(&["--resolve", &resolve], "http://nope.example.com/");
    assert!(unknown.ends_with(" 404 1.1\n"), "{unknown}");
    // TLS with the Secret's certificate, verified by curl; HTTP/2 by ALPN, HTTP/1.1 on request.
    let ca = example_certificate(lab.root.path());
    let h2 = get(&["--cacert", &ca], "https://shop.example.com/shop");
    assert!(
        h2.starts_with("pod=shop-") && h2.ends_with(" 200 2\n"),
        "{h2}"
    );
    let h1 = get(
        &["--cacert", &ca, "--http1.1"],
        "https://shop.example.com/shop",
    );
    assert!(h1.ends_with(" 200 1.1\n"), "{h1}");
    // The Gateway's HTTPS listener, by SNI.
    let gw = get(&["--cacert", &ca], "https://store.example.com/");
    assert!(gw.starts_with("pod=") && gw.ends_with(" 200 2\n"), "{gw}");

    // A WebSocket through the edge, from the lab internet's host.
    let to: SocketAddr = format!("{address}:80").parse().unwrap();
    let echoed = lab
        .ns("internet")
        .run(move || -> std::io::Result<Vec<u8>> {
            let mut c = TcpStream::connect_timeout(&to, Duration::from_secs(3))?;
            c.set_read_timeout(Some(Duration::from_secs(5)))?;
            c.write_all(b"GET /shop/live HTTP/1.1\r\nhost: shop.example.com\r\nupgrade: websocket\r\nconnection: Upgrade\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\nsec-websocket-version: 13\r\n\r\n")?;
            let mut r = BufReader::new(c.try_clone()?);
            let mut head = String::new();
            while !head.ends_with("\r\n\r\n") {
                if r.read_line(&mut head)? == 0 {
                    break;
                }
            }
            assert!(head.starts_with("HTTP/1.1 101"), "{head}");
            assert!(
                head.to_ascii_lowercase()
                    .contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo="),
                "{head}"
            );
            let mask = [1u8, 2, 3, 4];
            for _ in 0..3 {
                let mut frame = vec![0x81, 0x80 | 5];
                frame.extend(mask);
                frame.extend(b"hello".iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
                c.write_all(&frame)?;
            }
            let mut echo = vec![0u8; 21];
            r.read_exact(&mut echo)?;
            Ok(echo)
        })
        .unwrap()
        .unwrap();
    assert_eq!(&echoed[..7], &[0x81, 5, b'h', b'e', b'l', b'l', b'o']);
    assert_eq!(&echoed[14..], &[0x81, 5, b'h', b'e', b'l', b'l', b'o']);
}

fn flip_route(backend: &str) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: flip}}\nspec:\n  parentRefs: [{{name: store}}]\n  hostnames: [flip.example.com]\n  rules: [{{backendRefs: [{{name: {backend}, port: 80}}]}}]\n"
    )
}

/// `(status code, backend)` of each answer in curl's output (`-w '%{http_code}\n'` after
/// each body).
fn answers(out: &str) -> Vec<(String, String)> {
    let mut got = Vec::new();
    let mut backend = String::new();
    for line in out.lines() {
        if line.len() == 3 && line.bytes().all(|b| b.is_ascii_digit()) {
            got.push((line.to_string(), std::mem::take(&mut backend)));
        } else if let Some(pod) = line.strip_prefix("pod=") {
            backend = pod.split('-').next().unwrap_or_default().to_string();
        }
    }
    got
}

#[test]
fn weighted_split_holds_and_route_flips_drop_no_request() {
    let Some((lab, _)) = lab_with_example() else {
        return;
    };
    // 3:1 over 500 requests, within ±5% of the requests.
    let urls: Vec<String> = (0..500)
        .map(|i| format!("http://store.example.com/{i}"))
        .collect();
    let mut args = vec!["curl", "-s", "-w", "%{http_code}\n"];
    args.extend(urls.iter().map(String::as_str));
    let got = answers(&internet(&lab, &args));
    assert_eq!(got.len(), 500);
    assert!(got.iter().all(|(code, _)| code == "200"), "{got:?}");
    let shop = got.iter().filter(|(_, b)| b == "shop").count();
    let video = got.iter().filter(|(_, b)| b == "video").count();
    assert_eq!(shop + video, 500);
    eprintln!("weighted 3:1 over 500: shop {shop}, video {video}");
    assert!(
        (350..=400).contains(&shop),
        "3:1 expected: shop {shop}, video {video}"
    );

    // A client sending without pause while the route flips every 200 ms, twenty times.
    lab.apply_text(&flip_route("shop"));
    let stop = lab.root.path().join("stop");
    let log = lab.root.path().join("client.log");
    let script = format!(
        "while [ ! -e {} ]; do curl -s -w '%{{http_code}}\\n' {}; done",
        stop.display(),
        ["http://flip.example.com/"; 10].join(" ")
    );
    let client = Command::new(BIN)
        .args(["lab", "--root"])
        .arg(lab.root.path())
        .args([
            "--name",
            &lab.name,
            "exec",
            "--internet",
            "--",
            "sh",
            "-c",
            &script,
        ])
        .stdout(Stdio::from(std::fs::File::create(&log).unwrap()))
        .spawn()
        .unwrap();
    let mut client = Client(client, stop.clone());
    std::thread::sleep(Duration::from_millis(300));
    for i in 0..20 {
        lab.apply_text(&flip_route(if i % 2 == 0 { "video" } else { "shop" }));
        std::thread::sleep(Duration::from_millis(200));
    }
    std::fs::write(&stop, "").unwrap();
    let status = client.0.wait().unwrap();
    assert!(status.success());
    let got = answers(&std::fs::read_to_string(&log).unwrap());
    let bad: Vec<_> = got.iter().filter(|(code, _)| code != "200").collect();
    eprintln!(
        "{} requests during 20 route flips, {} not 200",
        got.len(),
        bad.len()
    );
    assert!(
        bad.is_empty(),
        "non-2xx during route flips: {bad:?} of {}",
        got.len()
    );
    assert!(got.len() >= 100, "only {} requests in 4 s", got.len());
    for b in ["shop", "video"] {
        assert!(got.iter().any(|(_, x)| x == b), "{b} never answered");
    }

    // `lab delete` takes the route away, and its hostname with it (curl: 6, not resolved).
    let out = lab.flatnet(&["delete", "httproute", "flip"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let routes = lab.status()["ingress"]["httpRoutes"].clone();
    assert!(
        routes
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["name"] != "flip"),
        "{routes}"
    );
    let gone = lab.flatnet(&[
        "exec",
        "--internet",
        "--",
        "curl",
        "-s",
        "http://flip.example.com/",
    ]);
    assert_eq!(
        gone.status.code(),
        Some(6),
        "{}",
        String::from_utf8_lossy(&gone.stdout)
    );
}

/// The looping client; it is told to stop (and waited for) also when the test fails early.
struct Client(std::process::Child, std::path::PathBuf);

impl Drop for Client {
    fn drop(&mut self) {
        let _ = std::fs::write(&self.1, "");
        let _ = self.0.wait();
    }
}
