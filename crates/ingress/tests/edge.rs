//! The edge on loopback, end to end: real backends, real HTTP/1.1, HTTP/2 and TLS clients.

use arc_swap::ArcSwap;
use bytes::Bytes;
use cluster::gateway::*;
use cluster::slim::EndpointSlice;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use ingress::edge::{Config, Edge};
use ingress::endpoints::Endpoints;
use ingress::ingress::{Classes, Ports, CONTROLLER};
use ingress::table::{Action, PathMatch, ServicePort, Table, Target};
use ingress::tls::{self, Certs};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::networking::v1::{Ingress, IngressClass};
use serde_json::json;
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// A backend: answers `backend=NAME host=H path=P xff=X proto=P` after `delay`, and on an
/// `Upgrade` request switches protocols and echoes bytes.
async fn backend(name: &'static str, delay: Duration) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (s, _) = l.accept().await.unwrap();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    move |mut req: Request<hyper::body::Incoming>| async move {
                        if req.headers().contains_key("upgrade") {
                            let up = hyper::upgrade::on(&mut req);
                            tokio::spawn(async move {
                                let mut io = TokioIo::new(up.await.unwrap());
                                let mut buf = [0u8; 64];
                                while let Ok(n) = io.read(&mut buf).await {
                                    if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                                        break;
                                    }
                                }
                            });
                            let r = http::Response::builder()
                                .status(101)
                                .header("connection", "upgrade")
                                .header("upgrade", "websocket")
                                .body(Full::new(Bytes::new()))
                                .unwrap();
                            return Ok::<_, std::convert::Infallible>(r);
                        }
                        tokio::time::sleep(delay).await;
                        let h = |n: &str| {
                            req.headers()
                                .get(n)
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or("-")
                                .to_string()
                        };
                        let body = format!(
                            "backend={name} host={} path={} xff={} proto={} fhost={} added={}",
                            h("host"),
                            req.uri(),
                            h("x-forwarded-for"),
                            h("x-forwarded-proto"),
                            h("x-forwarded-host"),
                            h("x-added")
                        );
                        Ok(http::Response::new(Full::new(Bytes::from(body))))
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .with_upgrades()
                    .await;
            });
        }
    });
    addr
}

fn service(name: &str, port: u16) -> Service {
    serde_json::from_value(json!({"metadata": {"name": name, "namespace": "shop"},
        "spec": {"ports": [{"name": "http", "port": 80, "targetPort": port}]}}))
    .unwrap()
}

fn slice(name: &str, addrs: &[SocketAddr]) -> Vec<EndpointSlice> {
    addrs
        .iter()
        .enumerate()
        .map(|(i, a)| {
            serde_json::from_value(json!({
                "metadata": {"name": format!("{name}-{i}"), "namespace": "shop", "labels": {"kubernetes.io/service-name": name}},
                "addressType": "IPv4",
                "ports": [{"name": "http", "port": a.port()}],
                "endpoints": [{"addresses": [a.ip().to_string()]}]
            }))
            .unwrap()
        })
        .collect()
}

fn path(p: &str, svc: &str) -> serde_json::Value {
    json!({"path": p, "pathType": "Prefix", "backend": {"service": {"name": svc, "port": {"name": "http"}}}})
}

struct Running {
    edge: Arc<Edge>,
    http: SocketAddr,
    https: SocketAddr,
    stop: watch::Sender<bool>,
    shop_cert: Vec<u8>,
}

/// The edge with the shop's Ingress (`shop.example.com`: `/v1`, `/v2`, `/none`, `/slow`,
/// `/flaky`; TLS for it from a Secret) and a Gateway route splitting `/split` 3:1.
async fn start(config: Config) -> Running {
    let v1 = backend("v1", Duration::ZERO).await;
    let v2 = backend("v2", Duration::ZERO).await;
    let slow = backend("slow", Duration::from_millis(600)).await;
    let closed = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap(); // closed at once
    let services = [
        service("v1", v1.port()),
        service("v2", v2.port()),
        service("none", 1),
        service("slow", slow.port()),
        service("flaky", v1.port()),
    ];
    let mut slices = slice("v1", &[v1]);
    slices.extend(slice("v2", &[v2]));
    slices.extend(slice("slow", &[slow]));
    slices.extend(slice("flaky", &[closed, v1]));
    let endpoints = Endpoints::build(&services, &slices);

    let shop = rcgen::generate_simple_self_signed(vec!["shop.example.com".into()]).unwrap();
    let ing: Ingress = serde_json::from_value(json!({
        "metadata": {"name": "shop", "namespace": "shop"},
        "spec": {"ingressClassName": "flatnet",
                 "tls": [{"hosts": ["shop.example.com"], "secretName": "shop-tls"}],
                 "rules": [{"host": "shop.example.com", "http": {"paths": [
                     path("/v1", "v1"), path("/v2", "v2"), path("/none", "none"), path("/slow", "slow"), path("/flaky", "flaky")]}}]}
    }))
    .unwrap();
    let class: IngressClass = serde_json::from_value(
        json!({"metadata": {"name": "flatnet"}, "spec": {"controller": CONTROLLER}}),
    )
    .unwrap();
    let mut table = Table::default();
    let compiled = ingress::ingress::compile(
        [&ing],
        &Classes::new([&class]),
        Ports {
            http: 80,
            https: 443,
        },
        &mut table,
    );
    let gw: Gateway = serde_json::from_value(json!({"metadata": {"name": "gw", "namespace": "shop"},
        "spec": {"gatewayClassName": "flatnet", "listeners": [{"name": "http", "port": 80, "protocol": "HTTP", "hostname": "split.example.com"}]}})).unwrap();
    let route: HttpRoute = serde_json::from_value(json!({"metadata": {"name": "split", "namespace": "shop"},
        "spec": {"parentRefs": [{"name": "gw"}], "rules": [
            {"matches": [{"path": {"value": "/split"}}], "backendRefs": [{"name": "v1", "port": 80, "weight": 3}, {"name": "v2", "port": 80, "weight": 1}],
             "filters": [{"type": "RequestHeaderModifier", "requestHeaderModifier": {"add": [{"name": "X-Added", "value": "yes"}]}}]},
            {"matches": [{"path": {"value": "/timeout"}}], "backendRefs": [{"name": "slow", "port": 80}], "timeouts": {"request": "200ms"}},
            {"matches": [{"path": {"value": "/go"}}], "filters": [{"type": "RequestRedirect", "requestRedirect": {"scheme": "https", "statusCode": 301}}]}
        ]}})).unwrap();
    let gclass: GatewayClass = serde_json::from_value(
        json!({"metadata": {"name": "flatnet"}, "spec": {"controllerName": CONTROLLER}}),
    )
    .unwrap();
    let svc_names: BTreeSet<(String, String)> = services
        .iter()
        .map(|s| ("shop".to_string(), s.metadata.name.clone().unwrap()))
        .collect();
    let g = ingress::gateway::compile(
        &ingress::gateway::Inputs {
            classes: &[&gclass],
            gateways: &[&gw],
            routes: &[&route],
            grants: &[],
            namespaces: &BTreeMap::new(),
            services: &svc_names,
            tls_secrets: &BTreeSet::new(),
        },
        &mut table,
    );
    assert_eq!(g.routes[0].parents[0].1[0].status, "True", "{:?}", g.routes);
    table.seal();

    let (cert_pem, key_pem) = (shop.cert.pem(), shop.key_pair.serialize_pem());
    let (certs, problems) = Certs::build(
        &compiled.tls,
        |ns, name| {
            (ns == "shop" && name == "shop-tls")
                .then(|| (cert_pem.clone().into_bytes(), key_pem.clone().into_bytes()))
        },
        tls::self_signed("default.invalid"),
    );
    assert!(problems.is_empty(), "{problems:?}");
    let edge = Edge::new(config, Arc::new(ArcSwap::from_pointee(certs)));
    edge.routes.store(Arc::new(table));
    edge.endpoints.store(Arc::new(endpoints));
    let (stop, rx) = watch::channel(false);
    let http_l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let https_l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (http, https) = (http_l.local_addr().unwrap(), https_l.local_addr().unwrap());
    tokio::spawn(edge.clone().serve(http_l, 80, false, rx.clone()));
    tokio::spawn(edge.clone().serve(https_l, 443, true, rx));
    Running {
        edge,
        http,
        https,
        stop,
        shop_cert: shop.cert.der().to_vec(),
    }
}

type Client = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    Empty<Bytes>,
>;

fn client() -> Client {
    hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build_http()
}

async fn get(c: &Client, at: SocketAddr, host: &str, path: &str) -> (StatusCode, String) {
    let req = Request::get(format!("http://{at}{path}"))
        .header("host", host)
        .body(Empty::new())
        .unwrap();
    let resp = c.request(req).await.unwrap();
    let status = resp.status();
    let loc = resp
        .headers()
        .get("location")
        .map(|v| v.to_str().unwrap().to_string());
    let body = String::from_utf8(
        resp.into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec(),
    )
    .unwrap();
    (status, loc.map_or(body, |l| format!("location={l}")))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_forwards_and_says_why_it_fails() {
    let r = start(Config::default()).await;
    let c = client();
    let (s, body) = get(&c, r.http, "shop.example.com", "/v1/cart?x=1").await;
    assert_eq!(s, 200, "{body}");
    assert!(body.starts_with("backend=v1 host=shop.example.com path=/v1/cart?x=1 xff=127.0.0.1 proto=http fhost=shop.example.com"), "{body}");
    assert_eq!(
        get(&c, r.http, "shop.example.com:80", "/v2")
            .await
            .1
            .split(' ')
            .next(),
        Some("backend=v2")
    );
    let (s, body) = get(&c, r.http, "other.example.com", "/v1").await;
    assert_eq!(
        (s, body.contains("no route for other.example.com/v1")),
        (StatusCode::NOT_FOUND, true),
        "{body}"
    );
    let (s, body) = get(&c, r.http, "shop.example.com", "/none").await;
    assert_eq!(
        (s, body.contains("Service shop/none: no ready endpoints")),
        (StatusCode::SERVICE_UNAVAILABLE, true),
        "{body}"
    );
    // One endpoint of `flaky` refuses connections: every request still lands on the other.
    for _ in 0..6 {
        let (s, body) = get(&c, r.http, "shop.example.com", "/flaky").await;
        assert_eq!(s, 200, "{body}");
    }
    let (s, body) = get(&c, r.http, "split.example.com", "/timeout").await;
    assert_eq!(
        (s, body.contains("sent no response in 200ms")),
        (StatusCode::GATEWAY_TIMEOUT, true),
        "{body}"
    );
    let (s, body) = get(&c, r.http, "split.example.com", "/go/x?y=1").await;
    assert_eq!(
        (s, body.as_str()),
        (
            StatusCode::MOVED_PERMANENTLY,
            "location=https://split.example.com/go/x?y=1"
        )
    );
    let _ = r.stop.send(true);
}

/// The weighted split over 400 requests (3:1, ±5%), the request header filter on each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weighted_backends_split_the_requests() {
    let r = start(Config::default()).await;
    let c = client();
    let mut v1 = 0;
    for _ in 0..400 {
        let (s, body) = get(&c, r.http, "split.example.com", "/split").await;
        assert_eq!(s, 200);
        assert!(body.ends_with("added=yes"), "{body}");
        v1 += body.starts_with("backend=v1") as usize;
    }
    assert!(
        (280..=320).contains(&v1),
        "v1 got {v1} of 400, want 300 ± 20"
    );
    let _ = r.stop.send(true);
}

/// Accepts whatever certificate the server shows and keeps it, to see which one SNI picked.
#[derive(Debug)]
struct Keep(std::sync::Mutex<Vec<u8>>);

impl rustls::client::danger::ServerCertVerifier for Keep {
    fn verify_server_cert(
        &self,
        end: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        *self.0.lock().unwrap() = end.to_vec();
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &rustls::pki_types::CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            m,
            c,
            d,
            &rustls::crypto::ring::default_provider().signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &rustls::pki_types::CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            m,
            c,
            d,
            &rustls::crypto::ring::default_provider().signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// TLS by SNI (the Secret's certificate for its host, the default for others; a broken handshake
/// touches no other connection) and HTTP/2 by ALPN.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_by_sni_and_http2() {
    let r = start(Config::default()).await;
    let handshake = |sni: &'static str| async move {
        let keep = Arc::new(Keep(Default::default()));
        let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(keep.clone())
        .with_no_client_auth();
        cfg.alpn_protocols = vec![b"h2".to_vec()];
        let tcp = TcpStream::connect(r.https).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from(sni).unwrap();
        let s = tokio_rustls::TlsConnector::from(Arc::new(cfg))
            .connect(name, tcp)
            .await
            .unwrap();
        let cert = keep.0.lock().unwrap().clone();
        (s, cert)
    };
    // A client that sends garbage instead of a ClientHello.
    let mut junk = TcpStream::connect(r.https).await.unwrap();
    junk.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();

    let (s, cert) = handshake("shop.example.com").await;
    assert_eq!(cert, r.shop_cert, "the Secret's certificate for its host");
    assert_eq!(s.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(s))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = Request::get("https://shop.example.com/v2/x")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    assert_eq!(resp.version(), http::Version::HTTP_2);
    let body = String::from_utf8(
        resp.into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec(),
    )
    .unwrap();
    assert!(
        body.starts_with("backend=v2 host=shop.example.com path=/v2/x xff=127.0.0.1 proto=https"),
        "{body}"
    );
    let (_, cert) = handshake("unknown.example.com").await;
    assert_ne!(cert, r.shop_cert, "the default certificate elsewhere");
    let mut buf = Vec::new();
    let _ = junk.read_to_end(&mut buf).await;
    let _ = r.stop.send(true);
}

/// Oversize headers get a 431, a client that never finishes its headers is closed after the
/// header timeout, and a WebSocket upgrade is passed through both ways.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_clients_and_websockets() {
    let r = start(Config {
        header_timeout: Duration::from_millis(500),
        ..Config::default()
    })
    .await;
    let mut big = TcpStream::connect(r.http).await.unwrap();
    let header = format!(
        "GET /v1 HTTP/1.1\r\nhost: shop.example.com\r\nx-big: {}\r\n\r\n",
        "a".repeat(64 * 1024)
    );
    let _ = big.write_all(header.as_bytes()).await;
    let mut answer = vec![0u8; 12];
    big.read_exact(&mut answer).await.unwrap();
    assert_eq!(&answer, b"HTTP/1.1 431");

    let mut slow = TcpStream::connect(r.http).await.unwrap();
    slow.write_all(b"GET /v1 HTTP/1.1\r\nhost: shop.exa")
        .await
        .unwrap();
    let t = std::time::Instant::now();
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), slow.read_to_end(&mut rest))
        .await
        .expect("closed");
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "closed after {:?}",
        t.elapsed()
    );

    let mut ws = TcpStream::connect(r.http).await.unwrap();
    ws.write_all(b"GET /v1/ws HTTP/1.1\r\nhost: shop.example.com\r\nconnection: Upgrade\r\nupgrade: websocket\r\n\r\n").await.unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        ws.read_exact(&mut b).await.unwrap();
        head.push(b[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    ws.write_all(b"hello").await.unwrap();
    let mut echo = [0u8; 5];
    ws.read_exact(&mut echo).await.unwrap();
    assert_eq!(&echo, b"hello");
    let _ = r.stop.send(true);
}

/// A client sends without pause while `/v1` flips between backends v1 and v2 every 20 ms,
/// forty times: every answer is a 200 from one of them, both are seen, and a slow request
/// started before the flips finishes on the table it started with.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_changes_drop_nothing() {
    let r = start(Config::default()).await;
    let to_v1 = r.edge.routes.load_full();
    let mut to_v2: Table = (*to_v1).clone();
    for port in to_v2.ports.values_mut() {
        for l in port.listeners.values_mut() {
            for entries in l.hosts.values_mut() {
                for e in entries
                    .iter_mut()
                    .filter(|e| e.matcher.path == PathMatch::prefix("/v1"))
                {
                    let mut rule = (*e.rule).clone();
                    if let Action::Forward { backends, .. } = &mut rule.action {
                        backends[0].target = Target::Service {
                            namespace: "shop".into(),
                            name: "v2".into(),
                            port: ServicePort::Name("http".into()),
                        };
                    }
                    e.rule = Arc::new(rule);
                }
            }
        }
    }
    let to_v2 = Arc::new(to_v2);
    let c = client();
    let slow = tokio::spawn({
        let c = c.clone();
        let at = r.http;
        async move { get(&c, at, "shop.example.com", "/slow").await }
    });
    let flipping = tokio::spawn({
        let edge = r.edge.clone();
        async move {
            for i in 0..40 {
                edge.routes.store(if i % 2 == 0 {
                    to_v2.clone()
                } else {
                    to_v1.clone()
                });
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    });
    let mut seen = BTreeMap::new();
    while !flipping.is_finished() {
        let (s, body) = get(&c, r.http, "shop.example.com", "/v1").await;
        assert_eq!(s, 200, "{body}");
        *seen
            .entry(body.split(' ').next().unwrap().to_string())
            .or_insert(0) += 1;
    }
    assert_eq!(
        seen.keys().collect::<Vec<_>>(),
        ["backend=v1", "backend=v2"],
        "{seen:?}"
    );
    let (s, body) = slow.await.unwrap();
    assert_eq!(
        (s, body.starts_with("backend=slow")),
        (StatusCode::OK, true),
        "{body}"
    );
    let _ = r.stop.send(true);
}
