//! `flatnet ingress`: the edge fed by the cluster-state store (the file source in the lab, the
//! kube source on a cluster). Each batch of changes that touches routing objects rebuilds the
//! route table and swaps it in; one that touches Services or EndpointSlices rebuilds the
//! endpoints; Secrets and TLS bindings rebuild the certificates. Statuses (the Ingresses'
//! load-balancer address, the Gateway API conditions) and problems go to the log and, with
//! `--status-dir`, to `ingress-status.json` there.

use crate::edge::{Config, Edge};
use crate::endpoints::Endpoints;
use crate::gateway::{self, Inputs};
use crate::ingress::{self as ing, Classes, Ports};
use crate::table::Table;
use crate::tls::{self, Certs};
use arc_swap::ArcSwap;
use clap::Args;
use cluster::gateway::{Gateway, GatewayClass, HttpRoute, ReferenceGrant};
use cluster::manifests::namespaced;
use cluster::selector::Labels;
use cluster::slim::EndpointSlice;
use cluster::store::{Kind, Store, Update};
use k8s_openapi::api::core::v1::{Namespace, Secret, Service};
use k8s_openapi::api::networking::v1::{Ingress, IngressClass};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use serde_json::json;
use state::kube::Watch;
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Args)]
pub struct Options {
    #[command(flatten)]
    pub source: state::SourceArgs,
    /// Plain HTTP listener; Ingresses are routed on it as on port 80.
    #[arg(long, default_value = "0.0.0.0:80")]
    pub http: SocketAddr,
    /// TLS listener; Ingresses are routed on it as on port 443.
    #[arg(long, default_value = "0.0.0.0:443")]
    pub https: SocketAddr,
    /// `/healthz`, `/readyz`, `/metrics` (ingress-nginx's port).
    #[arg(long, default_value = "0.0.0.0:10254")]
    pub status: SocketAddr,
    /// The address clients reach the edge at, published in Ingress `status.loadBalancer` and
    /// Gateway `status.addresses` (the LoadBalancer Service's address).
    #[arg(long, conflicts_with = "publish_service")]
    pub publish_address: Option<String>,
    /// NAMESPACE/NAME of the Service in front of the edge, whose load-balancer address (or
    /// first external IP) is published, as ingress-nginx's `--publish-service`.
    #[arg(long, value_parser = parse_service_ref)]
    pub publish_service: Option<(String, String)>,
    /// Where `ingress-status.json` (statuses and problems) is written after each change, and
    /// `<hostname>`: the mark of the state loaded (so a lab can wait for every replica).
    #[arg(long)]
    pub status_dir: Option<PathBuf>,
    /// Worker threads serving connections; default: the CPUs this process may run on.
    #[arg(long)]
    pub workers: Option<usize>,
    /// Seconds a client has to send a request's headers.
    #[arg(long, default_value_t = 10)]
    pub header_timeout: u64,
}

fn parse_service_ref(s: &str) -> Result<(String, String), String> {
    match s.split_once('/') {
        Some((ns, name)) if !ns.is_empty() && !name.is_empty() => Ok((ns.into(), name.into())),
        _ => Err(format!("{s:?}: expected NAMESPACE/NAME")),
    }
}

/// The address to publish: `--publish-address`, or the `--publish-service` Service's
/// load-balancer address (IP or hostname), else its first external IP.
fn published(store: &Store, opts: &Options) -> Option<String> {
    if let Some(a) = &opts.publish_address {
        return Some(a.clone());
    }
    let (ns, name) = opts.publish_service.as_ref()?;
    let svc = store.get::<Service>(ns, name)?;
    let lb = (svc.status.as_ref())
        .and_then(|st| {
            st.load_balancer
                .as_ref()?
                .ingress
                .as_ref()?
                .first()
                .cloned()
        })
        .and_then(|i| i.ip.or(i.hostname));
    lb.or_else(|| svc.spec.as_ref()?.external_ips.as_ref()?.first().cloned())
}

/// The kinds the edge watches.
pub const KINDS: [Kind; 10] = [
    Kind::Namespace,
    Kind::Service,
    Kind::EndpointSlice,
    Kind::Ingress,
    Kind::IngressClass,
    Kind::Secret,
    Kind::GatewayClass,
    Kind::Gateway,
    Kind::HttpRoute,
    Kind::ReferenceGrant,
];

/// What the edge watches: every object of [`KINDS`].
pub fn watches() -> Vec<Watch> {
    KINDS.into_iter().map(Watch::all).collect()
}

#[derive(Default)]
pub struct Metrics {
    pub reloads: Counter,
    pub reload_seconds: ReloadHistogram,
}

pub struct ReloadHistogram(pub Histogram);

impl Default for ReloadHistogram {
    fn default() -> Self {
        ReloadHistogram(Histogram::new([
            0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5,
        ]))
    }
}

/// Everything one rebuild of the routing state gives.
pub struct Built {
    pub table: Table,
    pub certs: Certs,
    /// Gateway listener ports beyond the HTTP and HTTPS ones, and whether they are TLS.
    pub ports: BTreeMap<u16, bool>,
    pub status: serde_json::Value,
    pub problems: Vec<String>,
}

fn secret_pem(s: &Secret) -> Option<(Vec<u8>, Vec<u8>)> {
    if s.type_.as_deref() != Some("kubernetes.io/tls") {
        return None;
    }
    let d = s.data.as_ref()?;
    Some((d.get("tls.crt")?.0.clone(), d.get("tls.key")?.0.clone()))
}

/// The routing state of `store`.
pub fn build(
    store: &Store,
    default_cert: &Arc<rustls::sign::CertifiedKey>,
    publish: Option<&str>,
) -> Built {
    let mut table = Table::default();
    let ingresses: Vec<&Ingress> = store.list::<Ingress>().collect();
    let classes: Vec<&IngressClass> = store.list::<IngressClass>().collect();
    let ic = ing::compile(
        ingresses.iter().copied(),
        &Classes::new(classes.iter().copied()),
        Ports {
            http: 80,
            https: 443,
        },
        &mut table,
    );
    let gclasses: Vec<&GatewayClass> = store.list::<GatewayClass>().collect();
    let gateways: Vec<&Gateway> = store.list::<Gateway>().collect();
    let routes: Vec<&HttpRoute> = store.list::<HttpRoute>().collect();
    let grants: Vec<&ReferenceGrant> = store.list::<ReferenceGrant>().collect();
    let namespaces: BTreeMap<String, Labels> = store
        .list::<Namespace>()
        .map(|n| {
            (
                n.metadata.name.clone().unwrap_or_default(),
                n.metadata.labels.clone().unwrap_or_default(),
            )
        })
        .collect();
    let services: BTreeSet<(String, String)> = store
        .list::<Service>()
        .map(|s| namespaced(&s.metadata))
        .collect();
    let tls_secrets: BTreeSet<(String, String)> = store
        .list::<Secret>()
        .filter(|s| secret_pem(s).is_some())
        .map(|s| namespaced(&s.metadata))
        .collect();
    let gc = gateway::compile(
        &Inputs {
            classes: &gclasses,
            gateways: &gateways,
            routes: &routes,
            grants: &grants,
            namespaces: &namespaces,
            services: &services,
            tls_secrets: &tls_secrets,
        },
        &mut table,
    );
    table.seal();
    let mut ports = BTreeMap::new();
    for g in &gateways {
        let (ns, name) = namespaced(&g.metadata);
        let ours = gc
            .gateways
            .iter()
            .any(|s| s.namespace == ns && s.name == name);
        for l in &g.spec.listeners {
            if ours && !matches!(l.port, 80 | 443) {
                ports.insert(l.port, l.protocol == "HTTPS");
            }
        }
    }
    let bindings: Vec<ing::TlsBinding> = ic.tls.iter().chain(&gc.tls).cloned().collect();
    let (certs, cert_problems) = Certs::build(
        &bindings,
        |ns, name| store.get::<Secret>(ns, name).and_then(secret_pem),
        default_cert.clone(),
    );
    let mut problems: Vec<String> = ic.problems.iter().map(|e| e.to_string()).collect();
    problems.extend(cert_problems);
    let conditions =
        |c: &[cluster::gateway::Condition]| serde_json::to_value(c).unwrap_or_default();
    let status = json!({
        "address": publish,
        "ingresses": ic.claimed.iter().map(|(ns, n)| json!({"namespace": ns, "name": n,
            "loadBalancer": {"ingress": publish.map(|a| vec![json!({"ip": a})]).unwrap_or_default()}})).collect::<Vec<_>>(),
        "gatewayClasses": gc.classes.iter().map(|(n, c)| json!({"name": n, "conditions": conditions(c)})).collect::<Vec<_>>(),
        "gateways": gc.gateways.iter().map(|g| json!({"namespace": g.namespace, "name": g.name,
            "addresses": publish.map(|a| vec![json!({"type": "IPAddress", "value": a})]).unwrap_or_default(),
            "conditions": conditions(&g.conditions),
            "listeners": g.listeners.iter().map(|l| json!({"name": l.name, "attachedRoutes": l.attached_routes, "conditions": conditions(&l.conditions)})).collect::<Vec<_>>()})).collect::<Vec<_>>(),
        "httpRoutes": gc.routes.iter().map(|r| json!({"namespace": r.namespace, "name": r.name,
            "parents": r.parents.iter().map(|(p, c)| json!({"parentRef": p, "controllerName": crate::ingress::CONTROLLER, "conditions": conditions(c)})).collect::<Vec<_>>()})).collect::<Vec<_>>(),
        "problems": problems,
    });
    Built {
        table,
        certs,
        ports,
        status,
        problems,
    }
}

fn touches_routes(k: Kind) -> bool {
    !matches!(
        k,
        Kind::EndpointSlice | Kind::Node | Kind::Pod | Kind::NetworkPolicy
    )
}

/// Runs the edge until the process is killed (SIGTERM: stops accepting, drains, exits).
pub fn run(opts: Options) -> Result<(), String> {
    let updates = opts.source.start(watches())?;
    let default_cert = tls::self_signed("flatnet-ingress.invalid");
    let (certs, _) = Certs::build(&[], |_, _| None, default_cert.clone());
    let edge = Edge::new(
        Config {
            header_timeout: Duration::from_secs(opts.header_timeout.max(1)),
            ..Config::default()
        },
        Arc::new(ArcSwap::from_pointee(certs)),
    );
    let ready = Arc::new(AtomicBool::new(false));
    let metrics = Arc::new(Metrics::default());
    let mut registry = Registry::with_prefix("flatnet_ingress");
    registry.register(
        "config_reloads",
        "Route tables built and swapped in",
        metrics.reloads.clone(),
    );
    registry.register(
        "config_reload_seconds",
        "Time to build and swap a route table",
        metrics.reload_seconds.0.clone(),
    );
    edge.register(&mut registry);
    let registry = Arc::new(registry);
    state::metrics::serve_http(opts.status, ready.clone(), move || {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
        out
    })
    .map_err(|e| format!("binding {}: {e}", opts.status))?;
    // One worker: tokio's current-thread scheduler, without the work-stealing one's
    // cross-thread queues (as one nginx or haproxy worker).
    let mut rt = match opts.workers {
        Some(1) => tokio::runtime::Builder::new_current_thread(),
        Some(n) => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n.max(1));
            b
        }
        None => tokio::runtime::Builder::new_multi_thread(),
    };
    let rt = rt
        .enable_all()
        .build()
        .map_err(|e| format!("starting the runtime: {e}"))?;
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let (ports_tx, mut ports_rx) = tokio::sync::mpsc::unbounded_channel::<BTreeMap<u16, bool>>();
    {
        let edge = edge.clone();
        let ready = ready.clone();
        let metrics = metrics.clone();
        let opts = opts.clone();
        std::thread::spawn(move || {
            follow(edge, updates, default_cert, opts, ready, metrics, ports_tx)
        });
    }
    rt.block_on(async move {
        let bind = |a: SocketAddr| async move {
            tokio::net::TcpListener::bind(a).await.map_err(|e| format!("binding {a}: {e}"))
        };
        let mut servers = vec![
            tokio::spawn(edge.clone().serve(bind(opts.http).await?, 80, false, stop.clone())),
            tokio::spawn(edge.clone().serve(bind(opts.https).await?, 443, true, stop.clone())),
        ];
        tracing::info!("edge on {} (HTTP) and {} (HTTPS), status on {}", opts.http, opts.https, opts.status);
        let mut bound: BTreeSet<u16> = BTreeSet::new();
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .map_err(|e| format!("SIGTERM: {e}"))?;
        loop {
            tokio::select! {
                Some(ports) = ports_rx.recv() => {
                    // A Gateway listener on a port of its own: bound once, on every address.
                    for (port, tls) in ports {
                        if bound.insert(port) {
                            match bind(SocketAddr::new(opts.http.ip(), port)).await {
                                Ok(l) => servers.push(tokio::spawn(edge.clone().serve(l, port, tls, stop.clone()))),
                                Err(e) => tracing::warn!("Gateway listener port {port}: {e}"),
                            }
                        }
                    }
                }
                _ = term.recv() => break,
            }
        }
        tracing::info!("SIGTERM: draining");
        let _ = stop_tx.send(true);
        // Each server stops accepting and waits for its connections (up to the drain time).
        for s in servers {
            let _ = s.await;
        }
        Ok::<(), String>(())
    })
}

fn follow(
    edge: Arc<Edge>,
    updates: std::sync::mpsc::Receiver<Vec<Update>>,
    default_cert: Arc<rustls::sign::CertifiedKey>,
    opts: Options,
    ready: Arc<AtomicBool>,
    metrics: Arc<Metrics>,
    ports: tokio::sync::mpsc::UnboundedSender<BTreeMap<u16, bool>>,
) {
    let mut store = Store::new();
    let mut first = true;
    let mark_file = (opts.status_dir.as_ref()).map(|d| state::replica_status_path(d, ""));
    while let Ok(mut batch) = updates.recv() {
        while let Ok(more) = updates.try_recv() {
            batch.extend(more);
        }
        let changes = store.apply(batch);
        for e in store.take_errors() {
            tracing::warn!("{e}");
        }
        if !store.synced() {
            continue;
        }
        let started = Instant::now();
        if first
            || changes
                .iter()
                .any(|c| matches!(c.kind, Kind::Service | Kind::EndpointSlice))
        {
            let services: Vec<&Service> = store.list::<Service>().collect();
            let slices: Vec<&EndpointSlice> = store.list::<EndpointSlice>().collect();
            edge.endpoints
                .store(Arc::new(Endpoints::build(services, slices)));
        }
        if first || changes.iter().any(|c| touches_routes(c.kind)) {
            let b = build(&store, &default_cert, published(&store, &opts).as_deref());
            edge.routes.store(Arc::new(b.table));
            edge.certs.store(Arc::new(b.certs));
            let _ = ports.send(b.ports);
            for p in &b.problems {
                tracing::warn!("{p}");
            }
            if let Some(dir) = &opts.status_dir {
                let path = dir.join("ingress-status.json");
                if let Err(e) = state::write_atomic(&path, &b.status.to_string()) {
                    tracing::warn!("{}: {e}", path.display());
                }
            }
            if first {
                // The parsed listing was several times the table's size.
                cluster::release_freed_memory();
            }
            metrics.reloads.inc();
            metrics
                .reload_seconds
                .0
                .observe(started.elapsed().as_secs_f64());
        }
        first = false;
        ready.store(true, Ordering::Relaxed);
        if let (Some(path), Some(mark)) = (&mark_file, store.mark()) {
            if let Err(e) = state::write_atomic(path, mark) {
                tracing::warn!("{}: {e}", path.display());
            }
        }
    }
    tracing::warn!("the source ended; serving the last routes");
}
