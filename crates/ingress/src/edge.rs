//! The edge proxy: HTTP/1.1 and HTTP/2 (ALPN on TLS, the preface on plain TCP) on one listener,
//! routed by the current [`Table`] and forwarded straight to ready endpoints over pooled
//! keep-alive connections.
//!
//! Each request loads the table once (an [`ArcSwap`] snapshot) and keeps it to the end, so a
//! swap never changes a request or an upgraded connection mid-way; a changed route is served from
//! the next request on. A connection refused by one endpoint is tried on the next (requests
//! without a body: a body already sent cannot be sent again). Errors say which: 404 no route,
//! 500 a backend that cannot be followed, 502 the upstream failed, 503 no ready endpoint, 504 the
//! upstream did not answer in time; 431 for oversize headers and a closed connection for a
//! client too slow to send them come from hyper's limits.

use crate::endpoints::Endpoints;
use crate::table::{
    Action, Found, Match, PathChange, PathMatch, Redirect, RequestView, Table, Target,
};
use crate::tls::{Certs, Resolver};
use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode, Uri};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::{Body as _, Incoming};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;

pub type Body = UnsyncBoxBody<Bytes, hyper::Error>;

#[derive(Debug, Clone, PartialEq, Eq, Hash, prometheus_client::encoding::EncodeLabelSet)]
pub struct RequestLabels {
    /// The rule (`Ingress ns/name rule i`, `HTTPRoute ns/name rule i`), or `none`.
    pub route: String,
    pub code: u16,
}

/// Requests by route and status, and how long upstreams took to answer.
pub struct EdgeMetrics {
    pub requests: prometheus_client::metrics::family::Family<
        RequestLabels,
        prometheus_client::metrics::counter::Counter,
    >,
    pub upstream_seconds: prometheus_client::metrics::histogram::Histogram,
}

impl Default for EdgeMetrics {
    fn default() -> Self {
        EdgeMetrics {
            requests: Default::default(),
            upstream_seconds: prometheus_client::metrics::histogram::Histogram::new(
                prometheus_client::metrics::histogram::exponential_buckets(0.0001, 2.5, 14),
            ),
        }
    }
}

/// Limits and defaults.
#[derive(Debug, Clone)]
pub struct Config {
    /// A client must send a request's headers within this (slowloris).
    pub header_timeout: Duration,
    /// Request headers larger than this get a 431 (HTTP/1.1) or a reset stream (HTTP/2).
    pub max_header_bytes: usize,
    /// A route without `timeouts.request` waits this long for the upstream's response head.
    pub request_timeout: Duration,
    pub connect_timeout: Duration,
    /// A TLS handshake must finish within this.
    pub handshake_timeout: Duration,
    /// Open connections get this long to finish at shutdown.
    pub drain: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            header_timeout: Duration::from_secs(10),
            max_header_bytes: 32 * 1024,
            request_timeout: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(5),
            handshake_timeout: Duration::from_secs(10),
            drain: Duration::from_secs(30),
        }
    }
}

/// The proxy's state: what it routes by, swapped whole on a change.
pub struct Edge {
    pub routes: ArcSwap<Table>,
    pub endpoints: ArcSwap<Endpoints>,
    pub certs: Arc<ArcSwap<Certs>>,
    config: Config,
    client: Client<HttpConnector, Body>,
    /// Round-robin positions: backends by weight, endpoints.
    weighted: AtomicUsize,
    next_endpoint: AtomicUsize,
    pub metrics: EdgeMetrics,
}

fn text(status: StatusCode, why: &str) -> Response<Body> {
    let mut r = Response::new(
        Full::new(Bytes::from(format!("{status}: {why}\n")))
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// Hop-by-hop headers (RFC 9110 7.6.1): never forwarded, except `Upgrade` on an upgrade.
const HOP_BY_HOP: [&str; 7] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

fn strip_hop_by_hop(headers: &mut http::HeaderMap) {
    let named: Vec<String> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|s| s.trim().to_ascii_lowercase())
        .collect();
    for h in HOP_BY_HOP.iter().map(|s| s.to_string()).chain(named) {
        headers.remove(h.as_str());
    }
}

/// The path after a prefix rewrite: the part `matcher` matched is replaced by `with`.
fn replace_prefix(path: &str, matcher: Option<&Match>, with: &str) -> String {
    let rest = match matcher.map(|m| &m.path) {
        Some(PathMatch::Prefix(p)) if p != "/" => &path[p.len().min(path.len())..],
        _ => path,
    };
    let head = with.trim_end_matches('/');
    let joined = if rest.is_empty() || rest.starts_with('/') {
        format!("{head}{rest}")
    } else {
        format!("{head}/{rest}")
    };
    if joined.is_empty() {
        "/".into()
    } else {
        joined
    }
}

fn location(
    r: &Redirect,
    scheme: &str,
    host: &str,
    port: u16,
    path: &str,
    query: Option<&str>,
    matcher: Option<&Match>,
) -> String {
    let scheme_out = r.scheme.as_deref().unwrap_or(scheme);
    let well_known = |s: &str| if s == "https" { 443 } else { 80 };
    // The port: the filter's; else the new scheme's well-known one; else the listener's.
    let port = r.port.unwrap_or(if r.scheme.is_some() {
        well_known(scheme_out)
    } else {
        port
    });
    let host = r.hostname.as_deref().unwrap_or(host);
    let path = match &r.path {
        Some(PathChange::Full(p)) => p.clone(),
        Some(PathChange::Prefix(p)) => replace_prefix(path, matcher, p),
        None => path.to_string(),
    };
    let port = if port == well_known(scheme_out) {
        String::new()
    } else {
        format!(":{port}")
    };
    let query = query.map(|q| format!("?{q}")).unwrap_or_default();
    format!("{scheme_out}://{host}{port}{path}{query}")
}

/// What a connection tells each of its requests.
#[derive(Clone, Copy)]
struct Conn {
    peer: SocketAddr,
    /// The port routes are looked up under (a listener's `port`, not the socket's).
    port: u16,
    https: bool,
}

impl Edge {
    pub fn new(config: Config, certs: Arc<ArcSwap<Certs>>) -> Arc<Edge> {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(config.connect_timeout));
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(256)
            .set_host(false)
            .build(connector);
        Arc::new(Edge {
            routes: ArcSwap::from_pointee(Table::default()),
            endpoints: ArcSwap::from_pointee(Endpoints::default()),
            certs,
            config,
            client,
            weighted: AtomicUsize::new(0),
            next_endpoint: AtomicUsize::new(0),
            metrics: EdgeMetrics::default(),
        })
    }

    /// Serves plain HTTP on `listener`, routing under `port`, until `stop` turns true; then
    /// stops accepting and lets open connections finish (up to the drain time).
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        port: u16,
        tls: bool,
        mut stop: watch::Receiver<bool>,
    ) {
        let graceful = GracefulShutdown::new();
        let acceptor = tls.then(|| {
            tokio_rustls::TlsAcceptor::from(crate::tls::server_config(Arc::new(Resolver(
                self.certs.clone(),
            ))))
        });
        loop {
            let (tcp, peer) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::warn!("accept on port {port}: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = async { stop.wait_for(|s| *s).await.is_ok() } => break,
            };
            let _ = tcp.set_nodelay(true);
            let edge = self.clone();
            let watcher = graceful.watcher();
            let acceptor = acceptor.clone();
            let conn = Conn {
                peer,
                port,
                https: tls,
            };
            tokio::spawn(async move {
                match acceptor {
                    None => edge.connection(TokioIo::new(tcp), conn, watcher).await,
                    Some(a) => {
                        // A failed or slow handshake ends this connection only.
                        match tokio::time::timeout(edge.config.handshake_timeout, a.accept(tcp))
                            .await
                        {
                            Ok(Ok(s)) => edge.connection(TokioIo::new(s), conn, watcher).await,
                            Ok(Err(e)) => tracing::debug!("TLS handshake from {peer}: {e}"),
                            Err(_) => tracing::debug!("TLS handshake from {peer}: timed out"),
                        }
                    }
                }
            });
        }
        drop(listener);
        let _ = tokio::time::timeout(self.config.drain, graceful.shutdown()).await;
    }

    async fn connection<I>(
        self: Arc<Self>,
        io: TokioIo<I>,
        conn: Conn,
        watcher: hyper_util::server::graceful::Watcher,
    ) where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let mut b = auto::Builder::new(TokioExecutor::new());
        b.http1()
            .timer(TokioTimer::new())
            .header_read_timeout(self.config.header_timeout)
            .max_buf_size(self.config.max_header_bytes.max(8192));
        b.http2()
            .timer(TokioTimer::new())
            .max_header_list_size(self.config.max_header_bytes as u32);
        let edge = self.clone();
        let svc = hyper::service::service_fn(move |req| {
            let edge = edge.clone();
            async move { Ok::<_, std::convert::Infallible>(edge.handle(req, conn).await) }
        });
        let served = watcher.watch(b.serve_connection_with_upgrades(io, svc).into_owned());
        if let Err(e) = served.await {
            tracing::debug!("connection from {}: {e}", conn.peer);
        }
    }

    pub fn register(&self, r: &mut prometheus_client::registry::Registry) {
        r.register(
            "requests",
            "Requests by route and status code",
            self.metrics.requests.clone(),
        );
        r.register(
            "upstream_response_seconds",
            "Time from sending a request upstream to its response head",
            self.metrics.upstream_seconds.clone(),
        );
    }

    async fn handle(&self, req: Request<Incoming>, conn: Conn) -> Response<Body> {
        let mut route = None;
        let resp = self.forward(req, conn, &mut route).await;
        let labels = RequestLabels {
            route: route.unwrap_or_else(|| "none".into()),
            code: resp.status().as_u16(),
        };
        self.metrics.requests.get_or_create(&labels).inc();
        resp
    }

    async fn forward(
        &self,
        mut req: Request<Incoming>,
        conn: Conn,
        route: &mut Option<String>,
    ) -> Response<Body> {
        let routes = self.routes.load_full();
        let (rule, matcher, host) = {
            let mut host = String::new();
            let view = RequestView::of(&req, &mut host);
            match routes.route(conn.port, &view) {
                Found::NotFound => {
                    let why = format!("no route for {}{}", view.host, view.path);
                    return text(StatusCode::NOT_FOUND, &why);
                }
                Found::Rule { rule, matcher } => (rule.clone(), matcher.cloned(), host),
            }
        };
        *route = Some(rule.origin.to_string());
        let scheme = if conn.https { "https" } else { "http" };
        let (backends, rewrite, timeout) = match &rule.action {
            Action::Redirect(r) => {
                let to = location(
                    r,
                    scheme,
                    &host,
                    conn.port,
                    req.uri().path(),
                    req.uri().query(),
                    matcher.as_ref(),
                );
                let mut resp = text(
                    StatusCode::from_u16(r.status).unwrap_or(StatusCode::FOUND),
                    &format!("to {to}"),
                );
                if let Ok(v) = HeaderValue::from_str(&to) {
                    resp.headers_mut().insert(header::LOCATION, v);
                }
                rule.response_headers.apply(resp.headers_mut());
                return resp;
            }
            Action::Forward {
                backends,
                rewrite,
                timeout,
            } => (backends, rewrite, timeout),
        };
        let total: u32 = backends.iter().map(|b| b.weight).sum();
        if total == 0 {
            return text(
                StatusCode::INTERNAL_SERVER_ERROR,
                &format!("{}: no backend with a weight", rule.origin),
            );
        }
        let mut n = (self.weighted.fetch_add(1, Ordering::Relaxed) % total as usize) as u32;
        let backend = backends
            .iter()
            .find(|b| {
                if n < b.weight {
                    true
                } else {
                    n -= b.weight;
                    false
                }
            })
            .expect("n < total");
        let (ns, svc, port) = match &backend.target {
            Target::Invalid(why) => return text(StatusCode::INTERNAL_SERVER_ERROR, why),
            Target::Service {
                namespace,
                name,
                port,
            } => (namespace, name, port),
        };
        let addrs = match self.endpoints.load().resolve(ns, svc, port) {
            Ok(a) => a,
            Err(why) => {
                return text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &format!("Service {ns}/{svc}: {why}"),
                )
            }
        };

        // The request as the upstream gets it.
        let upgrade = req.headers().get(header::UPGRADE).cloned().filter(|_| {
            req.headers().get_all(header::CONNECTION).iter().any(|v| {
                v.to_str()
                    .is_ok_and(|s| s.to_ascii_lowercase().contains("upgrade"))
            })
        });
        let client_upgrade = upgrade.is_some().then(|| hyper::upgrade::on(&mut req));
        let (mut parts, body) = req.into_parts();
        let original_host = parts.headers.get(header::HOST).cloned().or_else(|| {
            parts
                .uri
                .authority()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        });
        strip_hop_by_hop(&mut parts.headers);
        if let Some(u) = &upgrade {
            parts
                .headers
                .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            parts.headers.insert(header::UPGRADE, u.clone());
        }
        let forwarded_for = match parts
            .headers
            .get("x-forwarded-for")
            .and_then(|v| v.to_str().ok())
        {
            Some(prior) => format!("{prior}, {}", conn.peer.ip()),
            None => conn.peer.ip().to_string(),
        };
        if let Ok(v) = HeaderValue::from_str(&forwarded_for) {
            parts.headers.insert("x-forwarded-for", v);
        }
        parts
            .headers
            .insert("x-forwarded-proto", HeaderValue::from_static(scheme));
        if let Some(h) = &original_host {
            parts.headers.insert("x-forwarded-host", h.clone());
            parts.headers.insert(header::HOST, h.clone());
        }
        if let Some(h) = rewrite
            .hostname
            .as_deref()
            .and_then(|h| HeaderValue::from_str(h).ok())
        {
            parts.headers.insert(header::HOST, h);
        }
        rule.request_headers.apply(&mut parts.headers);
        let path = match &rewrite.path {
            Some(PathChange::Full(p)) => p.clone(),
            Some(PathChange::Prefix(p)) => replace_prefix(parts.uri.path(), matcher.as_ref(), p),
            None => parts.uri.path().to_string(),
        };
        let path_and_query = match parts.uri.query() {
            Some(q) => format!("{path}?{q}"),
            None => path,
        };
        parts.version = http::Version::HTTP_11;

        // A body can be sent once; a request without one is tried on up to three endpoints.
        let mut body = (!body.is_end_stream()).then(|| body.boxed_unsync());
        let tries = if body.is_some() {
            1
        } else {
            addrs.len().min(3)
        };
        let start = self.next_endpoint.fetch_add(1, Ordering::Relaxed);
        let wait = timeout.unwrap_or(self.config.request_timeout);
        let mut last_error = String::new();
        for k in 0..tries {
            let addr = addrs[(start + k) % addrs.len()];
            let Ok(uri) = Uri::try_from(format!("http://{addr}{path_and_query}")) else {
                return text(StatusCode::BAD_REQUEST, "the path cannot be forwarded");
            };
            let mut up = Request::from_parts(
                parts.clone(),
                body.take()
                    .unwrap_or_else(|| Empty::new().map_err(|never| match never {}).boxed_unsync()),
            );
            *up.uri_mut() = uri;
            let sent = std::time::Instant::now();
            let answer = tokio::time::timeout(wait, self.client.request(up)).await;
            if let Ok(Ok(_)) = &answer {
                self.metrics
                    .upstream_seconds
                    .observe(sent.elapsed().as_secs_f64());
            }
            match answer {
                Err(_) => {
                    return text(
                        StatusCode::GATEWAY_TIMEOUT,
                        &format!("{addr} of Service {ns}/{svc} sent no response in {wait:?}"),
                    )
                }
                Ok(Err(e)) if e.is_connect() => {
                    last_error = format!("connecting to {addr} of Service {ns}/{svc}: {e}");
                    continue;
                }
                Ok(Err(e)) => {
                    return text(
                        StatusCode::BAD_GATEWAY,
                        &format!("{addr} of Service {ns}/{svc}: {e}"),
                    )
                }
                Ok(Ok(mut resp)) => {
                    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
                        if let Some(client_side) = client_upgrade {
                            let upstream_side = hyper::upgrade::on(&mut resp);
                            tokio::spawn(async move {
                                if let (Ok(c), Ok(u)) = (client_side.await, upstream_side.await) {
                                    let _ = tokio::io::copy_bidirectional(
                                        &mut TokioIo::new(c),
                                        &mut TokioIo::new(u),
                                    )
                                    .await;
                                }
                            });
                        }
                    } else {
                        strip_hop_by_hop(resp.headers_mut());
                    }
                    rule.response_headers.apply(resp.headers_mut());
                    return resp.map(|b| b.boxed_unsync());
                }
            }
        }
        text(StatusCode::BAD_GATEWAY, &last_error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_rewrites_as_the_conformance_suite_expects() {
        let m = |p: &str| Match::path(PathMatch::prefix(p));
        // HTTPRouteRewritePath: /prefix/one → /one, /strip-prefix → /.
        assert_eq!(
            replace_prefix("/prefix/one/two", Some(&m("/prefix/one")), "/one"),
            "/one/two"
        );
        assert_eq!(
            replace_prefix("/strip-prefix/three", Some(&m("/strip-prefix")), "/"),
            "/three"
        );
        assert_eq!(
            replace_prefix("/strip-prefix", Some(&m("/strip-prefix")), "/"),
            "/"
        );
        assert_eq!(replace_prefix("/x/y", Some(&m("/")), "/api"), "/api/x/y");
    }

    #[test]
    fn redirect_locations() {
        let r = |scheme: Option<&str>, host: Option<&str>, port: Option<u16>| Redirect {
            scheme: scheme.map(Into::into),
            hostname: host.map(Into::into),
            port,
            path: None,
            status: 302,
        };
        assert_eq!(
            location(
                &r(None, Some("example.org"), None),
                "http",
                "a.com",
                80,
                "/p",
                Some("q=1"),
                None
            ),
            "http://example.org/p?q=1"
        );
        assert_eq!(
            location(
                &r(Some("https"), None, None),
                "http",
                "a.com",
                8080,
                "/p",
                None,
                None
            ),
            "https://a.com/p"
        );
        assert_eq!(
            location(
                &r(None, None, Some(8443)),
                "https",
                "a.com",
                443,
                "/",
                None,
                None
            ),
            "https://a.com:8443/"
        );
        assert_eq!(
            location(&r(None, None, None), "http", "a.com", 8080, "/", None, None),
            "http://a.com:8080/"
        );
    }
}
