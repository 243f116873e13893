//! The agent's network-policy part: the planner takes the store's changes, the applier sends the
//! elements they changed. A failed transaction makes the next sync load the table whole (one
//! transaction again: never a window).

use cluster::store::{Change, Store};
use ipnet::Ipv4Net;
use policy::apply::Applier;
use policy::plan::Planner;
use std::collections::BTreeMap;

pub struct PolicyPart {
    pub planner: Planner,
    applier: Applier,
    /// Whether the kernel holds what the planner accounted for (else: load whole).
    loaded: bool,
    /// Refusals already logged.
    said: BTreeMap<policy::model::Key, String>,
}

/// What a sync did.
pub struct Synced {
    pub elements: usize,
    pub whole: bool,
}

impl PolicyPart {
    pub fn new(node: &str, store: &Store, pod_cidr: Ipv4Net) -> Result<PolicyPart, String> {
        if let Err(e) = policy::apply::ensure_bridge_filtering() {
            tracing::warn!(node, "{e}");
        }
        let mut planner = Planner::new(node, Some(pod_cidr));
        planner.take_store(store);
        Ok(PolicyPart {
            planner,
            applier: Applier::new()?,
            loaded: false,
            said: BTreeMap::new(),
        })
    }

    pub fn sync(&mut self, node: &str, changes: &[Change], pod_cidr: Ipv4Net) -> Result<Synced, String> {
        self.planner.set_pod_cidr(Some(pod_cidr));
        self.planner.take_changes(changes);
        for (key, e) in &self.planner.errors {
            let text = e.to_string();
            if self.said.get(key) != Some(&text) {
                tracing::warn!(node, "{text} (refused; its last good version, if any, stays in force)");
            }
        }
        self.said = self.planner.errors.iter().map(|(k, e)| (k.clone(), e.to_string())).collect();
        if !self.loaded {
            let entries = self.planner.entries();
            self.planner.clear_pending();
            self.applier.load(&entries)?;
            self.loaded = true;
            return Ok(Synced {
                elements: entries.len(),
                whole: true,
            });
        }
        let pending = self.planner.take_pending();
        if let Err(e) = self.applier.apply(&pending) {
            self.loaded = false;
            return Err(e);
        }
        Ok(Synced {
            elements: pending.len(),
            whole: false,
        })
    }
}
