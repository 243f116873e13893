//! The `kube` source: one kube-rs watcher per kind, as client-go's informers do it — an initial
//! list (paginated), then a watch from its `resourceVersion` with bookmarks, a re-list when the
//! server answers `410 Gone`, reconnects with exponential backoff. Each watcher's events become
//! store [`Update`]s: a (re-)list is `Relist` … `Listed`, so the store swaps it in whole and an
//! API outage never empties it.
//!
//! Objects are watched untyped (`DynamicObject`) and converted one by one, so one malformed
//! object is an error naming it, not a failed page that stops its kind's watch.

use cluster::store::{Key, Kind, Object, Update};
use futures::StreamExt;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::{Client, Config};
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::mpsc::Sender;

/// One kind to watch, optionally narrowed by a field selector (`spec.nodeName=NODE` for the
/// pods of one node, as the kubelet watches them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Watch {
    pub kind: Kind,
    pub fields: Option<String>,
}

impl Watch {
    pub fn all(kind: Kind) -> Watch {
        Watch { kind, fields: None }
    }
}

/// Where the API server is and how to authenticate.
#[derive(Debug, Clone, Default)]
pub struct Connection {
    /// A kubeconfig file; without it `$KUBECONFIG`, `~/.kube/config`, then the in-cluster
    /// service account.
    pub kubeconfig: Option<PathBuf>,
    /// Overrides the server URL (a node's agent reaches the API server directly: the
    /// `kubernetes` Service's ClusterIP needs the rules the agent is about to write).
    pub api_server: Option<String>,
}

/// The client for `c`.
pub async fn client(c: &Connection) -> Result<Client, String> {
    let mut config = match &c.kubeconfig {
        Some(path) => {
            let kc = Kubeconfig::read_from(path)
                .map_err(|e| format!("--kubeconfig {}: {e}", path.display()))?;
            Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                .await
                .map_err(|e| format!("--kubeconfig {}: {e}", path.display()))?
        }
        None => Config::infer().await.map_err(|e| {
            format!("no Kubernetes API configuration (--kubeconfig, $KUBECONFIG, ~/.kube/config or in-cluster): {e}")
        })?,
    };
    if let Some(url) = &c.api_server {
        config.cluster_url = url
            .parse()
            .map_err(|e| format!("--api-server {url:?}: not a URL: {e}"))?;
    }
    Client::try_from(config).map_err(|e| format!("Kubernetes client: {e}"))
}

/// The API resource of a kind.
pub fn resource(kind: Kind) -> ApiResource {
    let (group, plural) = kind.api_resource();
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk(group, kind.version(), kind.name()),
        plural,
    )
}

fn key(kind: Kind, o: &DynamicObject) -> Key {
    let ns = if kind.namespaced() {
        o.metadata.namespace.clone().unwrap_or_default()
    } else {
        String::new()
    };
    (ns, o.metadata.name.clone().unwrap_or_default())
}

fn typed(kind: Kind, o: DynamicObject) -> Update {
    match serde_json::to_value(o)
        .map_err(|e| e.to_string())
        .and_then(|v| Object::from_value(kind, v).map_err(|e| e.to_string()))
    {
        Ok(o) => Update::apply(o),
        Err(e) => Update::Error(format!("ignored (not a valid object): {e}")),
    }
}

/// Runs the watchers until `tx` is dropped; sends `Synced` once every kind was listed.
pub async fn run(client: Client, watches: Vec<Watch>, tx: Sender<Vec<Update>>) {
    let mut unlisted: BTreeSet<Kind> = watches.iter().map(|w| w.kind).collect();
    let streams = watches.into_iter().map(|w| {
        let api: Api<DynamicObject> = Api::all_with(client.clone(), &resource(w.kind));
        let mut cfg = watcher::Config::default();
        if let Some(f) = &w.fields {
            cfg = cfg.fields(f);
        }
        let kind = w.kind;
        watcher::watcher(api, cfg)
            .default_backoff()
            .map(move |ev| (kind, ev))
            .boxed()
    });
    let mut all = futures::stream::select_all(streams);
    while let Some(first) = all.next().await {
        let mut out = Vec::new();
        let mut next = Some(first);
        // Whatever else is ready goes in the same batch.
        while let Some((kind, ev)) = next {
            match ev {
                Ok(Event::Init) => out.push(Update::Relist(kind)),
                Ok(Event::InitApply(o)) | Ok(Event::Apply(o)) => out.push(typed(kind, o)),
                Ok(Event::InitDone) => {
                    out.push(Update::Listed(kind));
                    if unlisted.remove(&kind) && unlisted.is_empty() {
                        out.push(Update::Synced);
                    }
                }
                Ok(Event::Delete(o)) => out.push(Update::Delete(kind, key(kind, &o))),
                // A kind the API server does not serve (the Gateway API's CRDs not installed):
                // listed and empty, so the rest is served; the watcher keeps retrying, and
                // installing the CRDs later is picked up.
                Err(watcher::Error::InitialListFailed(kube::Error::Api(st)))
                    if st.is_not_found() && unlisted.contains(&kind) =>
                {
                    out.push(Update::Relist(kind));
                    out.push(Update::Listed(kind));
                    unlisted.remove(&kind);
                    if unlisted.is_empty() {
                        out.push(Update::Synced);
                    }
                    out.push(Update::Error(format!(
                        "{}: not served by the API server (is its CRD installed?); empty until it is",
                        kind.api_resource().1
                    )));
                }
                Err(e) => out.push(Update::Error(format!(
                    "watching {} (the last state stays): {e}",
                    kind.api_resource().1
                ))),
            }
            next = futures::FutureExt::now_or_never(all.next()).flatten();
        }
        if tx.send(out).is_err() {
            return;
        }
    }
}

/// Starts the watchers on a thread of their own; fails if no client can be configured.
pub fn watch(c: &Connection, watches: Vec<Watch>, tx: Sender<Vec<Update>>) -> Result<(), String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let client = rt.block_on(client(c))?;
    std::thread::Builder::new()
        .name("kube-source".into())
        .spawn(move || rt.block_on(run(client, watches, tx)))
        .map_err(|e| e.to_string())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    //! kube-rs's own test pattern: the client talks to a `tower_test` mock that the test answers
    //! the way the API server would.
    use super::*;
    use cluster::Store;
    use http::{Request, Response};
    use kube::client::Body;
    use serde_json::{json, Value};
    use std::collections::VecDeque;
    use std::sync::mpsc::Receiver;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    fn svc(name: &str, rv: u64, port: u16) -> Value {
        json!({"apiVersion": "v1", "kind": "Service",
               "metadata": {"name": name, "namespace": "default", "resourceVersion": rv.to_string()},
               "spec": {"ports": [{"port": port}]}})
    }

    fn list(rv: u64, items: Vec<Value>, cont: Option<&str>) -> (u16, String) {
        let mut meta = json!({"resourceVersion": rv.to_string()});
        if let Some(c) = cont {
            meta["continue"] = c.into();
        }
        let body =
            json!({"apiVersion": "v1", "kind": "ServiceList", "metadata": meta, "items": items});
        (200, body.to_string())
    }

    fn events(evs: &[(&str, Value)]) -> (u16, String) {
        let lines: Vec<String> = evs
            .iter()
            .map(|(t, o)| json!({"type": t, "object": o}).to_string())
            .collect();
        (200, lines.join("\n") + "\n")
    }

    fn gone() -> (u16, String) {
        let st = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                        "message": "too old resource version", "reason": "Expired", "code": 410});
        events(&[("ERROR", st)])
    }

    fn unavailable() -> (u16, String) {
        let st = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                        "message": "the server is shutting down", "reason": "ServiceUnavailable", "code": 503});
        (503, st.to_string())
    }

    /// Answers lists and watches from two queues, in order; records each request's URI. With a
    /// queue empty, requests of its sort are left unanswered (a watch that stays open).
    fn api_server(
        mut lists: VecDeque<(u16, String)>,
        mut watches: VecDeque<(u16, String)>,
    ) -> (Client, Arc<Mutex<Vec<String>>>) {
        let (mock, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        tokio::spawn(async move {
            let mut parked = Vec::new();
            while let Some((req, send)) = handle.next_request().await {
                let uri = req.uri().to_string();
                log.lock().unwrap().push(uri.clone());
                let next = if uri.contains("watch=true") {
                    watches.pop_front()
                } else {
                    lists.pop_front()
                };
                match next {
                    Some((code, body)) => send.send_response(
                        Response::builder()
                            .status(code)
                            .body(Body::from(body.into_bytes()))
                            .unwrap(),
                    ),
                    None => parked.push(send),
                }
            }
        });
        (Client::new(mock, "default"), seen)
    }

    /// Applies batches until `done` holds of the store (5 s at most); returns the updates seen.
    async fn until(
        rx: &Receiver<Vec<Update>>,
        store: &mut Store,
        done: impl Fn(&Store) -> bool,
    ) -> Vec<Update> {
        let mut seen = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !done(store) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out; saw {seen:?}"
            );
            match rx.try_recv() {
                Ok(batch) => {
                    seen.extend(batch.iter().cloned());
                    store.apply(batch);
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
        seen
    }

    fn port(store: &Store, name: &str) -> Option<i32> {
        let s: &k8s_openapi::api::core::v1::Service = store.get("default", name)?;
        Some(s.spec.as_ref()?.ports.as_ref()?[0].port)
    }

    #[tokio::test]
    async fn a_kind_the_server_does_not_serve_counts_as_listed_and_empty() {
        let not_found = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": "the server could not find the requested resource", "reason": "NotFound", "code": 404});
        // The first list is the Gateways' (404), the second the Services'.
        let (mock, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        tokio::spawn(async move {
            let mut parked = Vec::new();
            while let Some((req, send)) = handle.next_request().await {
                let uri = req.uri().to_string();
                let (code, body) = if uri.contains("watch=true") {
                    parked.push(send);
                    continue;
                } else if uri.contains("/gateways") {
                    (404, not_found.to_string())
                } else {
                    list(3, vec![svc("a", 2, 80)], None)
                };
                let resp = Response::builder()
                    .status(code)
                    .body(Body::from(body.into_bytes()));
                send.send_response(resp.unwrap());
            }
        });
        let (tx, rx) = std::sync::mpsc::channel();
        let watches = vec![Watch::all(Kind::Gateway), Watch::all(Kind::Service)];
        tokio::spawn(run(Client::new(mock, "default"), watches, tx));
        let mut store = Store::new();
        let seen = until(&rx, &mut store, |s| s.synced()).await;
        assert_eq!(store.count(Kind::Service), 1);
        assert_eq!(store.count(Kind::Gateway), 0);
        assert!(
            seen.iter()
                .any(|u| matches!(u, Update::Error(e) if e.contains("gateways: not served"))),
            "{seen:?}"
        );
    }

    #[tokio::test]
    async fn lists_in_pages_watches_relists_on_410_and_keeps_state_while_the_api_is_away() {
        let lists = VecDeque::from([
            list(10, vec![svc("a", 5, 80)], Some("page-2")),
            list(10, vec![svc("b", 6, 80)], None),
            // After the 410: b is gone, c and the new a are listed.
            list(20, vec![svc("a", 12, 81), svc("c", 11, 80)], None),
        ]);
        let bookmark =
            json!({"kind": "Service", "apiVersion": "v1", "metadata": {"resourceVersion": "15"}});
        let watches = VecDeque::from([
            events(&[
                ("ADDED", svc("c", 11, 80)),
                ("MODIFIED", svc("a", 12, 81)),
                ("BOOKMARK", bookmark),
            ]),
            gone(),
            unavailable(),
            unavailable(),
            events(&[("ADDED", svc("d", 21, 80)), ("DELETED", svc("c", 22, 80))]),
        ]);
        let (client, requests) = api_server(lists, watches);
        let (tx, rx) = std::sync::mpsc::channel();
        tokio::spawn(run(client, vec![Watch::all(Kind::Service)], tx));
        let mut store = Store::new();

        until(&rx, &mut store, |s| s.synced()).await;
        assert_eq!(store.count(Kind::Service), 2, "both pages listed");
        until(&rx, &mut store, |s| port(s, "a") == Some(81)).await;
        assert!(port(&store, "c").is_some());
        // The 410 makes the watcher list again; what the new listing lacks is deleted.
        let seen = until(&rx, &mut store, |s| port(s, "b").is_none()).await;
        assert!(seen.contains(&Update::Relist(Kind::Service)), "{seen:?}");
        assert_eq!(store.count(Kind::Service), 2);
        // The API away (503s): errors are reported, the state stays, then it follows again.
        let seen = until(&rx, &mut store, |s| port(s, "d").is_some()).await;
        assert!(
            seen.iter()
                .any(|u| matches!(u, Update::Error(e) if e.contains("services"))),
            "{seen:?}"
        );
        assert!(port(&store, "c").is_none());
        assert_eq!(port(&store, "a"), Some(81));

        let uris = requests.lock().unwrap().clone();
        let watch_from = |rv: &str| {
            uris.iter()
                .any(|u| u.contains("watch=true") && u.contains(&format!("resourceVersion={rv}")))
        };
        assert!(
            uris[0].contains("limit=") && uris[1].contains("continue=page-2"),
            "{uris:?}"
        );
        assert!(
            watch_from("10"),
            "the watch starts at the list's version: {uris:?}"
        );
        assert!(watch_from("15"), "it resumes from the bookmark: {uris:?}");
        assert!(uris
            .iter()
            .all(|u| !u.contains("watch=true") || u.contains("allowWatchBookmarks=true")));
        assert!(
            watch_from("20"),
            "after the re-list, from its version: {uris:?}"
        );
    }

    #[tokio::test]
    async fn a_malformed_object_is_reported_and_the_watch_goes_on() {
        let bad = json!({"apiVersion": "v1", "kind": "Service",
                         "metadata": {"name": "bad", "namespace": "default", "resourceVersion": "3"},
                         "spec": {"ports": "eighty"}});
        let lists = VecDeque::from([list(3, vec![bad, svc("good", 2, 80)], None)]);
        let watches = VecDeque::from([events(&[("ADDED", svc("later", 4, 80))])]);
        let (client, _) = api_server(lists, watches);
        let (tx, rx) = std::sync::mpsc::channel();
        tokio::spawn(run(client, vec![Watch::all(Kind::Service)], tx));
        let mut store = Store::new();
        let seen = until(&rx, &mut store, |s| port(s, "later").is_some()).await;
        assert!(port(&store, "good").is_some());
        assert!(
            seen.iter()
                .any(|u| matches!(u, Update::Error(e) if e.contains("Service default/bad"))),
            "{seen:?}"
        );
    }
}
