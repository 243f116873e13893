//! The agent's network-policy part: the planner takes the store's changes, the applier sends the
//! elements they changed. A failed transaction makes the next sync load the table whole (one
//! transaction again: never a window). Denied packets the kernel copies to the policy's nflog
//! group (rate-limited there) are explained here and logged naming the policies that isolate the
//! pod; every denied packet is counted by namespace and policy from the kernel's per-address
//! counters (the table's `*-denied` sets), which no rate limit thins.

use cluster::store::{Change, Store};
use ipnet::Ipv4Net;
use nft::netlink::FAMILY_IPV4;
use policy::apply::Applier;
use policy::model::Direction;
use policy::plan::{Planner, LOG_GROUP, TABLE_NAME};
use policy::{Packet, Side};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DeniedLabel {
    pub namespace: String,
    pub policy: String,
    pub direction: &'static str,
}

/// `flatnet_policy_denied_total`: denied packets by the namespace and name of each policy that
/// isolates the pod (direction `unknown-pod`: a pod the agent had not planned yet, counted as far
/// as the drop log's rate limit passes them).
#[derive(Default)]
pub struct DenyMetrics {
    pub denied: Family<DeniedLabel, Counter>,
}

impl DenyMetrics {
    pub fn register(&self, r: &mut Registry) {
        r.register(
            "flatnet_policy_denied",
            "Packets denied by network policy, by isolating policy and direction",
            self.denied.clone(),
        );
    }
}

pub struct PolicyPart {
    pub planner: Arc<Mutex<Planner>>,
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
            planner: Arc::new(Mutex::new(planner)),
            applier: Applier::new()?,
            loaded: false,
            said: BTreeMap::new(),
        })
    }

    pub fn sync(
        &mut self,
        node: &str,
        changes: &[Change],
        pod_cidr: Ipv4Net,
    ) -> Result<Synced, String> {
        let mut planner = self.planner.lock().expect("planner");
        planner.set_pod_cidr(Some(pod_cidr));
        planner.take_changes(changes);
        for (key, e) in &planner.errors {
            let text = e.to_string();
            if self.said.get(key) != Some(&text) {
                tracing::warn!(
                    node,
                    "{text} (refused; its last good version, if any, stays in force)"
                );
            }
        }
        self.said = (planner.errors.iter())
            .map(|(k, e)| (k.clone(), e.to_string()))
            .collect();
        if !self.loaded {
            planner.clear_pending();
            let entries = planner.entries();
            self.applier.load(&entries)?;
            self.loaded = true;
            return Ok(Synced {
                elements: entries.len(),
                whole: true,
            });
        }
        let pending = planner.take_pending();
        if let Err(e) = self.applier.apply(&pending) {
            self.loaded = false;
            return Err(e);
        }
        Ok(Synced {
            elements: pending.len(),
            whole: false,
        })
    }

    /// Reads the drop log in a thread of its own (in the calling thread's network namespace).
    pub fn watch_drops(&self, node: &str, metrics: Arc<DenyMetrics>) {
        let planner = self.planner.clone();
        let node = node.to_string();
        let group = match nft::netlink::LogGroup::bind(LOG_GROUP, 128) {
            Ok(g) => g,
            Err(e) => {
                tracing::warn!(
                    node,
                    "nflog group {LOG_GROUP}: {e}; denied packets are not logged"
                );
                return;
            }
        };
        let (p, m) = (planner.clone(), metrics.clone());
        std::thread::spawn(move || drop_log(&node, group, &p, &m));
        std::thread::spawn(move || count_denied(&planner, &metrics));
    }
}

/// How often the kernel's denied-address counters are read into the metric.
const COUNT_EVERY: std::time::Duration = std::time::Duration::from_secs(2);

/// Adds each denied address's counter growth to the policies that isolate its pod. The work is
/// the addresses denied in the last 10 minutes, whatever the number of pods and policies.
fn count_denied(planner: &Mutex<Planner>, metrics: &DenyMetrics) {
    let Ok(mut conn) = nft::netlink::Conn::open() else {
        return;
    };
    let mut last: HashMap<(Direction, Ipv4Addr), u64> = HashMap::new();
    loop {
        std::thread::sleep(COUNT_EVERY);
        let mut now = HashMap::new();
        for (set, d) in [
            ("egress-denied", Direction::Egress),
            ("ingress-denied", Direction::Ingress),
        ] {
            // No table yet (or being replaced): read again next time.
            let Ok(counted) = conn.counted_elements(FAMILY_IPV4, TABLE_NAME, set) else {
                continue;
            };
            for (key, packets) in counted {
                let Ok(octets) = <[u8; 4]>::try_from(key) else {
                    continue;
                };
                let ip = Ipv4Addr::from(octets);
                let before = last.get(&(d, ip)).copied().unwrap_or(0);
                // A counter below its last reading is a new element (the old one timed out).
                let grown = packets.checked_sub(before).unwrap_or(packets);
                now.insert((d, ip), packets);
                if grown == 0 {
                    continue;
                }
                let planner = planner.lock().expect("planner");
                let Some(pod) = planner.cluster.pod_at(ip) else {
                    continue;
                };
                for (namespace, policy) in planner.cluster.isolating(pod, d) {
                    metrics
                        .denied
                        .get_or_create(&DeniedLabel {
                            namespace,
                            policy,
                            direction: d.as_str(),
                        })
                        .inc_by(grown);
                }
            }
        }
        last = now;
    }
}

fn drop_log(
    node: &str,
    mut group: nft::netlink::LogGroup,
    planner: &Mutex<Planner>,
    metrics: &DenyMetrics,
) {
    loop {
        let logged = match group.recv() {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(node, "nflog group {LOG_GROUP}: {e}");
                std::thread::sleep(std::time::Duration::from_secs(1));
                continue;
            }
        };
        for l in logged {
            let Some(pkt) = Packet::parse(&l.payload) else {
                continue;
            };
            let what = format!(
                "{} {} -> {}:{}",
                cluster::Proto::from_number(pkt.proto).map_or("ip", |p| p.as_str()),
                pkt.src,
                pkt.dst,
                pkt.port
            );
            let direction = l.prefix.trim();
            if direction == "unknown-pod" {
                metrics
                    .denied
                    .get_or_create(&DeniedLabel {
                        namespace: String::new(),
                        policy: String::new(),
                        direction: "unknown-pod",
                    })
                    .inc();
                tracing::info!(
                    node,
                    "denied {what}: a pod this agent has not planned yet (policies exist)"
                );
                continue;
            }
            let d = planner.lock().expect("planner").cluster.decide(&pkt);
            let (dir, side) = match direction {
                "egress" => (Direction::Egress, d.egress),
                _ => (Direction::Ingress, d.ingress),
            };
            match side {
                Some((pod, Side::Denied { policies, .. })) => {
                    let names: Vec<String> =
                        policies.iter().map(|(n, p)| format!("{n}/{p}")).collect();
                    tracing::info!(
                        node,
                        "denied {what} ({}): pod {}/{} is isolated by NetworkPolicy {} and no rule allows it",
                        dir.as_str(),
                        pod.0,
                        pod.1,
                        names.join(", ")
                    );
                }
                _ => tracing::info!(node, "denied {what} ({direction}) by rules since changed"),
            }
        }
    }
}
