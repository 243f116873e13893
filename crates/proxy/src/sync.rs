//! The incremental proxy: keeps the Services and EndpointSlices it was told of, re-plans only
//! the Services whose objects changed (each Service's fragment of the table is independent, see
//! [`plan_service`]) and sends only their [`diff_own`] — one transaction per sync. What
//! fragments share (the chains by endpoint count) is counted: it is created with its first user
//! and deleted with its last. The node's own part ([`node_part`]) is one more fragment, re-planned
//! when the node's facts change. The first sync adopts what the kernel already
//! holds (see [`Applier::adopt`]), so a restarted agent changes nothing that is still right.

use crate::apply::Applier;
use crate::model::Config;
use crate::plan::{node_part, plan_host_ports, plan_service, pod_key, shared_chain, ServiceKey};
use crate::ruleset::{diff_all, diff_own, Diff, PortKey, Ruleset};
use cluster::manifests::namespaced;
use cluster::slim::EndpointSlice;
use cluster::store::slice_service;
use cluster::{Change, Kind, ModelError, Shared, Store};
use k8s_openapi::api::core::v1::{Pod, Service};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::hash::Hash;

/// How many fragments use each shared object.
#[derive(Debug)]
struct Counts<K: Hash + Eq> {
    users: HashMap<K, usize>,
}

impl<K: Hash + Eq> Default for Counts<K> {
    fn default() -> Self {
        Counts {
            users: HashMap::new(),
        }
    }
}

impl<K: Hash + Eq + Clone> Counts<K> {
    /// Counts a fragment's objects `before` → `after`; returns the objects that got their first
    /// user and those that lost their last.
    fn update<'a>(
        &mut self,
        changes: impl IntoIterator<Item = (HashSet<&'a K>, HashSet<&'a K>)>,
    ) -> (Vec<K>, Vec<K>)
    where
        K: 'a,
    {
        let mut touched: Vec<(K, usize)> = Vec::new();
        for (before, after) in changes {
            for k in after.iter().filter(|k| !before.contains(*k)) {
                let n = self.users.entry((*k).clone()).or_default();
                touched.push(((*k).clone(), *n));
                *n += 1;
            }
            for k in before.iter().filter(|k| !after.contains(*k)) {
                let n = self.users.entry((*k).clone()).or_default();
                touched.push(((*k).clone(), *n));
                *n = n.saturating_sub(1);
            }
        }
        let (mut born, mut gone) = (Vec::new(), Vec::new());
        let mut seen = HashSet::new();
        for (k, at_first_touch) in touched {
            if !seen.insert(k.clone()) {
                continue;
            }
            let now = self.users.get(&k).copied().unwrap_or(0);
            if now == 0 {
                self.users.remove(&k);
            }
            match (at_first_touch, now) {
                (0, n) if n > 0 => born.push(k),
                (n, 0) if n > 0 => gone.push(k),
                _ => {}
            }
        }
        (born, gone)
    }
}

/// What one sync did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    /// Services re-planned.
    pub services: usize,
    /// Kernel objects sent (chains, rules, elements, sets).
    pub objects: usize,
    /// The sets an adoption in this sync read whole: the ledger counted elements that no plan
    /// accounts for (Services deleted while no agent ran), or a table an older agent wrote.
    pub listed: Vec<&'static str>,
}

pub struct Proxy {
    cfg: Config,
    /// Shared with the agent's store, as every object held here: the agent holds each once.
    services: HashMap<ServiceKey, Shared<Service>>,
    /// Each Service's slices, by slice name (most Services have one: a sorted `Vec` holds it in
    /// 8 bytes where a map's first node takes hundreds).
    slices: HashMap<ServiceKey, Vec<Shared<EndpointSlice>>>,
    /// (namespace, slice name) → the Service it was filed under.
    slice_owner: HashMap<ServiceKey, ServiceKey>,
    /// Pods of this node with hostPorts, by [`pod_key`].
    pods: HashMap<ServiceKey, Shared<Pod>>,
    /// What the kernel holds, per Service (and the node part, under [`node_key`]).
    applied: HashMap<ServiceKey, Ruleset>,
    /// Users of each shared chain among `applied`.
    shared: Counts<String>,
    node_port_owner: HashMap<PortKey, ServiceKey>,
    /// Services (and pods, and the node part) to re-plan; in key order at the sync.
    dirty: HashSet<ServiceKey>,
    /// The last error of each Service that could not be planned (it keeps its last good rules).
    pub errors: BTreeMap<ServiceKey, String>,
    applier: Applier,
    /// Whether `applied` is known to match the kernel (else the next sync adopts first).
    adopted: bool,
}

impl Proxy {
    /// A proxy for the calling thread's network namespace.
    pub fn new(cfg: Config) -> Result<Proxy, String> {
        Ok(Proxy {
            cfg,
            services: HashMap::new(),
            slices: HashMap::new(),
            slice_owner: HashMap::new(),
            pods: HashMap::new(),
            applied: HashMap::new(),
            shared: Counts::default(),
            node_port_owner: HashMap::new(),
            dirty: HashSet::from([node_key()]),
            errors: BTreeMap::new(),
            applier: Applier::new()?,
            adopted: false,
        })
    }

    /// New node facts (addresses, CIDRs): every Service is re-planned. A new cluster CIDR
    /// replaces the table whole (see [`Ruleset::cluster_cidr`]).
    pub fn set_config(&mut self, cfg: Config) {
        if cfg.cluster_cidr != self.cfg.cluster_cidr {
            self.adopted = false;
        }
        if cfg != self.cfg {
            self.cfg = cfg;
            self.dirty.extend(self.services.keys().cloned());
            self.dirty.extend(self.applied.keys().cloned());
            self.dirty.insert(node_key());
        }
    }

    pub fn upsert_service(&mut self, svc: Shared<Service>) {
        let key = namespaced(&svc.metadata);
        if self.services.get(&key) != Some(&svc) {
            self.services.insert(key.clone(), svc);
            self.dirty.insert(key);
        }
    }

    pub fn delete_service(&mut self, key: &ServiceKey) {
        if self.services.remove(key).is_some() {
            self.dirty.insert(key.clone());
        }
    }

    pub fn upsert_slice(&mut self, slice: Shared<EndpointSlice>) {
        let id = namespaced(&slice.metadata);
        let owner = slice_service(&slice);
        if let Some(old) = self.slice_owner.get(&id).cloned() {
            if Some(&old) != owner.as_ref() {
                self.delete_slice(&id);
            }
        }
        let Some(owner) = owner else {
            return; // not a Service's slice
        };
        let own = self.slices.entry(owner.clone()).or_default();
        match own.binary_search_by(|s| slice_name(s).cmp(&id.1)) {
            Ok(i) if own[i] == slice => return,
            Ok(i) => own[i] = slice,
            Err(i) => own.insert(i, slice),
        }
        self.slice_owner.insert(id, owner.clone());
        self.dirty.insert(owner);
    }

    pub fn delete_slice(&mut self, id: &ServiceKey) {
        if let Some(owner) = self.slice_owner.remove(id) {
            if let Some(own) = self.slices.get_mut(&owner) {
                own.retain(|s| slice_name(s) != id.1);
                if own.is_empty() {
                    self.slices.remove(&owner);
                }
            }
            self.dirty.insert(owner);
        }
    }

    /// A pod: its hostPorts are served when it runs on this node.
    pub fn upsert_pod(&mut self, pod: Shared<Pod>) {
        let (ns, name) = namespaced(&pod.metadata);
        let key = pod_key(&ns, &name);
        let on_this_node = pod.spec.as_ref().is_some_and(|s| {
            s.node_name.as_deref() == Some(&self.cfg.node)
                && s.containers
                    .iter()
                    .flat_map(|c| c.ports.iter().flatten())
                    .any(|p| p.host_port.is_some_and(|h| h != 0))
        });
        if !on_this_node {
            self.delete_pod(&key);
        } else if self.pods.get(&key) != Some(&pod) {
            self.pods.insert(key.clone(), pod);
            self.dirty.insert(key);
        }
    }

    /// Forgets a pod by [`pod_key`].
    pub fn delete_pod(&mut self, key: &ServiceKey) {
        if self.pods.remove(key).is_some() {
            self.dirty.insert(key.clone());
        }
    }

    /// Takes what `changes` did to Services, EndpointSlices and Pods (other kinds are not read).
    pub fn take_changes(&mut self, changes: &[Change]) {
        for c in changes {
            match c.kind {
                Kind::Service => match c.new_shared() {
                    Some(s) => self.upsert_service(s),
                    None => self.delete_service(&c.key),
                },
                Kind::EndpointSlice => match c.new_shared() {
                    Some(s) => self.upsert_slice(s),
                    None => self.delete_slice(&c.key),
                },
                Kind::Pod => match c.new_shared() {
                    Some(pod) => self.upsert_pod(pod),
                    None => self.delete_pod(&pod_key(&c.key.0, &c.key.1)),
                },
                _ => {}
            }
        }
    }

    /// Takes every Service, EndpointSlice and Pod `store` holds (a new proxy's start).
    pub fn take_store(&mut self, store: &Store) {
        self.services.reserve(store.count(Kind::Service));
        self.slices.reserve(store.count(Kind::Service));
        self.slice_owner.reserve(store.count(Kind::EndpointSlice));
        self.dirty.reserve(store.count(Kind::Service));
        store
            .list_shared::<Service>()
            .for_each(|s| self.upsert_service(s));
        store
            .list_shared::<EndpointSlice>()
            .for_each(|s| self.upsert_slice(s));
        store
            .list_shared::<Pod>()
            .for_each(|pod| self.upsert_pod(pod));
    }

    /// Time spent in exchanges with the kernel so far: its share of the syncs.
    pub fn kernel_time(&self) -> std::time::Duration {
        self.applier.kernel_time()
    }

    /// `healthCheckNodePort` → this node's endpoint count, over every Service.
    pub fn health_checks(&self) -> BTreeMap<u16, usize> {
        self.applied
            .values()
            .flat_map(|r| r.health_checks.iter().map(|(p, n)| (*p, *n)))
            .collect()
    }

    fn objects(&self) -> Objects<'_> {
        Objects {
            cfg: &self.cfg,
            services: &self.services,
            slices: &self.slices,
            pods: &self.pods,
        }
    }

    /// Re-plans the changed Services and sends what differs, in one transaction (the first sync
    /// adopts the kernel's table and sends whatever differs from the whole plan).
    pub fn sync(&mut self) -> Result<Report, String> {
        let mut dirty: Vec<ServiceKey> = std::mem::take(&mut self.dirty).into_iter().collect();
        dirty.sort_unstable();
        let mut planned: Vec<(ServiceKey, Ruleset)> = Vec::with_capacity(dirty.len());
        let results = self.objects().plan_all(&dirty, &self.node_port_owner);
        for (key, result) in dirty.iter().zip(results) {
            // A Service before it in this sync may have claimed one of its NodePorts since:
            // planned again against the claims, it gets the error it would have got in line.
            let owners = &self.node_port_owner;
            let claimed_since = |r: &Ruleset| {
                (r.claimed_node_ports()).any(|p| owners.get(p).is_some_and(|o| o != key))
            };
            let planned_one = match result {
                Ok(r) if claimed_since(&r) => self.objects().plan_one(key, owners),
                other => other,
            };
            let new = match planned_one {
                Ok(r) => {
                    self.errors.remove(key);
                    r
                }
                Err(e) => {
                    self.errors.insert(key.clone(), e.to_string());
                    continue; // keeps its last good fragment
                }
            };
            // Claim NodePorts now, so a later Service in this sync sees them taken.
            for p in new.claimed_node_ports() {
                self.node_port_owner.insert(*p, key.clone());
            }
            planned.push((key.clone(), new));
        }
        let adopting = !self.adopted;
        let result = if adopting {
            self.adopt_and_apply(&mut planned)
        } else {
            self.apply_changes(&mut planned)
        };
        match result {
            Ok(objects) => {
                for (key, mut new) in planned {
                    // NodePorts the Service no longer uses are free again.
                    let old = self.applied.get(&key).into_iter();
                    for p in old.flat_map(Ruleset::claimed_node_ports) {
                        let kept = new.claimed_node_ports().any(|q| q == p);
                        if !kept && self.node_port_owner.get(p) == Some(&key) {
                            self.node_port_owner.remove(p);
                        }
                    }
                    // Only `explain` reads what a frontend serves; the diffs to come do not.
                    new.frontends = BTreeMap::new();
                    if new == Ruleset::default() {
                        self.applied.remove(&key);
                    } else {
                        self.applied.insert(key, new);
                    }
                }
                if dirty.len() >= TRIM_AFTER {
                    cluster::release_freed_memory();
                }
                Ok(Report {
                    services: dirty.len(),
                    objects,
                    listed: if adopting {
                        self.applier.listed.clone()
                    } else {
                        Vec::new()
                    },
                })
            }
            Err(e) => {
                // The kernel may hold part of it: learn what it holds before the next try.
                self.adopted = false;
                self.dirty.extend(dirty);
                Err(e)
            }
        }
    }

    /// Sends the re-planned fragments' own changes plus the shared objects that got their first
    /// user or lost their last; the counts stand only if the kernel took it.
    fn apply_changes(&mut self, planned: &mut [(ServiceKey, Ruleset)]) -> Result<usize, String> {
        let empty = Ruleset::default();
        let mut d = Diff::default();
        for (key, new) in planned.iter_mut() {
            let old = self.applied.get(key).unwrap_or(&empty);
            new.keep_positions(old);
            d.extend(diff_own(old, new));
        }
        // Counted before the kernel has it: should it refuse, the next sync adopts, and counts
        // afresh from what it finds.
        let olds = || {
            planned
                .iter()
                .map(|(k, _)| self.applied.get(k).unwrap_or(&empty))
        };
        let (born, gone) = self.shared.update(
            olds()
                .zip(planned.iter())
                .map(|(old, (_, new))| (old.shared.iter().collect(), new.shared.iter().collect())),
        );
        for name in born {
            let (rules, comment) =
                shared_chain(&name, self.cfg.cluster_cidr).expect("a shared chain's name");
            d.new_chains.push((name, rules, Some(comment)));
        }
        d.gone_chains.extend(gone);
        let objects = d.size();
        self.applier.apply(&d)?;
        Ok(objects)
    }

    fn adopt_and_apply(&mut self, planned: &mut [(ServiceKey, Ruleset)]) -> Result<usize, String> {
        let replanned: BTreeSet<ServiceKey> = planned.iter().map(|(k, _)| k.clone()).collect();
        let held = self
            .applier
            .adopt(&table(&self.applied, &replanned, planned))?;
        // Endpoints keep the index the kernel gave them.
        for (_, new) in planned.iter_mut() {
            new.keep_positions(&held);
        }
        for (key, r) in self.applied.iter_mut() {
            if !replanned.contains(key) {
                r.keep_positions(&held);
            }
        }
        let want = table(&self.applied, &replanned, planned);
        let d = diff_all(&held, &want);
        let objects = d.size();
        self.applier.apply(&d)?;
        let mut shared = Counts::default();
        shared.update(
            want.iter()
                .map(|f| (HashSet::new(), f.shared.iter().collect())),
        );
        self.shared = shared;
        self.adopted = true;
        Ok(objects)
    }
}

/// What planning reads, shared by the planning threads.
struct Objects<'a> {
    cfg: &'a Config,
    services: &'a HashMap<ServiceKey, Shared<Service>>,
    slices: &'a HashMap<ServiceKey, Vec<Shared<EndpointSlice>>>,
    pods: &'a HashMap<ServiceKey, Shared<Pod>>,
}

/// Below this many fragments to plan, one thread plans them all.
const PER_THREAD: usize = 512;

impl Objects<'_> {
    /// Plans `keys`, each against the NodePorts `owners` holds (not against each other's): on
    /// every CPU when there are many (a start, an adoption, new node facts).
    fn plan_all(
        &self,
        keys: &[ServiceKey],
        owners: &HashMap<PortKey, ServiceKey>,
    ) -> Vec<Result<Ruleset, ModelError>> {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let threads = cpus.min(keys.len() / PER_THREAD).max(1);
        if threads == 1 {
            return keys.iter().map(|k| self.plan_one(k, owners)).collect();
        }
        std::thread::scope(|scope| {
            let workers: Vec<_> = keys
                .chunks(keys.len().div_ceil(threads))
                .map(|chunk| {
                    scope.spawn(move || {
                        (chunk.iter())
                            .map(|k| self.plan_one(k, owners))
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            (workers.into_iter())
                .flat_map(|w| w.join().expect("a planning thread"))
                .collect()
        })
    }

    /// The fragment of `key`: a Service's, a pod's hostPorts, or the node part.
    fn plan_one(
        &self,
        key: &ServiceKey,
        owners: &HashMap<PortKey, ServiceKey>,
    ) -> Result<Ruleset, ModelError> {
        let taken = |p: PortKey| {
            owners
                .get(&p)
                .filter(|o| *o != key)
                .map(|(ns, name)| format!("{ns}/{name}"))
        };
        match (self.services.get(key), self.pods.get(key)) {
            _ if *key == node_key() => Ok(node_part(self.cfg)),
            (Some(svc), _) => {
                let own: Vec<&EndpointSlice> = self
                    .slices
                    .get(key)
                    .map(|own| own.iter().map(|s| &**s).collect())
                    .unwrap_or_default();
                plan_service(self.cfg, svc, &own, taken)
            }
            (None, Some(pod)) => plan_host_ports(self.cfg, pod, taken),
            (None, None) => Ok(Ruleset::default()),
        }
    }
}

fn slice_name(s: &EndpointSlice) -> &str {
    s.metadata.name.as_deref().unwrap_or_default()
}

/// Syncs that re-planned at least this many fragments (a start, an adoption, new node facts)
/// leave much freed memory behind (the diff, the batches, the planning threads' scratch: ~50
/// MiB of the agent's RSS at 50,000 Services), which is then handed back.
const TRIM_AFTER: usize = 4096;

/// The key the node part is filed under: no Service or Pod has an empty namespace.
fn node_key() -> ServiceKey {
    (String::new(), "node".into())
}

/// The node's table as fragments: what is applied, with the re-planned Services' new plans.
fn table<'a>(
    applied: &'a HashMap<ServiceKey, Ruleset>,
    replanned: &BTreeSet<ServiceKey>,
    planned: &'a [(ServiceKey, Ruleset)],
) -> Vec<&'a Ruleset> {
    applied
        .iter()
        .filter(|(key, _)| !replanned.contains(*key))
        .map(|(_, r)| r)
        .chain(planned.iter().map(|(_, r)| r))
        .collect()
}
