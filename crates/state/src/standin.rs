//! A stand-in Kubernetes API server, for tests and benches on machines where no kube-apiserver
//! can run. It speaks the API's wire format for what the `kube` source does and nothing more:
//! paginated lists (`limit`, `continue`) carrying a `resourceVersion`; `?watch=true` streams of
//! JSON events from a resource version (`ADDED`, `MODIFIED`, `DELETED`, `BOOKMARK` when
//! `allowWatchBookmarks`), ending after `timeoutSeconds`; the `410 Gone` `Status` event for a
//! version older than its history; `403` `Status` answers for resources it is told to forbid;
//! and equality field selectors (`spec.nodeName=node-1`). Objects are fed as JSON values, from
//! manifests or by a test; every change takes the next resource version.

use bytes::Bytes;
use cluster::store::Kind;
use futures::StreamExt;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper::{Request, Response, StatusCode};
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How often an idle watch gets a bookmark.
const BOOKMARK_EVERY: Duration = Duration::from_millis(500);

type Body = BoxBody<Bytes, Infallible>;
/// (resource plural, namespace, name)
type ObjKey = (String, String, String);

#[derive(Default)]
struct State {
    rv: u64,
    objects: BTreeMap<ObjKey, Value>,
    /// (resource version, plural, event type, object) since `oldest`.
    history: VecDeque<(u64, String, &'static str, Value)>,
    /// Watches from before this version get `410 Gone`.
    oldest: u64,
    forbidden: BTreeSet<String>,
    /// While false every request gets 503 and open watches end.
    available: bool,
    /// "LIST services", "WATCH services from 12", … in order.
    log: Vec<String>,
}

struct Shared {
    state: Mutex<State>,
    /// Bumped on every change (and availability flip) to wake the watches.
    changed: tokio::sync::watch::Sender<u64>,
}

/// A running stand-in server on 127.0.0.1.
pub struct ApiServer {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

fn kind_of(name: &str) -> Option<Kind> {
    Kind::ALL.into_iter().find(|k| k.name() == name)
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

fn respond(code: StatusCode, v: &Value) -> Response<Body> {
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(v.to_string())).boxed())
        .expect("a valid response")
}

/// `a.b=c` / `a.b==c` selectors joined by commas, on the object's JSON.
fn selected(selector: Option<&str>, o: &Value) -> bool {
    selector.into_iter().flat_map(|s| s.split(',')).all(|term| {
        let Some((path, want)) = term.split_once('=') else {
            return true;
        };
        let want = want.trim_start_matches('=');
        let ptr = format!("/{}", path.replace('.', "/"));
        o.pointer(&ptr).and_then(Value::as_str).unwrap_or("") == want
    })
}

impl State {
    fn change(&mut self, plural: &str, kind: &'static str, o: Value) {
        self.history
            .push_back((self.rv, plural.to_string(), kind, o));
    }
}

impl ApiServer {
    /// Starts a server on a free port of 127.0.0.1.
    pub fn start() -> Result<ApiServer, String> {
        let listener =
            std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| format!("binding: {e}"))?;
        listener.set_nonblocking(true).map_err(|e| e.to_string())?;
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                rv: 1,
                available: true,
                ..State::default()
            }),
            changed: tokio::sync::watch::channel(1).0,
        });
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("standin-api".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("a runtime");
                rt.block_on(serve(listener, s, stopped));
            })
            .map_err(|e| e.to_string())?;
        Ok(ApiServer {
            addr,
            shared,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Writes a kubeconfig naming this server (a token user, as a service account has).
    pub fn write_kubeconfig(&self, path: &Path) -> std::io::Result<()> {
        std::fs::write(
            path,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: standin\n  cluster: {{server: {}}}\nusers:\n- name: flatnet\n  user: {{token: standin}}\ncontexts:\n- name: standin\n  context: {{cluster: standin, user: flatnet}}\ncurrent-context: standin\n",
                self.url()
            ),
        )
    }

    fn with<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        let r = f(&mut self.shared.state.lock().expect("state"));
        self.shared.changed.send_modify(|v| *v += 1);
        r
    }

    /// Adds or replaces an object (its `kind` must be one the store holds); returns its new
    /// resource version.
    pub fn apply(&self, mut o: Value) -> Result<u64, String> {
        let kind = o
            .get("kind")
            .and_then(Value::as_str)
            .and_then(kind_of)
            .ok_or_else(|| format!("not a kind the stand-in serves: {}", o["kind"]))?;
        let plural = kind.api_resource().1;
        let name = o["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let ns = if kind.namespaced() {
            let ns = o["metadata"]["namespace"]
                .as_str()
                .unwrap_or("default")
                .to_string();
            o["metadata"]["namespace"] = ns.clone().into();
            ns
        } else {
            String::new()
        };
        Ok(self.with(|s| {
            s.rv += 1;
            o["metadata"]["resourceVersion"] = s.rv.to_string().into();
            let key = (plural.to_string(), ns, name);
            let ev = if s.objects.contains_key(&key) {
                "MODIFIED"
            } else {
                "ADDED"
            };
            s.objects.insert(key, o.clone());
            s.change(plural, ev, o);
            s.rv
        }))
    }

    /// Applies every object of a manifest text (the kinds the store holds; others are skipped).
    pub fn apply_manifests(&self, text: &str) -> Result<usize, String> {
        let m = cluster::Manifests::parse(text, "manifests").map_err(|e| e.to_string())?;
        let mut n = 0;
        for o in m.into_objects() {
            let v = o.to_value().map_err(|e| e.to_string())?;
            self.apply(v)?;
            n += 1;
        }
        Ok(n)
    }

    /// Deletes an object; `false` if there was none.
    pub fn delete(&self, kind: Kind, namespace: &str, name: &str) -> bool {
        let key = (
            kind.api_resource().1.to_string(),
            namespace.to_string(),
            name.to_string(),
        );
        self.with(|s| {
            let Some(mut o) = s.objects.remove(&key) else {
                return false;
            };
            s.rv += 1;
            o["metadata"]["resourceVersion"] = s.rv.to_string().into();
            s.change(&key.0, "DELETED", o);
            true
        })
    }

    /// Forgets the history: a watch resuming from before now gets `410 Gone` (an etcd compaction).
    pub fn compact(&self) {
        self.with(|s| {
            s.history.clear();
            s.oldest = s.rv;
        })
    }

    /// A resource answering `403 Forbidden` (an RBAC denial), or no longer.
    pub fn forbid(&self, plural: &str, forbidden: bool) {
        self.with(|s| {
            if forbidden {
                s.forbidden.insert(plural.to_string());
            } else {
                s.forbidden.remove(plural);
            }
        })
    }

    /// While unavailable, every request gets `503` and open watches end (the API server gone).
    pub fn set_available(&self, up: bool) {
        self.with(|s| s.available = up)
    }

    /// The requests served so far ("LIST services", "WATCH services from 12").
    pub fn log(&self) -> Vec<String> {
        self.shared.state.lock().expect("state").log.clone()
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn serve(
    listener: std::net::TcpListener,
    shared: Arc<Shared>,
    mut stopped: tokio::sync::oneshot::Receiver<()>,
) {
    let listener = tokio::net::TcpListener::from_std(listener).expect("a tokio listener");
    loop {
        let conn = tokio::select! {
            c = listener.accept() => c,
            _ = &mut stopped => return,
        };
        let Ok((stream, _)) = conn else { continue };
        let s = shared.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let s = s.clone();
                async move { Ok::<_, Infallible>(handle(&s, req)) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                .await;
        });
    }
}

/// The kind a path names: `/api/v1/<plural>` or `/apis/<group>/v1/<plural>`.
fn route(path: &str) -> Option<Kind> {
    Kind::ALL.into_iter().find(|k| {
        let (group, plural) = k.api_resource();
        let want = match group {
            "" => format!("/api/v1/{plural}"),
            g => format!("/apis/{g}/v1/{plural}"),
        };
        path == want
    })
}

fn handle(shared: &Arc<Shared>, req: Request<hyper::body::Incoming>) -> Response<Body> {
    let query: BTreeMap<String, String> = req
        .uri()
        .query()
        .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
        .unwrap_or_default();
    let Some(kind) = route(req.uri().path()) else {
        return respond(
            StatusCode::NOT_FOUND,
            &status(
                404,
                "NotFound",
                "the server could not find the requested resource",
            ),
        );
    };
    let plural = kind.api_resource().1;
    let mut s = shared.state.lock().expect("state");
    if !s.available {
        return respond(
            StatusCode::SERVICE_UNAVAILABLE,
            &status(
                503,
                "ServiceUnavailable",
                "the server is currently unable to handle the request",
            ),
        );
    }
    if s.forbidden.contains(plural) {
        let verb = if query.get("watch").is_some_and(|w| w == "true" || w == "1") {
            "watch"
        } else {
            "list"
        };
        let msg = format!("{plural} is forbidden: User \"system:serviceaccount:kube-system:flatnet\" cannot {verb} resource \"{plural}\" in API group \"{}\" at the cluster scope", kind.api_resource().0);
        return respond(StatusCode::FORBIDDEN, &status(403, "Forbidden", &msg));
    }
    let selector = query.get("fieldSelector").cloned();
    let rv: u64 = query
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    if query.get("watch").is_some_and(|w| w == "true" || w == "1") {
        s.log.push(format!("WATCH {plural} from {rv}"));
        let bookmarks = query
            .get("allowWatchBookmarks")
            .is_some_and(|b| b == "true");
        let timeout = query
            .get("timeoutSeconds")
            .and_then(|t| t.parse().ok())
            .map_or(Duration::from_secs(290), Duration::from_secs);
        let first = if rv != 0 && rv < s.oldest {
            // What etcd's compaction gives a watch that resumes too late.
            let gone = status(
                410,
                "Expired",
                &format!("too old resource version: {rv} ({})", s.oldest),
            );
            return Response::builder()
                .header("content-type", "application/json")
                .body(
                    Full::new(Bytes::from(
                        json!({"type": "ERROR", "object": gone}).to_string() + "\n",
                    ))
                    .boxed(),
                )
                .expect("a valid response");
        } else if rv == 0 {
            // "Any version": the current objects as ADDED, then what follows.
            let mut text = String::new();
            for ((p, _, _), o) in &s.objects {
                if p == plural && selected(selector.as_deref(), o) {
                    text += &json!({"type": "ADDED", "object": o}).to_string();
                    text.push('\n');
                }
            }
            (text, s.rv)
        } else {
            (String::new(), rv)
        };
        drop(s);
        return watch_response(shared.clone(), kind, selector, bookmarks, timeout, first);
    }
    // A list: pages of `limit`, the continue token holding the snapshot's version and offset.
    let limit: usize = query
        .get("limit")
        .and_then(|l| l.parse().ok())
        .filter(|l| *l > 0)
        .unwrap_or(usize::MAX);
    let (list_rv, offset) = query
        .get("continue")
        .and_then(|c| c.split_once(':'))
        .and_then(|(a, b)| Some((a.parse().ok()?, b.parse().ok()?)))
        .unwrap_or((s.rv, 0usize));
    s.log.push(format!("LIST {plural}"));
    let matching: Vec<&Value> = s
        .objects
        .iter()
        .filter(|((p, _, _), o)| p == plural && selected(selector.as_deref(), o))
        .map(|(_, o)| o)
        .collect();
    let end = offset.saturating_add(limit).min(matching.len());
    let items: Vec<&Value> = matching[offset.min(end)..end].to_vec();
    let mut meta = json!({"resourceVersion": list_rv.to_string()});
    if end < matching.len() {
        meta["continue"] = format!("{list_rv}:{end}").into();
    }
    respond(
        StatusCode::OK,
        &json!({"apiVersion": kind.api_version(), "kind": format!("{}List", kind.name()),
                "metadata": meta, "items": items}),
    )
}

/// A watch: `first` (already rendered events), then every change after `from`, as JSON lines.
fn watch_response(
    shared: Arc<Shared>,
    kind: Kind,
    selector: Option<String>,
    bookmarks: bool,
    timeout: Duration,
    (first, from): (String, u64),
) -> Response<Body> {
    let plural = kind.api_resource().1;
    let deadline = tokio::time::Instant::now() + timeout;
    let changed = shared.changed.subscribe();
    let start = futures::stream::once(async move { first });
    let follow = futures::stream::unfold(
        (shared, changed, from, false),
        move |(shared, mut changed, mut seen, done)| {
            let selector = selector.clone();
            async move {
                if done {
                    return None;
                }
                let woke = tokio::time::timeout_at(
                    deadline.min(tokio::time::Instant::now() + BOOKMARK_EVERY),
                    changed.changed(),
                )
                .await;
                if tokio::time::Instant::now() >= deadline {
                    return None;
                }
                let s = shared.state.lock().expect("state");
                if !s.available || matches!(woke, Ok(Err(_))) {
                    return None;
                }
                let mut text = String::new();
                for (rv, p, ty, o) in &s.history {
                    if *rv > seen && p == plural && selected(selector.as_deref(), o) {
                        text += &json!({"type": ty, "object": o}).to_string();
                        text.push('\n');
                    }
                }
                if text.is_empty() && bookmarks && woke.is_err() {
                    let mark = json!({"kind": kind.name(), "apiVersion": kind.api_version(),
                                      "metadata": {"resourceVersion": s.rv.to_string()}});
                    text = json!({"type": "BOOKMARK", "object": mark}).to_string() + "\n";
                }
                seen = s.rv;
                drop(s);
                Some((text, (shared, changed, seen, false)))
            }
        },
    );
    let body = start
        .chain(follow)
        .filter(|t| futures::future::ready(!t.is_empty()))
        .map(|t| Ok::<_, Infallible>(Frame::data(Bytes::from(t))));
    Response::builder()
        .header("content-type", "application/json")
        .body(BodyExt::boxed(StreamBody::new(body)))
        .expect("a valid response")
}
