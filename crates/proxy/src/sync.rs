//! The incremental proxy: keeps the Services and EndpointSlices it was told of, re-plans only
//! the Services whose objects changed (each Service's fragment of the table is independent, see
//! [`plan_service`]) and sends only their [`diff`] — one transaction per sync. The first sync
//! adopts what the kernel already holds (see [`Applier::adopt`]), so a restarted agent changes
//! nothing that is still right.

use crate::apply::Applier;
use crate::model::Config;
use crate::plan::{
    diff, diff_all, plan_host_ports, plan_service, pod_key, Diff, PortKey, Ruleset, ServiceKey,
};
use cluster::manifests::namespaced;
use cluster::store::slice_service;
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use std::collections::{BTreeMap, BTreeSet, HashMap};

/// What one sync did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    /// Services re-planned.
    pub services: usize,
    /// Kernel objects sent (chains, rules, elements, sets).
    pub objects: usize,
}

pub struct Proxy {
    cfg: Config,
    services: HashMap<ServiceKey, Service>,
    /// Each Service's slices by slice name.
    slices: HashMap<ServiceKey, BTreeMap<String, EndpointSlice>>,
    /// (namespace, slice name) → the Service it was filed under.
    slice_owner: HashMap<ServiceKey, ServiceKey>,
    /// Pods of this node with hostPorts, by [`pod_key`].
    pods: HashMap<ServiceKey, Pod>,
    /// What the kernel holds, per Service.
    applied: HashMap<ServiceKey, Ruleset>,
    node_port_owner: HashMap<PortKey, ServiceKey>,
    dirty: BTreeSet<ServiceKey>,
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
            node_port_owner: HashMap::new(),
            dirty: BTreeSet::new(),
            errors: BTreeMap::new(),
            applier: Applier::new()?,
            adopted: false,
        })
    }

    /// New node facts (addresses, CIDRs): every Service is re-planned.
    pub fn set_config(&mut self, cfg: Config) {
        if cfg != self.cfg {
            self.cfg = cfg;
            self.dirty.extend(self.services.keys().cloned());
            self.dirty.extend(self.applied.keys().cloned());
        }
    }

    pub fn upsert_service(&mut self, svc: &Service) {
        let key = namespaced(&svc.metadata);
        if self.services.get(&key) != Some(svc) {
            self.services.insert(key.clone(), svc.clone());
            self.dirty.insert(key);
        }
    }

    pub fn delete_service(&mut self, key: &ServiceKey) {
        if self.services.remove(key).is_some() {
            self.dirty.insert(key.clone());
        }
    }

    pub fn upsert_slice(&mut self, slice: &EndpointSlice) {
        let id = namespaced(&slice.metadata);
        let owner = slice_service(slice);
        if let Some(old) = self.slice_owner.get(&id).cloned() {
            if Some(&old) != owner.as_ref() {
                self.delete_slice(&id);
            }
        }
        let Some(owner) = owner else {
            return; // not a Service's slice
        };
        let own = self.slices.entry(owner.clone()).or_default();
        if own.get(&id.1) != Some(slice) {
            own.insert(id.1.clone(), slice.clone());
            self.slice_owner.insert(id, owner.clone());
            self.dirty.insert(owner);
        }
    }

    pub fn delete_slice(&mut self, id: &ServiceKey) {
        if let Some(owner) = self.slice_owner.remove(id) {
            if let Some(own) = self.slices.get_mut(&owner) {
                own.remove(&id.1);
                if own.is_empty() {
                    self.slices.remove(&owner);
                }
            }
            self.dirty.insert(owner);
        }
    }

    /// A pod: its hostPorts are served when it runs on this node.
    pub fn upsert_pod(&mut self, pod: &Pod) {
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
        } else if self.pods.get(&key) != Some(pod) {
            self.pods.insert(key.clone(), pod.clone());
            self.dirty.insert(key);
        }
    }

    /// Forgets a pod by [`pod_key`].
    pub fn delete_pod(&mut self, key: &ServiceKey) {
        if self.pods.remove(key).is_some() {
            self.dirty.insert(key.clone());
        }
    }

    /// Makes the known objects exactly these (a full listing), marking only what changed.
    pub fn replace_all(&mut self, services: &[Service], slices: &[EndpointSlice], pods: &[Pod]) {
        for k in absent(
            self.services.keys(),
            services.iter().map(|s| namespaced(&s.metadata)),
        ) {
            self.delete_service(&k);
        }
        for s in services {
            self.upsert_service(s);
        }
        for k in absent(
            self.slice_owner.keys(),
            slices.iter().map(|s| namespaced(&s.metadata)),
        ) {
            self.delete_slice(&k);
        }
        for s in slices {
            self.upsert_slice(s);
        }
        let pod_keys = pods.iter().map(|p| {
            let (ns, name) = namespaced(&p.metadata);
            pod_key(&ns, &name)
        });
        for k in absent(self.pods.keys(), pod_keys) {
            self.delete_pod(&k);
        }
        for p in pods {
            self.upsert_pod(p);
        }
    }

    /// `healthCheckNodePort` → this node's endpoint count, over every Service.
    pub fn health_checks(&self) -> BTreeMap<u16, usize> {
        self.applied
            .values()
            .flat_map(|r| r.health_checks.iter().map(|(p, n)| (*p, *n)))
            .collect()
    }

    /// Re-plans the changed Services and sends what differs, in one transaction (the first sync
    /// adopts the kernel's table and sends whatever differs from the whole plan).
    pub fn sync(&mut self) -> Result<Report, String> {
        let dirty: Vec<ServiceKey> = std::mem::take(&mut self.dirty).into_iter().collect();
        let mut planned: Vec<(ServiceKey, Ruleset)> = Vec::with_capacity(dirty.len());
        for key in &dirty {
            let owners = &self.node_port_owner;
            let taken = |p: PortKey| {
                owners
                    .get(&p)
                    .filter(|o| *o != key)
                    .map(|(ns, name)| format!("{ns}/{name}"))
            };
            let planned_one = match (self.services.get(key), self.pods.get(key)) {
                (Some(svc), _) => {
                    let own: Vec<&EndpointSlice> = self
                        .slices
                        .get(key)
                        .map(|m| m.values().collect())
                        .unwrap_or_default();
                    plan_service(&self.cfg, svc, &own, taken)
                }
                (None, Some(pod)) => plan_host_ports(&self.cfg, pod, taken),
                (None, None) => Ok(Ruleset::default()),
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
        let result = if self.adopted {
            let mut d = Diff::default();
            for (key, new) in &planned {
                let empty = Ruleset::default();
                let old = self.applied.get(key).unwrap_or(&empty);
                d.extend(diff(old, new));
            }
            let objects = d.size();
            self.applier.apply(&d).map(|()| objects)
        } else {
            self.adopt_and_apply(&planned)
        };
        match result {
            Ok(objects) => {
                for (key, new) in planned {
                    // NodePorts the Service no longer uses are free again.
                    let old = self.applied.get(&key).into_iter();
                    for p in old.flat_map(Ruleset::claimed_node_ports) {
                        let kept = new.claimed_node_ports().any(|q| q == p);
                        if !kept && self.node_port_owner.get(p) == Some(&key) {
                            self.node_port_owner.remove(p);
                        }
                    }
                    if new == Ruleset::default() {
                        self.applied.remove(&key);
                    } else {
                        self.applied.insert(key, new);
                    }
                }
                Ok(Report {
                    services: dirty.len(),
                    objects,
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

    fn adopt_and_apply(&mut self, planned: &[(ServiceKey, Ruleset)]) -> Result<usize, String> {
        let replanned: BTreeSet<&ServiceKey> = planned.iter().map(|(k, _)| k).collect();
        let want: Vec<&Ruleset> = self
            .applied
            .iter()
            .filter(|(key, _)| !replanned.contains(key))
            .map(|(_, r)| r)
            .chain(planned.iter().map(|(_, r)| r))
            .collect();
        let held = self.applier.adopt(&want)?;
        let d = diff_all(&held, &want);
        let objects = d.size();
        self.applier.apply(&d)?;
        self.adopted = true;
        Ok(objects)
    }
}

/// The keys held that a full listing no longer has.
fn absent<'a>(
    held: impl Iterator<Item = &'a ServiceKey>,
    listed: impl Iterator<Item = ServiceKey>,
) -> Vec<ServiceKey> {
    let listed: BTreeSet<ServiceKey> = listed.collect();
    held.filter(|k| !listed.contains(*k)).cloned().collect()
}
