//! What every daemon reports about its source and its parts, in Prometheus text format:
//! objects held per kind, watch restarts (re-lists after the first) per kind, source errors,
//! objects each part refuses, and the time each part took per sync. And the daemons' small HTTP status server
//! (`/healthz`, `/readyz`, `/metrics`).

use cluster::store::{Kind, Store, Update};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PartLabel {
    pub part: &'static str,
}

fn sync_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0001, 2.0, 18))
}

pub struct SourceMetrics {
    pub objects: Family<KindLabel, Gauge>,
    pub watch_restarts: Family<KindLabel, Counter>,
    pub errors: Counter,
    pub sync_seconds: Family<PartLabel, Histogram, fn() -> Histogram>,
    /// Objects a part's planner refuses (each also logged, naming the object and field).
    pub refused: Family<PartLabel, Gauge>,
    listed: Mutex<BTreeSet<Kind>>,
}

impl Default for SourceMetrics {
    fn default() -> Self {
        SourceMetrics {
            objects: Family::default(),
            watch_restarts: Family::default(),
            errors: Counter::default(),
            sync_seconds: Family::new_with_constructor(sync_histogram),
            refused: Family::default(),
            listed: Mutex::default(),
        }
    }
}

impl SourceMetrics {
    /// Registers the metrics under `flatnet_source_*` and `flatnet_sync_*`.
    pub fn register(&self, r: &mut Registry) {
        r.register(
            "flatnet_source_objects",
            "Objects held, by kind",
            self.objects.clone(),
        );
        r.register(
            "flatnet_source_watch_restarts",
            "Re-lists after the first (a watch restart, a 410 Gone), by kind",
            self.watch_restarts.clone(),
        );
        r.register(
            "flatnet_source_errors",
            "Source errors: API errors, unreadable files, objects that are not valid",
            self.errors.clone(),
        );
        r.register(
            "flatnet_refused_objects",
            "Objects a part refuses (their last good state stays), by part",
            self.refused.clone(),
        );
        r.register(
            "flatnet_sync_seconds",
            "Time from a batch of changes to its part being applied, by part",
            self.sync_seconds.clone(),
        );
    }

    /// Counts a batch's re-lists and errors (call before handing it to the store).
    pub fn observe(&self, updates: &[Update]) {
        let mut listed = self.listed.lock().expect("listed");
        for u in updates {
            match u {
                Update::Relist(k) if !listed.insert(*k) => {
                    self.watch_restarts
                        .get_or_create(&KindLabel { kind: k.name() })
                        .inc();
                }
                Update::Error(_) => {
                    self.errors.inc();
                }
                _ => {}
            }
        }
    }

    /// Sets the per-kind object counts from the store.
    pub fn count(&self, store: &Store) {
        for k in Kind::ALL {
            self.objects
                .get_or_create(&KindLabel { kind: k.name() })
                .set(store.count(k) as i64);
        }
    }

    pub fn set_refused(&self, part: &'static str, count: usize) {
        self.refused
            .get_or_create(&PartLabel { part })
            .set(count as i64);
    }

    pub fn synced(&self, part: &'static str, took: Duration) {
        self.sync_seconds
            .get_or_create(&PartLabel { part })
            .observe(took.as_secs_f64());
    }
}

/// Serves `/healthz` (200 while the process runs), `/readyz` (200 once `ready`, after the
/// first complete sync) and `/metrics` (`metrics()`) on `addr`, on a thread of its own.
pub fn serve_http(
    addr: SocketAddr,
    ready: Arc<AtomicBool>,
    metrics: impl Fn() -> String + Send + 'static,
) -> std::io::Result<()> {
    let listener = TcpListener::bind(addr)?;
    std::thread::Builder::new()
        .name("status-http".into())
        .spawn(move || {
            for mut conn in listener.incoming().flatten() {
                let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
                let mut buf = [0u8; 2048];
                let n = conn.read(&mut buf).unwrap_or(0);
                let head = String::from_utf8_lossy(&buf[..n]);
                let path = head.split_whitespace().nth(1).unwrap_or("/");
                let (status, body) = match path {
                    "/healthz" | "/livez" => ("200 OK", "ok\n".to_string()),
                    "/readyz" if ready.load(Ordering::Relaxed) => ("200 OK", "ok\n".to_string()),
                    "/readyz" => (
                        "503 Service Unavailable",
                        "waiting for the first complete sync\n".to_string(),
                    ),
                    "/metrics" => ("200 OK", metrics()),
                    _ => (
                        "404 Not Found",
                        "try /healthz, /readyz or /metrics\n".to_string(),
                    ),
                };
                let _ = write!(
                    conn,
                    "HTTP/1.1 {status}\r\ncontent-type: text/plain; version=0.0.4\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        })?;
    Ok(())
}
