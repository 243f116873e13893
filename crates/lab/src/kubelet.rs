//! The lab's kubelet prober: one process per node, in the node's namespace, running the
//! readiness and liveness probes of the node's pods from there, as the kubelet does (so an
//! `httpGet` probe comes from the node's address, which NetworkPolicy never filters).
//!
//! A readiness change flips the pod's Ready condition and its endpoints' `ready` in the
//! EndpointSlices it is in (the EndpointSlice controller's part); a liveness failure restarts the
//! container. Both are written under the lab's lock, like every other change to the lab.

use crate::probes::{ExecIn, Probe};
use crate::{infra, Lab, PodRecord, State};
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime};

/// How often the prober looks for due probes and for a changed lab state.
const TICK: Duration = Duration::from_millis(100);

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Readiness,
    Liveness,
}

/// One probe of one container of one pod instance.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Key {
    pod: String,
    container: String,
    kind: Kind,
}

/// A probe's schedule and counters, for the container instance it was made for.
struct Tracker {
    /// The container's process and the pod's hash: a new one starts the probe afresh.
    instance: (i32, String),
    probe: Probe,
    next: Instant,
    running: bool,
    successes: u32,
    failures: u32,
    /// A readiness probe's verdict once a threshold was reached.
    ready: Option<bool>,
}

/// What a probe result asks of the lab.
#[derive(Debug, PartialEq, Eq)]
enum Change {
    Ready(bool),
    Restart,
}

/// A change for one container instance (its process): void once that process is replaced.
struct Pending {
    pod: String,
    container: String,
    pid: i32,
    change: Change,
}

/// Runs the prober of `node` until killed.
pub fn run(lab: &Lab, node: &str) -> Result<(), String> {
    let mut trackers: BTreeMap<Key, Tracker> = BTreeMap::new();
    let mut seen: Option<(u64, SystemTime)> = None;
    let mut pods: BTreeMap<String, PodRecord> = BTreeMap::new();
    let mut pending: Vec<Pending> = Vec::new();
    let (tx, rx) = mpsc::channel::<(Key, (i32, String), Result<String, String>)>();
    loop {
        // Every write of state.json is a new file (written aside, renamed over): a new inode
        // even when two writes fall in one tick of the file-time clock.
        let modified = std::fs::metadata(lab.dir.join("state.json"))
            .and_then(|m| Ok((std::os::unix::fs::MetadataExt::ino(&m), m.modified()?)))
            .ok();
        if modified != seen {
            seen = modified;
            if let Ok(s) = lab.load() {
                pods = (s.pods.into_iter())
                    .filter(|p| p.node == node)
                    .map(|p| (p.key(), p))
                    .collect();
                track(&mut trackers, pods.values());
            }
        }
        let now = Instant::now();
        for (key, t) in trackers.iter_mut() {
            if t.running || now < t.next {
                continue;
            }
            let Some(p) = pods.get(&key.pod) else {
                continue;
            };
            t.running = true;
            t.next = now + t.probe.period;
            let (key, instance, probe, tx) =
                (key.clone(), t.instance.clone(), t.probe.clone(), tx.clone());
            let pod = p.clone();
            let resolv = lab.resolv_conf_path(&p.namespace, &p.name);
            std::thread::spawn(move || {
                let result = probe_once(&pod, &probe, &resolv);
                let _ = tx.send((key, instance, result));
            });
        }
        while let Ok((key, instance, result)) = rx.try_recv() {
            let Some(t) = trackers.get_mut(&key).filter(|t| t.instance == instance) else {
                continue;
            };
            t.running = false;
            if judge(t, &key, &result) {
                pending.push(Pending {
                    pod: key.pod.clone(),
                    container: key.container.clone(),
                    pid: instance.0,
                    change: Change::Restart,
                });
            }
        }
        // Readiness is compared with the lab's record, not sent once: a change that could not
        // be written (or was written over) is sent again.
        for (key, t) in trackers.iter().filter(|(k, _)| k.kind == Kind::Readiness) {
            let (Some(want), Some(p)) = (t.ready, pods.get(&key.pod)) else {
                continue;
            };
            let change = Change::Ready(want);
            let queued = pending
                .iter()
                .any(|x| x.pod == key.pod && x.container == key.container && x.change == change);
            if want == p.not_ready.contains(&key.container) && !queued {
                pending.push(Pending {
                    pod: key.pod.clone(),
                    container: key.container.clone(),
                    pid: t.instance.0,
                    change,
                });
            }
        }
        if !pending.is_empty() {
            if let Ok(Some(_lock)) = lab.try_lock() {
                let done = std::mem::take(&mut pending);
                if let Err(e) = commit(lab, &done) {
                    eprintln!("prober: {e}");
                }
                // Restarted containers are new instances: their probes start again.
                seen = None;
            }
        }
        std::thread::sleep(TICK);
    }
}

/// Keeps one tracker per probe of the pods here, new ones for new container instances.
fn track<'a>(trackers: &mut BTreeMap<Key, Tracker>, pods: impl Iterator<Item = &'a PodRecord>) {
    let mut live = BTreeSet::new();
    let now = Instant::now();
    for p in pods {
        for (i, w) in p.workloads.iter().enumerate() {
            let Some(proc_) = p.procs.get(i) else {
                continue;
            };
            let instance = (proc_.pid, p.hash.clone());
            for (kind, probe) in [
                (Kind::Readiness, &w.readiness),
                (Kind::Liveness, &w.liveness),
            ] {
                let Some(probe) = probe else { continue };
                let key = Key {
                    pod: p.key(),
                    container: w.container.clone(),
                    kind,
                };
                live.insert(key.clone());
                if trackers.get(&key).is_some_and(|t| t.instance == instance) {
                    continue;
                }
                trackers.insert(
                    key,
                    Tracker {
                        instance: instance.clone(),
                        probe: probe.clone(),
                        next: now + probe.initial_delay,
                        running: false,
                        successes: 0,
                        failures: 0,
                        ready: None,
                    },
                );
            }
        }
    }
    trackers.retain(|k, _| live.contains(k));
}

/// One probe run, from this namespace (the node's); `exec` in the pod's.
fn probe_once(p: &PodRecord, probe: &Probe, resolv: &std::path::Path) -> Result<String, String> {
    let ip: IpAddr = p.ip.ok_or("the pod has no address")?.into();
    let ns = infra::open_ns(&p.netns)?;
    probe.run(
        ip,
        &ExecIn {
            netns: &ns,
            hostname: Lab::pod_hostname(p),
            resolv_conf: resolv.exists().then_some(resolv),
        },
    )
}

/// Counts a result against the thresholds (logged like the kubelet's events): a readiness
/// probe's verdict is kept in the tracker; whether a liveness probe asks for a restart.
fn judge(t: &mut Tracker, key: &Key, result: &Result<String, String>) -> bool {
    match result {
        Ok(_) => {
            t.failures = 0;
            t.successes = t.successes.saturating_add(1);
            if t.successes >= t.probe.success_threshold {
                t.ready = Some(true);
            }
            false
        }
        Err(why) => {
            let what = match key.kind {
                Kind::Readiness => "Readiness",
                Kind::Liveness => "Liveness",
            };
            eprintln!(
                "Unhealthy pod {} container {}: {what} probe failed: {why}",
                key.pod, key.container
            );
            t.successes = 0;
            t.failures = t.failures.saturating_add(1);
            if t.failures < t.probe.failure_threshold {
                return false;
            }
            t.ready = Some(false);
            let restart = key.kind == Kind::Liveness && t.failures == t.probe.failure_threshold;
            if restart {
                eprintln!(
                    "Killing pod {} container {}: failed liveness probe, will be restarted",
                    key.pod, key.container
                );
            }
            restart
        }
    }
}

/// Writes the changes into the lab state (under the caller's lock): readiness into the pod and
/// its EndpointSlices, restarts as new processes.
fn commit(lab: &Lab, changes: &[Pending]) -> Result<(), String> {
    let mut s: State = lab.load()?;
    let mut ready_changed = false;
    for c in changes {
        let Some(p) = s.pods.iter_mut().find(|p| p.key() == c.pod) else {
            continue;
        };
        let Some(i) = p.workloads.iter().position(|w| w.container == c.container) else {
            continue;
        };
        if p.procs.get(i).map(|x| x.pid) != Some(c.pid) {
            continue; // about a process already replaced
        }
        match c.change {
            Change::Ready(ready) => {
                let was_not = p.not_ready.contains(&c.container);
                if ready {
                    p.not_ready.retain(|x| x != &c.container);
                } else if !was_not {
                    p.not_ready.push(c.container.clone());
                }
                ready_changed |= was_not == ready;
            }
            Change::Restart => {
                p.procs[i].kill();
                // Its sockets close only once it is gone; the new one binds the same ports.
                let deadline = Instant::now() + Duration::from_secs(5);
                while p.procs[i].alive() && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(10));
                }
                let ns = infra::open_ns(&p.netns)?;
                p.procs[i] = lab.start_container(p, &ns, &p.workloads[i].clone())?;
                p.restarts += 1;
                // A restarted container is not ready until its readiness probe says so.
                if p.workloads[i].readiness.is_some() && !p.not_ready.contains(&c.container) {
                    p.not_ready.push(c.container.clone());
                    ready_changed = true;
                }
            }
        }
    }
    lab.save(&s)?;
    if ready_changed {
        let m = lab.cluster_manifests(&s)?;
        lab.publish_services(&mut s, &m.services)?;
    }
    Ok(())
}
