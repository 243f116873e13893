//! The cluster-state interface (DESIGN.md, "Cluster state"): a [`Store`] of typed Kubernetes
//! objects kept current by a source, which hands every batch of source [`Update`]s back as the
//! [`Change`]s it made, so each part re-plans only what a change touches. The sources (the
//! `kube` watchers and the `file` watcher, crate `state`) only produce `Update`s; nothing that
//! reads the store knows which source fed it.
//!
//! The semantics are client-go's informer store: objects keyed by kind, namespace and name;
//! `Apply` adds or replaces, `Delete` removes; a re-list (`Relist(kind)` … `Listed(kind)`, what a
//! watch restart or a `410 Gone` brings) is buffered and swapped in at its end, objects it no
//! longer names becoming deletions. Until then the old objects stay, so an unreachable source
//! never empties the store: every part keeps serving the last state it had.
//!
//! Cost: applying an update is a hash lookup and one comparison of the object with the one held
//! (an unchanged object, as a resync brings, changes nothing); a re-list costs the listing.

use crate::gateway::{Gateway, GatewayClass, HttpRoute, ReferenceGrant};
use crate::slim::EndpointSlice;
use crate::source::ClusterState;
use crate::ModelError;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Secret, Service};
use k8s_openapi::api::networking::v1::{Ingress, IngressClass, NetworkPolicy};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use std::collections::{BTreeSet, HashMap};
use std::marker::PhantomData;
use std::sync::Arc;

/// The kinds the store holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Node,
    Namespace,
    Pod,
    Service,
    EndpointSlice,
    NetworkPolicy,
    Ingress,
    IngressClass,
    Secret,
    GatewayClass,
    Gateway,
    HttpRoute,
    ReferenceGrant,
}

impl Kind {
    pub const ALL: [Kind; 13] = [
        Kind::Node,
        Kind::Namespace,
        Kind::Pod,
        Kind::Service,
        Kind::EndpointSlice,
        Kind::NetworkPolicy,
        Kind::Ingress,
        Kind::IngressClass,
        Kind::Secret,
        Kind::GatewayClass,
        Kind::Gateway,
        Kind::HttpRoute,
        Kind::ReferenceGrant,
    ];

    /// The edge's own kinds (what `Manifests::edge` holds): Ingress, IngressClass, Secret and
    /// the Gateway API's.
    pub const EDGE: [Kind; 7] = [
        Kind::Ingress,
        Kind::IngressClass,
        Kind::Secret,
        Kind::GatewayClass,
        Kind::Gateway,
        Kind::HttpRoute,
        Kind::ReferenceGrant,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Node => "Node",
            Kind::Namespace => "Namespace",
            Kind::Pod => "Pod",
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::NetworkPolicy => "NetworkPolicy",
            Kind::Ingress => "Ingress",
            Kind::IngressClass => "IngressClass",
            Kind::Secret => "Secret",
            Kind::GatewayClass => "GatewayClass",
            Kind::Gateway => "Gateway",
            Kind::HttpRoute => "HTTPRoute",
            Kind::ReferenceGrant => "ReferenceGrant",
        }
    }

    /// The API group and plural resource name (what RBAC rules and API paths name).
    pub fn api_resource(self) -> (&'static str, &'static str) {
        match self {
            Kind::Node => ("", "nodes"),
            Kind::Namespace => ("", "namespaces"),
            Kind::Pod => ("", "pods"),
            Kind::Service => ("", "services"),
            Kind::EndpointSlice => ("discovery.k8s.io", "endpointslices"),
            Kind::NetworkPolicy => ("networking.k8s.io", "networkpolicies"),
            Kind::Ingress => ("networking.k8s.io", "ingresses"),
            Kind::IngressClass => ("networking.k8s.io", "ingressclasses"),
            Kind::Secret => ("", "secrets"),
            Kind::GatewayClass => (crate::gateway::GROUP, "gatewayclasses"),
            Kind::Gateway => (crate::gateway::GROUP, "gateways"),
            Kind::HttpRoute => (crate::gateway::GROUP, "httproutes"),
            Kind::ReferenceGrant => (crate::gateway::GROUP, "referencegrants"),
        }
    }

    /// The API version read and watched: `v1`, but for ReferenceGrant, which the Gateway
    /// API's standard channel serves as `v1beta1`.
    pub fn version(self) -> &'static str {
        match self {
            Kind::ReferenceGrant => "v1beta1",
            _ => "v1",
        }
    }

    /// `apiVersion` as manifests write it: `v1`, or `group/version`.
    pub fn api_version(self) -> String {
        match self.api_resource().0 {
            "" => self.version().to_string(),
            group => format!("{group}/{}", self.version()),
        }
    }

    pub fn namespaced(self) -> bool {
        !matches!(
            self,
            Kind::Node | Kind::Namespace | Kind::IngressClass | Kind::GatewayClass
        )
    }
}

/// Namespace (empty for cluster-scoped kinds) and name.
pub type Key = (String, String);

/// One object of a kind the store holds. Objects live behind `Arc`s (in the store, in
/// updates and changes, in the parts that keep them: see [`Shared`]). Each variant is boxed: an
/// unboxed enum is as large as its largest variant (a Pod, 2.4 KiB), which every EndpointSlice
/// would then pay.
#[derive(Debug, Clone, PartialEq)]
pub enum Object {
    Node(Box<Node>),
    Namespace(Box<Namespace>),
    Pod(Box<Pod>),
    Service(Box<Service>),
    EndpointSlice(Box<EndpointSlice>),
    NetworkPolicy(Box<NetworkPolicy>),
    Ingress(Box<Ingress>),
    IngressClass(Box<IngressClass>),
    Secret(Box<Secret>),
    GatewayClass(Box<GatewayClass>),
    Gateway(Box<Gateway>),
    HttpRoute(Box<HttpRoute>),
    ReferenceGrant(Box<ReferenceGrant>),
}

impl Update {
    /// `Apply` of `o`.
    pub fn apply(o: Object) -> Update {
        Update::Apply(Arc::new(o))
    }
}

impl Object {
    pub fn kind(&self) -> Kind {
        match self {
            Object::Node(_) => Kind::Node,
            Object::Namespace(_) => Kind::Namespace,
            Object::Pod(_) => Kind::Pod,
            Object::Service(_) => Kind::Service,
            Object::EndpointSlice(_) => Kind::EndpointSlice,
            Object::NetworkPolicy(_) => Kind::NetworkPolicy,
            Object::Ingress(_) => Kind::Ingress,
            Object::IngressClass(_) => Kind::IngressClass,
            Object::Secret(_) => Kind::Secret,
            Object::GatewayClass(_) => Kind::GatewayClass,
            Object::Gateway(_) => Kind::Gateway,
            Object::HttpRoute(_) => Kind::HttpRoute,
            Object::ReferenceGrant(_) => Kind::ReferenceGrant,
        }
    }

    pub fn meta(&self) -> &ObjectMeta {
        match self {
            Object::Node(o) => &o.metadata,
            Object::Namespace(o) => &o.metadata,
            Object::Pod(o) => &o.metadata,
            Object::Service(o) => &o.metadata,
            Object::EndpointSlice(o) => &o.metadata,
            Object::NetworkPolicy(o) => &o.metadata,
            Object::Ingress(o) => &o.metadata,
            Object::IngressClass(o) => &o.metadata,
            Object::Secret(o) => &o.metadata,
            Object::GatewayClass(o) => &o.metadata,
            Object::Gateway(o) => &o.metadata,
            Object::HttpRoute(o) => &o.metadata,
            Object::ReferenceGrant(o) => &o.metadata,
        }
    }

    /// The store's key: namespaced kinds default to `default`, as the API server does.
    pub fn key(&self) -> Key {
        let m = self.meta();
        let ns = if self.kind().namespaced() {
            m.namespace.clone().unwrap_or_else(|| "default".into())
        } else {
            String::new()
        };
        (ns, m.name.clone().unwrap_or_default())
    }

    /// An object of `kind` from its JSON form (the API's wire format); errors name the object.
    pub fn from_value(kind: Kind, mut v: serde_json::Value) -> Result<Object, ModelError> {
        if let Some(fields) = v.as_object_mut() {
            fields.insert("apiVersion".into(), kind.api_version().into());
            fields.insert("kind".into(), kind.name().into());
        }
        let name = |v: &serde_json::Value, f: &str| {
            v.pointer(&format!("/metadata/{f}"))
                .and_then(|n| n.as_str())
                .unwrap_or_default()
                .to_string()
        };
        let key = (name(&v, "namespace"), name(&v, "name"));
        // No part reads these, and on a real cluster they are most of an object's size.
        if let Some(meta) = v.get_mut("metadata").and_then(|m| m.as_object_mut()) {
            meta.remove("managedFields");
            if let Some(notes) = meta.get_mut("annotations").and_then(|a| a.as_object_mut()) {
                notes.remove("kubectl.kubernetes.io/last-applied-configuration");
            }
        }
        let bad =
            |e: serde_json::Error| ModelError::new(describe_key(kind, &key), "", e.to_string());
        Ok(match kind {
            Kind::Node => Node::into_object(serde_json::from_value(v).map_err(bad)?),
            Kind::Namespace => Namespace::into_object(serde_json::from_value(v).map_err(bad)?),
            Kind::Pod => Pod::into_object(serde_json::from_value(v).map_err(bad)?),
            Kind::Service => Service::into_object(serde_json::from_value(v).map_err(bad)?),
            Kind::EndpointSlice => {
                EndpointSlice::into_object(serde_json::from_value(v).map_err(bad)?)
            }
            Kind::NetworkPolicy => {
                NetworkPolicy::into_object(serde_json::from_value(v).map_err(bad)?)
            }
            Kind::Ingress => Ingress::into_object(serde_json::from_value(v).map_err(bad)?),
            Kind::IngressClass => {
                IngressClass::into_object(serde_json::from_value(v).map_err(bad)?)
            }
            Kind::Secret => Secret::into_object(serde_json::from_value(v).map_err(bad)?),
            Kind::GatewayClass => {
                GatewayClass::into_object(serde_json::from_value(v).map_err(bad)?)
            }
            Kind::Gateway => Gateway::into_object(serde_json::from_value(v).map_err(bad)?),
            Kind::HttpRoute => HttpRoute::into_object(serde_json::from_value(v).map_err(bad)?),
            Kind::ReferenceGrant => {
                ReferenceGrant::into_object(serde_json::from_value(v).map_err(bad)?)
            }
        })
    }

    /// The object's JSON form, with its `kind` and `apiVersion`.
    pub fn to_value(&self) -> serde_json::Result<serde_json::Value> {
        let mut v = match self {
            Object::Node(x) => serde_json::to_value(x),
            Object::Namespace(x) => serde_json::to_value(x),
            Object::Pod(x) => serde_json::to_value(x),
            Object::Service(x) => serde_json::to_value(x),
            Object::EndpointSlice(x) => serde_json::to_value(x),
            Object::NetworkPolicy(x) => serde_json::to_value(x),
            Object::Ingress(x) => serde_json::to_value(x),
            Object::IngressClass(x) => serde_json::to_value(x),
            Object::Secret(x) => serde_json::to_value(x),
            Object::GatewayClass(x) => serde_json::to_value(x),
            Object::Gateway(x) => serde_json::to_value(x),
            Object::HttpRoute(x) => serde_json::to_value(x),
            Object::ReferenceGrant(x) => serde_json::to_value(x),
        }?;
        v["kind"] = self.kind().name().into();
        v["apiVersion"] = self.kind().api_version().into();
        Ok(v)
    }

    /// "Kind namespace/name", for messages.
    pub fn describe(&self) -> String {
        describe_key(self.kind(), &self.key())
    }
}

/// "Kind namespace/name" (or "Kind name" for cluster-scoped kinds).
pub fn describe_key(kind: Kind, key: &Key) -> String {
    if key.0.is_empty() {
        format!("{} {}", kind.name(), key.1)
    } else {
        format!("{} {}/{}", kind.name(), key.0, key.1)
    }
}

/// A Kubernetes type the store holds, for typed access.
pub trait Resource: Sized + 'static {
    const KIND: Kind;
    fn from_object(o: &Object) -> Option<&Self>;
    fn into_object(self) -> Object;
}

macro_rules! resource {
    ($t:ident) => {
        impl Resource for $t {
            const KIND: Kind = Kind::$t;
            fn from_object(o: &Object) -> Option<&Self> {
                match o {
                    Object::$t(x) => Some(x),
                    _ => None,
                }
            }
            fn into_object(self) -> Object {
                Object::$t(Box::new(self))
            }
        }
    };
}

/// An object of type `T` held in the same allocation as the store's copy: a part that keeps
/// objects (the service proxy) keeps these, not clones, so the agent holds each object once.
pub struct Shared<T> {
    object: Arc<Object>,
    _type: PhantomData<fn() -> T>,
}

impl<T: Resource> Shared<T> {
    /// A handle to `object` when it is a `T`.
    pub fn from_arc(object: Arc<Object>) -> Option<Shared<T>> {
        T::from_object(&object)?;
        Some(Shared {
            object,
            _type: PhantomData,
        })
    }
}

impl<T: Resource> std::ops::Deref for Shared<T> {
    type Target = T;
    fn deref(&self) -> &T {
        T::from_object(&self.object).expect("a Shared<T> holds a T")
    }
}

impl<T> Clone for Shared<T> {
    fn clone(&self) -> Self {
        Shared {
            object: self.object.clone(),
            _type: PhantomData,
        }
    }
}

impl<T: Resource + PartialEq> PartialEq for Shared<T> {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.object, &other.object) || **self == **other
    }
}

impl<T: Resource + std::fmt::Debug> std::fmt::Debug for Shared<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        (**self).fmt(f)
    }
}
resource!(Node);
resource!(Namespace);
resource!(Pod);
resource!(Service);
resource!(EndpointSlice);
resource!(NetworkPolicy);
resource!(Ingress);
resource!(IngressClass);
resource!(Secret);
resource!(GatewayClass);
resource!(Gateway);
resource!(HttpRoute);
resource!(ReferenceGrant);

/// What a source reports.
#[derive(Debug, Clone, PartialEq)]
pub enum Update {
    /// An object was added or changed (shared: the store keeps it as it comes).
    Apply(Arc<Object>),
    /// An object is gone.
    Delete(Kind, Key),
    /// A full listing of `kind` follows, as `Apply`s, up to `Listed(kind)`.
    Relist(Kind),
    /// The listing is complete: objects of `kind` it did not name are gone.
    Listed(Kind),
    /// Every kind the source watches has been listed once: the store is complete.
    Synced,
    /// The source's position after the updates before it (the file source: a fingerprint of the
    /// files read). A part that has applied everything up to it may report it, so a lab or a
    /// test can wait until the state it wrote has landed.
    Mark(String),
    /// Something the source could not read (a bad file, an API error); the store keeps what it
    /// had. The daemons log and count it.
    Error(String),
}

/// One object's change, after a batch of updates: `old` was held before, `new` is held now
/// (`None`: absent). Never `old == new`.
#[derive(Debug, Clone)]
pub struct Change {
    pub kind: Kind,
    pub key: Key,
    pub old: Option<Arc<Object>>,
    pub new: Option<Arc<Object>>,
}

impl Change {
    pub fn old_as<T: Resource>(&self) -> Option<&T> {
        self.old.as_deref().and_then(T::from_object)
    }

    pub fn new_as<T: Resource>(&self) -> Option<&T> {
        self.new.as_deref().and_then(T::from_object)
    }

    /// The new object, shared with the store.
    pub fn new_shared<T: Resource>(&self) -> Option<Shared<T>> {
        self.new.clone().and_then(Shared::from_arc)
    }
}

/// The objects, by kind and key.
#[derive(Debug, Default)]
pub struct Store {
    objects: HashMap<Kind, HashMap<Key, Arc<Object>>>,
    /// Re-listings in progress.
    relisting: HashMap<Kind, HashMap<Key, Arc<Object>>>,
    /// EndpointSlices by the Service they belong to (`kubernetes.io/service-name`).
    slices_of: HashMap<Key, BTreeSet<String>>,
    synced: bool,
    mark: Option<String>,
    errors: Vec<String>,
}

/// The Service an EndpointSlice belongs to: its namespace and `kubernetes.io/service-name`.
pub fn slice_service(slice: &EndpointSlice) -> Option<Key> {
    let svc = slice
        .metadata
        .labels
        .as_ref()?
        .get("kubernetes.io/service-name")?;
    let ns = slice.metadata.namespace.as_deref().unwrap_or("default");
    Some((ns.to_string(), svc.clone()))
}

/// Collects changes, one per object however often it changed in the batch.
#[derive(Default)]
struct Batch {
    changes: Vec<Change>,
    index: HashMap<(Kind, Key), usize>,
}

impl Batch {
    fn record(&mut self, kind: Kind, key: Key, old: Option<Arc<Object>>, new: Option<Arc<Object>>) {
        match self.index.get(&(kind, key.clone())) {
            Some(&i) => self.changes[i].new = new,
            None => {
                self.index.insert((kind, key.clone()), self.changes.len());
                self.changes.push(Change {
                    kind,
                    key,
                    old,
                    new,
                });
            }
        }
    }

    fn finish(self) -> Vec<Change> {
        self.changes
            .into_iter()
            .filter(|c| match (&c.old, &c.new) {
                (None, None) => false,
                (Some(a), Some(b)) => !Arc::ptr_eq(a, b) && a != b,
                _ => true,
            })
            .collect()
    }
}

impl Store {
    pub fn new() -> Store {
        Store::default()
    }

    /// Applies a batch of updates; returns what changed, one [`Change`] per object.
    pub fn apply(&mut self, updates: impl IntoIterator<Item = Update>) -> Vec<Change> {
        let mut batch = Batch::default();
        for u in updates {
            match u {
                Update::Apply(o) => {
                    let (kind, key) = (o.kind(), o.key());
                    if let Some(buffer) = self.relisting.get_mut(&kind) {
                        buffer.insert(key, o);
                        continue;
                    }
                    let held = self.objects.entry(kind).or_default().get(&key);
                    if held.is_some_and(|h| *h == o) {
                        continue;
                    }
                    self.put(&mut batch, kind, key, Some(o));
                }
                Update::Delete(kind, key) => {
                    if let Some(buffer) = self.relisting.get_mut(&kind) {
                        buffer.remove(&key);
                    }
                    self.put(&mut batch, kind, key, None);
                }
                Update::Relist(kind) => {
                    self.relisting.insert(kind, HashMap::new());
                }
                Update::Listed(kind) => {
                    let Some(listing) = self.relisting.remove(&kind) else {
                        continue;
                    };
                    let gone: Vec<Key> = self
                        .objects
                        .get(&kind)
                        .into_iter()
                        .flat_map(|m| m.keys())
                        .filter(|k| !listing.contains_key(*k))
                        .cloned()
                        .collect();
                    for key in gone {
                        self.put(&mut batch, kind, key, None);
                    }
                    for (key, o) in listing {
                        let held = self.objects.get(&kind).and_then(|m| m.get(&key));
                        if held.is_none_or(|h| **h != *o) {
                            self.put(&mut batch, kind, key, Some(o));
                        }
                    }
                }
                Update::Synced => self.synced = true,
                Update::Mark(m) => self.mark = Some(m),
                Update::Error(e) => self.errors.push(e),
            }
        }
        batch.finish()
    }

    fn put(&mut self, batch: &mut Batch, kind: Kind, key: Key, new: Option<Arc<Object>>) {
        let map = self.objects.entry(kind).or_default();
        let old = match &new {
            Some(o) => map.insert(key.clone(), o.clone()),
            None => map.remove(&key),
        };
        if kind == Kind::EndpointSlice {
            let service = |o: &Option<Arc<Object>>| {
                o.as_deref()
                    .and_then(EndpointSlice::from_object)
                    .and_then(slice_service)
            };
            if let Some(s) = service(&old) {
                if let Some(set) = self.slices_of.get_mut(&s) {
                    set.remove(&key.1);
                    if set.is_empty() {
                        self.slices_of.remove(&s);
                    }
                }
            }
            if let Some(s) = service(&new) {
                self.slices_of.entry(s).or_default().insert(key.1.clone());
            }
        }
        batch.record(kind, key, old, new);
    }

    /// Whether the source has delivered every kind once.
    pub fn synced(&self) -> bool {
        self.synced
    }

    /// The source's last [`Update::Mark`].
    pub fn mark(&self) -> Option<&str> {
        self.mark.as_deref()
    }

    /// Source errors since the last call.
    pub fn take_errors(&mut self) -> Vec<String> {
        std::mem::take(&mut self.errors)
    }

    pub fn get<T: Resource>(&self, namespace: &str, name: &str) -> Option<&T> {
        let key = (namespace.to_string(), name.to_string());
        self.objects
            .get(&T::KIND)?
            .get(&key)
            .and_then(|o| T::from_object(o))
    }

    /// Every object of a kind, in no particular order.
    pub fn list<T: Resource>(&self) -> impl Iterator<Item = &T> {
        self.held(T::KIND).filter_map(|o| T::from_object(o))
    }

    /// Every object of a kind, shared with the store, in no particular order.
    pub fn list_shared<T: Resource>(&self) -> impl Iterator<Item = Shared<T>> + '_ {
        self.held(T::KIND)
            .filter_map(|o| Shared::from_arc(o.clone()))
    }

    fn held(&self, kind: Kind) -> impl Iterator<Item = &Arc<Object>> {
        self.objects.get(&kind).into_iter().flat_map(|m| m.values())
    }

    pub fn count(&self, kind: Kind) -> usize {
        self.objects.get(&kind).map_or(0, HashMap::len)
    }

    /// The EndpointSlices of Service `key`.
    pub fn slices_of(&self, key: &Key) -> Vec<&EndpointSlice> {
        self.slices_of
            .get(key)
            .into_iter()
            .flatten()
            .filter_map(|name| self.get::<EndpointSlice>(&key.0, name))
            .collect()
    }

    /// A copy of the whole state (for one-shot planning: `--dry-run`, `explain`, tests).
    pub fn snapshot(&self) -> ClusterState {
        let mut nodes: Vec<_> = self
            .list::<Node>()
            .filter_map(crate::NodeInfo::from_node)
            .collect();
        nodes.sort_by(|a, b| a.name.cmp(&b.name));
        ClusterState {
            nodes,
            services: self.list::<Service>().cloned().collect(),
            endpoint_slices: self.list::<EndpointSlice>().cloned().collect(),
            pods: self.list::<Pod>().cloned().collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn svc(name: &str, port: i32) -> Object {
        Object::Service(
            serde_json::from_value(json!({"metadata": {"name": name, "namespace": "ns"},
                "spec": {"ports": [{"port": port}]}}))
            .unwrap(),
        )
    }

    fn slice(name: &str, svc: &str) -> Object {
        Object::EndpointSlice(
            serde_json::from_value(json!({"metadata": {"name": name, "namespace": "ns",
                "labels": {"kubernetes.io/service-name": svc}}, "addressType": "IPv4", "endpoints": []}))
            .unwrap(),
        )
    }

    fn key(name: &str) -> Key {
        ("ns".into(), name.into())
    }

    #[test]
    fn changes_are_one_per_object_and_unchanged_objects_change_nothing() {
        let mut s = Store::new();
        let ch = s.apply([Update::apply(svc("a", 80)), Update::apply(svc("a", 81))]);
        assert_eq!(ch.len(), 1);
        assert!(ch[0].old.is_none());
        assert_eq!(ch[0].new.as_deref(), Some(&svc("a", 81)));
        assert!(s.apply([Update::apply(svc("a", 81))]).is_empty());
        // Added and deleted in one batch: nothing happened.
        assert!(s
            .apply([
                Update::apply(svc("b", 1)),
                Update::Delete(Kind::Service, key("b"))
            ])
            .is_empty());
        let ch = s.apply([Update::Delete(Kind::Service, key("a"))]);
        assert_eq!(
            ch[0].old_as::<Service>(),
            Service::from_object(&svc("a", 81))
        );
        assert!(ch[0].new.is_none());
        assert_eq!(s.count(Kind::Service), 0);
        // Deleting what is not there is no change.
        assert!(s
            .apply([Update::Delete(Kind::Service, key("a"))])
            .is_empty());
    }

    #[test]
    fn a_relist_keeps_the_old_state_until_it_completes_then_deletes_what_it_missed() {
        let mut s = Store::new();
        s.apply([
            Update::apply(svc("a", 80)),
            Update::apply(svc("b", 80)),
            Update::Synced,
        ]);
        assert!(s
            .apply([Update::Relist(Kind::Service), Update::apply(svc("b", 90))])
            .is_empty());
        assert_eq!(
            s.count(Kind::Service),
            2,
            "the old state serves during a re-list"
        );
        let mut ch = s.apply([Update::apply(svc("c", 1)), Update::Listed(Kind::Service)]);
        ch.sort_by(|x, y| x.key.cmp(&y.key));
        let got: Vec<(String, bool, bool)> = ch
            .iter()
            .map(|c| (c.key.1.clone(), c.old.is_some(), c.new.is_some()))
            .collect();
        assert_eq!(
            got,
            [
                ("a".into(), true, false),
                ("b".into(), true, true),
                ("c".into(), false, true)
            ]
        );
        assert!(s.synced());
    }

    #[test]
    fn slices_are_indexed_by_their_service() {
        let mut s = Store::new();
        s.apply([
            Update::apply(slice("web-1", "web")),
            Update::apply(slice("web-2", "web")),
            Update::apply(slice("db-1", "db")),
        ]);
        assert_eq!(s.slices_of(&key("web")).len(), 2);
        // A slice moved to another Service leaves the first one's index.
        s.apply([Update::apply(slice("web-2", "db"))]);
        assert_eq!(s.slices_of(&key("web")).len(), 1);
        assert_eq!(s.slices_of(&key("db")).len(), 2);
        s.apply([
            Update::Delete(Kind::EndpointSlice, key("web-1")),
            Update::Relist(Kind::EndpointSlice),
            Update::Listed(Kind::EndpointSlice),
        ]);
        assert!(s.slices_of(&key("web")).is_empty());
        assert!(s.slices_of(&key("db")).is_empty());
    }
}
